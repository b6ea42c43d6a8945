"""Management changes pushed to every instance (PostgreSQL LISTEN/NOTIFY), and failing closed.

Instances here share a real PostgreSQL database and nothing else. The timer that reads the change
feed is set to 30 s where a test proves the push alone delivers a change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from llm_proxy.stats import STATS
from tests.conftest import Proxy
from tests.postgres import PostgresServer
from tests.postgres_relay import Link, Relay

pytestmark = [pytest.mark.postgres, pytest.mark.process]

NO_TIMER = {"change_poll_seconds": 30.0, "change_poll_seconds_pushed": 30.0}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def until(condition: Any, timeout: float, what: str) -> float:
    """Poll ``condition()`` (async) until true; the seconds it took."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < timeout, f"{what} not within {timeout}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def status_of(proxy: Proxy, token: str) -> tuple[int, str | None]:
    response = await proxy.client.get("/v1/models", headers=bearer(token))
    body = await response.json()
    return response.status, (body.get("error") or {}).get(
        "code"
    ) if response.status != 200 else None


async def pushed(proxy: Proxy) -> bool:
    return bool(proxy.components.authority.push_connected)


# The database is requested before the proxies, so it outlives them at teardown.


async def test_a_revocation_is_pushed_to_every_other_instance(
    postgres_url: str, proxy_factory: Any
) -> None:
    handler: Proxy = await proxy_factory(database_url=postgres_url, **NO_TIMER)
    others: list[Proxy] = [
        await proxy_factory(database_url=postgres_url, **NO_TIMER) for _ in range(2)
    ]
    for other in others:
        await until(lambda other=other: pushed(other), 5, "the push channel")
    seen: list[float] = []
    for _ in range(5):
        issued = await handler.issue_token()
        for other in others:
            assert await status_of(other, issued["token"]) == (200, None)  # cached there now
        await handler.manage("DELETE", f"/tokens/{issued['id']}")
        for other in others:

            async def refused(other: Proxy = other, value: str = issued["token"]) -> bool:
                return await status_of(other, value) == (401, "token_inactive")

            seen.append(await until(refused, 1.0, "the pushed revocation"))
    assert max(seen) < 1.0


async def test_a_lost_listener_reconnects_and_replays_what_it_missed(
    postgres_server: PostgresServer, postgres_url: str, proxy_factory: Any
) -> None:
    handler: Proxy = await proxy_factory(database_url=postgres_url, **NO_TIMER)
    other: Proxy = await proxy_factory(database_url=postgres_url, **NO_TIMER)
    await until(lambda: pushed(other), 5, "the push channel")
    issued = await handler.issue_token()
    assert await status_of(other, issued["token"]) == (200, None)
    reconnects = STATS.change_push_reconnects

    database = postgres_url.rsplit("/", 1)[1]
    postgres_server.terminate_backends(database, application_name="llm-proxy-listen")
    await until(lambda: _not(pushed(other)), 5, "noticing the lost channel")
    # Made while nobody listens: only the replay from the feed's cursor can deliver it.
    await handler.manage("DELETE", f"/tokens/{issued['id']}")

    async def refused() -> bool:
        return await status_of(other, issued["token"]) == (401, "token_inactive")

    await until(refused, 5, "the replayed revocation")
    assert other.components.authority.push_connected
    assert STATS.change_push_reconnects > reconnects


async def _not(value: Any) -> bool:
    return not await value


