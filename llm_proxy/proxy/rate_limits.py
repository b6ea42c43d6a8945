"""Where a token's rpm and tpm windows live: in Redis when it is configured, else in the store.

Both hold the same sliding logs, so the limits hold in any rolling minute across every process and
instance. rpm: when each request of the last 60 s was admitted; taking a slot is one atomic
operation (a Lua script in Redis, one statement or write transaction in the store), so it is exact.
tpm: the tokens of each request settled in the last 60 s (recorded by the events pipeline once the
usage is known); a request is refused while they reach ``tpm``. Redis keeps the database off the
request path of rate-limited tokens; the store needs no extra service.

A request's tokens reach its tpm window after its client has the answer, so a client that sends its
next request at once, to another worker or instance, could be judged on a window that lacks them.
So each answer of a tpm-limited token is *marked*, where its window lives, before its last bytes go
out (:meth:`RateWindows.mark_answered`); its settlement removes the mark in the step that records
its tokens, and admission waits (bounded: see ``settling.py``) while the token has marks younger
than :data:`MARK_BOUND_MICROS`.
"""

from __future__ import annotations

from typing import Protocol

from llm_proxy.models import RATE_WINDOW_MICROS, RateSlot
from llm_proxy.proxy.cancel_marks import remember_cancelled
from llm_proxy.proxy.limits_redis import (
    LIMITS_SINCE_KEY,
    limits_client,
    lost_for_lua,
    trust_from_start,
)
from llm_proxy.proxy.settling import SETTLE_WAIT_SECONDS
from llm_proxy.proxy.stale_redis import once_more_on_a_new_connection
from llm_proxy.store import Store


class RateWindows(Protocol):
    async def start(self) -> None:
        """Ready the windows before the first request (see :data:`LIMITS_SINCE_KEY`)."""
        ...

    async def take(self, token_id: str, rpm: int, slot_id: str) -> RateSlot:
        """Take a slot of the token's rpm window, named ``slot_id`` (see :meth:`cancel`)."""
        ...

    async def give_back(self, token_id: str, at_micros: int) -> None: ...

    async def cancel(self, token_id: str, slot_id: str) -> None:
        """Give back slot ``slot_id`` whether or not it was taken, and keep it from being taken
        later: for a slot whose taking failed without saying whether it ran (a Redis that stalls
        past its timeout runs the script when it wakes)."""
        ...

    async def tpm_room(
        self, token_id: str, tpm: int, *, marks: bool = True, upto: int = 0
    ) -> RateSlot:
        """Whether the token's tpm window has room; with ``marks``, ``unsettled`` when it has
        room but answers marked younger than :data:`MARK_BOUND_MICROS` are not settled yet:
        those marked by ``upto`` (epoch µs; 0: now), which ``at_micros`` then says, so that a
        caller asking again waits only for the answers that went out before it first asked."""
        ...

    async def mark_answered(self, token_id: str, mark: str) -> None:
        """Note that the answer named ``mark`` is going out and its tokens are not settled yet."""
        ...

    async def forget_mark(self, token_id: str, mark: str) -> None:
        """Remove the mark of an answer that records no tokens, or never will."""
        ...

    async def record_tokens(self, token_id: str, tokens: int, entry: str, mark: str = "") -> None:
        """Add a settled request's ``tokens`` to the token's tpm window, and remove its answer's
        ``mark`` in the same step; ``entry`` names them there, so that a retry after an answer
        that never came adds them once (where the window can tell)."""
        ...

    async def close(self) -> None: ...


