"""Holds back the last bytes of a tpm-limited answer until its mark is written.

A tpm-limited answer's tokens reach its token's window only once its event is settled, after the
client has the answer; the next request, on any process or instance, waits while the token has
answers marked and not settled (see ``rate_limits.py``). So the mark must be in place before the
client can have the whole answer: before a body's last bytes, a chunked body's terminator, or an
event stream's last event (``data: [DONE]``, or a Responses stream's terminal event, where SDKs
stop reading). Only answers of tpm-limited tokens go through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from llm_proxy.http.messages import ResponseWriter

# Where SDKs stop reading a stream: the chat stream's end, a Responses stream's terminal events.
_STREAM_ENDS = (b"[DONE]", b"response.completed", b"response.incomplete", b"response.failed")


def ends_stream(chunk: bytes) -> bool:
    """Whether ``chunk`` may hold a stream's last event (erring towards yes, which only marks the
    answer a little early)."""
    return any(end in chunk for end in _STREAM_ENDS)


class AnswerGate:
    """Relays an answer's chunks to ``writer``, holding back its end until ``mark()`` returned.

    Chunks go on at once until one may end the answer: a stream's last event, or the chunk that
    completes a body of known ``length``. A body without one ends with its chunked terminator,
    written after :meth:`before_end`.
    """

    __slots__ = ("_held", "_left", "_mark", "_marking", "_stream", "_writer")

    def __init__(
        self,
        writer: ResponseWriter,
        mark: Callable[[], Awaitable[None]],
        *,
        stream: bool,
        length: int | None,
    ) -> None:
        self._writer = writer
        self._mark = mark
        self._stream = stream
        self._left = length  # the bytes of the body still to come, when its length is known
        self._held: list[bytes] = []
        self._marking: asyncio.Future[None] | None = None  # once the mark is asked for
        # (the mark's call swallows its failures: an answer is never kept from its client)

    def push(self, chunk: bytes) -> bool:
        """``writer.push`` that holds back what may end the answer: False when ``drain`` is due."""
        if self._marking is not None:
            if not self._marking.done():
                self._held.append(chunk)
                return False
            return self._writer.push(chunk)
        if self._left is not None:
            self._left -= len(chunk)
            last = self._left <= 0
        else:
            last = self._stream and ends_stream(chunk)
        if last:
            self._marking = asyncio.ensure_future(self._mark())
            self._held.append(chunk)
            return False
        return self._writer.push(chunk)

    async def drain(self) -> None:
        if self._marking is not None:
            await self._let_held_go()
        await self._writer.drain()

    async def before_end(self) -> None:
        """Write the mark, if not yet, then what was held: the body ended upstream."""
        if self._marking is None:
            self._marking = asyncio.ensure_future(self._mark())
        await self._let_held_go()

    async def _let_held_go(self) -> None:
        assert self._marking is not None
        await self._marking
        held, self._held = self._held, []
        for chunk in held:
            self._writer.push(chunk)
