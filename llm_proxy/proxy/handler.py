"""The proxy path: its checks in order, the key swap, and a byte-for-byte relay.

The checks run in the order their refusals are listed in :mod:`llm_proxy.errors`.

Nothing here parses a body unless a ``param_whitelist``, a token's ``allowed_models`` or stream-usage
injection needs it, nothing
waits on the database for a cached token, and everything about the request that is not needed to
answer it is recorded in an :class:`~llm_proxy.proxy.exchange.Exchange` and handed off after the end.

The handler is independent of the HTTP server: it reads a :class:`ProxyRequest` and answers through
a :class:`ResponseWriter`; ``front.py`` parses every request and drives it.
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from functools import partial
from typing import NamedTuple, Protocol

import orjson
import structlog

from llm_proxy import errors, tokens
from llm_proxy.crypto import redact_path, same_length_mask
from llm_proxy.http.messages import SERVER_STOPPING, ProxyRequest, RenderedFields, ResponseWriter
from llm_proxy.http.upstream import Body, UpstreamClient, UpstreamResponse
from llm_proxy.models import isoformat, usd
from llm_proxy.pricing import PriceHolder, Prices
from llm_proxy.proxy import coded_errors
from llm_proxy.proxy.admission import Admission, Grant, TokenAuthority
from llm_proxy.proxy.answer_gate import AnswerGate
from llm_proxy.proxy.api_config import ApiProvider, normalise_path
from llm_proxy.proxy.body_scan import (
    OPTIONS_FOR_NULL,
    TOO_LARGE,
    BodyInspector,
    ask_usage,
    asks_usage_in_any_reading,
)
from llm_proxy.proxy.body_spool import BodySpool
from llm_proxy.proxy.budget_plan import COST_FIELDS, CostPlan, plan_cost
from llm_proxy.proxy.cost_bound import prompt_token_bound, with_output_cap
from llm_proxy.proxy.exchange import RESPONSE_TAIL_BYTES, CappedBuffer, Exchange, ExchangeSink
from llm_proxy.proxy.form_scan import FormInspector, form_media_type
from llm_proxy.proxy.metrics import MetricsSink
from llm_proxy.proxy.quoting import quoted
from llm_proxy.proxy.stream_end import answered_whole
from llm_proxy.proxy.tool_models import UnreadableTools, tool_models
from llm_proxy.proxy.usage_asked import usage_asked
from llm_proxy.store import Store

log = structlog.get_logger(__name__)

# What the relay does with an upstream response field, by its lower-case name; absent: pass it on.
# Up to _HOP_BY_HOP, the field is never relayed.
(
    _DROP,
    _CONNECTION,
    _KEEP_ALIVE,
    _TRANSFER_ENCODING,
    _CONTENT_TYPE,
    _CONTENT_ENCODING,
    _CONTENT_LENGTH,
    _DATE,
    _UPSTREAM_REQUEST_ID,
) = range(9)
_HOP_BY_HOP = _TRANSFER_ENCODING
_RESPONSE_FIELDS = {
    **dict.fromkeys(
        (
            b"proxy-authenticate",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"upgrade",
            # A request's credentials, never an answer's: an upstream that reflects request
            # headers would hand the project's key to the token's holder.
            b"authorization",
            b"proxy-authorization",
            # CORS is the proxy's, per allowed_origins: an upstream's own answer (say, one that
            # allows every origin) would override it, or next to the proxy's make a browser
            # refuse both (one Access-Control-Allow-Origin value only).
            b"access-control-allow-origin",
            b"access-control-allow-credentials",
            # The fields the proxy answers with itself: an upstream gateway's would be taken
            # for ours (its request id, its own token's expiry and what is left of it).
            b"llm-proxy-request-id",
            b"llm-proxy-token-expires-at",
            b"llm-proxy-remaining-requests",
            b"llm-proxy-remaining-budget-usd",
        ),
        _DROP,
    ),
    b"connection": _CONNECTION,
    b"keep-alive": _KEEP_ALIVE,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"content-type": _CONTENT_TYPE,
    b"content-encoding": _CONTENT_ENCODING,
    b"content-length": _CONTENT_LENGTH,
    b"date": _DATE,
    b"x-request-id": _UPSTREAM_REQUEST_ID,
}
# Bodies up to this size are read whole and sent with the request head in one write.
_SMALL_BODY = 64 * 1024
# Budgeted bodies up to this size are counted on the event loop (at most ~0.1 ms of work): the hop
# to a worker thread and back cost 0.2 ms and two wake-ups, more than counting a short chat.
_COUNT_INLINE_BYTES = 1024
# Streams whose usage the proxy asks for when the client did not (see usage_injection.py).
_USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_KEPT_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b""})
# The shortest project key masked in an answer's head. A shorter one is a placeholder (a local
# server taking any key: "x", "1", "-"), no secret, and stands inside the head's own words: masked,
# it broke the status line (HTTP/*.*), field names (Content*Length), media types (te*t/...).
_HEAD_MASKED_KEY_MIN = 8
# The fields of a compressed error answer that go when it is sent decoded (see coded_errors.py).
_CODING_FIELDS = frozenset({b"content-encoding", b"content-length"})
# What an oversized request of a budgeted token holds: the least anything costs, so that a budget
# used up is said before the size, in SPEC §7's order (its body, never read, cannot be priced).
_ANY_COST = CostPlan(
    want=1, minimum=1, prompt_cost=0, output_unit=0, cap_field=None, model_cap=None
)
_TOOLS = frozenset({"tools"})
_PRICED_RAW = frozenset({"tools", "stream_options"})
_OPTIONS = frozenset({"stream_options"})
_STREAM = frozenset({"stream"})
_MODEL_PATH = "/v1/models/"
# Calls that run no model, so a body naming none is no use of one: a file upload, a stored chat
# completion's update. (Elsewhere the upstream may run a default model the token may not allow.)
_RUNS_NO_MODEL = re.compile(r"/v1/files|/v1/chat/completions/[^/]+")
Fields = list[tuple[bytes, bytes]]
_UNREADABLE = (
    "The request body is neither a JSON object (UTF-8, without a byte order mark) nor a form, so"
    " it cannot be checked against %s."
)


def _dollars(nanousd: int) -> str:
    """Nano-dollars as a plain decimal number of dollars: 1250000 -> "0.00125"."""
    whole, frac = divmod(nanousd, 1_000_000_000)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(whole)


def _field(text: str) -> bytes:
    """A value for a response field: the client's own bytes back when it came from the client."""
    return text.encode("utf-8", "surrogateescape")


