"""Usage aggregates: counted from the events off the request path, per token and per project, and
returned by the management API."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
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
        upstream_request_id=None,
        error=error,
    )


def test_a_batch_folds_into_one_row_per_token_and_hour() -> None:
    rows, refused = fold(
        [
            event(at="2030-01-01T10:15:00.000Z"),
            event(at="2030-01-01T10:59:59.999Z", status=502, usage=None),
            event(at="2030-01-01T10:20:00.000Z", error="client_disconnected", usage=(7, 0)),
            event(at="2030-01-01T11:00:00.000Z", status=404, usage=None),
            event("t2", at="2030-01-01T10:30:00.000Z", project_id="p2", usage=(1, 2)),
            event(at="not a time"),
            event(at="2030-01-01T12:10:00+02:00"),  # not as the proxy writes it: still counted
        ]
    )
    hour = datetime(2030, 1, 1, 10, tzinfo=UTC)
    assert sorted(rows, key=lambda r: (r.token_id, r.hour)) == [
        UsageRollup("t1", "p1", hour, 4, 27, 10, 37, 2, datetime(2030, 1, 1, 10, 59, 59, 999000, UTC)),
        UsageRollup("t1", "p1", hour + timedelta(hours=1), 1, 0, 0, 0, 1, hour + timedelta(hours=1)),
        UsageRollup("t2", "p2", hour, 1, 1, 2, 3, 0, datetime(2030, 1, 1, 10, 30, tzinfo=UTC)),
    ]  # fmt: skip
    assert list(refused) == [5] and not refused[5].retryable


async def test_rollups_add_up_across_batches_and_survive_token_deletion(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "usage.db")
    try:
        backend = UsageBackend(store)
        # No such token or project exists: events can arrive after a project was deleted.
        assert await backend.send([event(), event(status=500, usage=None)]) == {}
        assert await backend.send([event(at="2030-01-01T10:45:00.000Z"), event("t2")]) == {}
        assert await store.token_usage("t1") == UsageTotals(
            requests=3,
            prompt_tokens=20,
            completion_tokens=10,
            total_tokens=30,
            errors=1,
            last_used_at=datetime(2030, 1, 1, 10, 45, tzinfo=UTC),
        )
        assert (await store.project_usage("p1")).requests == 4
        assert (await store.project_token_usage("p1")).keys() == {"t1", "t2"}
        assert await store.token_usage("unknown") == UsageTotals()
        # A window counts whole clock hours, from the one holding its start.
        assert (await store.usage_since(datetime(2030, 1, 1, 10, 59, tzinfo=UTC))).requests == 4
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
    tokens = [
        (await proxy.manage("GET", f"/tokens/{t['id']}"))[1]["usage"] for t in (first, second)
    ]
    assert usage["total_tokens"] == sum(t["total_tokens"] for t in tokens)
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
