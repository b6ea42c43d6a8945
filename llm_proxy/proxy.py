"""The proxy path: SPEC §7 checks in order, the key swap, and a byte-for-byte relay.

Nothing here parses a body unless a ``param_whitelist`` or stream-usage injection needs it, nothing
waits on the database for a cached token, and everything about the request that is not needed to
answer it is recorded in an :class:`~llm_proxy.exchange.Exchange` and handed off after the end.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import orjson
import structlog
from aiohttp import web

from llm_proxy import errors
from llm_proxy.api_config import ApiProvider, normalise_path
from llm_proxy.authority import Grant, TokenAuthority
from llm_proxy.exchange import CappedBuffer, Exchange, ExchangeSink
from llm_proxy.metrics import MetricsSink
from llm_proxy.models import isoformat
from llm_proxy.store import Store
from llm_proxy.upstream import Body, UpstreamClient, UpstreamResponse

log = structlog.get_logger(__name__)

# Never forwarded upstream: hop-by-hop headers, our own credential, and what identifies the client.
_DROP_REQUEST = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-real-ip",
        "forwarded",
        "true-client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "x-request-id",
    }
)
_DROP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-request-id",
        "server-timing",
    }
)
# Bodies up to this size are read whole and sent with the request head in one write.
_SMALL_BODY = 64 * 1024
_CHAT_COMPLETIONS = "/v1/chat/completions"


def _request_id(supplied: str | None) -> str:
    if supplied and len(supplied) <= 128 and supplied.isprintable():
        return supplied
    return os.urandom(16).hex()


StreamUsageHooks = tuple[Callable[[bytes], bytes | None], Callable[[], "ChunkFilter"]]


class _BufferedHeadResponse(web.StreamResponse):
    """Holds the head back until the first body chunk, so both leave in one write (one syscall).

    Used for everything but event streams, whose head the client should see at once.
    """

    _send_headers_immediately = False


class ChunkFilter:
    """Transforms a response body on its way to the client (see stream-usage injection)."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b""