def _length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """The value of the Content-Length field among ``headers`` (the upstream client checked
    their framing): read again for a tpm-limited answer only, to keep it off the common path."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _request_id(supplied: str | None) -> str:
    if supplied and len(supplied) <= 128 and supplied.isprintable():
        return supplied
    # Unique, not secret: a PRNG draw instead of os.urandom's system call on every request.
    # (The module-level generator is reseeded after fork, so workers never share a sequence.)
    # 32 hex digits, as formatting getrandbits(128) gives, in less time.
    return random.randbytes(16).hex()


def _add_limit_headers(
    headers: Fields,
    expires_at: str,
    remaining_requests: int | None,
    remaining_budget: int | None,
) -> None:
    headers.append((b"LLM-Proxy-Token-Expires-At", expires_at.encode("ascii")))
    if remaining_requests is not None:
        headers.append((b"LLM-Proxy-Remaining-Requests", b"%d" % remaining_requests))
    if remaining_budget is not None:
        headers.append(
            (b"LLM-Proxy-Remaining-Budget-USD", _dollars(remaining_budget).encode("ascii"))
        )


class ChunkFilter(Protocol):
    """Transforms a response body on its way to the client (see stream-usage injection)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _KeyMask:
    """Masks the project's key in an error answer relayed in pieces, also where a piece ends
    inside it (see ProxyHandler._relay); the output is as long as the input."""

    __slots__ = ("_held", "_key", "_mask")

    def __init__(self, key: bytes) -> None:
        self._key, self._mask, self._held = key, same_length_mask(key), b""

    def feed(self, chunk: bytes) -> bytes:
        data, key = self._held + chunk, self._key
        cut = len(data) - len(key) + 1  # a key may begin after it: held for the next piece
        at = data.find(key)
        while 0 <= at < cut:  # (as replace() finds them: left to right, none overlapping)
            end = at + len(key)
            if end > cut:
                cut = end  # never cut inside a key
                break
            at = data.find(key, end)
        cut = max(cut, 0)
        self._held = data[cut:]  # shorter than a key: nothing to mask in it alone
        return data[:cut].replace(key, self._mask)

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


def _merged(*reads: dict[str, list[object]]) -> dict[str, list[object]]:
    """Every value of every watched name, as each way of reading the body found them."""
    values: dict[str, list[object]] = {}
    for read in reads:
        for name, found in read.items():
            values.setdefault(name, []).extend(found)
    return values


def _connection_options(value: bytes, named: set[bytes] | None) -> set[bytes] | None:
    """The fields a ``Connection`` value names (with those of earlier ones), or None for none."""
    options = {option.strip().lower() for option in value.split(b",")}
    options -= _KEPT_CONNECTION_OPTIONS
    # Fields the relay reads itself are end to end (a sender must not name them, RFC 9110
    # §7.6.1): naming one does not remove it from the answer.
    options.difference_update(_RESPONSE_FIELDS)
    if named is not None:
        options |= named
    return options or None


def _without_fields(lines: list[bytes], named: AbstractSet[bytes]) -> list[bytes]:
    """Rendered field lines (four parts each) without the fields ``named``."""
    kept: list[bytes] = []
    for at in range(0, len(lines), 4):
        if lines[at].lower() not in named:
            kept += lines[at : at + 4]
    return kept


def _inspector(
    watched: frozenset[str], grant: Grant, inject: bool, *, whole: bool = False
) -> BodyInspector:
    """A reader of a checked body; for a token limited to some models or budgeted, with its
    tools' text (see tool_models.py); for one whose streams must carry their usage, with its
    stream_options' text. With ``whole``, its caller holds the whole body (in memory or spooled)
    and replaces a null stream_options the inspector could not hold (see body_scan.py)."""
    if grant.budget is not None:
        return BodyInspector(watched, inject_usage=inject, raw=_PRICED_RAW, defer_null=whole)
    raw = _TOOLS if grant.allowed_models is not None else frozenset()
    if inject and grant.tpm is not None:
        raw |= _OPTIONS
    return BodyInspector(watched, inject_usage=inject, raw=raw, defer_null=whole)


class _Checked(NamedTuple):
    """How a body was read for its checks: kept to check it again against a changed grant."""

    inspector: BodyInspector
    form: FormInspector | None
    empty: bool


def _refuse_hidden_usage(inspector: BodyInspector, grant: Grant) -> None:
    """Refuse a chat or legacy completion that streams without its usage, which the proxy could
    not ask for (the client turned include_usage off, or sent stream_options that are not an
    object), on a token that settles usage: counted from the text captured, its tokens would miss
    a reasoning model's hidden ones and whatever the capture did not keep."""
    if grant.budget is None and grant.tpm is None:
        return
    values = inspector.values
    if not (
        inspector.injects_usage
        and inspector.is_object
        and not inspector.usage_injected
        and any(value is True for value in values.get("stream", []))
        and not all(map(asks_usage_in_any_reading, values.get("stream_options") or [None]))
    ):
        return
    if grant.budget is not None:
        raise errors.ModelNotPriced(
            "This token has a budget: a stream must carry its usage, so that its cost is"
            " known; leave out stream_options.include_usage, or set it to true."
        )
    raise errors.ParamNotAllowed(
        "This token has a tpm limit: a stream must carry its usage, so that its tokens are"
        " counted; leave out stream_options.include_usage, or set it to true."
    )


def _content_encoded(headers: Fields) -> bool:
    return any(
        name.lower() == b"content-encoding" and value.strip().lower() not in (b"", b"identity")
        for name, value in headers
    )


