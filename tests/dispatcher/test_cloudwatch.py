from __future__ import annotations

import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer
from prometheus_client import REGISTRY

from dispatcher.backends.cloudwatch import (
    EVENT_OVERHEAD,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_SPAN_MS,
    CloudWatchBackend,
    batches,
    message,
)
from dispatcher.retry import Backoff
from dispatcher.worker import BackendStartError, Worker, WorkerSettings
from llm_proxy.events.builder import build
from llm_proxy.events.event import Event
from llm_proxy.events.memory import MemoryBus
from tests.events.events_support import exchange

CREDENTIALS: dict[str, Any] = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
DAY = 24 * 3600


@pytest.fixture
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # moto keeps its state per process, not per server: start every test from nothing.
    with urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST")):
        pass
    yield url
    server.stop()


@pytest.fixture
async def logs(moto_url: str) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "logs", region_name="us-east-1", endpoint_url=moto_url, **CREDENTIALS
    ) as client:
        yield client


def backend(moto_url: str, **options: Any) -> CloudWatchBackend:
    return CloudWatchBackend(
        "llm-proxy", "events", region="us-east-1", endpoint_url=moto_url, **CREDENTIALS, **options
    )


def event_at(epoch: float, n: int = 0) -> Event:
    return build(exchange(request={"model": "gpt-4o", "n": n}, response=b"{}", started_at=epoch))


async def stored(logs: Any) -> list[dict[str, Any]]:
    answer = await logs.get_log_events(
        logGroupName="llm-proxy", logStreamName="events", startFromHead=True
    )
    return [orjson.loads(e["message"]) for e in answer["events"]]


async def test_creates_group_and_stream_and_writes_events_in_time_order(
    moto_url: str, logs: Any, tmp_path: Path
) -> None:
    now = time.time()
    events = [event_at(now - 30, 1), event_at(now - 90, 0), event_at(now - 10, 2)]
    bus = MemoryBus()
    worker = Worker(
        bus,
        backend(moto_url),
        WorkerSettings(
            service="cloudwatch",
            dead_letter_path=tmp_path / "dead.jsonl",
            poll=0.05,
            batch_wait=0.05,
            burst=True,
        ),
    )
    worker.start()
    await bus.publish(events)
    summary = await worker.async_run()

    assert summary.delivered == 3
    assert [e["request"]["n"] for e in await stored(logs)] == [0, 1, 2]
    groups = await logs.describe_log_groups()
    assert [g["logGroupName"] for g in groups["logGroups"]] == ["llm-proxy"]


async def test_events_too_old_or_too_new_are_dead_lettered_and_counted(
    moto_url: str, logs: Any, tmp_path: Path
) -> None:
    too_old = (
        REGISTRY.get_sample_value(
            "llm_proxy_dispatcher_cloudwatch_rejected_total", {"kind": "too_old"}
        )
        or 0.0
    )
    now = time.time()
    events = [event_at(now - 15 * DAY), event_at(now), event_at(now + 3 * 3600)]
    bus = MemoryBus()
    worker = Worker(
        bus,
        backend(moto_url),
        WorkerSettings(
            service="cloudwatch",
            dead_letter_path=tmp_path / "dead.jsonl",
            poll=0.05,
            batch_wait=0.05,
            burst=True,
        ),
    )
    worker.start()
    await bus.publish(events)
    summary = await worker.async_run()

    assert summary.delivered == 1 and summary.dead_lettered == 2
    assert [e["id"] for e in await stored(logs)] == [events[1]["id"]]
    dead = [orjson.loads(line) for line in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert sorted(d["reason"] for d in dead) == [
        "cloudwatch rejects events more than 2 hours in the future",
        "cloudwatch rejects events older than 14 days",
    ]
    assert (
        REGISTRY.get_sample_value(
            "llm_proxy_dispatcher_cloudwatch_rejected_total", {"kind": "too_old"}
        )
        == too_old + 1
    )


async def test_a_deleted_stream_is_recreated(moto_url: str, logs: Any) -> None:
    cloudwatch = backend(moto_url)
    await cloudwatch.start()
    try:
        await logs.delete_log_group(logGroupName="llm-proxy")
        assert await cloudwatch.send([event_at(time.time())]) == {}
        assert len(await stored(logs)) == 1
    finally:
        await cloudwatch.close()


async def test_service_errors_are_classified(moto_url: str) -> None:
    cloudwatch = backend(moto_url)
    await cloudwatch.start()
    try:
        cloudwatch.log_group = "g" * 600  # longer than CloudWatch allows: refused for good
        refused = await cloudwatch.send([event_at(time.time())])
        assert not refused[0].retryable
    finally:
        await cloudwatch.close()
    unreachable = CloudWatchBackend(
        "g", "s", region="us-east-1", endpoint_url="http://127.0.0.1:9", **CREDENTIALS
    )
    with pytest.raises(BackendStartError):
        await Worker(
            MemoryBus(),
            unreachable,
            WorkerSettings(service="cloudwatch", dead_letter_path=Path("unused")),
        ).async_run()


def test_rejected_log_events_info_maps_back_to_events() -> None:
    cloudwatch = CloudWatchBackend("g", "s", region="us-east-1")
    batch = [(i, 10 + i, "m") for i in range(6)]
    refused = cloudwatch._partial(
        batch,
        {"tooOldLogEventEndIndex": 1, "expiredLogEventEndIndex": 2, "tooNewLogEventStartIndex": 5},
    )
    assert sorted(refused) == [10, 11, 15]
    assert not any(r.retryable for r in refused.values())


def test_batches_respect_count_bytes_and_span() -> None:
    many = [(i, i, "x") for i in range(MAX_BATCH_EVENTS + 5)]
    assert [len(b) for b in batches(many)] == [MAX_BATCH_EVENTS, 5]

    big = "y" * (MAX_BATCH_BYTES // 4)
    sized = list(batches([(i, i, big) for i in range(5)]))
    assert [len(b) for b in sized] == [3, 2]
    assert all(
        sum(len(m.encode()) + EVENT_OVERHEAD for _, _, m in b) <= MAX_BATCH_BYTES for b in sized
    )

    spread = [(0, 0, "a"), (MAX_SPAN_MS, 1, "b"), (MAX_SPAN_MS + 1, 2, "c")]
    assert [len(b) for b in batches(spread)] == [2, 1]


def test_oversized_messages_are_cut_to_fit() -> None:
    huge = build(
        exchange(
            request={"model": "gpt-4o", "messages": [{"role": "user", "content": 'z"' * 400_000}]},
            response=b"{}",
            request_limit=4 << 20,
        )
    )
    text = message(huge, 256 * 1024)
    assert len(text.encode()) <= 256 * 1024
    cut = orjson.loads(text)
    assert cut["id"] == huge["id"] and cut["request"].endswith("…[truncated by llm-proxy]")
    assert cut["response"] == {}
    small_text = message(huge, 2000)
    assert len(small_text.encode()) <= 2000
    assert orjson.loads(small_text)["request"].endswith("…[truncated by llm-proxy]")
    tiny = orjson.loads(message(huge, 100))  # smaller than the event without bodies: bodies go
    assert tiny["request"] == tiny["response"] == "…[truncated by llm-proxy]"
    small = event_at(time.time())
    assert message(small, 256 * 1024) == orjson.dumps(small).decode()


def test_backoff_grows_and_is_capped() -> None:
    backoff = Backoff(base=1.0, cap=8.0)
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (4, 8.0), (40, 8.0)):
        delays = [backoff.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
