"""The OpenAPI 3.1 document of the management API, served at ``/manage/openapi.json``.

Written out rather than generated: the API is small. The request schemas are built from the same
constants as the checks in :mod:`llm_proxy.control.validation`, and tests hold the document and the
server to each other: every route served is documented under its handler's name as
``operationId``, a body the schemas accept is one the API accepts and the other way round, and every
status an operation can answer is documented and provoked.
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
from llm_proxy.control.validation import (
    MAX_API_KEY_LENGTH,
    MAX_DESCRIPTION_LENGTH,
    MAX_ID_LENGTH,
    MAX_JSON_DEPTH,
    MAX_NAME_LENGTH,
    MAX_PAGE,
    MAX_PAGE_SIZE,
    MAX_TOKEN_VALUE_LENGTH,
    MIN_BUDGET_USD,
)
from llm_proxy.http.control_bridge import MAX_CONTROL_BODY

# The characters the API trims from strings (str.strip()), spelled so that Python's and
# ECMAScript's regexes agree on them.
_TRIMMED = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Holds a character that is not whitespace.
NOT_BLANK = f"[^{_TRIMMED}]"
# An upstream key with no control character once trimmed (crypto.is_sendable_key); a project's
# name likewise (validation.name).
SENDABLE_KEY = rf"^[{_TRIMMED}]*[^\x00-\x1f\x7f-\x9f]*[{_TRIMMED}]*$"
ONE_LINE = SENDABLE_KEY
# A description with no control character but tabs and line breaks once trimmed
# (validation.description).
LINES = rf"^[{_TRIMMED}]*[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*[{_TRIMMED}]*$"
# The compact UTF-8 JSON size of a value (orjson.dumps). No JSON Schema keyword measures it, so the
# document states it as an extension for validators that know it, and in the description.
MAX_JSON_BYTES_KEYWORD = "x-max-json-bytes"
# The deepest nesting of a JSON value (objects and arrays), likewise.
MAX_DEPTH_KEYWORD = "x-max-depth"
# On a response: the error codes its body can carry.
ERROR_CODES_KEYWORD = "x-error-codes"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _text(max_length: int, description: str, *, blank: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "maxLength": max_length}
    if not blank:
        schema |= {"minLength": 1, "pattern": NOT_BLANK}
    return schema | {"description": description}


def _upstream_key(description: str) -> dict[str, Any]:
    # A second pattern: the text's own says it is not blank.
    return _text(MAX_API_KEY_LENGTH, description) | {"allOf": [{"pattern": SENDABLE_KEY}]}


def _name(description: str) -> dict[str, Any]:
    # A second pattern: the text's own says it is not blank.
    return _text(MAX_NAME_LENGTH, description) | {"allOf": [{"pattern": ONE_LINE}]}


def _description(description: str) -> dict[str, Any]:
    return _text(MAX_DESCRIPTION_LENGTH, description, blank=True) | {"pattern": LINES}


def _count(description: str) -> dict[str, Any]:
    return {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": MAX_COUNT,
        "description": f"{description}; null: no limit",
    }


_TS = {"type": "string", "format": "date-time"}
_TS_NULL = {"type": ["string", "null"], "format": "date-time"}
_UUID = {"type": "string", "format": "uuid"}
_COUNTER = {"type": "integer", "minimum": 0}
_DOLLARS = {"type": "number", "minimum": 0}

# A token's limits as a request sets them (null: no such limit) and as an answer shows them.
_LIMITS: dict[str, Any] = {
    "max_requests": _count("Admitted requests over the token's lifetime"),
    "rpm": _count("Admitted requests in any rolling 60 s"),
    "tpm": _count("Prompt plus completion tokens in any rolling 60 s"),
    "budget_usd": {
        "type": ["number", "null"],
        "minimum": MIN_BUDGET_USD,
        "maximum": MAX_BUDGET_USD,
        "description": "Lifetime spend in US dollars, kept to the nano-dollar; null: no budget",
    },
    "allowed_models": {
        "type": ["array", "null"],
        "minItems": 1,
        "maxItems": MAX_ALLOWED_MODELS,
        "items": _text(MAX_MODEL_PATTERN_LENGTH, "A glob pattern (fnmatch), trimmed"),
        "description": (
            "Glob patterns the request's model must match; null: any model."
            " Duplicates are dropped, order kept."
        ),
    },
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": _ref("ErrorDetail"),
        },
    },
    "ErrorDetail": {
        "type": "object",
        "required": ["message", "type", "code"],
        "properties": {
            "message": {"type": "string", "description": "For people; names the bad field"},
            "type": {"type": "string", "description": "OpenAI's error type, by status"},
            "code": {"type": "string", "description": "Stable and machine-readable"},
        },
    },
    "ProjectMetadata": {
        "type": "object",
        MAX_DEPTH_KEYWORD: MAX_JSON_DEPTH,
        "description": (
            f"Free-form JSON object, nested at most {MAX_JSON_DEPTH} levels, with no NUL"
            " character (U+0000) in any key or string"
        ),
    },
    "TokenMetadata": {
        "type": "object",
        MAX_JSON_BYTES_KEYWORD: MAX_TOKEN_METADATA_BYTES,
        MAX_DEPTH_KEYWORD: MAX_JSON_DEPTH,
        "description": (
            f"Free-form JSON object, at most {MAX_TOKEN_METADATA_BYTES} bytes as compact UTF-8"
            f" JSON, nested at most {MAX_JSON_DEPTH} levels, with no NUL character (U+0000);"
            " set when the token is issued, never changed"
        ),
    },
    "Project": {
        "type": "object",
        "required": [
            "id",
            "name",
            "description",
            "metadata",
            "is_active",
            "api_key",
            "created_at",
            "updated_at",
        ],
        "properties": {
            "id": _UUID,
            "name": {"type": "string"},
            "description": {"type": "string"},
            "metadata": _ref("ProjectMetadata"),
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
            "name": _name("Trimmed; one line, no control characters"),
            "api_key": _upstream_key(
                "The upstream provider's key, sent as a header value: no control characters;"
                " never shown again"
            ),
            "description": _description(
                "Trimmed; may be empty; no control characters but tabs and line breaks"
            ),
            "metadata": _ref("ProjectMetadata"),
        },
    },
    "ProjectUpdate": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {
            "name": _name("Trimmed; one line, no control characters"),
            "api_key": _upstream_key("A new upstream key: no control characters"),
            "description": _description(
                "Trimmed; empty clears it; no control characters but tabs and line breaks"
            ),
            "metadata": _ref("ProjectMetadata"),
            "is_active": {"type": "boolean", "description": "false: its tokens stop working"},
            "revoke_tokens": {"type": "boolean", "description": "true: revoke all its tokens"},
        },
    },
    "RevokeResult": {
        "type": "object",
        "required": ["revoked_count", "already_revoked_count", "total_tokens"],
        "properties": {
            "revoked_count": _COUNTER,
            "already_revoked_count": _COUNTER,
            "total_tokens": _COUNTER,
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
            "id": _UUID,
            "project_id": _UUID,
            "expires_at": _TS,
            "is_active": {"type": "boolean"},
            "status": {
                "type": "string",
                "enum": ["active", "expired", "revoked", "exhausted"],
                "description": (
                    "exhausted: max_requests used up, or the budget spent (to the last cent, or"
                    " too little left for a request it refused budget_exceeded)"
                ),
            },
            "request_count": _COUNTER | {"description": "Admitted requests (the quota counter)"},
            **_LIMITS,
            "spent_usd": _DOLLARS
            | {"description": "Settled lifetime spend in US dollars, with a budget or without"},
            "reserved_usd": _DOLLARS | {"description": "Held for requests in flight, in USD"},
            "metadata": _ref("TokenMetadata"),
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
            "project_id": _text(MAX_ID_LENGTH, "The project's id"),
            "duration_minutes": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_DURATION_MINUTES,
                "description": "Lifetime; the token expires this many minutes from now",
            },
            **_LIMITS,
            "metadata": _ref("TokenMetadata"),
        },
    },
    "TokenCreated": {
        "type": "object",
        "required": ["id", "token", "project_id", "expires_at", *_LIMITS, "metadata", "created_at"],
        "properties": {
            "id": _UUID,
            "token": {"type": "string", "description": "Shown once; never returned again"},
            "project_id": _UUID,
            "expires_at": _TS,
            **_LIMITS,
            "metadata": _ref("TokenMetadata"),
            "created_at": _TS,
        },
    },
    "TokenUpdate": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "description": "null clears a limit; metadata cannot be changed",
        "properties": {
            "is_active": {"type": "boolean", "description": "false revokes, true reinstates"},
            **_LIMITS,
        },
    },
    "TokenRevoke": {
        "type": "object",
        "required": ["token"],
        "additionalProperties": False,
        "properties": {"token": _text(MAX_TOKEN_VALUE_LENGTH, "The token's value, sk-…")},
    },
    "Usage": {
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
            "cost_usd": _DOLLARS | {"description": "What the requests cost, in US dollars"},
            "requests": _COUNTER,
            "prompt_tokens": _COUNTER,
            "completion_tokens": _COUNTER,
            "total_tokens": _COUNTER,
            "errors": _COUNTER | {"description": "Answered with an error or a 4xx/5xx status"},
            "last_used_at": _TS_NULL,
        },
    },
    "AuditEvent": {
        "type": "object",
        "required": [
            "id",
            "timestamp",
            "actor",
            "action",
            "target_type",
            "target_id",
            "project_id",
            "outcome",
            "details",
            "request_id",
            "client_ip",
        ],
        "properties": {
            "id": {"type": "integer"},
            "timestamp": _TS,
            "actor": {"type": "string"},
            "action": {"type": "string", "description": "e.g. project.create, token.revoke"},
            "target_type": {"type": "string", "description": "project or token"},
            "target_id": {"type": ["string", "null"]},
            "project_id": {"type": ["string", "null"]},
            "outcome": {"type": "string"},
            "details": {"type": "object", "description": "What changed, never a secret"},
            "request_id": {"type": ["string", "null"]},
            "client_ip": {
                "type": ["string", "null"],
                "description": "Who made the change: the TCP peer, or the client a load balancer"
                " trusted by FORWARDED_ALLOW_IPS names in X-Forwarded-For",
            },
        },
    },
    "Pagination": {
        "type": "object",
        "required": ["page", "page_size", "total", "total_pages"],
        "properties": {
            "page": {"type": "integer", "minimum": 1},
            "page_size": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
            "total": _COUNTER,
            "total_pages": _COUNTER,
        },
    },
    "AuditPage": {
        "type": "object",
        "required": ["events", "pagination"],
        "properties": {
            "events": {"type": "array", "items": _ref("AuditEvent")},
            "pagination": _ref("Pagination"),
        },
    },
}


def _error(description: str, codes: list[str], **headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": f"{description} ({', '.join(codes)})",
        "content": {"application/json": {"schema": _ref("Error")}},
        ERROR_CODES_KEYWORD: codes,
    }
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return response


_FRAMING = "bad_request"
_BODY_CODES = ["invalid_json", "invalid_field", "invalid_request", "invalid_body", _FRAMING]
# Answers to any request, whatever its operation; statuses 400, 408, 413, 414 and 431 come from the
# front door, which frames every request and reads every control-plane body whole first.
_RESPONSES: dict[str, Any] = {
    "Malformed": _error("Malformed HTTP framing", [_FRAMING]),
    "InvalidBody": _error(
        "Bad JSON body or field; the message names the field; or malformed framing", _BODY_CODES
    ),
    "InvalidQuery": _error(
        "Bad query parameter; the message names it; or malformed framing",
        ["invalid_field", _FRAMING],
    ),
    "Unauthorized": _error(
        "Missing or wrong management token", ["unauthorized"], **{"WWW-Authenticate": "Bearer"}
    ),
    "ProjectInactive": _error("The project is inactive", ["project_inactive"]),
    "ProjectNotFound": _error("No such project", ["project_not_found"]),
    "TokenNotFound": _error("No such token", ["token_not_found"]),
    "MethodNotAllowed": _error(
        "The path does not serve this method",
        ["method_not_allowed"],
        Allow="The methods the path serves",
    ),
    "RequestTimeout": _error("The request body stopped arriving", ["request_timeout"]),
    "RequestTooLarge": _error(
        f"The request body exceeds {MAX_CONTROL_BODY} bytes", ["request_too_large"]
    ),
    "UnsupportedContentEncoding": _error(
        "A compressed body (Content-Encoding other than identity): send plain JSON",
        ["unsupported_content_encoding"],
    ),
    "HeadTooLarge": _error("The request head is too large", ["request_header_fields_too_large"]),
    "UriTooLong": _error("The request target is too long", ["uri_too_long"]),
    "StoreUnavailable": _error(
        "The database cannot be reached; retry shortly",
        ["service_unavailable"],
        **{"Retry-After": "Seconds to wait before retrying"},
    ),
}


def _response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NO_CONTENT = {"description": "Done"}


_STATUS_OF = {
    "InvalidQuery": "400",
    "ProjectInactive": "403",
    "ProjectNotFound": "404",
    "TokenNotFound": "404",
}


def _operation(
    operation_id: str,
    tag: str,
    summary: str,
    answers: dict[str, Any],
    *,
    body: str | None = None,
    query: list[dict[str, Any]] | None = None,
    errors: tuple[str, ...] = (),
    public: bool = False,
) -> dict[str, Any]:
    """One operation with every status it can answer: ``answers`` (success), the ``errors`` its
    handler raises, and those that any request can meet on its way there."""
    named = {
        "400": "InvalidBody" if body else "Malformed",
        "408": "RequestTimeout",
        "413": "RequestTooLarge",
        "414": "UriTooLong",
        "431": "HeadTooLarge",
    }
    if body:
        named["415"] = "UnsupportedContentEncoding"
    if not public:
        named |= {"401": "Unauthorized", "503": "StoreUnavailable"}
    for name in errors:
        named[_STATUS_OF[name]] = name
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "tags": [tag],
        "summary": summary,
    }
    if query:
        operation["parameters"] = query
    if body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    responses = {**answers, **{status: _response(name) for status, name in named.items()}}
    operation["responses"] = dict(sorted(responses.items()))
    if public:
        operation["security"] = []
    return operation


def _path_param(name: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(parameters: list[dict[str, Any]] | None = None, **operations: Any) -> dict[str, Any]:
    methods = sorted(method.upper() for method in operations)
    if "GET" in methods:
        methods = sorted([*methods, "HEAD"])
    item: dict[str, Any] = {
        "description": f"Serves {', '.join(methods)}; any other method is answered 405.",
    }
    if parameters:
        item["parameters"] = parameters
    return item | operations


_AUDIT_FILTERS = ("actor", "action", "target_type", "target_id", "project_id", "outcome")

_INFO_DESCRIPTION = f"""\
Projects hold an upstream provider's key; withering tokens issued for a project stand in for it.