def _asking_usage(headers: Fields) -> Fields:
    """Headers for a body rewritten to ask for usage: its length changed, and the usage chunk is
    filtered out of the answer, which therefore must come uncompressed."""
    kept = [(n, v) for n, v in headers if n.lower() not in (b"content-length", b"accept-encoding")]
    kept.append((b"Accept-Encoding", b"identity"))
    return kept


def _tool_models(tools: object, too_large: Callable[[], errors.ProxyError]) -> list[object]:
    """The models the hosted tools of a ``tools`` value run (its JSON text; a form field's text
    names no tool an upstream runs), None for one that names none; ``too_large()`` is raised for
    a value longer than was kept."""
    if tools is TOO_LARGE:
        raise too_large()
    if not isinstance(tools, bytes):
        return []
    try:
        return tool_models(tools)
    except UnreadableTools:
        raise errors.MalformedRequest(
            "The request body is not valid JSON, so its parameters cannot be checked."
        ) from None


def _tools_too_long_to_price() -> errors.ProxyError:
    return errors.ModelNotPriced(
        "This token has a budget; the request's tools are too long to price."
    )


def _tools_too_long_to_check() -> errors.ProxyError:
    return errors.ModelNotAllowed(
        "This token is limited to certain models; the request's tools are too long to check."
    )


