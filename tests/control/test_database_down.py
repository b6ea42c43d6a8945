"""The management API the moment PostgreSQL goes away or hangs: every call is 503
service_unavailable, the first one included, never a 500 with a traceback, and a change that hangs
is refused once the store's own timeout ends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.conftest import UPSTREAM_KEY, FrozenProxyStarter, Proxy
from tests.postgres import PostgresServer
from tests.proxy.test_settlement_retry import AnswerLosingRelay

pytestmark = [pytest.mark.postgres, pytest.mark.process]

# The store gives a statement 5 s; slack for a loaded machine, well short of the 10 s before.
STORE_BOUND_SECONDS = 5.0 + 3.0


async def test_the_first_call_after_the_database_went_away_is_503(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    proxy = await proxy_factory(database_url=own_database)
    project_id = await proxy.create_project("kept")
    own_postgres.stop()
    try:
        answers = [await proxy.manage("GET", "/projects") for _ in range(3)]
        answers.append(await proxy.manage("GET", f"/projects/{project_id}"))
    finally:
        own_postgres.start()
    assert [(status, body["error"]["code"]) for status, body in answers] == [
        (503, "service_unavailable")
    ] * 4, answers


async def test_a_project_change_that_fails_revokes_none_of_its_tokens(
    postgres_server: PostgresServer, postgres_url: str, proxy_factory: Any
) -> None:
    """PATCH with revoke_tokens and a change: the database goes away as the change is written.
    The call fails, and the tokens are still active with no audit event, as the project is
    unchanged (before, the revocation was a transaction of its own, committed before the change
    failed)."""
    async with AnswerLosingRelay(postgres_server.port, b"UPDATE projects") as relay:
        proxy: Proxy = await proxy_factory(database_url=relay.url(postgres_url))
        issued = await proxy.issue_token()
        project_id = issued["project_id"]
        relay.arm(b"UPDATE projects")
        status, body = await proxy.manage(
            "PATCH", f"/projects/{project_id}", {"name": "renamed", "revoke_tokens": True}
        )
        assert (status, body["error"]["code"]) == (503, "service_unavailable")
        assert not relay.armed  # the change's statement was the one cut off
        _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
        _, project = await proxy.manage("GET", f"/projects/{project_id}")
        assert (token["status"], project["name"]) == ("active", "demo")
        _, audit = await proxy.manage("GET", "/audit?action=project.update")
        assert audit["events"] == []
        # Asked again, both happen, in one audit event.
        status, project = await proxy.manage(
            "PATCH", f"/projects/{project_id}", {"name": "renamed", "revoke_tokens": True}
        )
        assert (status, project["name"]) == (200, "renamed")
        _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
        assert token["status"] == "revoked"
        _, audit = await proxy.manage("GET", "/audit?action=project.update")
        (event,) = audit["events"]
        assert event["details"]["revoked_count"] == 1


async def test_a_change_is_refused_within_the_store_bound_while_the_database_hangs(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    # Each change is a transaction: its first statement timed out after the store's 5 s, then
    # the ROLLBACK waited as long again for the hung database.
    proxy = await proxy_factory(database_url=own_database)
    project_id = await proxy.create_project("kept")
    calls = [
        ("POST", "/projects", {"name": "added", "api_key": UPSTREAM_KEY}),
        ("PATCH", f"/projects/{project_id}", {"name": "renamed"}),
    ]
    answers = []
    with own_postgres.frozen():
        for method, path, body in calls:
            started = time.monotonic()
            status, answer = await proxy.manage(method, path, body)
            answers.append((status, answer["error"]["code"], time.monotonic() - started))
    assert [answer[:2] for answer in answers] == [(503, "service_unavailable")] * 2, answers
    assert max(seconds for *_, seconds in answers) < STORE_BOUND_SECONDS, answers
    # Neither happened; asked again, both do.
    deadline = time.monotonic() + 20
    while (listed := await proxy.manage("GET", "/projects"))[0] != 200:
        assert time.monotonic() < deadline, "the management API never answered again"
        await asyncio.sleep(0.2)
    assert [project["name"] for project in listed[1]] == ["kept"]
    _, audit = await proxy.manage("GET", "/audit")
    assert [event["action"] for event in audit["events"]] == ["project.create"]
    assert [(await proxy.manage(*call))[0] for call in calls] == [201, 200]


async def test_a_token_is_refused_within_the_store_bound_when_the_database_hangs_at_its_insert(
    proxy_on_freezing_relay: FrozenProxyStarter,
) -> None:
    # The hang starts after the project was read, at the token's INSERT: it timed out, then the
    # check for a project deleted meanwhile (meant for the database's refusal of the row) waited
    # as long again for the hung database.
    relay, proxy = await proxy_on_freezing_relay()
    project_id = await proxy.create_project()
    relay.arm(b"INSERT INTO tokens")
    started = time.monotonic()
    status, answer = await proxy.manage(
        "POST", "/tokens", {"project_id": project_id, "duration_minutes": 60}
    )
    seconds = time.monotonic() - started
    assert relay.frozen.is_set()  # the INSERT was the statement the hang began at
    assert (status, answer["error"]["code"]) == (503, "service_unavailable"), answer
    assert seconds < STORE_BOUND_SECONDS, seconds
    relay.thaw()
    # No token, no audit event; asked again, it is issued.
    deadline = time.monotonic() + 20
    while (listed := await proxy.manage("GET", "/tokens"))[0] != 200:
        assert time.monotonic() < deadline, "the management API never answered again"
        await asyncio.sleep(0.2)
    assert listed[1] == []
    _, audit = await proxy.manage("GET", "/audit?action=token.create")
    assert audit["events"] == []
    issued = await proxy.issue_token(project_id)
    assert (await proxy.manage("GET", f"/tokens/{issued['id']}"))[0] == 200