class StoreRateWindows:
    """The windows in the database: shared by every process and instance on it.

    The store reads ``rpm`` from the token's row itself, so a changed limit applies at once.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    async def start(self) -> None:
        return None

    async def take(self, token_id: str, rpm: int, slot_id: str) -> RateSlot:
        return await self._store.take_rate_slot(token_id)

    async def give_back(self, token_id: str, at_micros: int) -> None:
        await self._store.give_back_rate_slot(token_id, at_micros)

    async def cancel(self, token_id: str, slot_id: str) -> None:
        # A transaction that failed was rolled back (its statement cancelled at the timeout): it
        # took nothing. A lost answer to its COMMIT aside, which the window outlives in a minute.
        return None

    async def tpm_room(
        self, token_id: str, tpm: int, *, marks: bool = True, upto: int = 0
    ) -> RateSlot:
        return await self._store.tpm_room(token_id, MARK_BOUND_MICROS if marks else 0, upto)

    async def mark_answered(self, token_id: str, mark: str) -> None:
        await self._store.mark_answered(token_id, mark, MARK_BOUND_MICROS)

    async def forget_mark(self, token_id: str, mark: str) -> None:
        await self._store.forget_mark(token_id, mark)

    async def record_tokens(self, token_id: str, tokens: int, entry: str, mark: str = "") -> None:
        # The row's log has no names: a retry after a COMMIT whose answer was lost may count the
        # tokens twice, for the rest of one minute, which errs on the side of the limit.
        await self._store.record_tokens(token_id, tokens, mark)

    async def close(self) -> None:
        return None


# KEYS[1]: the token's log (a sorted set of slot ids scored by their admission times, epoch
# microseconds by Redis's clock, each one unique); KEYS[2]: its cancelled slots (see _CANCEL);
# KEYS[3]: LIMITS_SINCE_KEY. ARGV[1]: rpm; ARGV[2]: the window in microseconds; ARGV[3]: the
# slot's id. Answers {1, slot}, {0, retry_after_micros} or {-1, retry_after_micros} (windows lost).
_TAKE = (
    """
if redis.call('ZSCORE', KEYS[2], ARGV[3]) then return {0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
"""
    + lost_for_lua("KEYS[3]", "window")
    + """
if lost_for > 0 then return {-1, lost_for} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local rpm = tonumber(ARGV[1])
if count < rpm then
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) >= now then now = tonumber(last[2]) + 1 end
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
  return {1, now}
end
local oldest = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now}
"""
)

# KEYS: the token's log, its cancelled slots (slot ids scored by when they may be forgotten).
# ARGV: the slot id, how long to remember it (µs). Gives the slot back when it was taken; else
# remembers it, so that a take run late (by a Redis that stalled past its client's timeout) takes
# nothing.
_CANCEL = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then return 1 end
""" + remember_cancelled("KEYS[2]")

# Longer than any stall a Redis comes back from.
_CANCELLED_MICROS = 3_600_000_000


# How long an answer's mark holds admission back: a mark older than this belongs to an answer
# whose settlement was lost (a dropped event, a dead events process) and is ignored.
MARK_BOUND_MICROS = int(SETTLE_WAIT_SECONDS * 1_000_000)

# KEYS[1]: the token's tpm log (members "<at>:<tokens>", scored by ``at``, Redis's clock);
# KEYS[2]: LIMITS_SINCE_KEY; KEYS[3]: the token's marks (mark ids scored by when they were made).
# ARGV[1]: tpm; ARGV[2]: the window; ARGV[3]: how young a mark must be to count (0: none counts);
# ARGV[4]: the newest a mark may be to count (0: now). Answers {1, 0} when there is room,
# {2, upto} when there is room but answers marked by ``upto`` are not settled yet, else
# {0, retry_after}, or {-1, retry_after} while the windows are lost.
_TPM_ROOM = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
"""
    + lost_for_lua("KEYS[2]", "window")
    + """
if lost_for > 0 then return {-1, lost_for} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local used = 0
for i = 1, #entries, 2 do
  used = used + tonumber(string.match(entries[i], ':(%d+)$'))
end
local tpm = tonumber(ARGV[1])
if used < tpm then
  local bound = tonumber(ARGV[3])
  local upto = tonumber(ARGV[4])
  if upto == 0 then upto = now end
  if bound > 0 and redis.call('ZCOUNT', KEYS[3], '(' .. (now - bound), upto) > 0 then
    return {2, upto}
  end
  return {1, 0}
end
for i = 1, #entries, 2 do
  used = used - tonumber(string.match(entries[i], ':(%d+)$'))
  if used < tpm then return {0, tonumber(entries[i + 1]) + window - now} end
