"""The upstream client interface the proxy path talks through.

The proxy never touches an HTTP client library directly: it calls :class:`UpstreamClient`, so the
implementation can be swapped for a leaner one without changing the proxy (see ``http1.py``).
Failures are reported only as :class:`~llm_proxy.errors.UpstreamUnavailable` (connection refused,
reset, dropped mid-body, egress proxy unreachable or refusing CONNECT) or
:class:`~llm_proxy.errors.UpstreamTimeout` (connect, response header or idle timeout), with messages
that never carry a header value or a proxy credential.

Both carry ``reached_upstream: bool``. False means not one byte of the request was written towards
the upstream (DNS failure, refused or timed-out connect, TLS failure, egress proxy unreachable or
refusing CONNECT): the upstream certainly never saw the request, so it need not be counted against
a quota. True means the request may have reached the upstream, even if no answer came back.

A request is sent at most once: a client may retry on a fresh connection only when not one byte of
the request was written.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

Body = bytes | AsyncIterable[bytes] | None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. There is deliberately no total timeout: a stream may run as long as it keeps moving."""

    connect: float = 10.0
    response_header: float = 60.0
    idle: float = 300.0


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host and port of an upstream base URL, plus its path prefix."""

    scheme: str
    host: str
    port: int
    path_prefix: str = ""

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if parts.port == 0:
            raise ValueError("port 0 cannot be connected to")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    # The Host header value, computed once: it is sent with every request.
    host_header: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        default = 443 if self.scheme == "https" else 80
        # An IPv6 address is bracketed in an authority (RFC 3986), as the URL wrote it.
        host = f"[{self.host}]" if ":" in self.host else self.host
        host = host if self.port == default else f"{host}:{self.port}"
        object.__setattr__(self, "host_header", host.encode("utf-8", "surrogateescape"))


class UpstreamResponse(Protocol):
    """A response whose head has arrived; its body is relayed (or taken whole when it came along)."""

    status: int
    reason: bytes
    headers: Sequence[tuple[bytes, bytes]]  # as received, undecoded

    async def relay(
        self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]
    ) -> None:
        """Hand the body chunks to ``sink`` as they arrive (transfer coding removed, content coding
        left as sent), and return at the end.

        ``sink`` runs in the client's own receive path, so it must not block or raise; it returns
        False when its reader is behind, and then no more is read until ``drain()`` returns.
        """
        ...

    async def aclose(self) -> None:
        """Return the connection to the pool if the body was fully read, else close it."""
        ...

    def keep_alive_hint(self, value: bytes) -> None:
        """The upstream's ``Keep-Alive`` field: its ``timeout`` bounds how long the connection is
        kept idle for another request."""
        ...

    def discard(self) -> None:
        """Close the connection, even when the whole body arrived: the answer was refused, and
        a framing the proxy found ambiguous must not carry the next request's answer."""
        ...

    def complete_body(self) -> bytes | None:
        """The whole body if it has already arrived (and then the connection is released as at the
        end of a relay), else None: relay it."""
        ...


class UpstreamClient(Protocol):
    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: Body,
        timeouts: Timeouts,
        on_sent: Callable[[], object] | None = None,
    ) -> UpstreamResponse:
        """Send a request and return once the response head arrived; ``on_sent`` is called once
        the whole request is written (a request cancelled before then never reached the upstream).

        ``target`` is the path and query to send (``origin.path_prefix`` already applied).
        ``headers`` are sent as given, except that the client adds ``Host`` when absent and sets
        ``Content-Length`` for a ``bytes`` body or ``Transfer-Encoding: chunked`` for an iterable one
        when the caller gave no ``Content-Length``.
        """
        ...

    async def close(self) -> None: ...
