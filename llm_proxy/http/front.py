"""The front door: the one HTTP/1.1 server of every connection, for every request on it.

Every request, whatever its path, is parsed here by one ``httptools`` parser under one policy
(:mod:`llm_proxy.http.policy`): framing is decided once and strictly, a request head must arrive in
time, a body must keep arriving, an idle connection is closed. Each parsed request is then
dispatched on its own: proxy paths to the proxy handler (:class:`~llm_proxy.http.messages.RequestHandler`), control-plane paths
(``/manage``, ``/admin``, ``/health``, ``/ready``, ``/metrics``) to the aiohttp application through
:class:`~llm_proxy.http.control_bridge.ControlPlane`. No other component ever parses, decodes or
decompresses the bytes of a connection, so nothing can be forwarded upstream that this parser did
not frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools
import structlog
from aiohttp import web

from llm_proxy import errors
from llm_proxy.http import policy as http_policy
from llm_proxy.http.control_bridge import ControlPlane, ControlRequest
from llm_proxy.http.exchange_io import NO_BODY, NoBody, RequestBody, ResponseWriter
from llm_proxy.http.messages import SERVER_STOPPING, ProxyRequest, RenderedFields, RequestHandler

log = structlog.get_logger(__name__)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# HTTP/1.1 pipelining: requests sent before the answers to earlier ones. Reading stops while a
# parsed request waits for its turn (as uvicorn does), so the kernel holds the rest and TCP slows
# the client; what one read brought is still parsed whole, up to this many waiting requests.
# Beyond them the connection closes after their answers, and the client sends the rest again on a
# new one, as a pipelining client must (RFC 9112 §9.3.2). Without the two, one connection that
# never read its answers grew the server by ~14 times what it sent, without end.
MAX_WAITING_REQUESTS = 128

# The most bytes of a chunked body that may arrive in reads bringing no byte of its data: chunk
# size lines, their extensions (which the parser skips without a callback, so nothing else counts
# them) and trailer fields. As Node's bound on chunk extensions (CVE-2024-22019): an honest client
# sends a few bytes of framing a chunk.
MAX_CHUNK_FRAMING = 16 * 1024

# SO_LINGER on, with no time: closing the socket resets the connection instead of ending it.
_RESET = struct.pack("ii", 1, 0)
_INT = struct.pack("i", 0)
_BACKLOG = 1024
# How long the stop waits for the answers it cut to end (and submit their exchanges).
CUT_ANSWERS_END_WITHIN = 5.0


class _TooManyWaiting(Exception):
    """Raised in the parser's callback to stop parsing at :data:`MAX_WAITING_REQUESTS`."""


@dataclass(frozen=True, slots=True)
class FrontLimits:
    """How long a client may take, and how much head it may send."""

    head_seconds: float = 30.0  # a request head must arrive whole within this
    keepalive_seconds: float = 75.0  # an idle keep-alive connection is closed after this
    body_seconds: float = 60.0  # the longest gap in a request body, or in reading a response
    # After its first body_seconds, a request body must average this many bytes a second: each
    # byte moves its deadline on by 1/body_min_rate s (Apache's mod_reqtimeout MinRate). 8 kbit/s
    # is below any link an honest client uploads on (GPRS is faster), and still ends a body
    # trickled to hold an upstream connection, and its key's concurrency, for ever.
    body_min_rate: int = 1024
    # After an early answer, how long the rest of a body may pause (all of it within body_seconds).
    linger_seconds: float = 5.0
    max_head_bytes: int = 64 * 1024


class _ParserCallbacks:
    """What the parser calls: the connection's callbacks, except that the target and the header
    fields go straight to the head being parsed (a Python call less per field).

    A callback refuses a request by raising its :class:`~llm_proxy.errors.ProxyError`; the parser
    stops and raises an ``HttpParserCallbackError`` whose ``__context__`` is that error.
    """

    __slots__ = (
        "on_body",
        "on_header",
        "on_headers_complete",
        "on_message_begin",
        "on_message_complete",
        "on_url",
    )

    def __init__(self, conn: FrontProtocol, head: http_policy.HeadFields) -> None:
        self.on_message_begin = conn.on_message_begin
        self.on_url = head.add_url
        self.on_header = head.add
        self.on_headers_complete = conn.on_headers_complete
        self.on_body = conn.on_body
        self.on_message_complete = conn.on_message_complete


