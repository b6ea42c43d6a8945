"""Limits in Redis across a Redis restart: pooled connections the old server closed are dead, and
redis-py finds out only when a command sent on one reads end of file. Such a command is sent once
more, on a new connection, rather than refusing the request ``limits_unavailable`` while Redis is
up (a burst after a restart was refused for as many requests as the pool held connections).

Only for commands whose second run is harmless if the first did run after all (the connection
died between the command and its reply): the request path's, which then err towards the limit (a
rate slot or a budget hold counted twice until it expires), and the settlements', which a second
run does not repeat (see ``budget_ledger.py``, ``rate_limits.py``). A refused or unreachable
Redis is not retried here: the outage is the answer, at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

T = TypeVar("T")

# redis-py's message when a read on an established connection finds the server gone.
_SERVER_CLOSED = "Connection closed by server."


async def once_more_on_a_new_connection(redis: Redis, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except RedisConnectionError as exc:
        if str(exc) != _SERVER_CLOSED:
            raise
    # The pool's other idle connections are the old server's too.
    await redis.connection_pool.disconnect(inuse_connections=False)
    return await call()