class ListenerCutter(Relay):
    """A relay to PostgreSQL that can swallow what the server sends on the LISTEN connections
    (as a dead network would: no NOTIFY arrives, the socket stays open), and then close them."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._listeners: set[Link] = set()
        self.swallowing = False

    async def from_client(self, link: Link, message: bytes) -> None:
        if b"llm-proxy-listen" in message:  # its start-up message names it
            self._listeners.add(link)
        await super().from_client(link, message)

    async def from_server(self, link: Link, message: bytes) -> None:
        if not (link in self._listeners and self.swallowing):
            await super().from_server(link, message)

    def cut(self) -> None:
        """Close the LISTEN connections: their loss shows now. New ones pass."""
        self.swallowing = False
        for link in self._listeners:
            link.to_client.transport.abort()
        self._listeners.clear()


@pytest.fixture
async def listener_cutter(postgres_server: PostgresServer) -> AsyncIterator[ListenerCutter]:
    """Requested before the proxies, so it outlives them at teardown."""
    async with ListenerCutter(postgres_server.port) as relay:
        yield relay


async def test_a_lost_push_channel_has_the_feed_read_at_once(
    postgres_url: str,
    listener_cutter: ListenerCutter,
    proxy_factory: Any,
) -> None:
    """While its push channel is up an instance reads the feed only now and then; when the
    channel is found lost, what it missed must be read at once, not at the next tick of the
    pushed timer (set to 30 s here) nor only once the channel is back."""
    slow_pushed_timer = {
        "change_poll_seconds": 0.25,
        "change_poll_seconds_pushed": 30.0,
        "revocation_max_staleness": 60.0,
    }
    relay = listener_cutter
    handler: Proxy = await proxy_factory(database_url=postgres_url, **slow_pushed_timer)
    other: Proxy = await proxy_factory(database_url=relay.url(postgres_url), **slow_pushed_timer)
    await until(lambda: pushed(other), 5, "the push channel")
    issued = await handler.issue_token()
    assert await status_of(other, issued["token"]) == (200, None)
    relay.swallowing = True
    await handler.manage("DELETE", f"/tokens/{issued['id']}")
    await asyncio.sleep(0.3)
    assert await status_of(other, issued["token"]) == (200, None)  # it has not heard

    relay.cut()

    async def refused() -> bool:
        return await status_of(other, issued["token"]) == (401, "token_inactive")

    took = await until(refused, 0.5, "reading the feed on losing the push channel")
    print(f"refused {took * 1000:.0f} ms after the push channel was lost")


async def test_an_unreachable_database_fails_closed_and_recovers(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    url = own_database
    proxy: Proxy = await proxy_factory(
        database_url=url, revocation_max_staleness=0.5, change_poll_seconds=0.05
    )
    unlimited = (await proxy.issue_token())["token"]
    limited = (await proxy.issue_token(max_requests=100))["token"]
    assert await status_of(proxy, unlimited) == (200, None)
    assert await status_of(proxy, limited) == (200, None)
    stale_checks = STATS.cache_stale_checks

    own_postgres.stop()
    stopped = time.monotonic()
    # A limit held in the database cannot be counted: refused, never admitted uncounted.
    assert await status_of(proxy, limited) == (503, "limits_unavailable")
    # A token without limits is trusted from the cache while the feed is fresh ...
    assert await status_of(proxy, unlimited) == (200, None)
    assert time.monotonic() - stopped < 0.5, "the checks above took too long to mean much"
    # ... and checked against the database once the feed has been silent too long.
    await asyncio.sleep(0.6)
    assert await status_of(proxy, unlimited) == (503, "service_unavailable")
    # A limit held in the database is still what the refusal names (SPEC §11).
    assert await status_of(proxy, limited) == (503, "limits_unavailable")
    assert STATS.cache_stale_checks > stale_checks
    # The management API answers in its error shape that it cannot reach the database.
    status, body = await proxy.manage("GET", "/projects")
    assert (status, body["error"]["code"]) == (503, "service_unavailable")
    metrics = await (await proxy.client.get("/metrics")).text()
    lag = _sample(metrics, "llm_proxy_change_feed_lag_seconds")
    assert lag > 0.5
    assert _sample(metrics, "llm_proxy_change_feed_failures_total") > 0
    assert 'llm_proxy_token_cache_lookups_total{result="stale_feed"}' in metrics

    own_postgres.start()

    async def admitted() -> bool:
        return await status_of(proxy, unlimited) == (200, None)

    await until(admitted, 10, "recovery after the database came back")
    assert await status_of(proxy, limited) == (200, None)
    metrics = await (await proxy.client.get("/metrics")).text()
    assert _sample(metrics, "llm_proxy_change_feed_lag_seconds") < 0.5


async def test_a_limit_held_in_the_database_is_named_through_an_outage_longer_than_the_cache(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    """A cached grant older than the token cache is reloaded; while the database is down, a token
    whose limits the cache knows live there is still refused for them (SPEC §11), not as if the
    proxy had never seen it."""
    proxy: Proxy = await proxy_factory(database_url=own_database, token_cache_seconds=0.2)
    limited = (await proxy.issue_token(max_requests=100))["token"]
    rate_limited = (await proxy.issue_token(rpm=100))["token"]  # its window is in the database
    for token in (limited, rate_limited):
        assert await status_of(proxy, token) == (200, None)

    own_postgres.stop()
    await asyncio.sleep(0.3)  # the cached grants are past the cache's time
    for token in (limited, rate_limited):
        assert await status_of(proxy, token) == (503, "limits_unavailable")


async def test_a_used_up_token_is_refused_for_its_limits_while_the_database_is_down(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    """A token this process saw used up asks the database whether a place came back; when it
    cannot answer, the refusal names the limit it cannot count (SPEC §11)."""
    proxy: Proxy = await proxy_factory(database_url=own_database)
    token = (await proxy.issue_token(max_requests=1))["token"]
    assert await status_of(proxy, token) == (200, None)
    assert await status_of(proxy, token) == (429, "quota_exceeded")

    own_postgres.stop()
    assert await status_of(proxy, token) == (503, "limits_unavailable")


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on the metrics page")


async def test_a_quiet_feed_is_read_often_enough_never_to_look_stale(
    postgres_url: str, proxy_factory: Any
) -> None:
    """A staleness window shorter than the timer's period shortens the period, not the cache."""
    proxy: Proxy = await proxy_factory(
        database_url=postgres_url, revocation_max_staleness=0.4, **NO_TIMER
    )
    await until(lambda: pushed(proxy), 5, "the push channel")
    token = await proxy.token()
    assert await status_of(proxy, token) == (200, None)
    stale_checks, hits = STATS.cache_stale_checks, STATS.cache_hits
    await asyncio.sleep(1.0)  # no change anywhere: nothing is pushed
    for _ in range(3):
        assert await status_of(proxy, token) == (200, None)
    assert STATS.cache_stale_checks == stale_checks
    assert STATS.cache_hits == hits + 3