class ProxyHandler:
    def __init__(
        self,
        provider: ApiProvider,
        authority: TokenAuthority,
        upstream: UpstreamClient,
        sink: ExchangeSink,
        *,
        store: Store,
        max_body_bytes: int,
        capture_bytes: int,
        token_info_path: str,
        stream_usage: Callable[[], ChunkFilter] | None = None,
        prices: PriceHolder | None = None,
    ) -> None:
        self.provider = provider
        self.authority = authority
        self.upstream = upstream
        self.store = store
        self.metrics = MetricsSink(provider, sink)
        self.max_body_bytes = max_body_bytes
        self.capture_bytes = capture_bytes
        self.token_info_path = token_info_path
        self.stream_usage = stream_usage if provider.inject_stream_usage else None
        self._allow_header = ", ".join(sorted(provider.allowed_methods))
        self._allow_field = self._allow_header.encode("ascii")
        self._watched = frozenset(provider.param_whitelist)
        self._watched_and_model = self._watched | {"model"}
        self._watched_and_cost = self._watched | COST_FIELDS | {"stream"}
        self.prices = prices or PriceHolder(Prices())

    # -- the path ----------------------------------------------------------------------------------

    async def serve(self, request: ProxyRequest, writer: ResponseWriter) -> None:
        started = time.perf_counter()
        started_at = time.time()  # the event's timestamp: before the token check, which may wait
        request_id = _request_id(request.request_id)
        request_id_field = _field(request_id)
        reply_headers = [(b"LLM-Proxy-Request-ID", request_id_field)]
        origin = request.origin
        if origin is not None and self.provider.origin_allowed(origin):
            reply_headers.append((b"Access-Control-Allow-Origin", _field(origin)))
            reply_headers.append((b"Vary", b"Origin"))
            # A page's script reads only the CORS-safelisted fields of an answer unless it exposes
            # more: x-should-retry, Retry-After and the request ids, which the SDKs act on, among
            # them. (The wildcard holds: the proxy allows no credentialed request.)
            reply_headers.append((b"Access-Control-Expose-Headers", b"*"))
        try:
            admitted = await self._admit(request, writer, reply_headers, request_id_field)
        except errors.ProxyError as exc:
            self.metrics.refused(request.target.partition("?")[0], exc)
            reply_headers.append((b"X-Request-ID", request_id_field))
            return await self._answer_error(writer, exc, reply_headers)
        if admitted is None:
            return  # answered without going upstream (token info, CORS preflight)
        path, grant = admitted
        request_body = CappedBuffer(self.capture_bytes)
        response_body = CappedBuffer(self.capture_bytes, RESPONSE_TAIL_BYTES)
        # Positional, in field order: with keywords the dataclass __init__ is slower per request.
        exchange = Exchange(
            request_id,
            started_at,
            started,
            request.method,
            path,
            grant.project_id,
            grant.token_id,
            request_body,
            response_body,
        )
        exchange.tpm_limited = grant.tpm is not None
        admission: Admission | None = None
        try:
            if grant.allowed_models is not None:
                # A refusal once the token is known has its event, like those below.
                self._check_model_path(request.method, path, grant)
            body: Body = None
            headers = request.headers
            plan: CostPlan | None = None
            checked: _Checked | None = None
            too_large = self._too_large(request)
            if request.has_body and too_large is None:
                try:
                    body, headers, plan, checked = await self._prepare_body(
                        request, exchange, headers, grant
                    )
                except errors.RequestTooLarge as found:
                    too_large = found  # read for its checks, with no length to refuse it by
            if too_large is not None and grant.budget is not None:
                plan = _ANY_COST
            if not self.authority.is_current(grant):
                # The token changed while the body was arriving (a slow upload): the request is
                # held to the token as it is once its body is in, as the next request would be.
                now = await self.authority.current(grant)
                if too_large is None:  # (one too large is refused after the limits, unread)
                    self._check_body(request, path, body, headers, checked, grant, now)
                grant = now
                exchange.tpm_limited = grant.tpm is not None
            admission = await self.authority.admit(grant, plan)
            if too_large is not None:
                raise too_large  # after the limits, in SPEC §7's order; it releases what it took
            if admission.grant is not grant:
                # Changed again while its limits were counted: its body is held to that too.
                self._check_body(request, path, body, headers, checked, grant, admission.grant)
                grant = admission.grant
                exchange.tpm_limited = grant.tpm is not None
            if admission.hold_id:
                exchange.hold_id, exchange.held_nanousd = admission.hold_id, admission.held
                if plan is not None and isinstance(body, bytes):
                    body = self._cap_output(body, plan, admission)
            if grant.limited:
                # What is left, so a client can pace itself without asking the management API.
                _add_limit_headers(
                    reply_headers,
                    admission.grant.expires_at_header,
                    admission.remaining_requests,
                    admission.remaining_budget,
                )
            await self._forward(
                request, writer, grant, exchange, request_id_field, reply_headers, body, headers
            )
        except errors.ProxyError as exc:
            # Raised before the response began (a failure after it is handled in _relay).
            exchange.error = exc.code
            exchange.status = exc.status
            if not getattr(exc, "reached_upstream", False):
                # Refused here, or the upstream never got the whole request: it counts for nothing,
                # and its token has nothing to settle (or to wait for).
                exchange.tpm_limited = False
                if admission is not None:
                    # The hold is the release's now, which ends it: not this request's to end
                    # again (below) if its client leaves while the hold is given back.
                    exchange.hold_id = ""
                    await self.authority.release(admission)
            reply_headers.append((b"X-Request-ID", request_id_field))
            await self._answer_error(writer, exc, reply_headers)
        except asyncio.CancelledError as cancelled:
            if not exchange.answered_whole:
                # The connection ended before the answer was whole: its client left, or the
                # server's stop cut it (the upstream may have produced all of it either way).
                exchange.client_disconnected = True
                cut = cancelled.args == (SERVER_STOPPING,)
                exchange.error = exchange.error or (
                    SERVER_STOPPING if cut else "client_disconnected"
                )
            if admission is not None and grant.limited and not exchange.request_sent:
                # It never reached the upstream whole: it counts for nothing (its budget hold is
                # settled at nothing by the events pipeline).
                self.authority.release_unsent(admission)
            raise
        finally:
            exchange.ended = time.perf_counter()
            if exchange.hold_id:
                # The events pipeline settles it.
                self.authority.hold_ended(exchange.hold_id, exchange.request_id)
            self.metrics.submit(exchange)

    @staticmethod
    def _cap_output(body: bytes, plan: CostPlan, admission: Admission) -> bytes:
        """The body with the output cap its hold affords, when it set none and the model's own
        is more than that."""
        cap = plan.cap_for(admission.held)
        if cap is None or plan.cap_field is None:
            return body
        # (A priced body's headers carry no framing: the upstream client frames the bytes sent.)
        return with_output_cap(body, plan.cap_field, cap, also_last=plan.cap_field_null)

    async def _answer_error(
        self, writer: ResponseWriter, exc: errors.ProxyError, reply_headers: Fields
    ) -> None:
        await self._answer(writer, exc.status, exc.body(), [*reply_headers, *exc.header_fields()])

    async def _answer(
        self, writer: ResponseWriter, status: int, body: bytes, headers: Fields
    ) -> None:
        await writer.respond(status, b"", RenderedFields.of_json(headers, body), body)

    async def _admit(
        self,
        request: ProxyRequest,
        writer: ResponseWriter,
        reply_headers: Fields,
        request_id: bytes,
    ) -> tuple[str, Grant] | None:
        """The checks of the proxy path up to the token; None when the request was answered here
        (with the proxy's ``request_id`` as its X-Request-ID: no upstream gave one).

        The path is checked in its normalised form; the target goes upstream exactly as sent.
        """
        provider = self.provider
        raw_path = request.target.partition("?")[0]
        path = normalise_path(raw_path)
        method = request.method
        if path == self.token_info_path:
            answered = [*reply_headers, (b"X-Request-ID", request_id)]
            if method == "OPTIONS":  # a browser's preflight of its GET
                await self._preflight(request, writer, answered)
            else:
                await self._token_info(request, writer, answered)
            return None
        if path is None or not provider.path_allowed(path):
            # A path may hold a token's value pasted into it, percent-encoded too: named masked, as
            # every message does.
            raise errors.EndpointNotFound(
                f"Endpoint {method} {redact_path(raw_path)} is not allowed."
            )
        if method not in provider.allowed_methods:
            raise errors.MethodNotAllowed(
                f"Method {method} is not allowed for {redact_path(path)}.",
                headers={"Allow": self._allow_header},
            )
        if method == "OPTIONS":
            await self._preflight(request, writer, [*reply_headers, (b"X-Request-ID", request_id)])
            return None
        grant = await self.authority.check(request.authorization)
        return path, grant

    @staticmethod
    def _check_model_path(method: str, path: str, grant: Grant) -> None:
        if method != "GET" and path.startswith(_MODEL_PATH):
            # DELETE /v1/models/{id} deletes a fine-tuned model: only one the token may use.
            model = path[len(_MODEL_PATH) :]
            if not grant.model_allowed(model):
                # (An escape the normalising left, a path encoded twice, may hide a key.)
                raise errors.ModelNotAllowed(
                    f"Model {quoted(redact_path(model))} is not allowed for this token."
                )

    async def _token_info(
        self, request: ProxyRequest, writer: ResponseWriter, reply_headers: Fields
    ) -> None:
        """What a withering token may know about itself: expiry, quota left, what it can call."""
        if request.method != "GET":
            raise errors.MethodNotAllowed(
                f"Method {request.method} is not allowed for {self.token_info_path}.",
                headers={"Allow": "GET, OPTIONS"},
            )
        grant = await self.authority.check(request.authorization)
        remaining: int | None = None
        request_count: int | None = None
        token = await self.store.get_token(grant.token_id) if grant.limited else None
        if grant.max_requests is not None:
            request_count = token.request_count if token else grant.max_requests
            remaining = max(grant.max_requests - request_count, 0)
        spent = held = remaining_budget = None
        if token is not None and token.budget_nanousd is not None:
            spent, held = token.spent_nanousd, token.reserved_nanousd
            try:
                # With Redis, spend and holds are there first.
                spent, held = await self.authority.budget_ledger.spent_and_held(grant.token_id) or (
                    spent,
                    held,
                )
            except Exception as exc:
                log.warning("proxy.budget_status_failed", error=str(exc))
            remaining_budget = max(token.budget_nanousd - spent - held, 0)
        if grant.limited:
            # The same as the LLM-Proxy-* headers of every proxied answer.
            _add_limit_headers(reply_headers, grant.expires_at_header, remaining, remaining_budget)
        body = {
            "object": "llm_proxy.token",
            "token_id": grant.token_id,
            "project_id": grant.project_id,
            "expires_at": isoformat(datetime.fromtimestamp(grant.expires_at, UTC)),
            "expires_in_seconds": max(int(grant.expires_at - time.time()), 0),
            "max_requests": grant.max_requests,
            "request_count": request_count,
            "remaining_requests": remaining,
            "rpm": grant.rpm,
            "tpm": token.tpm if token else None,
            "budget_usd": usd(token.budget_nanousd) if token else None,
            "spent_usd": usd(spent) if spent is not None else None,
            "reserved_usd": usd(held) if held is not None else None,
            "remaining_budget_usd": usd(remaining_budget),
            "allowed_models": list(grant.allowed_models) if grant.allowed_models else None,
            "allowed_endpoints": sorted(self.provider.allowed_prefixes),
            "allowed_methods": sorted(self.provider.allowed_methods),
        }
        await self._answer(
            writer, 200, orjson.dumps(body), [*reply_headers, (b"Cache-Control", b"no-store")]
        )

    async def _preflight(
        self, request: ProxyRequest, writer: ResponseWriter, reply_headers: Fields
    ) -> None:
        headers = list(reply_headers)
        if any(name == b"Access-Control-Allow-Origin" for name, _ in headers):
            asked = next(
                (v for n, v in request.headers if n.lower() == b"access-control-request-headers"),
                None,
            )
            headers += [
                (b"Access-Control-Allow-Methods", self._allow_field),
                (b"Access-Control-Allow-Headers", asked or b"Authorization, Content-Type"),
                (b"Access-Control-Max-Age", b"600"),
            ]
        headers.append((b"Content-Length", b"0"))
        await writer.start(204, b"", RenderedFields.of(headers), stream=False)
        await writer.finish()

    async def _forward(
        self,
        request: ProxyRequest,
        writer: ResponseWriter,
        grant: Grant,
        exchange: Exchange,
        request_id: bytes,  # exchange.request_id as a field value
        reply_headers: Fields,
        body: Body,
        headers: Fields,
    ) -> None:
        provider = self.provider
        headers.append((b"Authorization", grant.upstream_authorization))
        headers.append((b"X-Request-ID", request_id))
        target = provider.origin.path_prefix + request.target
        if body is not None and not isinstance(body, bytes):
            # A body streamed as it comes may have failed already (a bad chunk in the head's
            # read): then not even the head goes upstream.
            request.body.raise_failure()
        exchange.upstream_started = time.perf_counter()
        upstream = await self.upstream.request(
            request.method,
            provider.origin,
            target,
            headers,
            body,
            provider.timeouts,
            # For a token with limits, whether a client leaving before the answer pays for it, or
            # its request never reached the upstream and counts for nothing.
            exchange.mark_sent if grant.limited else None,
        )
        try:
            await self._relay(
                writer, upstream, exchange, request_id, reply_headers, grant.upstream_key
            )
        except errors.ProxyError:
            # The answer was refused (say, for a transfer coding other than chunked, which the
            # parser may still have framed as chunked): its connection is never pooled.
            upstream.discard()
            raise
        finally:
            await upstream.aclose()

    def _too_large(self, request: ProxyRequest) -> errors.ProxyError | None:
        """The refusal of a body declared over ``MAX_REQUEST_BODY``, which is never read."""
        length = request.content_length
        if length is None or length <= self.max_body_bytes:
            return None
        return errors.RequestTooLarge(
            f"Request body of {length} bytes exceeds the limit of {self.max_body_bytes} bytes."
        )

    async def _prepare_body(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        headers: Fields,
        grant: Grant,
    ) -> tuple[Body, Fields, CostPlan | None, _Checked | None]:
        """The body to send upstream, the headers to send with it, for a budgeted token what it
        may cost, and how it was read for its checks (None when it was not).

        A small body is read whole. A larger one is streamed, except when parameters must be
        checked first: then it is spooled (to disk beyond a megabyte) and sent once it passed, so a
        refused request never reaches the upstream. Streamed chat and legacy completions get
        ``stream_options.include_usage`` added on the way, whatever the body's size or framing.
        """
        if grant.budget is not None:
            return await self._priced_body(request, exchange, headers, grant)
        body, headers, checked = await self._plain_body(request, exchange, headers, grant)
        return body, headers, None, checked

    async def _plain_body(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        headers: Fields,
        grant: Grant,
    ) -> tuple[Body, Fields, _Checked | None]:
        length = request.content_length
        models_limited = grant.allowed_models is not None
        watched = self._watched_and_model if models_limited else self._watched
        inject = (
            self.stream_usage is not None
            and request.method == "POST"
            and exchange.path in _USAGE_PATHS
        )
        # A token with a tpm window counts its streams' tokens from their usage: its completions
        # are checked before they go upstream, for a stream that hides it.
        counted = inject and grant.tpm is not None
        if counted:
            watched |= _STREAM
        check = models_limited or bool(self.provider.param_whitelist) or counted
        if check and _content_encoded(headers):
            raise errors.UnsupportedContentEncoding(
                "Request bodies with a Content-Encoding cannot be checked (against the parameter"
                " whitelist, the token's models, or a tpm limit's need of a stream's usage); send"
                " them uncompressed."
            )
        form = self._form_reader(headers, watched) if check else None
        if length is not None and length <= _SMALL_BODY:
            data = await request.body.read_exactly(length)
            exchange.request_body.add(data)
            rewritten: bytes | None = None
            checked = None
            if check:
                inspector = _inspector(watched, grant, inject)
                passed = inspector.feed(data) + inspector.finish()
                if form is not None:
                    form.feed(data)
                    form.finish()
                checked = _Checked(inspector, form, not data)
                now = await self.authority.current(grant)
                self._check_body(request, exchange.path, data, headers, checked, grant, now)
                rewritten = passed if inspector.usage_injected else None
            elif inject:
                rewritten = ask_usage(data)
            # (Only a body asking for usage pays for the look at its encoding.)
            if rewritten is None or _content_encoded(headers):
                return data, headers, checked
            exchange.usage_injected = True
            return rewritten, _asking_usage(headers), checked
        if check:
            return await self._spooled(request, exchange, inject, headers, grant, watched, form)
        if inject and not _content_encoded(headers):
            return self._injecting(request, exchange), _asking_usage(headers), None
        return self._stream_body(request, exchange), headers, None

    async def _priced_body(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        headers: Fields,
        grant: Grant,
    ) -> tuple[Body, Fields, CostPlan | None, _Checked | None]:
        """A budgeted token's body: read whole (its prompt is counted and an output cap may be
        written into it), checked, and priced."""
        if _content_encoded(headers):
            raise errors.UnsupportedContentEncoding(
                "This token has a budget: its request bodies are priced, so they cannot come with"
                " a Content-Encoding; send them uncompressed."
            )
        length = request.content_length
        if length is not None and length <= _SMALL_BODY:
            data = await request.body.read_exactly(length)
            exchange.request_body.add(data)
        else:
            data = b"".join([chunk async for chunk in self._stream_body(request, exchange)])
        inject = (
            self.stream_usage is not None
            and request.method == "POST"
            and exchange.path in _USAGE_PATHS
        )
        inspector = _inspector(self._watched_and_cost, grant, inject, whole=True)
        passed = inspector.replace_deferred_null(inspector.feed(data) + inspector.finish())
        if not inspector.is_object:
            if not data:
                return data, headers, None, None
            raise errors.ModelNotPriced(
                "This token has a budget: only JSON requests, whose model and tokens the proxy can"
                " price, are allowed."
            )
        checked = _Checked(inspector, None, not data)
        now = await self.authority.current(grant)
        self._check_body(request, exchange.path, data, headers, checked, grant, now)
        for tools in inspector.values.get("tools", []):
            if _tool_models(tools, _tools_too_long_to_price):
                raise errors.ModelNotPriced(
                    "This token has a budget; a hosted tool that runs a model of its own"
                    " (image_generation) is billed apart from the answer's usage and cannot be"
                    " priced."
                )
        models = inspector.values.get("model") or [None]
        model = models[0] if isinstance(models[0], str) else None
        if not model:
            prompt = 0
        elif len(data) <= _COUNT_INLINE_BYTES and tokens.is_built(model):
            prompt = prompt_token_bound(data, model)
        else:
            # Counting a large prompt takes milliseconds: off the event loop (tiktoken lets go of
            # the GIL), as is the encoder's first load.
            prompt = await asyncio.to_thread(prompt_token_bound, data, model)
        plan = plan_cost(exchange.path, inspector.values, self.prices.current, prompt)
        kept = [
            (n, v) for n, v in headers if n.lower() not in (b"content-length", b"transfer-encoding")
        ]
        if inspector.usage_injected:
            exchange.usage_injected = True
            return passed, _asking_usage(kept), plan, checked
        return data, kept, plan, checked

    async def _stream_body(self, request: ProxyRequest, exchange: Exchange) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in request.body.chunks():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise errors.RequestTooLarge(
                    f"Request body exceeds the limit of {self.max_body_bytes} bytes."
                )
            exchange.request_body.add(chunk)
            yield chunk

    async def _injecting(self, request: ProxyRequest, exchange: Exchange) -> AsyncIterator[bytes]:
        inspector = BodyInspector(inject_usage=True, defer_null=True)
        async for passed in usage_asked(self._stream_body(request, exchange), inspector):
            yield passed
        # (The upstream client reads a body to its end before it reads the answer.)
        exchange.usage_injected = inspector.usage_injected

    async def _spooled(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        inject: bool,
        headers: Fields,
        grant: Grant,
        watched: frozenset[str],
        form: FormInspector | None,
    ) -> tuple[Body, Fields, _Checked]:
        spool = BodySpool()
        inspector = _inspector(watched, grant, inject, whole=True)
        try:
            async for chunk in self._stream_body(request, exchange):
                spool.write(inspector.feed(chunk))
                if form is not None:
                    form.feed(chunk)
            spool.write(inspector.finish())
            if inspector.null_replaced:
                spool.replace(inspector.null_at, len(b"null"), OPTIONS_FOR_NULL)
            if form is not None:
                form.finish()
            checked = _Checked(inspector, form, not spool.size)
            now = await self.authority.current(grant)
            self._check_body(request, exchange.path, None, headers, checked, grant, now)
        except BaseException:
            spool.close()
            raise
        headers = [(name, value) for name, value in headers if name.lower() != b"content-length"]
        if inspector.usage_injected:
            exchange.usage_injected = True
            headers = _asking_usage(headers)
        headers.append((b"Content-Length", b"%d" % spool.size))
        return spool, headers, checked

    @staticmethod
    def _form_reader(headers: Fields, watched: frozenset[str]) -> FormInspector | None:
        """A reader of the body's form fields, when its Content-Type names a form."""
        content_types = [value for name, value in headers if name.lower() == b"content-type"]
        if len(content_types) > 1:
            # The upstream may read the body as either type: neither can be checked alone.
            raise errors.MalformedRequest(
                "A request body whose parameters are checked must carry one Content-Type."
            )
        if not content_types or form_media_type(content_types[0]) is None:
            return None
        return FormInspector(watched, content_types[0])

    def _check_body(
        self,
        request: ProxyRequest,
        path: str,
        body: Body,
        headers: Fields,
        checked: _Checked | None,
        was: Grant,
        now: Grant,
    ) -> None:
        """Check a body read as ``checked`` (None: not read for checks) against ``now``, the grant
        of its token once it is in; ``was``, the one its head was checked against, chose how it
        was read. A token changed meanwhile (a management call, a change another process
        announced) holds the request to what it is now: one limited to models since is read for
        them again, from the body when it is at hand."""
        if now is not was:
            if now.budget is not None and was.budget is None and request.has_body:
                # Its body was not priced, so nothing caps what it may cost.
                raise errors.LimitsUnavailable(
                    "This token was given a budget while the request was arriving; send it again."
                )
            if now.allowed_models is not None:
                self._check_model_path(request.method, path, now)
                if request.has_body and (
                    checked is None or not {"model", "tools"} <= checked.inspector.values.keys()
                ):
                    checked = self._read_for_models(body, headers)
        if checked is not None:
            self._check_params(checked.inspector, now, checked.form, empty=checked.empty, path=path)

    def _read_for_models(self, body: Body, headers: Fields) -> _Checked:
        """A body read again for the models it names, for a token limited to models while it
        arrived; only a whole body can be."""
        if not isinstance(body, bytes):
            raise errors.LimitsUnavailable(
                "This token was limited to certain models while the request was arriving; send"
                " it again."
            )
        if _content_encoded(headers):
            raise errors.UnsupportedContentEncoding(
                "This token is limited to certain models: its request bodies cannot come with a"
                " Content-Encoding; send them uncompressed."
            )
        inspector = BodyInspector(self._watched_and_model, raw=_TOOLS)
        inspector.feed(body)
        inspector.finish()
        form = self._form_reader(headers, self._watched_and_model)
        if form is not None:
            form.feed(body)
            form.finish()
        return _Checked(inspector, form, not body)

    def _check_params(
        self,
        inspector: BodyInspector,
        grant: Grant,
        form: FormInspector | None = None,
        *,
        empty: bool = False,
        path: str,
    ) -> None:
        """Refuse a body whose watched values are not allowed, or that cannot be read to tell,
        or a stream that hides the usage its token's limits settle from.

        A JSON object is read as JSON, a form as a form, and a JSON object sent as a form as both,
        since an upstream may take it either way. Anything else (a byte order mark, UTF-16, an
        array, a binary upload) cannot be checked: only an empty body has nothing to check.
        """
        if inspector.is_object and not inspector.well_formed:
            raise errors.MalformedRequest(
                "The request body is not valid JSON, so its parameters cannot be checked."
            )
        readable = inspector.is_object
        values = inspector.values
        if form is not None:
            if form.well_formed:
                values = _merged(values, form.values) if readable else form.values
                readable = True
            elif not readable:
                raise errors.MalformedRequest(
                    "The form in the request body cannot be read unambiguously, so its parameters"
                    " cannot be checked."
                )
        if not readable:
            if empty or (grant.allowed_models is None and not self.provider.param_whitelist):
                return  # (read for its stream's usage alone: the upstream judges the rest)
            if self.provider.param_whitelist:
                raise errors.ParamNotAllowed(_UNREADABLE % "the parameter whitelist")
            raise errors.ModelNotAllowed(_UNREADABLE % "the models this token is limited to")
        for name, occurrences in values.items():
            # Every occurrence: with a repeated key, upstream parsers keep one or the other.
            for value in occurrences:
                if name in self._watched and self.provider.disallowed_param({name: value}):
                    raise errors.ParamNotAllowed(f"The value of parameter '{name}' is not allowed.")
        if grant.allowed_models is not None:
            models = values.get("model", [])
            if not models and _RUNS_NO_MODEL.fullmatch(path) is None:
                # The upstream would pick a default model, which the token may not allow.
                raise errors.ModelNotAllowed(
                    "This token is limited to certain models; the request names none."
                )
            for tools in values.get("tools", []):
                models = [*models, *_tool_models(tools, _tools_too_long_to_check)]
            if None in models:
                # The upstream would pick the tool's model, which the token may not allow.
                raise errors.ModelNotAllowed(
                    "This token is limited to certain models; a tool of the request that runs a"
                    " model names none."
                )
            for model in models:
                if not grant.model_allowed(model):
                    raise errors.ModelNotAllowed(
                        f"Model {quoted(model)} is not allowed for this token."
                    )
        _refuse_hidden_usage(inspector, grant)

    async def _mark_answered(self, exchange: Exchange) -> None:
        """Mark a tpm-limited answer before its client can have it whole (answer_gate.py)."""
        exchange.answer_mark = mark = secrets.token_hex(8)
        await self.authority.mark_answered(exchange.token_id, mark)

    async def _relay(
        self,
        writer: ResponseWriter,
        upstream: UpstreamResponse,
        exchange: Exchange,
        request_id: bytes,
        reply_headers: Fields,
        upstream_key: bytes,  # the project's key, never shown (SPEC §6)
    ) -> None:
        exchange.upstream_headers_at = now = time.perf_counter()
        exchange.status = upstream.status
        # The head is rendered in the one pass that looks at each upstream field; an upstream
        # echoing the request's headers would show the key there (masked as the head is sent).
        head = RenderedFields()
        if len(upstream_key) >= _HEAD_MASKED_KEY_MIN:
            head.secret = upstream_key
        # Some OpenAI-compatible servers quote the key they refused: an error answer is masked
        # where the proxy reads it. The event is masked wherever the key shows, in any answer (an
        # upstream echoing the request quotes it in a 2xx): off this path, in the events process.
        # Not a placeholder key in a 2xx (see _HEAD_MASKED_KEY_MIN): "k" masked in every answer's
        # event broke its JSON, whose usage was then estimated and its spend overcounted.
        key = upstream_key if upstream.status >= 400 else None
        if key is not None or len(upstream_key) >= _HEAD_MASKED_KEY_MIN:
            exchange.upstream_key_to_mask = upstream_key
        lines = head.lines
        fields = _RESPONSE_FIELDS
        named = None  # fields the upstream's Connection names, hop-by-hop like itself
        held_length: bytes | None = None  # a Content-Length the usage filter may make untrue
        for name, value in upstream.headers:
            action = fields.get(name.lower())
            if action is not None:
                if action <= _HOP_BY_HOP:
                    if action == _CONNECTION:
                        # The usual values in one comparison each; any other is read whole.
                        if value != b"keep-alive" and value != b"close":
                            named = _connection_options(value, named)
                    elif action == _KEEP_ALIVE:
                        # Read here, in the one pass over the fields: how long the upstream keeps
                        # the connection idle, which the pool must not outstay.
                        upstream.keep_alive_hint(value)
                    elif (
                        action == _TRANSFER_ENCODING
                        and value != b"chunked"
                        and value.strip().lower() != b"chunked"
                    ):
                        # llhttp would read the body to the close, still coded: a client could
                        # not tell what it got. Refused before anything is sent, as nginx does.
                        raise errors.UpstreamUnavailable(
                            "upstream sent an unknown Transfer-Encoding"
                        )
                    continue
                if action == _CONTENT_LENGTH:
                    if exchange.usage_injected:
                        held_length = value  # (a filtered body may be shorter than upstream said)
                        continue
                    head.has_length = True
                elif action == _DATE:
                    head.has_date = True
                elif action == _CONTENT_TYPE:
                    # Lowered: a media type is case-insensitive, and an event stream spelled
                    # otherwise must still be relayed, filtered and recorded as one.
                    exchange.response_content_type = value.decode("latin-1").lower()
                elif action == _CONTENT_ENCODING:
                    # Two fields are one list, as clients read them: the last alone ("gzip" then
                    # "identity") would pass a coded error answer as plain, its key unmasked.
                    coding = value.decode("latin-1")
                    if exchange.response_content_encoding:
                        coding = f"{exchange.response_content_encoding}, {coding}"
                    exchange.response_content_encoding = coding
                else:  # _UPSTREAM_REQUEST_ID: returned unchanged, the provider support's key
                    exchange.upstream_request_id = value.decode("latin-1")
            lines += (name, b": ", value, b"\r\n")
        if named is not None:
            head.lines = lines = _without_fields(lines, named)
        plain: bytes | None = None  # a compressed error answer, decoded and masked
        if key is not None and exchange.response_content_encoding not in ("", "identity"):
            plain = await coded_errors.whole_body(upstream, upstream.status)
            if plain:  # (an empty body has nothing to mask: it goes as it came)
                exchange.response_body.add(plain)  # (as it came: events decode and mask it)
                coding = coded_errors.content_coding(upstream.headers)
                plain = await coded_errors.decoded(plain, coding, upstream.status)
                plain = plain.replace(key, same_length_mask(key))
                # Sent decoded, so without its coding and with a length of its own.
                head.lines = lines = _without_fields(lines, _CODING_FIELDS)
                head.add(b"Content-Length", b"%d" % len(plain))
        for name, value in reply_headers:
            head.add(name, value)
        if exchange.upstream_request_id is None:
            lines += (b"X-Request-ID: ", request_id, b"\r\n")
        proxy_ms = (exchange.upstream_started - exchange.started) * 1000
        upstream_ms = (now - exchange.upstream_started) * 1000
        lines.append(
            b"Server-Timing: proxy;dur=%.3f, upstream;dur=%.3f\r\n" % (proxy_ms, upstream_ms)
        )
        if plain is not None:
            if plain:
                exchange.first_byte_at = time.perf_counter()
            if exchange.tpm_limited:
                await self._mark_answered(exchange)
            await writer.respond(upstream.status, upstream.reason, head, plain)
            return
        stream = exchange.is_stream
        # An upstream that compresses although asked for identity gets its answer relayed as it
        # is: the filter cannot read compressed events (the client then sees the usage chunk).
        chunk_filter = (
            self.stream_usage()
            if self.stream_usage is not None
            and exchange.usage_injected
            and stream
            and exchange.response_content_encoding in ("", "identity")
            else None
        )
        if held_length is not None and chunk_filter is None:
            head.add(b"Content-Length", held_length)  # the body goes as it came
        # Masked in place in an error answer (a compressed one was decoded and answered above).
        if key is not None and chunk_filter is None:
            chunk_filter = _KeyMask(key)
        if not stream:
            body = upstream.complete_body()
            if body is not None:
                # Head, body and end in one send, as the relay below would send one chunk, without
                # the cost of a relay.
                if body:
                    exchange.response_body.add(body)  # (as it came: events mask secrets)
                    exchange.first_byte_at = time.perf_counter()
                if key is not None:
                    body = body.replace(key, same_length_mask(key))
                if exchange.tpm_limited:
                    await self._mark_answered(exchange)
                await writer.respond(upstream.status, upstream.reason, head, body)
                return
        await writer.start(upstream.status, upstream.reason, head, stream=stream)
        capture = exchange.response_body
        before_last = last = b""
        gate = (
            AnswerGate(
                writer,
                partial(self._mark_answered, exchange),
                stream=stream,
                length=_length(upstream.headers) if head.has_length else None,
            )
            if exchange.tpm_limited
            else None
        )
        push = writer.push if gate is None else gate.push

        def deliver(chunk: bytes) -> bool:
            # Runs as the upstream client parses each chunk: no task switch per chunk.
            nonlocal before_last, last
            capture.add(chunk)
            before_last, last = last, chunk
            if chunk_filter is not None:
                chunk = chunk_filter.feed(chunk)
                if not chunk:
                    return True
            if not exchange.first_byte_at:
                exchange.first_byte_at = time.perf_counter()
            return push(chunk)

        try:
            await upstream.relay(deliver, writer.drain if gate is None else gate.drain)
            if gate is not None:
                await gate.before_end()
            if chunk_filter is not None:
                tail = chunk_filter.flush()
                if tail:
                    await writer.write(tail)
        except asyncio.CancelledError:
            if stream and answered_whole(before_last, last, capture):
                exchange.answered_whole = True
            raise
        except errors.ProxyError as exc:
            if writer.retract():
                # Nothing of the answer left yet (a small answer's head waits for its body): the
                # failure is answered like one before the head.
                raise
            # The head is already sent, so the only honest signal left is an incomplete body:
            # close the connection without the final chunk (or before Content-Length is reached).
            exchange.error = exc.code
            log.warning(
                "proxy.upstream_failed_mid_body", code=exc.code, request_id=exchange.request_id
            )
            writer.abort()
            return
        await writer.finish()
