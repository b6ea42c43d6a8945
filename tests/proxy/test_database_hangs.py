"""The proxy path while PostgreSQL hangs (stopped with SIGSTOP: connections stay open, nothing
answers): a request whose token must be read from the database, or whose limit is claimed or held
there, is refused 503 once the store's own timeout ends, not after a second one spent waiting for
the hung database to acknowledge the cancelled query; it is not counted, and requests pass again
once the database is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from structlog.testing import capture_logs

from llm_proxy.crypto import hash_token
from tests.conftest import FrozenProxyStarter, Proxy
from tests.freezing_relay import FreezingRelay
from tests.postgres import PostgresServer
from tests.postgres_relay import Link, Relay
from tests.proxy.test_budgets import PRICES, chat, post, settled

pytestmark = [pytest.mark.postgres, pytest.mark.process]

# The store gives a query 5 s; the bound leaves a loaded CI machine its slack and still tells
# the fix from the 10 s the first such request took before it.
STORE_BOUND_SECONDS = 5.0 + 3.0


async def test_a_token_to_be_read_is_refused_within_the_store_bound_while_the_database_hangs(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    proxy: Proxy = await proxy_factory(database_url=own_database)
    token = await proxy.token()  # issued, never used: not in the token cache yet
    unknown = "sk-" + "A" * 43
    with own_postgres.frozen():
        answers = []
        for value in (unknown, token):
            started = time.monotonic()
            response = await proxy.client.get(
                "/v1/models", headers={"Authorization": f"Bearer {value}"}
            )
            answers.append((response.status, time.monotonic() - started))
    assert [status for status, _ in answers] == [503, 503], answers
    assert max(seconds for _, seconds in answers) < STORE_BOUND_SECONDS, answers
    deadline = time.monotonic() + 20
    while True:
        response = await proxy.client.get(
            "/v1/models", headers={"Authorization": f"Bearer {token}"}
        )
        if response.status == 200:
            break
        assert time.monotonic() < deadline, "requests never passed again"
        await asyncio.sleep(0.2)


async def test_a_max_requests_claim_is_refused_within_the_store_bound_while_the_database_hangs(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    # The claim is a transaction: its statement timed out, it used to wait as long again for the
    # ROLLBACK, which the hung database never answers.
    proxy: Proxy = await proxy_factory(database_url=own_database)
    issued = await proxy.issue_token(max_requests=10)
    headers = {"Authorization": f"Bearer {issued['token']}"}
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200  # now cached
    with own_postgres.frozen():
        started = time.monotonic()
        response = await proxy.client.get("/v1/models", headers=headers)
        seconds = time.monotonic() - started
        body = await response.json()
    assert (response.status, body["error"]["code"]) == (503, "limits_unavailable"), body
    assert seconds < STORE_BOUND_SECONDS, seconds
    # Refused, so not counted: the one request before the hang is all the token has used.
    status, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (status, token["request_count"]) == (200, 1), token
    admitted = await _admitted_once_thawed(proxy, headers)
    status, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (status, token["request_count"]) == (200, 1 + admitted), token


async def test_more_claims_than_the_pool_holds_are_refused_within_the_bound_while_it_hangs(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    # Each refused claim's connection is out of the pool until it is closed; none may be left
    # for the next claims to queue behind, during the hang or after it.
    proxy: Proxy = await proxy_factory(database_url=own_database, database_pool_size=3)
    issued = await proxy.issue_token(max_requests=100)
    headers = {"Authorization": f"Bearer {issued['token']}"}
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200  # now cached

    async def timed() -> tuple[int, float]:
        started = time.monotonic()
        response = await proxy.client.get("/v1/models", headers=headers)
        return response.status, time.monotonic() - started

    with own_postgres.frozen():
        answers = await asyncio.gather(*(timed() for _ in range(10)))
    assert {status for status, _ in answers} == {503}, answers
    assert max(seconds for _, seconds in answers) < STORE_BOUND_SECONDS, answers
    admitted = await _admitted_once_thawed(proxy, headers)
    answers = await asyncio.gather(*(timed() for _ in range(10)))
    assert {status for status, _ in answers} == {200}, answers
    status, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (status, token["request_count"]) == (200, 1 + admitted + 10), token


async def test_a_budget_hold_is_refused_within_the_store_bound_while_the_database_hangs(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any, tmp_path: Path
) -> None:
    # Without Redis the hold is a transaction on the token's row, as the max_requests claim.
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    proxy: Proxy = await proxy_factory(database_url=own_database, prices_path=prices)
    issued = await proxy.issue_token(budget_usd=5)
    assert (await post(proxy, issued["token"], chat()))[0] == 200  # now cached
    spent = (await settled(proxy, issued["id"], spent_at_least=0.000001))["spent_usd"]
    with own_postgres.frozen():
        started = time.monotonic()
        status, _, answer = await post(proxy, issued["token"], chat())
        seconds = time.monotonic() - started
    assert (status, orjson.loads(answer)["error"]["code"]) == (503, "limits_unavailable"), answer
    assert seconds < STORE_BOUND_SECONDS, seconds
    # Refused, so it neither holds nor spends anything of the budget.
    assert (await settled(proxy, issued["id"]))["spent_usd"] == spent
    deadline = time.monotonic() + 20
    while (await post(proxy, issued["token"], chat()))[0] != 200:
        assert time.monotonic() < deadline, "requests never passed again"
        await asyncio.sleep(0.2)
    assert (await settled(proxy, issued["id"]))["spent_usd"] == 2 * spent


async def test_a_claim_stuck_behind_a_lock_is_cancelled_on_the_database_not_left_waiting(
    postgres_url: str, proxy_factory: Any
) -> None:
    # A database that is slow, not hung: the claim's connection is closed without its ROLLBACK,
    # but its statement is still cancelled there, so its backend does not wait on for the lock
    # (every refused request would leave one more behind).
    proxy: Proxy = await proxy_factory(database_url=postgres_url)
    issued = await proxy.issue_token(max_requests=10)
    headers = {"Authorization": f"Bearer {issued['token']}"}
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200  # now cached
    locker = await asyncpg.connect(postgres_url)
    try:
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM tokens WHERE id = $1 FOR UPDATE", issued["id"])
            started = time.monotonic()
            response = await proxy.client.get("/v1/models", headers=headers)
            seconds = time.monotonic() - started
            body = await response.json()
            assert (response.status, body["error"]["code"]) == (503, "limits_unavailable")
            assert seconds < STORE_BOUND_SECONDS, seconds
            deadline = time.monotonic() + 3
            while waiting := await locker.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ):
                assert time.monotonic() < deadline, f"{waiting} backends still wait on the lock"
                await asyncio.sleep(0.05)
    finally:
        await locker.close()
    admitted = await _admitted_once_thawed(proxy, headers)
    status, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (status, token["request_count"]) == (200, 1 + admitted), token


async def test_a_claim_after_its_rpm_slot_is_refused_within_the_store_bound_if_the_database_hangs(
    own_database: str,
    proxy_on_freezing_relay: FrozenProxyStarter,
) -> None:
    # The hang starts between taking the rpm slot and the max_requests claim: the claim timed out,
    # then giving the slot back used to wait as long again before the client had its 503.
    relay, proxy = await proxy_on_freezing_relay()
    issued = await proxy.issue_token(max_requests=10, rpm=100)
    headers = {"Authorization": f"Bearer {issued['token']}"}
    relay.arm(b"request_count = request_count + 1")  # before the first claim prepares it
    started = time.monotonic()
    response = await proxy.client.get("/v1/models", headers=headers)
    seconds = time.monotonic() - started
    body = await response.json()
    assert relay.frozen.is_set()  # the claim's statement was the one the hang began at
    assert (response.status, body["error"]["code"]) == (503, "limits_unavailable"), body
    assert seconds < STORE_BOUND_SECONDS, seconds
    relay.thaw()
    admitted = await _admitted_once_thawed(proxy, headers)
    status, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (status, token["request_count"]) == (200, admitted), token
    # The refused request's slot comes back once the database does: the window holds the
    # admitted requests only (requests refused while it was still coming back included).
    reader = await asyncpg.connect(own_database)
    try:
        deadline = time.monotonic() + 20
        while (
            slots := await reader.fetchval(
                "SELECT cardinality(rpm_log) FROM tokens WHERE id = $1", issued["id"]
            )
        ) != admitted:
            assert time.monotonic() < deadline, f"{slots} slots taken, {admitted} admitted"
            await asyncio.sleep(0.2)
    finally:
        await reader.close()


async def test_a_budget_hold_after_its_claim_is_refused_within_the_store_bound_if_it_hangs(
    proxy_on_freezing_relay: FrozenProxyStarter,
    tmp_path: Path,
) -> None:
    # The hang starts between the max_requests claim and the budget hold: the hold timed out,
    # then giving the claimed place back waited as long again before the client had its 503.
    relay, proxy, issued, seconds = await _refused_at_its_budget_hold(
        proxy_on_freezing_relay, tmp_path
    )
    assert seconds < STORE_BOUND_SECONDS, seconds
    relay.thaw()
    await _until_only_the_admitted_request_counts(proxy, issued)


@pytest.mark.timeout(180)
async def test_a_place_given_back_while_the_database_hangs_over_a_minute_still_comes_back(
    proxy_on_freezing_relay: FrozenProxyStarter,
    tmp_path: Path,
) -> None:
    # Unlike a hold or an rpm slot, a max_requests place never expires: a give-back that gave
    # up after a minute left it used for good, one request of the quota lost to the outage.
    relay, proxy, issued, _ = await _refused_at_its_budget_hold(proxy_on_freezing_relay, tmp_path)
    await asyncio.sleep(65)
    relay.thaw()
    await _until_only_the_admitted_request_counts(proxy, issued)


async def _until_only_the_admitted_request_counts(proxy: Proxy, issued: dict[str, Any]) -> None:
    """Once a request passes again, the token's count comes to 1: the refused request's place
    came back with the database."""
    deadline = time.monotonic() + 20
    while (await post(proxy, issued["token"], chat()))[0] != 200:
        assert time.monotonic() < deadline, "requests never passed again"
        await asyncio.sleep(0.2)
    while (token := (await proxy.manage("GET", f"/tokens/{issued['id']}"))[1])[
        "request_count"
    ] != 1:
        assert time.monotonic() < deadline, token
        await asyncio.sleep(0.2)


async def _refused_at_its_budget_hold(
    start: FrozenProxyStarter, tmp_path: Path
) -> tuple[FreezingRelay, Proxy, dict[str, Any], float]:
    """A proxy whose token (max_requests and a budget) had a request refused because the database
    hung at its budget hold, once its place was claimed: the relay (the database still frozen),
    the proxy, the token, and the seconds the refusal took."""
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    relay, proxy = await start(prices_path=prices)
    issued = await proxy.issue_token(max_requests=10, budget_usd=5)
    relay.arm(b"budget_nanousd IS NOT NULL FOR UPDATE")  # before the first hold prepares it
    started = time.monotonic()
    status, _, answer = await post(proxy, issued["token"], chat())
    seconds = time.monotonic() - started
    assert relay.frozen.is_set()  # the hold's statement was the one the hang began at
    assert (status, orjson.loads(answer)["error"]["code"]) == (503, "limits_unavailable"), answer
    return relay, proxy, issued, seconds


class CommitAnswerHole(Relay):
    """A relay to PostgreSQL that, once armed, lets through the first statement holding ``word``
    and then its connection's COMMIT, whose answer (and every later one on that connection) it
    keeps: the database commits, and the client never hears it did, as when the database hangs
    between the statement's answer and the COMMIT's."""

    def __init__(self, target_port: int, word: bytes) -> None:
        super().__init__(target_port)
        self._word = word.lower()
        self._seen: set[Link] = set()
        self._hung: set[Link] = set()
        self.armed = False

    async def from_client(self, link: Link, message: bytes) -> None:
        if link in self._seen and self.armed and b"commit" in message.lower():
            self.armed = False
            self._hung.add(link)
        if self.armed and self._word in message.lower():
            self._seen.add(link)
        await super().from_client(link, message)

    async def from_server(self, link: Link, message: bytes) -> None:
        if link not in self._hung:
            await super().from_server(link, message)


@pytest.fixture
async def commit_answer_hole(postgres_server: PostgresServer) -> AsyncIterator[CommitAnswerHole]:
    """The relay, for a proxy that outlives the test (requested before it, it stays up until the
    proxy is closed, which still writes to the database as it stops)."""
    async with CommitAnswerHole(
        postgres_server.port, b"request_count = request_count + 1"
    ) as relay:
        yield relay


async def test_a_claim_whose_commit_answer_never_comes_is_admitted_within_the_store_bound(
    postgres_url: str,
    commit_answer_hole: CommitAnswerHole,
    proxy_factory: Any,
) -> None:
    # The claim's COMMIT went unanswered (ClaimInDoubt): the database, asked, says it committed,
    # so the request is admitted and counted once. The question used to wait until the claim's
    # connection had waited out the cancellation of its COMMIT, which never got an answer either.
    relay = commit_answer_hole
    proxy: Proxy = await proxy_factory(database_url=relay.url(postgres_url))
    issued = await proxy.issue_token(max_requests=10)
    headers = {"Authorization": f"Bearer {issued['token']}"}
    relay.armed = True  # before the first claim: its statement is sent whole only once
    started = time.monotonic()
    response = await proxy.client.get("/v1/models", headers=headers)
    seconds = time.monotonic() - started
    assert not relay.armed  # the claim's COMMIT was the one whose answer was kept
    assert response.status == 200, await response.text()
    assert seconds < STORE_BOUND_SECONDS, seconds
    status, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (status, token["request_count"]) == (200, 1), token


async def _admitted_once_thawed(proxy: Proxy, headers: dict[str, str]) -> int:
    """Send requests until one passes, then a few more, which must all pass: how many passed."""
    deadline = time.monotonic() + 20
    while (await proxy.client.get("/v1/models", headers=headers)).status != 200:
        assert time.monotonic() < deadline, "requests never passed again"
        await asyncio.sleep(0.2)
    for _ in range(3):
        assert (await proxy.client.get("/v1/models", headers=headers)).status == 200
    return 4


async def test_a_token_changed_while_its_claim_waited_is_refused_within_the_bound_if_it_hangs(
    own_database: str,
    proxy_on_freezing_relay: FrozenProxyStarter,
) -> None:
    # An operator changed the token's project while its max_requests claim waited on the row's
    # lock; the claim then succeeded, and the token's reload (is it still usable?) met the hung
    # database: refused after the store's timeout, the claimed place used to be given back
    # inline first, which waited as long again.
    relay, proxy = await proxy_on_freezing_relay()
    issued = await proxy.issue_token(max_requests=10)
    headers = {"Authorization": f"Bearer {issued['token']}"}
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200  # now cached
    locker = await asyncpg.connect(own_database)  # straight to the database, not through the relay
    try:
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM tokens WHERE id = $1 FOR UPDATE", issued["id"])
            answer = asyncio.ensure_future(proxy.client.get("/v1/models", headers=headers))
            await _until_a_statement_waits_on_a_lock(locker)
            status, _ = await proxy.manage(
                "PATCH", f"/projects/{issued['project_id']}", {"description": "changed"}
            )
            assert status == 200
            # The reload is the only statement that sends the token's digest (as a parameter).
            relay.arm(hash_token(issued["token"]).encode())
        started = time.monotonic()  # the lock is gone: the claim goes on, then the reload
        response = await answer
        seconds = time.monotonic() - started
        body = await response.json()
    finally:
        locker.terminate()  # closed, its database may be frozen: no goodbye awaited
    assert relay.frozen.is_set()  # the reload's statement was the one the hang began at
    assert (response.status, body["error"]["code"]) == (503, "limits_unavailable"), body
    assert seconds < STORE_BOUND_SECONDS, seconds
    relay.thaw()
    admitted = await _admitted_once_thawed(proxy, headers)
    # The refused request's place comes back once the database does.
    deadline = time.monotonic() + 20
    while (token := (await proxy.manage("GET", f"/tokens/{issued['id']}"))[1])[
        "request_count"
    ] != 1 + admitted:
        assert time.monotonic() < deadline, token
        await asyncio.sleep(0.2)


async def test_a_used_up_token_refused_while_the_database_hangs_keeps_no_rpm_slot(
    own_database: str,
    proxy_on_freezing_relay: FrozenProxyStarter,
) -> None:
    # A token cached as used up takes its rpm slot, then asks the database whether a place came
    # back; that reload meets the hung database and the client gets its 503. The slot must come
    # back once the database does, or the token would be a request short for the rest of the
    # minute after its quota is raised.
    relay, proxy = await proxy_on_freezing_relay()
    issued = await proxy.issue_token(max_requests=1, rpm=2)
    headers = {"Authorization": f"Bearer {issued['token']}"}

    async def answer() -> tuple[int, str | None]:
        response = await proxy.client.get("/v1/models", headers=headers)
        if response.status == 200:
            return 200, None
        return response.status, (await response.json())["error"]["code"]

    assert await answer() == (200, None)
    assert await answer() == (429, "quota_exceeded")  # the token is now cached as used up
    # The reload is the only statement that sends the token's digest (as a parameter).
    relay.arm(hash_token(issued["token"]).encode())
    started = time.monotonic()
    refused = await answer()
    seconds = time.monotonic() - started
    assert relay.frozen.is_set()  # the reload's statement was the one the hang began at
    assert refused == (503, "limits_unavailable")
    assert seconds < STORE_BOUND_SECONDS, seconds
    relay.thaw()
    reader = await asyncpg.connect(own_database)
    try:
        deadline = time.monotonic() + 20
        while (
            slots := await reader.fetchval(
                "SELECT cardinality(rpm_log) FROM tokens WHERE id = $1", issued["id"]
            )
        ) != 1:
            assert time.monotonic() < deadline, f"{slots} slots taken, 1 request admitted"
            await asyncio.sleep(0.2)
    finally:
        await reader.close()
    # What the client sees: with more requests allowed, the minute holds its second request.
    status, _ = await proxy.manage("PATCH", f"/tokens/{issued['id']}", {"max_requests": 10})
    assert status == 200
    assert [await answer() for _ in range(2)] == [(200, None), (429, "rate_limited")]


async def _until_a_statement_waits_on_a_lock(connection: asyncpg.Connection) -> None:
    deadline = time.monotonic() + 3
    while not await connection.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ):
        assert time.monotonic() < deadline, "no statement waits on the lock"
        await asyncio.sleep(0.02)


async def test_a_give_back_still_waiting_for_the_database_at_shutdown_is_logged(
    proxy_on_freezing_relay: FrozenProxyStarter,
    tmp_path: Path,
) -> None:
    # A refused request's max_requests place is given back in the background while the database
    # hangs. Stopped before it answers, the proxy gives up on that give-back, and the place stays
    # used for good: the operator must hear of it, with how many.
    _, proxy, _, _ = await _refused_at_its_budget_hold(proxy_on_freezing_relay, tmp_path)
    assert proxy.components.authority._orphan_releases  # the place's give-back is waiting
    with capture_logs() as logs:
        await proxy.client.close()
    abandoned = [line for line in logs if line["event"] == "token_authority.give_backs_abandoned"]
    assert len(abandoned) == 1 and abandoned[0]["count"] >= 1, logs