def _decoded(value: bytes | None) -> str | None:
    # As header values are decoded for forwarding: the bytes go upstream unchanged (see http1.py).
    return None if value is None else value.decode("utf-8", "surrogateescape")


@dataclass(slots=True)
class _Queued:
    """A parsed request waiting for its answer, or a refusal of what could not be parsed."""

    request: ProxyRequest | ControlRequest | None
    refusal: errors.ProxyError | None
    keep_alive: bool
    head_request: bool
    http10: bool
    body: RequestBody | NoBody


class FrontProtocol(asyncio.Protocol):
    """One client connection. Requests are answered one at a time, in order."""

    def __init__(
        self,
        handler: RequestHandler,
        control: ControlPlane,
        connections: set[FrontProtocol],
        limits: FrontLimits,
        on_data: Callable[[], None] | None = None,
    ) -> None:
        # -- the connection
        self._handler = handler
        self._control = control
        self._connections = connections
        self._limits = limits
        self._on_data = on_data  # called whenever the client sends bytes (busy polling)
        self._loop = asyncio.get_running_loop()
        # -- the request being parsed (its head; its body once the head is complete)
        self._head = http_policy.HeadFields(limits.max_head_bytes)
        self._body: RequestBody | None = None
        self._chunked: RequestBody | None = None  # the body, when chunked (left set after its end)
        self._framing = 0  # bytes of the chunked body's reads that brought none of its data
        self._parser = httptools.HttpRequestParser(_ParserCallbacks(self, self._head))
        self.transport: asyncio.Transport | None = None
        self.keep_alive = True
        self.lost = False
        self.write_paused = False
        self._reading_paused = False
        self._held = False  # reading stopped while a pipelined request waits (see _hold_reading)
        self._drain_waiter: asyncio.Future[None] | None = None
        self._discarding = False  # nothing more is parsed: the connection is being closed
        self._discarded = 0  # bytes that came after that (see _linger)
        # -- timers, swept by FrontSite rather than armed per request (0: not running)
        self.idle_since = 0.0
        self.head_since = 0.0
        self.body_since = 0.0  # the last byte of the request body (or the start of it)
        self.body_started = 0.0  # the start of the body (0 until it is due), less reading pauses
        self._paused_at = 0.0
        # -- serving: one task per connection, waiting on a future between requests
        self._queue: deque[_Queued] = deque()
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None  # set while the task waits for a request
        self._stopping = False
        self._cut_by_stop = False  # closed by the server's stop with its answer unfinished
        self._ending = False  # closing, once the client has taken what was written (see close)

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connections.add(self)
        self.head_since = time.monotonic()  # the first request's head is due like any other

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._connections.discard(self)
        self.idle_since = self.head_since = self.body_since = 0.0
        if self._task is not None and not self._task.done():
            # The client went away (or the stop cut it): stop the upstream request too, or end
            # the wait for a next one.
            self._task.cancel(SERVER_STOPPING if self._cut_by_stop else None)
        if self._body is not None:
            self._body.wake()  # a truncated body must never look complete: its reader is cancelled
            self._body = None
        self._chunked = None
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        # The parser holds this connection's callbacks, and queued requests their bodies, which
        # hold the connection: cycles that only the collector's rare full passes would free, with
        # everything the connection had queued. Nothing is parsed or served any more.
        self._queue.clear()
        self._parser = httptools.HttpRequestParser(None)

    def data_received(self, data: bytes) -> None:
        if self._on_data is not None:
            self._on_data()
        if self._discarding:
            self._discarded += len(data)
            return
        head = self._head
        if not head.complete:
            # The parser keeps the pieces of a field to itself until the field ends, so the fields
            # reach HeadFields' limit only whole: a field that never ends would be held without
            # end. A head's bytes are therefore also counted as they arrive, those of the read it
            # began in excepted (the end of an earlier request may come first in it): the parser
            # holds at most one read more than the limit of a head that never ends.
            head.received += len(data)
            if head.received > head.max_bytes:
                self._parse_past_head_limit(data)
                return
            if head.too_many_fields():
                # Refused before the head ends: a head trickled for its 30 s would hold them.
                self._refuse(http_policy.too_many_fields())
                return
        elif self._chunked is not None:
            self._parse_chunked(data)
            return
        # What _parse() does, without the call: this is every read's way.
        try:
            self._parser.feed_data(data)
            return
        except httptools.HttpParserUpgrade as upgrade:
            end = upgrade.args[0]
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        self._parse_after_upgrade(data, end)

    def _parse(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
            return
        except httptools.HttpParserUpgrade as upgrade:
            end = upgrade.args[0]
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        self._parse_after_upgrade(data, end)

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        if isinstance(exc, httptools.HttpParserCallbackError):
            refusal = exc.__context__
            if isinstance(refusal, _TooManyWaiting):
                self._close_after_waiting()
                return
            if not isinstance(refusal, errors.ProxyError):
                # Not one of ours: a defect in a callback. Say so, and answer rather than hang.
                log.exception("front.parser_callback_failed")
                refusal = errors.ProxyError("Internal error.")
            self._refuse(refusal)
        else:
            self._malformed()

    def _parse_after_upgrade(self, data: bytes, end: int) -> None:
        """An upgrade request ended at ``end``, served as plain HTTP/1.1 (see on_headers_complete),
        and the parser stopped there: what follows is the next request. (Not parsed in an except
        clause, whose exception would become the context of a callback's refusal.)"""
        if not self._discarding:
            self._parse(data[end:])

    def _parse_past_head_limit(self, data: bytes) -> None:
        """Parse a read that takes an unfinished head past the head limit: unless the head ends in
        it, it is refused (every byte counted came after the head began, and none ended it)."""
        head = self._head
        self._parse(data)
        # (A head begun in this read, after the end of that one, starts its count at zero.)
        if not head.complete and head.received > head.max_bytes and not self._discarding:
            self._refuse(errors.HeadTooLarge("Request header fields too large."))

    def _parse_chunked(self, data: bytes) -> None:
        """Parse a read of a chunked body: refused past MAX_CHUNK_FRAMING bytes without data."""
        body = self._chunked
        assert body is not None
        if body.complete:
            self._chunked = None  # what follows it is another request
            self._parse(data)
            return
        received = body.received
        self._parse(data)
        if body.received != received:
            self._framing = 0
        elif not body.complete and not self._discarding:
            self._framing += len(data)
            if self._framing > MAX_CHUNK_FRAMING:
                self._refuse(
                    errors.MalformedRequest(
                        "Chunk extensions or trailer fields too long in the request body."
                    )
                )

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed client sends no further requests

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # Bytes outside a request (a stray CRLF) do not get here, so they keep nobody alive.
        self.idle_since = 0.0
        # A head begun while a request is answered is not late: it is due from the end of the
        # answers ahead of it (see _serve), as nginx times a pipelined head. (_held implies _busy.)
        self.head_since = 0.0 if self._busy else time.monotonic()
        self._head.reset()

    def on_headers_complete(self) -> None:
        if len(self._queue) >= MAX_WAITING_REQUESTS:
            raise _TooManyWaiting
        self.head_since = 0.0
        head = self._head
        head.complete = True
        parser = self._parser
        frame = http_policy.frame_request(head, parser.get_http_version(), parser.get_method())
        if parser.should_upgrade() and (frame.has_body or frame.method == "CONNECT"):
            # Upgrade is ignored, as RFC 9110 §7.8 lets a server (nginx does): the request is
            # served as HTTP/1.1, its Upgrade and the fields Connection names not forwarded. But
            # llhttp leaves the bytes after an upgrade request's head unparsed, as the new
            # protocol's: a body there would be framed by nothing.
            raise errors.MalformedRequest("Protocol upgrades are not supported.")
        keep_alive = parser.should_keep_alive()
        body: RequestBody | NoBody = NO_BODY
        if frame.has_body:
            body = self._body = RequestBody(self, frame.expect_continue)
            if frame.content_length is None:
                self._chunked, self._framing = body, 0
            if not frame.expect_continue:
                self.body_started = time.monotonic()
                if not self._reading_paused:  # (as in on_body)
                    self.body_since = self.body_started
            else:
                self.body_started = 0.0  # due once the client is asked for it
        request: ProxyRequest | ControlRequest
        if head.control:
            request = ControlRequest(
                frame.method,
                frame.target,
                frame.http10,
                head.all_headers,
                frame.content_length,
                body,
            )
        else:
            noted = head.noted
            # Positional: a dataclass __init__ with keywords costs measurably more per request.
            request = ProxyRequest(
                frame.method,
                frame.target,
                head.forwarded(),
                _decoded(noted.get(b"authorization")),
                _decoded(noted.get(b"x-request-id")),
                _decoded(noted.get(b"origin")),
                frame.content_length,
                frame.has_body,
                body,
            )
        self._queue.append(
            _Queued(request, None, keep_alive, frame.method == "HEAD", frame.http10, body)
        )
        if len(self._queue) > 1 or self._busy:
            self._hold_reading()  # it waits behind a request being answered
        self._serve_queue()

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            # The rest of a read is parsed after reading paused (a body over its high-water
            # mark, a request that must wait its turn): the client is not late while the server
            # does not read, so the gap is timed from the resumption (see resume_reading).
            if not self._reading_paused:
                self.body_since = time.monotonic()
            self._body.feed(body)

    def on_message_complete(self) -> None:
        self.body_since = 0.0
        if self._body is not None:
            self._body.end()
            self._body = None

    # -- refusing ------------------------------------------------------------------------------

    def _malformed(self) -> None:
        """The parser found bytes that are not HTTP/1.1."""
        body = self._body
        in_body = body is not None and not body.complete
        self._refuse(
            errors.MalformedRequest(
                "Malformed request body." if in_body else "Malformed HTTP request."
            )
        )

    def _refuse(self, refusal: errors.ProxyError) -> None:
        """Refuse what was parsed, and close: fail the body in progress, or answer after any
        response in flight."""
        self._discard_rest()
        body = self._body
        if body is not None and not body.complete:
            # After the head (a bad chunk, trailer fields over the limit): the request is already
            # being answered and may be streaming its body upstream. Failing the body answers it
            # and aborts that upstream request; the body's end would never come.
            self.keep_alive = False
            body.fail(refusal)
            return
        self._queue.append(_Queued(None, refusal, False, False, False, NO_BODY))
        self._serve_queue()

    def _close_after_waiting(self) -> None:
        """Too many pipelined requests in one read: answer those parsed, then close."""
        self._discard_rest()
        self._queue[-1].keep_alive = False

    def _discard_rest(self) -> None:
        """Parse nothing more: the connection closes after the answers already due."""
        self._discarding = True
        self.head_since = self.body_since = 0.0

    def body_late(self, cutoff: float, min_rate: int) -> bool:
        """The body is behind its minimum rate: fewer bytes than ``min_rate`` a second since its
        first ``body_seconds`` (``cutoff`` is now less those)."""
        body = self._body
        started = self.body_started
        return body is not None and started > 0.0 and started + body.received / min_rate < cutoff

    def body_stalled(self, why: str = "The request body stopped arriving.") -> None:
        """The client is late with the body while the server was reading: answer 408."""
        self.body_since = 0.0
        body = self._body
        if body is not None:
            self._discard_rest()
            self.keep_alive = False
            body.fail(errors.RequestTimeout(why))

    # -- serving -------------------------------------------------------------------------------

    @property
    def _busy(self) -> bool:
        """A request is queued or being answered."""
        return self._task is not None and self._wakeup is None

    def _serve_queue(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set_result(None)
        elif self._task is None:
            self._task = self._loop.create_task(self._serve())

    async def _serve(self) -> None:
        """Answer the queued requests in order, then wait for more while the connection is kept.

        Every request of the connection runs in this one task, so in one ``contextvars`` context:
        a context variable set for a request would carry over to the next one unless reset.
        """
        try:
            while True:
                while self._queue and not self.lost:
                    queued = self._queue.popleft()
                    if self._held and not self._queue:
                        self._release_reading()  # the last waiting request's turn
                    if not await self._answer(queued):
                        return
                    if not self.keep_alive:
                        break  # "Connection: close" was the last word: nothing may follow it
                if self.lost:
                    return
                if not self.keep_alive:
                    if self._discarding:
                        # Refused mid-stream: more bytes may be on their way, and closing on
                        # them would reset the connection and lose the answers just sent.
                        self._linger()
                    else:
                        self.close()
                    return
                if self._head.complete:
                    self.idle_since = time.monotonic()
                else:
                    self.head_since = time.monotonic()  # one begun meanwhile is due from now
                if self._stopping:
                    return
                self._wakeup = self._loop.create_future()
                await self._wakeup
        except asyncio.CancelledError:
            # Not the client leaving (that marks the connection lost first): the server stopping,
            # or a cancellation that escaped a handler. Nothing answers this connection any more,
            # so it closes rather than keep its client waiting for ever (cut by the stop, it is
            # closing already, and its client may still take what was written).
            if not self.lost and not self._cut_by_stop:
                self.abort()
            raise
        finally:
            self._task = self._wakeup = None

    async def _answer(self, queued: _Queued) -> bool:
        """Answer one request; False when the connection is closing."""
        self.keep_alive = queued.keep_alive and self.keep_alive
        writer = ResponseWriter(self, queued.head_request, queued.http10, queued.body)
        request = queued.request
        try:
            if request is None:
                assert queued.refusal is not None
                self.keep_alive = False
                raise queued.refusal
            if isinstance(request, ProxyRequest):
                await self._handler.serve(request, writer)
            else:
                await self._control.serve(request, writer, self)
        except errors.ProxyError as exc:
            if writer.started:
                self.close()
                return False
            await answer_error(writer, exc)
        except Exception:
            log.exception("front.handler_failed")
            if writer.started:
                self.close()
                return False
            await answer_error(writer, errors.ProxyError("Internal error."))
        if not queued.body.complete:
            # Answered before the body was read whole (a refusal): the rest of the body cannot be
            # told from a next request. Let the client finish sending it, then close.
            self._linger()
            return False
        return True

    def _linger(self) -> None:
        """Close after an answer given before the whole request arrived.

        Closing at once with unread bytes would make the kernel reset the connection, and the
        client could lose the answer: end our side, discard what still comes, and close once the
        client stopped sending for ``linger_seconds`` or sent for ``body_seconds`` in all (nginx's
        lingering_timeout and lingering_time). A client sending its whole body before it reads
        the answer is then not cut off mid-send by a reset.
        """
        self._discard_rest()
        transport = self.transport
        if transport is None or self.lost:
            return
        self._held = False
        self.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        give_up = time.monotonic() + self._limits.body_seconds
        self._loop.call_later(
            self._limits.linger_seconds, self._end_linger, self._discarded, give_up
        )

    def _end_linger(self, discarded: int, give_up: float) -> None:
        if self.lost:
            return
        if self._discarded > discarded and time.monotonic() < give_up:
            self._loop.call_later(
                self._limits.linger_seconds, self._end_linger, self._discarded, give_up
            )
        else:
            self.abort()

    def stop_serving(self) -> None:
        """Answer the requests in hand, then end the serving task (the site is stopping)."""
        self._stopping = True
        # The last of them says "Connection: close": a client told nothing sends its next request
        # on this connection as it closes, and has it cut off unanswered.
        if self._queue:
            self._queue[-1].keep_alive = False
        else:
            self.keep_alive = False

    def cut_at_stop(self) -> None:
        """Close a connection whose answer outlived the stop's grace period: its request is
        recorded as cut by the server (``server_stopping``), not as left by its client."""
        self._cut_by_stop = True
        self.close()
        # Its exchange ends now, not when the connection does: a client that stopped reading
        # keeps a closing connection (and the answer's wait for it) for up to body_seconds,
        # long after the server stopped and its events pipeline closed, dropping the event.
        if self._task is not None and not self._task.done():
            self._task.cancel(SERVER_STOPPING)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.lost and not self._ending:
            self.transport.write(data)

    def send_continue(self) -> None:
        """Ask the client for the body it holds back (``Expect: 100-continue``)."""
        self.send(_CONTINUE)
        if self._body is not None:
            self.body_since = self.body_started = time.monotonic()

    async def drain(self) -> None:
        """Wait until the client reads what was written; one that stops reading is dropped."""
        if not self.write_paused or self.lost:
            return
        self._drain_waiter = self._loop.create_future()
        try:
            async with asyncio.timeout(self._limits.body_seconds):
                await self._drain_waiter
        except TimeoutError:
            self.drop()  # close() would wait for the unread bytes to leave, which they never do
            raise asyncio.CancelledError("client stopped reading") from None
        finally:
            self._drain_waiter = None
        if self.lost:
            raise asyncio.CancelledError("client went away")

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.body_since = 0.0  # the server is not reading: the client is not late
            self._paused_at = time.monotonic()
            self.transport.pause_reading()

    def _hold_reading(self) -> None:
        """A parsed request waits behind another: read nothing more until its turn. A request
        body's own flow control cannot resume reading meanwhile."""
        self._held = True
        self.pause_reading()

    def _release_reading(self) -> None:
        self._held = False
        self.resume_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and not self._held and self.transport is not None and not self.lost:
            self._reading_paused = False
            if self._body is not None:
                now = self.body_since = time.monotonic()
                if self.body_started:
                    self.body_started += now - self._paused_at  # the pause is not the client's
            self.transport.resume_reading()

    def close(self) -> None:
        """Close once the client has what was written.

        A socket closed with bytes its client has not taken waits for them as long as it takes:
        for ever in the transport's buffer, for minutes in the kernel's (as an orphan), for a
        client that stopped reading. So until they are taken the connection is only ended (our
        side shut, what still comes discarded), and reset unless the client takes some every
        ``linger_seconds`` and all within ``body_seconds``, as a response it reads.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or self._ending:
            return
        unsent = self._unsent()
        if not unsent or not transport.can_write_eof():
            transport.close()
            return
        self._ending = True
        self.keep_alive = False  # nothing more is answered
        self._discard_rest()
        self.idle_since = 0.0
        self._held = False
        self.resume_reading()  # to see the client's own end, which closes the connection
        transport.write_eof()
        give_up = time.monotonic() + self._limits.body_seconds
        self._loop.call_later(self._limits.linger_seconds, self._drop_unless_read, unsent, give_up)

    def _drop_unless_read(self, unsent: int, give_up: float) -> None:
        if self.lost or self.transport is None:
            return
        left = self._unsent()
        if not left:
            self.transport.close()
        elif left < unsent and time.monotonic() < give_up:
            self._loop.call_later(
                self._limits.linger_seconds, self._drop_unless_read, left, give_up
            )
        else:
            self.drop()

    def _unsent(self) -> int:
        """Bytes written that the client has not acknowledged: in the transport's buffer and, on
        Linux, the kernel's (SIOCOUTQ)."""
        transport = self.transport
        if transport is None:
            return 0
        unsent = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _INT))[0]
        return unsent

    def abort(self) -> None:
        """Close now, dropping whatever the client has not read."""
        if self.transport is not None:
            self.transport.abort()

    def close_late(self) -> None:
        """Close a connection idle or slow for too long: reset it, as nginx's
        reset_timedout_connection, when its client has not taken what it was sent."""
        if self._unsent():
            self.drop()
        else:
            self.close()

    def drop(self) -> None:
        """Reset the connection of a client that stopped reading. (Closed, its socket would be
        left to the kernel, which keeps an orphan's unsent bytes for minutes.)"""
        transport = self.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            transport.abort()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task serving this connection's current request, if any."""
        return self._task if self._busy else None


