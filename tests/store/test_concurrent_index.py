"""Migration 010's index on PostgreSQL, built CONCURRENTLY: the instances of the release before
go on writing to tokens (each request's count) while it builds, an interrupted build is rebuilt,
and the migration is recorded only once the index is valid."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest

from llm_proxy.store import Store
from llm_proxy.store.opening import open_store
from tests.store.test_store import AUDIT, project, token

pytestmark = [pytest.mark.postgres, pytest.mark.process]

INDEX = "tokens_by_expiry"
VERSION = 10


@pytest.fixture
async def database(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A database this release migrated, two tokens in it, and 010 not applied yet (as a
    database of the release before): a connection to it, as another instance's."""
    store = await open_store(postgres_url)
    try:
        await store.create_project(project(), AUDIT)
        first = token("t1")
        await store.create_token(first, "hash-1", AUDIT)
        second = replace(token("t2"), expires_at=first.expires_at)
        await store.create_token(second, "hash-2", AUDIT)
    finally:
        await store.close()
    connection = await asyncpg.connect(postgres_url)
    await connection.execute(f"DROP INDEX {INDEX}")
    await connection.execute("DELETE FROM schema_migrations WHERE version = $1", VERSION)
    yield connection
    await connection.close()


async def _index_state(connection: asyncpg.Connection) -> tuple[bool, bool] | None:
    """(valid, unique) of the index; None when there is none."""
    row = await connection.fetchrow(
        "SELECT indisvalid, indisunique FROM pg_index WHERE indexrelid = to_regclass($1)", INDEX
    )
    return None if row is None else (row["indisvalid"], row["indisunique"])


async def _migrate(postgres_url: str) -> list[int]:
    store: Store = await open_store(postgres_url, migrate=False)
    try:
        return await store.migrate()
    finally:
        await store.close()


async def test_the_index_is_built_and_recorded(
    database: asyncpg.Connection, postgres_url: str
) -> None:
    assert await _migrate(postgres_url) == [VERSION]
    assert await _index_state(database) == (True, False)
    assert await _migrate(postgres_url) == []


async def test_an_interrupted_build_s_invalid_index_is_rebuilt(
    database: asyncpg.Connection, postgres_url: str
) -> None:
    # A concurrent build that fails leaves its index behind, INVALID (here: unique, on two
    # tokens that expire at the same moment), which IF NOT EXISTS alone would keep.
    with pytest.raises(asyncpg.UniqueViolationError):
        await database.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {INDEX} ON tokens(expires_at)")
    assert await _index_state(database) == (False, True)

    assert await _migrate(postgres_url) == [VERSION]
    assert await _index_state(database) == (True, False)


async def test_writes_to_tokens_go_on_while_the_index_builds(
    database: asyncpg.Connection, postgres_url: str
) -> None:
    """A transaction that wrote to tokens and is still open (an instance's request): the build
    waits for it to end, as any index build does. A plain build waits holding a SHARE lock on
    tokens, so every other write to tokens queues behind it; a concurrent one blocks none."""
    await database.execute("BEGIN")
    await database.execute("UPDATE tokens SET request_count = request_count + 1 WHERE id = 't1'")
    migrating = asyncio.create_task(_migrate(postgres_url))
    try:
        waits = await _lock_waits_of_others(database)
        assert [w for w in waits if w["relation"] == "tokens"] == [], waits
        writer = await asyncpg.connect(postgres_url)
        try:
            await writer.execute("SET lock_timeout = '5s'")
            await writer.execute(
                "UPDATE tokens SET request_count = request_count + 1 WHERE id = 't2'"
            )
        finally:
            await writer.close()
        assert not migrating.done()  # still waiting for the open transaction, not past it
    finally:
        await database.execute("COMMIT")
    assert await asyncio.wait_for(migrating, 30) == [VERSION]
    assert await _index_state(database) == (True, False)


async def _lock_waits_of_others(connection: asyncpg.Connection) -> list[asyncpg.Record]:
    """The locks another session waits for, once one does (the migration, waiting for the
    transaction ``connection`` holds open)."""
    for _ in range(600):
        waits = await connection.fetch(
            "SELECT locktype, mode, relation::regclass::text AS relation FROM pg_locks"
            " WHERE NOT granted AND pid <> pg_backend_pid()"
        )
        if waits:
            return waits
        await asyncio.sleep(0.05)
    raise AssertionError("the migration never waited for the open transaction")
