"""Usage aggregates backend: a batch of events becomes per-(token, hour) rows, added in one write.

It runs inside the server process on the server's own store (see
:func:`dispatcher.embedded.start_usage_aggregation`), so the request path never waits on it. A
store failure propagates to the worker, which retries the batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from dispatcher.backends import Rejection
from llm_proxy.events.courtesy import courteously
from llm_proxy.events.event import Event, parse_rfc3339, rfc3339
from llm_proxy.models import UsageRollup, hour_start, nanousd
from llm_proxy.store import Store
from llm_proxy.store.unavailable import CommitInDoubt


# The checks below compare exact types (what a JSON parser makes): a bool is not a count, and one
# comparison costs less than two isinstance calls, per field of every event.
def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise TypeError(f"not a token count: {value!r}")
    return value


def _cost(value: object) -> int:
    """An event's ``cost_usd`` in nano-dollars; an unpriced model (null) adds nothing."""
    if value is None:
        return 0
    if (type(value) is not float and type(value) is not int) or not 0 <= value < 1e9:
        raise TypeError(f"not a cost: {value!r}")
    return nanousd(value)


def _text(value: object) -> str:
    if type(value) is not str or not value:
        raise TypeError(f"not an id: {value!r}")
    return value


# The text ``rfc3339`` writes: these sort as the moments they name, and their first 13 characters
# name the clock hour. Anything else is normalised first.
_CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:[0-5]\d:[0-5]\d\.\d{3}Z")


def _canonical(stamp: object) -> str:
    if isinstance(stamp, str) and _CANONICAL.fullmatch(stamp):
        return stamp
    if not isinstance(stamp, str):
        raise TypeError(f"not a timestamp: {stamp!r}")
    return rfc3339(parse_rfc3339(stamp))


def _moment(stamp: str) -> datetime:
    return datetime.fromtimestamp(parse_rfc3339(stamp), UTC)


@dataclass(slots=True)
class _Tally:
    project_id: str
    last_stamp: str  # canonical, so the latest is the greatest
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    errors: int = 0
    cost_nanousd: int = 0


def fold(events: Sequence[Event]) -> tuple[list[UsageRollup], dict[int, Rejection]]:
    """Sum ``events`` by token and clock hour; events that cannot be counted are refused by index.

    An event is an error when it carries one (the proxy's own, or the client going away) or its
    status is 4xx/5xx. ``last_used_at`` is when the request started, as for the token itself.
    Spend adds up the events' ``cost_usd`` as exact nano-dollars.
    """
    # Timestamps are compared and grouped as text; only one per hour, and one per tally at the
    # end, becomes a datetime (parsing each event's took a third of the fold).
    tallies: dict[tuple[str, str], _Tally] = {}
    hours: dict[str, datetime] = {}
    refused: dict[int, Rejection] = {}
    for index, event in enumerate(courteously(events)):
        try:
            token_id = _text(event["token_id"])
            project_id = _text(event["project_id"])
            stamp = _canonical(event["timestamp"])
            hour = stamp[:13]
            if hour not in hours:
                hours[hour] = hour_start(_moment(stamp))
            usage = event["usage"]
            prompt = _count(usage["prompt_tokens"]) if usage else 0
            completion = _count(usage["completion_tokens"]) if usage else 0
            total = _count(usage["total_tokens"]) if usage else 0
            cost = _cost(event.get("cost_usd"))
            failed = event["error"] is not None or event["status"] >= 400
        except (KeyError, TypeError, ValueError) as exc:
            # Retrying cannot make it countable; the worker dead-letters it.
            refused[index] = Rejection(f"cannot count usage: {exc!r}", retryable=False)
            continue
        tally = tallies.get((token_id, hour))
        if tally is None:
            tally = tallies[token_id, hour] = _Tally(project_id, stamp)
        tally.requests += 1
        tally.prompt_tokens += prompt
        tally.completion_tokens += completion
        tally.total_tokens += total
        tally.cost_nanousd += cost
        tally.errors += int(failed)
        tally.last_stamp = max(tally.last_stamp, stamp)
    rows = [
        UsageRollup(
            token_id=token_id,
            project_id=t.project_id,
            hour=hours[hour],
            requests=t.requests,
            prompt_tokens=t.prompt_tokens,
            completion_tokens=t.completion_tokens,
            total_tokens=t.total_tokens,
            errors=t.errors,
            last_used_at=_moment(t.last_stamp),
            cost_nanousd=t.cost_nanousd,
        )
        for (token_id, hour), t in tallies.items()
    ]
    return rows, refused


class UsageBackend:
    name = "usage"

    def __init__(self, store: Store) -> None:
        self._store = store
        # The ids of the events of the last batch whose COMMIT went unanswered, and how to learn
        # whether it committed: the worker sends them again, and they must not count twice.
        self._in_doubt: tuple[CommitInDoubt, frozenset[str]] | None = None

    async def start(self) -> None:
        """Nothing to open: the store belongs to the application, which opens and closes it."""

    async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
        counted = await self._counted_in_doubt()
        # Positions in ``events`` of those still to count (the refusals name positions).
        todo = [i for i, event in enumerate(events) if event.get("id") not in counted]
        rows, refused = fold([events[i] for i in todo])
        refused = {todo[i]: rejection for i, rejection in refused.items()}
        if rows:
            try:
                await self._store.add_usage_rollup(rows)
            except CommitInDoubt as doubt:
                ids = (events[i].get("id") for i in todo if i not in refused)
                self._in_doubt = (doubt, frozenset(i for i in ids if isinstance(i, str)))
                raise
        return refused

    async def _counted_in_doubt(self) -> frozenset[str]:
        """The ids of the events the batch in doubt counted: none when it did not commit. Raises
        while the database cannot tell (the worker retries)."""
        if self._in_doubt is None:
            return frozenset()
        doubt, ids = self._in_doubt
        committed = await doubt.committed()
        self._in_doubt = None
        return ids if committed else frozenset()

    async def close(self) -> None:
        """Nothing to release (see :meth:`start`)."""
