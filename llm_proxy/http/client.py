"""A lean HTTP/1.1 client for upstream calls, implementing :class:`~llm_proxy.http.upstream.UpstreamClient`.

An ``asyncio.Protocol`` feeding ``httptools`` over pooled keep-alive connections does a fraction of
the per-request work of aiohttp's client. One request runs on a connection at a time (no
pipelining), so a connection has at most one waiter: the request or response currently using it.

A request is sent at most once (a guarantee of the request path, see ``docs/architecture.md``). A
pooled connection already known to be dead (closed, or the upstream's FIN read) is passed over when
it is taken, before anything is written to it; once a byte of a request has been handed to a
transport, a failure is raised, never retried, and carries ``reached_upstream=True``. Connections
may run through an HTTP CONNECT tunnel (``egress.py``).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import cast

import httptools

from llm_proxy.errors import UpstreamTimeout, UpstreamUnavailable
from llm_proxy.http.egress import Egress, open_tunnel, upstream_ssl_context
from llm_proxy.http.upstream import Body, Origin, Timeouts

# Until its body is relayed, a response buffers at most this much: then reading the socket stops
# (the kernel buffers and TCP flow control do the rest) until relay() takes what is held.
HIGH_WATER = 256 * 1024
# Up to this size, head and body are joined so the request leaves in one send() call.
_JOIN_BODY_UP_TO = 16 * 1024
# The most a response head (status line and fields, interim heads before it included) may have, as
# the front door's FrontLimits.max_head_bytes for a request head, and how many fields it may have.
# The bytes of a trailer section (or of chunk framing) that bring no body byte are held to the
# same size. Past either, the upstream is refused as nginx refuses "too big header".
MAX_HEAD_BYTES = 64 * 1024
MAX_HEAD_FIELDS = 256
# What a head holds besides its reason and fields: "HTTP/1.1 200 ", the status line's CRLF and the
# empty line that ends the head.
_HEAD_FRAME_BYTES = len(b"HTTP/1.1 200 \r\n\r\n")
_TOO_BIG_HEAD = "upstream sent too big a header"
# What a reason phrase may not hold (RFC 9112 §4: tabs, spaces and visible characters only) and
# the parser lets through.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# SO_LINGER on, with no time: closing the socket resets the connection instead of ending it.
_RESET = struct.pack("ii", 1, 0)
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# An idle connection is given up this long before the upstream's announced Keep-Alive timeout: a
# request sent nearer to it may cross the upstream's close on the way and be lost.
_KEEP_ALIVE_MARGIN = 1.0
# The most digits of a Keep-Alive timeout that may shorten the pool's expiry (decades of seconds).
_MAX_KEEP_ALIVE_DIGITS = 9

_Key = tuple[str, str, int]


class _Unexpected(Exception):
    """Response bytes arrived while no request was waiting for them."""


class _DroppedTrailers:
    """Where the fields of a trailer section go once the head is complete: nowhere.

    The relay passes on the body, not the trailer section (SPEC §7; RFC 9112 §7.1.2 lets a
    recipient that removes the chunked coding discard it): the client's framing is the proxy's own,
    and a whole answer or a Content-Length one could not carry trailers. Above all, a trailer field
    must never join the head: a trailer ``X-Request-ID`` or ``Set-Cookie`` would pass for the
    upstream's header. Their size is bounded by the connection (see ``data_received``).
    """

    __slots__ = ()

    def append(self, field: tuple[bytes, bytes]) -> None:
        pass


_DROPPED_TRAILERS = _DroppedTrailers()


def _serialize_head(
    method: str, origin: Origin, target: str, headers: Sequence[tuple[bytes, bytes]], body: Body
) -> tuple[bytes, bool]:
    """The request head as bytes, and whether the body goes out with chunked framing."""
    # The target was decoded with surrogateescape: encoding it the same way gives its bytes back.
    parts = [method.encode(), b" ", target.encode("utf-8", "surrogateescape"), b" HTTP/1.1\r\n"]
    has_host = has_length = has_te = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"host":
            has_host = True
        elif lname == b"content-length":
            has_length = True
        elif lname == b"transfer-encoding":
            has_te = True
        parts += (name, b": ", value, b"\r\n")
    added = [] if has_host else [b"Host: %s\r\n" % origin.host_header]
    chunked = False
    if has_length:
        pass
    elif body is None:
        if method in _METHODS_WITH_BODY:
            added.append(b"Content-Length: 0\r\n")
    elif isinstance(body, bytes):
        added.append(b"Content-Length: %d\r\n" % len(body))
    else:
        chunked = True
        if not has_te:
            added.append(b"Transfer-Encoding: chunked\r\n")
    parts += added
    parts.append(b"\r\n")
    head = b"".join(parts)
    # One scan of the joined head instead of one per value: a line break anywhere else would let a
    # value inject headers or a second request.
    if head.count(b"\n") != 2 + len(headers) + len(added):
        raise ValueError("request target or header contains a line break")
    return head, chunked


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parses responses and hands body chunks to the relay (buffering
    what comes before it starts)."""

    # Slots: the state is read at every callback, and an instance dict grown past 30 keys would
    # no longer share its keys with the other connections', which makes every access slower.
    __slots__ = (
        "_buffered",
        "_chunks",
        "_client",
        "_deadline",
        "_exc",
        "_expecting",
        "_fields",
        "_head_request",
        "_idle",
        "_loop",
        "_lost",
        "_parser",
        "_read_paused",
        "_sink",
        "_sink_behind",
        "_timer",
        "_transport",
        "_unproductive",
        "_waiter",
        "_waiting_for",
        "_write_paused",
        "body_done",
        "closed",
        "expires_at",
        "head_done",
        "headers",
        "keep_for",
        "key",
        "reason",
        "reusable",
        "status",
    )
    _transport: asyncio.Transport

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Http1Client, key: _Key) -> None:
        self._loop = loop
        self._client = client
        self.key = key
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.expires_at = 0.0  # while pooled: when it is given up
        self.keep_for: float | None = None  # the upstream's Keep-Alive timeout, when it gave one
        self._lost: asyncio.Future[None] | None = None
        self._exc: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._waiting_for = ""
        self._write_paused = False
        self._read_paused = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        # While a body is relayed (relay()), chunks go to the sink as they are parsed, not to _chunks.
        self._sink: Callable[[bytes], bool] | None = None
        self._sink_behind = False  # the sink's reader fell behind: reading waits for its drain
        self._idle = 0.0
        # Per exchange, reset by send().
        self._expecting = False
        self._head_request = False
        self.head_done = False
        self.body_done = False
        self.reusable = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []  # as received: relayed without decoding
        # Where on_header puts a field: the head's list, then (once the head is complete) nowhere.
        # Switching once per response costs less than telling a trailer apart at every field.
        self._fields: list[tuple[bytes, bytes]] | _DroppedTrailers = self.headers
        # Bytes received since the head ended or a body byte was parsed: a head, or a trailer
        # section, still arriving. Held to MAX_HEAD_BYTES.
        self._unproductive = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # also set by abort(): once closing, a connection is never handed out
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(UpstreamUnavailable("upstream closed the connection"))
        if self._lost is not None:
            self._lost.set_result(None)

    def eof_received(self) -> None:
        # The upstream ended the connection cleanly (its FIN; on TLS, its close_notify): the one
        # end a body delimited by the close (neither a length nor chunked framing, HTTP/1.0 style)
        # may have. A reset, our own abort, or (on uvloop) a TLS connection cut without
        # close_notify come to connection_lost() alone, and such a body was cut short.
        # (asyncio's own SSL transport reports a missing close_notify as an EOF too.)
        if self._expecting and self.head_done and not self.reusable:
            framed = (b"content-length", b"transfer-encoding")
            if not any(name.lower() in framed for name, _ in self.headers):
                self._complete()

    def data_received(self, data: bytes) -> None:
        if self._client.on_data is not None:
            self._client.on_data()
        # Counted per read rather than per field: the parser buffers a field until its end, so
        # an endless line would never reach on_header. on_headers_complete and on_body reset it.
        self._unproductive += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refusal = exc.__context__
            if not isinstance(refusal, UpstreamUnavailable):
                refusal = UpstreamUnavailable("invalid HTTP response from upstream")
            self._fail(refusal)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail(UpstreamUnavailable("invalid HTTP response from upstream"))
        else:
            if self._unproductive > MAX_HEAD_BYTES:
                # A head (or interim heads) or a trailer section without end.
                self._fail(
                    UpstreamUnavailable(
                        "upstream sent too big a trailer section"
                        if self.head_done
                        else _TOO_BIG_HEAD
                    )
                )

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if not self._expecting:
            raise _Unexpected
        self.reason = b""
        self.headers = self._fields = []

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status < 100:
                raise UpstreamUnavailable("upstream sent an invalid status code")
            return  # informational (100 Continue): the real head follows
        if self._unproductive > MAX_HEAD_BYTES or len(self.headers) > MAX_HEAD_FIELDS:
            self._check_head_size()
        self._unproductive = 0
        self._fields = _DROPPED_TRAILERS
        reason = self.reason
        if not reason.isalpha() and _CONTROL.search(reason):
            # Relayed, it would make a client's parser refuse the whole answer (h11's, under the
            # OpenAI Python SDK, refuses a NUL); the phrase means nothing: the standard one goes.
            self.reason = b""
        self.status = status
        self.head_done = True
        self.reusable = self._parser.should_keep_alive()
        if self._head_request:
            # httptools cannot be told the request was HEAD and would wait for Content-Length bytes.
            self._parser = httptools.HttpResponseParser(self)
            self._complete()
        self._wake()

    def on_body(self, body: bytes) -> None:
        if not self._expecting:
            raise _Unexpected
        self._unproductive = 0
        sink = self._sink
        if sink is not None:
            try:
                keeping_up = sink(body)
            except Exception as exc:  # a defect in the sink, not the upstream's: relay() raises it
                self._sink = None
                self._fail(exc)
                return
            if not keeping_up:
                self._sink_behind = True
                if not self._read_paused:
                    self._read_paused = True
                    self._transport.pause_reading()
                self._wake()
            elif self._deadline is not None:
                self._deadline = self._loop.time() + self._idle
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.head_done:
            self._complete()

    # internals

    def _check_head_size(self) -> None:
        """Refuse a head over the limits. (The bytes read so far may include the start of the
        body: the head is measured exactly only when they are over the limit.)"""
        if len(self.headers) > MAX_HEAD_FIELDS:
            raise UpstreamUnavailable(f"{_TOO_BIG_HEAD} (over {MAX_HEAD_FIELDS} fields)")
        size = _HEAD_FRAME_BYTES + len(self.reason)
        for name, value in self.headers:
            size += len(name) + len(value) + 4  # with ": " and CRLF
        if size > MAX_HEAD_BYTES:
            raise UpstreamUnavailable(_TOO_BIG_HEAD)

    def _complete(self) -> None:
        self.body_done = True
        self._expecting = False
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._exc is None:
            self._exc = exc
        self._wake()
        self.abort()

    def abort(self, *, reset: bool = False) -> None:
        if not self.closed:
            self.closed = True
            sock = self._transport.get_extra_info("socket") if reset else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    async def abort_and_wait(self) -> None:
        if not self.closed:
            self._lost = self._loop.create_future()
            self.abort()
            await self._lost

    async def _wait(self, deadline: float, waiting_for: str) -> None:
        # One timer is kept across waits and only moved when it would fire too late; a relayed chunk
        # only moves the deadline. When it fires early it re-arms for the current deadline.
        self._deadline = deadline
        self._waiting_for = waiting_for
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
            self._deadline = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._fail(UpstreamTimeout(f"upstream {self._waiting_for} timeout"))

    async def _drain(self, idle: float) -> None:
        # A response arriving early (say a 413) ends the wait: the upstream may have stopped reading.
        while self._write_paused and not self.head_done:
            if self._exc is not None:
                raise self._exc
            await self._wait(self._loop.time() + idle, "write")

    async def _send_stream(self, body: AsyncIterable[bytes], chunked: bool, idle: float) -> None:
        transport = self._transport
        # Each write follows a wait for the client: the upstream may have closed meanwhile, and
        # uvloop raises on a write to a closed transport (is_closing() also covers our own abort).
        async for chunk in body:
            if self.head_done or transport.is_closing():
                break
            if chunked:
                if not chunk:
                    continue  # an empty chunk would end the body
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self._write_paused:
                await self._drain(idle)
        else:
            if not chunked:
                return
            if not transport.is_closing():
                transport.write(b"0\r\n\r\n")
                return
        self.reusable = False  # the rest of the request body was never sent

    async def send(
        self,
        head: bytes,
        body: Body,
        chunked: bool,
        head_request: bool,
        timeouts: Timeouts,
        on_sent: Callable[[], object] | None = None,
    ) -> Http1Response:
        self._expecting = True
        self._head_request = head_request
        self.head_done = self.body_done = False
        self._unproductive = 0
        transport = self._transport
        try:
            if body is None:
                transport.write(head)
            elif isinstance(body, bytes):
                if len(body) <= _JOIN_BODY_UP_TO:
                    transport.write(head + body)
                else:
                    transport.write(head)
                    transport.write(body)
            else:
                transport.write(head)
                await self._send_stream(body, chunked, timeouts.idle)
            if on_sent is not None:
                on_sent()
            if self._write_paused:  # the header timeout counts from sent, not merely buffered
                await self._drain(timeouts.idle)
            deadline = self._loop.time() + timeouts.response_header
            while not self.head_done:
                if self._exc is not None:
                    raise self._exc
                await self._wait(deadline, "response header")
        except BaseException:
            # A request cut off (its body failed, the client left): reset, so that no upstream
            # takes a truncated body (one ending on a chunk boundary) for a whole one.
            self.abort(reset=True)
            raise
        return Http1Response(self, timeouts.idle)

    async def relay(
        self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]], idle: float
    ) -> None:
        """Hand every body chunk to ``sink`` as it is parsed, until the body ends.

        A chunk costs no wake-up of the waiting task: the task wakes once at the end, on a failure,
        or when ``sink`` returns False (its reader is behind). Reading then stops until ``drain()``
        returns, and the idle timeout does not run meanwhile: the upstream is not the slow one.
        """
        if self._exc is not None and not self.body_done:
            # Known to have failed (a bad chunk after the head, say) before a byte of the body
            # was passed on: the caller may still answer for the failure instead.
            raise self._exc
        chunks = self._chunks
        while chunks:  # what arrived before, usually with the head
            chunk = chunks.popleft()
            self._buffered -= len(chunk)
            if not sink(chunk):
                await drain()
        if self._read_paused:
            self._resume_reading()
        self._sink, self._idle = sink, idle
        try:
            while not self.body_done:
                if self._exc is not None:
                    raise self._exc
                if self._sink_behind:
                    self._sink_behind = False
                    await drain()
                    if self._read_paused and not self.closed:
                        self._resume_reading()
                    continue
                await self._wait(self._loop.time() + idle, "idle")
        finally:
            self._sink = None
            self._sink_behind = False

    def take_body(self) -> bytes | None:
        """The whole body when it has arrived, else None (nothing taken)."""
        if not self.body_done:
            return None
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _resume_reading(self) -> None:
        self._read_paused = False
        self._transport.resume_reading()

    def release(self) -> None:
        if self.body_done and self.reusable and not self.closed:
            self._chunks.clear()
            self._buffered = 0
            if self._read_paused:
                self._resume_reading()
            self._client._release(self)
        else:
            self.abort()


