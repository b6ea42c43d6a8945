"""The management API: JSON in and out under ``/manage/``, behind the management token."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import orjson
import structlog
from aiohttp import ClientPayloadError, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from llm_proxy import errors, failed_sign_ins
from llm_proxy.client_address import client_address
from llm_proxy.control import validation
from llm_proxy.control.openapi import openapi_document
from llm_proxy.control.operations import (
    MAX_COUNT,
    MAX_TOKEN_METADATA_BYTES,
    Actor,
    LimitChanges,
    Operations,
)
from llm_proxy.control.validation import (
    MAX_ID_LENGTH,
    MAX_PAGE,
    MAX_PAGE_SIZE,
    MAX_TOKEN_VALUE_LENGTH,
    MISSING,
)
from llm_proxy.crypto import redact, redact_path, secrets_match
from llm_proxy.models import AuditFilter
from llm_proxy.store.unavailable import DATABASE_ERRORS

log = structlog.get_logger(__name__)

OPERATIONS = web.AppKey("operations", Operations)
MANAGEMENT_TOKEN = web.AppKey("management_token", str)
MAX_JSON_BYTES = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Checked = TypeVar("Checked")
# What reading a body can raise when its bytes are bad (a broken chunk, a truncated or undecodable
# payload); the server's own parser raises the first, another front end may raise the others.
_UNREADABLE_BODY = (web.RequestPayloadError, HttpProcessingError, ClientPayloadError)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


@web.middleware
async def management_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate, then render every failure in the OpenAI error shape; nothing is cached."""
    response = await _answer(request, handler)
    # An issued token's value is in one answer; the others show live state.
    response.headers["Cache-Control"] = "no-store"
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.path != "/manage/openapi.json":
            _authenticate(request)
        return await handler(request)
    except errors.ProxyError as exc:
        return exc.to_response()
    except web.HTTPMethodNotAllowed as exc:
        return errors.ManagementMethodNotAllowed(
            f"Method {request.method} is not allowed on {redact_path(request.path)}.",
            headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
        ).to_response()
    except web.HTTPNotFound:
        # A path may hold a token's value pasted into it: named masked, as every message does.
        return errors.NotFound(f"No management route {redact_path(request.path)}.").to_response()
    except web.HTTPRequestEntityTooLarge:
        return errors.RequestTooLarge("Request body is too large.").to_response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc)
    except _UNREADABLE_BODY:
        return errors.InvalidBody("Request body could not be read.").to_response()
    except DATABASE_ERRORS as exc:
        # The database is down or unreachable: the operator's call can be retried, and /ready
        # says the same. Not a defect of ours, so no traceback.
        log.error(
            "management.store_unavailable",
            method=request.method,
            path=redact_path(request.path),
            error=repr(exc),
        )
        return errors.ServiceUnavailable(
            "The database is unavailable; retry shortly.", headers={"Retry-After": "1"}
        ).to_response()
    except Exception:
        # aiohttp would answer a plain-text 500; a client of this API parses only the error shape.
        log.exception(
            "management.unexpected_error", method=request.method, path=redact_path(request.path)
        )
        return errors.ProxyError("Internal error.").to_response()


def _http_error(exc: web.HTTPException) -> web.Response:
    """An aiohttp HTTP exception in the error shape, keeping its status."""
    error_type = "invalid_request_error" if exc.status < 500 else "server_error"
    code = "_".join(exc.reason.lower().split())
    return web.Response(
        status=exc.status,
        body=errors.error_body(exc.text or exc.reason, error_type, code),
        content_type="application/json",
    )


def _authenticate(request: web.Request) -> None:
    expected = request.app[MANAGEMENT_TOKEN].encode()
    # Repeated, the values are one list (RFC 9110), which no credential matches: the first alone
    # would let a second header that a client or a hop added pass unseen, as on the proxy path.
    supplied = ", ".join(request.headers.getall("Authorization", ()))
    scheme, _, credential = supplied.partition(" ")
    # Header bytes that are not UTF-8 arrive as lone surrogates; surrogateescape turns them back
    # into the bytes sent, so they simply fail the comparison instead of failing to encode.
    given = credential.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not secrets_match(given, expected):
        if supplied:
            failed_sign_ins.refused("management", client_address(request))
        raise errors.Unauthorized(
            "Missing or wrong management token.", headers={"WWW-Authenticate": "Bearer"}
        )


