"""The Redis client of the limits kept in Redis (rpm and tpm windows, budget holds)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# As many connections as redis-py pools by default; more requests at once wait for one.
MAX_CONNECTIONS = 100


def limits_client(url: str, *, timeout: float) -> Redis:
    """A client that fails fast and never retries on its own: an outage is a refusal now, not a
    hang. Its pool makes a request wait (up to ``timeout``) for a connection when all are busy:
    redis-py's default pool refuses it at once ("Too many connections"), and a burst of requests
    on limited tokens was refused ``limits_unavailable`` while Redis was up."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)