class Http1Response:
    """A response whose head has arrived; ``relay()`` its body (or take it whole), then ``aclose()``."""

    __slots__ = ("_conn", "_idle", "headers", "reason", "status")

    status: int
    reason: bytes
    headers: Sequence[tuple[bytes, bytes]]

    def __init__(self, conn: _Connection, idle: float) -> None:
        self._conn: _Connection | None = conn
        self._idle = idle
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers

    async def relay(
        self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]
    ) -> None:
        """Push the body to ``sink`` as it arrives (see ``UpstreamResponse.relay``)."""
        conn = self._conn
        if conn is None:
            return
        await conn.relay(sink, drain, self._idle)
        # Pool the connection as soon as the body ends; aclose() then has nothing left to do.
        self._conn = None
        conn.release()

    def complete_body(self) -> bytes | None:
        """The whole body if it already arrived with the head (a small answer), else None."""
        conn = self._conn
        if conn is None:
            return None
        body = conn.take_body()
        if body is not None:
            self._conn = None
            conn.release()
        return body

    async def aclose(self) -> None:
        """Pool the connection if the whole response arrived and it may be kept, else close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release()

    def keep_alive_hint(self, value: bytes) -> None:
        """The upstream's ``Keep-Alive`` field (see ``UpstreamResponse.keep_alive_hint``)."""
        conn = self._conn
        if conn is not None:
            for param in value.split(b","):
                name, _, seconds = param.partition(b"=")
                if name.strip().lower() == b"timeout":
                    seconds = seconds.strip()
                    if seconds.isdigit():
                        # int() refuses thousands of digits (the answer became a 500); past
                        # _MAX_KEEP_ALIVE_DIGITS the timeout is longer than any pool's expiry.
                        seconds = seconds.lstrip(b"0") or b"0"
                        if len(seconds) <= _MAX_KEEP_ALIVE_DIGITS:
                            conn.keep_for = int(seconds) - _KEEP_ALIVE_MARGIN
                    return

    def discard(self) -> None:
        """Close the connection whatever arrived (see ``UpstreamResponse.discard``)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()


class Http1Client:
    """HTTP/1.1 client keeping, per origin, a LIFO pool of idle keep-alive connections.

    ``ssl_context`` is used for ``https`` origins (default: the system store plus ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR``, see :func:`~llm_proxy.http.egress.upstream_ssl_context`). ``egress`` routes
    connections through HTTP CONNECT proxies (default: direct). At most ``max_idle_per_origin`` idle
    connections are kept per origin, each for at most ``keepalive_expiry`` seconds (less when the
    upstream's ``Keep-Alive`` field announces it closes idle connections sooner).
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle_per_origin: int = 100,
        keepalive_expiry: float = 60.0,
        on_data: Callable[[], None] | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.on_data = on_data  # called whenever a response delivers bytes (busy polling)
        self._ssl_context = ssl_context
        self._egress = egress
        self._max_idle = max_idle_per_origin
        self._expiry = keepalive_expiry
        self._pools: dict[_Key, deque[_Connection]] = {}
        self._closed = False

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: Body,
        timeouts: Timeouts,
        on_sent: Callable[[], object] | None = None,
    ) -> Http1Response:
        """Send a request and return once the response head arrived (see ``UpstreamClient``)."""
        head, chunked = _serialize_head(method, origin, target, headers, body)
        key = (origin.scheme, origin.host, origin.port)
        head_request = method == "HEAD"
        # The only retry is here, before any write: _take() passes over connections already known
        # dead. transport.write() buffers and reports no failure, so once it was called the request
        # may have reached the upstream and must not be sent again: send()'s failures are raised as
        # they are.
        conn = self._take(key)
        if conn is None:
            conn = await self._connect(origin, key, timeouts.connect)
        return await conn.send(head, body, chunked, head_request, timeouts, on_sent)

    async def close(self) -> None:
        """Close every idle connection; responses still being read close on ``aclose()``."""
        self._closed = True
        conns = [conn for pool in self._pools.values() for conn in pool]
        self._pools.clear()
        await asyncio.gather(*(conn.abort_and_wait() for conn in conns))

    async def _connect(self, origin: Origin, key: _Key, limit: float) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = upstream_ssl_context()
            context = self._ssl_context
        tunnel = None if self._egress is None else self._egress.tunnel_for(*key)
        # Nothing of the request is written before the connection is up: every failure here says
        # reached_upstream=False. The limit spans TCP connect, the CONNECT exchange and TLS.
        try:
            async with asyncio.timeout(limit):
                if tunnel is None:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, self, key), origin.host, origin.port, ssl=context
                    )
                else:
                    sock = await open_tunnel(loop, tunnel)
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, self, key),
                        sock=sock,
                        ssl=context,
                        server_hostname=origin.host if context is not None else None,
                    )
        except TimeoutError:
            raise UpstreamTimeout("upstream connect timeout", reached_upstream=False) from None
        except OSError as exc:  # refused, unreachable, DNS failure, TLS failure
            raise UpstreamUnavailable(
                f"cannot connect to upstream ({type(exc).__name__})", reached_upstream=False
            ) from exc
        return conn

    def _take(self, key: _Key) -> _Connection | None:
        pool = self._pools.get(key)
        if not pool:
            return None
        now = time.monotonic()
        self._expire(pool, now)
        while pool:
            conn = pool.pop()  # LIFO: the most recently used connection is the least likely stale
            # is_closing(): the upstream's FIN was read but connection_lost() is not delivered yet.
            if not conn.closed and not conn.is_closing():
                if conn.expires_at > now:
                    return conn
                conn.abort()  # past a Keep-Alive timeout shorter than the others'
        return None

    def _release(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        pool = self._pools.get(conn.key)
        if pool is None:
            pool = self._pools[conn.key] = deque()
        keep_for = self._expiry if conn.keep_for is None else min(self._expiry, conn.keep_for)
        if keep_for <= 0:
            conn.abort()  # the upstream keeps it too briefly for a request to arrive in time
            return
        if len(pool) >= self._max_idle:
            pool.popleft().abort()
        now = time.monotonic()
        conn.expires_at = now + keep_for
        pool.append(conn)
        self._expire(pool, now)

    def _expire(self, pool: deque[_Connection], now: float) -> None:
        # Oldest first: those kept for a shorter time than the others are also caught by _take().
        while pool and pool[0].expires_at <= now:
            pool.popleft().abort()
