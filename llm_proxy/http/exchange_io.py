"""One request's I/O on a front-door connection: its body as it arrives, its response as it leaves.

:class:`RequestBody` is fed by the parser and read by a handler, with flow control (reading pauses
while too much is buffered); a framing error or a stalled client fails it, which is how the handler
learns of them. :class:`ResponseWriter` frames the answer: ``Content-Length`` when known, chunked
otherwise, or closed by the connection for an HTTP/1.0 client.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

from llm_proxy import errors
from llm_proxy.crypto import same_length_mask
from llm_proxy.http.messages import RenderedFields

if TYPE_CHECKING:
    from llm_proxy.http.front import FrontProtocol

_BODY_HIGH_WATER = 1024 * 1024
# What a buffered piece of a body costs besides its bytes (its object and its place in the queue),
# counted towards the high-water mark: a body sent as tiny chunks, one piece each, would otherwise
# hold many times its size before reading stops.
_PIECE_COST = 64
_NO_BODY_STATUS = frozenset({204, 304})


class _Date:
    """The ``Date`` header line, formatted at most once a second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = 0
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode("ascii")
        return self._line


DATE = _Date()


class NoBody:
    """The body of a request that has none."""

    __slots__ = ()
    complete = True

    async def read_exactly(self, size: int) -> bytes:
        return b""

    async def chunks(self) -> AsyncIterator[bytes]:
        return
        yield  # pragma: no cover - makes this an async generator

    def raise_failure(self) -> None:
        pass


NO_BODY = NoBody()