class ProxyHandler:
    def __init__(
        self,
        provider: ApiProvider,
        authority: TokenAuthority,
        upstream: UpstreamClient,
        sink: ExchangeSink,
        *,
        max_body_bytes: int,
        capture_bytes: int,
        stream_usage: StreamUsageHooks | None = None,
        store: Store,
        token_info_path: str,
    ) -> None:
        self.provider = provider
        self.store = store
        self.token_info_path = token_info_path
        self.authority = authority
        self.upstream = upstream
        self.metrics = MetricsSink(provider, sink)
        self.sink: ExchangeSink = self.metrics
        self.max_body_bytes = max_body_bytes
        self.capture_bytes = capture_bytes
        self.stream_usage = stream_usage if provider.inject_stream_usage else None
        self._allow_header = ", ".join(sorted(provider.allowed_methods))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler for every path not claimed by another route."""
        started = time.perf_counter()
        request_id = _request_id(request.headers.get("X-Request-ID"))
        reply_headers = {"X-Request-ID": request_id}
        origin = request.headers.get("Origin")
        if origin is not None and self.provider.origin_allowed(origin):
            reply_headers["Access-Control-Allow-Origin"] = origin
            reply_headers["Vary"] = "Origin"
        try:
            return await self._handle(request, request_id, started, reply_headers)
        except errors.ProxyError as exc:
            if not exc.counted:
                self.metrics.refused(request.path, exc)
            return exc.to_response(reply_headers)

    async def _handle(
        self, request: web.Request, request_id: str, started: float, reply_headers: dict[str, str]
    ) -> web.StreamResponse:
        provider = self.provider
        raw_path, _, query = request.raw_path.partition("?")
        path = normalise_path(raw_path)
        if path == self.token_info_path:
            return await self._token_info(request, reply_headers)
        if path is None or not provider.path_allowed(path):
            raise errors.EndpointNotFound(f"Endpoint {request.method} {raw_path} is not allowed.")
        method = request.method
        if method not in provider.allowed_methods:
            raise errors.MethodNotAllowed(
                f"Method {method} is not allowed for {path}.",
                headers={"Allow": self._allow_header},
            )
        if method == "OPTIONS":
            return self._preflight(request, reply_headers)
        grant = await self.authority.admit(request.headers.get("Authorization"))
        exchange = Exchange(
            request_id=request_id,
            started_at=time.time(),
            started=started,
            method=method,
            path=path,
            project_id=grant.project_id,
            token_id=grant.token_id,
            request_body=CappedBuffer(self.capture_bytes),
            response_body=CappedBuffer(self.capture_bytes),
        )
        try:
            return await self._forward(request, grant, exchange, path, query, reply_headers)
        except errors.ProxyError as exc:
            exchange.error = exc.code
            exchange.status = exc.status
            exc.counted = True  # the exchange carries it to the metrics
            raise
        except asyncio.CancelledError:
            exchange.client_disconnected = True
            exchange.error = exchange.error or "client_disconnected"
            raise
        finally:
            exchange.ended = time.perf_counter()
            self.sink.submit(exchange)

    async def _token_info(
        self, request: web.Request, reply_headers: dict[str, str]
    ) -> web.Response:
        """What a withering token may know about itself: expiry, quota left, what it can call."""
        if request.method != "GET":
            raise errors.MethodNotAllowed(
                f"Method {request.method} is not allowed for {self.token_info_path}.",
                headers={"Allow": "GET"},
            )
        grant = await self.authority.check(request.headers.get("Authorization"))
        remaining: int | None = None
        request_count: int | None = None
        if grant.max_requests is not None:
            token = await self.store.get_token(grant.token_id)
            request_count = token.request_count if token else grant.max_requests
            remaining = max(grant.max_requests - request_count, 0)
        expires_at = datetime.fromtimestamp(grant.expires_at, UTC)
        body = {
            "object": "llm_proxy.token",
            "token_id": grant.token_id,
            "project_id": grant.project_id,
            "expires_at": isoformat(expires_at),
            "expires_in_seconds": max(int(grant.expires_at - time.time()), 0),
            "max_requests": grant.max_requests,
            "request_count": request_count,
            "remaining_requests": remaining,
            "allowed_endpoints": sorted(self.provider.allowed_prefixes),
            "allowed_methods": sorted(self.provider.allowed_methods),
        }
        return web.Response(
            body=orjson.dumps(body),
            content_type="application/json",
            headers={**reply_headers, "Cache-Control": "no-store"},
        )

    def _preflight(self, request: web.Request, reply_headers: dict[str, str]) -> web.Response:
        headers = dict(reply_headers)
        if "Access-Control-Allow-Origin" in headers:
            headers["Access-Control-Allow-Methods"] = self._allow_header
            asked = request.headers.get("Access-Control-Request-Headers")
            headers["Access-Control-Allow-Headers"] = asked or "Authorization, Content-Type"
            headers["Access-Control-Max-Age"] = "600"
        return web.Response(status=204, headers=headers)

    async def _read_body(self, request: web.Request, exchange: Exchange) -> Body:
        if not request.body_exists:
            return None
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise errors.RequestTooLarge(
                f"Request body of {length} bytes exceeds the limit of {self.max_body_bytes} bytes."
            )
        if length is not None and length <= _SMALL_BODY:
            body = await request.content.readexactly(length) if length else b""
            exchange.request_body.add(body)
            return body
        return self._stream_body(request, exchange)

    async def _stream_body(self, request: web.Request, exchange: Exchange) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise errors.RequestTooLarge(
                    f"Request body exceeds the limit of {self.max_body_bytes} bytes."
                )
            exchange.request_body.add(chunk)
            yield chunk

    def _check_params(self, body: bytes) -> None:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return  # not JSON: nothing to whitelist; upstream will answer as it does
        if isinstance(parsed, dict):
            bad = self.provider.disallowed_param(parsed)
            if bad is not None:
                raise errors.ParamNotAllowed(f"The value of parameter '{bad}' is not allowed.")

    async def _forward(
        self,
        request: web.Request,
        grant: Grant,
        exchange: Exchange,
        path: str,
        query: str,
        reply_headers: dict[str, str],
    ) -> web.StreamResponse:
        provider = self.provider
        body = await self._read_body(request, exchange)
        needs_buffer = bool(provider.param_whitelist) or (
            self.stream_usage is not None and path == _CHAT_COMPLETIONS and request.method == "POST"
        )
        if needs_buffer and body is not None and not isinstance(body, bytes):
            raise errors.RequestTooLarge(
                f"Request bodies to this endpoint are limited to {_SMALL_BODY} bytes."
            )
        headers = [
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _DROP_REQUEST and not name.lower().startswith("cf-")
        ]
        if isinstance(body, bytes) and body:
            if provider.param_whitelist:
                self._check_params(body)
            if self.stream_usage is not None and path == _CHAT_COMPLETIONS:
                rewritten = self.stream_usage[0](body)
                if rewritten is not None:
                    body = rewritten
                    exchange.usage_injected = True
                    headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
        headers.append(("Authorization", grant.upstream_authorization))
        headers.append(("X-Request-ID", exchange.request_id))
        target = provider.origin.path_prefix + path + ("?" + query if query else "")
        exchange.upstream_started = time.perf_counter()
        upstream = await self.upstream.request(
            request.method, provider.origin, target, headers, body, provider.timeouts
        )
        try:
            return await self._relay(request, upstream, exchange, reply_headers)
        finally:
            await upstream.aclose()

    async def _relay(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        exchange: Exchange,
        reply_headers: dict[str, str],
    ) -> web.StreamResponse:
        exchange.upstream_headers_at = now = time.perf_counter()
        exchange.status = upstream.status
        for name, value in upstream.headers:
            lower = name.lower()
            if lower == "content-type":
                exchange.response_content_type = value
            elif lower == "content-encoding":
                exchange.response_content_encoding = value
        response_class = web.StreamResponse if exchange.is_stream else _BufferedHeadResponse
        response = response_class(status=upstream.status, reason=upstream.reason)
        out = response.headers
        for name, value in upstream.headers:
            lower = name.lower()
            if lower in _DROP_RESPONSE or (lower == "content-length" and exchange.usage_injected):
                continue  # (a filtered body may be shorter than upstream said)
            out.add(name, value)
        out.update(reply_headers)
        proxy_ms = (exchange.upstream_started - exchange.started) * 1000
        upstream_ms = (now - exchange.upstream_started) * 1000
        out["Server-Timing"] = f"proxy;dur={proxy_ms:.3f}, upstream;dur={upstream_ms:.3f}"
        chunk_filter = (
            self.stream_usage[1]()
            if self.stream_usage is not None and exchange.usage_injected and exchange.is_stream
            else None
        )
        await response.prepare(request)
        capture = exchange.response_body
        first = True
        try:
            async for chunk in upstream:
                capture.add(chunk)
                if chunk_filter is not None:
                    chunk = chunk_filter.feed(chunk)
                    if not chunk:
                        continue
                if first:
                    exchange.first_byte_at = time.perf_counter()
                    first = False
                await response.write(chunk)
            if chunk_filter is not None:
                tail = chunk_filter.flush()
                if tail:
                    await response.write(tail)
        except errors.ProxyError as exc:
            # The head is already sent, so the only honest signal left is an incomplete body:
            # close the connection without the final chunk (or before Content-Length is reached).
            exchange.error = exc.code
            log.warning(
                "proxy.upstream_failed_mid_body", code=exc.code, request_id=exchange.request_id
            )
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
