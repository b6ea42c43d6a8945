"""A Redis that stalls past the proxy's timeout while a request takes its budget hold or rpm slot,
then wakes and runs the script it was sent: what it takes then comes back. And one that stalls
while a refused request gives its hold back, its client leaving meanwhile: the hold ends once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_proxy.proxy.budget_ledger import HOLD_LEASE_SECONDS
from tests.conftest import Proxy
from tests.events.events_support import RedisServer
from tests.proxy.test_budgets import PRICES, chat, post, token_state
from tests.proxy.test_lifetime_spend import cost_of
from tests.proxy.test_metrics import scrape, value
from tests.proxy.test_settlement_retry import settles_to
from tests.raw_servers import failing_when_told


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


def _failed_requests(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    """The proxied chat requests answered (or ended) with a 5xx, as ``/metrics`` counts them."""
    return value(
        samples, "llm_proxy_requests_total", endpoint="/v1/chat/completions", status_class="5xx"
    )


async def test_a_client_leaving_while_its_refused_request_gives_its_hold_back_ends_the_hold_once(
    proxy_factory: Any, prices_path: Path, redis_server: RedisServer
) -> None:
    """A request on a token with a budget and one request never reaches the upstream (its TLS
    handshake fails) and gives back its hold and its place while Redis stalls; its client leaves
    meanwhile. The hold is ended once: the gauge of open holds is back where it was, not one
    below for good. And what the request took comes back once Redis wakes, not after the hold's
    lease, nor never (the place)."""
    limits = {"prices_path": prices_path, "event_bus": "redis", "redis_url": redis_server.url}
    assert redis_server.process is not None
    redis_pid = redis_server.process.pid
    async with failing_when_told() as upstream:
        failing: Proxy = await proxy_factory(
            **limits,
            api={
                "base_url": f"https://127.0.0.1:{upstream.port}",
                "timeouts": {"connect": "60s", "response_header": "1s", "idle": "1s"},
            },
        )
        answering: Proxy = await proxy_factory(**limits)  # the same database and Redis
        issued = await failing.issue_token(budget_usd=0.001, max_requests=1)
        before = await scrape(failing)
        open_before = value(before, "llm_proxy_budget_holds_open")
        failed_before = _failed_requests(before)
        _, writer = await asyncio.open_connection("127.0.0.1", failing.client.port)
        body = chat()  # no output cap: it holds all the budget affords
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            + f"Authorization: Bearer {issued['token']}\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await asyncio.wait_for(upstream.connected.wait(), 10)  # admitted: its hold is taken
        assert value(await scrape(failing), "llm_proxy_budget_holds_open") == open_before + 1
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            upstream.fail.set()  # the TLS handshake is reset
            # The request gives its hold back: the hold ended, the give-back waits for Redis.
            deadline = time.monotonic() + 10
            while value(now := await scrape(failing), "llm_proxy_budget_holds_open") != (
                open_before
            ):
                assert time.monotonic() < deadline, "the request never gave its hold back"
                await asyncio.sleep(0.02)
            # (Redis stalls well within its 2 s timeout: the request is still giving back.)
            assert _failed_requests(now) == failed_before, "the give-back did not wait for Redis"
            writer.transport.abort()  # the client leaves
            while _failed_requests(await scrape(failing)) == failed_before:
                assert time.monotonic() < deadline, "the request never ended"
                await asyncio.sleep(0.02)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        # Ended once, whoever gave the hold back.
        assert value(await scrape(failing), "llm_proxy_budget_holds_open") == open_before
        woken = time.monotonic()
        while True:
            shown = await token_state(failing, issued["id"])
            held_and_counted = (shown["reserved_usd"], shown["request_count"])
            if held_and_counted == (0, 0):
                break
            assert time.monotonic() - woken < HOLD_LEASE_SECONDS / 3, held_and_counted
            await asyncio.sleep(0.05)
        # The whole budget and the place are there for a request needing most of them.
        status, _, answer = await post(answering, issued["token"], chat(max_tokens=200))
        assert status == 200, answer