async def test_a_request_admitted_once_the_feed_went_stale_is_checked_against_the_database(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    """A request whose token was checked while the feed was fresh, and whose body arrived only
    after the feed fell silent for longer than REVOCATION_MAX_STALENESS, is admitted then: the
    cache is not to be trusted at that moment, so the token is checked against the database,
    which cannot answer (fail closed), rather than forwarded on the cache's word."""
    proxy: Proxy = await proxy_factory(
        database_url=own_database, revocation_max_staleness=0.5, change_poll_seconds=0.05
    )
    token = (await proxy.issue_token())["token"]
    assert await status_of(proxy, token) == (200, None)
    forwarded = len(proxy.upstream.requests)
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    url = proxy.client.make_url("")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10]
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # its token checked from the cache, its body still arriving
    own_postgres.stop()
    await asyncio.sleep(0.8)  # the feed is stale now
    writer.write(body[10:])
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert len(proxy.upstream.requests) == forwarded
    assert status_line.split()[1] == b"503"


async def test_a_change_feed_that_starts_again_lower_still_reaches_every_instance(
    postgres_url: str, proxy_factory: Any
) -> None:
    """The database's change ids start again below what an instance has read (a database restored
    from a backup, a failover to a replica that had not received the last changes): the changes
    made from then on must still reach it within a second, not be taken for ones it has read."""
    handler: Proxy = await proxy_factory(database_url=postgres_url)
    other: Proxy = await proxy_factory(database_url=postgres_url)
    for _ in range(3):
        await handler.manage("DELETE", f"/tokens/{(await handler.issue_token())['id']}")
    issued = await handler.issue_token()
    assert await status_of(other, issued["token"]) == (200, None)
    await asyncio.sleep(0.6)  # the other instance has read those changes
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute("DELETE FROM changes; ALTER SEQUENCE changes_id_seq RESTART WITH 1")
    finally:
        await conn.close()
    await asyncio.sleep(0.6)
    await handler.manage("DELETE", f"/tokens/{issued['id']}")

    async def refused() -> bool:
        return await status_of(other, issued["token"]) == (401, "token_inactive")

    await until(refused, 1.0, "the revocation after the feed started again")
