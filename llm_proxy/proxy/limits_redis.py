"""The Redis client of the limits kept in Redis (rpm and tpm windows, budget holds), and what
they share to tell a Redis that lost their data."""

from __future__ import annotations

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = structlog.get_logger(__name__)

# Since when (epoch microseconds, Redis's clock) Redis holds the limits' whole state: 0 when it
# has from the first start on. A Redis restarted without persistence, or flushed, comes back
# without it, and without the windows' last minute and the holds of requests in progress: a
# window that looks empty may have been full, a budget that looks free may be held by streams
# still running on every instance. So the first script that finds the key gone sets it to now,
# and the limits are not trusted until what was lost is over: a window's minute, a hold's lease
# (within which the holds still running are taken again by their renewals). Their tokens are
# refused meanwhile (SPEC §11: fail closed, a limit never silently reset).
LIMITS_SINCE_KEY = "llm-proxy:limits-since"

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


def lost_for_lua(since_key: str, span: str) -> str:
    """Lua, run once ``now`` is set, that sets ``lost_for``: for how many more microseconds the
    state of the last ``span`` microseconds (a Lua expression) may be missing from Redis (0 or
    less: it is all there). ``since_key`` names the key of :data:`LIMITS_SINCE_KEY`."""
    return f"""
local since = redis.call('GET', {since_key})
if not since then
  since = now
  redis.call('SET', {since_key}, string.format('%d', now))
end
local lost_for = tonumber(since) + {span} - now
"""


async def trust_from_start(redis: Redis) -> None:
    """Mark a Redis that never held the limits as holding them whole: one that never had
    :data:`LIMITS_SINCE_KEY` lost nothing. Unset when Redis cannot be reached now, the key is set
    by the first script, which then refuses the limits' tokens a while (fail closed). An
    instance starting after a Redis lost its data, before any other ran a script, trusts it all
    the same: a window open for that long."""
    try:
        await redis.set(LIMITS_SINCE_KEY, 0, nx=True)
    except Exception as exc:
        log.warning("limits.redis_unavailable_at_start", error=str(exc))
