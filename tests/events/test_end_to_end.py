"""Events through the real proxy: one event per request, exact stream usage, Redis outages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import UPSTREAM_KEY, Proxy
from tests.events.events_support import RedisServer
from tests.waiting import wait_for_lines

EVENT_FIELDS = {
    "id", "request_id", "timestamp", "project_id", "token_id", "method", "path", "status",
    "duration_ms", "ttfb_ms", "stream", "model", "request", "response", "usage", "error",
    "upstream_request_id",
}  # fmt: skip


async def test_every_request_writes_one_event_with_exact_usage(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    issued = await proxy.issue_token()
    async with proxy.sdk(issued["token"]) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three"}]
        )
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
        await client.models.list()
    # The client never asked for usage, so it never sees the usage-only chunk...
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    # ...but upstream was asked for it, and the event carries it.
    assert b'"include_usage":true' in proxy.upstream.requests[-2].body.replace(b" ", b"")
    events = await wait_for_lines(log, 3)
    assert len(events) == 3
    for event in events:
        assert set(event) >= EVENT_FIELDS
        assert event["token_id"] == issued["id"] and event["project_id"] == issued["project_id"]
    plain, streamed, models = events
    assert plain["usage"]["source"] == "upstream" and plain["usage"]["total_tokens"] > 0
    assert streamed["stream"] is True and streamed["usage"]["source"] == "upstream"
    assert streamed["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed["response"]["choices"][0]["message"]["content"] == content
    assert models["path"] == "/v1/models" and models["status"] == 200
    text = log.read_text()
    assert issued["token"] not in text and UPSTREAM_KEY not in text


async def test_a_client_that_asked_for_usage_gets_it_unchanged(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    async with proxy.sdk(await proxy.token()) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    (event,) = await wait_for_lines(log, 1)
    assert event["usage"]["total_tokens"] == chunks[-1].usage.total_tokens


async def test_requests_succeed_and_events_arrive_across_a_redis_outage(
    proxy_factory: Any, tmp_path: Path, redis_server: RedisServer
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(
        file_event_log=log, event_bus="redis", redis_url=redis_server.url
    )
    headers = {"Authorization": f"Bearer {await proxy.token()}"}
    statuses = []
    for _ in range(10):
        statuses.append((await proxy.client.get("/v1/models", headers=headers)).status)
    redis_server.stop()
    for _ in range(10):
        statuses.append((await proxy.client.get("/v1/models", headers=headers)).status)
    assert (await proxy.client.get("/ready")).status == 503
    redis_server.start()
    for _ in range(10):
        statuses.append((await proxy.client.get("/v1/models", headers=headers)).status)
    assert statuses == [200] * 30
    events = await wait_for_lines(log, 30, timeout=20)
    assert len({e["request_id"] for e in events}) == 30


async def test_event_bus_none_emits_nothing_and_still_serves(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log, event_bus="none")
    headers = {"Authorization": f"Bearer {await proxy.token()}"}
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200
    assert proxy.components.pipeline is None
    assert not log.exists()


async def test_event_log_is_created_readable_by_its_owner_only(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    headers = {"Authorization": f"Bearer {await proxy.token()}"}
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200
    await wait_for_lines(log, 1)
    assert log.stat().st_mode & 0o777 == 0o600


async def test_the_upstream_request_id_is_returned_unchanged_and_recorded(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    token = await proxy.token()
    response = await proxy.client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    upstream_id = response.headers["X-Request-ID"]
    assert upstream_id.startswith("req_")  # the upstream's own, as OpenAI's
    proxy_id = response.headers["LLM-Proxy-Request-ID"]
    assert proxy_id != upstream_id
    assert proxy.upstream.last.headers["X-Request-ID"] == proxy_id
    (event,) = await wait_for_lines(log, 1)
    assert event["upstream_request_id"] == upstream_id and event["request_id"] == proxy_id


async def test_a_streamed_legacy_completion_gets_exact_usage_too(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    async with proxy.sdk(await proxy.token()) as client:
        stream = await client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="one two three", stream=True
        )
        chunks = [chunk async for chunk in stream]
        plain = await client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="one two three"
        )
    assert all(chunk.choices for chunk in chunks)  # the usage chunk asked for is not shown
    streamed, _ = await wait_for_lines(log, 2)
    assert streamed["stream"] is True and streamed["usage"]["source"] == "upstream"
    assert plain.usage is not None
    assert streamed["usage"]["total_tokens"] == plain.usage.total_tokens