def _actor(request: web.Request) -> Actor:
    return Actor(
        name="management-api",
        request_id=request.headers.get("X-Request-ID"),
        client_ip=client_address(request),
    )


async def _read_body(request: web.Request) -> bytes:
    """The whole body, refused as soon as it exceeds ``MAX_JSON_BYTES``.

    Read to its end rather than with one ``read(n)``, which answers with whatever has arrived so
    far; counted while it arrives because a chunked body announces no length. The limit is kept
    here because aiohttp applies only the root application's ``client_max_size``.
    """
    codings = {
        coding.strip().lower()
        for value in request.headers.getall(hdrs.CONTENT_ENCODING, ())
        for coding in value.split(",")
    } - {"identity", ""}
    if codings:
        raise errors.UnsupportedContentEncoding(
            f"Content-Encoding {min(codings)!r} is not accepted: send plain JSON."
        )
    too_large = f"Request body exceeds {MAX_JSON_BYTES} bytes."
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise errors.RequestTooLarge(too_large)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise errors.RequestTooLarge(too_large)
    return bytes(body)


async def _checked_body(
    request: web.Request, check: Callable[[dict[str, Any]], Checked]
) -> Checked:
    """The body's fields, read and put through ``check`` (which raises for a bad one).

    Parsed and checked in a worker thread: Python's reading of a body near ``MAX_JSON_BYTES`` (its
    keys one by one for repeats, its numbers for their range, metadata's strings and nesting)
    takes the better part of a second, during which the event loop answered nothing else of this
    process, proxied streams included.
    """
    raw = await _read_body(request)
    return await asyncio.to_thread(lambda: check(_json_object(raw)))


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise errors.InvalidJson("Request body must be a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson refuses a number past a double's range, which is JSON: a bad value of a field.
        _refuse_out_of_range(validation.ambiguity(raw))
        raise errors.InvalidJson(f"Request body is not valid JSON: {exc.msg}.") from None
    if not isinstance(body, dict):
        raise errors.InvalidJson("Request body must be a JSON object.")
    if (ambiguity := validation.ambiguity(raw)) is not None:
        _refuse_out_of_range(ambiguity)
        raise errors.InvalidJson(f"Request body is ambiguous: {ambiguity.problem}.")
    return body


def _refuse_out_of_range(ambiguity: validation.Ambiguity | None) -> None:
    """A number out of range is refused as any bad value is: 400 naming its field (masked, as an
    unknown field's name is)."""
    if ambiguity is not None and ambiguity.field is not None:
        raise errors.InvalidField(redact(ambiguity.field), ambiguity.problem)


def _ops(request: web.Request) -> Operations:
    return request.app[OPERATIONS]


def _given(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not MISSING}


# -- projects ----------------------------------------------------------------------------------


def _new_project(body: dict[str, Any]) -> dict[str, Any]:
    validation.require_known(body, {"name", "api_key", "description", "metadata"})
    return {
        "name": validation.name(body, required=True),
        "api_key": validation.upstream_key(body, required=True),
        **_given(
            description=validation.description(body),
            metadata=validation.mapping(body, "metadata"),
        ),
    }


async def create_project(request: web.Request) -> web.Response:
    fields = await _checked_body(request, _new_project)
    project = await _ops(request).create_project(_actor(request), **fields)
    return json_response(project.to_api(), status=201)


async def list_projects(request: web.Request) -> web.Response:
    validation.require_known_query(request.query, set())
    return json_response([p.to_api() for p in await _ops(request).list_projects()])


async def get_project(request: web.Request) -> web.Response:
    ops = _ops(request)
    project = await ops.get_project(request.match_info["project_id"])
    usage = await ops.project_usage(project.id)
    return json_response({**project.to_api(), "usage": usage.to_api()})


def _project_changes(body: dict[str, Any]) -> dict[str, Any]:
    validation.require_known(
        body, {"name", "api_key", "is_active", "revoke_tokens", "description", "metadata"}
    )
    fields = _given(
        name=validation.name(body, required=False),
        api_key=validation.upstream_key(body, required=False),
        is_active=validation.boolean(body, "is_active"),
        revoke_tokens=validation.boolean(body, "revoke_tokens"),
        description=validation.description(body),
        metadata=validation.mapping(body, "metadata"),
    )
    if not fields:
        raise errors.InvalidRequest("Nothing to update: give at least one field.")
    for key in ("name", "api_key"):
        if key in fields and not fields[key]:
            raise errors.InvalidField(key, "must not be empty")
    return fields


async def update_project(request: web.Request) -> web.Response:
    fields = await _checked_body(request, _project_changes)
    project = await _ops(request).update_project(
        _actor(request), request.match_info["project_id"], **fields
    )
    return json_response(project.to_api())


async def delete_project(request: web.Request) -> web.Response:
    await _ops(request).delete_project(_actor(request), request.match_info["project_id"])
    return web.Response(status=204)


async def revoke_project_tokens(request: web.Request) -> web.Response:
    counts = await _ops(request).revoke_project_tokens(
        _actor(request), request.match_info["project_id"]
    )
    return json_response(
        {
            "revoked_count": counts.revoked_count,
            "already_revoked_count": counts.already_revoked_count,
            "total_tokens": counts.total_tokens,
        }
    )


# -- tokens ------------------------------------------------------------------------------------


_TOKEN_LIMITS = ("max_requests", "rpm", "tpm", "budget_usd", "allowed_models")


def _token_limits(body: dict[str, Any]) -> LimitChanges:
    """The limits given in a token body: absent ones left out, null ones as None."""
    counts = {
        key: validation.integer(body, key, minimum=1, maximum=MAX_COUNT, nullable=True)
        for key in ("max_requests", "rpm", "tpm")
    }
    given = _given(
        **counts,
        budget_usd=validation.dollars(body, "budget_usd", nullable=True),
        allowed_models=validation.patterns(body, "allowed_models", nullable=True),
    )
    return cast(LimitChanges, given)  # each checked to its type just above


def _new_token(body: dict[str, Any]) -> dict[str, Any]:
    validation.require_known(body, {"project_id", "duration_minutes", "metadata", *_TOKEN_LIMITS})
    return {
        "project_id": validation.text(body, "project_id", required=True, max_length=MAX_ID_LENGTH),
        "duration_minutes": validation.duration_minutes(body),
        **_token_limits(body),
        **_given(metadata=validation.mapping(body, "metadata", max_bytes=MAX_TOKEN_METADATA_BYTES)),
    }


async def create_token(request: web.Request) -> web.Response:
    fields = await _checked_body(request, _new_token)
    issued = await _ops(request).issue_token(_actor(request), **fields)
    token = issued.token.to_api()
    limits_given = {key: token[key] for key in (*_TOKEN_LIMITS, "metadata")}
    return json_response(
        {
            "id": token["id"],
            "token": issued.value,
            "project_id": token["project_id"],
            "expires_at": token["expires_at"],
            **limits_given,
            "created_at": token["created_at"],
        },
        status=201,
    )


async def list_tokens(request: web.Request) -> web.Response:
    validation.require_known_query(request.query, {"project_id"})
    project_id = request.query.get("project_id")
    if project_id == "":
        # As a shell variable left unset sends it: not every project's tokens.
        raise errors.InvalidField("project_id", "must not be empty; leave it out for all tokens")
    if project_id is not None:
        await _ops(request).get_project(project_id)
    tokens = await _ops(request).list_tokens(project_id)
    # Tokens are kept for EXPIRED_TOKEN_RETENTION_DAYS once expired, tens of thousands of them
    # with short-lived ones: their answer is built in a worker thread, so the event loop keeps
    # answering meanwhile.
    body = await asyncio.to_thread(lambda: orjson.dumps([t.to_api() for t in tokens]))
    return web.Response(body=body, content_type="application/json")


async def get_token(request: web.Request) -> web.Response:
    ops = _ops(request)
    token = await ops.get_token(request.match_info["token_id"])
    usage = await ops.token_usage(token.id)
    return json_response({**token.to_api(), "usage": usage.to_api()})


def _token_changes(body: dict[str, Any]) -> tuple[bool | None, LimitChanges]:
    """``is_active`` (None when not given) and the limits to change."""
    if "metadata" in body:
        raise errors.InvalidField("metadata", "cannot be changed once the token is issued")
    validation.require_known(body, {"is_active", *_TOKEN_LIMITS})
    is_active = validation.boolean(body, "is_active")
    limits = _token_limits(body)
    if is_active is MISSING and not limits:
        raise errors.InvalidRequest(
            f"Nothing to update: give at least one of {', '.join(['is_active', *_TOKEN_LIMITS])}."
        )
    return None if is_active is MISSING else is_active, limits


async def update_token(request: web.Request) -> web.Response:
    is_active, limits = await _checked_body(request, _token_changes)
    token = await _ops(request).update_token(
        _actor(request), request.match_info["token_id"], is_active=is_active, limits=limits
    )
    return json_response(token.to_api())


async def revoke_token(request: web.Request) -> web.Response:
    await _ops(request).revoke_token(_actor(request), request.match_info["token_id"])
    return web.Response(status=204)


def _token_value(body: dict[str, Any]) -> str:
    validation.require_known(body, {"token"})
    value: str = validation.text(body, "token", required=True, max_length=MAX_TOKEN_VALUE_LENGTH)
    return value


async def revoke_token_by_value(request: web.Request) -> web.Response:
    value = await _checked_body(request, _token_value)
    await _ops(request).revoke_token_by_value(_actor(request), value)
    return web.Response(status=204)


# -- audit -------------------------------------------------------------------------------------


async def list_audit_events(request: web.Request) -> web.Response:
    query = request.query
    known = {"actor", "action", "target_type", "target_id", "project_id", "outcome"}
    validation.require_known_query(query, known | {"since", "until", "page", "page_size"})
    filters = AuditFilter(
        **{key: query[key] for key in known if query.get(key)},
        since=validation.timestamp(query.get("since"), "since"),
        until=validation.timestamp(query.get("until"), "until"),
    )
    page = validation.query_int(query.get("page"), "page", default=1, minimum=1, maximum=MAX_PAGE)
    page_size = validation.query_int(
        query.get("page_size"), "page_size", default=50, minimum=1, maximum=MAX_PAGE_SIZE
    )
    events, total = await _ops(request).audit_log(filters, page, page_size)
    return json_response(
        {
            "events": [e.to_api() for e in events],
            "pagination": {
                "page": page,
                "page_size": page_size,
                "total": total,
                "total_pages": (total + page_size - 1) // page_size,
            },
        }
    )


async def get_openapi_document(request: web.Request) -> web.Response:
    return json_response(openapi_document())


def management_app(operations: Operations, management_token: str) -> web.Application:
    app = web.Application(middlewares=[management_middleware])
    app[OPERATIONS] = operations
    app[MANAGEMENT_TOKEN] = management_token
    app.router.add_get("/openapi.json", get_openapi_document)
    app.router.add_post("/projects", create_project)
    app.router.add_get("/projects", list_projects)
    app.router.add_get("/projects/{project_id}", get_project)
    app.router.add_patch("/projects/{project_id}", update_project)
    app.router.add_delete("/projects/{project_id}", delete_project)
    app.router.add_post("/projects/{project_id}/tokens/revoke", revoke_project_tokens)
    app.router.add_post("/tokens", create_token)
    app.router.add_get("/tokens", list_tokens)
    app.router.add_delete("/tokens", revoke_token_by_value)
    app.router.add_get("/tokens/{token_id}", get_token)
    app.router.add_patch("/tokens/{token_id}", update_token)
    app.router.add_delete("/tokens/{token_id}", revoke_token)
    app.router.add_get("/audit", list_audit_events)
    return app
