"""Handing unacknowledged Redis Stream entries back to the consumer group at once.

A dispatcher that stops with entries read but not delivered (refused credentials, a drain deadline)
leaves them pending under its own consumer name. Another consumer would take them over only once
they were idle for ``--claim-idle`` seconds, so a dispatcher restarted at once, ``--burst`` above
all, would not see them. Marking them idle since the epoch (``XCLAIM … IDLE``, without counting a
delivery) lets the next dispatcher's first read claim them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from redis.asyncio import Redis


class RedisHandback:
    def __init__(self, client: Redis, stream: str) -> None:
        self._client = client
        self._stream = stream

    async def release(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        if ids:
            await self._client.xclaim(
                self._stream,
                group,
                consumer,
                min_idle_time=0,
                message_ids=list(ids),
                idle=int(time.time() * 1000),
                justid=True,
            )
