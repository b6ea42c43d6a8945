"""A migration recorded in a database as a newer release records it, behind this release's back:
what a rollback, or an instance of the release before restarted mid-upgrade, finds."""

from __future__ import annotations

import sqlite3

import asyncpg

from llm_proxy.store.opening import sqlite_path


async def record_newer_migration(
    database_url: str, version: int, serves_from: int | None = None
) -> None:
    """Record ``version`` applied, with the ``-- serves-from`` its script declared (None: none),
    in a database this release has migrated."""
    if database_url.startswith("postgresql"):
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(
                "INSERT INTO schema_migrations (version, applied_at, serves_from)"
                " VALUES ($1, now(), $2)",
                version,
                serves_from,
            )
        finally:
            await connection.close()
        return
    with sqlite3.connect(sqlite_path(database_url), timeout=30) as db:
        db.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, 'later')", (version,)
        )
        if serves_from is not None:
            db.execute(
                "INSERT INTO schema_migrations_serves_from VALUES (?, ?)", (version, serves_from)
            )
    db.close()
