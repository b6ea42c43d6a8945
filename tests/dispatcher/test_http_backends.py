from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from email.utils import formatdate
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from dispatcher.backends import Rejection
from dispatcher.backends.helicone import HeliconeBackend, payload
from dispatcher.backends.http import retry_after
from dispatcher.backends.lunary import LunaryBackend, run_events, run_id
from dispatcher.deadletter import DeadLetterFile
from dispatcher.exit_codes import Exit
from dispatcher.retry import Backoff
from dispatcher.worker import Worker, WorkerSettings
from llm_proxy.crypto import mask_key
from llm_proxy.events.builder import build
from llm_proxy.events.event import Event, parse_rfc3339
from llm_proxy.events.memory import MemoryBus
from llm_proxy.events.redis import RedisBus
from tests.conftest import Proxy
from tests.dispatcher.fakes import (
    HELICONE_KEY,
    HELICONE_READ_ONLY_KEY,
    LUNARY_KEY,
    FakeHelicone,
    FakeLunary,
)
from tests.events.events_support import (
    RedisServer,
    chunk,
    exchange,
    free_port,
    sse,
    usage_chunk,
)
from tests.waiting import wait_for_lines

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

CHAT = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0.2,
    "user": "u-42",
}


def chat_event(request: object = CHAT, **overrides: Any) -> Event:
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
    return build(exchange(request=request, response=orjson.dumps(answer), **overrides))


def stream_event() -> Event:
    stream = sse(chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}, "stop"))
    return build(
        exchange(
            request={**CHAT, "stream": True}, response=stream, content_type="text/event-stream"
        )
    )


def worker_settings(tmp_path: Path, service: str) -> WorkerSettings:
    return WorkerSettings(
        service=service,
        dead_letter_path=tmp_path / "dead.jsonl",
        batch_wait=0.02,
        poll=0.05,
        backoff=Backoff(base=0.01, cap=0.04),
        burst=True,
    )


async def deliver(backend: Any, events: list[Event], tmp_path: Path) -> Any:
    bus = MemoryBus()
    worker = Worker(bus, backend, worker_settings(tmp_path, backend.name))
    worker.start()
    await bus.publish(events)
    return await worker.async_run()


