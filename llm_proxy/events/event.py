"""The instrumentation event, one per proxied request, and its wire form.

An event is a plain JSON-shaped dict so that every bus and backend can pass it on without a schema
library; :class:`Event` only gives it a type. It never holds a token value, an upstream key or a
header: the proxy records ids, and the builder copies nothing else from the request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Literal, TypedDict, cast

import orjson

UsageSource = Literal["upstream", "estimated"]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    source: UsageSource


class Event(TypedDict):
    id: str
    request_id: str
    timestamp: str  # request start, RFC 3339 UTC with milliseconds
    project_id: str
    token_id: str
    method: str
    path: str
    status: int
    duration_ms: float
    ttfb_ms: float | None
    stream: bool
    model: str | None
    request: object  # parsed JSON body, text, or a "[...]" note when the body could not be shown
    response: object  # same; a stream is reassembled into one completion object
    usage: Usage | None
    cost_usd: float | None  # by config/prices.yaml; None when the model has no price
    upstream_request_id: str | None  # the provider's own id of the call, for its support
    error: str | None


EVENT_FIELDS = frozenset(Event.__annotations__)
# Events spooled or put on Redis by a version without prices lack a cost; they are still events.
_REQUIRED_FIELDS = EVENT_FIELDS - {"cost_usd"}


class _SecondText:
    """The text of the last whole second formatted: events of one batch mostly share it, and a
    datetime per event took a fifth of an event's build."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = ""


_LAST_SECOND = _SecondText()


def rfc3339(epoch_seconds: float) -> str:
    """``2030-01-01T10:15:00.123Z``: UTC, milliseconds (truncated, as ``isoformat`` does)."""
    # Rounded to microseconds first, exactly as datetime.fromtimestamp does.
    fraction, whole = math.modf(epoch_seconds)
    second, micros = int(whole), round(fraction * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    last = _LAST_SECOND
    if second != last.second:
        text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")[:19]
        last.second, last.text = second, text  # (a race between threads only formats twice)
    return f"{last.text}.{micros // 1000:03d}Z"


def parse_rfc3339(value: str) -> float:
    """Epoch seconds of a timestamp written by :func:`rfc3339`."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def end_epoch(event: Event) -> float:
    """When the response ended, in epoch seconds."""
    return parse_rfc3339(event["timestamp"]) + event["duration_ms"] / 1000.0


def dumps(event: Event) -> bytes:
    return orjson.dumps(event)


def dumps_each(events: Iterable[Event]) -> tuple[list[bytes], list[tuple[Event, str]]]:
    """The wire form of every event that has one, and the events that have none with the reason
    (nested deeper than orjson writes: built by a version that did not bound a body's depth).
    Written one by one, so that one such event never costs the others theirs."""
    written: list[bytes] = []
    unwritable: list[tuple[Event, str]] = []
    for event in events:
        try:
            written.append(orjson.dumps(event))
        except orjson.JSONEncodeError as exc:
            unwritable.append((event, str(exc)))
    return written, unwritable


def positions_taken(events: Sequence[Event], unwritable: int, written: int) -> int:
    """How many of ``events`` (of which ``dumps_each`` found ``unwritable`` it could not write)
    lie up to the ``written``-th writable one: where sending them again must start."""
    if not unwritable:
        return written
    seen = 0
    for position, event in enumerate(events):
        try:
            orjson.dumps(event)
        except orjson.JSONEncodeError:
            continue
        if seen == written:
            return position
        seen += 1
    return len(events)


def loads(data: bytes | str) -> Event:
    """Parse an event read back from a bus or spool; raises ``ValueError`` when it is not one."""
    value = orjson.loads(data)
    if not isinstance(value, dict) or not _REQUIRED_FIELDS.issubset(value):
        raise ValueError("not an instrumentation event")
    value.setdefault("cost_usd", None)
    return cast(Event, value)
