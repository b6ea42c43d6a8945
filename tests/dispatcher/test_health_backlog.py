"""``llm-proxy dispatcher --check`` reads a group's backlog while its dispatcher runs."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from dispatcher import health
from tests.events.events_support import RedisServer

pytestmark = pytest.mark.redis


class _AcknowledgedMeanwhile:
    """A Redis client through which the backlog is read, while a running dispatcher acknowledges
    what it had pending just after the group's summary was taken."""

    def __init__(self, client: Redis, group: str, ids: list[bytes]) -> None:
        self._client = client
        self._group = group
        self._ids = ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def xinfo_groups(self, stream: str) -> Any:
        groups = await self._client.xinfo_groups(stream)
        await self._client.xack(stream, self._group, *self._ids)
        return groups


async def test_a_backlog_acknowledged_while_it_is_read_counts_as_none_pending(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        await client.xgroup_create("t:backlog", "usage", id="0", mkstream=True)
        ids = [await client.xadd("t:backlog", {"e": b"{}"}) for _ in range(2)]
        await client.xreadgroup("usage", "dispatcher-1", {"t:backlog": ">"}, count=2)
        reader = _AcknowledgedMeanwhile(client, "usage", ids)
        seen = await health.backlog(reader, "t:backlog", "usage")  # type: ignore[arg-type]
        assert seen is not None
        assert (seen.waiting, seen.pending, seen.oldest) == (0, 0, None)
        assert str(seen) == "backlog 0 waiting, 0 pending"
    finally:
        await client.aclose()
