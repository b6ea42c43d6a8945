"""Applying the numbered migrations to a PostgreSQL database that other instances keep serving
from: during a rolling upgrade the instances of the release before go on answering until each is
replaced, so a migration must never hold their statements for long."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import structlog

from llm_proxy.models import utcnow
from llm_proxy.store.migrations import migration_scripts, refuse_newer, serves_from

log = structlog.get_logger(__name__)

# A connection the caller holds for the whole of migrating (pooled or not).
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# Arbitrary, fixed key of the advisory lock instances starting together take to migrate in turn.
MIGRATION_LOCK = 0x6C6C_6D70_0002
# How long migrating may take, and an instance wait for another's migration: a migration may
# rewrite a whole table (008 goes through every token and usage row), which takes longer than any
# query of the request path, and a start that gives up leaves the migration it was in undone, to
# start again (those before it stay applied).
MIGRATION_TIMEOUT = 3600.0
# How long a migration waits for a table's lock before it gives up, lets the statements queued
# behind it through, and tries again after a pause. PostgreSQL queues every later statement on a
# table behind an ALTER TABLE that waits, so a wait well under the request path's query bound
# (postgres._TIMEOUT) delays the other instances' requests instead of failing them, however long
# the transaction holding the table up lasts (a backup's pg_dump, an instance stalled mid-way).
LOCK_WAIT = "500ms"
RETRY_PAUSE = 2.0
# How many attempts in a row pass between two log lines about a migration held up.
_LOG_EVERY = 30
# How often an instance tries again for the migration lock while another holds it.
_LOCK_POLL = 0.2
# A migration that builds an index this way is applied outside a transaction, as its script's
# only statement (several in one script would make PostgreSQL run them as one transaction); the
# index's name, for an interrupted build's leftover to be found.
_CONCURRENT_INDEX = re.compile(
    r"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)",
    re.IGNORECASE | re.MULTILINE,
)


async def apply_migrations(conn: Conn) -> list[int]:
    """Apply the migrations the database lacks, in order, each in a transaction of its own
    (one that builds an index CONCURRENTLY outside any); the versions applied. Raises
    :class:`~llm_proxy.store.migrations.SchemaNewerThanRelease`, having changed nothing, when it
    records migrations this release does not ship and may not serve on (``refuse_newer``)."""
    applied_now: list[int] = []
    deadline = asyncio.get_running_loop().time() + MIGRATION_TIMEOUT
    held_up = 0
    while True:
        try:
            async with conn.transaction():
                step = await _apply_next(conn)
        except _MigrationLockBusy:
            await _wait_for_the_lock(deadline)  # out of the transaction: see _MigrationLockBusy
            continue
        except asyncpg.LockNotAvailableError:
            if asyncio.get_running_loop().time() + RETRY_PAUSE > deadline:
                raise
            if held_up % _LOG_EVERY == 0:
                log.warning(
                    "store.migration_held_up",
                    attempts=held_up + 1,
                    why="a transaction of another session holds a table it changes",
                )
            held_up += 1
            await asyncio.sleep(RETRY_PAUSE)
            continue
        if step is None:
            return applied_now
        version, left = step
        if left is not None and not await _build_concurrently(conn, version, left, deadline):
            continue  # another instance recorded it meanwhile
        applied_now.append(version)


async def _apply_next(conn: Conn) -> tuple[int, str | None] | None:
    """In the caller's transaction, the first migration the database lacks: applied and
    recorded, ``(version, None)``; or, when it builds an index CONCURRENTLY, which PostgreSQL
    refuses in a transaction, ``(version, sql)`` for :func:`_build_concurrently` to apply after
    it. None when it lacks none."""
    # Instances starting together wait for the one migrating (trying again for its lock, see
    # _MigrationLockBusy), then find nothing to do. The lock of one migration's transaction, not
    # of the whole upgrade's: each migration commits on its own, so the lock one takes on a whole
    # table (ALTER TABLE) is not held through the next, which may go through every row for
    # minutes while the instances of the release before still serve from that table. (A
    # transaction's lock also holds behind a pooler in transaction mode, which a session's would
    # not.)
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", MIGRATION_LOCK):
        raise _MigrationLockBusy
    # Only once that lock is held: waiting for it is waiting for another instance's migration.
    await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'")
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
    )
    # Each migration's serves-from marker (migrations.py), as a last, nullable column: releases
    # before it read only the version and insert (version, applied_at) positionally, which
    # PostgreSQL takes as the first two columns, so they go on working on the table as it is now.
    await conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS serves_from INTEGER")
    recorded = {
        r["version"]: r["serves_from"]
        for r in await conn.fetch("SELECT version, serves_from FROM schema_migrations")
    }
    refuse_newer(recorded, "postgresql")
    for version, sql in migration_scripts("postgresql"):
        if version not in recorded:
            if _CONCURRENT_INDEX.search(sql):
                return version, sql
            await conn.execute(sql, timeout=MIGRATION_TIMEOUT)
            await _record(conn, version, sql)
            return version, None
    return None


async def _build_concurrently(conn: Conn, version: int, sql: str, deadline: float) -> bool:
    """Apply a migration that builds an index CONCURRENTLY (its one statement), outside any
    transaction, and record it; False when another instance recorded it first.

    A plain CREATE INDEX holds a SHARE lock on its table for the whole build, and every write of
    the request path (a token's request count) waits behind it while the instances of the
    release before serve; CONCURRENTLY builds without blocking them. It cannot run in a
    transaction, so the instances take turns with the migration lock held by the session (the
    same key: it excludes the transactions' lock too). Two concurrent builds on one table would
    deadlock each other."""
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK):
        await _wait_for_the_lock(deadline)
    try:
        if await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", version):
            return False
        for name in _CONCURRENT_INDEX.findall(sql):
            await _drop_if_invalid(conn, name, version)
        await conn.execute(sql, timeout=MIGRATION_TIMEOUT)
        # Only now: a build that fails leaves the migration to the next start.
        return await _record(conn, version, sql)
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


class _MigrationLockBusy(Exception):
    """Another instance holds :data:`MIGRATION_LOCK`: tried again, out of any transaction.

    Not waited for in a statement, nor in a transaction kept open: either holds a snapshot, which
    a concurrent index build waits to end before it finishes, while the build's instance holds
    the lock (a deadlock)."""


async def _wait_for_the_lock(deadline: float) -> None:
    """Pause before trying again for :data:`MIGRATION_LOCK`, which another instance holds;
    raises TimeoutError once that would pass ``deadline`` (the whole migrating's bound)."""
    if asyncio.get_running_loop().time() + _LOCK_POLL > deadline:
        raise TimeoutError("another instance kept migrating past the bound")
    await asyncio.sleep(_LOCK_POLL)


async def _drop_if_invalid(conn: Conn, index: str, version: int) -> None:
    """Drop ``index`` when a build of it was interrupted (a failed start, a lost connection):
    left behind INVALID, never used, yet found by IF NOT EXISTS. (No build of it runs: this
    session holds the migration lock.)"""
    valid = await conn.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", index
    )
    if valid is False:
        log.warning("store.invalid_index_rebuilt", index=index, migration=f"{version:03d}")
        # Concurrently too, so writes go on meanwhile.
        await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}", timeout=MIGRATION_TIMEOUT)


async def _record(conn: Conn, version: int, sql: str) -> bool:
    """Record ``version`` applied; False when it already was (another instance's build)."""
    status = await conn.execute(
        "INSERT INTO schema_migrations (version, applied_at, serves_from) VALUES ($1, $2, $3)"
        " ON CONFLICT (version) DO NOTHING",
        version,
        utcnow(),
        serves_from(sql),
    )
    return bool(status == "INSERT 0 1")
