"""Dispatcher liveness through a Redis key, for ``llm-proxy dispatcher check``.

A running worker refreshes the key every few seconds with a short expiry, like arq's health check;
the check passes while the key exists and is recent. A clean exit deletes it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError


def heartbeat_key(stream: str, service: str) -> str:
    return f"{stream}:dispatcher:{service}:heartbeat"


class RedisHeartbeat:
    def __init__(self, client: Redis, stream: str, service: str, *, ttl: float = 30.0) -> None:
        self._client = client
        self._key = heartbeat_key(stream, service)
        self._ttl = ttl

    async def beat(self, summary: Mapping[str, object]) -> None:
        value = orjson.dumps({"at": time.time(), **summary})
        await self._client.set(self._key, value, px=int(self._ttl * 1000))

    async def clear(self) -> None:
        await self._client.delete(self._key)


async def check(client: Redis, stream: str, service: str, *, max_age: float) -> str | None:
    """A one-line description of the live dispatcher, or None when none has beaten recently."""
    try:
        raw = await client.get(heartbeat_key(stream, service))
    except (RedisError, OSError):
        return None
    if raw is None:
        return None
    beat = orjson.loads(raw)
    age = time.time() - float(beat["at"])
    if age > max_age:
        return None
    counts = ", ".join(f"{k}={v}" for k, v in beat.items() if k != "at")
    return f"dispatcher {service} alive ({age:.1f}s ago): {counts}"
