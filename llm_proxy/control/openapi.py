"""The OpenAPI 3 document of the management API, served at ``/manage/openapi.json``.

Written out rather than generated: the API is small, and a test checks that every route the server
registers is documented here and every documented route exists.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from llm_proxy import __version__
from llm_proxy.control.operations import (
    MAX_ALLOWED_MODELS,
    MAX_BUDGET_USD,
    MAX_COUNT,
    MAX_DURATION_MINUTES,
    MAX_MODEL_PATTERN_LENGTH,
    MAX_TOKEN_METADATA_BYTES,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_TS = {"type": "string", "format": "date-time"}
_TS_NULL = {"type": ["string", "null"], "format": "date-time"}
_AUTH_ERRORS = {"401": _error("Missing or wrong management token")}
_NO_CONTENT = {"description": "Done"}

_USAGE = {
    "type": "object",
    "description": (
        "Usage aggregates, counted from the instrumentation events shortly after each request"
        " (not the quota counter request_count). Only in the answer of GET by id."
    ),
    "required": [
        "cost_usd",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "errors",
        "last_used_at",
    ],
    "properties": {
        "cost_usd": {"type": "number", "description": "What the requests cost, in US dollars"},
        "requests": {"type": "integer"},
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "errors": {"type": "integer", "description": "Answered with an error or a 4xx/5xx status"},
        "last_used_at": _TS_NULL,
    },
}


def _nullable_count(description: str) -> dict[str, Any]:
    return {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": MAX_COUNT,
        "description": description,
    }


# A token's limits as a request sets them (null: no such limit) and as an answer shows them.
_LIMITS: dict[str, Any] = {
    "max_requests": _nullable_count("Admitted requests over the token's lifetime"),
    "rpm": _nullable_count("Admitted requests in any rolling 60 s"),
    "tpm": _nullable_count("Prompt plus completion tokens in any rolling 60 s"),
    "budget_usd": {
        "type": ["number", "null"],
        "exclusiveMinimum": 0,
        "maximum": MAX_BUDGET_USD,
        "description": "Lifetime spend in US dollars, kept to the nano-dollar",
    },
    "allowed_models": {
        "type": ["array", "null"],
        "minItems": 1,
        "maxItems": MAX_ALLOWED_MODELS,
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_PATTERN_LENGTH},
        "description": (
            "Glob patterns (fnmatch) the request's model must match; null: any model."
            " Duplicates are dropped, order kept."
        ),
    },
}
_METADATA = {
    "type": "object",
    "description": (
        f"Free-form JSON object, at most {MAX_TOKEN_METADATA_BYTES} bytes serialised;"
        " set when the token is issued, not changed afterwards"
    ),
}
_STATUS = {
    "type": "string",
    "enum": ["active", "expired", "revoked", "exhausted"],
    "description": "exhausted: max_requests used up or the budget spent",
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "code": {"type": "string"},
                },
            }
        },
    },
    "Project": {
        "type": "object",
        "required": ["id", "name", "is_active", "api_key", "created_at", "updated_at"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "metadata": {"type": "object"},
            "is_active": {"type": "boolean"},
            "api_key": {"type": "string", "description": "Masked, e.g. sk-ab…wxyz"},
            "created_at": _TS,
            "updated_at": _TS,
            "usage": _ref("Usage"),
        },
    },
    "ProjectCreate": {
        "type": "object",
        "required": ["name", "api_key"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "api_key": {"type": "string", "minLength": 1, "maxLength": 1000},
            "description": {"type": "string", "maxLength": 2000},
            "metadata": {"type": "object"},
        },
    },
    "ProjectUpdate": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "api_key": {"type": "string", "minLength": 1, "maxLength": 1000},
            "description": {"type": "string", "maxLength": 2000},
            "metadata": {"type": "object"},
            "is_active": {"type": "boolean"},
            "revoke_tokens": {"type": "boolean"},
        },
    },
    "RevokeResult": {
        "type": "object",
        "required": ["revoked_count", "already_revoked_count", "total_tokens"],
        "properties": {
            "revoked_count": {"type": "integer"},
            "already_revoked_count": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    },
    "Token": {
        "type": "object",
        "required": [
            "id",
            "project_id",
            "expires_at",
            "is_active",
            "status",
            "request_count",
            *_LIMITS,
            "spent_usd",
            "reserved_usd",
            "metadata",
            "created_at",
            "last_used_at",
            "revoked_at",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "project_id": {"type": "string", "format": "uuid"},
            "expires_at": _TS,
            "is_active": {"type": "boolean"},
            "status": _STATUS,
            "request_count": {"type": "integer"},
            **_LIMITS,
            "spent_usd": {"type": "number", "description": "Settled spend in US dollars"},
            "reserved_usd": {
                "type": "number",
                "description": "Held for requests in flight, in US dollars",
            },
            "metadata": _METADATA,
            "created_at": _TS,
            "last_used_at": _TS_NULL,
            "revoked_at": _TS_NULL,
            "usage": _ref("Usage"),
        },
    },
    "TokenCreate": {
        "type": "object",
        "required": ["project_id", "duration_minutes"],
        "additionalProperties": False,
        "properties": {
            "project_id": {"type": "string"},
            "duration_minutes": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_DURATION_MINUTES,
            },
            **_LIMITS,
            "metadata": _METADATA,
        },
    },
    "TokenCreated": {
        "type": "object",
        "required": [
            "id",
            "token",
            "project_id",
            "expires_at",
            *_LIMITS,
            "metadata",
            "created_at",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "token": {"type": "string", "description": "Shown once; never returned again"},
            "project_id": {"type": "string"},
            "expires_at": _TS,
            **_LIMITS,
            "metadata": _METADATA,
            "created_at": _TS,
        },
    },
    "TokenUpdate": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "description": "null clears a limit; metadata cannot be changed",
        "properties": {
            "is_active": {"type": "boolean"},
            **_LIMITS,
        },
    },
    "Usage": _USAGE,
    "AuditPage": {
        "type": "object",
        "required": ["events", "pagination"],
        "properties": {
            "events": {"type": "array", "items": {"type": "object"}},
            "pagination": {
                "type": "object",
                "properties": {
                    "page": {"type": "integer"},
                    "page_size": {"type": "integer"},
                    "total": {"type": "integer"},
                    "total_pages": {"type": "integer"},
                },
            },
        },
    },
}


@cache
def openapi_document() -> dict[str, Any]:
    project_id = [_path_param("project_id")]
    token_id = [_path_param("token_id")]
    not_found = {"404": _error("Unknown id")}
    bad = {"400": _error("Invalid field; the message names it")}
    paths: dict[str, Any] = {
        "/manage/projects": {
            "post": {
                "summary": "Create a project holding an upstream key",
                "requestBody": _body(_ref("ProjectCreate")),
                "responses": {"201": _json(_ref("Project"), "Created"), **bad, **_AUTH_ERRORS},
            },
            "get": {
                "summary": "List projects",
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Project")}, "Projects"),
                    **_AUTH_ERRORS,
                },
            },
        },
        "/manage/projects/{project_id}": {
            "parameters": project_id,
            "get": {
                "summary": "Get a project with its usage aggregates",
                "responses": {
                    "200": _json(_ref("Project"), "Project"),
                    **not_found,
                    **_AUTH_ERRORS,
                },
            },
            "patch": {
                "summary": "Update, activate/deactivate, or revoke all tokens of a project",
                "requestBody": _body(_ref("ProjectUpdate")),
                "responses": {
                    "200": _json(_ref("Project"), "Updated"),
                    **bad,
                    **not_found,
                    **_AUTH_ERRORS,
                },
            },
            "delete": {
                "summary": "Delete a project; its tokens stop working at once",
                "responses": {"204": _NO_CONTENT, **not_found, **_AUTH_ERRORS},
            },
        },
        "/manage/projects/{project_id}/tokens/revoke": {
            "parameters": project_id,
            "post": {
                "summary": "Revoke every token of a project",
                "responses": {
                    "200": _json(_ref("RevokeResult"), "Counts"),
                    **not_found,
                    **_AUTH_ERRORS,
                },
            },
        },
        "/manage/tokens": {
            "post": {
                "summary": "Issue a withering token",
                "requestBody": _body(_ref("TokenCreate")),
                "responses": {
                    "201": _json(_ref("TokenCreated"), "Issued; the value is shown only here"),
                    **bad,
                    "403": _error("Project inactive"),
                    **not_found,
                    **_AUTH_ERRORS,
                },
            },
            "get": {
                "summary": "List tokens (never their values)",
                "parameters": [_query("project_id", {"type": "string"})],
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Token")}, "Tokens"),
                    **_AUTH_ERRORS,
                },
            },
            "delete": {
                "summary": "Revoke a token by its value",
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["token"],
                        "properties": {"token": {"type": "string"}},
                    }
                ),
                "responses": {"204": _NO_CONTENT, **bad, **not_found, **_AUTH_ERRORS},
            },
        },
        "/manage/tokens/{token_id}": {
            "parameters": token_id,
            "get": {
                "summary": "Get a token with its usage aggregates",
                "responses": {"200": _json(_ref("Token"), "Token"), **not_found, **_AUTH_ERRORS},
            },
            "patch": {
                "summary": "Activate/deactivate a token or change its limits",
                "requestBody": _body(_ref("TokenUpdate")),
                "responses": {
                    "200": _json(_ref("Token"), "Updated"),
                    **bad,
                    **not_found,
                    **_AUTH_ERRORS,
                },
            },
            "delete": {
                "summary": "Revoke a token (also when already revoked)",
                "responses": {"204": _NO_CONTENT, **not_found, **_AUTH_ERRORS},
            },
        },
        "/manage/audit": {
            "get": {
                "summary": "The audit log, newest first",
                "parameters": [
                    *(
                        _query(name, {"type": "string"})
                        for name in (
                            "actor",
                            "action",
                            "target_type",
                            "target_id",
                            "project_id",
                            "outcome",
                        )
                    ),
                    _query("since", _TS),
                    _query("until", _TS),
                    _query("page", {"type": "integer", "minimum": 1, "default": 1}),
                    _query(
                        "page_size",
                        {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
                    ),
                ],
                "responses": {"200": _json(_ref("AuditPage"), "Events"), **bad, **_AUTH_ERRORS},
            },
        },
        "/manage/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3 document"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-proxy management API", "version": __version__},
        "servers": [{"url": "/"}],
        "security": [{"managementToken": []}],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"managementToken": {"type": "http", "scheme": "bearer"}},
        },
    }
