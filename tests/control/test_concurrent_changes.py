"""Management calls that race each other are answered as one of them came first: a token issued
while its project is deleted is either issued (and deleted with it) or 404 project_not_found,
never a database error."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Proxy


@pytest.fixture
def proxy_database_url(database_url: str) -> str:
    return database_url


async def test_issuing_while_the_project_is_deleted_is_issued_or_not_found(proxy: Proxy) -> None:
    answers: list[tuple[int, str | None]] = []
    for _ in range(15):
        project_id = await proxy.create_project("racing")

        async def issue(project_id: str = project_id) -> tuple[int, str | None]:
            status, body = await proxy.manage(
                "POST", "/tokens", {"project_id": project_id, "duration_minutes": 5}
            )
            return status, None if status == 201 else body["error"]["code"]

        async def delete(project_id: str = project_id) -> tuple[int, str | None]:
            status, _ = await proxy.manage("DELETE", f"/projects/{project_id}")
            return status, None

        calls = [*(issue() for _ in range(8)), delete(), *(issue() for _ in range(8))]
        results = await asyncio.gather(*calls)
        assert results[8] == (204, None)
        answers.extend(results[:8] + results[9:])
        status, _ = await proxy.manage("GET", f"/projects/{project_id}")
        assert status == 404
    assert set(answers) <= {(201, None), (404, "project_not_found")}, sorted(set(answers))
    # No token outlived its project.
    status, tokens = await proxy.manage("GET", "/tokens")
    assert (status, tokens) == (200, [])
