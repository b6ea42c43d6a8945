"""The Redis budget ledger against a real redis-server: holds, their running sum, expiry, and
settlement in batches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from llm_proxy.models import AuditEntry
from llm_proxy.proxy.budget_ledger import RedisBudgetLedger, Settlement
from llm_proxy.store import Store
from llm_proxy.store.opening import open_store
from tests.events.events_support import RedisServer
from tests.proxy.test_settlement_retry import add_token

AUDIT = AuditEntry(actor="test", action="change", target_type="thing")
BUDGET = 1_000_000


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await open_store(f"sqlite:///{tmp_path}/ledger.db")
    await add_token(opened, BUDGET)
    yield opened
    await opened.close()


@pytest.fixture
async def ledger(redis_server: RedisServer, store: Store) -> AsyncIterator[RedisBudgetLedger]:
    opened = RedisBudgetLedger(redis_server.url, store)
    await opened.start()  # as the server does
    yield opened
    await opened.close()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def expiry() -> float:
    return time.time() + 3600


async def test_many_holds_in_flight_add_up_exactly_and_settle_in_one_batch(
    ledger: RedisBudgetLedger, redis: Redis
) -> None:
    holds = [await ledger.hold("t1", f"h{i}", BUDGET, 1_000, 100, expiry()) for i in range(500)]
    assert all(h.admitted and h.held_nanousd == 1_000 for h in holds)
    assert holds[-1].remaining_nanousd == BUDGET - 500_000
    # The room left is shared out, then refused for now (not exhausted: holds may come back).
    assert (await ledger.hold("t1", "big", BUDGET, 10**9, 100, expiry())).held_nanousd == 500_000
    refused = await ledger.hold("t1", "more", BUDGET, 1_000, 100, expiry())
    assert (refused.admitted, refused.exhausted) == (False, False)
    assert await ledger.spent_and_held("t1") == (0, BUDGET)

    await ledger.settle_many(
        [Settlement("t1", f"h{i}", 1_000, 400) for i in range(500)]
        + [Settlement("t1", "big", 500_000, 0)]
    )
    assert await ledger.spent_and_held("t1") == (200_000, 0)
    assert await redis.zcard("llm-proxy:holds:t1") == 0
    # Settling the same holds again (a replayed batch) releases nothing twice.
    await ledger.settle_many([Settlement("t1", "h0", 1_000, 0)])
    assert await ledger.spent_and_held("t1") == (200_000, 0)


async def test_an_expired_hold_returns_to_the_budget_on_the_next_hold(
    ledger: RedisBudgetLedger, redis: Redis
) -> None:
    await ledger.hold("t1", "alive", BUDGET, 100_000, 100, expiry())
    # A hold of a process that died long ago: expired by Redis's clock.
    await redis.zadd("llm-proxy:holds:t1", {"dead:300000": 1})
    await redis.incrby("llm-proxy:held:t1", 300_000)
    assert await ledger.spent_and_held("t1") == (0, 100_000)
    taken = await ledger.hold("t1", "next", BUDGET, 10**9, 100, expiry())
    assert taken.held_nanousd == BUDGET - 100_000
    assert await redis.zcard("llm-proxy:holds:t1") == 2


async def test_holds_written_without_a_sum_are_counted_once(
    ledger: RedisBudgetLedger, redis: Redis
) -> None:
    """Holds taken by a version that kept no running sum still count."""
    await ledger.hold("t1", "first", BUDGET, 1_000, 100, expiry())
    far = int((time.time() + 3600) * 1e6)
    await redis.zadd("llm-proxy:holds:t1", {"old-a:200000": far, "old-b:300000": far})
    await redis.delete("llm-proxy:held:t1")
    assert await ledger.spent_and_held("t1") == (0, 501_000)
    taken = await ledger.hold("t1", "next", BUDGET, 10**9, 100, expiry())
    assert taken.held_nanousd == BUDGET - 501_000
    await ledger.settle_many([Settlement("t1", "old-a", 200_000, 200_000)])
    assert await ledger.spent_and_held("t1") == (200_000, 1_000 + 300_000 + taken.held_nanousd)


async def test_a_renewed_hold_outlives_its_lease_and_one_dropped_stays_gone(
    redis_server: RedisServer, store: Store, redis: Redis
) -> None:
    ledger = RedisBudgetLedger(redis_server.url, store, lease_seconds=1.0)
    await ledger.start()
    try:
        renewed = await ledger.hold("t1", "renewed", BUDGET, 300_000, 100, expiry())
        await ledger.hold("t1", "lapsing", BUDGET, 200_000, 100, expiry())
        settled = await ledger.hold("t1", "settled", BUDGET, 100_000, 100, expiry())
        await ledger.settle("t1", "settled", settled.held_nanousd, 0)
        # One round trip for all: a hold settled meanwhile is not taken again.
        await ledger.renew(
            [("t1", "renewed", renewed.held_nanousd), ("t1", "settled", settled.held_nanousd)]
        )
        await ledger.renew([("t1", "renewed", renewed.held_nanousd)])
        await asyncio.sleep(1.2)  # the first lease of each is over; only the renewal keeps one
        await ledger.renew([("t1", "renewed", renewed.held_nanousd)])
        assert await ledger.spent_and_held("t1") == (0, 300_000)
        assert await redis.zrange("llm-proxy:holds:t1", 0, -1) == [b"renewed:300000"]
    finally:
        await ledger.close()