class RequestBody:
    """A request body fed by the parser and read by a handler, with flow control.

    A framing error or a stalled client found after the head fails the body: the handler reading
    it gets the error (and, through it, aborts any upstream request it was streaming it to).
    """

    __slots__ = (
        "_chunks",
        "_conn",
        "_continue",
        "_error",
        "_taken",
        "_waiter",
        "complete",
        "received",
    )

    def __init__(self, conn: FrontProtocol, expect_continue: bool) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self.received = 0  # bytes of the body so far
        self._taken = 0  # of which read by the handler
        self._error: errors.ProxyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The client waits for "100 Continue" before sending: given when the body is first read,
        # which is after the request was admitted.
        self._continue = expect_continue
        self.complete = False  # every byte of the body arrived

    def feed(self, data: bytes) -> None:
        self._continue = False  # the client did not wait
        chunks = self._chunks
        chunks.append(data)
        self.received += len(data)
        if self.received - self._taken + _PIECE_COST * len(chunks) > _BODY_HIGH_WATER:
            self._conn.pause_reading()
        self.wake()

    def end(self) -> None:
        self.complete = True
        self.wake()

    def fail(self, error: errors.ProxyError) -> None:
        if not self.complete and self._error is None:
            self._error = error
            self._chunks.clear()
            self.wake()

    def raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def wake(self) -> None:
        """Let a waiting reader look again (more bytes, the end, an error or a lost client)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next(self) -> bytes | None:
        if self._continue:
            self._continue = False
            self._conn.send_continue()
        while True:
            if self._error is not None:
                raise self._error
            if self._chunks:
                return self._take()
            if self.complete:
                return None
            if self._conn.lost:
                raise asyncio.CancelledError("client went away")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _take(self) -> bytes:
        chunks = self._chunks
        chunk = chunks.popleft()
        self._taken += len(chunk)
        if self.received - self._taken + _PIECE_COST * len(chunks) <= _BODY_HIGH_WATER // 4:
            self._conn.resume_reading()
        return chunk

    async def read_exactly(self, size: int) -> bytes:
        if self._error is None and len(self._chunks) == 1 and self.received - self._taken >= size:
            return self._take()  # in one piece already, as small bodies come
        parts: list[bytes] = []
        got = 0
        while got < size:
            chunk = await self._next()
            if chunk is None:
                break
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._next()) is not None:
            yield chunk


class ResponseWriter:
    """Writes one response on the connection: head, body (chunked when no length), end.

    To an HTTP/1.0 client a body of unknown length is delimited by closing the connection.
    """

    __slots__ = (
        "_chunked",
        "_conn",
        "_head_request",
        "_http10",
        "_no_body",
        "_pending",
        "_request_body",
        "started",
    )

    def __init__(
        self,
        conn: FrontProtocol,
        head_request: bool,
        http10: bool,
        request_body: RequestBody | NoBody = NO_BODY,
    ) -> None:
        self._conn = conn
        self._request_body = request_body
        self._head_request = self._no_body = head_request
        self._http10 = http10
        self._chunked = False
        self._pending: bytes | None = None
        self.started = False

    async def start(
        self, status: int, reason: bytes, head: RenderedFields, *, stream: bool
    ) -> None:
        rendered = self._render(status, reason, head)
        if stream:
            self._conn.send(rendered)
        else:
            self._pending = rendered

    async def respond(self, status: int, reason: bytes, head: RenderedFields, body: bytes) -> None:
        # Head, body and end in one send, as start/write/finish would send them.
        rendered = self._render(status, reason, head)
        if self._no_body or not body:
            data = rendered + b"0\r\n\r\n" if self._chunked and not self._no_body else rendered
        elif self._chunked:
            data = b"%b%x\r\n%b\r\n0\r\n\r\n" % (rendered, len(body), body)
        else:
            data = rendered + body
        self._conn.send(data)
        if self._conn.write_paused:
            await self._conn.drain()

    def _render(self, status: int, reason: bytes, head: RenderedFields) -> bytes:
        self.started = True
        conn = self._conn
        # Bytes from end to end: the upstream's fields go out exactly as they came, undecoded.
        lines = head.lines
        if not head.has_date:
            lines.append(DATE.line())
        if status in _NO_BODY_STATUS or status < 200:
            self._no_body = True
        elif not head.has_length and not self._no_body:
            if self._http10:
                conn.keep_alive = False  # HTTP/1.0 has no chunked coding: the close ends the body
            else:
                self._chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
        if not self._request_body.complete:
            conn.keep_alive = False  # answered early: the rest of the body cannot be told apart
        if not conn.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self._http10:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        rendered = b"HTTP/1.1 %d %b\r\n%b" % (status, reason or _reason(status), b"".join(lines))
        # One search of the whole head, reason phrase included, instead of a look at each field
        # (find, not `in`: bytes' `in` tries its operand as an integer first, twice the cost).
        secret = head.secret
        if secret and rendered.find(secret) >= 0:
            rendered = rendered.replace(secret, same_length_mask(secret))
        return rendered

    def retract(self) -> bool:
        """Take back a head held for the first chunk (``start`` not streamed): True when nothing of
        the answer was sent, and another may be given in its place."""
        if self._pending is None:
            return False
        self._pending = None
        self._chunked = False
        self._no_body = self._head_request
        self.started = False
        return True

    async def write(self, chunk: bytes) -> None:
        if not self.push(chunk):
            await self._conn.drain()

    def push(self, chunk: bytes) -> bool:
        """``write`` without waiting: False when the client is behind and ``drain`` is due."""
        if self._no_body or not chunk:
            return True
        data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk
        if self._pending is not None:
            data = self._pending + data
            self._pending = None
        conn = self._conn
        conn.send(data)
        return not conn.write_paused

    async def drain(self) -> None:
        """Wait until the client reads what was written (see ``FrontProtocol.drain``)."""
        await self._conn.drain()

    async def finish(self) -> None:
        tail = b"0\r\n\r\n" if self._chunked and not self._no_body else b""
        if self._pending is not None:
            tail = self._pending + tail
            self._pending = None
        if tail:
            self._conn.send(tail)

    def abort(self) -> None:
        self._conn.close()


_PHRASES = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def _reason(status: int) -> bytes:
    return _PHRASES.get(status, b"Unknown")