async def answer_error(writer: ResponseWriter, exc: errors.ProxyError) -> None:
    body = exc.body()
    await writer.respond(exc.status, b"", RenderedFields.of_json(exc.header_fields(), body), body)


class FrontSite(web.BaseSite):
    """An aiohttp site whose connections are served by :class:`FrontProtocol`."""

    __slots__ = ("_connections", "_grace", "_handler", "_limits", "_on_data", "_sock", "_sweeper")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        handler: RequestHandler,
        *,
        limits: FrontLimits = FrontLimits(),
        grace_seconds: float = 10.0,
        on_data: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(runner)
        self._on_data = on_data
        self._grace = grace_seconds
        self._limits = limits
        self._sock = sock
        self._sweeper: asyncio.Task[None] | None = None
        self._handler = handler
        self._connections: set[FrontProtocol] = set()

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def _sweep(self) -> None:
        """Close connections idle too long or slow with a head; fail bodies that stopped coming."""
        limits = self._limits
        # At most a second late (a fifth of the shortest limit, as before, gave the 30 s head
        # limit 6 s of slack): a pass costs ~0.1 µs a connection, 1 ms a second for 10,000.
        shortest = min(limits.keepalive_seconds, limits.head_seconds, limits.body_seconds)
        period = min(shortest / 5, 1.0)
        while True:
            await asyncio.sleep(period)
            self._sweep_once(time.monotonic())

    def _sweep_once(self, now: float) -> None:
        # (A function of its own: a loop variable left in the sleeping coroutine would keep the
        # last connection it saw, closed or not, alive until the next pass.)
        limits = self._limits
        idle_cutoff = now - limits.keepalive_seconds
        head_cutoff = now - limits.head_seconds
        body_cutoff = now - limits.body_seconds
        for conn in list(self._connections):
            if 0.0 < conn.idle_since < idle_cutoff or 0.0 < conn.head_since < head_cutoff:
                conn.close_late()
            elif 0.0 < conn.body_since < body_cutoff:
                conn.body_stalled()
            elif conn.body_since > 0.0 and conn.body_late(body_cutoff, limits.body_min_rate):
                conn.body_stalled("The request body is arriving too slowly.")

    async def start(self) -> None:
        # Listening here, so that a failure raises (another process listening on the port this
        # socket was bound to): given the socket, uvloop reports it to the loop's exception
        # handler and serves nothing.
        self._sock.listen(_BACKLOG)
        await super().start()
        self._sweeper = asyncio.create_task(self._sweep())
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        control = ControlPlane(server)
        handler, connections, limits, on_data = (
            self._handler,
            self._connections,
            self._limits,
            self._on_data,
        )
        self._server = await loop.create_server(
            lambda: FrontProtocol(handler, control, connections, limits, on_data),
            sock=self._sock,
            backlog=_BACKLOG,
        )

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), then close every connection."""
        await super().stop()
        for conn in list(self._connections):
            conn.stop_serving()
            if conn.task is None:
                conn.close()
        in_flight = [c.task for c in self._connections if c.task is not None]
        try:
            if in_flight:
                log.info(
                    "server.waiting_for_requests",
                    requests=len(in_flight),
                    grace_seconds=self._grace,
                )
                await asyncio.wait(in_flight, timeout=self._grace)
        finally:
            # Only now: while the stop waits, a body that stops arriving is still answered 408,
            # not left to hold the stop for the whole grace.
            if self._sweeper is not None:
                self._sweeper.cancel()
        cut = []
        for conn in list(self._connections):
            if conn.task is not None and not conn.task.done():
                cut.append(conn.task)
                conn.cut_at_stop()
            else:
                conn.close()
        if cut:
            log.warning("server.requests_cut", requests=len(cut), grace_seconds=self._grace)
            # Their exchanges end (and are submitted) before the events pipeline closes. Not the
            # grace again: a cancelled answer ends at once, and what follows the grace (events,
            # usage) must fit in the platform's stop timeout beside it.
            await asyncio.wait(cut, timeout=CUT_ANSWERS_END_WITHIN)


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
