from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import pytest
import structlog
from prometheus_client import REGISTRY
from redis.exceptions import RedisError, ResponseError

from dispatcher import health
from dispatcher.backends import BackendError, Rejection
from dispatcher.embedded import start_file_event_log
from dispatcher.exit_codes import Exit
from dispatcher.handback import RedisHandback
from dispatcher.retry import Backoff
from dispatcher.worker import AuthFailed, BackendStartError, Worker, WorkerSettings
from llm_proxy.events import EventsConfig, start_event_pipeline
from llm_proxy.events.builder import build
from llm_proxy.events.event import Event, rfc3339
from llm_proxy.events.memory import MemoryBus
from llm_proxy.events.redis import RedisBus
from tests.events.events_support import RedisServer, exchange, free_port

FAST = Backoff(base=0.01, cap=0.04)


class RecordingBackend:
    """A backend double: records batches; ``refuse`` decides per event and attempt."""

    name = "recording"

    def __init__(self, refuse: Callable[[Event, int], Rejection | None] | None = None) -> None:
        self.refuse = refuse or (lambda event, attempt: None)
        self.batches: list[list[Event]] = []
        self.attempts: dict[str, int] = {}
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
        self.batches.append(list(events))
        refused = {}
        for i, event in enumerate(events):
            attempt = self.attempts[event["id"]] = self.attempts.get(event["id"], 0) + 1
            rejection = self.refuse(event, attempt)
            if rejection is not None:
                refused[i] = rejection
        return refused

    async def close(self) -> None:
        self.closed = True

    @property
    def accepted(self) -> list[str]:
        return [e["id"] for batch in self.batches for e in batch if self.refuse(e, 10**6) is None]


def settings(tmp_path: Path, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "service": "recording",
        "dead_letter_path": tmp_path / "dead.jsonl",
        "batch_wait": 0.05,
        "poll": 0.05,
        "backoff": FAST,
        "burst": True,
    }
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


def events(n: int) -> list[Event]:
    return [build(exchange(request={"n": i}, response=b"")) for i in range(n)]


def dead_letters(tmp_path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in (tmp_path / "dead.jsonl").read_bytes().splitlines()]


async def test_batches_by_size(tmp_path: Path) -> None:
    bus = MemoryBus()
    backend = RecordingBackend()
    worker = Worker(bus, backend, settings(tmp_path, batch_size=100))
    worker.start()
    sent = events(250)
    await bus.publish(sent)
    summary = await worker.async_run()
    assert [len(b) for b in backend.batches] == [100, 100, 50]
    assert [e for b in backend.batches for e in b] == sent
    assert summary.delivered == 250 and summary.batches == 3
    assert backend.started and backend.closed
    assert worker.outcome() == Exit.OK


async def test_batches_by_time(tmp_path: Path) -> None:
    bus = MemoryBus()
    backend = RecordingBackend()
    worker = Worker(bus, backend, settings(tmp_path, batch_wait=0.3, poll=0.5))
    task = worker.start()
    await bus.publish(events(3))
    await asyncio.sleep(0.1)
    await bus.publish(events(2))  # within batch_wait of the first: same batch
    await asyncio.sleep(0.5)
    await bus.publish(events(1))  # later: its own batch
    await task
    assert [len(b) for b in backend.batches] == [5, 1]


async def test_retryable_failures_are_retried_until_accepted(tmp_path: Path) -> None:
    def refuse(event: Event, attempt: int) -> Rejection | None:
        return Rejection("HTTP 503", retryable=True) if attempt < 3 else None

    bus = MemoryBus()
    backend = RecordingBackend(refuse)
    worker = Worker(bus, backend, settings(tmp_path))
    worker.start()
    await bus.publish(events(4))
    summary = await worker.async_run()
    assert summary.delivered == 4 and summary.retried == 8 and summary.dead_lettered == 0
    assert all(count == 3 for count in backend.attempts.values())


