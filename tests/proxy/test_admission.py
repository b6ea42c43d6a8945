"""Withering tokens: exact quotas under concurrency, revocation everywhere within a second, usage counts.

Every test runs on each backend: SQLite, and a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from llm_proxy.models import AuditEntry, utcnow
from llm_proxy.stats import STATS
from tests.conftest import Proxy
from tests.raw_servers import silent_server


@pytest.fixture
def proxy_database_url(database_url: str) -> str:
    return database_url


AUDIT_OF_A_REVOCATION = AuditEntry(actor="test", action="token.revoke", target_type="token")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_max_requests_is_exact_under_concurrency(proxy: Proxy) -> None:
    issued = await proxy.issue_token(max_requests=10)

    async def call() -> int:
        response = await proxy.client.get("/v1/models", headers=bearer(issued["token"]))
        await response.read()
        return response.status

    statuses = await asyncio.gather(*(call() for _ in range(60)))
    assert statuses.count(200) == 10 and statuses.count(429) == 50
    _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert token["request_count"] == 10


async def test_max_requests_is_exact_across_instances(proxy_factory: Any) -> None:
    first: Proxy = await proxy_factory()
    second: Proxy = await proxy_factory()
    issued = await first.issue_token(max_requests=15)

    async def call(instance: Proxy) -> int:
        response = await instance.client.get("/v1/models", headers=bearer(issued["token"]))
        await response.read()
        return response.status

    statuses = await asyncio.gather(*(call(p) for p in [first, second] * 20))
    assert statuses.count(200) == 15
    assert statuses.count(429) == 25


async def test_revocation_reaches_other_instances_within_a_second(proxy_factory: Any) -> None:
    handler: Proxy = await proxy_factory()
    other: Proxy = await proxy_factory()
    issued = await handler.issue_token()
    headers = bearer(issued["token"])
    assert (await other.client.get("/v1/models", headers=headers)).status == 200  # now cached
    await handler.manage("DELETE", f"/tokens/{issued['id']}")
    revoked_at = time.monotonic()
    while (await other.client.get("/v1/models", headers=headers)).status == 200:
        assert time.monotonic() - revoked_at < 1.0, "revocation not seen within one second"
        await asyncio.sleep(0.02)
    response = await other.client.get("/v1/models", headers=headers)
    assert (await response.json())["error"]["code"] == "token_inactive"


async def test_project_deactivation_reaches_other_instances(proxy_factory: Any) -> None:
    handler: Proxy = await proxy_factory()
    other: Proxy = await proxy_factory()
    issued = await handler.issue_token()
    headers = bearer(issued["token"])
    assert (await other.client.get("/v1/models", headers=headers)).status == 200
    await handler.manage("PATCH", f"/projects/{issued['project_id']}", {"is_active": False})
    deadline = time.monotonic() + 1.0
    while (await other.client.get("/v1/models", headers=headers)).status == 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_a_revocation_pruned_from_the_feed_before_an_instance_read_it_still_holds_there(
    proxy_factory: Any,
) -> None:
    """An instance cut off from the change feed for longer than its retention: the revocation it
    missed was pruned meanwhile. Its next read of the feed has it reload every cached token."""
    handler: Proxy = await proxy_factory()
    # Reads the feed only when told below (no push, no timer within the test, never stale).
    behind: Proxy = await proxy_factory(
        change_push=False,
        change_poll_seconds=3600.0,
        change_poll_seconds_pushed=3600.0,
        revocation_max_staleness=7200.0,
    )
    revoked, kept, other = [await handler.issue_token() for _ in range(3)]
    for issued in (revoked, kept):
        response = await behind.client.get("/v1/models", headers=bearer(issued["token"]))
        assert response.status == 200  # now cached
    await handler.manage("DELETE", f"/tokens/{revoked['id']}")
    await handler.manage("PATCH", f"/tokens/{other['id']}", {"max_requests": 5})
    store = handler.components.store
    assert await store.prune_changes(utcnow() + timedelta(seconds=1), 100) >= 1

    await behind.components.authority.poll_changes()
    response = await behind.client.get("/v1/models", headers=bearer(revoked["token"]))
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "token_inactive"
    response = await behind.client.get("/v1/models", headers=bearer(kept["token"]))
    assert response.status == 200


async def test_cached_tokens_are_checked_without_the_database(proxy: Proxy) -> None:
    token = await proxy.token()
    hits, misses = STATS.cache_hits, STATS.cache_misses
    for _ in range(5):
        assert (await proxy.client.get("/v1/models", headers=bearer(token))).status == 200
    assert (STATS.cache_misses - misses, STATS.cache_hits - hits) == (1, 4)


async def test_a_lookup_that_overlaps_a_revocation_is_not_trusted_afterwards(proxy: Proxy) -> None:
    """The store answered a first request's lookup from before a revocation, and the answer
    reached the proxy after the revocation's notice (a slow reply): it may serve that request,
    which was in flight, but not the requests after it for the cache's 30 s."""
    issued = await proxy.issue_token()
    authority = proxy.components.authority
    in_flight = asyncio.ensure_future(authority.check(f"Bearer {issued['token']}"))
    for _ in range(5):
        await asyncio.sleep(0)  # the lookup is sent to the store
    time.sleep(0.2)  # (the loop blocked) the store has answered; the proxy has not read it
    authority.invalidate(token_id=issued["id"])  # the change feed's notice, read first
    assert (await in_flight).is_active
    # What the notice announced: the token's revocation, already in the store.
    await proxy.components.store.update_token(
        issued["id"], {"is_active": False}, AUDIT_OF_A_REVOCATION
    )

    response = await proxy.client.get("/v1/models", headers=bearer(issued["token"]))
    assert response.status == 401