def dead_letters(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "dead.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


# -- Helicone ---------------------------------------------------------------------------------


async def test_helicone_receives_the_async_log_shape_with_real_timing(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeHelicone()
    server = await aiohttp_server(fake.app)
    events = [chat_event(), stream_event()]
    backend = HeliconeBackend(HELICONE_KEY, url=str(server.make_url("/custom/v1/log")))
    assert HELICONE_KEY not in repr(backend)

    summary = await deliver(backend, events, tmp_path)

    assert summary.delivered == 2
    by_id = {log["providerRequest"]["meta"]["Helicone-Request-Id"]: log for log in fake.logs}
    plain = by_id[events[0]["id"]]
    assert plain["providerRequest"]["json"] == CHAT
    assert plain["providerRequest"]["meta"]["Helicone-Property-Project"] == "proj-1"
    assert plain["providerResponse"]["status"] == 200
    assert plain["providerResponse"]["json"]["choices"][0]["message"]["content"] == "Hello!"
    start = parse_rfc3339(events[0]["timestamp"])
    timing = plain["timing"]
    assert timing["startTime"]["seconds"] * 1000 + timing["startTime"]["milliseconds"] == round(
        start * 1000
    )
    end_ms = timing["endTime"]["seconds"] * 1000 + timing["endTime"]["milliseconds"]
    assert end_ms == round((start + events[0]["duration_ms"] / 1000) * 1000)
    assert "timeToFirstToken" not in timing

    streamed = by_id[events[1]["id"]]
    assert streamed["timing"]["timeToFirstToken"] == round(events[1]["ttfb_ms"] or 0)
    assert streamed["providerResponse"]["json"]["choices"][0]["message"]["content"] == "Hello"
    assert (
        streamed["providerResponse"]["json"]["usage"]["completion_tokens"] > 0
    )  # estimated, added
    assert streamed["providerRequest"]["meta"]["Helicone-Property-Usage-Source"] == "estimated"


async def test_helicone_is_not_shown_the_usage_of_a_stored_response_fetched_again(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeHelicone()
    server = await aiohttp_server(fake.app)
    usage = {"input_tokens": 900, "output_tokens": 4000, "total_tokens": 4900}
    stored = {"id": "resp_1", "object": "response", "status": "completed", "model": "o3"}
    fetch = exchange(path="/v1/responses/resp_1", response=orjson.dumps({**stored, "usage": usage}))
    fetch.method = "GET"
    event = build(fetch)
    assert event["usage"] is None  # the call that made it was counted when it was made
    backend = HeliconeBackend(HELICONE_KEY, url=str(server.make_url("/custom/v1/log")))

    assert (await deliver(backend, [event], tmp_path)).delivered == 1

    (log,) = fake.logs
    assert log["providerResponse"]["json"] == stored  # which Helicone would have priced again


async def test_helicone_an_error_page_not_in_utf_8_is_retried_alone(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeHelicone()
    fake.answers = [502]
    fake.answer_body = b"<html><body>Bad Gateway \xa9 proxy</body></html>"  # Latin-1, no charset
    server = await aiohttp_server(fake.app)
    events = [chat_event() for _ in range(3)]

    summary = await deliver(
        HeliconeBackend(HELICONE_KEY, url=str(server.make_url("/custom/v1/log"))),
        events,
        tmp_path,
    )

    assert summary.delivered == 3 and summary.retried == 1
    logged = [log["providerRequest"]["meta"]["Helicone-Request-Id"] for log in fake.logs]
    assert sorted(logged) == sorted(e["id"] for e in events)  # each once: none sent again


async def test_helicone_takes_the_event_of_a_path_no_header_value_can_hold(
    proxy_factory: Any, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    # Helicone reads meta as request headers; a client chooses its path, "€" included.
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    headers = {"Authorization": f"Bearer {await proxy.token()}"}
    answer = await proxy.client.get("/v1/models/caf%C3%A9-%E2%82%AC", headers=headers)
    assert answer.status == 404
    (event,) = await wait_for_lines(log, 1)
    assert event["path"] == "/v1/models/café-€"
    fake = FakeHelicone()
    server = await aiohttp_server(fake.app)
    backend = HeliconeBackend(HELICONE_KEY, url=str(server.make_url("/custom/v1/log")))
    bus = MemoryBus()
    worker = Worker(bus, backend, replace(worker_settings(tmp_path, "helicone"), max_attempts=3))
    worker.start()
    await bus.publish([event])

    summary = await worker.async_run()

    assert summary.delivered == 1 and not dead_letters(tmp_path)
    (logged,) = fake.logs
    meta = logged["providerRequest"]["meta"]
    assert meta["Helicone-Property-Path"] == "/v1/models/caf%C3%A9-%E2%82%AC"  # as it was sent


async def test_an_event_the_backend_cannot_render_is_dead_lettered_without_holding_up_the_rest(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """An event the backend raises on (here a timestamp no version of the proxy writes, put on
    the bus by something else) is tried a few times and dead-lettered, not retried for ever with
    every later event behind it; the others of its batch are delivered once each."""
    fake = FakeHelicone()
    server = await aiohttp_server(fake.app)
    backend = HeliconeBackend(HELICONE_KEY, url=str(server.make_url("/custom/v1/log")))
    good = [chat_event() for _ in range(3)]
    poison = {**chat_event(), "timestamp": "yesterday"}
    assert worker_settings(tmp_path, "helicone").max_attempts == 0  # retry until accepted
    async with asyncio.timeout(30):
        summary = await deliver(backend, [good[0], poison, good[1], good[2]], tmp_path)
    assert summary.delivered == 3 and summary.dead_lettered == 1
    assert sorted(log["providerRequest"]["meta"]["Helicone-Request-Id"] for log in fake.logs) == (
        sorted(event["id"] for event in good)
    )
    (dead,) = dead_letters(tmp_path)
    assert dead["event"]["id"] == poison["id"]
    assert dead["reason"].startswith("gave up after 5 attempts: the backend raised ValueError")


async def test_helicone_retries_429_and_5xx_then_delivers(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeHelicone()
    fake.answers = [429, 503]
    server = await aiohttp_server(fake.app)
    summary = await deliver(
        HeliconeBackend(HELICONE_KEY, url=str(server.make_url("/custom/v1/log"))),
        [chat_event()],
        tmp_path,
    )
    assert summary.delivered == 1 and summary.retried == 2 and len(fake.logs) == 1


async def deliver_with_cap(backend: Any, events: list[Event], tmp_path: Path, cap: float) -> Any:
    settings = replace(worker_settings(tmp_path, backend.name), backoff=Backoff(base=0.01, cap=cap))
    bus = MemoryBus()
    worker = Worker(bus, backend, settings)
    worker.start()
    await bus.publish(events)
    return await asyncio.wait_for(worker.async_run(), 20)


@pytest.mark.parametrize(
    ("status", "retry_after", "cap", "low", "high"),
    [
        # Upper bounds are loose (a loaded machine is slow, never early): each only tells the
        # behaviour from the others (3600 s uncapped, 5 s for the unreadable one).
        (429, "1", 5.0, 0.95, 4.5),  # seconds, as asked
        (503, "3600", 0.5, 0.45, 4.5),  # seconds, capped at --backoff-cap
        (429, "in a while", 5.0, 0.0, 2.0),  # unreadable: the usual backoff (base 0.01 s)
    ],
)
async def test_helicone_retry_after_is_the_wait_before_the_next_attempt(
    aiohttp_server: ServerFactory,
    tmp_path: Path,
    status: int,
    retry_after: str,
    cap: float,
    low: float,
    high: float,
) -> None:
    fake = FakeHelicone()
    fake.answers = [status]
    fake.answer_headers = {"Retry-After": retry_after}
    server = await aiohttp_server(fake.app)
    backend = HeliconeBackend(HELICONE_KEY, url=str(server.make_url("/custom/v1/log")))
    summary = await deliver_with_cap(backend, [chat_event()], tmp_path, cap)
    assert summary.delivered == 1 and summary.retried == 1
    first, second = fake.seen
    assert low <= second - first <= high


async def test_lunary_retry_after_as_an_http_date_is_honoured(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeLunary()
    fake.answers = [503]
    # Whole seconds, so at least 1 s and at most 2 s from now.
    fake.answer_headers = {"Retry-After": formatdate(int(time.time()) + 2, usegmt=True)}
    server = await aiohttp_server(fake.app)
    backend = LunaryBackend(LUNARY_KEY, url=str(server.make_url("/")))
    summary = await deliver_with_cap(backend, [chat_event()], tmp_path, 5.0)
    assert summary.delivered == 1 and summary.retried == 1
    first, second = fake.seen
    assert 0.9 <= second - first <= 4.5


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert retry_after("120", now) == 120.0
    assert retry_after(formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after("Tue, 14 Nov 2023 22:13:50 -0000", now) == 30.0
    assert retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after("soon", now) is None and retry_after(None, now) is None
    assert retry_after("nan", now) is None


async def test_helicone_permanent_refusal_is_dead_lettered(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeHelicone()
    fake.answers = [400]
    server = await aiohttp_server(fake.app)
    summary = await deliver(
        HeliconeBackend(HELICONE_KEY, url=str(server.make_url("/custom/v1/log"))),
        [chat_event()],
        tmp_path,
    )
    assert summary.dead_lettered == 1
    [line] = dead_letters(tmp_path)
    assert line["reason"].startswith("HTTP 400")


@pytest.mark.parametrize("key", ["hk-live-0a9b8c7d6e5f4a3b", "sk-helicone-shaped-0a9b8c7d"])
async def test_a_key_the_service_echoes_is_masked_in_the_dead_letter_file(
    aiohttp_server: ServerFactory, tmp_path: Path, key: str
) -> None:
    fake = FakeHelicone(key=key)
    fake.answers = [400]
    server = await aiohttp_server(fake.app)
    summary = await deliver(
        HeliconeBackend(key, url=str(server.make_url("/custom/v1/log"))), [chat_event()], tmp_path
    )
    assert summary.dead_lettered == 1
    [line] = dead_letters(tmp_path)
    assert line["reason"].startswith("HTTP 400") and "got Authorization: Bearer" in line["reason"]
    assert key not in (tmp_path / "dead.jsonl").read_text()
    assert mask_key(key) in line["reason"]  # as the logs show it


async def test_lunary_key_echoed_back_is_masked_in_the_dead_letter_file(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeLunary()
    fake.answers = [400]
    server = await aiohttp_server(fake.app)
    summary = await deliver(
        LunaryBackend(LUNARY_KEY, url=str(server.make_url("/"))), [chat_event()], tmp_path
    )
    assert summary.dead_lettered == 1
    [line] = dead_letters(tmp_path)
    assert line["reason"].startswith("HTTP 400") and LUNARY_KEY not in line["reason"]


async def test_lunary_key_echoed_in_a_run_s_error_is_masked_in_logs_and_dead_letters(
    aiohttp_server: ServerFactory, tmp_path: Path, log_stream: io.StringIO
) -> None:
    """Lunary answers 200 with an error per run it refuses, which may quote what it was sent."""
    fake = FakeLunary()
    fake.run_error = f"project {LUNARY_KEY} cannot ingest this run"
    server = await aiohttp_server(fake.app)
    refused = chat_event()
    fake.refuse_run.add(run_id(refused["id"]))
    summary = await deliver(
        LunaryBackend(LUNARY_KEY, url=str(server.make_url("/"))), [refused], tmp_path
    )
    assert summary.dead_lettered == 1
    [line] = dead_letters(tmp_path)
    assert line["reason"] == f"lunary: project {mask_key(LUNARY_KEY)} cannot ingest this run"
    assert "dispatcher.dead_lettered" in log_stream.getvalue()
    assert LUNARY_KEY not in (tmp_path / "dead.jsonl").read_text() + log_stream.getvalue()


async def test_the_dead_letter_file_masks_what_is_shaped_like_a_key(tmp_path: Path) -> None:
    leaked = "sk-proj-" + "A1b2C3d4" * 4
    await DeadLetterFile(tmp_path / "dead.jsonl").write("x", [(chat_event(), f"echo {leaked}")])
    [line] = dead_letters(tmp_path)
    assert leaked not in line["reason"] and line["reason"] == f"echo {mask_key(leaked)}"


@pytest.mark.parametrize(("key", "status"), [("wrong-key", 401), (HELICONE_READ_ONLY_KEY, 403)])
async def test_helicone_refused_key_refuses_the_batch_as_auth_and_spares_the_service(
    aiohttp_server: ServerFactory, key: str, status: int
) -> None:
    fake = FakeHelicone()
    server = await aiohttp_server(fake.app)
    backend = HeliconeBackend(key, url=str(server.make_url("/custom/v1/log")), concurrency=4)
    await backend.start()
    try:
        refused = await backend.send([chat_event() for _ in range(40)])
    finally:
        await backend.close()
    assert sorted(refused) == list(range(40))
    assert {(r.reason, r.retryable, r.auth) for r in refused.values()} == {
        (f"HTTP {status}", False, True)
    }
    # Once the key was refused the rest were not sent: only the first concurrent wave went out.
    assert fake.refused_keys <= 4 and not fake.logs


async def test_helicone_bodies_over_the_limit_are_truncated_not_refused(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeHelicone(max_body=1024 * 1024)
    server = await aiohttp_server(fake.app)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 3_000_000}]}
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "y" * 3_000_000}}]
    }
    event = build(
        exchange(
            request=big,
            response=orjson.dumps(answer),
            request_limit=8 << 20,
            response_limit=8 << 20,
        )
    )
    summary = await deliver(
        HeliconeBackend(HELICONE_KEY, url=str(server.make_url("/custom/v1/log"))), [event], tmp_path
    )
    assert summary.delivered == 1
    [log] = fake.logs
    assert log["providerRequest"]["json"]["model"] == "gpt-4o-mini"
    assert log["providerRequest"]["json"]["body"].endswith("…[truncated by llm-proxy]")
    assert log["providerResponse"]["textBody"].endswith("…[truncated by llm-proxy]")


async def test_helicone_unreachable_is_retryable() -> None:
    backend = HeliconeBackend(HELICONE_KEY, url=f"http://127.0.0.1:{free_port()}/custom/v1/log")
    await backend.start()
    try:
        refused = await backend.send([chat_event()])
    finally:
        await backend.close()
    assert refused[0].retryable


def test_helicone_payload_for_failures_and_odd_bodies() -> None:
    failed = build(
        exchange(request=b"not json", status=0, content_type="", error="upstream_timeout")
    )
    body = payload(failed, max_body_bytes=1000)
    assert body["providerResponse"]["status"] == 504
    assert body["providerResponse"]["textBody"] == "null"
    assert body["providerRequest"]["json"] == {"model": "unknown", "body": "not json"}
    assert body["providerRequest"]["meta"]["Helicone-Property-Error"] == "upstream_timeout"
    listed = build(
        exchange(
            path="/v1/x",
            request={"model": "m"},
            response=sse({"a": 1}),
            content_type="text/event-stream",
        )
    )
    assert payload(listed, max_body_bytes=1000)["providerResponse"]["textBody"] == '[{"a":1}]'


# -- Lunary -----------------------------------------------------------------------------------


async def test_lunary_gets_start_and_end_runs_with_real_usage(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeLunary()
    server = await aiohttp_server(fake.app)
    event = chat_event()
    backend = LunaryBackend(LUNARY_KEY, url=str(server.make_url("/")))
    assert LUNARY_KEY not in repr(backend)

    summary = await deliver(backend, [event], tmp_path)

    assert summary.delivered == 1
    run = fake.runs[run_id(event["id"])]
    assert run["start"]["name"] == "gpt-4o-mini"
    assert run["start"]["input"] == CHAT["messages"]
    assert run["start"]["extra"] == {"temperature": 0.2}
    assert run["start"]["userId"] == "u-42"
    assert run["start"]["metadata"]["project_id"] == "proj-1"
    assert run["end"]["output"] == {"role": "assistant", "content": "Hello!"}
    assert run["end"]["tokensUsage"] == {"prompt": 9, "completion": 2}


async def test_lunary_redelivery_counts_a_duplicate_and_is_accepted(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    duplicates = (
        REGISTRY.get_sample_value("llm_proxy_dispatcher_duplicates_total", {"backend": "lunary"})
        or 0.0
    )
    fake = FakeLunary()
    server = await aiohttp_server(fake.app)
    event = chat_event()
    backend = LunaryBackend(LUNARY_KEY, url=str(server.make_url("/")))
    await backend.start()
    try:
        assert await backend.send([event]) == {}
        assert await backend.send([event]) == {}
    finally:
        await backend.close()
    assert (
        REGISTRY.get_sample_value("llm_proxy_dispatcher_duplicates_total", {"backend": "lunary"})
        == duplicates + 1
    )
    assert len(fake.runs) == 1


async def test_lunary_errors_and_refusals(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    fake = FakeLunary()
    server = await aiohttp_server(fake.app)
    error = {"error": {"message": "The model does not exist", "type": "invalid_request_error"}}
    failed = build(exchange(request=CHAT, response=orjson.dumps(error), status=404))
    refused = chat_event()
    fake.refuse_run.add(run_id(refused["id"]))
    fake.answers = [500]

    summary = await deliver(
        LunaryBackend(LUNARY_KEY, url=str(server.make_url("/"))), [failed, refused], tmp_path
    )

    assert summary.delivered == 1 and summary.dead_lettered == 1 and summary.retried == 2
    assert fake.runs[run_id(failed["id"])]["error"]["error"] == {
        "message": "The model does not exist"
    }
    [line] = dead_letters(tmp_path)
    assert line["reason"] == "lunary: invalid input"


async def test_lunary_takes_a_run_whose_texts_hold_a_nul(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    # A client may send a NUL (JSON "\u0000") anywhere; Lunary's PostgreSQL stores none, so
    # sent as it is the run fails for good, and one NUL in a prompt keeps a request out of Lunary.
    fake = FakeLunary()
    server = await aiohttp_server(fake.app)
    messages = [{"role": "user", "content": "a\0b, and a path C:\\u0000 written out"}]
    event = chat_event(
        request={**CHAT, "model": "gpt-4o-mini\0", "messages": messages, "user": "u\0"}
    )

    summary = await deliver(
        LunaryBackend(LUNARY_KEY, url=str(server.make_url("/"))), [event], tmp_path
    )

    assert summary.delivered == 1 and summary.dead_lettered == 0
    run = fake.runs[run_id(event["id"])]
    assert run["start"]["input"] == [
        {"role": "user", "content": "a\ufffdb, and a path C:\\u0000 written out"}
    ]
    assert run["start"]["name"] == "gpt-4o-mini\ufffd" and run["start"]["userId"] == "u\ufffd"
    assert run["end"]["output"] == {"role": "assistant", "content": "Hello!"}


@pytest.mark.parametrize(
    ("key", "status"),
    [("8a1d2c3b-0000-4000-8000-000000000000", 401), ("pk-mistyped-not-a-uuid", 402)],
)
async def test_lunary_bad_key_raises_a_permanent_batch_error(
    aiohttp_server: ServerFactory, key: str, status: int
) -> None:
    server = await aiohttp_server(FakeLunary().app)
    backend = LunaryBackend(key, url=str(server.make_url("/")))
    await backend.start()
    try:
        refused = await backend.send([chat_event(), chat_event()])
    finally:
        await backend.close()
    assert refused == dict.fromkeys([0, 1], Rejection(f"HTTP {status}", retryable=False, auth=True))


@pytest.mark.redis
async def test_a_lunary_key_that_is_not_a_project_id_stops_the_worker_and_leaves_the_events(
    aiohttp_server: ServerFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    server = await aiohttp_server(FakeLunary().app)
    sent = [chat_event() for _ in range(5)]
    bus = RedisBus(redis_server.url, stream="lunary402:events")
    await bus.publish(sent)
    backend = LunaryBackend("pk-mistyped-not-a-uuid", url=str(server.make_url("/")))
    worker = Worker(bus, backend, worker_settings(tmp_path, "lunary"))
    try:
        assert await asyncio.wait_for(worker.serve(), 10) == Exit.AUTH
        assert worker.summary.dead_lettered == 0 and not dead_letters(tmp_path)
        assert (await bus.client.xpending("lunary402:events", "lunary"))["pending"] == 5
    finally:
        await bus.close()


def redirecting(status: int, to: str, seen: list[str]) -> web.Application:
    """A front that moved: every request is answered ``status`` to the same path at ``to``, as
    an http:// listener answers with its https:// address."""

    async def moved(request: web.Request) -> web.Response:
        seen.append(request.method)
        return web.Response(status=status, headers={"Location": f"{to}{request.path}"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    return app


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_lunary_behind_a_redirect_is_not_followed_and_the_reason_names_its_target(
    aiohttp_server: ServerFactory, tmp_path: Path, status: int
) -> None:
    # 301/302 were followed as a GET with no events (dead-lettered as "HTTP 405"), 307/308 to
    # the new origin without the key (the worker stopped: "credentials refused").
    fake = FakeLunary()
    moved_to = await aiohttp_server(fake.app)
    target = str(moved_to.make_url("")).rstrip("/")
    seen: list[str] = []
    front = await aiohttp_server(redirecting(status, target, seen))
    events = [chat_event(), chat_event()]

    summary = await deliver(
        LunaryBackend(LUNARY_KEY, url=str(front.make_url("/"))), events, tmp_path
    )

    assert summary.delivered == 0 and summary.dead_lettered == 2 and summary.retried == 0
    assert seen == ["POST"] and fake.seen == []  # nothing went on, as a GET or otherwise
    reasons = {line["reason"] for line in dead_letters(tmp_path)}
    assert reasons == {
        f"HTTP {status}: {front.make_url('/v1/runs/ingest')} redirects to"
        f" {target}/v1/runs/ingest; events are not sent on across a redirect: set the"
        " service's URL to where it points"
    }
    assert LUNARY_KEY not in str(reasons)


async def test_helicone_behind_a_redirect_is_not_followed_either(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeHelicone()
    moved_to = await aiohttp_server(fake.app)
    seen: list[str] = []
    front = await aiohttp_server(redirecting(301, str(moved_to.make_url("")).rstrip("/"), seen))
    backend = HeliconeBackend(HELICONE_KEY, url=str(front.make_url("/custom/v1/log")))

    summary = await deliver(backend, [chat_event()], tmp_path)

    assert summary.dead_lettered == 1 and seen == ["POST"] and fake.seen == []
    [line] = dead_letters(tmp_path)
    assert line["reason"].startswith("HTTP 301: ")
    assert f"redirects to {moved_to.make_url('/custom/v1/log')};" in line["reason"]


def long_prompt_event(prompt_bytes: int) -> Event:
    request = {**CHAT, "messages": [{"role": "user", "content": "x" * prompt_bytes}]}
    return build(exchange(request=request, response=b"{}", request_limit=8 << 20))


async def test_lunary_batches_are_split_to_stay_within_its_body_limit(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeLunary()
    server = await aiohttp_server(fake.app)
    events = [long_prompt_event(300_000) for _ in range(100)]
    assert len(orjson.dumps([run_events(e) for e in events])) > fake.max_body

    summary = await deliver(
        LunaryBackend(LUNARY_KEY, url=str(server.make_url("/"))), events, tmp_path
    )

    assert summary.delivered == 100 and summary.dead_lettered == 0 and not dead_letters(tmp_path)
    assert len(fake.bodies) > 1 and max(fake.bodies) <= 8 * 1024 * 1024
    assert set(fake.runs) == {run_id(e["id"]) for e in events}


async def test_lunary_behind_a_proxy_with_a_smaller_body_limit_gets_smaller_posts(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    # A self-hosted Lunary behind nginx (1 MiB bodies by default, as the Kubernetes ingress):
    # a 413 says the post was too large for what is in front, not that its events are bad.
    fake = FakeLunary(max_body=1024 * 1024)
    server = await aiohttp_server(fake.app)
    events = [long_prompt_event(200_000) for _ in range(12)]

    summary = await deliver(
        LunaryBackend(LUNARY_KEY, url=str(server.make_url("/"))), events, tmp_path
    )

    assert summary.delivered == 12 and summary.dead_lettered == 0 and not dead_letters(tmp_path)
    assert set(fake.runs) == {run_id(e["id"]) for e in events}


async def test_lunary_an_event_too_large_alone_is_cut_not_dead_lettered(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeLunary(max_body=4 * 1024 * 1024)
    server = await aiohttp_server(fake.app)
    huge, small = long_prompt_event(6_000_000), chat_event()
    backend = LunaryBackend(
        LUNARY_KEY,
        url=str(server.make_url("/")),
        max_body_bytes=1024 * 1024,
        max_request_bytes=3 * 1024 * 1024,
    )

    summary = await deliver(backend, [huge, small], tmp_path)

    assert summary.delivered == 2 and not dead_letters(tmp_path)
    cut = fake.runs[run_id(huge["id"])]["start"]["input"]
    assert isinstance(cut, str) and cut.endswith("…[truncated by llm-proxy]")
    assert len(cut.encode()) < 1024 * 1024 + 100
    assert fake.runs[run_id(small["id"])]["start"]["input"] == CHAT["messages"]


async def test_lunary_keeps_every_request_that_shares_a_client_request_id(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeLunary()
    server = await aiohttp_server(fake.app)
    # A client that forwards its own trace id as X-Request-ID on every call it makes: the proxy
    # records it as each event's request_id (SPEC §7), yet they are different requests.
    first, second = chat_event(), chat_event()
    second["request_id"] = first["request_id"]
    second["usage"] = {
        "prompt_tokens": 90,
        "completion_tokens": 20,
        "total_tokens": 110,
        "source": "upstream",
    }

    summary = await deliver(
        LunaryBackend(LUNARY_KEY, url=str(server.make_url("/"))), [first, second], tmp_path
    )

    assert summary.delivered == 2 and not dead_letters(tmp_path)
    assert sorted(run["end"]["tokensUsage"]["prompt"] for run in fake.runs.values()) == [9, 90]


def test_lunary_run_events_for_other_endpoints() -> None:
    completion = build(
        exchange(
            path="/v1/completions",
            request={"model": "gpt-3.5-turbo-instruct", "prompt": "Say"},
            response=orjson.dumps({"choices": [{"index": 0, "text": " hi"}]}),
        )
    )
    start, end = run_events(completion)
    assert start["input"] == "Say" and end["output"] == {"role": "assistant", "content": " hi"}
    down = build(exchange(request=b"raw", status=0, content_type="", error="upstream_unavailable"))
    start, end = run_events(down)
    assert start["name"] == "/v1/chat/completions" and start["input"] == "raw"
    assert end["event"] == "error" and end["error"]["message"] == "HTTP 0 (upstream_unavailable)"
    many = {
        "choices": [
            {"index": 0, "message": {"content": "a"}},
            {"index": 1, "message": {"content": "b"}},
        ]
    }
    _, end = run_events(build(exchange(request=CHAT, response=orjson.dumps(many))))
    assert end["output"] == [{"content": "a"}, {"content": "b"}]
    responses = {"output": [{"type": "message"}], "usage": {"input_tokens": 1, "output_tokens": 1}}
    _, end = run_events(
        build(
            exchange(
                path="/v1/responses",
                request={"model": "gpt-4.1", "input": "x"},
                response=orjson.dumps(responses),
            )
        )
    )
    assert end["output"] == [{"type": "message"}]
    _, end = run_events(build(exchange(path="/v1/models", request=None, response=b'{"data": []}')))
    assert end["output"] == {"data": []} and "tokensUsage" not in end
    assert run_id("req-1") == run_id("req-1") != run_id("req-2")
    assert len(usage_chunk(1, 1)["choices"]) == 0
