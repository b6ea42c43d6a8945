"""The lean HTTP/1.1 client the benchmark sends its requests with.

A minimal client on httptools rather than aiohttp's, because a full client's own cost per request
would drown what the proxy adds. A ``Target`` is one route's request, built once as bytes; a
``Connection`` is one keep-alive connection carrying one request at a time, which stamps every
parser event with the time of the read that delivered it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools


class IncompleteResponse(ConnectionError):
    """The connection closed before the response ended."""


@dataclass(frozen=True, slots=True)
class Target:
    """One route: where to connect and the request to send, as the bytes written each time."""

    name: str
    url: str
    host: str
    port: int
    tls: bool
    payload: bytes

    @classmethod
    def build(
        cls,
        name: str,
        base_url: str,
        token: str | None,
        method: str,
        endpoint: str,
        body: bytes | None,
    ) -> Target:
        parts = urlsplit(base_url)
        if parts.username is not None or parts.password is not None:
            # Never sent (the token is the credential), and the report shows the URL: refused
            # without repeating it.
            raise ValueError(
                f"the {name} route's URL holds a user name or password, which is not sent;"
                " give the token in BENCHMARK_TOKEN / BENCHMARK_COMPARE_TOKEN"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        try:
            # The form the resolver is given and Host carries; a name without one (an empty or
            # over-long label) would otherwise fail every connection attempt with a traceback.
            hostname = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"not a valid host name: {parts.hostname!r}") from None
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = f"[{hostname}]" if ":" in hostname else hostname
        authority = host if parts.port is None else f"{host}:{port}"
        target = parts.path.rstrip("/") + "/" + endpoint.lstrip("/")
        lines = [
            f"{method.upper()} {target} HTTP/1.1",
            f"Host: {authority}",
            "User-Agent: llm-proxy-benchmark",
            "Accept: */*",
        ]
        if token:
            lines.append(f"Authorization: Bearer {token}")
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        url = f"{parts.scheme}://{authority}{target}"
        return cls(name, url, hostname, port, tls, head + (body or b""))


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keep_chunks: bool, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._keep_chunks = keep_chunks
        self._keep_alive = True
        self._framed = False  # Content-Length or Transfer-Encoding: else the body ends at EOF
        self._now = 0.0
        self.open = False
        self.status = 0
        self.end_at = self.headers_at = self.first_body_at = 0.0
        self.chunk_times: list[float] = []
        self.server_timing: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.open = True

    def data_received(self, data: bytes) -> None:
        # One clock read per read(2): every event parsed from it happened at that moment.
        self._now = time.perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A 101: the answer is that status, and the connection speaks another protocol now.
            self.end_at = self._now
            self._finish(None)
            self.close()
        except httptools.HttpParserError as exc:
            self._finish(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._finish(exc or IncompleteResponse("connection closed before the response ended"))

    def eof_received(self) -> None:
        # A response without framing ends where the server closes (HTTP/1.0's way), and httptools
        # has no call for the end of the stream: it is completed here, at the time of the EOF.
        if self.headers_at and not self.end_at and not self._framed:
            self._now = time.perf_counter()
            self.on_message_complete()

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"server-timing":
            self.server_timing.append(value)
        elif name in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        self.headers_at = self._now

    def on_body(self, body: bytes) -> None:
        if not self.first_body_at:
            self.first_body_at = self._now
        if self._keep_chunks:
            self.chunk_times.append(self._now)

    def on_message_complete(self) -> None:
        if self.status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows.
            self.server_timing.clear()
            self._framed = False
            return
        self.end_at = self._now
        if not self._keep_alive:
            self.close()
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)

    def _expire(self) -> None:
        self._finish(TimeoutError("no complete response in time"))
        self.close()

    def close(self) -> None:
        self.open = False
        if self._transport is not None:
            self._transport.close()

    async def exchange(self, payload: bytes) -> float:
        """Send one request and wait for the whole response; return when it was sent."""
        assert self._transport is not None
        self.status = 0
        self._framed = False
        self.end_at = self.headers_at = self.first_body_at = 0.0
        self.chunk_times.clear()
        self.server_timing.clear()
        waiter = self._waiter = self._loop.create_future()
        # A bare timer rather than asyncio.timeout(): no task cancellation on the hot path.
        timer = self._loop.call_later(self._timeout, self._expire)
        started = time.perf_counter()
        self._transport.write(payload)
        try:
            await waiter
        finally:
            timer.cancel()
        return started
