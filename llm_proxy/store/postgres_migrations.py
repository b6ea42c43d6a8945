"""Applying the numbered migrations to a PostgreSQL database that other instances keep serving
from: during a rolling upgrade the instances of the release before go on answering until each is
replaced, so a migration must never hold their statements for long."""

from __future__ import annotations

import asyncio

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


async def apply_migrations(conn: Conn) -> list[int]:
    """Apply the migrations the database lacks, in order, each in a transaction of its own; the
    versions applied. Raises :class:`~llm_proxy.store.migrations.SchemaNewerThanRelease`,
    having changed nothing, when it records migrations this release does not ship and may not
    serve on (``refuse_newer``)."""
    applied_now: list[int] = []
    deadline = asyncio.get_running_loop().time() + MIGRATION_TIMEOUT
    held_up = 0
    while True:
        try:
            async with conn.transaction():
                version = await _apply_next(conn)
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
        if version is None:
            return applied_now
        applied_now.append(version)


async def _apply_next(conn: Conn) -> int | None:
    """In the caller's transaction, the first migration the database lacks, applied and
    recorded; its version, or None when it lacks none."""
    # Instances starting together wait for the one migrating, then find nothing to do. The lock
    # of one migration's transaction, not of the whole upgrade's: each migration commits on its
    # own, so the lock one takes on a whole table (ALTER TABLE) is not held through the next,
    # which may go through every row for minutes while the instances of the release before
    # still serve from that table. (A transaction's lock also holds behind a pooler in
    # transaction mode, which a session's would not.)
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK, timeout=MIGRATION_TIMEOUT
    )
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
            await conn.execute(sql, timeout=MIGRATION_TIMEOUT)
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_at, serves_from)"
                " VALUES ($1, $2, $3)",
                version,
                utcnow(),
                serves_from(sql),
            )
            return version
    return None
