"""Management calls that race each other are answered as one of them came first: a token issued
while its project is deleted is either issued (and deleted with it) or 404 project_not_found,
never a database error."""

from __future__ import annotations

import asyncio

import asyncpg
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


@pytest.mark.postgres
@pytest.mark.process
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_revoke_counts_add_up_when_a_token_is_revoked_meanwhile(
    proxy: Proxy, database_url: str
) -> None:
    """The counts were read, then the tokens revoked: a token revoked by another transaction in
    between (here held by a row lock until the revoke waits for it) was neither revoked by this
    call nor counted as already revoked, so the three counts did not add up. (SQLite runs one
    writer at a time: nothing comes in between there.)"""
    postgres_url = database_url
    project_id = await proxy.create_project()
    issued = await proxy.issue_token(project_id)
    db = await asyncpg.connect(postgres_url)
    try:
        other = db.transaction()
        await other.start()
        await db.execute("UPDATE tokens SET is_active = FALSE WHERE id = $1", issued["id"])
        revoking = asyncio.create_task(
            proxy.manage("POST", f"/projects/{project_id}/tokens/revoke")
        )
        watcher = await asyncpg.connect(postgres_url)
        try:
            async with asyncio.timeout(10):
                while not await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                ):
                    await asyncio.sleep(0.02)
        finally:
            await watcher.close()
        await other.commit()
        status, counts = await revoking
    finally:
        await db.close()
    assert status == 200, counts
    assert counts == {"revoked_count": 0, "already_revoked_count": 1, "total_tokens": 1}
