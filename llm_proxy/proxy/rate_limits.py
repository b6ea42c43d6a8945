"""Where a token's rpm window lives: in Redis when it is configured, else in the store.

Both hold the same sliding log (when each request of the last 60 s was admitted), so a token's
``rpm`` is exact in any rolling minute across every process and instance; each step is one atomic
operation (a Lua script in Redis, one statement or write transaction in the store). Redis keeps the
database off the request path of rate-limited tokens; the store needs no extra service.
"""

from __future__ import annotations

from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from llm_proxy.models import RATE_WINDOW_MICROS, RateSlot
from llm_proxy.store import Store


class RateWindows(Protocol):
    async def take(self, token_id: str, rpm: int) -> RateSlot: ...
    async def give_back(self, token_id: str, at_micros: int) -> None: ...
    async def close(self) -> None: ...


class StoreRateWindows:
    """The windows in the database: shared by every process and instance on it.

    The store reads ``rpm`` from the token's row itself, so a changed limit applies at once.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    async def take(self, token_id: str, rpm: int) -> RateSlot:
        return await self._store.take_rate_slot(token_id)

    async def give_back(self, token_id: str, at_micros: int) -> None:
        await self._store.give_back_rate_slot(token_id, at_micros)

    async def close(self) -> None:
        return None


# KEYS[1]: the token's log (a sorted set of admission times, epoch microseconds by Redis's clock).
# ARGV[1]: rpm; ARGV[2]: the window in microseconds. Answers {1, slot} or {0, retry_after_micros}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local rpm = tonumber(ARGV[1])
if count < rpm then
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) >= now then now = tonumber(last[2]) + 1 end
  redis.call('ZADD', KEYS[1], now, now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
  return {1, now}
end
local oldest = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now}
"""


class RedisRateWindows:
    """The windows in Redis: no database round trip for a rate-limited token."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        # Fails fast and never retries on its own: an outage is a refusal now, not a hang.
        self._redis = Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._take = self._redis.register_script(_TAKE)

    @staticmethod
    def _key(token_id: str) -> str:
        return f"llm-proxy:rpm:{token_id}"

    async def take(self, token_id: str, rpm: int) -> RateSlot:
        admitted, value = await self._take(
            keys=[self._key(token_id)], args=[rpm, RATE_WINDOW_MICROS]
        )
        if admitted:
            return RateSlot(True, at_micros=int(value))
        return RateSlot(False, retry_after=int(value) / 1e6)

    async def give_back(self, token_id: str, at_micros: int) -> None:
        await self._redis.zrem(self._key(token_id), at_micros)

    async def close(self) -> None:
        await self._redis.aclose()
