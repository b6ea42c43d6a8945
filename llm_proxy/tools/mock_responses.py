"""The mock upstream's Responses API (``POST /v1/responses``): the response object, and the events
a streamed one is sent as, in OpenAI's order and shapes.

A streamed response is a sequence of named SSE events (``event: <type>``), each numbered by
``sequence_number``, with no ``[DONE]`` at the end: ``response.created`` and
``response.in_progress`` (the response, without output or usage yet), the message added
(``response.output_item.added``, ``response.content_part.added``), its text in
``response.output_text.delta`` events, the same closed (``.done`` events carrying the whole
text), and last the whole response with its usage: ``response.completed``, or
``response.incomplete`` when ``max_output_tokens`` cut it short.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class MockResponse:
    """One answer of the Responses API."""

    id: str
    message_id: str
    model: str
    created_at: int
    pieces: list[str]  # the text, one piece per delta
    finish: str  # "stop", or "length" when max_output_tokens cut it short
    prompt_tokens: int

    @property
    def _status(self) -> str:
        return "completed" if self.finish == "stop" else "incomplete"

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def _message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "status": status,
            "content": content,
            "role": "assistant",
        }

    def body(self, *, finished: bool = True) -> dict[str, Any]:
        """The response object: as finally answered, or as it starts (in progress, no output)."""
        if finished:
            output = [self._message(self._status, [self._part("".join(self.pieces))])]
            completion = len(self.pieces)
            usage: dict[str, Any] | None = {
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + completion,
            }
        else:
            output, usage = [], None
        incomplete = finished and self.finish != "stop"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self._status if finished else "in_progress",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        }

    def events(self) -> Iterator[dict[str, Any] | None]:
        """The streamed answer's events; a ``None`` stands for the pause before each delta."""
        numbers = itertools.count()
        place = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        text = "".join(self.pieces)

        def event(kind: str, **fields: Any) -> dict[str, Any]:
            return {"type": kind, "sequence_number": next(numbers), **fields}

        started = self.body(finished=False)
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        yield event(
            "response.output_item.added",
            output_index=0,
            item=self._message("in_progress", []),
        )
        yield event("response.content_part.added", **place, part=self._part(""))
        for piece in self.pieces:
            yield None
            yield event("response.output_text.delta", **place, delta=piece, logprobs=[])
        yield event("response.output_text.done", **place, text=text, logprobs=[])
        yield event("response.content_part.done", **place, part=self._part(text))
        yield event(
            "response.output_item.done",
            output_index=0,
            item=self._message(self._status, [self._part(text)]),
        )
        yield event(f"response.{self._status}", response=self.body())
