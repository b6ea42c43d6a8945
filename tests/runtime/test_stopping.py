"""Stopping the server: its background loops are cancelled, its tallies written, in bounded time."""

from __future__ import annotations

import asyncio
from typing import Any

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
