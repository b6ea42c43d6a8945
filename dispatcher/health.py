"""Dispatcher liveness through a Redis key, for ``llm-proxy dispatcher check``.

A running worker refreshes the key every few seconds with a short expiry, like arq's health check;
the check passes while the key exists and is recent. A clean exit deletes it. The check also reads
the service's backlog from its consumer group: events not yet read, events read but not yet
acknowledged, and how long the oldest of them has waited.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError


def heartbeat_key(stream: str, service: str) -> str:
    return f"{stream}:dispatcher:{service}:heartbeat"


# Deletes the heartbeat only if it is still the value this dispatcher wrote: with two replicas of
# a service, the one stopping must not make the other look gone.
_CLEAR_OWN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisHeartbeat:
    """One key per service, written by whichever of its dispatchers beat last."""

    def __init__(self, client: Redis, stream: str, service: str, *, ttl: float = 30.0) -> None:
        self._client = client
        self._key = heartbeat_key(stream, service)
        self._ttl = ttl
        self._written: bytes | None = None
        self._clear_own = client.register_script(_CLEAR_OWN)

    async def beat(self, summary: Mapping[str, object]) -> None:
        value = orjson.dumps({"at": time.time(), **summary})
        await self._client.set(self._key, value, px=int(self._ttl * 1000))
        self._written = value

    async def clear(self) -> None:
        if self._written is not None:
            await self._clear_own(keys=[self._key], args=[self._written])


@dataclass(frozen=True, slots=True)
class Backlog:
    waiting: int | None  # in the stream, not yet read by the group (None: Redis cannot tell)
    pending: int  # read by a dispatcher, not yet acknowledged
    oldest: float | None  # seconds the oldest of them has been in the stream; None: nothing waits

    def __str__(self) -> str:
        waiting = "unknown" if self.waiting is None else str(self.waiting)
        oldest = "" if self.oldest is None else f", oldest {self.oldest:.1f}s old"
        return f"backlog {waiting} waiting, {self.pending} pending{oldest}"


def _entry_ms(entry_id: Any) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


async def backlog(client: Redis, stream: str, group: str) -> Backlog | None:
    """The group's backlog; None while the stream or the group does not exist yet."""
    try:
        groups = await client.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return None
    info = next((g for g in groups if g["name"] in (group, group.encode())), None)
    if info is None:
        return None
    oldest_ms: list[int] = []
    # Count and oldest from one answer: a running dispatcher may acknowledge between two calls.
    summary = await client.xpending(stream, group)
    pending = int(summary["pending"])
    if summary["min"] is not None:
        oldest_ms.append(_entry_ms(summary["min"]))
    last = info["last-delivered-id"]
    last = last.decode() if isinstance(last, bytes) else str(last)
    after = await client.xrange(stream, min="(" + last, count=1)
    if after:
        oldest_ms.append(_entry_ms(after[0][0]))
    seconds, micros = await client.time()  # Redis's clock, which stamped the entry ids
    now_ms = seconds * 1000 + micros // 1000
    oldest = max(0.0, (now_ms - min(oldest_ms)) / 1000) if oldest_ms else None
    return Backlog(info.get("lag"), pending, oldest)


@dataclass(frozen=True, slots=True)
class Status:
    state: Literal["alive", "lagging", "absent"]
    line: str


async def check(
    client: Redis, stream: str, service: str, *, max_age: float, max_lag: float | None = None
) -> Status:
    """How the dispatcher of ``service`` is doing, as one line.

    ``absent``: no heartbeat; ``lagging``: its heartbeat is older than ``max_age`` seconds, or the
    oldest event it has not delivered waited more than ``max_lag``. Raises ``RedisError`` or
    ``OSError`` when Redis cannot be reached.
    """
    raw = await client.get(heartbeat_key(stream, service))
    if raw is None:
        return Status("absent", f"no dispatcher running for {service} (no heartbeat on {stream})")
    beat = orjson.loads(raw)
    age = time.time() - float(beat["at"])
    waiting = await backlog(client, stream, service)
    queue = f"; {waiting}" if waiting is not None else ""
    if age > max_age:
        return Status(
            "lagging",
            f"dispatcher {service} lagging: last heartbeat {age:.1f}s ago "
            f"(more than {max_age:g}s){queue}",
        )
    if max_lag is not None and waiting is not None and (waiting.oldest or 0.0) > max_lag:
        return Status(
            "lagging",
            f"dispatcher {service} lagging: its oldest undelivered event waited "
            f"{waiting.oldest:.1f}s (more than {max_lag:g}s){queue}",
        )
    counts = ", ".join(f"{k}={v}" for k, v in beat.items() if k != "at")
    return Status("alive", f"dispatcher {service} alive ({age:.1f}s ago): {counts}{queue}")
