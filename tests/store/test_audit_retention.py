"""Audit events older than AUDIT_RETENTION_DAYS are deleted, the oldest first and a bounded number
at a time; by default every one is kept. On each backend, and through a real server."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from llm_proxy.models import AuditEntry, AuditFilter, utcnow
from llm_proxy.store import Store
from llm_proxy.store.opening import open_store
from llm_proxy.store.retention import prune_audit_once
from tests.processes import (
    http,
    start_mock_upstream,
    start_server,
    wait_until,
    write_api_config,
)
from tests.store.test_store import AUDIT, project, token
from tests.store.test_token_retention import MANAGEMENT, sqlite_time


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await open_store(database_url)
    yield opened
    await opened.close()


async def test_the_oldest_audit_events_go_a_bounded_number_at_a_time(store: Store) -> None:
    await store.create_project(project(), AUDIT)
    for n in range(4):
        audit = AuditEntry(
            actor="test", action="token.create", target_type="token", target_id=f"t{n}"
        )
        await store.create_token(token(f"t{n}"), f"hash-{n}", audit)
    before_any = utcnow() - timedelta(days=1)

    assert await prune_audit_once(store, 1) == 0  # none is a day old
    assert await store.prune_audit(before_any, 100) == 0
    assert await store.prune_audit(utcnow() + timedelta(seconds=1), 2) == 2
    events, total = await store.list_audit(AuditFilter(), 1, 100)
    assert total == 3
    assert sorted(e.entry.target_id or "" for e in events) == ["t1", "t2", "t3"]  # the newest


def test_a_server_told_a_retention_deletes_the_audit_events_past_it(tmp_path: Path) -> None:
    """Two projects' events, the first's moved back 31 days while the server was stopped: a
    server started with AUDIT_RETENTION_DAYS=30 deletes those, and keeps the second's."""
    mock = start_mock_upstream(tmp_path, "sk-upstream")
    config = write_api_config(tmp_path / "api.yaml", mock.base_url)
    data = tmp_path / "data"
    try:
        server = start_server(data, config, tmp_path, "first", MANAGEMENT_TOKEN=MANAGEMENT)
        try:
            old, recent = server.issue(), server.issue()
        finally:
            server.stop()
        with sqlite3.connect(data / "llm-proxy.db") as db:
            moved = db.execute(
                "UPDATE audit_events SET timestamp = ? WHERE project_id = ?",
                (sqlite_time(utcnow() - timedelta(days=31)), old["project_id"]),
            ).rowcount
        db.close()
        assert moved == 2  # the project's creation and its token's

        server = start_server(
            data,
            config,
            tmp_path,
            "second",
            MANAGEMENT_TOKEN=MANAGEMENT,
            AUDIT_RETENTION_DAYS="30",
        )
        try:

            def audited(project_id: str) -> int:
                status, page = http(
                    "GET",
                    f"{server.base_url}/manage/audit?project_id={project_id}",
                    token=MANAGEMENT,
                )
                assert status == 200, page
                return len(page["events"])

            # Pruned by a task the start spawns, which may answer after /health does.
            wait_until(lambda: audited(old["project_id"]) == 0, "the old audit events to go")
            assert audited(recent["project_id"]) == 2
        finally:
            server.stop()
    finally:
        mock.process.stop()
