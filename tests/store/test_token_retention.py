"""Expired tokens are deleted once EXPIRED_TOKEN_RETENTION_DAYS have passed, a bounded number at a
time: withering tokens issued per job or session no longer pile up in every list for good. On each
backend, and through a real server."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from llm_proxy.models import UsageRollup, utcnow
from llm_proxy.store import Store
from llm_proxy.store.opening import open_store
from llm_proxy.store.retention import (
    PRUNE_ROWS_AT_ONCE,
    prune_expired_tokens_every,
    prune_expired_tokens_once,
)
from tests.processes import (
    http,
    start_mock_upstream,
    start_server,
    wait_until,
    write_api_config,
)
from tests.store.test_store import AUDIT, project, token

MANAGEMENT = "m" * 40


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await open_store(database_url)
    await opened.create_project(project(), AUDIT)
    yield opened
    await opened.close()


async def expired_days_ago(store: Store, token_id: str, days: float) -> None:
    expiry = utcnow() - timedelta(days=days)
    await store.create_token(replace(token(token_id), expires_at=expiry), f"hash-{token_id}", AUDIT)


async def test_tokens_expired_past_the_retention_go_with_their_holds_and_the_rest_stay(
    store: Store,
) -> None:
    await expired_days_ago(store, "old", 91)
    await expired_days_ago(store, "older", 400)
    await expired_days_ago(store, "recent", 89)
    await store.create_token(token("live"), "hash-live", AUDIT)
    # A hold left on a token that expired (its process died) goes with it.
    await store.update_token("old", {"budget_nanousd": 1_000_000}, AUDIT)
    assert (await store.reserve_budget("old", "h1", 500, 1, 3600)).admitted
    await store.add_usage_rollup(
        [UsageRollup("old", "p1", utcnow() - timedelta(days=91), 3, 1, 1, 2, 0, utcnow(), 10)]
    )

    assert await prune_expired_tokens_once(store, 90) == 2
    assert await prune_expired_tokens_once(store, 90) == 0
    assert await store.get_token("old") is None
    assert await store.get_token("older") is None
    assert await store.grant_for_hash("hash-old") is None
    for kept in ("recent", "live"):
        assert await store.get_token(kept) is not None
    # What the token did stays in the totals and the audit log.
    assert (await store.token_usage("old")).requests == 3
    assert (await store.project_usage("p1")).requests == 3


async def test_a_backlog_goes_a_bounded_number_at_a_time_and_the_loop_keeps_at_it(
    store: Store,
) -> None:
    count = PRUNE_ROWS_AT_ONCE + 5
    expiry = utcnow() - timedelta(days=100)
    for n in range(count):
        await store.create_token(replace(token(f"t{n}"), expires_at=expiry), f"h{n}", AUDIT)

    assert await store.prune_expired_tokens(utcnow(), 3) == 3
    # The loop takes the rest at once, in passes of PRUNE_ROWS_AT_ONCE, not an hour apart.
    task = asyncio.create_task(prune_expired_tokens_every(store, 90, seconds=3600))
    try:
        for _ in range(500):
            if not await store.list_tokens("p1"):
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await store.list_tokens("p1") == []


def sqlite_time(moment: datetime) -> str:
    """A moment as the SQLite store writes it (fixed width, UTC)."""
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%f}Z"


def test_a_server_deletes_the_tokens_expired_past_the_retention(tmp_path: Path) -> None:
    """Tokens issued through the API, expired 91 and 89 days ago (their expiry moved back in the
    database while the server was stopped): the restarted server lists the second as expired and
    no longer knows the first, whose requests are then refused token_not_found."""
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
            for issued, days in ((old, 91), (recent, 89)):
                expiry = sqlite_time(utcnow() - timedelta(days=days))
                db.execute("UPDATE tokens SET expires_at = ? WHERE id = ?", (expiry, issued["id"]))
        db.close()

        server = start_server(data, config, tmp_path, "second", MANAGEMENT_TOKEN=MANAGEMENT)
        try:
            base = server.base_url
            # Pruned by a task the start spawns, which may answer after /health does.
            wait_until(
                lambda: (
                    http("GET", f"{base}/manage/tokens/{old['id']}", token=MANAGEMENT)[0] == 404
                ),
                "the token expired 91 days ago to be deleted",
            )
            status, shown = http("GET", f"{base}/manage/tokens/{recent['id']}", token=MANAGEMENT)
            assert (status, shown["status"]) == (200, "expired")
            status, listed = http("GET", f"{base}/manage/tokens", token=MANAGEMENT)
            assert status == 200
            assert [t["id"] for t in listed] == [recent["id"]]
            status, refused = http("GET", f"{base}/v1/models", token=old["token"])
            assert (status, refused["error"]["code"]) == (401, "token_not_found")
        finally:
            server.stop()
        assert "store.tokens_pruned" in server.process.stderr + server.process.stdout
    finally:
        mock.process.stop()
