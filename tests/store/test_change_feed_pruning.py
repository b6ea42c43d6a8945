"""The change feed is pruned: old changes go, a bounded number at a time, and a reader whose
cursor was behind what went is told that anything may have changed. On each backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from llm_proxy.models import AuditEntry, utcnow
from llm_proxy.store import Store
from llm_proxy.store.opening import open_store, sqlite_path
from llm_proxy.store.retention import (
    CHANGES_RETENTION_SECONDS,
    changes_retention,
    prune_changes_every,
    prune_changes_once,
)
from tests.sqlite_writes import write_sqlite
from tests.store.test_store import project, token

AUDIT = AuditEntry(actor="test", action="change", target_type="thing")
ANYTHING = (None, None)


@pytest.fixture
def proxy_database_url(database_url: str) -> str:
    return database_url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await open_store(database_url)
    await opened.create_project(project(), AUDIT)
    for n in range(10):
        await opened.create_token(token(f"t{n}"), f"hash-{n}", AUDIT)
    yield opened
    await opened.close()


async def revoke(store: Store, *numbers: int) -> None:
    for n in numbers:
        await store.update_token(f"t{n}", {"is_active": False}, AUDIT)


async def test_changes_older_than_the_cutoff_go_and_readers_behind_them_start_over(
    store: Store,
) -> None:
    start = await store.latest_change()
    await revoke(store, 0, 1, 2)
    after_three = await store.latest_change()
    cutoff = utcnow()
    await revoke(store, 3, 4)

    # The last change before the cutoff stays: a reader that read it missed nothing.
    assert await store.prune_changes(cutoff, 100) == 2
    assert await store.prune_changes(cutoff, 100) == 0
    # A reader that had read them all goes on as before ...
    latest, changes = await store.changes_since(after_three)
    assert changes == [("p1", "t3"), ("p1", "t4")]
    # ... one that had not is told that anything may have changed, and what is left.
    assert await store.changes_since(start) == (
        latest,
        [ANYTHING, ("p1", "t2"), ("p1", "t3"), ("p1", "t4")],
    )

    # Everything is past the cutoff: the newest change stays, so the ids go on from it.
    assert await store.prune_changes(utcnow() + timedelta(seconds=1), 100) == 2
    assert await store.changes_since(latest) == (latest, [])
    assert await store.latest_change() == latest
    await revoke(store, 5)
    assert await store.changes_since(latest) == (latest + 1, [("p1", "t5")])
    assert await store.changes_since(after_three) == (
        latest + 1,
        [ANYTHING, ("p1", "t4"), ("p1", "t5")],
    )


async def test_a_pass_deletes_a_bounded_number_of_changes(store: Store) -> None:
    await revoke(store, *range(10))
    later = utcnow() + timedelta(seconds=1)
    assert [await store.prune_changes(later, 4) for _ in range(4)] == [4, 4, 1, 0]


async def test_the_pruning_loop_prunes_at_once_and_keeps_the_retention(store: Store) -> None:
    await revoke(store, 0, 1, 2)
    before = await store.latest_change()
    await asyncio.sleep(0.01)  # past the retention, the newest too
    task = asyncio.create_task(prune_changes_every(store, 0.001, seconds=3600))
    try:
        for _ in range(200):
            if await store.changes_since(before - 3) == (before, [ANYTHING, ("p1", "t2")]):
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # The newest is kept.
    assert await store.changes_since(before - 3) == (before, [ANYTHING, ("p1", "t2")])
    await revoke(store, 3)
    # An hour's retention keeps a change made a moment ago.
    assert await prune_changes_once(store, CHANGES_RETENTION_SECONDS) == 0
    assert await store.changes_since(before) == (before + 1, [("p1", "t3")])


def test_the_retention_stays_well_above_the_staleness_allowed() -> None:
    assert changes_retention(5.0) == CHANGES_RETENTION_SECONDS == 3600.0
    assert changes_retention(1800.0) == 18000.0


async def age_every_change(database_url: str) -> None:
    """As if every change so far had been made two hours ago."""
    if database_url.startswith("postgresql"):
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute("UPDATE changes SET at = now() - interval '2 hours'")
        finally:
            await connection.close()
    else:
        await write_sqlite(
            sqlite_path(database_url), "UPDATE changes SET at = '2000-01-01T00:00:00.000000Z'"
        )


async def test_a_server_prunes_changes_older_than_an_hour_as_it_starts(
    store: Store, database_url: str, proxy_factory: Any
) -> None:
    start = await store.latest_change()
    await revoke(store, 0, 1, 2)
    await age_every_change(database_url)
    await revoke(store, 3)
    latest = await store.latest_change()

    await proxy_factory(encryption_key_check=False)  # (the fixture's project key is no real one)
    for _ in range(200):
        if (await store.changes_since(start))[1][0] == ANYTHING:
            break
        await asyncio.sleep(0.02)
    # The old ones went but the last of them; the one made since the hour stays.
    assert await store.changes_since(start) == (latest, [ANYTHING, ("p1", "t2"), ("p1", "t3")])


async def skip_change_ids(database_url: str, count: int) -> None:
    """As PostgreSQL does after a rolled-back change or a restart (its sequence runs ahead):
    the next change's id is ``count`` past the one after the newest."""
    if database_url.startswith("postgresql"):
        connection = await asyncpg.connect(database_url)
        try:
            for _ in range(count):
                await connection.execute("SELECT nextval(pg_get_serial_sequence('changes', 'id'))")
        finally:
            await connection.close()
    else:
        await write_sqlite(
            sqlite_path(database_url),
            "UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'changes'",
            (count,),
        )


async def test_a_reader_that_missed_nothing_is_not_told_to_start_over(
    store: Store, database_url: str
) -> None:
    # A quiet hour: the last change a reader read is old.
    await revoke(store, 0, 1, 2)
    read = await store.latest_change()
    await age_every_change(database_url)
    # The next change comes after a gap in the ids, and the feed is pruned before the reader
    # reads it (every process prunes every minute; a reader reads every quarter second).
    await skip_change_ids(database_url, 3)
    await revoke(store, 3)
    assert await prune_changes_once(store, CHANGES_RETENTION_SECONDS) == 2
    # The reader had every change up to the one it has not read yet: it is not told that
    # anything may have changed (every process of every instance would drop its whole token
    # cache at once), only what did.
    latest, changes = await store.changes_since(read)
    assert changes == [("p1", "t3")]
    assert latest == await store.latest_change()
    # One that had not read a change that went is still told to start over.
    assert (await store.changes_since(read - 2))[1] == [ANYTHING, ("p1", "t2"), ("p1", "t3")]
