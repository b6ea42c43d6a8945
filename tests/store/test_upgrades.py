"""Databases an earlier release wrote, opened by this one: each backend's schema as it was at an
earlier migration (built from the migration files this repository ships, the ones that release
ran), its rows written as that release wrote them, then migrated here."""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import pytest

from llm_proxy.models import utcnow
from llm_proxy.store import postgres, postgres_migrations
from llm_proxy.store.migrations import migration_scripts
from llm_proxy.store.opening import open_store, sqlite_path

# Rows of a database a release at migration 006 served (before 007, spend counted budget holds
# only): a token without a budget whose requests the usage aggregates priced, a budgeted one
# whose holds settled less than its requests cost in all (some came before its budget was set),
# and one whose budget was taken off after it spent more than its aggregates still show.
_ROWS_OF_RELEASE_006 = """
INSERT INTO projects (id, name, api_key_encrypted, api_key_masked, created_at, updated_at)
VALUES ('p1', 'p', 'encrypted', 'sk-ab…wxyz', '2026-12-01T00:00:00.000000Z',
        '2026-12-01T00:00:00.000000Z');
INSERT INTO tokens (id, project_id, token_hash, expires_at, created_at, budget_nanousd,
                    spent_nanousd)
VALUES ('unbudgeted', 'p1', 'h1', '2099-01-01T00:00:00.000000Z', '2026-12-01T00:00:00.000000Z',
        NULL, 0),
       ('budgeted', 'p1', 'h2', '2099-01-01T00:00:00.000000Z', '2026-12-01T00:00:00.000000Z',
        1000000000, 5000),
       ('budget-removed', 'p1', 'h3', '2099-01-01T00:00:00.000000Z',
        '2026-12-01T00:00:00.000000Z', NULL, 8000),
       ('unused', 'p1', 'h4', '2099-01-01T00:00:00.000000Z', '2026-12-01T00:00:00.000000Z',
        NULL, 0);
INSERT INTO usage_hourly (token_id, project_id, hour, requests, last_used_at, cost_nanousd)
VALUES ('unbudgeted', 'p1', '2026-12-01T10:00:00.000000Z', 2, '2026-12-01T10:05:00.000000Z', 3000),
       ('unbudgeted', 'p1', '2026-12-01T11:00:00.000000Z', 3, '2026-12-01T11:05:00.000000Z', 4500),
       ('budgeted', 'p1', '2026-12-01T10:00:00.000000Z', 6, '2026-12-01T10:05:00.000000Z', 9000),
       ('budget-removed', 'p1', '2026-12-01T10:00:00.000000Z', 1, '2026-12-01T10:05:00.000000Z',
        1000);
"""


async def _database_at(database_url: str, last_version: int, rows: str) -> None:
    """Migrate the empty database at ``database_url`` as far as ``last_version``, as the release
    that shipped it did, and write ``rows`` into it."""
    if database_url.startswith("postgresql"):
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(
                "CREATE TABLE schema_migrations"
                " (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
            )
            for version, sql in migration_scripts("postgresql"):
                if version <= last_version:
                    await connection.execute(sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations VALUES ($1, now())", version
                    )
            await connection.execute(rows)
        finally:
            await connection.close()
        return
    with sqlite3.connect(sqlite_path(database_url)) as db:
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
        for version, sql in migration_scripts("sqlite"):
            if version <= last_version:
                db.executescript(sql)
                db.execute("INSERT INTO schema_migrations VALUES (?, 'then')", (version,))
        db.executescript(rows)


async def test_a_token_without_a_budget_keeps_what_it_spent_before_spend_was_counted(
    database_url: str,
) -> None:
    """Upgraded from a release that counted no spend without a budget, a token shows what its
    requests cost (a budget set on it later starts from there); budgeted tokens, and spend the
    aggregates no longer show, stay as they were."""
    await _database_at(database_url, 6, _ROWS_OF_RELEASE_006)
    store = await open_store(database_url)
    try:
        spent = {}
        for token_id in ("unbudgeted", "budgeted", "budget-removed", "unused"):
            token = await store.get_token(token_id)
            assert token is not None
            spent[token_id] = token.spent_nanousd
        assert await store.migrate() == []
    finally:
        await store.close()
    assert spent == {"unbudgeted": 7500, "budgeted": 5000, "budget-removed": 8000, "unused": 0}


@pytest.mark.postgres
@pytest.mark.process
async def test_an_instance_waits_for_a_migration_longer_than_a_query_may_take(
    postgres_url: str,
) -> None:
    """Instances started together on a database an upgrade migrates: while the first migrates
    (a large tokens table takes longer than the request path's query bound), the others wait for
    it instead of stopping start-up with 'cannot migrate the database: TimeoutError'."""
    await _database_at(postgres_url, 6, _ROWS_OF_RELEASE_006)
    first = await asyncpg.connect(postgres_url)
    try:
        migrating = first.transaction()
        await migrating.start()
        await first.execute("SELECT pg_advisory_xact_lock($1)", postgres_migrations.MIGRATION_LOCK)
        second = asyncio.create_task(open_store(postgres_url))
        await asyncio.sleep(postgres._TIMEOUT + 1)
        assert not second.done()
        await migrating.commit()
        store = await asyncio.wait_for(second, timeout=postgres._TIMEOUT)
    finally:
        await first.close()
    try:
        token = await store.get_token("unbudgeted")
        assert token is not None and token.spent_nanousd == 7500
    finally:
        await store.close()


