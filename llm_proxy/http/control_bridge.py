"""Control-plane requests, parsed by the front door, answered by the aiohttp application.

``/manage``, ``/admin``, ``/health``, ``/ready`` and ``/metrics`` are aiohttp routes, but aiohttp's
own HTTP parser never sees a byte: the front door frames each request under its one policy, reads
the body whole (control-plane bodies are small: JSON and forms, at most 1 MiB), and this module
hands aiohttp the request already parsed and de-chunked, then writes aiohttp's response back on the
front door's connection. A connection may so carry proxy and control requests in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from llm_proxy import errors
from llm_proxy.http.exchange_io import NoBody

if TYPE_CHECKING:
    from llm_proxy.http.exchange_io import ResponseWriter
    from llm_proxy.http.front import FrontProtocol
    from llm_proxy.http.messages import BodySource


MAX_CONTROL_BODY = 1024 * 1024
# Framing fields the front door has already acted on: aiohttp gets a plain body with its length.
_CONSUMED = frozenset({"transfer-encoding", "content-length", "expect"})


@dataclass(slots=True)
class ControlRequest:
    method: str
    target: str  # origin form, as sent
    http10: bool
    headers: list[tuple[bytes, bytes]]  # every field, as sent
    content_length: int | None
    body: BodySource


class _Connection:
    """What an aiohttp request asks of the protocol that received it."""

    __slots__ = (
        "max_field_size",
        "max_headers",
        "peername",
        "sockname",
        "ssl_context",
        "transport",
    )

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self.transport = transport
        self.ssl_context = None
        self.peername = transport.get_extra_info("peername") if transport else None
        self.sockname = transport.get_extra_info("sockname") if transport else None
        # aiohttp's own defaults for multipart field parsing.
        self.max_field_size = 8190
        self.max_headers = 128


class _StreamWriter(AbstractStreamWriter):
    """aiohttp's response, written on the front door's connection."""

    def __init__(self, writer: ResponseWriter, conn: FrontProtocol) -> None:
        self._writer = writer
        self._conn = conn
        self._chunked = False
        self._head: bytes | None = None
        self.length: int | None = None

    @property
    def transport(self) -> asyncio.WriteTransport | None:
        return self._conn.transport

    def enable_chunking(self) -> None:
        self._chunked = True

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        raise NotImplementedError("control-plane answers are sent uncompressed")

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        lines = [status_line, "\r\n"]
        for name, value in headers.items():
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                raise ValueError("a response header contains a line break")
            lines += (name, ": ", value, "\r\n")
        lines.append("\r\n")
        self._head = "".join(lines).encode("utf-8")
        self._writer.started = True

    def send_headers(self) -> None:
        if self._head is not None:
            self._conn.send(self._head)
            self._head = None

    def _framed(self, chunk: bytes) -> bytes:
        if self._chunked and chunk:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        return chunk

    def _send(self, data: bytes) -> None:
        if self._head is not None:
            data = self._head + data  # the head leaves with the first body bytes
            self._head = None
        if data:
            self._conn.send(data)

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        data = bytes(chunk)
        self.output_size += len(data)
        self._send(self._framed(data))
        await self.drain()

    async def write_eof(self, chunk: bytes = b"") -> None:
        self.output_size += len(chunk)
        data = self._framed(chunk)
        if self._chunked:
            data += b"0\r\n\r\n"
        self._send(data)
        await self.drain()

    async def drain(self) -> None:
        if self._conn.write_paused:
            await self._conn.drain()


class _DeferredBody(StreamReader):
    """A control request's body, read from the front door when the application first reads it.

    Read before the application ran, the body of a client holding no credential was asked for
    (100 Continue) and held, up to MAX_CONTROL_BODY a connection; deferred, the management API
    and the admin pages check the credential first and refuse without it, as the proxy path
    refuses a token before the body.
    """

    def __init__(self, request: ControlRequest, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(BaseProtocol(loop), MAX_CONTROL_BODY, loop=loop)
        self._request = request
        self.fetched = False
        self.failure: errors.ProxyError | None = None

    async def fetch(self) -> None:
        """Read the whole body into the buffer; a body the front door refuses (too large,
        malformed, stalled) is kept as the failure that answers the request."""
        self.fetched = True
        try:
            body = await _read_body(self._request)
        except errors.ProxyError as exc:
            self.failure = exc
            raise
        if body:
            self.feed_data(body)
        self.feed_eof()

    async def _wait(self, func_name: str) -> None:
        # Every read of aiohttp's reader waits here for data it does not have yet.
        if self.failure is not None:
            raise self.failure
        if not self.fetched:
            await self.fetch()


class ControlPlane:
    """Serves control-plane requests through the aiohttp application of ``server``."""

    def __init__(self, server: web.Server) -> None:
        self._server = server

    async def serve(
        self, request: ControlRequest, writer: ResponseWriter, conn: FrontProtocol
    ) -> None:
        length = request.content_length
        if length is not None and length > MAX_CONTROL_BODY:
            raise errors.RequestTooLarge(f"Request body exceeds {MAX_CONTROL_BODY} bytes.")
        loop = asyncio.get_running_loop()
        message = _message(request, keep_alive=conn.keep_alive)
        body: _DeferredBody | None = None
        payload: StreamReader = EMPTY_PAYLOAD
        if length != 0 and not isinstance(request.body, NoBody):
            payload = body = _DeferredBody(request, loop)
        stream_writer = _StreamWriter(writer, conn)
        task = asyncio.current_task()
        assert task is not None
        server = self._server
        factory = cast(Any, server.request_factory)
        web_request: web.BaseRequest = factory(
            message, payload, _Connection(conn.transport), stream_writer, task
        )
        try:
            try:
                response = await server.request_handler(web_request)
            except web.HTTPException as exc:
                response = exc
            if body is not None and not body.fetched:
                if response.status < 400:
                    # Answered without reading the body: read it all the same, so a body the
                    # front door refuses is refused as before and the connection stays usable.
                    with contextlib.suppress(errors.ProxyError):
                        await body.fetch()
                else:
                    # A refusal is sent without the body, and the connection closed after it.
                    response.force_close()
            if body is not None and body.failure is not None:
                raise body.failure
            await response.prepare(web_request)
            await response.write_eof()
        finally:
            web_request._finish()
        if not response.keep_alive:
            conn.keep_alive = False


async def _read_body(request: ControlRequest) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in request.body.chunks():
        size += len(chunk)
        if size > MAX_CONTROL_BODY:
            raise errors.RequestTooLarge(f"Request body exceeds {MAX_CONTROL_BODY} bytes.")
        parts.append(chunk)
    return b"".join(parts)


def _message(request: ControlRequest, *, keep_alive: bool) -> RawRequestMessage:
    raw_headers: list[tuple[bytes, bytes]] = []
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers:
        text = name.decode("utf-8", "surrogateescape")
        if text.lower() in _CONSUMED:
            continue
        raw_headers.append((name, value))
        headers.add(text, value.decode("utf-8", "surrogateescape"))
    if request.content_length:
        # A chunked body's length is known once read: aiohttp is told none, as for any chunked body.
        headers[hdrs.CONTENT_LENGTH] = str(request.content_length)
        raw_headers.append((b"Content-Length", str(request.content_length).encode()))
    path, _, query = request.target.partition("?")
    return RawRequestMessage(
        request.method,
        request.target,
        HttpVersion10 if request.http10 else HttpVersion11,
        CIMultiDictProxy(headers),
        tuple(raw_headers),
        not keep_alive,  # should_close
        None,  # compression: bodies are never decoded for a handler
        False,  # upgrade
        False,  # chunked
        URL.build(path=path, query_string=query, encoded=True),
    )
