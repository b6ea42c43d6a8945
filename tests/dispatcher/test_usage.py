"""Usage aggregates: counted from the events off the request path, per token and per project, and
returned by the management API."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from dispatcher.backends.usage import UsageBackend, fold
from llm_proxy.events.event import Event, Usage
from llm_proxy.models import UsageRollup, UsageTotals
from llm_proxy.store.sqlite import SqliteStore
from tests.conftest import Proxy
from tests.events.events_support import RedisServer
from tests.waiting import wait_for_usage

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}]}
ZERO = {
    "cost_usd": 0.0,
    "requests": 0,
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "total_tokens": 0,
    "errors": 0,
    "last_used_at": None,
}


def event(
    token_id: str = "t1",
    *,
    at: str = "2030-01-01T10:15:00.000Z",
    status: int = 200,
    error: str | None = None,
    usage: tuple[int, int] | None = (10, 5),
    project_id: str = "p1",
    cost_usd: float | None = None,
) -> Event:
    tokens = (
        Usage(
            prompt_tokens=usage[0],
            completion_tokens=usage[1],
            total_tokens=sum(usage),
            source="upstream",
        )
        if usage
        else None
    )
    return Event(
        id="e",
        request_id="r",
        timestamp=at,
        project_id=project_id,
        token_id=token_id,
        method="POST",
        path="/v1/chat/completions",
        status=status,
        duration_ms=1.0,
        ttfb_ms=None,
        stream=False,
        model=None,
        request=None,
        response=None,
        usage=tokens,
        cost_usd=cost_usd,
        upstream_request_id=None,
        error=error,
    )


def chat_cost(prompt: int, completion: int) -> float:
    """What gpt-4o-mini tokens cost at the list prices of config/prices.yaml, by hand."""
    return float((prompt * Decimal("0.15") + completion * Decimal("0.60")) / 1_000_000)


def test_a_batch_folds_into_one_row_per_token_and_hour() -> None:
    rows, refused = fold(
        [
            event(at="2030-01-01T10:15:00.000Z", cost_usd=0.000004500),
            event(at="2030-01-01T10:59:59.999Z", status=502, usage=None, cost_usd=0.0),
            event(at="2030-01-01T10:20:00.000Z", error="client_disconnected", usage=(7, 0)),
            event(at="2030-01-01T11:00:00.000Z", status=404, usage=None),
            event("t2", at="2030-01-01T10:30:00.000Z", project_id="p2", cost_usd=1.25),
            event(at="not a time"),
            event(at="2030-01-01T12:10:00+02:00", cost_usd=0.000000001),  # not as written: counted
            event(at="2030-01-01T10:16:00.000Z", cost_usd=-0.5),  # no spend is negative
            event(at="2030-01-01T10:17:00.000Z", cost_usd="0.1"),  # type: ignore[arg-type]
        ]
    )
    hour = datetime(2030, 1, 1, 10, tzinfo=UTC)
    assert sorted(rows, key=lambda r: (r.token_id, r.hour)) == [
        UsageRollup("t1", "p1", hour, 4, 27, 10, 37, 2, datetime(2030, 1, 1, 10, 59, 59, 999000, UTC), 4_501),
        UsageRollup("t1", "p1", hour + timedelta(hours=1), 1, 0, 0, 0, 1, hour + timedelta(hours=1), 0),
        UsageRollup("t2", "p2", hour, 1, 10, 5, 15, 0, datetime(2030, 1, 1, 10, 30, tzinfo=UTC), 1_250_000_000),
    ]  # fmt: skip
    assert list(refused) == [5, 7, 8] and not any(r.retryable for r in refused.values())


async def test_rollups_add_up_across_batches_and_survive_token_deletion(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "usage.db")
    try:
        backend = UsageBackend(store)
        # No such token or project exists: events can arrive after a project was deleted.
        spent = event(cost_usd=0.0000045)
        assert await backend.send([spent, event(status=500, usage=None)]) == {}
        assert await backend.send([event(at="2030-01-01T10:45:00.000Z"), spent, event("t2")]) == {}
        assert await store.token_usage("t1") == UsageTotals(
            requests=4,
            prompt_tokens=30,
            completion_tokens=15,
            total_tokens=45,
            errors=1,
            last_used_at=datetime(2030, 1, 1, 10, 45, tzinfo=UTC),
            cost_nanousd=9_000,  # exactly twice 4,500 nano-dollars: money adds up as integers
        )
        assert (await store.token_usage("t1")).to_api()["cost_usd"] == 0.000009
        assert (await store.project_usage("p1")).requests == 5
        assert (await store.project_usage("p1")).cost_nanousd == 9_000
        assert (await store.project_token_usage("p1")).keys() == {"t1", "t2"}
        assert await store.token_usage("unknown") == UsageTotals()
        # A window counts whole clock hours, from the one holding its start.
        assert (await store.usage_since(datetime(2030, 1, 1, 10, 59, tzinfo=UTC))).requests == 5
        assert (await store.usage_since(datetime(2030, 1, 1, 11, 0, tzinfo=UTC))).requests == 0
    finally:
        await store.close()


async def test_token_usage_counts_exactly_what_the_upstream_reported(proxy: Proxy) -> None:
    issued = await proxy.issue_token()
    token_id = issued["id"]
    status, token = await proxy.manage("GET", f"/tokens/{token_id}")
    assert status == 200 and token["usage"] == ZERO
    async with proxy.sdk(issued["token"]) as client:
        plain = await client.chat.completions.create(**CHAT)
        asked = await client.chat.completions.create(
            **CHAT, max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
        asked_chunks = [chunk async for chunk in asked]
        # Without include_usage the client sees no usage, but the proxy asks upstream for it;
        # the mock answers the same body the same way, so it is ``plain``'s usage again.
        silent = await client.chat.completions.create(**CHAT, stream=True)
        assert all(chunk.usage is None for chunk in [chunk async for chunk in silent])
        with pytest.raises(openai.InternalServerError):
            await client.moderations.create(input="x", extra_headers={"X-Fake-Status": "500"})
    assert plain.usage is not None and asked_chunks[-1].usage is not None
    streamed = asked_chunks[-1].usage
    assert streamed.completion_tokens == 3 != plain.usage.completion_tokens

    usage = await wait_for_usage(proxy, f"/tokens/{token_id}", 4)
    prompt = 2 * plain.usage.prompt_tokens + streamed.prompt_tokens
    completion = 2 * plain.usage.completion_tokens + streamed.completion_tokens
    assert {k: v for k, v in usage.items() if k != "last_used_at"} == {
        "requests": 4,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "errors": 1,
        # The failed moderation names no model: it is unpriced and adds nothing.
        "cost_usd": chat_cost(prompt, completion),
    }
    last_used = datetime.fromisoformat(usage["last_used_at"])
    assert datetime.fromisoformat(issued["created_at"]) <= last_used <= datetime.now(UTC)
    # The quota counter is a different figure, and stays as it was.
    _, token = await proxy.manage("GET", f"/tokens/{token_id}")
    assert token["request_count"] == 4 and token["max_requests"] is None


async def test_project_usage_sums_its_tokens_only(proxy: Proxy) -> None:
    project_id = await proxy.create_project("counted")
    other_project = await proxy.create_project("other")
    first, second, elsewhere = (
        await proxy.issue_token(project_id),
        await proxy.issue_token(project_id),
        await proxy.issue_token(other_project),
    )
    for issued, calls in ((first, 2), (second, 1), (elsewhere, 1)):
        async with proxy.sdk(issued["token"]) as client:
            for _ in range(calls):
                completion = await client.chat.completions.create(**CHAT)
    assert completion.usage is not None
    per_call = completion.usage  # the same body, the same answer
    await wait_for_usage(proxy, f"/tokens/{elsewhere['id']}", 1)
    usage = await wait_for_usage(proxy, f"/projects/{project_id}", 3)
    assert usage["requests"] == 3 and usage["errors"] == 0
    assert usage["prompt_tokens"] == 3 * per_call.prompt_tokens
    assert usage["completion_tokens"] == 3 * per_call.completion_tokens
    assert usage["total_tokens"] == 3 * per_call.total_tokens
    assert usage["cost_usd"] == chat_cost(
        3 * per_call.prompt_tokens, 3 * per_call.completion_tokens
    )
    tokens = [
        (await proxy.manage("GET", f"/tokens/{t['id']}"))[1]["usage"] for t in (first, second)
    ]
    assert usage["total_tokens"] == sum(t["total_tokens"] for t in tokens)
    assert usage["cost_usd"] == chat_cost(
        sum(t["prompt_tokens"] for t in tokens), sum(t["completion_tokens"] for t in tokens)
    )
    assert usage["last_used_at"] == max(t["last_used_at"] for t in tokens)
    assert (await wait_for_usage(proxy, f"/projects/{other_project}", 1))["requests"] == 1
    # Lists stay as they were: usage only comes with a single project or token.
    _, listed = await proxy.manage("GET", "/projects")
    assert all("usage" not in p for p in listed)


async def test_usage_still_on_the_bus_at_shutdown_is_counted(proxy: Proxy, tmp_path: Path) -> None:
    issued = await proxy.issue_token()
    headers = {"Authorization": f"Bearer {issued['token']}"}
    for _ in range(5):
        assert (await proxy.client.get("/v1/models", headers=headers)).status == 200
    await proxy.client.close()  # at once: the usage worker has not written yet
    store = await SqliteStore.open(tmp_path / "llm-proxy.db")
    try:
        assert (await store.token_usage(issued["id"])).requests == 5
    finally:
        await store.close()


@pytest.mark.redis
async def test_proxies_sharing_a_redis_bus_count_each_request_once(
    proxy_factory: Any, redis_server: RedisServer
) -> None:
    first: Proxy = await proxy_factory(event_bus="redis", redis_url=redis_server.url)
    second: Proxy = await proxy_factory(event_bus="redis", redis_url=redis_server.url)
    issued = await first.issue_token()
    headers = {"Authorization": f"Bearer {issued['token']}"}
    for proxy in (first, second) * 5:
        assert (await proxy.client.get("/v1/models", headers=headers)).status == 200
    usage = await wait_for_usage(first, f"/tokens/{issued['id']}", 10)
    assert usage["requests"] == 10
    await asyncio.sleep(1.0)  # a second consumer counting too would show by now
    assert (await wait_for_usage(second, f"/tokens/{issued['id']}", 10))["requests"] == 10