end
return {0, window}
"""
)

# KEYS[1]: the token's tpm log; KEYS[2]: its marks. ARGV[1]: tokens; ARGV[2]: the window;
# ARGV[3]: the entry's unique id (added once however often it is sent); ARGV[4]: the answer's mark
# (removed with the tokens recorded, so that no admission sees neither).
_RECORD_TOKENS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], 'NX', now, ARGV[3] .. ':' .. ARGV[1])
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[2], ARGV[4]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) / 1000) + 1000)
return 1
"""

# KEYS[1]: the token's marks. ARGV[1]: the mark; ARGV[2]: MARK_BOUND_MICROS. Marks past the bound
# are dropped here, and the key expires with the last of them.
_MARK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local bound = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - bound)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(bound / 1000) + 1000)
return 1
"""


def _marks_key(token_id: str) -> str:
    return f"llm-proxy:tpm-marks:{token_id}"


class RedisRateWindows:
    """The windows in Redis: no database round trip for a rate-limited token."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self._redis = limits_client(url, timeout=timeout)
        self._take = self._redis.register_script(_TAKE)
        self._tpm_room = self._redis.register_script(_TPM_ROOM)
        self._record_tokens = self._redis.register_script(_RECORD_TOKENS)
        self._cancel = self._redis.register_script(_CANCEL)
        self._mark = self._redis.register_script(_MARK)

    @staticmethod
    def _keys(token_id: str) -> list[str]:
        return [f"llm-proxy:rpm:{token_id}", f"llm-proxy:rpm-cancelled:{token_id}"]

    async def start(self) -> None:
        await trust_from_start(self._redis)

    async def take(self, token_id: str, rpm: int, slot_id: str) -> RateSlot:
        keys = [*self._keys(token_id), LIMITS_SINCE_KEY]
        admitted, value = await once_more_on_a_new_connection(
            self._redis,
            lambda: self._take(keys=keys, args=[rpm, RATE_WINDOW_MICROS, slot_id]),
        )
        if admitted == 1:
            return RateSlot(True, at_micros=int(value))
        return RateSlot(False, retry_after=int(value) / 1e6, window_lost=admitted == -1)

    async def give_back(self, token_id: str, at_micros: int) -> None:
        # By its time, which no other slot shares (_TAKE): a second run removes nothing more.
        key = self._keys(token_id)[0]
        await once_more_on_a_new_connection(
            self._redis, lambda: self._redis.zremrangebyscore(key, at_micros, at_micros)
        )

    async def cancel(self, token_id: str, slot_id: str) -> None:
        keys = self._keys(token_id)
        await once_more_on_a_new_connection(
            self._redis, lambda: self._cancel(keys=keys, args=[slot_id, _CANCELLED_MICROS])
        )

    async def tpm_room(
        self, token_id: str, tpm: int, *, marks: bool = True, upto: int = 0
    ) -> RateSlot:
        room, value = await once_more_on_a_new_connection(
            self._redis,
            lambda: self._tpm_room(
                keys=[f"llm-proxy:tpm:{token_id}", LIMITS_SINCE_KEY, _marks_key(token_id)],
                args=[tpm, RATE_WINDOW_MICROS, MARK_BOUND_MICROS if marks else 0, upto],
            ),
        )
        if room == 2:
            return RateSlot(True, at_micros=int(value), unsettled=True)
        return RateSlot(room == 1, retry_after=int(value) / 1e6, window_lost=room == -1)

    async def mark_answered(self, token_id: str, mark: str) -> None:
        keys = [_marks_key(token_id)]
        await once_more_on_a_new_connection(
            self._redis, lambda: self._mark(keys=keys, args=[mark, MARK_BOUND_MICROS])
        )

    async def forget_mark(self, token_id: str, mark: str) -> None:
        key = _marks_key(token_id)
        await once_more_on_a_new_connection(self._redis, lambda: self._redis.zrem(key, mark))

    async def record_tokens(self, token_id: str, tokens: int, entry: str, mark: str = "") -> None:
        await once_more_on_a_new_connection(
            self._redis,
            lambda: self._record_tokens(
                keys=[f"llm-proxy:tpm:{token_id}", _marks_key(token_id)],
                args=[tokens, RATE_WINDOW_MICROS, entry, mark],
            ),
        )

    async def close(self) -> None:
        await self._redis.aclose()
