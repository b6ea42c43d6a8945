"""Budget settlements and tpm records land although Redis or PostgreSQL was away when the answer
ended (restarted, down, or the answer to the command lost), and a retry never counts twice."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from llm_proxy.events.config import EventsConfig
from llm_proxy.models import AuditEntry, Project, Token, utcnow
from llm_proxy.proxy.budget_ledger import (
    HOLD_LEASE_SECONDS,
    RedisBudgetLedger,
    Settlement,
    StoreBudgetLedger,
)
from llm_proxy.store import Store
from llm_proxy.store.opening import open_store
from llm_proxy.tools.mock_upstream import MockSettings
from tests.conftest import Proxy
from tests.events.events_support import RedisServer
from tests.events.test_offload import events_pid, eventually, scrape
from tests.fakes import fake_upstream_app
from tests.postgres import PostgresServer
from tests.postgres_relay import Chunks, Link, PostgresMessages, Relay
from tests.proxy.test_budgets import PRICES, bearer, chat, post
from tests.proxy.test_lifetime_spend import cost_of
from tests.raw_servers import failing_when_told

AUDIT = AuditEntry(actor="test", action="change", target_type="thing")
BUDGET = 1_000_000_000
STREAM = EventsConfig().stream


class AnswerLosingRelay(Relay):
    """A relay to a server (PostgreSQL, or Redis with ``framing=Chunks``) that, once armed, passes
    on the first command holding ``word`` and then cuts its client off, so the server runs the
    command and its answer never arrives."""

    def __init__(
        self, target_port: int, word: bytes, framing: Callable[[], Chunks] = PostgresMessages
    ) -> None:
        super().__init__(target_port, framing)
        self._word = word.lower()
        self._losing: set[Link] = set()
        self.armed = False
        self._passing = 0

    def arm(self, word: bytes, *, passing: int = 0) -> None:
        """Lose the answer to the next message holding ``word`` (instead of the one given), once
        ``passing`` such messages went through."""
        self._word = word.lower()
        self._passing = passing
        self.armed = True

    async def from_client(self, link: Link, message: bytes) -> None:
        await super().from_client(link, message)
        if self.armed and self._word in message.lower():
            if self._passing:
                self._passing -= 1
            else:
                self.armed = False
                self._losing.add(link)
        if link in self._losing and link.framing.ends_command(message):
            link.to_client.transport.abort()
            await asyncio.sleep(1)  # the server answers into the void


async def add_token(store: Store, budget_nanousd: int = BUDGET) -> None:
    """Project p1 and its token t1, with a budget (the ledgers' tests share it)."""
    now = utcnow()
    await store.create_project(
        Project("p1", "p1", "", {}, True, now, now, "sk-…", "ciphertext"), AUDIT
    )
    token = Token(
        id="t1",
        project_id="p1",
        expires_at=now + timedelta(hours=1),
        is_active=True,
        request_count=0,
        max_requests=None,
        created_at=now,
        last_used_at=None,
        budget_nanousd=budget_nanousd,
        spent_nanousd=0,
    )
    await store.create_token(token, "hash-t1", AUDIT)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(f"sqlite:///{tmp_path}/ledger.db")
    await add_token(store)
    yield store
    await store.close()


async def test_a_settlement_whose_answer_redis_lost_counts_once(
    redis_server: RedisServer, sqlite_store: Store
) -> None:
    """Redis ran the settlement and the connection died before its answer: it is sent again on a
    new connection, which must neither fail nor add the cost a second time."""
    relay = AnswerLosingRelay(redis_server.port, b"EVALSHA", Chunks)
    await relay.start()
    direct = RedisBudgetLedger(redis_server.url, sqlite_store)
    relayed = RedisBudgetLedger(f"redis://127.0.0.1:{relay.port}/0", sqlite_store)
    await direct.start()  # as the server does
    try:
        hold = await direct.hold("t1", "h1", BUDGET, 5_000, 100, time.time() + 3600)
        assert await relayed.spent_and_held("t1") == (0, 5_000)  # pools a connection
        relay.armed = True
        settlement = Settlement("t1", "h1", hold.held_nanousd, 3_000)
        await relayed.settle_many([settlement])
        assert not relay.armed  # the answer was lost indeed
        assert await direct.spent_and_held("t1") == (3_000, 0)
        token = await sqlite_store.get_token("t1")
        assert token is not None and token.spent_nanousd == 3_000
    finally:
        await relay.close()
        await direct.close()
        await relayed.close()


@pytest.fixture
def pg_database(postgres_server: PostgresServer) -> Iterator[tuple[PostgresServer, str]]:
    with postgres_server.database() as url:
        yield postgres_server, url


@pytest.mark.postgres
@pytest.mark.process
async def test_a_settlement_whose_commit_answer_postgresql_lost_counts_once(
    pg_database: tuple[PostgresServer, str],
) -> None:
    """PostgreSQL committed the settlement and the connection died before it said so: the retry
    asks whether that transaction committed rather than adding the spend again."""
    server, url = pg_database
    store = await open_store(url)
    await add_token(store)
    relay = AnswerLosingRelay(server.port, b"COMMIT")
    await relay.start()
    relayed_store = await open_store(relay.url(url))
    ledger = StoreBudgetLedger(relayed_store)
    try:
        hold = await store.reserve_budget("t1", "h1", 5_000, 100, 3600)
        relay.armed = True
        settlement = Settlement("t1", "h1", hold.held_nanousd, 3_000)
        with pytest.raises(Exception) as lost:
            await ledger.settle_many([settlement])
        await ledger.settle_many([settlement])  # as the events pipeline retries it
        token = await store.get_token("t1")
        assert token is not None
        assert (token.spent_nanousd, token.reserved_nanousd) == (3_000, 0)
        assert lost.type.__name__ == "CommitInDoubt"
    finally:
        await relayed_store.close()
        await relay.close()
        await store.close()


# -- through the whole server ----------------------------------------------------------------------


@pytest.fixture
def prices_path(tmp_path: Path) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    return path


async def token_state(proxy: Proxy, token_id: str) -> dict[str, Any]:
    status, shown = await proxy.manage("GET", f"/tokens/{token_id}")
    assert status == 200, shown
    return dict(shown)


async def settles_to(proxy: Proxy, token_id: str, nanousd: int, within: float = 15.0) -> None:
    """Wait for the token to show ``nanousd`` spent and nothing reserved."""
    deadline = time.monotonic() + within
    while True:
        shown = await token_state(proxy, token_id)
        spent = round(shown["spent_usd"] * 1e9)
        if (spent, shown["reserved_usd"]) == (nanousd, 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (spent, shown["reserved_usd"]) == (nanousd, 0), shown


async def redis_shows(
    url: str, token_id: str, nanousd: int, tpm_entries: int, within: float = 15.0
) -> None:
    """Wait for Redis itself to show the token's spend as ``nanousd``, nothing held, and
    ``tpm_entries`` in its tpm window (the management API shows the database's view when Redis
    does not answer)."""
    redis = Redis.from_url(url)
    keys = [f"llm-proxy:{kind}:{token_id}" for kind in ("spent", "holds", "tpm")]
    deadline = time.monotonic() + within
    try:
        while True:
            spent = await redis.get(keys[0])
            seen = (int(spent or 0), await redis.zcard(keys[1]), await redis.zcard(keys[2]))
            if seen == (nanousd, 0, tpm_entries) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()
    assert seen == (nanousd, 0, tpm_entries)


def streamed_cost(stream: bytes) -> int:
    """The cost of a stream, from the usage in its last chunk."""
    for line in reversed(stream.splitlines()):
        if line.startswith(b"data: {") and b'"usage":{' in line:
            return cost_of(line[6:])
    raise AssertionError("no usage in the stream")


async def test_a_hold_settling_while_redis_is_down_settles_once_it_is_back(
    proxy_factory: Any, prices_path: Path, durable_redis: RedisServer
) -> None:
    """The answer ends while Redis is stopped: its hold must not stay reserved for an hour, nor
    its cost go missing, nor its tokens miss the tpm window, once Redis is back."""
    slow = TestServer(fake_upstream_app(MockSettings(chunks=20, chunk_interval=0.05)))
    await slow.start_server()
    try:
        proxy: Proxy = await proxy_factory(
            prices_path=prices_path,
            event_bus="redis",
            redis_url=durable_redis.url,
            api={"base_url": str(slow.make_url("")).rstrip("/")},
        )
        issued = await proxy.issue_token(budget_usd=1, tpm=1_000_000)
        status, _, answer = await post(proxy, issued["token"], chat(max_tokens=20))
        assert status == 200
        cost = cost_of(answer)
        await settles_to(proxy, issued["id"], cost)

        response = await proxy.client.post(
            "/v1/chat/completions",
            data=chat(max_tokens=20, stream=True, stream_options={"include_usage": True}),
            headers=bearer(issued["token"]),
        )
        assert response.status == 200
        durable_redis.stop()  # while the answer streams
        streamed = await response.read()
        assert streamed.endswith(b"data: [DONE]\n\n")
        await asyncio.sleep(1.0)  # the settlement fails meanwhile
        durable_redis.start()
        total = cost + streamed_cost(streamed)
        await redis_shows(durable_redis.url, issued["id"], total, tpm_entries=2)
        await settles_to(proxy, issued["id"], total)
    finally:
        await slow.close()


async def test_a_hold_released_while_redis_is_down_returns_once_it_is_back(
    proxy_factory: Any, prices_path: Path, durable_redis: RedisServer
) -> None:
    """A request that never reached the upstream (its TLS handshake failed) releases its hold
    while Redis is stopped: the hold must come back once Redis is, not keep the budget from the
    token for the rest of its lease."""
    async with failing_when_told() as upstream:
        proxy: Proxy = await proxy_factory(
            prices_path=prices_path,
            event_bus="redis",
            redis_url=durable_redis.url,
            api={
                "base_url": f"https://127.0.0.1:{upstream.port}",
                "timeouts": {"connect": "60s", "response_header": "1s", "idle": "1s"},
            },
        )
        issued = await proxy.issue_token(budget_usd=0.001)
        request = asyncio.ensure_future(post(proxy, issued["token"], chat()))
        await asyncio.wait_for(upstream.connected.wait(), 10)  # admitted: its hold is taken
        durable_redis.stop()
        try:
            upstream.fail.set()  # the TLS handshake is reset
            status, _, answer = await request
            assert (status, orjson.loads(answer)["error"]["code"]) == (502, "upstream_unavailable")
        finally:
            durable_redis.start()
        woken = time.monotonic()
        while (reserved := (await token_state(proxy, issued["id"]))["reserved_usd"]) != 0:
            assert time.monotonic() - woken < HOLD_LEASE_SECONDS / 3, reserved
            await asyncio.sleep(0.05)


@pytest.mark.postgres
@pytest.mark.process
@pytest.mark.timeout(150)
async def test_spend_settled_while_postgresql_was_down_is_kept_after_redis_forgot_it(
    own_database: str,
    own_postgres: PostgresServer,
    proxy_factory: Any,
    prices_path: Path,
    redis_server: RedisServer,
) -> None:
    """PostgreSQL is down when an answer settles, then Redis restarts and forgets the spend: the
    database must have it once back, and settlements on the connections the old Redis closed
    land (tpm records included)."""
    proxy: Proxy = await proxy_factory(
        database_url=own_database,
        prices_path=prices_path,
        event_bus="redis",
        redis_url=redis_server.url,
    )
    issued = await proxy.issue_token(budget_usd=1, tpm=1_000_000)
    status, _, answer = await post(proxy, issued["token"], chat(max_tokens=5))
    assert status == 200
    cost = cost_of(answer)
    await settles_to(proxy, issued["id"], cost)

    own_postgres.stop()
    try:
        # Served from the token cache and Redis: the database is not on the request path.
        status, _, answer = await post(proxy, issued["token"], chat(max_tokens=5))
        assert (status, cost_of(answer)) == (200, cost)
        await asyncio.sleep(1.0)  # settled in Redis; the database part fails
        redis_server.stop()
        redis_server.start()  # with nothing: the spend is now only where the database will have it
    finally:
        own_postgres.start()
    await settles_to(proxy, issued["id"], 2 * cost)

    # The events pipeline's pooled connections are the old Redis's. And Redis lost the tpm
    # window's last minute with its data: the token is refused until that minute is over.
    deadline = time.monotonic() + 75
    while True:
        status, _, answer = await post(proxy, issued["token"], chat(max_tokens=5))
        if status == 200 or time.monotonic() > deadline:
            break
        # The database's pooled connections died with it: the first requests may find them.
        assert orjson.loads(answer)["error"]["code"] in (
            "limits_unavailable",
            "service_unavailable",
        )
        await asyncio.sleep(0.25)
    assert status == 200
    await redis_shows(redis_server.url, issued["id"], 3 * cost, tpm_entries=1)
    await settles_to(proxy, issued["id"], 3 * cost)


@pytest.mark.process
async def test_settlements_waiting_in_an_events_process_that_dies_are_counted_given_up(
    proxy_factory: Any, prices_path: Path, durable_redis: RedisServer
) -> None:
    """Redis is away when an answer settles, and the events process is killed (the OOM killer)
    while it waits to try again: the spend and the tpm tokens it was holding die with it, and the
    page must say so, as it does for those given up at a close."""
    proxy: Proxy = await proxy_factory(
        prices_path=prices_path,
        event_bus="redis",
        redis_url=durable_redis.url,
        event_build_in="process",
    )
    issued = await proxy.issue_token(budget_usd=1, tpm=1_000_000)
    failed = ("llm_proxy_events_budget_settlements_total", (("outcome", "failed"),))
    unrecorded = ("llm_proxy_events_tpm_unrecorded_total", ())
    waiting = ("llm_proxy_events_settlements_waiting", (("kind", "budget"),))
    before = await scrape(proxy)
    first = events_pid(proxy)
    os.kill(first, signal.SIGSTOP)  # it settles nothing until Redis is gone
    try:
        status, _, _ = await post(proxy, issued["token"], chat(max_tokens=5))
        assert status == 200
        durable_redis.stop()
    finally:
        os.kill(first, signal.SIGCONT)

    async def waits_to_try_again() -> bool:
        return (await scrape(proxy)).get(waiting, 0) == 1

    await eventually(waits_to_try_again)
    os.kill(first, signal.SIGKILL)

    async def counted() -> bool:
        samples = await scrape(proxy)
        return (samples.get(failed, 0), samples.get(unrecorded, 0)) == (
            before.get(failed, 0) + 1,
            before.get(unrecorded, 0) + 1,
        )

    await eventually(counted)


@pytest.mark.postgres
@pytest.mark.process
async def test_spend_an_events_process_that_dies_had_not_written_is_counted_lost(
    own_database: str, own_postgres: PostgresServer, proxy_factory: Any, prices_path: Path
) -> None:
    """A token without a budget still has its spend written to spent_usd; the database is down
    when an answer ends, and the events process is killed while it waits to write it: the page
    must show the spend lost, as the log does for what a clean stop could not write."""
    proxy: Proxy = await proxy_factory(
        database_url=own_database, prices_path=prices_path, event_build_in="process"
    )
    issued = await proxy.issue_token()
    status, _, answer = await post(proxy, issued["token"], chat(max_tokens=5))
    assert status == 200
    await settles_to(proxy, issued["id"], cost_of(answer))
    lost = ("llm_proxy_events_spend_lost_nanousd_total", ())
    pending = ("llm_proxy_events_spend_pending_nanousd", ())
    before = await scrape(proxy)
    own_postgres.stop()
    try:
        # Served from the token cache: the database is not on the request path.
        status, _, answer = await post(proxy, issued["token"], chat(max_tokens=5))
        assert status == 200
        cost = cost_of(answer)

        async def waits_to_be_written() -> bool:
            shown = (await scrape(proxy)).get(pending, 0)
            assert shown in (0, cost)
            return shown == cost

        await eventually(waits_to_be_written)
        os.kill(events_pid(proxy), signal.SIGKILL)

        async def counted() -> bool:
            return (await scrape(proxy)).get(lost, 0) == before.get(lost, 0) + cost

        await eventually(counted)
    finally:
        own_postgres.start()


@pytest.mark.postgres
@pytest.mark.process
async def test_spend_settled_the_moment_before_its_events_process_dies_is_counted_lost(
    own_database: str,
    own_postgres: PostgresServer,
    proxy_factory: Any,
    prices_path: Path,
    redis_server: RedisServer,
) -> None:
    """As above, but the events process is killed the moment its event is on the bus, before
    its next periodic status line: the event shows a cost that spent_usd will never have, so the
    page must count it lost, or spend and events disagree with nothing to say why."""
    proxy: Proxy = await proxy_factory(
        database_url=own_database,
        prices_path=prices_path,
        event_bus="redis",
        redis_url=redis_server.url,
        event_build_in="process",
    )
    issued = await proxy.issue_token()
    status, _, answer = await post(proxy, issued["token"], chat(max_tokens=5))
    assert status == 200
    await settles_to(proxy, issued["id"], cost_of(answer))
    lost = ("llm_proxy_events_spend_lost_nanousd_total", ())
    before = await scrape(proxy)
    own_postgres.stop()
    try:
        async with Redis.from_url(redis_server.url) as redis:
            published = await redis.xlen(STREAM)
            status, _, answer = await post(proxy, issued["token"], chat(max_tokens=5))
            assert status == 200
            cost = cost_of(answer)
            deadline = time.monotonic() + 10
            while await redis.xlen(STREAM) == published:
                assert time.monotonic() < deadline, "the event never reached the bus"
                await asyncio.sleep(0.002)
        await asyncio.sleep(0.05)  # the bus's answer is back (well within the status interval)
        os.kill(events_pid(proxy), signal.SIGKILL)

        async def counted() -> bool:
            return (await scrape(proxy)).get(lost, 0) == before.get(lost, 0) + cost

        await eventually(counted, timeout=5)
    finally:
        own_postgres.start()
