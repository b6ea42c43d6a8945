"""Usage aggregates backend: a batch of events becomes per-(token, hour) rows, added in one write.

It runs inside the server process on the server's own store (see
:func:`dispatcher.embedded.start_usage_aggregation`), so the request path never waits on it. A
store failure propagates to the worker, which retries the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from dispatcher.backends import Rejection
from llm_proxy.events.event import Event, parse_rfc3339
from llm_proxy.models import UsageRollup, hour_start
from llm_proxy.store import Store


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"not a token count: {value!r}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"not an id: {value!r}")
    return value


@dataclass(slots=True)
class _Tally:
    project_id: str
    last_used_at: datetime
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    errors: int = 0


def fold(events: Sequence[Event]) -> tuple[list[UsageRollup], dict[int, Rejection]]:
    """Sum ``events`` by token and clock hour; events that cannot be counted are refused by index.

    An event is an error when it carries one (the proxy's own, or the client going away) or its
    status is 4xx/5xx. ``last_used_at`` is when the request started, as for the token itself.
    """
    tallies: dict[tuple[str, datetime], _Tally] = {}
    refused: dict[int, Rejection] = {}
    for index, event in enumerate(events):
        try:
            token_id = _text(event["token_id"])
            project_id = _text(event["project_id"])
            at = datetime.fromtimestamp(parse_rfc3339(event["timestamp"]), UTC)
            usage = event["usage"]
            prompt = _count(usage["prompt_tokens"]) if usage else 0
            completion = _count(usage["completion_tokens"]) if usage else 0
            total = _count(usage["total_tokens"]) if usage else 0
            failed = event["error"] is not None or event["status"] >= 400
        except (KeyError, TypeError, ValueError) as exc:
            # Retrying cannot make it countable; the worker dead-letters it.
            refused[index] = Rejection(f"cannot count usage: {exc!r}", retryable=False)
            continue
        tally = tallies.setdefault((token_id, hour_start(at)), _Tally(project_id, at))
        tally.requests += 1
        tally.prompt_tokens += prompt
        tally.completion_tokens += completion
        tally.total_tokens += total
        tally.errors += int(failed)
        tally.last_used_at = max(tally.last_used_at, at)
    rows = [
        UsageRollup(
            token_id=token_id,
            project_id=t.project_id,
            hour=hour,
            requests=t.requests,
            prompt_tokens=t.prompt_tokens,
            completion_tokens=t.completion_tokens,
            total_tokens=t.total_tokens,
            errors=t.errors,
            last_used_at=t.last_used_at,
        )
        for (token_id, hour), t in tallies.items()
    ]
    return rows, refused


class UsageBackend:
    name = "usage"

    def __init__(self, store: Store) -> None:
        self._store = store

    async def start(self) -> None:
        """Nothing to open: the store belongs to the application, which opens and closes it."""

    async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
        rows, refused = fold(events)
        if rows:
            await self._store.add_usage_rollup(rows)
        return refused

    async def close(self) -> None:
        """Nothing to release (see :meth:`start`)."""
