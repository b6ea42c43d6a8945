"""Dispatcher backends: where events end up (JSONL file, Helicone, CloudWatch Logs, Lunary).

A backend sends a batch and reports per event whether it was refused; the worker acknowledges what
was accepted, dead-letters permanent refusals and retries the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llm_proxy.events.event import Event


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    retryable: bool


class BackendError(Exception):
    """The whole batch failed."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.rejection = Rejection(reason, retryable)


class Backend(Protocol):
    name: str

    async def start(self) -> None:
        """Open connections and create what must exist (files, log groups)."""
        ...

    async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
        """Deliver ``events``; return the refused ones by index. Raises :class:`BackendError` when
        the whole batch failed."""
        ...

    async def close(self) -> None: ...
