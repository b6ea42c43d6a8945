"""Stopping the server: its background loops are cancelled, its tallies written, in bounded time."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from llm_proxy.runtime.app import TASK_STOP_SECONDS
from tests.conftest import Proxy


async def _stubborn() -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(3600)  # swallows its cancel, as a loop around asyncio.wait_for can


async def test_a_task_that_will_not_stop_costs_an_error_not_the_usage_tallies(
    proxy_factory: Any,
) -> None:
    stopping: Proxy = await proxy_factory(usage_flush_seconds=3600.0)  # written only at the stop
    other: Proxy = await proxy_factory()  # on the same database
    issued = await stopping.issue_token()
    headers = {"Authorization": f"Bearer {issued['token']}"}
    for _ in range(2):
        assert (await stopping.client.get("/v1/models", headers=headers)).status == 200
    stopping.components.spawn(_stubborn(), "stubborn")

    # The stop gives up on the task after TASK_STOP_SECONDS; without that bound it never ends.
    with capture_logs() as logs:
        async with asyncio.timeout(TASK_STOP_SECONDS + 5):
            await stopping.client.close()

    assert [line["task"] for line in logs if line["event"] == "server.task_did_not_stop"] == [
        "stubborn"
    ]
    _, token = await other.manage("GET", f"/tokens/{issued['id']}")
    assert token["request_count"] == 2


@pytest.mark.postgres
@pytest.mark.process
async def test_a_usage_flush_the_stop_interrupts_still_writes_its_request_counts(
    proxy_factory: Any, postgres_url: str
) -> None:
    """The stop cancels the periodic usage flush; one caught writing (here: held up by a row lock)
    had taken the request tallies out of memory, and PostgreSQL rolled its cancelled UPDATE back:
    the requests were never counted. The write now runs to its end."""
    stopping: Proxy = await proxy_factory(database_url=postgres_url, usage_flush_seconds=0.05)
    issued = await stopping.issue_token()
    headers = {"Authorization": f"Bearer {issued['token']}"}
    db = await asyncpg.connect(postgres_url)
    try:

        async def counted() -> int:
            return int(
                await db.fetchval("SELECT request_count FROM tokens WHERE id = $1", issued["id"])
            )

        async def flush_waiting() -> bool:
            return bool(
                await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE 'UPDATE tokens SET request_count%'"
                )
            )

        assert (await stopping.client.get("/v1/models", headers=headers)).status == 200
        async with asyncio.timeout(10):
            while await counted() < 1:
                await asyncio.sleep(0.02)
        locker = await asyncpg.connect(postgres_url)
        lock = locker.transaction()
        await lock.start()
        await locker.execute("SELECT 1 FROM tokens WHERE id = $1 FOR UPDATE", issued["id"])
        for _ in range(3):
            assert (await stopping.client.get("/v1/models", headers=headers)).status == 200
        async with asyncio.timeout(10):
            while not await flush_waiting():  # the flush has the three and waits for the row
                await asyncio.sleep(0.02)

        with capture_logs() as logs:
            closing = asyncio.create_task(stopping.client.close())
            async with asyncio.timeout(10):  # past the cancel, to the last flush
                while not any(line["event"] == "server.usage_flushed" for line in logs):
                    await asyncio.sleep(0.02)
            await lock.rollback()
            await locker.close()
            await closing

        assert await counted() == 4
    finally:
        await db.close()
