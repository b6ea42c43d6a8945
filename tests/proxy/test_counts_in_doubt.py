"""Request counts land exactly once although PostgreSQL's answer to their write was lost (the
connection died after the database ran it): a retry asks what happened before counting again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from tests.conftest import Proxy
from tests.postgres import PostgresServer
from tests.postgres_relay import Link, Relay
from tests.proxy.test_change_feed import NO_TIMER, status_of, until
from tests.proxy.test_settlement_retry import AnswerLosingRelay

pytestmark = [pytest.mark.postgres, pytest.mark.process]


@pytest.fixture
async def commit_losing_url(
    postgres_server: PostgresServer, postgres_url: str
) -> AsyncIterator[tuple[AnswerLosingRelay, str]]:
    """A relay to the test's database that, once armed, loses the answer to one COMMIT; the
    database's URL through it."""
    async with AnswerLosingRelay(postgres_server.port, b"COMMIT") as relay:
        yield relay, relay.url(postgres_url)


async def test_request_counts_whose_commit_answer_was_lost_count_once(
    commit_losing_url: tuple[AnswerLosingRelay, str], proxy_factory: Any
) -> None:
    relay, url = commit_losing_url
    proxy: Proxy = await proxy_factory(database_url=url, usage_flush_seconds=3600.0, **NO_TIMER)
    issued = await proxy.issue_token()
    for _ in range(3):
        assert await status_of(proxy, issued["token"]) == (200, None)
    relay.armed = True
    # It writes the tallies first: their COMMIT goes unanswered, and the database is unavailable.
    status, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert not relay.armed  # the answer was lost indeed
    assert (status, shown["error"]["code"]) == (503, "service_unavailable")
    status, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert status == 200, shown
    assert shown["request_count"] == 3


@pytest.mark.parametrize("lost", ["claim", "commit"])
async def test_a_claim_whose_answer_was_lost_is_admitted_or_given_back(
    postgres_server: PostgresServer, postgres_url: str, proxy_factory: Any, lost: str
) -> None:
    """The connection dies after PostgreSQL counted a request of a token with max_requests and
    before the proxy heard so: the request is admitted, or refused and not counted."""
    async with AnswerLosingRelay(postgres_server.port, b"") as relay:
        proxy: Proxy = await proxy_factory(database_url=relay.url(postgres_url), **NO_TIMER)
        issued = await proxy.issue_token(max_requests=5)
        # The claim's statement is the first message to carry the token's id (its lookup goes by
        # the value's hash).
        relay.arm(issued["id"].encode() if lost == "claim" else b"COMMIT")
        answers = [await status_of(proxy, issued["token"]) for _ in range(3)]
        assert not relay.armed  # the answer was lost indeed
        admitted = answers.count((200, None))
        assert set(answers) <= {(200, None), (503, "limits_unavailable")}

        async def counted() -> int:
            status, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
            assert status == 200, shown
            return int(shown["request_count"])

        # A claim whose fate the database could not tell at once is given back when it can.
        await until(lambda: _is(counted(), admitted), 10, "the claim given back")


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_a_place_whose_give_back_failed_is_given_back_when_the_database_answers(
    postgres_server: PostgresServer, postgres_url: str, proxy_factory: Any, unused_tcp_port: int
) -> None:
    """A request that never reached the upstream gives its place back; a connection to the
    database dying under that give-back must not leave the place used for good."""
    async with AnswerLosingRelay(postgres_server.port, b"") as relay:
        url = relay.url(postgres_url)
        proxy: Proxy = await proxy_factory(
            database_url=url, api={"base_url": f"http://127.0.0.1:{unused_tcp_port}"}, **NO_TIMER
        )
        issued = await proxy.issue_token(max_requests=1)
        relay.arm(b"request_count - 1")  # the give-back's statement, sent the first time
        assert await status_of(proxy, issued["token"]) == (502, "upstream_unavailable")
        assert not relay.armed  # the give-back's connection died indeed

        async def counted() -> int:
            status, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
            assert status == 200, shown
            return int(shown["request_count"])

        await until(lambda: _is(counted(), 0), 10, "the place given back")


async def test_a_give_back_whose_commit_answer_was_lost_gives_back_once(
    postgres_server: PostgresServer, postgres_url: str, proxy_factory: Any, unused_tcp_port: int
) -> None:
    async with AnswerLosingRelay(postgres_server.port, b"") as relay:
        url = relay.url(postgres_url)
        proxy: Proxy = await proxy_factory(
            database_url=url, api={"base_url": f"http://127.0.0.1:{unused_tcp_port}"}, **NO_TIMER
        )
        issued = await proxy.issue_token(max_requests=5)
        database = postgres_url.rsplit("/", 1)[1]
        postgres_server.psql(database, "UPDATE tokens SET request_count = 2")  # used before
        relay.arm(b"COMMIT", passing=1)  # the claim's COMMIT passes, the give-back's is lost
        assert await status_of(proxy, issued["token"]) == (502, "upstream_unavailable")
        assert not relay.armed  # the give-back's answer was lost indeed
        authority = proxy.components.authority

        async def given_back() -> bool:
            return not authority._orphan_releases

        await until(given_back, 10, "the give-back retried")
        status, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
        assert status == 200, shown
        assert shown["request_count"] == 2


