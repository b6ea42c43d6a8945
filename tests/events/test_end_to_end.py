"""Events through the real proxy: one event per request, exact stream usage, Redis outages."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import tracemalloc
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from llm_proxy.crypto import mask_key
from llm_proxy.events.event import parse_rfc3339
from llm_proxy.stats import STATS
from tests.conftest import UPSTREAM_KEY, Proxy
from tests.events.events_support import RedisServer
from tests.proxy.test_metrics import scrape, value
from tests.waiting import wait_for_lines, wait_for_usage

EVENT_FIELDS = {
    "id", "request_id", "timestamp", "project_id", "token_id", "method", "path", "status",
    "duration_ms", "ttfb_ms", "stream", "model", "request", "response", "usage", "cost_usd",
    "error", "upstream_request_id",
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
    # ...nor the "usage": null that asking for it adds to every other chunk.
    assert all("usage" not in chunk.model_fields_set for chunk in chunks)
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


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "key", [UPSTREAM_KEY, "0123456789abcdef0123456789abcdef"], ids=["openai", "no-sk-prefix"]
)
async def test_an_upstream_error_quoting_the_key_does_not_put_it_in_the_event(
    proxy_factory: Any, tmp_path: Path, key: str, compressed: bool
) -> None:
    """Some upstreams quote the key they refused, whole. A key of any shape (another provider's:
    hex, no ``sk-``) is masked in the event, however the answer was encoded."""
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    token = await proxy.token(project_id=await proxy.create_project(api_key=key))
    path = "/v1/files/key-refused" + ("?compressed" if compressed else "")
    answer = await proxy.client.post(
        path, json={"x": 1}, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status == 401
    # (A compressed one is decoded to be masked, and goes without its coding.)
    assert "Content-Encoding" not in answer.headers
    shown = (await answer.json())["error"]["message"]
    # Masked, its length kept.
    assert shown == f"Invalid key: Bearer {key[:3]}{'*' * (len(key) - 7)}{key[-4:]}"
    (event,) = await wait_for_lines(log, 1)
    assert event["status"] == 401
    assert event["response"]["error"]["message"] == f"Invalid key: Bearer {mask_key(key)}"
    assert key not in log.read_text()


async def test_a_successful_answer_quoting_the_key_does_not_put_it_in_the_event(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """An upstream that echoes the request (an echo server, a debugging gateway) quotes the
    project's key in a 2xx answer: a key of any shape is masked in the event there too."""
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    key = "0123456789abcdef0123456789abcdef"
    token = await proxy.token(project_id=await proxy.create_project(api_key=key))
    answer = await proxy.client.get(
        "/v1/files/key-echoed-in-body", headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status == 200
    (event,) = await wait_for_lines(log, 1)
    assert event["response"] == {"seen": {"authorization": f"Bearer {mask_key(key)}"}}
    assert key not in log.read_text()


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


async def test_a_file_log_first_started_while_redis_is_down_gets_the_events_spooled_meanwhile(
    proxy_factory: Any, tmp_path: Path, redis_server: RedisServer
) -> None:
    """The file log's consumer group is new, and starts at the next event: the events spooled
    while Redis was down come after its start, even when their replay reaches Redis before the
    group is created."""
    log = tmp_path / "events.jsonl"
    redis_server.stop()
    proxy: Proxy = await proxy_factory(
        file_event_log=log, event_bus="redis", redis_url=redis_server.url
    )
    headers = {"Authorization": f"Bearer {await proxy.token()}"}
    for _ in range(5):
        assert (await proxy.client.get("/v1/models", headers=headers)).status == 200
    await asyncio.sleep(3)  # both the spool's replay and the log's reads wait as long as they may
    redis_server.start()
    for _ in range(5):
        assert (await proxy.client.get("/v1/models", headers=headers)).status == 200
    events = await wait_for_lines(log, 10, timeout=20)
    assert len({e["request_id"] for e in events}) == 10


@pytest.mark.parametrize("bus", ["memory", "redis"])
async def test_a_body_nested_too_deep_to_write_is_shown_as_text_and_costs_no_other_event(
    bus: str, proxy_factory: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    log = tmp_path / "events.jsonl"
    options: dict[str, Any] = {"file_event_log": log, "event_bus": bus}
    if bus == "redis":
        options["redis_url"] = request.getfixturevalue("redis_server").url
    proxy: Proxy = await proxy_factory(**options)
    headers = {"Authorization": f"Bearer {await proxy.token()}"}
    # Valid JSON that orjson reads, but nested deeper than it writes.
    deep = b'{"model":"gpt-4o-mini","x":' + b"[" * 300 + b"1" + b"]" * 300 + b"}"
    statuses = []
    for n in range(20):
        if n == 5:
            answer = await proxy.client.post(
                "/v1/files/mirror",
                headers={**headers, "X-Request-ID": "deep-1", "Content-Type": "application/json"},
                data=deep,
            )
            assert await answer.read() == deep
        else:
            answer = await proxy.client.get("/v1/models", headers=headers)
        statuses.append(answer.status)
    assert statuses == [200] * 20
    events = await wait_for_lines(log, 20, timeout=20)
    assert len({e["request_id"] for e in events}) == 20
    (shown,) = [e for e in events if e["request_id"] == "deep-1"]
    assert shown["request"] == deep.decode() and shown["response"] == deep.decode()


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


async def test_a_transcription_is_recorded_with_the_model_its_form_names(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    token = await proxy.token()
    audio = bytes(range(256)) * 4096  # 1 MiB: past the request capture, the model before it
    async with proxy.sdk(token) as client:
        heard = await client.audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("speech.wav", audio, "audio/wav")
        )
    assert heard.text == f"{len(audio)} bytes heard by gpt-4o-transcribe"
    (event,) = await wait_for_lines(log, 1)
    assert event["path"] == "/v1/audio/transcriptions" and event["status"] == 200
    assert event["model"] == "gpt-4o-transcribe"


async def _transcribed(request: web.Request) -> web.Response:
    # OpenAI's usage of a gpt-4o transcription: tokens, most of them audio.
    await request.read()
    usage = {"type": "tokens", "input_tokens": 1000, "output_tokens": 100, "total_tokens": 1100}
    return web.json_response({"text": "hello", "usage": usage})


async def _spoken(request: web.Request) -> web.StreamResponse:
    # Speech streamed as events (stream_format "sse"): the last one carries the usage.
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    usage = {"input_tokens": 20, "output_tokens": 1000, "total_tokens": 1020}
    for event in [
        {"type": "speech.audio.delta", "audio": "AAAA"},
        {"type": "speech.audio.done", "usage": usage},
    ]:
        await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
    await response.write_eof()
    return response


@pytest.mark.parametrize(
    ("model", "path", "cost_usd"),
    [
        # Audio in at $6.00, text out at $10.00 per 1M (not gpt-4o's $2.50 text input).
        ("gpt-4o-transcribe", "/v1/audio/transcriptions", (1000 * 6 + 100 * 10) / 1e6),
        # Audio in at $3.00, text out at $5.00 (not gpt-4o-mini's $0.15 and $0.60).
        ("gpt-4o-mini-transcribe", "/v1/audio/transcriptions", (1000 * 3 + 100 * 5) / 1e6),
        # Text in at $0.60, audio out at $12.00 (not gpt-4o-mini's $0.15 and $0.60).
        ("gpt-4o-mini-tts", "/v1/audio/speech", (20 * 0.6 + 1000 * 12) / 1e6),
    ],
)
async def test_transcription_and_speech_models_are_priced_as_audio_not_as_their_chat_family(
    proxy_factory: Any, tmp_path: Path, model: str, path: str, cost_usd: float
) -> None:
    app = web.Application()
    app.router.add_post("/v1/audio/transcriptions", _transcribed)
    app.router.add_post("/v1/audio/speech", _spoken)
    upstream = TestServer(app)
    await upstream.start_server()
    try:
        log = tmp_path / "events.jsonl"
        proxy: Proxy = await proxy_factory(
            file_event_log=log, api={"base_url": str(upstream.make_url("")).rstrip("/")}
        )
        async with proxy.sdk(await proxy.token()) as client:
            if path == "/v1/audio/speech":
                async with client.audio.speech.with_streaming_response.create(
                    model=model, input="hello", voice="alloy", stream_format="sse"
                ) as spoken:
                    await spoken.read()
            else:
                await client.audio.transcriptions.create(
                    model=model, file=("speech.wav", b"RIFF" * 1000, "audio/wav")
                )
        (event,) = await wait_for_lines(log, 1)
        assert (event["model"], event["usage"]["source"]) == (model, "upstream")
        assert event["cost_usd"] == pytest.approx(cost_usd, abs=1e-9)
    finally:
        await upstream.close()


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


def list_price(usage: Any, input: str, output: str = "0") -> float:
    """A call's cost by hand: its tokens times the list prices (USD per 1M) of config/prices.yaml."""
    completion = getattr(usage, "completion_tokens", 0)
    dollars = usage.prompt_tokens * Decimal(input) + completion * Decimal(output)
    return float(dollars / 1_000_000)


async def test_events_usage_and_metrics_carry_the_cost_at_list_prices(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    before = await scrape(proxy)
    issued = await proxy.issue_token()
    messages = [{"role": "user", "content": "one two three four"}]
    async with proxy.sdk(issued["token"]) as client:
        plain = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini-2024-07-18", messages=messages, max_tokens=3, stream=True
        )
        chunks = [chunk async for chunk in stream]
        embedded = await client.embeddings.create(
            model="text-embedding-3-small", input="one two three"
        )
        await client.models.list()
    assert plain.usage is not None and chunks
    events = await wait_for_lines(log, 4)
    by_path = {(e["path"], e["stream"]): e for e in events}
    chat = by_path["/v1/chat/completions", False]
    streamed = by_path["/v1/chat/completions", True]
    embedding = by_path["/v1/embeddings", False]

    # gpt-4o-mini: $0.15 per 1M prompt tokens, $0.60 per 1M completion tokens.
    assert chat["cost_usd"] == list_price(plain.usage, "0.15", "0.60") > 0
    # The stream's usage never reached the client (it did not ask); the event has it all the same.
    assert streamed["usage"]["completion_tokens"] == 3
    stream_cost = (streamed["usage"]["prompt_tokens"] * 150 + 3 * 600) / 1e9
    assert streamed["cost_usd"] == stream_cost
    assert embedding["cost_usd"] == list_price(embedded.usage, "0.02") > 0
    assert by_path["/v1/models", False]["cost_usd"] is None  # no model: nothing to price

    spent = Decimal(str(chat["cost_usd"])) + Decimal(str(streamed["cost_usd"]))
    spent += Decimal(str(embedding["cost_usd"]))
    usage = await wait_for_usage(proxy, f"/tokens/{issued['id']}", 4)
    assert usage["cost_usd"] == float(spent)
    project = await wait_for_usage(proxy, f"/projects/{issued['project_id']}", 4)
    assert project["cost_usd"] == float(spent)

    after = await scrape(proxy)

    def delta(name: str, **labels: str) -> float:
        return round(value(after, name, **labels) - value(before, name, **labels), 9)

    # The model label is the glob that priced the call, so a snapshot counts with its family.
    family = {"model": "gpt-4o-mini*"}
    prompt = plain.usage.prompt_tokens + streamed["usage"]["prompt_tokens"]
    assert delta("llm_proxy_tokens_total", kind="prompt", **family) == prompt
    assert delta("llm_proxy_tokens_total", kind="completion", **family) == (
        plain.usage.completion_tokens + 3
    )
    assert delta("llm_proxy_cost_usd_total", **family) == round(
        chat["cost_usd"] + streamed["cost_usd"], 9
    )
    embeddings = {"model": "text-embedding-3-small"}
    assert delta("llm_proxy_tokens_total", kind="prompt", **embeddings) == (
        embedded.usage.prompt_tokens
    )
    assert delta("llm_proxy_cost_usd_total", **embeddings) == embedding["cost_usd"]
    text = await (await proxy.client.get("/metrics")).text()
    assert 'model="gpt-4o-mini-2024-07-18"' not in text  # labels stay bounded


async def test_a_model_without_a_price_is_counted_as_other(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    before = await scrape(proxy)
    async with proxy.sdk(await proxy.token()) as client:
        answer = await client.chat.completions.create(
            model="my-fine-tune-7", messages=[{"role": "user", "content": "one two"}]
        )
    (event,) = await wait_for_lines(log, 1)
    assert event["model"] == "my-fine-tune-7" and event["cost_usd"] is None
    after = await scrape(proxy)
    assert answer.usage is not None
    counted = value(after, "llm_proxy_tokens_total", kind="prompt", model="other")
    counted -= value(before, "llm_proxy_tokens_total", kind="prompt", model="other")
    assert counted == answer.usage.prompt_tokens
    assert 'model="my-fine-tune-7"' not in await (await proxy.client.get("/metrics")).text()


async def test_a_client_that_leaves_once_it_read_done_is_not_recorded_as_disconnected(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """SDKs close a stream as soon as they read ``data: [DONE]``; the upstream's end of body may
    come later. That client had the whole answer; one that leaves before it did not."""
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    headers = {"Authorization": f"Bearer {await proxy.token()}"}
    before = value(await scrape(proxy), "llm_proxy_client_disconnects_total")
    whole = await proxy.client.get("/v1/audio/paced?n=2&gap=0.01&linger=5", headers=headers)
    assert (await whole.content.readuntil(b"[DONE]\n\n")).endswith(b"data: [DONE]\n\n")
    whole.close()
    (event,) = await wait_for_lines(log, 1)
    assert (event["status"], event["error"]) == (200, None)

    cut = await proxy.client.get("/v1/audio/paced?n=3&gap=0.5", headers=headers)
    assert await cut.content.readuntil(b"\n\n") == b"data: 0\n\n"
    cut.close()
    events = await wait_for_lines(log, 2)
    assert (events[1]["status"], events[1]["error"]) == (200, "client_disconnected")
    after = value(await scrape(proxy), "llm_proxy_client_disconnects_total")
    assert after - before == 1


async def test_a_stream_of_events_that_are_no_json_objects_is_recorded_as_its_text(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    headers = {"Authorization": f"Bearer {await proxy.token()}"}
    answer = await proxy.client.get("/v1/audio/paced?n=2&gap=0", headers=headers)
    text = (await answer.read()).decode()
    assert text == "data: 0\n\ndata: 1\n\ndata: [DONE]\n\n"
    (event,) = await wait_for_lines(log, 1)
    assert (event["stream"], event["response"]) == (True, text)  # what the client got, not []


async def test_a_stream_cut_by_the_servers_stop_is_recorded_as_cut_not_as_left(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """A stream still running when the stop's grace period ends is closed by the server: its event
    says ``server_stopping`` with the status the client got, and no client is counted as gone."""
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log, site={"grace_seconds": 0.2})
    headers = {"Authorization": f"Bearer {await proxy.token()}"}
    cut_before, left_before = STATS.cut_at_stop, STATS.client_disconnects
    stream = await proxy.operator.get(
        f"{proxy.base_url}/v1/audio/paced?n=3&gap=30", headers=headers
    )
    assert await stream.content.readuntil(b"\n\n") == b"data: 0\n\n"
    await proxy.client.server.close()  # the stop: 0.2 s of grace, then the server closes
    with pytest.raises(aiohttp.ClientPayloadError):  # cut: no end of the chunked body came
        await stream.content.read()
    (event,) = await wait_for_lines(log, 1)
    assert (event["status"], event["error"]) == (200, "server_stopping")
    assert STATS.cut_at_stop - cut_before == 1
    assert STATS.client_disconnects == left_before
    stream.close()


async def test_an_answer_its_client_stopped_reading_is_recorded_when_the_stop_cuts_it(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """An answer whose client stopped reading waits for the client to take what was written; the
    stop cuts it after its grace like any other, and its event is written before the event log
    closes (it was dropped as 'closing': the exchange only ended once the connection lingered out,
    after the server had stopped)."""
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log, site={"grace_seconds": 0.2})
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(
        f"GET /v1/files/big?size={64 * 1024 * 1024} HTTP/1.1\r\nHost: proxy\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    # Then read no more: the answer fills the socket's buffers and waits for the client.
    await asyncio.sleep(0.5)

    await proxy.client.server.close()  # the stop: 0.2 s of grace, then the server closes

    (event,) = await wait_for_lines(log, 1)
    assert (event["path"], event["status"], event["error"]) == (
        "/v1/files/big",
        200,
        "server_stopping",
    )
    writer.close()


async def test_on_redis_each_file_log_gets_every_event(
    proxy_factory: Any, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Two instances on one Redis, each with its own --file-event-log, requests through one:
    both files get every event, and the group a standalone file dispatcher joins is left to it
    (they all shared the group "file" before, each getting a share)."""
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    proxies: list[Proxy] = [
        await proxy_factory(file_event_log=log, event_bus="redis", redis_url=redis_server.url)
        for log in logs
    ]
    headers = {"Authorization": f"Bearer {await proxies[0].token()}"}
    for _ in range(12):
        assert (await proxies[0].client.get("/v1/models", headers=headers)).status == 200
    for log in logs:
        events = await wait_for_lines(log, 12, timeout=20)
        assert len({e["request_id"] for e in events}) == 12
    client = Redis.from_url(redis_server.url)
    try:
        groups = {g["name"].decode() for g in await client.xinfo_groups("llm-proxy:events")}
    finally:
        await client.aclose()
    assert "file" not in groups
    assert {g for g in groups if g.startswith("file@")} == {
        f"file@{socket.gethostname()}:{log.resolve()}" for log in logs
    }


async def test_a_key_pasted_into_the_path_is_masked_in_the_event(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    token = await proxy.token()
    headers = {"Authorization": f"Bearer {token}"}
    # An application that put a key where a file id goes: the path is allowed (/v1/files).
    answer = await proxy.client.get(f"/v1/files/{UPSTREAM_KEY}", headers=headers)
    await proxy.client.get(f"/v1/files/{token}/content", headers=headers)
    assert answer.status < 500
    events = await wait_for_lines(log, 2)
    assert [e["path"].split("/")[2] for e in events] == ["files", "files"]
    assert all("…" in e["path"] for e in events)
    text = log.read_text()
    assert UPSTREAM_KEY not in text and token not in text


async def test_a_token_or_key_sent_in_a_body_is_masked_in_the_event(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    token = await proxy.token()
    async with proxy.sdk(token) as client:
        # A client that pasted its token where the model goes, and a key into its prompt; the
        # upstream answers, naming the model it was asked for.
        answer = await client.chat.completions.create(
            model=token, messages=[{"role": "user", "content": f"my key is {UPSTREAM_KEY}"}]
        )
    assert answer.model == token  # the client gets the upstream's answer unchanged
    (event,) = await wait_for_lines(log, 1)
    assert event["model"].startswith("sk-") and "…" in event["model"]
    assert event["request"]["messages"][0]["content"].startswith("my key is sk-")
    assert event["usage"]["total_tokens"] > 0
    text = log.read_text()
    assert token not in text and UPSTREAM_KEY not in text


async def test_words_that_merely_contain_sk_are_neither_masked_in_events_nor_in_refusals(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    token = await proxy.token()
    prompt = f"Draft a risk-assessment-framework for our task-management-service.\nsk-{'a' * 30}"
    async with proxy.sdk(token) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
        )
    refused = await proxy.client.get(
        "/v1/desk-organizer-items", headers={"Authorization": f"Bearer {token}"}
    )
    assert (await refused.json())["error"]["message"] == (
        "Endpoint GET /v1/desk-organizer-items is not allowed."
    )
    (event,) = await wait_for_lines(log, 1)
    shown = event["request"]["messages"][0]["content"]
    assert shown.startswith("Draft a risk-assessment-framework for our task-management-service.")
    assert "a" * 30 not in shown  # a key on a line of its own is still masked


async def test_long_model_names_are_not_kept_after_their_events(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    headers = {"Authorization": f"Bearer {await proxy.token()}"}

    url = f"{proxy.base_url}/v1/chat/completions"

    async def send(count: int, first: int) -> None:
        # A session of its own, which keeps no answers (the test client keeps them all).
        async with aiohttp.ClientSession() as session:
            for n in range(first, first + count):
                # Each model name a client's own: distinct, and as long as it likes.
                model = f"{n:06d}" + "m" * 100_000
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                async with session.post(url, json=body, headers=headers) as answer:
                    assert answer.status == 200
                    await answer.read()
        await wait_for_lines(log, first + count)
        proxy.upstream.requests.clear()  # the fake upstream's own record of them
        gc.collect()

    tracemalloc.start()
    try:
        await send(20, 0)
        before = tracemalloc.get_traced_memory()[0]
        await send(200, 20)  # 20 MB of model names
        kept_mb = (tracemalloc.get_traced_memory()[0] - before) / 1e6
    finally:
        tracemalloc.stop()
    assert kept_mb < 5, f"{kept_mb:.0f} MB kept"


async def test_the_timestamp_is_when_the_request_came_not_when_its_token_was_checked(
    postgres_url: str, proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log, database_url=postgres_url)
    headers = {"Authorization": f"Bearer {await proxy.token()}"}
    holder = await asyncpg.connect(postgres_url)
    try:
        held = holder.transaction()
        await held.start()
        # The token's first check reads it from the database: make that wait.
        await holder.execute("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
        asked = asyncio.ensure_future(proxy.client.get("/v1/models", headers=headers))
        # Whatever the waiting statement shows as its text: a lock on the table not granted.
        waiting = (
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE c.relname = 'tokens' AND NOT l.granted"
        )
        deadline = time.monotonic() + 10
        while not await holder.fetchval(waiting):
            assert not asked.done(), "the token was checked without reading the database"
            assert time.monotonic() < deadline, "the token's check never waited on the lock"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        released = time.time()
        await held.commit()
        assert (await asyncio.wait_for(asked, 10)).status == 200
    finally:
        await holder.close()
    (event,) = await wait_for_lines(log, 1)
    # The request came before the check ended; its duration counts from then too.
    assert parse_rfc3339(event["timestamp"]) < released


async def test_a_model_refused_in_the_path_writes_its_event_as_one_refused_in_the_body(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    issued = await proxy.issue_token(allowed_models=["gpt-4o-mini*"])
    headers = {"Authorization": f"Bearer {issued['token']}"}
    in_body = await proxy.client.post(
        "/v1/chat/completions", json={"model": "gpt-4o", "messages": []}, headers=headers
    )
    in_path = await proxy.client.delete("/v1/models/ft:gpt-4o:acme::abc", headers=headers)
    assert [in_body.status, in_path.status] == [403, 403]
    events = await wait_for_lines(log, 2)
    assert [(e["method"], e["status"], e["error"]) for e in events] == [
        ("POST", 403, "model_not_allowed"),
        ("DELETE", 403, "model_not_allowed"),
    ]
    assert events[1]["token_id"] == issued["id"]
    assert events[1]["request_id"] == in_path.headers["LLM-Proxy-Request-ID"]


async def test_refusals_before_a_token_is_accepted_write_no_event_and_later_ones_do(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """What README's "Which requests have an event" says: a request refused for its path, its
    method or its credentials has no project or token to charge it to, and anyone could send it,
    so it is only counted on /metrics; from an accepted token on, every request has one event, its
    `error` the proxy's own code, null for an upstream answer relayed whole, 5xx included."""
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    before = await scrape(proxy)
    issued = await proxy.issue_token(max_requests=2)
    good = {"Authorization": f"Bearer {issued['token']}"}
    unknown = {"Authorization": "Bearer sk-" + "A" * 43}
    refused = [
        await proxy.client.get("/v1/no-such-endpoint", headers=good),
        await proxy.client.put("/v1/models", headers=good),
        await proxy.client.get("/v1/models"),
        await proxy.client.get("/v1/models", headers=unknown),
    ]
    assert [r.status for r in refused] == [404, 405, 401, 401]
    upstream_error = await proxy.client.post(
        "/v1/moderations", json={"input": "x"}, headers={**good, "X-Fake-Status": "503"}
    )
    answered = await proxy.client.get("/v1/models", headers=good)
    over_quota = await proxy.client.get("/v1/models", headers=good)
    assert [upstream_error.status, answered.status, over_quota.status] == [503, 200, 429]

    await wait_for_lines(log, 3)
    await asyncio.sleep(0.5)  # time enough for an event of a refusal, had there been one
    events = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert [(e["status"], e["error"], e["token_id"]) for e in events] == [
        (503, None, issued["id"]),
        (200, None, issued["id"]),
        (429, "quota_exceeded", issued["id"]),
    ]
    after = await scrape(proxy)
    for reason in ("endpoint_not_found", "method_not_allowed", "invalid_token", "token_not_found"):
        counted = value(after, "llm_proxy_requests_refused_total", reason=reason)
        assert counted - value(before, "llm_proxy_requests_refused_total", reason=reason) == 1
