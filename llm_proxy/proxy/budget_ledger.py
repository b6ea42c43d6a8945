"""Where a token's budget holds live: in Redis when it is configured, else in the store.

Admitting a request on a budgeted token *holds* the most it can cost; once the answer's usage is
known the events pipeline *settles* it: the actual cost becomes spend and the rest of the hold is
released. Each step is one atomic operation (a Lua script in Redis; one transaction on the token's
row in the database), so concurrent requests on every instance never hold more than the budget.

A hold is a lease: it expires ``lease_seconds`` after it was taken or last renewed, and the
process serving its request renews it until it is settled (:meth:`BudgetLedger.renew`, batched
by ``hold_leases.py``). A hold whose request never settles (its process died, its exchange was
lost) is no longer renewed, expires within the lease, and its amount returns to the budget: Redis
drops it on the token's next reservation, the store on :meth:`StoreBudgetLedger.reclaim`. A
request whose hold expired all the same (a renewal that failed) is settled as usual: its spend is
counted, so the budget is never understated.

With Redis, spend is kept in Redis for admission and also added to the database, which shows it
and seeds Redis again after Redis lost its data (or when a token first holds: one given a budget
late starts from all it spent before). The holds Redis lost with its data are taken again by the
renewals of the requests still running, before any new hold is (see ``limits_redis.py``).

Every token's spend is its lifetime spend, budget or not: requests that held nothing add their
cost with :meth:`BudgetLedger.add_spend` (see ``events/lifetime_spend.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import structlog

from llm_proxy.models import BudgetHold
from llm_proxy.proxy.cancel_marks import remember_cancelled
from llm_proxy.proxy.limits_redis import (
    LIMITS_SINCE_KEY,
    limits_client,
    lost_for_lua,
    trust_from_start,
)
from llm_proxy.proxy.stale_redis import once_more_on_a_new_connection
from llm_proxy.store import Store
from llm_proxy.store.unavailable import CommitInDoubt

log = structlog.get_logger(__name__)

# How long a hold lasts unless renewed. A process killed mid-request (SIGKILL, a node lost) leaves
# its holds behind, and a request without an output cap may hold all the budget has left: its token
# is refused for this long. Renewals come every third of it, so two may fail (a Redis or database
# restart) before a request not settled yet loses its hold.
HOLD_LEASE_SECONDS = 30.0
# How long Redis remembers a hold cancelled before it was taken: longer than any stall a Redis
# comes back from (the script of the stalled call runs when it wakes).
CANCEL_MEMORY_SECONDS = 3600.0


@dataclass(slots=True, eq=False)
class Settlement:
    """A finished request's hold (``held`` nano-dollars) and what it cost; and, for one that is
    retried after a failure, which of its parts have landed.

    A settlement has two parts: the hold (released, its cost moved to the spend Redis admits
    from, when holds live there) and the spend kept in the database. Each is done once: a retry
    does only what is left, and never adds a spend twice after a failure that left it unknown
    whether a part ran (see ``hold_in_doubt`` and ``spend_in_doubt``)."""

    token_id: str
    hold_id: str
    held: int
    cost: int
    hold_done: bool = False
    spend_done: bool = False
    # An attempt at the hold failed after it may have run: a retry adds the cost only where it
    # still finds the hold.
    hold_in_doubt: bool = False
    # A database transaction that may have recorded the spend: asked before it is written again.
    spend_in_doubt: CommitInDoubt | None = None

    @property
    def done(self) -> bool:
        return self.hold_done and self.spend_done


async def _spend_not_committed(settlements: list[Settlement]) -> list[Settlement]:
    """``settlements`` but those whose spend a transaction in doubt turns out to have committed
    (marked done). Raises while the database cannot tell."""
    doubts = {id(s.spend_in_doubt): s.spend_in_doubt for s in settlements if s.spend_in_doubt}
    committed = set()
    for key, doubt in doubts.items():
        if await doubt.committed():
            committed.add(key)
    todo = []
    for s in settlements:
        if s.spend_in_doubt is not None:
            if id(s.spend_in_doubt) in committed:
                s.spend_done = True
                continue
            s.spend_in_doubt = None
        todo.append(s)
    return todo


class BudgetLedger(Protocol):
    lease_seconds: float  # how long a hold lasts unless renewed

    async def start(self) -> None:
        """Ready the ledger before the first request (see ``limits_redis.LIMITS_SINCE_KEY``)."""
        ...

    async def hold(
        self, token_id: str, hold_id: str, budget: int, want: int, minimum: int, expires_at: float
    ) -> BudgetHold:
        """Hold up to ``want`` (at least ``minimum``) nano-dollars of ``budget`` for a request."""
        ...

    async def settle(self, token_id: str, hold_id: str, held: int, cost: int) -> None:
        """Turn a hold into ``cost`` of spend and release the rest (``cost`` 0: release it all)."""
        ...

    async def renew(self, holds: Sequence[tuple[str, str, int]]) -> None:
        """Have each hold ``(token id, hold id, amount held)`` still there last a lease from now,
        in one round trip; a hold settled or expired and dropped meanwhile stays gone."""
        ...

    async def cancel(self, token_id: str, hold_id: str) -> None:
        """Give back hold ``hold_id`` whether or not it was taken, and keep it from being taken
        later: for a hold whose taking failed without saying whether it ran (a Redis that stalls
        past its timeout runs the script when it wakes)."""
        ...

    async def settle_many(self, settlements: Sequence[Settlement]) -> None:
        """:meth:`settle` for a batch, in one round trip to each place the ledger keeps. Marks in
        each settlement what landed; raises when something did not, and a later call with the
        same settlements does what is left (see :class:`Settlement`)."""
        ...

    async def add_spend(self, spends: Mapping[str, int]) -> None:
        """Add to each token's spend the cost of requests that held nothing (nano-dollars by
        token id): one write per token."""
        ...

    async def spent_and_held(self, token_id: str) -> tuple[int, int] | None:
        """What the token has spent and what its holds keep, when this ledger knows it."""
        ...

    async def spent_and_held_many(self, token_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """:meth:`spent_and_held` of several tokens in one round trip, by token id: those this
        ledger knows."""
        ...

    async def forget(self, token_ids: Sequence[str]) -> None:
        """Drop what the ledger keeps of tokens that no longer exist (their project deleted)."""
        ...

    async def close(self) -> None: ...


class StoreBudgetLedger:
    """Holds in the database: shared by every process and instance on it."""

    def __init__(self, store: Store, *, lease_seconds: float = HOLD_LEASE_SECONDS) -> None:
        self._store = store
        self.lease_seconds = lease_seconds

    async def start(self) -> None:
        return None

    async def hold(
        self, token_id: str, hold_id: str, budget: int, want: int, minimum: int, expires_at: float
    ) -> BudgetHold:
        # The store reads the budget from the token's row itself, so a changed budget applies at
        # once.
        return await self._store.reserve_budget(
            token_id, hold_id, want, minimum, self.lease_seconds
        )

    async def renew(self, holds: Sequence[tuple[str, str, int]]) -> None:
        await self._store.renew_budget_holds([h for _, h, _ in holds], self.lease_seconds)

    async def settle(self, token_id: str, hold_id: str, held: int, cost: int) -> None:
        await self._store.settle_budget(token_id, hold_id, cost)

    async def cancel(self, token_id: str, hold_id: str) -> None:
        # A transaction that failed was rolled back (its statement cancelled at the timeout): it
        # took nothing. A lost answer to its COMMIT aside, which the hold's expiry covers.
        return None

    async def settle_many(self, settlements: Sequence[Settlement]) -> None:
        # The hold and the spend are one transaction on the token's row: both land, or neither.
        todo = await _spend_not_committed([s for s in settlements if not s.spend_done])
        for s in settlements:
            s.hold_done = s.spend_done
        try:
            if todo:
                await self._store.settle_budgets([(s.token_id, s.hold_id, s.cost) for s in todo])
        except CommitInDoubt as doubt:
            for s in todo:
                s.spend_in_doubt = doubt
            raise
        for s in todo:
            s.hold_done = s.spend_done = True

    async def add_spend(self, spends: Mapping[str, int]) -> None:
        await self._store.settle_budgets([(token, "", cost) for token, cost in spends.items()])

    async def spent_and_held(self, token_id: str) -> tuple[int, int] | None:
        return None  # the token's row says it

    async def spent_and_held_many(self, token_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        return {}

    async def forget(self, token_ids: Sequence[str]) -> None:
        return None  # the token's row and its holds went with it (ON DELETE CASCADE)

    async def reclaim(self) -> int:
        """Return expired holds to their budgets; how many."""
        return await self._store.reclaim_budget_holds()

    async def close(self) -> None:
        return None


# KEYS[1]: the token's spend (a string, nano-dollars); KEYS[2]: its holds (a sorted set of
# "<hold id>:<amount>" scored by expiry, epoch microseconds by Redis's clock); KEYS[3]: the sum of
# those holds. The sum is kept as holds come and go, so taking a hold costs the same with 5 or
# 5,000 in flight (adding them up on every hold made Redis the bottleneck of a busy token, and a
# backlog of settlements made it slower still).
#
# The common start: drops expired holds (their requests never settled) from the set and the sum,
# and leaves the sum in `held`. A sum missing beside holds (written by a version that kept none)
# is counted once.
_HELD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local held = redis.call('GET', KEYS[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if held then
  held = tonumber(held)
  for _, member in ipairs(expired) do
    held = held - tonumber(string.match(member, ':(%d+)$'))
  end
else
  held = 0
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')) do
    held = held + tonumber(string.match(member, ':(%d+)$'))
  end
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
if held < 0 then held = 0 end
"""

