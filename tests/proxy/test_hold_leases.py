"""Budget holds are leases: a killed server's holds return to the budget within a lease, while a
live server's requests keep theirs however long they run."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from llm_proxy.proxy.budget_ledger import HOLD_LEASE_SECONDS, StoreBudgetLedger
from llm_proxy.proxy.hold_leases import HoldLeases
from llm_proxy.store.opening import open_store
from llm_proxy.tools.mock_upstream import MockSettings
from tests.conftest import MANAGEMENT_TOKEN, Proxy
from tests.events.events_support import RedisServer
from tests.fakes import fake_upstream_app
from tests.processes import (
    MockUpstream,
    ServerProcess,
    children,
    http,
    start_mock_upstream,
    start_server,
    write_api_config,
)
from tests.proxy.test_budgets import PRICES, bearer, chat, settled, token_state
from tests.proxy.test_settlement_retry import add_token

# An uncapped request holds what the model's 200 output tokens cost (800 µUSD and its prompt):
# more than this budget, so it holds all of it and leaves no room for another.
BUDGET_USD = 0.0005
SECRETS = {
    "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
    "ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
}


@pytest.fixture
def slow_streams(tmp_path: Path) -> Iterator[MockUpstream]:
    """An upstream whose streams take minutes (a chunk a second), whose whole answers do not."""
    mock = start_mock_upstream(tmp_path, None, "--chunks", "200", "--chunk-interval-ms", "1000")
    yield mock
    mock.process.stop()


@pytest.fixture
def prices_path(tmp_path: Path) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    return path


BACKENDS = [
    "sqlite",
    pytest.param("redis", marks=[pytest.mark.redis, pytest.mark.process]),
    pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.process]),
]


def _backend(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """Where the holds live, as server settings: the database (SQLite or PostgreSQL), or Redis."""
    if where == "postgresql":
        return {"DATABASE_URL": request.getfixturevalue("postgres_url")}
    shared = {"DATABASE_URL": f"sqlite:///{tmp_path}/shared.db"}
    if where == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        shared.update(REDIS_URL=redis.url, LLM_PROXY_EVENT_BUS="redis")
    return shared


def _budgeted_token(server: ServerProcess) -> dict[str, Any]:
    status, project = http(
        "POST",
        f"{server.base_url}/manage/projects",
        token=MANAGEMENT_TOKEN,
        body={"name": "p", "api_key": "sk-upstream"},
    )
    assert status == 201, project
    status, token = http(
        "POST",
        f"{server.base_url}/manage/tokens",
        token=MANAGEMENT_TOKEN,
        body={"project_id": project["id"], "duration_minutes": 10, "budget_usd": BUDGET_USD},
    )
    assert status == 201, token
    return dict(token)


def _ask(server: ServerProcess, token: str) -> tuple[int, str]:
    """A whole answer's status and, for a refusal, its code."""
    status, answer = http(
        "POST",
        f"{server.base_url}/v1/chat/completions",
        token=token,
        body=orjson.loads(chat()),
    )
    return status, (answer or {}).get("error", {}).get("code", "")


@pytest.mark.process
@pytest.mark.timeout(150)
@pytest.mark.parametrize("where", BACKENDS)
def test_a_killed_servers_hold_returns_to_the_budget_within_a_lease(
    where: str,
    tmp_path: Path,
    prices_path: Path,
    slow_streams: MockUpstream,
    request: pytest.FixtureRequest,
) -> None:
    config = write_api_config(tmp_path / "api.yaml", slow_streams.base_url)
    shared = {**_backend(where, tmp_path, request), **SECRETS, "PRICES_PATH": str(prices_path)}
    doomed = start_server(tmp_path / "doomed", config, tmp_path, name="doomed", **shared)
    try:
        survivor = start_server(tmp_path / "survivor", config, tmp_path, name="survivor", **shared)
    except BaseException:
        doomed.stop()
        raise
    try:
        token = _budgeted_token(doomed)["token"]
        # A stream on the doomed server holds the whole budget, and the server dies mid-answer.
        host, port = doomed.base_url.removeprefix("http://").split(":")
        connection = HTTPConnection(host, int(port), timeout=10)
        connection.request(
            "POST", "/v1/chat/completions", body=chat(stream=True), headers=bearer(token)
        )
        stream = connection.getresponse()
        assert stream.status == 200
        assert stream.readline().startswith(b"data: ")
        doomed.process.popen.kill()
        killed = time.monotonic()
        doomed.process.popen.wait()
        connection.close()
        # Its hold outlives it for a while: the rest of the budget is held by "a request in
        # progress"...
        assert _ask(survivor, token) == (429, "rate_limited")
        # ... but only for a lease (and, in the store, until the next reclaiming).
        while (answer := _ask(survivor, token)) != (200, ""):
            assert answer == (429, "rate_limited")
            waited = time.monotonic() - killed
            assert waited < HOLD_LEASE_SECONDS * 4 / 3 + 15, "the dead server's hold never lapsed"
            time.sleep(0.5)
    finally:
        doomed.stop()
        assert survivor.stop(timeout=40) == 0, survivor.process.stderr[-3000:]