async def test_unlimited_usage_is_counted_and_flushed(proxy_factory: Any) -> None:
    first: Proxy = await proxy_factory()
    second: Proxy = await proxy_factory()
    issued = await first.issue_token()
    for instance in (first, second, second):
        assert (
            await instance.client.get("/v1/models", headers=bearer(issued["token"]))
        ).status == 200
    # The second instance writes its tally in the background within usage_flush_seconds.
    deadline = time.monotonic() + 3
    while True:
        _, token = await first.manage("GET", f"/tokens/{issued['id']}")
        if token["request_count"] == 3:
            break
        assert time.monotonic() < deadline, token
        await asyncio.sleep(0.05)
    assert token["last_used_at"] is not None


async def test_a_request_whose_client_left_before_it_reached_the_upstream_counts_nothing(
    proxy_factory: Any,
) -> None:
    """The proxy was still connecting upstream (a TLS handshake that never ends) when the client
    gave up: nothing reached the upstream, so neither max_requests nor rpm counts it (SPEC §6)."""

    async with silent_server() as port:
        proxy: Proxy = await proxy_factory(api={"base_url": f"https://127.0.0.1:{port}"})
        issued = await proxy.issue_token(max_requests=1, rpm=1)

        async def give_up() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(
                    proxy.client.get("/v1/models", headers=bearer(issued["token"])), 0.3
                )

        await give_up()
        for _ in range(300):
            _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
            if token["request_count"] == 0:
                break
            await asyncio.sleep(0.02)
        assert token["request_count"] == 0
        # Its rpm slot and its request are free again: the next request goes to the upstream too,
        # rather than being refused 429.
        await give_up()


@contextlib.asynccontextmanager
async def tokens_locked(database_url: str) -> AsyncIterator[None]:
    """Another client holds the tokens' writes (SQLite's write lock, or the PostgreSQL table):
    a claim of the proxy's waits until the block ends, then lands."""
    if database_url.startswith("sqlite:///"):
        db = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            db.execute("ROLLBACK")
            db.close()
        return
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE tokens IN EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


@pytest.mark.parametrize("limit", [{"max_requests": 1}, {"rpm": 1}], ids=["quota", "rpm"])
async def test_a_request_whose_client_left_while_its_place_was_claimed_counts_nothing(
    proxy: Proxy, proxy_database_url: str, limit: dict[str, int]
) -> None:
    """The client gave up while the database was still counting its request: the count lands
    after the client left, and nothing reached the upstream, so it is given back (SPEC §6)."""
    issued = await proxy.issue_token(**limit)
    headers = bearer(issued["token"])

    async def token() -> dict[str, Any]:
        _, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
        return dict(shown)

    async with tokens_locked(proxy_database_url):
        request = asyncio.ensure_future(proxy.client.get("/v1/models", headers=headers))
        await asyncio.sleep(0.5)  # its claim waits for the lock
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0.2)  # the proxy sees its client go
    for _ in range(100):  # the claim lands (it stamps last_used_at), unless it was called off
        if (await token())["last_used_at"] is not None:
            break
        await asyncio.sleep(0.02)
    for _ in range(300):  # and is given back
        if (shown := await token())["request_count"] == 0:
            break
        await asyncio.sleep(0.02)
    assert shown["request_count"] == 0
    response = await proxy.client.get("/v1/models", headers=headers)
    assert response.status == 200  # its one request (a minute), never used
    assert [seen.path_qs for seen in proxy.upstream.requests] == ["/v1/models"]


async def test_a_place_given_back_on_another_instance_is_claimable_there_at_once(
    proxy_factory: Any,
) -> None:
    """The last place was held by a request of another instance when this one was refused; that
    request then never reached the upstream and gave its place back. This instance remembered the
    token as used up and refused its next request for good (quota_exceeded, x-should-retry: false:
    an SDK gives up), though the token was no longer used up (a reviewer saw it)."""
    async with silent_server() as port:
        stalled: Proxy = await proxy_factory(api={"base_url": f"https://127.0.0.1:{port}"})
        other: Proxy = await proxy_factory()
        issued = await stalled.issue_token(max_requests=1)

        async def request_count() -> int:
            _, token = await stalled.manage("GET", f"/tokens/{issued['id']}")
            return int(token["request_count"])

        async def until_count(count: int) -> None:
            for _ in range(300):
                if await request_count() == count:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"request_count never became {count}")

        async def status_on_other() -> int:
            response = await other.client.get("/v1/models", headers=bearer(issued["token"]))
            await response.read()
            return response.status

        held = asyncio.ensure_future(
            stalled.client.get("/v1/models", headers=bearer(issued["token"]))
        )
        await until_count(1)
        assert await status_on_other() == 429  # the place is held: refused, rightly
        held.cancel()  # its client gives up before anything reached the upstream
        with pytest.raises(asyncio.CancelledError):
            await held
        await until_count(0)
        assert await status_on_other() == 200
        assert await request_count() == 1