# Rows of a database the first release served (migration 001 only): a token with a quota it has
# partly used, and one revoked.
_ROWS_OF_RELEASE_001 = """
INSERT INTO projects (id, name, api_key_encrypted, api_key_masked, created_at, updated_at)
VALUES ('p1', 'p', 'encrypted', 'sk-ab…wxyz', '2026-11-26T00:00:00.000000Z',
        '2026-11-26T00:00:00.000000Z');
INSERT INTO tokens (id, project_id, token_hash, expires_at, created_at, request_count,
                    max_requests, is_active, revoked_at)
VALUES ('quota', 'p1', 'hash-quota', '2099-01-01T00:00:00.000000Z',
        '2026-11-26T00:00:00.000000Z', 3, 5, TRUE, NULL),
       ('revoked', 'p1', 'hash-revoked', '2099-01-01T00:00:00.000000Z',
        '2026-11-26T00:00:00.000000Z', 1, NULL, FALSE, '2026-11-26T01:00:00.000000Z');
"""


async def test_tokens_of_the_first_release_keep_their_quota_and_revocation(
    database_url: str,
) -> None:
    await _database_at(database_url, 1, _ROWS_OF_RELEASE_001)
    store = await open_store(database_url)
    try:
        quota = await store.grant_for_hash("hash-quota")
        revoked = await store.grant_for_hash("hash-revoked")
        assert quota is not None and revoked is not None
        assert (quota.token.request_count, quota.token.max_requests) == (3, 5)
        assert (quota.token.spent_nanousd, quota.token.budget_nanousd) == (0, None)
        assert (quota.project_is_active, quota.api_key_encrypted) == (True, "encrypted")
        assert not revoked.token.is_active
        claims = [await store.consume_request("quota", utcnow()) for _ in range(3)]
        assert [c and c.count for c in claims] == [4, 5, None]
    finally:
        await store.close()


async def _until_waiting_on(connection: asyncpg.Connection, table: str) -> None:
    """Until some session waits for a lock on ``table``."""
    for _ in range(200):
        waiting = await connection.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE c.relname = $1 AND NOT l.granted",
            table,
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing waited for a lock on {table}")


@pytest.mark.postgres
@pytest.mark.process
async def test_the_release_before_serves_its_tokens_while_a_long_migration_runs(
    postgres_url: str,
) -> None:
    """Upgraded from 006: 007 adds a column to tokens, then 008 goes through every token and
    usage row, minutes on a large database, while the instances of the release before still
    serve. Each migration commits on its own, so 007's lock on the whole tokens table is not held
    through 008: their requests keep being counted meanwhile, rather than each waiting for the
    end of the upgrade and failing after the query bound."""
    await _database_at(postgres_url, 6, _ROWS_OF_RELEASE_006)
    long_read = await asyncpg.connect(postgres_url)
    release_before = await asyncpg.connect(postgres_url)
    # 008 held up reading the usage aggregates, as a large table holds it up.
    await long_read.execute("BEGIN; LOCK TABLE usage_hourly IN ACCESS EXCLUSIVE MODE")
    upgrading = asyncio.create_task(open_store(postgres_url))
    try:
        await _until_waiting_on(release_before, "usage_hourly")
        # What the release before's request path does for a token with max_requests.
        counted = await release_before.fetchval(
            "UPDATE tokens SET request_count = request_count + 1 WHERE id = 'budgeted'"
            " RETURNING request_count",
            timeout=2,
        )
        assert counted == 1
    finally:
        await long_read.close()
        await release_before.close()
        store = await asyncio.wait_for(upgrading, timeout=30)
    try:
        token = await store.get_token("unbudgeted")
        assert token is not None and token.spent_nanousd == 7500
        assert await store.migrate() == []
    finally:
        await store.close()


@pytest.mark.postgres
@pytest.mark.process
async def test_a_migration_waiting_behind_a_long_transaction_does_not_stop_the_release_before(
    postgres_url: str,
) -> None:
    """An upgrade's ALTER TABLE waits for every transaction reading the table, and PostgreSQL
    queues every later statement on the table behind it: one long reader (a pg_dump taking the
    backup, a report, an instance stalled mid-transaction) held every request of the instances
    still serving until it ended. The migration now gives up waiting after a moment, lets them
    through, and tries again, until the reader is gone."""
    await _database_at(postgres_url, 8, _ROWS_OF_RELEASE_006)
    reader = await asyncpg.connect(postgres_url)
    release_before = await asyncpg.connect(postgres_url)
    # As pg_dump does: the table read in a transaction that lasts.
    await reader.execute("BEGIN; SELECT count(*) FROM tokens")
    upgrading = asyncio.create_task(open_store(postgres_url))
    try:
        await _until_waiting_on(release_before, "tokens")
        for _ in range(3):
            counted = await release_before.fetchval(
                "UPDATE tokens SET request_count = request_count + 1 WHERE id = 'budgeted'"
                " RETURNING request_count",
                timeout=postgres._TIMEOUT,
            )
            await asyncio.sleep(0.5)
        assert counted == 3
        assert not upgrading.done()
    finally:
        await reader.close()
        await release_before.close()
        store = await asyncio.wait_for(upgrading, timeout=30)
    try:
        assert await store.migrate() == []
        assert (await store.tpm_room("budgeted")).admitted
    finally:
        await store.close()
