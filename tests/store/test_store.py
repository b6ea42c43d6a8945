"""The store contract, run against each backend: a SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from llm_proxy.models import (
    AuditEntry,
    AuditFilter,
    Claim,
    Project,
    Token,
    UsageDelta,
    UsageRollup,
    utcnow,
)
from llm_proxy.store import Store
from llm_proxy.store.migrations import SchemaNewerThanRelease, migration_scripts, serves_from
from llm_proxy.store.opening import open_store, sqlite_path
from llm_proxy.store.unavailable import FOREIGN_KEY_REFUSALS
from tests.newer_release import record_newer_migration
from tests.sqlite_writes import write_sqlite

AUDIT = AuditEntry(actor="test", action="change", target_type="thing")


def every_migration(database_url: str) -> list[int]:
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    versions = [version for version, _ in migration_scripts(backend)]
    assert versions == list(range(1, len(versions) + 1))  # numbered without gaps
    return versions


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await open_store(database_url)
    yield opened
    await opened.close()


def project(project_id: str = "p1", *, active: bool = True) -> Project:
    now = utcnow()
    return Project(
        id=project_id,
        name=f"name of {project_id}",
        description="d",
        metadata={"team": "ml", "nested": {"n": 1}},
        is_active=active,
        created_at=now,
        updated_at=now,
        api_key_masked="sk-ab…wxyz",
        api_key_encrypted="ciphertext",
    )


def token(
    token_id: str = "t1", project_id: str = "p1", *, max_requests: int | None = None
) -> Token:
    now = utcnow()
    return Token(
        id=token_id,
        project_id=project_id,
        expires_at=now + timedelta(hours=1),
        is_active=True,
        request_count=0,
        max_requests=max_requests,
        created_at=now,
        last_used_at=None,
    )


async def test_migrating_again_applies_nothing(store: Store) -> None:
    assert await store.migrate() == []


async def test_a_fresh_database_gets_every_migration(database_url: str) -> None:
    fresh = await open_store(database_url, migrate=False)
    try:
        assert await fresh.migrate() == every_migration(database_url)
        assert await fresh.migrate() == []
    finally:
        await fresh.close()


async def test_a_database_a_newer_release_migrated_is_refused_unchanged(
    database_url: str,
) -> None:
    store = await open_store(database_url)
    try:
        await _record_migration(database_url, 999)
        with pytest.raises(SchemaNewerThanRelease) as refused:
            await store.migrate()
    finally:
        await store.close()
    assert refused.value.versions == [999]
    with pytest.raises(SchemaNewerThanRelease):
        await open_store(database_url)
    assert await _recorded_versions(database_url) == [*every_migration(database_url), 999]


async def test_a_newer_release_s_migrations_that_allow_this_release_are_served_on(
    database_url: str,
) -> None:
    """A rollback past migrations that each declare ``-- serves-from`` this release's schema or
    an older one: the database opens and migrates to nothing, as it is, instead of refusing."""
    latest = every_migration(database_url)[-1]
    store = await open_store(database_url)
    await store.close()
    await record_newer_migration(database_url, latest + 1, serves_from=latest)
    await record_newer_migration(database_url, latest + 2, serves_from=latest - 1)
    reopened = await open_store(database_url)
    try:
        assert await reopened.migrate() == []
        await reopened.create_project(project(), AUDIT)
        assert (await reopened.get_project("p1")) is not None
    finally:
        await reopened.close()
    assert await _recorded_versions(database_url) == [
        *every_migration(database_url),
        latest + 1,
        latest + 2,
    ]


@pytest.mark.parametrize("declared", [None, "newer"])
async def test_a_newer_release_s_migration_that_does_not_allow_this_release_is_named(
    database_url: str, declared: str | None
) -> None:
    """One of the newer migrations declares no serves-from, or a schema this release does not
    reach: refused, naming that one, however the others allow it."""
    latest = every_migration(database_url)[-1]
    blocking = latest + 2
    store = await open_store(database_url)
    await store.close()
    await record_newer_migration(database_url, latest + 1, serves_from=latest)
    await record_newer_migration(
        database_url, blocking, serves_from=None if declared is None else latest + 1
    )
    with pytest.raises(SchemaNewerThanRelease) as refused:
        await open_store(database_url)
    assert (refused.value.versions, refused.value.incompatible) == (
        [latest + 1, blocking],
        [blocking],
    )
    assert f"and {blocking:03d} does not declare that this release (schema {latest:03d})" in str(
        refused.value
    )


def test_every_shipped_serves_from_names_a_version_before_its_own() -> None:
    for backend in ("sqlite", "postgresql"):
        declared = {v: serves_from(sql) for v, sql in migration_scripts(backend)}
        assert {v: s for v, s in declared.items() if s is not None} == {8: 7, 10: 9}, backend


async def test_each_migration_s_serves_from_is_recorded_with_it(
    store: Store, database_url: str
) -> None:
    """What a later release, rolled back to this one's successor, reads to decide."""
    if database_url.startswith("postgresql"):
        connection = await asyncpg.connect(database_url)
        try:
            rows = await connection.fetch(
                "SELECT version, serves_from FROM schema_migrations WHERE serves_from IS NOT NULL"
            )
        finally:
            await connection.close()
        recorded = {row["version"]: row["serves_from"] for row in rows}
    else:
        with sqlite3.connect(sqlite_path(database_url)) as db:
            recorded = dict(
                db.execute("SELECT version, serves_from FROM schema_migrations_serves_from")
            )
    assert recorded == {8: 7, 10: 9}