async def test_permanent_failures_go_to_the_dead_letter_file(tmp_path: Path) -> None:
    sent = events(3)

    def refuse(event: Event, attempt: int) -> Rejection | None:
        return Rejection("HTTP 400: bad", retryable=False) if event is sent[1] else None

    bus = MemoryBus()
    backend = RecordingBackend(refuse)
    worker = Worker(bus, backend, settings(tmp_path))
    worker.start()
    await bus.publish(sent)
    summary = await worker.async_run()
    assert summary.delivered == 2 and summary.dead_lettered == 1
    [line] = dead_letters(tmp_path)
    assert line["backend"] == "recording" and line["reason"] == "HTTP 400: bad"
    assert line["event"] == sent[1]
    assert len(backend.batches) == 1  # not retried
    assert worker.outcome() == Exit.DEAD_LETTERED  # a burst run that dead-lettered did not succeed


async def test_retries_stop_at_max_attempts(tmp_path: Path) -> None:
    bus = MemoryBus()
    backend = RecordingBackend(lambda event, attempt: Rejection("HTTP 429", retryable=True))
    worker = Worker(bus, backend, settings(tmp_path, max_attempts=3))
    worker.start()
    await bus.publish(events(2))
    summary = await worker.async_run()
    assert summary.dead_lettered == 2 and len(backend.batches) == 3
    assert {line["reason"] for line in dead_letters(tmp_path)} == {
        "gave up after 3 attempts: HTTP 429"
    }


class RaisingBackend(RecordingBackend):
    def __init__(self, errors: list[Exception]) -> None:
        super().__init__()
        self.errors = errors

    async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
        if self.errors:
            raise self.errors.pop(0)
        return await super().send(events)


async def test_batch_errors_and_unexpected_exceptions_are_retried(tmp_path: Path) -> None:
    bus = MemoryBus()
    backend = RaisingBackend([BackendError("timeout", retryable=True), RuntimeError("bug")])
    worker = Worker(bus, backend, settings(tmp_path))
    worker.start()
    sent = events(2)
    await bus.publish(sent)
    summary = await worker.async_run()
    # The timeout retries both; the bug is met by sending the batch in halves, which go through.
    assert summary.delivered == 2 and summary.retried == 2
    assert backend.batches == [sent[:1], sent[1:]]


async def test_a_worker_whose_run_ended_by_itself_closes_without_error(tmp_path: Path) -> None:
    """A burst run that ended idle (or a run that ended on refused credentials) is closed like any
    other: close() found its drain deadline finished and raised, which left an events process
    with its store open, kept alive by the store's thread."""
    bus = MemoryBus()
    backend = RecordingBackend()
    worker = Worker(bus, backend, settings(tmp_path, burst=True))
    worker.start()
    await bus.publish(events(2))
    summary = await worker.async_run()
    assert summary.delivered == 2
    await worker.close()
    assert summary.delivered == 2 and backend.closed


async def test_whole_batch_permanent_error_dead_letters_it(tmp_path: Path) -> None:
    bus = MemoryBus()
    worker = Worker(
        bus, RaisingBackend([BackendError("HTTP 400", retryable=False)]), settings(tmp_path)
    )
    worker.start()
    await bus.publish(events(2))
    assert (await worker.async_run()).dead_lettered == 2


async def test_sigterm_stops_gracefully_with_a_summary(tmp_path: Path) -> None:
    bus = MemoryBus()
    backend = RecordingBackend()
    worker = Worker(bus, backend, settings(tmp_path, burst=False))
    serving = asyncio.create_task(worker.serve())
    await asyncio.sleep(0.05)
    await bus.publish(events(3))
    await asyncio.sleep(0.2)
    with structlog.testing.capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 5) == 0
    stopped = [entry for entry in logs if entry["event"] == "dispatcher.stopped"]
    assert stopped and stopped[0]["delivered"] == 3 and stopped[0]["drain_timed_out"] is False