# KEYS[4]: the holds cancelled before they were taken (see _CANCEL); KEYS[5]: LIMITS_SINCE_KEY.
# ARGV: budget, want, minimum, hold length (µs), hold id, spend to start from ("" when unknown),
# when the keys may go (epoch ms: the token's expiry).
# Answers {1, held, remaining}, {0, exhausted, remaining}, {-1} when the spend is not in Redis
# yet and must be read from the database first, or {-2, 0, lost_for_micros} while the holds of
# requests in progress may be missing (Redis lost its data: see limits_redis.py). The spend is not
# read again meanwhile either: settlements whose Redis part found it gone land in the database.
_HOLD = (
    """
if redis.call('ZSCORE', KEYS[4], ARGV[5]) then return {0, 0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""
    + lost_for_lua("KEYS[5]", "tonumber(ARGV[4])")
    + """
if lost_for > 0 then return {-2, 0, lost_for} end
local spent = redis.call('GET', KEYS[1])
if not spent then
  if ARGV[6] == '' then return {-1} end
  redis.call('SET', KEYS[1], ARGV[6], 'NX')
  spent = redis.call('GET', KEYS[1])
end
spent = tonumber(spent)
"""
    + _HELD
    + """
local budget, want, minimum = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local room = budget - spent - held
redis.call('PEXPIREAT', KEYS[1], ARGV[7])
if room < minimum then
  redis.call('SET', KEYS[3], held, 'PXAT', ARGV[7])
  local exhausted = 0
  -- models.budget_spent: the one rule of a budget spent for good
  if budget - spent < minimum then exhausted = 1 end
  return {0, exhausted, math.max(room, 0)}
end
local amount = math.min(want, room)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[5] .. ':' .. string.format('%d', amount))
redis.call('PEXPIREAT', KEYS[2], ARGV[7])
redis.call('SET', KEYS[3], string.format('%d', held + amount), 'PXAT', ARGV[7])
return {1, amount, room - amount}
"""
)

# ARGV: the hold's member, the cost, the amount held, 1 when an earlier attempt may have run. The
# spend grows only where Redis still has it: otherwise the next hold reads it, settled cost
# included, from the database. A hold already gone (expired, or settled before) leaves the sum as
# it is; and after an attempt that may have run, it means that attempt ran, so the cost is not
# added again.
_SETTLE = """
local removed = redis.call('ZREM', KEYS[2], ARGV[1]) == 1
if removed and redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('DECRBY', KEYS[3], ARGV[3]) < 0 then redis.call('SET', KEYS[3], 0, 'KEEPTTL') end
end
if (removed or ARGV[4] == '0') and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], ARGV[2])
end
return 1
"""

# KEYS: the token's holds, their sum, its cancelled holds (a sorted set of hold ids scored by
# when they may be forgotten). ARGV: the hold id, how long to remember it (µs). Gives the hold
# back when it was taken; else remembers it, so that a hold script run late (by a Redis that
# stalled past its client's timeout) takes nothing. Answers 1 when it gave a hold back.
_CANCEL = """
local prefix = ARGV[1] .. ':'
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(member, 1, #prefix) == prefix then
    redis.call('ZREM', KEYS[1], member)
    if redis.call('EXISTS', KEYS[2]) == 1 then
      local amount = tonumber(string.match(member, ':(%d+)$'))
      if redis.call('DECRBY', KEYS[2], amount) < 0 then redis.call('SET', KEYS[2], 0, 'KEEPTTL') end
    end
    return 1
  end
end
""" + remember_cancelled("KEYS[3]")

# KEYS[1]: a token's holds; KEYS[2]: their sum; KEYS[3]: LIMITS_SINCE_KEY. ARGV[1]: the lease
# (µs); ARGV[2...]: the members of its holds still running. A hold dropped meanwhile (settled, or
# expired and returned to the budget) is not taken again; one expired but not dropped yet is still
# in the sum, and stays. Except while Redis's holds are not trusted after it lost its data: a hold
# missing then is one it lost, taken again (a hold settled at that very moment stays a lease).
_RENEW = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""
    + lost_for_lua("KEYS[3]", "tonumber(ARGV[1])")
    + """
local expiry = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  elseif lost_for > 0 then
    redis.call('ZADD', KEYS[1], expiry, ARGV[i])
    if redis.call('EXISTS', KEYS[2]) == 1 then
      redis.call('INCRBY', KEYS[2], string.match(ARGV[i], ':(%d+)$'))
    end
    -- The token's next hold sets when the keys go (its expiry); until then, as long as that.
    if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], 86400000) end
  end