async def _recorded_versions(database_url: str) -> list[int]:
    if database_url.startswith("postgresql"):
        connection = await asyncpg.connect(database_url)
        try:
            rows = await connection.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        finally:
            await connection.close()
        return [row["version"] for row in rows]
    with sqlite3.connect(sqlite_path(database_url)) as db:
        return [v for (v,) in db.execute("SELECT version FROM schema_migrations ORDER BY 1")]


async def _record_migration(database_url: str, version: int) -> None:
    """As a newer release's migrate would, behind this release's back."""
    if database_url.startswith("postgresql"):
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute("INSERT INTO schema_migrations VALUES ($1, now())", version)
        finally:
            await connection.close()
    else:
        await write_sqlite(
            sqlite_path(database_url),
            "INSERT INTO schema_migrations VALUES (?, 'later')",
            (version,),
        )


async def test_instances_starting_together_apply_each_migration_once(database_url: str) -> None:
    stores = await asyncio.gather(*(open_store(database_url, migrate=False) for _ in range(3)))
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
        # Each migration is applied exactly once, whichever instance gets to it first.
        assert sorted(v for versions in applied for v in versions) == every_migration(database_url)
    finally:
        for s in stores:
            await s.close()


async def test_projects_round_trip(store: Store) -> None:
    created = await store.create_project(project(), AUDIT)
    fetched = await store.get_project("p1")
    assert fetched == created
    assert fetched is not None and fetched.metadata == {"team": "ml", "nested": {"n": 1}}
    assert await store.get_project("nope") is None
    await store.create_project(project("p2"), AUDIT)
    assert [p.id for p in await store.list_projects()] == ["p1", "p2"]

    updated = await store.update_project("p1", {"name": "renamed", "is_active": False}, AUDIT)
    assert updated is not None
    assert (updated.name, updated.is_active) == ("renamed", False)
    assert updated.updated_at > created.updated_at
    assert await store.update_project("nope", {"name": "x"}, AUDIT) is None
    with pytest.raises(ValueError, match="not a project column"):
        await store.update_project("p1", {"id": "p9"}, AUDIT)

    assert await store.delete_project("p2", AUDIT) is True
    assert await store.delete_project("p2", AUDIT) is False
    assert [p.id for p in await store.list_projects()] == ["p1"]


