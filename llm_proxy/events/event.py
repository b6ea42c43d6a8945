"""The instrumentation event (SPEC §8) and its wire form.

An event is a plain JSON-shaped dict so that every bus and backend can pass it on without a schema
library; :class:`Event` only gives it a type. It never holds a token value, an upstream key or a
header: the proxy records ids, and the builder copies nothing else from the request.
"""

from __future__ import annotations

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
    error: str | None


EVENT_FIELDS = frozenset(Event.__annotations__)


def rfc3339(epoch_seconds: float) -> str:
    moment = datetime.fromtimestamp(epoch_seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(value: str) -> float:
    """Epoch seconds of a timestamp written by :func:`rfc3339`."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def end_epoch(event: Event) -> float:
    """When the response ended, in epoch seconds."""
    return parse_rfc3339(event["timestamp"]) + event["duration_ms"] / 1000.0


def dumps(event: Event) -> bytes:
    return orjson.dumps(event)


def loads(data: bytes | str) -> Event:
    """Parse an event read back from a bus or spool; raises ``ValueError`` when it is not one."""
    value = orjson.loads(data)
    if not isinstance(value, dict) or not EVENT_FIELDS.issubset(value):
        raise ValueError("not an instrumentation event")
    return cast(Event, value)
