"""An instance of the release before keeps serving while a newer one migrates the database they
share: a rolling upgrade replaces instances one at a time, and the ones not replaced yet answer
every request meanwhile, management calls included."""

from __future__ import annotations

import asyncpg
import orjson
import pytest

from tests.conftest import Proxy

pytestmark = [pytest.mark.postgres, pytest.mark.process]


@pytest.fixture
def proxy_database_url(postgres_url: str) -> str:
    return postgres_url


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


async def test_a_running_instance_keeps_answering_after_a_newer_release_adds_columns(
    proxy: Proxy, postgres_url: str
) -> None:
    """A newer release's migration adds a column to tokens and to projects (as 009 added
    tokens.tpm_marks) while this instance runs, its connections holding the statements they
    prepared: every call after it is answered as before. (A statement reading ``*`` changes shape
    with the new column, which PostgreSQL refuses to run as prepared; inside a transaction, as a
    project's PATCH runs, that answered 503 store_unavailable.)"""
    project_id = await proxy.create_project()
    issued = await proxy.issue_token(project_id, max_requests=100, rpm=100)
    token_id, token = issued["id"], issued["token"]

    async def every_call() -> list[tuple[str, int]]:
        # Each more than once: a pool lends its connections in turn, each with its own cache.
        answers = []
        for _ in range(3):
            for method, path, body in (
                ("PATCH", f"/projects/{project_id}", {"name": "demo"}),
                ("PATCH", f"/tokens/{token_id}", {"max_requests": 100}),
                ("GET", f"/tokens/{token_id}", None),
                ("GET", "/tokens", None),
                ("GET", f"/projects/{project_id}", None),
                ("GET", "/projects", None),
            ):
                status, _ = await proxy.manage(method, path, body)
                answers.append((f"{method} {path}", status))
            response = await proxy.client.post(
                "/v1/chat/completions", data=CHAT, headers=bearer(token)
            )
            answers.append(("POST /v1/chat/completions", response.status))
        return answers

    assert {status for _, status in await every_call()} == {200}
    newer = await asyncpg.connect(postgres_url)
    try:
        await newer.execute("ALTER TABLE tokens ADD COLUMN from_a_newer_release JSONB")
        await newer.execute("ALTER TABLE projects ADD COLUMN from_a_newer_release JSONB")
    finally:
        await newer.close()
    answers = await every_call()
    assert [a for a in answers if a[1] != 200] == []