async def test_deleting_a_project_deletes_its_tokens(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    await store.create_token(token(), "hash-1", AUDIT)
    await store.delete_project("p1", AUDIT)
    assert await store.get_token("t1") is None
    assert await store.grant_for_hash("hash-1") is None


async def test_a_token_of_a_project_deleted_meanwhile_is_refused_as_such(store: Store) -> None:
    # What the management layer tells from an outage (its 404, not a 503), on each backend.
    await store.create_project(project(), AUDIT)
    await store.delete_project("p1", AUDIT)
    with pytest.raises(FOREIGN_KEY_REFUSALS):
        await store.create_token(token(), "hash-1", AUDIT)
    assert await store.list_tokens() == []


async def test_tokens_round_trip(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    await store.create_project(project("p2"), AUDIT)
    created = await store.create_token(token(max_requests=3), "hash-1", AUDIT)
    await store.create_token(token("t2", "p2"), "hash-2", AUDIT)
    assert await store.get_token("t1") == created
    assert [t.id for t in await store.list_tokens()] == ["t1", "t2"]
    assert [t.id for t in await store.list_tokens("p2")] == ["t2"]
    assert await store.find_token_id_by_hash("hash-2") == "t2"
    assert await store.find_token_id_by_hash("nope") is None

    grant = await store.grant_for_hash("hash-1")
    assert grant is not None
    assert (grant.token.id, grant.project_is_active, grant.api_key_encrypted) == (
        "t1",
        True,
        "ciphertext",
    )
    await store.update_project("p1", {"is_active": False}, AUDIT)
    grant = await store.grant_for_hash("hash-1")
    assert grant is not None and grant.project_is_active is False

    revoked_at = utcnow()
    updated = await store.update_token(
        "t1", {"is_active": False, "revoked_at": revoked_at, "max_requests": 9}, AUDIT
    )
    assert updated is not None
    assert (updated.is_active, updated.max_requests) == (False, 9)
    assert updated.revoked_at is not None
    assert abs(updated.revoked_at - revoked_at) < timedelta(milliseconds=1)
    assert await store.update_token("nope", {"is_active": False}, AUDIT) is None
    assert await store.update_token("nope", {}, AUDIT) is None
    with pytest.raises(ValueError, match="not a token column"):
        await store.update_token("t1", {"token_hash": "x"}, AUDIT)


async def test_a_tokens_limits_and_metadata_round_trip_and_update(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    limited = replace(
        token(max_requests=5),
        rpm=30,
        tpm=10_000,
        budget_nanousd=2_500_000_000,
        allowed_models=("gpt-4o*", "o4-mini"),
        metadata={"owner": "ci", "run": 7},
    )
    await store.create_token(limited, "hash-1", AUDIT)
    fetched = await store.get_token("t1")
    assert fetched == limited
    grant = await store.grant_for_hash("hash-1")
    assert grant is not None and grant.token == limited
    updated = await store.update_token(
        "t1", {"rpm": None, "budget_nanousd": 1, "allowed_models": ("gpt-4.1*",)}, AUDIT
    )
    assert updated is not None
    assert (updated.rpm, updated.tpm, updated.budget_nanousd) == (None, 10_000, 1)
    assert updated.allowed_models == ("gpt-4.1*",)
    cleared = await store.update_token("t1", {"allowed_models": None}, AUDIT)
    assert cleared is not None and cleared.allowed_models is None
    await store.create_token(token("t2"), "hash-2", AUDIT)
    plain = await store.get_token("t2")
    assert plain is not None
    assert (plain.allowed_models, plain.metadata, plain.spent_nanousd) == (None, {}, 0)


async def test_revoking_a_projects_tokens_counts_what_it_did(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    for n in range(3):
        await store.create_token(token(f"t{n}"), f"hash-{n}", AUDIT)
    await store.update_token("t0", {"is_active": False}, AUDIT)
    counts = await store.revoke_project_tokens("p1", AUDIT)
    assert (counts.revoked_count, counts.already_revoked_count, counts.total_tokens) == (2, 1, 3)
    tokens = await store.list_tokens("p1")
    assert all(not t.is_active for t in tokens)
    assert [t.revoked_at is not None for t in tokens] == [False, True, True]
    events, _ = await store.list_audit(AuditFilter(), 1, 1)
    assert events[0].entry.details["revoked_count"] == 2
    again = await store.revoke_project_tokens("p1", AUDIT)
    assert (again.revoked_count, again.already_revoked_count) == (0, 3)


async def test_quota_claims_are_exact_under_concurrency(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    await store.create_token(token(max_requests=10), "hash-1", AUDIT)
    claims = await asyncio.gather(*(store.consume_request("t1", utcnow()) for _ in range(64)))
    assert sorted(c.count for c in claims if c is not None) == list(range(1, 11))  # once each
    assert claims.count(None) == 54
    fetched = await store.get_token("t1")
    assert fetched is not None
    assert fetched.request_count == 10
    assert fetched.last_used_at is not None

    await store.release_request("t1")
    assert await store.consume_request("t1", utcnow()) == Claim(10, 10)
    assert await store.consume_request("t1", utcnow()) is None


async def test_a_revoked_token_cannot_claim(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    await store.create_token(token(max_requests=10), "hash-1", AUDIT)
    await store.update_token("t1", {"is_active": False}, AUDIT)
    assert await store.consume_request("t1", utcnow()) is None


async def test_release_never_goes_below_zero(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    await store.create_token(token(max_requests=1), "hash-1", AUDIT)
    await store.release_request("t1")
    fetched = await store.get_token("t1")
    assert fetched is not None and fetched.request_count == 0


async def test_usage_tallies_add_up(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    await store.create_token(token(), "hash-1", AUDIT)
    late = datetime(2030, 1, 1, tzinfo=UTC)
    early = datetime(2029, 1, 1, tzinfo=UTC)
    await store.add_usage([UsageDelta("t1", 5, late), UsageDelta("gone", 2, late)])
    await store.add_usage([UsageDelta("t1", -1, early)])
    await store.add_usage([])
    fetched = await store.get_token("t1")
    assert fetched is not None
    assert fetched.request_count == 4
    assert fetched.last_used_at == late  # the latest use wins, whatever order they arrive in


async def test_usage_rollups_aggregate_by_token_project_and_hour(store: Store) -> None:
    hour = datetime(2030, 5, 1, 10, 0, tzinfo=UTC)

    def rollup(token_id: str, project_id: str, at: datetime, requests: int) -> UsageRollup:
        return UsageRollup(token_id, project_id, at, requests, 10, 20, 30, 1, at, requests * 7)

    await store.add_usage_rollup(
        [
            rollup("t1", "p1", hour + timedelta(minutes=5), 2),
            rollup("t2", "p1", hour + timedelta(minutes=6), 1),
            rollup("t3", "p2", hour + timedelta(hours=2), 4),
        ]
    )
    await store.add_usage_rollup([rollup("t1", "p1", hour + timedelta(minutes=50), 3)])
    await store.add_usage_rollup([])

    t1 = await store.token_usage("t1")
    assert (t1.requests, t1.prompt_tokens, t1.total_tokens, t1.errors) == (5, 20, 60, 2)
    assert t1.last_used_at == hour + timedelta(minutes=50)
    assert t1.cost_nanousd == 35
    # Integers, as the API shows them (PostgreSQL's SUM would otherwise answer decimals).
    assert all(
        type(getattr(t1, f)) is int for f in ("requests", "total_tokens", "errors", "cost_nanousd")
    )
    p1 = await store.project_usage("p1")
    assert (p1.requests, p1.completion_tokens) == (6, 60)
    by_token = await store.project_token_usage("p1")
    assert {k: v.requests for k, v in by_token.items()} == {"t1": 5, "t2": 1}
    assert (await store.usage_since(hour + timedelta(hours=1, minutes=30))).requests == 4
    assert (await store.usage_since(hour)).requests == 10
    assert (await store.token_usage("none")).requests == 0
    assert (await store.token_usage("none")).last_used_at is None


async def test_the_change_feed_lists_every_change_in_order(store: Store) -> None:
    start = await store.latest_change()
    assert await store.changes_since(start) == (start, [])
    await store.create_project(project(), AUDIT)
    await store.create_token(token(), "hash-1", AUDIT)
    await store.update_token("t1", {"is_active": False}, AUDIT)
    await store.update_project("p1", {"name": "n"}, AUDIT)
    await store.revoke_project_tokens("p1", AUDIT)
    await store.delete_project("p1", AUDIT)
    cursor, changes = await store.changes_since(start)
    assert changes == [("p1", "t1"), ("p1", None), ("p1", None), ("p1", None)]
    assert cursor == await store.latest_change()
    assert await store.changes_since(cursor) == (cursor, [])


async def test_a_cursor_past_the_feed_is_told_that_anything_may_have_changed(store: Store) -> None:
    """Ids below a reader's cursor (a database restored from a backup, a failover to a replica
    without the last changes): one change naming nothing, and a cursor the next ids pass."""
    await store.create_project(project(), AUDIT)
    latest = await store.latest_change()
    assert await store.changes_since(latest + 5) == (latest, [(None, None)])
    await store.update_project("p1", {"name": "n"}, AUDIT)
    assert await store.changes_since(latest) == (latest + 1, [("p1", None)])


async def test_concurrent_changes_are_never_skipped_by_a_following_reader(store: Store) -> None:
    """A reader that moves its cursor past a change must have seen every change below it."""
    await store.create_project(project(), AUDIT)
    for n in range(20):
        await store.create_token(token(f"t{n}"), f"hash-{n}", AUDIT)
    cursor = await store.latest_change()
    seen: list[tuple[str | None, str | None]] = []
    done = asyncio.Event()

    async def follow() -> None:
        nonlocal cursor
        while not done.is_set():
            cursor, changes = await store.changes_since(cursor)
            seen.extend(changes)
            await asyncio.sleep(0)

    reader = asyncio.create_task(follow())
    await asyncio.gather(
        *(store.update_token(f"t{n}", {"is_active": False}, AUDIT) for n in range(20))
    )
    done.set()
    await reader
    cursor, rest = await store.changes_since(cursor)
    seen.extend(rest)
    assert sorted(token_id or "" for _, token_id in seen) == sorted(f"t{n}" for n in range(20))


async def test_audit_filters_and_pages(store: Store) -> None:
    await store.create_project(project(), AuditEntry("alice", "project.create", "project", "p1"))
    await store.create_project(project("p2"), AuditEntry("bob", "project.create", "project", "p2"))
    await store.update_project(
        "p1",
        {"name": "x"},
        AuditEntry(
            "alice",
            "project.update",
            "project",
            "p1",
            "p1",
            {"fields": ["name"]},
            "req-1",
            "10.0.0.1",
            "success",
        ),
    )
    events, total = await store.list_audit(AuditFilter(), 1, 2)
    assert total == 3
    assert [e.entry.action for e in events] == ["project.update", "project.create"]
    assert events[0].entry.details == {"fields": ["name"]}
    assert (events[0].entry.request_id, events[0].entry.client_ip) == ("req-1", "10.0.0.1")
    page_two, _ = await store.list_audit(AuditFilter(), 2, 2)
    assert [e.entry.actor for e in page_two] == ["alice"]

    alice, total = await store.list_audit(AuditFilter(actor="alice"), 1, 10)
    assert total == 2 and {e.entry.actor for e in alice} == {"alice"}
    first = (await store.list_audit(AuditFilter(target_id="p1"), 1, 10))[0][-1].timestamp
    later, total = await store.list_audit(
        AuditFilter(since=first + timedelta(microseconds=1)), 1, 10
    )
    assert total == 2
    assert [e.entry.target_id for e in later] == ["p1", "p2"]
    earlier, total = await store.list_audit(
        AuditFilter(until=first + timedelta(microseconds=1), action="project.create"), 1, 10
    )
    assert total == 1 and earlier[0].entry.target_id == "p1"


async def test_ping_answers(store: Store) -> None:
    await store.ping()


async def test_pushed_changes_wake_a_listener(database_url: str, store: Store) -> None:
    """PostgreSQL pushes every committed change to listeners; SQLite has no push and says so."""
    wakes = asyncio.Queue[None]()
    connected = asyncio.Event()
    listener = asyncio.create_task(
        store.listen_changes(lambda: wakes.put_nowait(None), connected.set)
    )
    if database_url.startswith("sqlite"):
        assert await listener is None
        assert not connected.is_set()
        return
    await asyncio.wait_for(connected.wait(), 5)
    other = await open_store(database_url)  # another instance makes the change
    try:
        await other.create_project(project(), AUDIT)
        await other.create_token(token(), "hash-1", AUDIT)
        assert wakes.empty()  # creating changes nothing anyone has cached
        await other.update_token("t1", {"is_active": False}, AUDIT)
        await asyncio.wait_for(wakes.get(), 5)
    finally:
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener
        await other.close()


async def test_the_rpm_window_admits_exactly_rpm_under_concurrency(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    await store.create_token(replace(token(), rpm=10), "hash-1", AUDIT)
    slots = await asyncio.gather(*(store.take_rate_slot("t1") for _ in range(64)))
    admitted = [s for s in slots if s.admitted]
    assert len(admitted) == 10
    assert len({s.at_micros for s in admitted}) == 10  # each its own moment, to give back
    refused = [s for s in slots if not s.admitted]
    # The oldest admitted request leaves the window a minute after it was admitted.
    assert all(59.0 < s.retry_after <= 60.0 for s in refused)

    await store.give_back_rate_slot("t1", admitted[0].at_micros)
    assert (await store.take_rate_slot("t1")).admitted
    assert not (await store.take_rate_slot("t1")).admitted


async def test_a_token_without_rpm_is_never_rate_limited(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    await store.create_token(token(), "hash-1", AUDIT)
    slots = [await store.take_rate_slot("t1") for _ in range(5)]
    assert all(s.admitted and s.at_micros == 0 for s in slots)
    assert (await store.take_rate_slot("unknown")).admitted


async def test_lowering_rpm_applies_to_the_next_request(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    await store.create_token(replace(token(), rpm=5), "hash-1", AUDIT)
    for _ in range(3):
        assert (await store.take_rate_slot("t1")).admitted
    await store.update_token("t1", {"rpm": 3}, AUDIT)
    assert not (await store.take_rate_slot("t1")).admitted


async def test_the_tpm_window_fills_with_settled_tokens_and_says_when_it_frees(
    store: Store,
) -> None:
    await store.create_project(project(), AUDIT)
    await store.create_token(replace(token(), tpm=100), "hash-1", AUDIT)
    assert (await store.tpm_room("t1")).admitted
    await store.record_tokens("t1", 60)
    assert (await store.tpm_room("t1")).admitted
    await store.record_tokens("t1", 50)
    full = await store.tpm_room("t1")
    assert not full.admitted
    # 110 of 100: the window has room again when the first 60 leave it, a minute after.
    assert 59.0 < full.retry_after <= 60.0
    await store.create_token(token("t2"), "hash-2", AUDIT)  # no tpm: always room
    await store.record_tokens("t2", 10**9)
    assert (await store.tpm_room("t2")).admitted
    await store.record_tokens("unknown", 5)  # a token deleted meanwhile: nothing to record


async def test_an_answer_marked_unsettled_holds_the_tpm_window_until_its_tokens_are_recorded(
    store: Store,
) -> None:
    """A marked answer's tokens are not in the window yet: the window says so while it has room,
    until the settlement records them and removes the mark in one step."""
    bound = 60_000_000
    await store.create_project(project(), AUDIT)
    await store.create_token(replace(token(), tpm=100), "hash-1", AUDIT)
    await store.mark_answered("t1", "answer-1", bound)
    await store.mark_answered("t1", "answer-2", bound)
    assert (await store.tpm_room("t1", bound)).unsettled
    assert not (await store.tpm_room("t1")).unsettled  # marks not asked about
    await store.record_tokens("t1", 60, "answer-1")
    assert (await store.tpm_room("t1", bound)).unsettled  # answer-2 still
    await store.forget_mark("t1", "answer-2")  # (an answer with no tokens to record)
    room = await store.tpm_room("t1", bound)
    assert room.admitted and not room.unsettled
    await store.mark_answered("t1", "answer-3", bound)
    await store.record_tokens("t1", 50, "answer-3")
    full = await store.tpm_room("t1", bound)
    assert not full.admitted and not full.unsettled
    await store.mark_answered("t1", "answer-4", 1)  # past its bound at once: ignored, dropped
    await store.mark_answered("t1", "answer-5", 1)
    assert not (await store.tpm_room("t1", 1)).unsettled


async def test_a_tpm_admission_waits_only_for_answers_marked_before_it_first_looked(
    store: Store,
) -> None:
    """Answers that go out while a request waits are not waited for by it: a token busy with
    answers would otherwise keep it waiting for its whole bound."""
    bound = 60_000_000
    await store.create_project(project(), AUDIT)
    await store.create_token(replace(token(), tpm=100), "hash-1", AUDIT)
    await store.mark_answered("t1", "before", bound)
    first = await store.tpm_room("t1", bound)
    assert first.unsettled and first.at_micros
    await asyncio.sleep(0.002)
    await store.mark_answered("t1", "meanwhile", bound)
    assert (await store.tpm_room("t1", bound, first.at_micros)).unsettled
    await store.record_tokens("t1", 10, "before")
    room = await store.tpm_room("t1", bound, first.at_micros)
    assert room.admitted and not room.unsettled
    assert (await store.tpm_room("t1", bound)).unsettled  # a new request waits for "meanwhile"
