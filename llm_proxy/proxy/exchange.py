"""What the proxy path records about one request, handed off after the response ended.

Filling an :class:`Exchange` costs the request a few attribute stores and list appends of chunk
references it already holds; everything else (decompressing, parsing, reassembling streams, counting
tokens, building the instrumentation event) happens later, off the request path, in whatever
:class:`ExchangeSink` the application installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llm_proxy.http.messages import SERVER_STOPPING

# How much of a long answer's end is kept past its captured head: a chat answer's or Responses
# stream's `usage` object and what may follow it (a Responses object's `user`, `metadata`), with room.
RESPONSE_TAIL_BYTES = 64 * 1024
# How many pieces of a body a capture keeps before it joins them into one.
_MOST_PIECES = 1024


class CappedBuffer:
    """Keeps references to the first ``limit`` bytes of a body that flows past; copies only a body
    that comes in very many pieces, to join them.

    With a ``tail_limit``, it also keeps about the last ``tail_limit`` bytes beyond the first
    ``limit`` (at least that many, in whole chunks), as ``tail``: a long answer's ``usage`` comes
    at its end (the last chunk of a stream, the end of a JSON answer), past any head a capture
    can afford to keep.
    """

    __slots__ = (
        "chunks",
        "limit",
        "size",
        "skipped",
        "tail_chunks",
        "tail_limit",
        "tail_size",
        "truncated",
    )

    def __init__(self, limit: int, tail_limit: int = 0) -> None:
        self.limit = limit
        self.size = 0
        self.truncated = False
        self.chunks: list[bytes] = []
        self.tail_limit = tail_limit
        self.tail_chunks: list[bytes] | None = None  # made when the first byte past the head comes
        self.tail_size = 0
        self.skipped = 0  # bytes that passed between the head and the tail, kept by neither

    def add(self, chunk: bytes) -> None:
        if self.size >= self.limit:
            self.truncated = True
            if self.tail_limit:
                self._keep_tail(chunk)
            return
        room = self.limit - self.size
        if len(chunk) > room:
            if self.tail_limit:
                self._keep_tail(chunk[room:])
            chunk = chunk[:room]
            self.truncated = True
        chunks = self.chunks
        chunks.append(chunk)
        self.size += len(chunk)
        if len(chunks) >= _MOST_PIECES:
            # A body sent in tiny pieces (a chunked upload of 2-byte chunks) would cost ~20 times
            # its bytes in objects: joined, they cost their bytes. Copies at most ``limit`` per
            # _MOST_PIECES pieces, far less than parsing those pieces took.
            self.chunks = [b"".join(chunks)]

    def _keep_tail(self, chunk: bytes) -> None:
        tail = self.tail_chunks
        if tail is None:
            tail = self.tail_chunks = []
        tail.append(chunk)
        self.tail_size += len(chunk)
        while self.tail_size - len(tail[0]) >= self.tail_limit:
            dropped = len(tail.pop(0))
            self.tail_size -= dropped
            self.skipped += dropped
        if len(tail) >= _MOST_PIECES:
            self.tail_chunks = [b"".join(tail)]  # as in add(): pieces cost more than their bytes

    def getvalue(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def tail(self) -> bytes:
        """The bytes kept past the head (empty unless a ``tail_limit`` was given and passed)."""
        return b"".join(self.tail_chunks) if self.tail_chunks else b""

    @property
    def passed(self) -> int:
        """The bytes of the whole body that flowed past, kept or not (with a ``tail_limit``;
        without one, those past the head are not counted)."""
        return self.size + self.skipped + self.tail_size

    @classmethod
    def of(
        cls, data: bytes, limit: int, truncated: bool, tail: bytes = b"", skipped: int = 0
    ) -> CappedBuffer:
        buffer = cls(limit, len(tail))
        buffer.skipped = skipped
        buffer.chunks = [data] if data else []
        buffer.size = len(data)
        buffer.truncated = truncated
        if tail:
            buffer.tail_chunks = [tail]
            buffer.tail_size = len(tail)
        return buffer


@dataclass(slots=True, eq=False)
class Exchange:
    """One proxied request. Times are ``time.perf_counter()`` values except ``started_at``."""

    request_id: str
    started_at: float  # wall clock, time.time(), for the event timestamp
    started: float  # perf_counter at arrival
    method: str
    path: str  # normalised path, no query
    project_id: str
    token_id: str
    request_body: CappedBuffer
    response_body: CappedBuffer
    status: int = 0
    response_content_type: str = ""
    response_content_encoding: str = ""
    upstream_started: float = 0.0  # perf_counter when the upstream request was sent
    upstream_headers_at: float = 0.0  # perf_counter when the upstream response head arrived
    first_byte_at: float = 0.0  # perf_counter when the first body byte went to the client
    ended: float = 0.0  # perf_counter when the response ended (or failed)
    error: str | None = None  # an error ``code`` when the proxy answered with an error or aborted
    # The connection ended before the answer was whole: its client left, or the server's stop cut
    # it (``error`` is then ``server_stopping``).
    client_disconnected: bool = False
    # The proxy asked upstream for stream usage the client did not ask for.
    usage_injected: bool = False
    upstream_request_id: str | None = None  # the upstream's own x-request-id, when it sent one
    # The whole request was written to the upstream (kept for tokens that settle: see handler.py).
    request_sent: bool = False
    # The project's upstream key, set once the upstream answered: some upstreams quote the key
    # they refused, whole, others echo the request, and one not shaped like an OpenAI key would
    # pass the masking of key-shaped text (events/bodies.py). Masked in the event; never shown
    # or kept.
    upstream_key_to_mask: bytes = field(default=b"", repr=False)
    # The mark of a tpm-limited answer, made before its last bytes went out, removed when its
    # tokens are recorded (see rate_limits.py); empty when none was made.
    answer_mark: str = ""
    # The token has a tpm window: its settled tokens are recorded once the usage is known.
    tpm_limited: bool = False
    # The budget hold of a budgeted token's request, settled once the usage is known.
    hold_id: str = ""
    held_nanousd: int = 0
    # Bytes of the request body left out on the way to the events process, which was behind.
    request_bytes_shed: int = 0
    # The fields above are sent to the events process in their order (``to_wire``); those below
    # stay in the server.
    # A stream's ``data: [DONE]`` was relayed before the client left: its answer was whole.
    answered_whole: bool = False

    @property
    def is_stream(self) -> bool:
        return self.response_content_type.startswith("text/event-stream")

    def mark_sent(self) -> None:
        self.request_sent = True

    @property
    def left_by_client(self) -> bool:
        """The client itself hung up before its answer was whole (not cut by the server's stop)."""
        return self.client_disconnected and self.error != SERVER_STOPPING

    @property
    def left_before_answer(self) -> bool:
        """The connection ended after the whole request went upstream and before the answer
        began: the upstream may have produced all of it, which nobody will see."""
        return self.client_disconnected and self.request_sent and not self.status

    @property
    def captured_bytes(self) -> int:
        """The bytes of both bodies this exchange holds (what the events queues are bounded by)."""
        return self.request_body.size + self.response_body.size + self.response_body.tail_size

    @property
    def settles(self) -> bool:
        """Whether its usage must reach the token's tpm window or budget hold."""
        return self.tpm_limited or bool(self.hold_id)

    def to_wire(self) -> Wire:
        """Plain values for sending to another process: pickling the dataclass and its buffers
        field by field cost several times more than the event build itself."""
        req, resp = self.request_body, self.response_body
        return (
            self.request_id, self.started_at, self.started, self.method, self.path,
            self.project_id, self.token_id,
            req.getvalue(), req.limit, req.truncated,
            resp.getvalue(), resp.limit, resp.truncated, resp.tail, resp.skipped,
            self.status, self.response_content_type, self.response_content_encoding,
            self.upstream_started, self.upstream_headers_at, self.first_byte_at, self.ended,
            self.error, self.client_disconnected, self.usage_injected, self.upstream_request_id,
            self.request_sent, self.upstream_key_to_mask, self.answer_mark,
            self.tpm_limited, self.hold_id, self.held_nanousd, self.request_bytes_shed,
        )  # fmt: skip

    @classmethod
    def from_wire(cls, wire: tuple[Any, ...]) -> Exchange:
        (
            request_id, started_at, started, method, path, project_id, token_id,
            req, req_limit, req_truncated, resp, resp_limit, resp_truncated, resp_tail,
            resp_skipped, *rest,
        ) = wire  # fmt: skip
        return cls(
            request_id, started_at, started, method, path, project_id, token_id,
            CappedBuffer.of(req, req_limit, req_truncated),
            CappedBuffer.of(resp, resp_limit, resp_truncated, resp_tail, resp_skipped),
            *rest,
        )  # fmt: skip


Wire = tuple[Any, ...]
# Where ``to_wire`` puts what the server's offload reads while exchanges wait (``offload.py``).
_WIRE_REQUEST_ID = 0
_WIRE_TOKEN_ID = 6
_WIRE_REQUEST_BODY = 7
_WIRE_RESPONSE_BODY = 10
_WIRE_RESPONSE_TAIL = 13
_WIRE_TPM_LIMITED = -4
_WIRE_HOLD_ID = -3


def wire_captured_bytes(wire: Wire) -> int:
    """``Exchange.captured_bytes`` of the exchange ``wire`` was made from."""
    return (
        len(wire[_WIRE_REQUEST_BODY])
        + len(wire[_WIRE_RESPONSE_BODY])
        + len(wire[_WIRE_RESPONSE_TAIL])
    )


def wire_settles(wire: Wire) -> bool:
    """``Exchange.settles`` of the exchange ``wire`` was made from."""
    return bool(wire[_WIRE_TPM_LIMITED] or wire[_WIRE_HOLD_ID])


def wire_settlement(wire: Wire) -> tuple[str, str]:
    """The token id and request id of the exchange ``wire`` was made from."""
    return wire[_WIRE_TOKEN_ID], wire[_WIRE_REQUEST_ID]


def wire_without_request_body(wire: Wire) -> Wire:
    """``wire`` with the captured request body left out, saying how long it was (the last
    field): what an event needs to count usage and settle is the answer's."""
    body = wire[_WIRE_REQUEST_BODY]
    limit = wire[_WIRE_REQUEST_BODY + 1]
    return (*wire[:_WIRE_REQUEST_BODY], b"", limit, False, *wire[_WIRE_RESPONSE_BODY:-1], len(body))


class SettlementListener(Protocol):
    """Told which exchanges went to be settled, and which are settled or never will be (see
    ``settling.py``)."""

    def expect(self, token_id: str, request_id: str) -> None: ...

    def settled(self, requests: Iterable[Sequence[str]]) -> None: ...


class ExchangeSink(Protocol):
    def submit(self, exchange: Exchange) -> None:
        """Take a finished exchange. Must not block and must not raise."""
        ...
