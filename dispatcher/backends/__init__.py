"""Dispatcher backends: where events end up (JSONL file, Helicone, CloudWatch Logs, Lunary).

A backend sends a batch and reports per event whether it was refused; the worker acknowledges what
was accepted, dead-letters permanent refusals and retries the rest. A refusal of the dispatcher's
credentials (``auth``) is neither: no event can get through until an operator fixes them, so the
worker stops and leaves the events on the bus.
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
    # The backend refused the credentials (HTTP 401/403, Lunary's 402, an AWS authentication error). The reason
    # then holds only the status or error code: a service may echo the credentials it refused.
    auth: bool = False
    # Seconds the service asked to wait before the next attempt (Retry-After), if it did.
    retry_after: float | None = None
    # The backend raised rather than answered: a bug, or an event it cannot render (one written
    # by another version); tried a few times, not for ever (see ``worker.py``).
    raised: bool = False


class BackendError(Exception):
    """The whole batch failed (or, raised by ``start``, the backend refused the credentials)."""

    def __init__(
        self, reason: str, *, retryable: bool, auth: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.rejection = Rejection(reason, retryable, auth, retry_after)


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
