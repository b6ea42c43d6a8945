"""A deleted project's tokens leave nothing in Redis: their budgets' keys go with them, rather than
stay until a day past the tokens' expiry (up to a year on)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.events.events_support import RedisServer
from tests.proxy.test_budgets import PRICES, bearer, chat


@pytest.fixture
def prices_path(tmp_path: Path) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    return path


async def test_deleting_a_project_removes_its_tokens_budget_keys_from_redis(
    proxy_factory: Any,
    prices_path: Path,
    redis_server: RedisServer,
) -> None:
    proxy = await proxy_factory(
        prices_path=prices_path, event_bus="redis", redis_url=redis_server.url
    )
    doomed = await proxy.create_project("doomed")
    kept = await proxy.create_project("kept")
    tokens = [
        await proxy.issue_token(project_id, budget_usd=1, minutes=525_600)
        for project_id in (doomed, doomed, kept)
    ]
    for issued in tokens:
        response = await proxy.client.post(
            "/v1/chat/completions", data=chat(max_tokens=5), headers=bearer(issued["token"])
        )
        assert response.status == 200, await response.text()
    redis = Redis.from_url(redis_server.url)
    try:

        async def keys_of(token_id: str) -> list[bytes]:
            return [key async for key in redis.scan_iter(f"llm-proxy:*:{token_id}")]

        for issued in tokens:
            assert await keys_of(issued["id"]), "the budget lives in Redis"

        status, _ = await proxy.manage("DELETE", f"/projects/{doomed}")
        assert status == 204

        assert await keys_of(tokens[0]["id"]) == []
        assert await keys_of(tokens[1]["id"]) == []
        assert await keys_of(tokens[2]["id"])  # another project's, untouched
    finally:
        await redis.aclose()