@contextlib.asynccontextmanager
async def _a_stream_holding_the_budget(
    proxy_factory: Any, prices_path: Path, lease: float, options: dict[str, Any]
) -> AsyncIterator[tuple[Proxy, dict[str, Any], aiohttp.ClientResponse]]:
    """A proxy with holds of ``lease`` seconds in front of a slow streaming upstream, a token whose
    budget one stream holds whole, and that stream, its head and first line read."""
    slow = TestServer(fake_upstream_app(MockSettings(chunks=200, chunk_interval=0.05)))
    await slow.start_server()
    try:
        proxy: Proxy = await proxy_factory(
            prices_path=prices_path,
            api={"base_url": str(slow.make_url("")).rstrip("/")},
            budget_hold_lease_seconds=lease,
            **options,
        )
        issued = await proxy.issue_token(budget_usd=BUDGET_USD)
        response = await proxy.client.post(
            "/v1/chat/completions", data=chat(stream=True), headers=bearer(issued["token"])
        )
        assert response.status == 200
        await response.content.readline()
        yield proxy, issued, response
    finally:
        await slow.close()


@pytest.mark.parametrize("where", BACKENDS)
async def test_a_request_longer_than_a_lease_keeps_its_hold(
    proxy_factory: Any,
    tmp_path: Path,
    prices_path: Path,
    where: str,
    request: pytest.FixtureRequest,
) -> None:
    lease = 1.0
    backend = _backend(where, tmp_path, request)
    options: dict[str, Any] = {"database_url": backend["DATABASE_URL"]}
    if where == "redis":
        options.update(event_bus="redis", redis_url=backend["REDIS_URL"])
    async with _a_stream_holding_the_budget(proxy_factory, prices_path, lease, options) as (
        proxy,
        issued,
        response,
    ):
        held = (await token_state(proxy, issued["id"]))["reserved_usd"]
        assert held == pytest.approx(BUDGET_USD)
        # Several leases later, the stream still holds the budget: nobody else can spend it.
        for _ in range(4):
            await asyncio.sleep(lease)
            refused = await proxy.client.post(
                "/v1/chat/completions", data=chat(), headers=bearer(issued["token"])
            )
            assert refused.status == 429
            assert (await refused.json())["error"]["code"] == "rate_limited"
        await response.read()
        # The request is settled as usual: its spend counted, its hold gone, within the budget.
        shown = await settled(proxy, issued["id"], spent_at_least=BUDGET_USD / 2)
        assert shown["spent_usd"] <= BUDGET_USD