Every call but this document's needs `Authorization: Bearer <management token>`. Every error is
`{{"error": {{"message", "type", "code"}}}}`, the shape OpenAI SDKs parse. Bodies are JSON objects
of at most {MAX_CONTROL_BODY} bytes, uncompressed; unknown fields are refused, and null is accepted
only where a schema says so (a token's limits, where it means no limit). A method a path does not
serve is answered 405 with `Allow`.
"""


@cache
def openapi_document() -> dict[str, Any]:
    project_id = _path_param("project_id")
    token_id = _path_param("token_id")
    project = _ref("Project")
    token = _ref("Token")
    paths: dict[str, Any] = {
        "/manage/projects": _path(
            post=_operation(
                "create_project",
                "projects",
                "Create a project holding an upstream key",
                {"201": _json(project, "Created")},
                body="ProjectCreate",
            ),
            get=_operation(
                "list_projects",
                "projects",
                "List projects; any query parameter is refused",
                {"200": _json({"type": "array", "items": project}, "Projects")},
                errors=("InvalidQuery",),
            ),
        ),
        "/manage/projects/{project_id}": _path(
            project_id,
            get=_operation(
                "get_project",
                "projects",
                "Get a project with its usage aggregates",
                {"200": _json(project, "The project, with usage")},
                errors=("ProjectNotFound",),
            ),
            patch=_operation(
                "update_project",
                "projects",
                "Update, activate/deactivate, or revoke all tokens of a project",
                {"200": _json(project, "Updated")},
                body="ProjectUpdate",
                errors=("ProjectNotFound",),
            ),
            delete=_operation(
                "delete_project",
                "projects",
                "Delete a project; its tokens stop working at once",
                {"204": _NO_CONTENT},
                errors=("ProjectNotFound",),
            ),
        ),
        "/manage/projects/{project_id}/tokens/revoke": _path(
            project_id,
            post=_operation(
                "revoke_project_tokens",
                "projects",
                "Revoke every token of a project",
                {"200": _json(_ref("RevokeResult"), "Counts")},
                errors=("ProjectNotFound",),
            ),
        ),
        "/manage/tokens": _path(
            post=_operation(
                "create_token",
                "tokens",
                "Issue a withering token",
                {"201": _json(_ref("TokenCreated"), "Issued; the value is shown only here")},
                body="TokenCreate",
                errors=("ProjectInactive", "ProjectNotFound"),
            ),
            get=_operation(
                "list_tokens",
                "tokens",
                "List tokens (never their values); any other query parameter is refused",
                {"200": _json({"type": "array", "items": token}, "Tokens")},
                query=[
                    _query(
                        "project_id",
                        {"type": "string", "minLength": 1},
                        "Only this project's tokens",
                    )
                ],
                errors=("InvalidQuery", "ProjectNotFound"),
            ),
            delete=_operation(
                "revoke_token_by_value",
                "tokens",
                "Revoke a token by its value (also when already revoked)",
                {"204": _NO_CONTENT},
                body="TokenRevoke",
                errors=("TokenNotFound",),
            ),
        ),
        "/manage/tokens/{token_id}": _path(
            token_id,
            get=_operation(
                "get_token",
                "tokens",
                "Get a token with its usage aggregates",
                {"200": _json(token, "The token, with usage")},
                errors=("TokenNotFound",),
            ),
            patch=_operation(
                "update_token",
                "tokens",
                "Activate/deactivate a token or change its limits",
                {"200": _json(token, "Updated")},
                body="TokenUpdate",
                errors=("TokenNotFound",),
            ),
            delete=_operation(
                "revoke_token",
                "tokens",
                "Revoke a token (also when already revoked)",
                {"204": _NO_CONTENT},
                errors=("TokenNotFound",),
            ),
        ),
        "/manage/audit": _path(
            get=_operation(
                "list_audit_events",
                "audit",
                "The audit log, newest first; any other query parameter is refused",
                {"200": _json(_ref("AuditPage"), "Events")},
                errors=("InvalidQuery",),
                query=[
                    *(_query(name, {"type": "string"}, "Exact match") for name in _AUDIT_FILTERS),
                    _query("since", _TS, "From this moment on (RFC 3339)"),
                    _query("until", _TS, "Before this moment (RFC 3339)"),
                    _query(
                        "page",
                        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 1},
                        "Page number",
                    ),
                    _query(
                        "page_size",
                        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": 50},
                        "Events per page",
                    ),
                ],
            ),
        ),
        "/manage/openapi.json": _path(
            get=_operation(
                "get_openapi_document",
                "meta",
                "This document",
                {"200": _json({"type": "object"}, "OpenAPI 3.1 document")},
                public=True,
            ),
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-proxy management API",
            "version": __version__,
            "description": _INFO_DESCRIPTION,
        },
        "servers": [{"url": "/"}],
        "security": [{"managementToken": []}],
        "tags": [
            {"name": "projects", "description": "Projects and their upstream keys"},
            {"name": "tokens", "description": "Withering tokens and their limits"},
            {"name": "audit", "description": "Who changed what, and when"},
            {"name": "meta", "description": "About this API"},
        ],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "responses": _RESPONSES,
            "securitySchemes": {"managementToken": {"type": "http", "scheme": "bearer"}},
        },
    }
