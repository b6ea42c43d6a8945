"""Adaptive busy polling: the window grows while data keeps arriving, and vanishes when it does not."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from llm_proxy.http.busy_poll import AdaptivePoll
from tests.conftest import Proxy

# Wider than the default, so that a loaded machine (or coverage) cannot stretch the gaps between
# the test's own steps beyond it; IDLE is comfortably longer than two windows.
MAX = 5e-3
IDLE = 0.02


async def arrivals_while_polling(poll: AdaptivePoll, count: int) -> None:
    """Data arriving soon after the loop went idle, as a quick peer's answers do."""
    for _ in range(count):
        poll.poke()
        await asyncio.sleep(0)  # the loop runs what the data caused; the poll is then waiting


async def test_the_window_grows_to_its_maximum_while_data_keeps_coming() -> None:
    poll = AdaptivePoll(asyncio.get_running_loop(), MAX)
    poll.poke()  # the first data after a long idle period opens nothing
    assert poll.window == 0.0 and poll.polls == 0
    await arrivals_while_polling(poll, 20)
    assert poll.window == MAX
    assert poll.polls == 1  # one poll, kept alive by each arrival


async def test_the_window_shrinks_to_nothing_when_nothing_comes() -> None:
    poll = AdaptivePoll(asyncio.get_running_loop(), MAX)
    await arrivals_while_polling(poll, 20)
    assert poll.window == MAX
    for _ in range(12):  # 5 ms halves below 10 µs in nine
        await asyncio.sleep(IDLE)  # longer than any window: each poll runs out empty
        poll.poke()
    assert poll.window == 0.0
    polls = poll.polls
    for _ in range(5):  # sparse traffic from now on: no poll is started at all
        await asyncio.sleep(IDLE)
        poll.poke()
    await asyncio.sleep(IDLE)
    assert poll.polls == polls and poll.window == 0.0
    assert poll.wasted >= 5


async def test_a_poll_ends_by_itself() -> None:
    poll = AdaptivePoll(asyncio.get_running_loop(), MAX)
    await arrivals_while_polling(poll, 20)
    await asyncio.sleep(IDLE)  # the loop is free again: nothing keeps it polling
    assert not poll._active


async def test_the_proxy_polls_while_requests_follow_each_other(proxy_factory: Any) -> None:
    # A wide window: client, proxy and upstream share this process's loop, and under coverage
    # one request takes longer than the default window.
    proxy: Proxy = await proxy_factory(busy_poll_micros=10_000)
    poller = proxy.components.poller
    assert isinstance(poller, AdaptivePoll)
    token = await proxy.token()
    async with aiohttp.ClientSession() as session:
        for _ in range(30):
            async with session.post(
                f"{proxy.base_url}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": []},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                assert response.status == 200
    # Client and upstream answered within the window: polls were opened, and /metrics says so.
    assert poller.polls >= 1
    async with proxy.operator.get(f"{proxy.base_url}/metrics") as response:
        text = await response.text()
    paid = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('llm_proxy_busy_polls_total{outcome="paid"}')
    )
    assert paid >= 1


async def test_polling_can_be_turned_off(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(busy_poll_micros=0)
    assert proxy.components.poller is None
    token = await proxy.token()
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{proxy.base_url}/v1/models", headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        assert response.status == 200
