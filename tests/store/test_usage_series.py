"""Usage by hour (the admin charts) and its retention, on each backend: SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from llm_proxy.models import UsageRollup, utcnow
from llm_proxy.runtime.settings import (
    DEFAULT_USAGE_HOURLY_RETENTION_DAYS,
    Settings,
    SettingsError,
    parse_retention_days,
)
from llm_proxy.store import Store
from llm_proxy.store.opening import open_store
from llm_proxy.store.retention import prune_usage_every, prune_usage_once

HOUR = datetime(2030, 5, 1, 10, 0, tzinfo=UTC)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await open_store(database_url)
    yield opened
    await opened.close()


def rollup(token_id: str, project_id: str, at: datetime, requests: int) -> UsageRollup:
    return UsageRollup(
        token_id, project_id, at, requests, 10 * requests, 5 * requests, 15 * requests,
        requests // 2, at, 1_000 * requests,
    )  # fmt: skip


async def test_usage_by_hour_sums_each_hour_for_everything_a_project_or_a_token(
    store: Store,
) -> None:
    await store.add_usage_rollup(
        [
            rollup("t1", "p1", HOUR + timedelta(minutes=5), 2),
            rollup("t2", "p1", HOUR + timedelta(minutes=59), 3),
            rollup("t3", "p2", HOUR + timedelta(minutes=1), 4),
            rollup("t1", "p1", HOUR + timedelta(hours=2, minutes=30), 1),
            rollup("t1", "p1", HOUR - timedelta(hours=1), 7),  # before the window asked for
        ]
    )
    everything = await store.usage_by_hour(HOUR + timedelta(minutes=45))  # from 10:00 on
    assert [(at, t.requests) for at, t in everything] == [
        (HOUR, 9),
        (HOUR + timedelta(hours=2), 1),
    ]
    first = everything[0][1]
    assert (first.prompt_tokens, first.completion_tokens, first.total_tokens) == (90, 45, 135)
    assert (first.errors, first.cost_nanousd) == (1 + 1 + 2, 9_000)
    assert first.last_used_at == HOUR + timedelta(minutes=59)
    assert all(type(getattr(first, f)) is int for f in ("requests", "total_tokens", "cost_nanousd"))
    assert all(at.utcoffset() == timedelta(0) for at, _ in everything)

    by_project = await store.usage_by_hour(HOUR, project_id="p1")
    assert [(at, t.requests) for at, t in by_project] == [(HOUR, 5), (HOUR + timedelta(hours=2), 1)]
    by_token = await store.usage_by_hour(HOUR - timedelta(hours=1), token_id="t1")
    assert [t.requests for _, t in by_token] == [7, 2, 1]
    both = await store.usage_by_hour(HOUR, project_id="p2", token_id="t1")
    assert both == []
    assert await store.usage_by_hour(HOUR + timedelta(hours=3)) == []


async def test_pruning_deletes_the_hours_before_the_cutoff_and_nothing_else(
    store: Store,
) -> None:
    await store.add_usage_rollup(
        [
            rollup("t1", "p1", HOUR - timedelta(days=100), 1),
            rollup("t2", "p1", HOUR - timedelta(days=91), 1),
            rollup("t1", "p1", HOUR - timedelta(hours=1, minutes=1), 1),
            rollup("t1", "p1", HOUR, 2),
            rollup("t2", "p2", HOUR + timedelta(minutes=30), 3),
        ]
    )
    # The cutoff's own hour is kept, whatever minute the cutoff falls on.
    assert await store.prune_usage_hourly(HOUR + timedelta(minutes=40)) == 3
    assert await store.prune_usage_hourly(HOUR + timedelta(minutes=40)) == 0
    left = await store.usage_by_hour(HOUR - timedelta(days=365))
    assert [(at, t.requests) for at, t in left] == [(HOUR, 5)]
    # The totals count what is kept.
    assert (await store.token_usage("t1")).requests == 2
    assert (await store.project_usage("p1")).requests == 2


async def test_the_retention_loop_prunes_at_once_and_keeps_the_days_it_is_told_to(
    store: Store,
) -> None:
    now = utcnow()
    await store.add_usage_rollup(
        [
            rollup("old", "p", now - timedelta(days=91), 1),
            rollup("kept", "p", now - timedelta(days=89), 1),
            rollup("new", "p", now, 1),
        ]
    )
    task = asyncio.create_task(prune_usage_every(store, 90, seconds=3600))
    try:
        for _ in range(200):
            if (await store.token_usage("old")).requests == 0:
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (await store.token_usage("old")).requests == 0
    assert (await store.token_usage("kept")).requests == 1
    assert (await store.token_usage("new")).requests == 1
    assert await prune_usage_once(store, 90) == 0
    # Thirty days is what the charts show: a shorter retention leaves less of them.
    assert await prune_usage_once(store, 30) == 1
    assert (await store.token_usage("new")).requests == 1


def test_the_retention_setting_defaults_to_90_days_and_reads_whole_days() -> None:
    assert Settings().usage_hourly_retention_days == DEFAULT_USAGE_HOURLY_RETENTION_DAYS == 90
    assert parse_retention_days("USAGE_HOURLY_RETENTION_DAYS", "30") == 30
    assert parse_retention_days("USAGE_HOURLY_RETENTION_DAYS", "0") == 0  # keep everything
    for bad, problem in (("-1", "between 0 and 36500"), ("ninety", "whole number")):
        with pytest.raises(SettingsError, match=rf"^USAGE_HOURLY_RETENTION_DAYS: .*{problem}"):
            parse_retention_days("USAGE_HOURLY_RETENTION_DAYS", bad)
