"""One small error hierarchy, rendered everywhere in the OpenAI error shape.

OpenAI SDKs already parse ``{"error": {"message", "type", "code"}}``, so a client sees our refusals as
the SDK's own exception classes (``openai.AuthenticationError`` with ``.code``, and so on).
"""

from __future__ import annotations

from typing import ClassVar

import orjson
from aiohttp import web

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "upstream_error",
    503: "server_error",
    504: "upstream_error",
}

# Refusals that no retry can fix: the OpenAI SDKs honour ``x-should-retry: false`` and stop at the
# first answer instead of retrying (they retry every 429, for instance).
PERMANENT_CODES = frozenset(
    {
        "invalid_token",
        "token_not_found",
        "token_inactive",
        "token_expired",
        "project_inactive",
        "quota_exceeded",
        "budget_exceeded",
        "model_not_allowed",
        "endpoint_not_found",
    }
)


class ProxyError(Exception):
    """An error with an HTTP status and a stable machine-readable ``code``."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        if self.code in PERMANENT_CODES:
            self.headers.setdefault("x-should-retry", "false")

    @property
    def error_type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status, "server_error")

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.code)

    def header_fields(self) -> list[tuple[bytes, bytes]]:
        """``headers`` as the fields of a response head (ours, so plain ASCII; never raises)."""
        return [
            (name.encode("latin-1", "replace"), value.encode("latin-1", "replace"))
            for name, value in self.headers.items()
        ]

    def to_response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        headers = {**self.headers, **(extra_headers or {})}
        return web.Response(
            status=self.status, body=self.body(), content_type="application/json", headers=headers
        )


def error_body(message: str, error_type: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "code": code}})


def _error(status: int, code: str) -> type[ProxyError]:
    return type(
        "".join(part.capitalize() for part in code.split("_")),
        (ProxyError,),
        {"status": status, "code": code, "__module__": __name__},
    )


class UpstreamError(ProxyError):
    """The upstream could not be reached or did not answer in time.

    ``reached_upstream`` is False only when not one byte of the request was written towards the
    upstream (a failed connect, DNS lookup, CONNECT or TLS handshake): the upstream certainly never
    saw it. True means it may have.
    """

    def __init__(self, message: str, *, reached_upstream: bool = True) -> None:
        super().__init__(message)
        self.reached_upstream = reached_upstream


class UpstreamUnavailable(UpstreamError):
    status = 502
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


# Proxy path, in the order the checks run.
EndpointNotFound = _error(404, "endpoint_not_found")
MethodNotAllowed = _error(405, "method_not_allowed")
InvalidToken = _error(401, "invalid_token")
TokenNotFound = _error(401, "token_not_found")
TokenInactive = _error(401, "token_inactive")
TokenExpired = _error(401, "token_expired")
ProjectInactive = _error(403, "project_inactive")
ParamNotAllowed = _error(400, "param_not_allowed")
ModelNotAllowed = _error(403, "model_not_allowed")
ModelNotPriced = _error(400, "model_not_priced")  # a budgeted token, a request it cannot price
RateLimited = _error(429, "rate_limited")  # transient: carries Retry-After
QuotaExceeded = _error(429, "quota_exceeded")
BudgetExceeded = _error(429, "budget_exceeded")
RequestTooLarge = _error(413, "request_too_large")
ServiceUnavailable = _error(503, "service_unavailable")
# A token carries a limit whose store cannot be reached: never admitted uncounted.
LimitsUnavailable = _error(503, "limits_unavailable")
# HTTP framing and timing, on every path (the front door's policy).
MalformedRequest = _error(400, "bad_request")
HeadTooLarge = _error(431, "request_header_fields_too_large")
UriTooLong = _error(414, "uri_too_long")  # the request line alone is over the head limit (nginx)
RequestTimeout = _error(408, "request_timeout")

# Management API.
Unauthorized = _error(401, "unauthorized")
ProjectNotFound = _error(404, "project_not_found")
TokenIdNotFound = _error(404, "token_not_found")
NotFound = _error(404, "not_found")
InvalidRequest = _error(400, "invalid_request")
InvalidJson = _error(400, "invalid_json")
ManagementMethodNotAllowed = _error(405, "method_not_allowed")
InvalidBody = _error(400, "invalid_body")
# A body the server must read cannot come compressed (management JSON, checked parameters).
UnsupportedContentEncoding = _error(415, "unsupported_content_encoding")


class InvalidField(ProxyError):
    """A request body field failed validation; the message names the field."""

    status = 400
    code = "invalid_field"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem  # the message without the field's name, for a form beside it