async def test_drain_timeout_dead_letters_what_the_memory_bus_cannot_redeliver(
    tmp_path: Path,
) -> None:
    bus = MemoryBus()
    backend = RecordingBackend(lambda event, attempt: Rejection("HTTP 503", retryable=True))
    worker = Worker(bus, backend, settings(tmp_path, burst=False, drain_timeout=0.3))
    worker.start()
    await bus.publish(events(2))
    await asyncio.sleep(0.1)
    summary = await worker.drain()
    assert summary.dead_lettered == 2
    assert {line["reason"] for line in dead_letters(tmp_path)} == {"not delivered before shutdown"}


async def test_at_a_stop_the_memory_bus_events_still_queued_are_dead_lettered_too(
    tmp_path: Path,
) -> None:
    bus = MemoryBus()
    backend = RecordingBackend(lambda event, attempt: Rejection("HTTP 503", retryable=True))
    worker = Worker(bus, backend, settings(tmp_path, burst=False, drain_timeout=0.3, batch_size=2))
    worker.start()
    sent = events(10)
    await bus.publish(sent)  # two in hand, retried until the stop; eight queued behind them
    await asyncio.sleep(0.1)
    summary = await worker.drain()
    assert summary.dead_lettered == 10
    assert [line["event"] for line in dead_letters(tmp_path)] == sent


