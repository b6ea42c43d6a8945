"""A Redis that stalls past the proxy's timeout while a request takes its budget hold or rpm slot,
then wakes and runs the script it was sent: what it takes then comes back."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Proxy
from tests.events.events_support import RedisServer
from tests.proxy.test_budgets import PRICES, chat, post
from tests.proxy.test_lifetime_spend import cost_of
from tests.proxy.test_settlement_retry import settles_to


@pytest.fixture
def prices_path(tmp_path: Path) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    return path


async def test_a_hold_and_a_slot_a_stalled_redis_takes_after_the_timeout_are_given_back(
    proxy_factory: Any, prices_path: Path, redis_server: RedisServer
) -> None:
    """Redis stalls past the 2 s timeout while a request takes its hold or its rpm slot: the
    client gets 503, and what Redis takes when it wakes must come back, not stay an hour (the
    budget) or a minute (the rpm window)."""
    proxy: Proxy = await proxy_factory(
        prices_path=prices_path, event_bus="redis", redis_url=redis_server.url
    )
    # One request without a cap holds nearly all of this budget.
    budgeted = await proxy.issue_token(budget_usd=0.001)
    rated = await proxy.issue_token(rpm=2)
    # Each with its keys in Redis: the first hold of a token only asks for its spend.
    status, _, answer = await post(proxy, budgeted["token"], chat(max_tokens=5))
    assert status == 200
    cost = cost_of(answer)
    assert (await post(proxy, rated["token"], chat()))[0] == 200
    await settles_to(proxy, budgeted["id"], cost)
    assert redis_server.process is not None
    pid = redis_server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        answers = await asyncio.gather(
            post(proxy, budgeted["token"], chat()), post(proxy, rated["token"], chat())
        )
        await asyncio.sleep(0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [(s, orjson.loads(body)["error"]["code"]) for s, _, body in answers] == [
        (503, "limits_unavailable")
    ] * 2
    await asyncio.sleep(0.5)  # Redis has run the scripts it had by now
    # The slot the stalled request took, if any, is free for the second request of the minute.
    rated_status = (await post(proxy, rated["token"], chat()))[0]
    await settles_to(proxy, budgeted["id"], cost, within=10)
    assert rated_status == 200
    assert (await post(proxy, budgeted["token"], chat()))[0] == 200


async def test_a_token_revoked_while_redis_stalls_its_admission_is_not_forwarded(
    proxy_factory: Any, redis_server: RedisServer
) -> None:
    """A request is taking its rpm slot in a Redis that stalls (within the timeout) when the
    operator revokes the token on this process: once the revocation is answered, the request
    must not reach the upstream (SPEC §6: it takes effect at once in this process)."""
    proxy: Proxy = await proxy_factory(event_bus="redis", redis_url=redis_server.url)
    rated = await proxy.issue_token(rpm=100)
    assert (await post(proxy, rated["token"], chat()))[0] == 200
    forwarded = len(proxy.upstream.requests)
    assert redis_server.process is not None
    pid = redis_server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        request = asyncio.ensure_future(post(proxy, rated["token"], chat()))
        await asyncio.sleep(0.3)  # it waits for Redis, its token checked
        assert (await proxy.manage("DELETE", f"/tokens/{rated['id']}"))[0] == 204
    finally:
        os.kill(pid, signal.SIGCONT)
    status, _, body = await request
    assert len(proxy.upstream.requests) == forwarded
    assert (status, orjson.loads(body)["error"]["code"]) == (401, "token_inactive")