async def test_a_hold_redis_lost_with_its_data_is_taken_again_before_the_budget_is_trusted(
    proxy_factory: Any, prices_path: Path, redis_server: RedisServer
) -> None:
    """A stream holds all of a budget when Redis comes back without its data (restarted without
    persistence, or flushed): its hold is gone, and the budget looks free. Another request is
    refused limits_unavailable until the holds of requests in progress are trusted again (a
    lease), by when the stream's renewals took its hold again: still refused, rate_limited, as
    the budget is held; never admitted on it a second time (SPEC §6)."""
    lease = 1.0
    options = {"event_bus": "redis", "redis_url": redis_server.url}
    async with _a_stream_holding_the_budget(proxy_factory, prices_path, lease, options) as (
        proxy,
        issued,
        response,
    ):
        client = Redis.from_url(redis_server.url)
        try:
            await client.flushall()
        finally:
            await client.aclose()
        refused = await proxy.client.post(
            "/v1/chat/completions", data=chat(), headers=bearer(issued["token"])
        )
        assert refused.status == 503
        assert (await refused.json())["error"]["code"] == "limits_unavailable"
        assert 1 <= int(refused.headers["Retry-After"]) <= 2
        await asyncio.sleep(lease * 2)
        refused = await proxy.client.post(
            "/v1/chat/completions", data=chat(), headers=bearer(issued["token"])
        )
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == "rate_limited"
        await response.read()
        shown = await settled(proxy, issued["id"], spent_at_least=BUDGET_USD / 2)
        assert shown["spent_usd"] <= BUDGET_USD


@pytest.mark.process
@pytest.mark.timeout(150)
@pytest.mark.parametrize("where", BACKENDS)
def test_a_hold_lives_until_a_late_settlement(
    where: str,
    tmp_path: Path,
    prices_path: Path,
    slow_streams: MockUpstream,
    request: pytest.FixtureRequest,
) -> None:
    config = write_api_config(tmp_path / "api.yaml", slow_streams.base_url)
    shared = {**_backend(where, tmp_path, request), **SECRETS, "PRICES_PATH": str(prices_path)}
    server = start_server(tmp_path / "data", config, tmp_path, **shared)
    stalled: list[int] = []
    try:
        issued = _budgeted_token(server)
        # The events process, which settles, stalls; the answer of a request holding all the
        # budget waits for it longer than a lease.
        stalled[:] = children(server.process.popen.pid)
        assert len(stalled) == 1
        os.kill(stalled[0], signal.SIGSTOP)
        assert _ask(server, issued["token"]) == (200, "")
        time.sleep(HOLD_LEASE_SECONDS * 4 / 3 + 5)
        # Its hold still keeps the budget from another request...
        assert _ask(server, issued["token"]) == (429, "rate_limited")
        # ... until it is settled, its spend within the budget.
        os.kill(stalled.pop(), signal.SIGCONT)
        deadline = time.monotonic() + 20
        while True:
            status, shown = http(
                "GET", f"{server.base_url}/manage/tokens/{issued['id']}", token=MANAGEMENT_TOKEN
            )
            assert status == 200, shown
            if shown["reserved_usd"] == 0 and shown["spent_usd"] > 0:
                break
            assert time.monotonic() < deadline, shown
            time.sleep(0.2)
        assert shown["spent_usd"] <= BUDGET_USD
    finally:
        for pid in stalled:
            os.kill(pid, signal.SIGCONT)
        assert server.stop(timeout=40) == 0, server.process.stderr[-3000:]


async def test_a_hold_is_renewed_until_settled_lost_or_given_up(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/leases.db")
    try:
        await add_token(store, 1_000)
        ledger = StoreBudgetLedger(store, lease_seconds=4.0)
        leases = HoldLeases(ledger, settle_within=0.5)
        for n, hold_id in enumerate(["settled", "stuck", "lost", "running"]):
            taken = await ledger.hold("t1", hold_id, 1_000, 100, 100, 0.0)
            leases.add("t1", hold_id, taken.held_nanousd)
            if hold_id in ("settled", "lost"):
                leases.hand_over(hold_id, f"request-{n}")
        # The events pipeline settled one and lost another (its process died)...
        leases.settled([("t1", "request-0")])
        await ledger.settle("t1", "settled", 100, 30)
        leases.forget_handed()
        # ... and the next one handed to it is not settled long after its request ended.
        leases.hand_over("stuck", "request-1")
        await leases.renew()
        assert len(leases) == 2
        await asyncio.sleep(0.6)
        await leases.renew()
        assert len(leases) == 1
        await asyncio.sleep(3.6)  # the holds' first lease is over
        await leases.renew()
        assert await store.reclaim_budget_holds() == 2
        token = await store.get_token("t1")
        assert token is not None
        assert (token.spent_nanousd, token.reserved_nanousd) == (30, 100)
    finally:
        await store.close()
