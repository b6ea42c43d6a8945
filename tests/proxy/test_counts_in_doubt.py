"""Request counts land exactly once although PostgreSQL's answer to their write was lost (the
connection died after the database ran it): a retry asks what happened before counting again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import Proxy
from tests.postgres import PostgresServer
from tests.proxy.test_change_feed import NO_TIMER, status_of
from tests.proxy.test_settlement_retry import AnswerLosingRelay

pytestmark = [pytest.mark.postgres, pytest.mark.process]


@pytest.fixture
async def commit_losing_url(
    postgres_server: PostgresServer, postgres_url: str
) -> AsyncIterator[tuple[AnswerLosingRelay, str]]:
    """A relay to the test's database that, once armed, loses the answer to one COMMIT; the
    database's URL through it."""
    relay = AnswerLosingRelay(postgres_server.port, b"COMMIT")
    await relay.start()
    yield relay, postgres_url.replace(f":{postgres_server.port}/", f":{relay.port}/")
    await relay.close()


async def test_request_counts_whose_commit_answer_was_lost_count_once(
    commit_losing_url: tuple[AnswerLosingRelay, str], proxy_factory: Any
) -> None:
    relay, url = commit_losing_url
    proxy: Proxy = await proxy_factory(database_url=url, usage_flush_seconds=3600.0, **NO_TIMER)
    issued = await proxy.issue_token()
    for _ in range(3):
        assert await status_of(proxy, issued["token"]) == (200, None)
    relay.armed = True
    await proxy.manage("GET", f"/tokens/{issued['id']}")  # writes the tallies: COMMIT unanswered
    assert not relay.armed  # the answer was lost indeed
    status, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert status == 200, shown
    assert shown["request_count"] == 3