async def test_at_a_stop_events_that_cannot_be_dead_lettered_either_are_counted_as_dropped(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("")  # the dead-letter file cannot be created below it
    dropped = "llm_proxy_events_dropped_total"
    before = REGISTRY.get_sample_value(dropped, {"reason": "undelivered_at_stop"}) or 0.0
    bus = MemoryBus()
    backend = RecordingBackend(lambda event, attempt: Rejection("HTTP 503", retryable=True))
    options = {"dead_letter_path": tmp_path / "file" / "dead.jsonl", "batch_size": 2}
    worker = Worker(bus, backend, settings(tmp_path, burst=False, drain_timeout=0.3, **options))
    worker.start()
    await bus.publish(events(10))
    await asyncio.sleep(0.1)
    await worker.drain()
    after = REGISTRY.get_sample_value(dropped, {"reason": "undelivered_at_stop"})
    assert after == before + 10


async def test_a_backend_that_cannot_start_fails_the_worker(tmp_path: Path) -> None:
    class Broken(RecordingBackend):
        async def start(self) -> None:
            raise PermissionError("read-only file system")

    worker = Worker(MemoryBus(), Broken(), settings(tmp_path))
    with pytest.raises(BackendStartError, match="read-only"):
        await worker.async_run()
    assert await Worker(MemoryBus(), Broken(), settings(tmp_path)).serve() == 1


@pytest.mark.redis
async def test_heartbeat_is_visible_to_check_while_running(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    bus = RedisBus(redis_server.url, stream="t:events")
    heartbeat = health.RedisHeartbeat(bus.client, "t:events", "recording", ttl=5)
    worker = Worker(
        bus,
        RecordingBackend(),
        settings(tmp_path, burst=False, heartbeat_interval=0.05),
        heartbeat=heartbeat,
    )
    try:
        worker.start()
        await bus.publish(events(2))
        status = None
        for _ in range(100):
            status = await health.check(bus.client, "t:events", "recording", max_age=5)
            if "delivered=2" in status.line:
                break
            await asyncio.sleep(0.05)
        assert status is not None and status.state == "alive"
        assert "delivered=2" in status.line and "backlog 0 waiting, 0 pending" in status.line
        worker.stop()
        await worker.async_run()
        gone = await health.check(bus.client, "t:events", "recording", max_age=5)
        assert gone.state == "absent" and "no dispatcher running for recording" in gone.line
        await heartbeat.beat({"delivered": 0})
        stale = await health.check(bus.client, "t:events", "recording", max_age=-1)
        assert stale.state == "lagging" and "last heartbeat" in stale.line
    finally:
        await bus.close()
    redis_server.stop()
    down = RedisBus(redis_server.url)
    with pytest.raises(RedisError):
        await health.check(down.client, "t:events", "recording", max_age=5)
    await down.close()


@pytest.mark.redis
async def test_a_stopped_dispatcher_is_absent_whenever_its_stop_comes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """However a stop falls against the heartbeat (here beating without pause, so it falls in the
    middle of one), `dispatcher check` finds no dispatcher once it stopped: a beat cut short still
    reached Redis, and was left there to say "alive" for its whole ttl."""
    bus = RedisBus(redis_server.url, stream="t:events")
    try:
        for _ in range(20):
            heartbeat = health.RedisHeartbeat(bus.client, "t:events", "recording", ttl=30)
            worker = Worker(
                bus,
                RecordingBackend(),
                settings(tmp_path, burst=False, heartbeat_interval=0),
                heartbeat=heartbeat,
            )
            worker.start()
            running = asyncio.create_task(worker.async_run())
            await asyncio.sleep(0.02)
            worker.stop()
            await running
            gone = await health.check(bus.client, "t:events", "recording", max_age=30)
            assert gone.state == "absent", gone.line
    finally:
        await bus.close()


@pytest.mark.redis
async def test_a_burst_run_that_finds_events_trimmed_unread_does_not_succeed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    publisher = await RedisBus.open(redis_server.url, stream="t:events", maxlen=10)
    bus = RedisBus(redis_server.url, stream="t:events")
    try:
        first = Worker(bus, RecordingBackend(), settings(tmp_path))
        await first.async_run()  # the group exists; then its service is down for a while
        await publisher.publish(events(30))
        await publisher.trim()
        backend = RecordingBackend()
        worker = Worker(bus, backend, settings(tmp_path))
        summary = await worker.async_run()
        assert summary.delivered == 10
        assert worker.outcome() == Exit.EVENTS_LOST
    finally:
        await publisher.close()
        await bus.close()


async def test_file_event_log_runs_in_process_and_drains_on_close(tmp_path: Path) -> None:
    pipeline = await start_event_pipeline(EventsConfig(bus="memory", data_dir=tmp_path))
    log_path = tmp_path / "events.jsonl"
    await start_file_event_log(pipeline, log_path, data_dir=tmp_path)
    sent = [exchange(request={"model": "gpt-4o", "n": i}, response=b"{}") for i in range(50)]
    for ex in sent:
        pipeline.submit(ex)
    await pipeline.close()
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [line["request_id"] for line in lines] == [ex.request_id for ex in sent]


async def test_file_event_log_refuses_an_unwritable_path(tmp_path: Path) -> None:
    pipeline = await start_event_pipeline(EventsConfig(bus="memory", data_dir=tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BackendStartError):
        await start_file_event_log(pipeline, blocker / "events.jsonl", data_dir=tmp_path)
    await pipeline.close()


# -- refused credentials, an unreachable bus ----------------------------------------------------

AUTH = Rejection("HTTP 401", retryable=False, auth=True)


@pytest.mark.redis
async def test_refused_credentials_stop_the_worker_and_leave_the_events_for_the_next_one(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    sent = events(7)
    bus = RedisBus(redis_server.url, stream="auth:events")
    await bus.publish(sent)
    # The first batch goes through; then the key is revoked.
    refusing = RecordingBackend(lambda event, attempt: AUTH if event not in sent[:3] else None)
    worker = Worker(
        bus,
        refusing,
        settings(tmp_path, burst=False, batch_size=3),
        handback=RedisHandback(bus.client, "auth:events"),
    )
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(worker.serve(), 10) == Exit.AUTH
    [line] = [entry for entry in logs if entry["log_level"] == "error"]
    assert line["event"] == "dispatcher.auth_failed"
    assert line["service"] == "recording" and line["status"] == "HTTP 401"
    assert line["unacknowledged"] == 3 and "credentials" in line["action"]
    assert worker.summary.delivered == 3 and worker.summary.dead_lettered == 0
    assert not (tmp_path / "dead.jsonl").exists()
    pending = await bus.client.xpending("auth:events", "recording")
    assert pending["pending"] == 3  # read, not acknowledged; the last one was never read

    # A restart with the right key gets them at once, though --claim-idle is a minute.
    fixed = RecordingBackend()
    restarted = Worker(
        RedisBus(redis_server.url, stream="auth:events", claim_idle=60), fixed, settings(tmp_path)
    )
    summary = await asyncio.wait_for(restarted.async_run(), 10)
    await restarted.bus.close()  # type: ignore[attr-defined]
    assert sorted(fixed.accepted) == sorted(e["id"] for e in sent[3:])
    assert summary.redelivered == 3 and restarted.outcome() == Exit.OK
    assert (await bus.client.xpending("auth:events", "recording"))["pending"] == 0
    await bus.close()


async def test_refused_credentials_on_the_memory_bus_dead_letter_what_was_in_hand(
    tmp_path: Path,
) -> None:
    bus = MemoryBus()
    worker = Worker(bus, RecordingBackend(lambda event, attempt: AUTH), settings(tmp_path))
    worker.start()
    await bus.publish(events(2))
    with pytest.raises(AuthFailed, match=r"recording refused the credentials \(HTTP 401\)"):
        await worker.async_run()
    # Nothing would ever redeliver them: kept where an operator finds them.
    assert {line["reason"] for line in dead_letters(tmp_path)} == {"credentials refused (HTTP 401)"}


async def test_credentials_refused_at_start_exit_5(tmp_path: Path) -> None:
    class Refused(RecordingBackend):
        async def start(self) -> None:
            raise BackendError("UnrecognizedClientException (HTTP 400)", retryable=False, auth=True)

    worker = Worker(MemoryBus(), Refused(), settings(tmp_path))
    with pytest.raises(AuthFailed) as raised:
        await worker.async_run()
    assert raised.value.answer == "UnrecognizedClientException (HTTP 400)"
    assert raised.value.unacknowledged == 0
    with structlog.testing.capture_logs() as logs:
        assert await Worker(MemoryBus(), Refused(), settings(tmp_path)).serve() == Exit.AUTH
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["dispatcher.auth_failed"]


async def test_a_burst_run_against_an_unreachable_redis_exits_3(tmp_path: Path) -> None:
    bus = RedisBus(f"redis://127.0.0.1:{free_port()}/0", stream="down:events")
    worker = Worker(bus, RecordingBackend(), settings(tmp_path))
    try:
        assert await asyncio.wait_for(worker.serve(), 10) == Exit.BUS_UNAVAILABLE
    finally:
        await bus.close()


@pytest.mark.redis
async def test_a_burst_run_that_cannot_acknowledge_gives_up_with_exit_3(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    class RedisDiesMidBatch(RecordingBackend):
        async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
            redis_server.stop()
            return await super().send(events)

    bus = RedisBus(redis_server.url, stream="ackless:events")
    await bus.publish(events(2))
    backend = RedisDiesMidBatch()
    worker = Worker(bus, backend, settings(tmp_path))
    try:
        assert await asyncio.wait_for(worker.serve(), 10) == Exit.BUS_UNAVAILABLE
    finally:
        await bus.close()
    assert (
        len(backend.accepted) == 2
    )  # delivered; left pending, so redelivered later (at least once)


@pytest.mark.redis
async def test_events_left_when_redis_is_gone_are_still_claimed_after_claim_idle(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    class RevokedWhileRedisDies(RecordingBackend):
        async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
            redis_server.stop()
            return dict.fromkeys(range(len(events)), AUTH)

    bus = RedisBus(redis_server.url, stream="gone:events")
    await bus.publish(events(2))
    worker = Worker(
        bus,
        RevokedWhileRedisDies(),
        settings(tmp_path),
        handback=RedisHandback(bus.client, "gone:events"),
    )
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(worker.serve(), 10) == Exit.AUTH
    await bus.close()
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert "dispatcher.handback_failed" in warnings
    assert "dispatcher.unacked_left_for_redelivery" in warnings


async def test_the_lag_of_every_accepted_event_is_in_the_histogram(tmp_path: Path) -> None:
    def sample(suffix: str, le: str | None = None) -> float:
        labels = {"backend": "recording"} | ({"le": le} if le else {})
        value = REGISTRY.get_sample_value(f"llm_proxy_dispatcher_lag_seconds_{suffix}", labels)
        return value or 0.0

    keys: list[tuple[str, str | None]] = [("count", None), ("bucket", "10.0"), ("bucket", "30.0")]
    before = {key: sample(*key) for key in keys}
    before_sum = sample("sum")
    bus = MemoryBus()
    # Three requests that ended 20 s ago and two just now; one of the old ones is refused.
    sent = events(5)
    for event in sent[:3]:
        event["timestamp"] = rfc3339(time.time() - 20)
    refused_id = sent[0]["id"]
    backend = RecordingBackend(
        lambda event, attempt: (
            Rejection("no", retryable=False) if event["id"] == refused_id else None
        )
    )
    worker = Worker(bus, backend, settings(tmp_path))
    worker.start()
    await bus.publish(sent)
    await worker.async_run()

    def added(suffix: str, le: str | None = None) -> float:
        return sample(suffix, le) - before[suffix, le]

    assert added("count") == 4  # accepted only
    assert added("bucket", "10.0") == 2  # the recent two
    assert added("bucket", "30.0") == 4  # cumulative: and the two old ones
    assert 40 <= sample("sum") - before_sum < 45


@pytest.mark.redis
async def test_a_dispatcher_still_delivering_keeps_its_events_from_another(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """SPEC §8 reclaims a dead consumer's pending entries; one that is alive and slow (a backend
    answering in 2 s, or retries for minutes) keeps them, so no event is delivered twice."""

    class SlowBackend(RecordingBackend):
        async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
            await asyncio.sleep(2.0)  # beyond claim_idle, many times over
            return await super().send(events)

    stream = "kept:events"
    first_bus = RedisBus(redis_server.url, stream=stream, claim_idle=0.3)
    second_bus = RedisBus(redis_server.url, stream=stream, claim_idle=0.3)
    await first_bus.publish(events(4))
    slow, quick = SlowBackend(), RecordingBackend()
    first = Worker(first_bus, slow, settings(tmp_path, burst=False))
    second = Worker(second_bus, quick, settings(tmp_path, burst=False))
    try:
        first.start()
        for _ in range(100):  # until the first has read them all: pending, in its hands
            with contextlib.suppress(ResponseError):  # (no group until it first reads)
                if (await first_bus.client.xpending(stream, "recording"))["pending"] == 4:
                    break
            await asyncio.sleep(0.01)
        second.start()
        await asyncio.sleep(2.5)
        first.stop()
        second.stop()
        await first.async_run()
        await second.async_run()
    finally:
        await first_bus.close()
        await second_bus.close()
    assert len(slow.accepted) == 4
    assert quick.accepted == []  # taken over before: all four delivered twice


@pytest.mark.redis
async def test_a_replica_stopping_leaves_the_others_heartbeat(redis_server: RedisServer) -> None:
    """Two dispatchers of one service share its heartbeat key: the one that stops clears it only
    if it still holds its own beat, so `dispatcher check` does not say none runs."""
    bus = RedisBus(redis_server.url, stream="t:events")
    first = health.RedisHeartbeat(bus.client, "t:events", "file", ttl=5)
    second = health.RedisHeartbeat(bus.client, "t:events", "file", ttl=5)
    try:
        await first.beat({"delivered": 1})
        await second.beat({"delivered": 2})
        await first.clear()
        alive = await health.check(bus.client, "t:events", "file", max_age=5)
        assert alive.state == "alive" and "delivered=2" in alive.line
        await second.clear()
        gone = await health.check(bus.client, "t:events", "file", max_age=5)
        assert gone.state == "absent"
    finally:
        await bus.close()
