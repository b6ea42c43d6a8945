"""What the front door hands a request handler, and how a handler answers (the HTTP-side types).

The front door parses a request into a :class:`ProxyRequest` (or a control-plane request) and
gives a :class:`ResponseWriter` for the answer; the proxy path implements :class:`RequestHandler`.
The types live here, under the HTTP machinery, so that the server depends on no handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

# The message a serving task is cancelled with when the server, stopping, closes a connection
# whose answer outlived the grace period: the request was cut by the server, not left by its client.
SERVER_STOPPING = "server_stopping"


class BodySource(Protocol):
    """The request body as it arrives from the client."""

    async def read_exactly(self, size: int) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def raise_failure(self) -> None:
        """Raise what the body already failed with (a framing error, a stalled client), if any."""


@dataclass(slots=True)
class ProxyRequest:
    """One request as the handler needs it: the server picks out the few headers the proxy reads.

    ``headers`` are the client's header fields to forward, as received (the front door leaves out
    those never forwarded); the handler appends its own to that list. The three named headers hold their first
    value, or None (Authorization: its values combined, when it came more than once).
    """

    method: str
    target: str  # path and query exactly as received (origin form)
    headers: list[tuple[bytes, bytes]]
    authorization: str | None
    request_id: str | None  # X-Request-ID
    origin: str | None
    content_length: int | None
    has_body: bool
    body: BodySource


class RenderedFields:
    """Response header fields as the bytes of their lines, and whether they frame the body.

    A relay that looks at each upstream field anyway renders the head in that one pass, telling
    the writer which of the fields it needs are there, instead of having it look at each again;
    other answers render theirs with :meth:`of`.
    """

    __slots__ = ("has_date", "has_length", "lines", "secret")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.has_length = False  # a Content-Length field is among the lines
        self.has_date = False  # a Date field is among the lines
        # Bytes that must not leave in the head (an upstream may echo the project's key in a
        # field): masked, their length kept, wherever the rendered head holds them.
        self.secret = b""

    @classmethod
    def of(cls, headers: list[tuple[bytes, bytes]]) -> RenderedFields:
        rendered = cls()
        for name, value in headers:
            rendered.add(name, value)
        return rendered

    @classmethod
    def of_json(cls, headers: list[tuple[bytes, bytes]], body: bytes) -> RenderedFields:
        """The head of a JSON answer of the proxy's own: ``headers``, its type and its length."""
        rendered = cls.of(headers)
        rendered.lines += (b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),)
        rendered.has_length = True
        return rendered

    def add(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-length":
            self.has_length = True
        elif lower == b"date":
            self.has_date = True
        self.lines += (name, b": ", value, b"\r\n")


class ResponseWriter(Protocol):
    async def start(
        self, status: int, reason: bytes, head: RenderedFields, *, stream: bool
    ) -> None:
        """Send (``stream``) or hold (otherwise, to leave with the first chunk) the head."""
        ...

    def retract(self) -> bool:
        """Take back a head held for the first chunk (``start`` not streamed): True when nothing of
        the answer was sent, and another may be given in its place."""
        ...

    async def write(self, chunk: bytes) -> None: ...

    def push(self, chunk: bytes) -> bool:
        """``write`` without waiting: False when the client is behind and ``drain`` is due."""
        ...

    async def drain(self) -> None: ...

    async def finish(self) -> None: ...

    async def respond(self, status: int, reason: bytes, head: RenderedFields, body: bytes) -> None:
        """A whole response at once: ``start`` (not streamed), ``write`` and ``finish`` in one."""
        ...

    def abort(self) -> None:
        """End the response as visibly incomplete: close the connection."""
        ...


class RequestHandler(Protocol):
    """Answers one proxy-path request (:class:`~llm_proxy.proxy.handler.ProxyHandler`)."""

    async def serve(self, request: ProxyRequest, writer: ResponseWriter) -> None: ...
