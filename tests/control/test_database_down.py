"""The management API the moment PostgreSQL goes away: every call is 503 service_unavailable,
the first one included, never a 500 with a traceback."""

from __future__ import annotations

from typing import Any

import pytest

from tests.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.process]


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