async def test_usage_aggregates_whose_commit_answer_was_lost_count_once(
    commit_losing_url: tuple[AnswerLosingRelay, str], proxy_factory: Any
) -> None:
    """The usage dispatcher's write of a batch committed and its answer was lost: the batch is
    retried, and must not be added to the token's usage a second time."""
    relay, url = commit_losing_url
    proxy: Proxy = await proxy_factory(database_url=url, usage_flush_seconds=3600.0, **NO_TIMER)
    issued = await proxy.issue_token()

    async def requests() -> int:
        status, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
        assert status == 200, shown
        return int(shown["usage"]["requests"])

    async def lost() -> bool:
        return not relay.armed

    relay.arm(b"COMMIT")  # the next write is the usage of the requests below
    for _ in range(2):
        assert await status_of(proxy, issued["token"]) == (200, None)
    await until(lost, 10, "the first batch's answer lost")
    # A later request's usage is written after the first batch's retry: it counts once.
    assert await status_of(proxy, issued["token"]) == (200, None)
    await until(lambda: _at_least(requests(), 3), 10, "the later request")
    assert await requests() == 3


async def _at_least(value: Awaitable[int], expected: int) -> bool:
    return await value >= expected


async def test_requests_counted_during_a_burst_of_dropped_connections_are_those_admitted(
    postgres_server: PostgresServer, postgres_url: str, proxy_factory: Any
) -> None:
    """PostgreSQL's connections are terminated again and again during a burst of requests on a
    token with max_requests: every request counted was admitted, and every other refused."""
    proxy: Proxy = await proxy_factory(database_url=postgres_url, **NO_TIMER)
    issued = await proxy.issue_token(max_requests=1000)
    database = postgres_url.rsplit("/", 1)[1]
    bursting = True

    async def terminate() -> None:
        while bursting:
            await asyncio.to_thread(postgres_server.terminate_backends, database, "llm-proxy")

    killer = asyncio.create_task(terminate())
    try:
        answers = await asyncio.gather(*(status_of(proxy, issued["token"]) for _ in range(200)))
    finally:
        bursting = False
        await killer
    # (service_unavailable: the token's lookup failed, before its limits were known.)
    refused = {(503, "limits_unavailable"), (503, "service_unavailable")}
    # A request the tests' upstream did not answer within its 1 s (a loaded machine) reached it,
    # and counts as the answered ones do.
    reached = {(200, None), (504, "upstream_timeout")}
    assert set(answers) <= reached | refused, set(answers)
    admitted = sum(1 for answer in answers if answer in reached)

    async def counted() -> int:
        status, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
        return int(shown["request_count"]) if status == 200 else -1

    await until(lambda: _is(counted(), admitted), 15, f"{admitted} counted")


class InTurnAnswerLosingRelay(Relay):
    """A relay to PostgreSQL that loses the answers to the messages holding each of ``words`` in
    turn: it passes the command on, then cuts its client off (see :class:`AnswerLosingRelay`)."""

    def __init__(self, target_port: int, *words: bytes) -> None:
        super().__init__(target_port)
        self.words = [word.lower() for word in words]
        self._losing: set[Link] = set()

    async def from_client(self, link: Link, message: bytes) -> None:
        await super().from_client(link, message)
        if self.words and self.words[0] in message.lower():
            self.words.pop(0)  # the next word is armed at once, before this answer is lost
            self._losing.add(link)
        if link in self._losing and link.framing.ends_command(message):
            link.to_client.transport.abort()
            await asyncio.sleep(1)  # the server answers into the void


async def test_a_claim_in_doubt_given_back_in_doubt_is_given_back_once(
    postgres_server: PostgresServer, postgres_url: str, proxy_factory: Any
) -> None:
    """A claim's COMMIT answer is lost and so is the answer to the question whether it committed:
    the request is refused and its place given back in the background. That give-back's own
    COMMIT answer is lost too: asked again, it must not give the place back a second time, which
    would let the token make a request more than its max_requests."""
    async with InTurnAnswerLosingRelay(postgres_server.port) as relay:
        proxy: Proxy = await proxy_factory(database_url=relay.url(postgres_url), **NO_TIMER)
        issued = await proxy.issue_token(max_requests=5)
        database = postgres_url.rsplit("/", 1)[1]
        postgres_server.psql(database, "UPDATE tokens SET request_count = 2")  # used before
        # The claim's COMMIT, the question about it, then the give-back's COMMIT.
        relay.words = [b"commit", b"txid_status", b"commit"]
        assert await status_of(proxy, issued["token"]) == (503, "limits_unavailable")
        authority = proxy.components.authority

        async def given_back() -> bool:
            return not relay.words and not authority._orphan_releases

        await until(given_back, 20, "the give-back retried")
        status, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
        assert status == 200, shown
        assert shown["request_count"] == 2