end
return 1
"""
)

# KEYS[1]: a token's spend; ARGV[1]: what requests that held nothing cost. Only where Redis has the
# spend, like a settlement: otherwise the token's first hold reads it all from the database.
_ADD_SPEND = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], ARGV[1]) end
return 1
"""

# Answers {spent or -1, held}.
_STATUS = (
    _HELD
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('SET', KEYS[3], held, 'KEEPTTL') end
local spent = redis.call('GET', KEYS[1])
if not spent then return {-1, held} end
return {tonumber(spent), held}
"""
)


# Keys unlinked by one command when a deleted project's tokens are forgotten: a project of many
# tokens does not hold Redis in one long command.
_FORGET_KEYS_AT_ONCE = 1_000


class RedisBudgetLedger:
    """Holds in Redis: no database round trip to admit a budgeted request."""

    def __init__(
        self,
        url: str,
        store: Store,
        *,
        timeout: float = 2.0,
        lease_seconds: float = HOLD_LEASE_SECONDS,
    ) -> None:
        self._store = store
        self.lease_seconds = lease_seconds
        self._redis = limits_client(url, timeout=timeout)
        self._hold = self._redis.register_script(_HOLD)
        self._settle = self._redis.register_script(_SETTLE)
        self._status = self._redis.register_script(_STATUS)
        self._add_spend = self._redis.register_script(_ADD_SPEND)
        self._cancel = self._redis.register_script(_CANCEL)
        self._renew = self._redis.register_script(_RENEW)

    async def start(self) -> None:
        await trust_from_start(self._redis)

    @staticmethod
    def _keys(token_id: str) -> list[str]:
        return [
            f"llm-proxy:spent:{token_id}",
            f"llm-proxy:holds:{token_id}",
            f"llm-proxy:held:{token_id}",
        ]

    @staticmethod
    def _cancelled_key(token_id: str) -> str:
        return f"llm-proxy:holds-cancelled:{token_id}"

    async def hold(
        self, token_id: str, hold_id: str, budget: int, want: int, minimum: int, expires_at: float
    ) -> BudgetHold:
        keys = [*self._keys(token_id), self._cancelled_key(token_id), LIMITS_SINCE_KEY]
        # The keys outlive the token by a day, for settlements of its last requests.
        args: list[int | str] = [
            budget,
            want,
            minimum,
            int(self.lease_seconds * 1e6),
            hold_id,
            "",
            int(expires_at + 86400) * 1000,
        ]
        answer = await once_more_on_a_new_connection(
            self._redis, lambda: self._hold(keys=keys, args=args)
        )
        if answer[0] == -1:
            token = await self._store.get_token(token_id)
            args[5] = token.spent_nanousd if token is not None else 0
            answer = await self._hold(keys=keys, args=args)
        if answer[0] == 1:
            return BudgetHold(True, int(answer[1]), int(answer[2]))
        if answer[0] == -2:
            return BudgetHold(False, 0, 0, unknown_for=int(answer[2]) / 1e6)
        return BudgetHold(False, 0, int(answer[2]), exhausted=bool(answer[1]))

    async def settle(self, token_id: str, hold_id: str, held: int, cost: int) -> None:
        await self.settle_many([Settlement(token_id, hold_id, held, cost)])

    async def cancel(self, token_id: str, hold_id: str) -> None:
        _, holds, held = self._keys(token_id)
        keys = [holds, held, self._cancelled_key(token_id)]
        args: list[str | int] = [hold_id, int(CANCEL_MEMORY_SECONDS * 1e6)]
        await once_more_on_a_new_connection(self._redis, lambda: self._cancel(keys=keys, args=args))

    async def renew(self, holds: Sequence[tuple[str, str, int]]) -> None:
        members: dict[str, list[str]] = {}
        for token_id, hold_id, held in holds:
            members.setdefault(token_id, []).append(f"{hold_id}:{held}")
        if members:
            await once_more_on_a_new_connection(self._redis, lambda: self._renew_all(members))

    async def _renew_all(self, members: dict[str, list[str]]) -> None:
        lease = int(self.lease_seconds * 1e6)
        async with self._redis.pipeline(transaction=False) as pipe:
            for token_id, held in members.items():
                keys = [*self._keys(token_id)[1:], LIMITS_SINCE_KEY]
                await self._renew(keys=keys, args=[lease, *held], client=pipe)
            await pipe.execute()

    async def settle_many(self, settlements: Sequence[Settlement]) -> None:
        # Redis first, as the hold keeps the budget from other requests; the database whether or
        # not Redis answered, as it keeps the spend for good (and seeds a Redis that lost it).
        failure: Exception | None = None
        holds = [s for s in settlements if not s.hold_done]
        if holds:
            try:
                await once_more_on_a_new_connection(self._redis, lambda: self._settle_holds(holds))
            except Exception as exc:
                failure = exc
        try:
            await self._record_spend([s for s in settlements if not s.spend_done])
        except Exception as exc:
            failure = failure or exc
        if failure is not None:
            raise failure

    async def _settle_holds(self, holds: list[Settlement]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for s in holds:
                    await self._settle(
                        keys=self._keys(s.token_id),
                        args=[f"{s.hold_id}:{s.held}", s.cost, s.held, int(s.hold_in_doubt)],
                        client=pipe,
                    )
                await pipe.execute()
        except BaseException:
            # Sent or not, run or not: Redis may have settled any of them.
            for s in holds:
                s.hold_in_doubt = True
            raise
        for s in holds:
            s.hold_done = True

    async def _record_spend(self, settlements: list[Settlement]) -> None:
        todo = await _spend_not_committed(settlements)
        spent: dict[str, int] = {}
        for s in todo:
            if s.cost:
                spent[s.token_id] = spent.get(s.token_id, 0) + s.cost
        try:
            if spent:
                await self._store.settle_budgets([(t, "", cost) for t, cost in spent.items()])
        except CommitInDoubt as doubt:
            for s in todo:
                s.spend_in_doubt = doubt
            raise
        for s in todo:
            s.spend_done = True

    async def add_spend(self, spends: Mapping[str, int]) -> None:
        # The database first: it keeps this spend, and only its failure is worth a retry. Redis
        # then adds it where it has the token's spend (a token that had a budget); a hold that
        # seeds the spend from the database between the two counts it twice there, erring on the
        # side a budget errs on.
        await self._store.settle_budgets([(token, "", cost) for token, cost in spends.items()])
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for token_id, cost in spends.items():
                    await self._add_spend(keys=self._keys(token_id)[:1], args=[cost], client=pipe)
                await pipe.execute()
        except Exception as exc:
            # Not retried, or the database would have it twice: Redis lacks it until it reseeds.
            log.error("budget_ledger.redis_spend_failed", tokens=len(spends), error=str(exc))

    async def spent_and_held(self, token_id: str) -> tuple[int, int] | None:
        return (await self.spent_and_held_many([token_id])).get(token_id)

    async def spent_and_held_many(self, token_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        # One pipeline on one connection: a call per token at once took a connection each, and a
        # list longer than the pool failed past it (and left none for admission meanwhile).
        answers = await once_more_on_a_new_connection(
            self._redis, lambda: self._statuses(token_ids)
        )
        return {
            token_id: (int(spent), int(held))
            for token_id, (spent, held) in zip(token_ids, answers, strict=True)
            if spent != -1
        }

    async def forget(self, token_ids: Sequence[str]) -> None:
        # Otherwise they would stay until a day past their tokens' expiry, up to a year on.
        keys = [
            key
            for token_id in token_ids
            for key in (*self._keys(token_id), self._cancelled_key(token_id))
        ]
        for start in range(0, len(keys), _FORGET_KEYS_AT_ONCE):
            unlink = partial(self._redis.unlink, *keys[start : start + _FORGET_KEYS_AT_ONCE])
            await once_more_on_a_new_connection(self._redis, unlink)

    async def _statuses(self, token_ids: Sequence[str]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for token_id in token_ids:
                await self._status(keys=self._keys(token_id), client=pipe)
            return await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()
