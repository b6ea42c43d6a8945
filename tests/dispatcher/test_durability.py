"""At-least-once delivery when processes die and when Redis goes away.

Figures (sent / delivered / duplicated) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from dispatcher.backends.file import FileBackend
from dispatcher.retry import Backoff
from dispatcher.worker import Worker, WorkerSettings
from llm_proxy.events import EventsConfig, start_event_pipeline
from llm_proxy.events.builder import build
from llm_proxy.events.redis import RedisBus
from tests.dispatcher.fakes import HELICONE_KEY, FakeHelicone
from tests.events.events_support import RedisServer, exchange

pytestmark = [pytest.mark.redis, pytest.mark.process]

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ROOT = Path(__file__).resolve().parents[2]


async def until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class StallingHelicone(FakeHelicone):
    """Accepts ``stall_after`` logs, then holds every further request open: a batch in flight."""

    def __init__(self, stall_after: int) -> None:
        super().__init__()
        self.stall_after = stall_after
        self.stalled = 0
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        if self.stall_after and len(self.logs) >= self.stall_after and not self.release.is_set():
            self.stalled += 1
            await self.release.wait()
            return web.json_response({"error": "gone"}, status=503)
        return await super().handle(request)


def run_dispatcher(
    data_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m dispatcher ARGS --data-dir DATA_DIR``, its output appended to ``log``."""
    command = [sys.executable, "-m", "dispatcher", *args, "--data-dir", str(data_dir)]
    with log.open("ab") as output:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)


def dispatcher_process(
    redis_url: str, helicone_url: str, data_dir: Path, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    return run_dispatcher(
        data_dir,
        log,
        "--service",
        "helicone",
        "--helicone-url",
        helicone_url,
        "--redis-url",
        redis_url,
        "--stream",
        "durable:events",
        "--batch-size",
        "50",
        "--batch-wait",
        "0.05",
        "--claim-idle",
        "1",
        *extra,
        env={**os.environ, "HELICONE_API_KEY": HELICONE_KEY},
    )


async def test_killing_a_dispatcher_mid_batch_loses_nothing(
    redis_server: RedisServer, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    total = 300
    fake = StallingHelicone(stall_after=120)
    server = await aiohttp_server(fake.app)
    url = str(server.make_url("/custom/v1/log"))
    sent = [
        build(exchange(request={"model": "gpt-4o", "n": i}, response=b"{}")) for i in range(total)
    ]
    bus = RedisBus(redis_server.url, stream="durable:events")
    await bus.publish(sent)
    await bus.close()

    first = dispatcher_process(redis_server.url, url, tmp_path, tmp_path / "first.log")
    try:
        await until(lambda: fake.stalled > 0, 30, "the first dispatcher to be mid-batch")
        await asyncio.sleep(0.2)  # let the rest of the batch's requests pile up
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(10)
    accepted_before_kill = len(fake.logs)
    fake.release.set()

    await asyncio.sleep(1.2)  # the dead consumer's entries must be idle longer than --claim-idle
    second = dispatcher_process(redis_server.url, url, tmp_path, tmp_path / "second.log", "--burst")
    try:
        code = await asyncio.wait_for(asyncio.to_thread(second.wait), 45)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(10)
    assert code == 0, (tmp_path / "second.log").read_text()

    delivered = Counter(log["providerRequest"]["meta"]["Helicone-Request-Id"] for log in fake.logs)
    duplicates = sum(delivered.values()) - len(delivered)
    print(
        f"\nkill mid-batch: sent={total} accepted_before_kill={accepted_before_kill} "
        f"deliveries={sum(delivered.values())} distinct={len(delivered)} duplicates={duplicates}"
    )
    assert set(delivered) == {e["id"] for e in sent}
    assert accepted_before_kill > 100  # two whole batches and part of the third
    assert duplicates == accepted_before_kill - 100  # exactly the unacknowledged part, redelivered
    second_log = (tmp_path / "second.log").read_bytes()
    assert b"events.redis_pending_reclaimed" in second_log
    assert b"redelivered=50" in second_log  # the whole unacknowledged batch, counted


async def test_redis_outage_while_traffic_flows_delays_but_loses_no_event(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    config = EventsConfig(
        bus="redis",
        redis_url=redis_server.url,
        data_dir=tmp_path,
        stream="outage:events",
        batch_size=16,
    )
    pipeline = await start_event_pipeline(config)
    consumer_bus = RedisBus(redis_server.url, stream="outage:events", claim_idle=1.0)
    log_path = tmp_path / "events.jsonl"
    worker = Worker(
        consumer_bus,
        FileBackend(log_path),
        WorkerSettings(
            service="file",
            dead_letter_path=tmp_path / "dead.jsonl",
            batch_wait=0.05,
            poll=0.2,
            backoff=Backoff(base=0.05, cap=0.5),
        ),
    )
    await worker.open()
    worker.start()

    def written() -> Counter[str]:
        data = log_path.read_bytes() if log_path.exists() else b""
        # Whole lines only: read while the dispatcher appends, the last one may still be arriving.
        whole = data[: data.rfind(b"\n") + 1]
        return Counter(orjson.loads(line)["request_id"] for line in whole.splitlines())

    sent: list[str] = []
    slowest_submit = 0.0

    async def traffic(count: int) -> None:
        nonlocal slowest_submit
        for i in range(count):
            ex = exchange(
                request={"model": "gpt-4o", "n": i}, response=b'{"usage": {"prompt_tokens": 1}}'
            )
            started = time.perf_counter()
            pipeline.submit(ex)
            slowest_submit = max(slowest_submit, time.perf_counter() - started)
            sent.append(ex.request_id)
            await asyncio.sleep(0.002)

    try:
        await traffic(100)
        await until(lambda: len(written()) == 100, 20, "events before the outage")

        outage = asyncio.create_task(traffic(200))
        await asyncio.sleep(0.05)
        redis_server.stop()
        await asyncio.sleep(0.5)
        assert pipeline.bus.spooling  # type: ignore[attr-defined]
        redis_server.start()  # back, but empty: no persistence
        await outage
        await traffic(50)

        await until(lambda: set(written()) == set(sent), 30, "every event after the outage")
    finally:
        await pipeline.close()
        await worker.drain()
        await consumer_bus.close()

    counts = written()
    duplicates = sum(counts.values()) - len(counts)
    print(
        f"\nredis outage: sent={len(sent)} written={sum(counts.values())} distinct={len(counts)} "
        f"duplicates={duplicates} slowest_submit_us={slowest_submit * 1e6:.1f}"
    )
    assert set(counts) == set(sent) and len(sent) == 350
    assert slowest_submit < 0.005
    assert not (tmp_path / "dead.jsonl").exists()


async def test_a_dead_letter_write_cut_short_by_a_full_disk_leaves_every_line_whole(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A full disk cuts a dead-letter write short: the events stay in hand and are written once
    there is room again, each on a whole line that replay reads back (the first was glued onto
    the torn bytes, an unreadable line that replay could only carry forward as text)."""
    events_file = tmp_path / "events.jsonl"
    dead_letter = tmp_path / "dead-letter.jsonl"
    log = tmp_path / "dispatcher.log"
    bus = RedisBus(redis_server.url, stream="durable:events")
    dispatcher = run_dispatcher(
        tmp_path,
        log,
        "--service",
        "file",
        "--path",
        str(events_file),
        "--max-attempts",
        "1",
        "--dead-letter",
        str(dead_letter),
        "--backoff-cap",
        "0.2",
        "--batch-size",
        "1",
        "--batch-wait",
        "0.01",
        "--redis-url",
        redis_server.url,
        "--stream",
        "durable:events",
    )
    sent = [build(exchange(request={"model": "gpt-4o", "n": i}, response=b"{}")) for i in range(5)]

    def lines() -> list[bytes]:
        return dead_letter.read_bytes().splitlines() if dead_letter.exists() else []

    try:
        await until(lambda: b"dispatcher.started" in log.read_bytes(), 15, "the dispatcher")
        events_file.unlink()
        events_file.mkdir()  # the file backend cannot write: every event is dead-lettered
        await bus.publish(sent[:1])
        await until(lambda: len(lines()) == 1, 15, "the first event to be dead-lettered")
        line = dead_letter.stat().st_size
        limits = resource.prlimit(dispatcher.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(dispatcher.pid, resource.RLIMIT_FSIZE, (line + line // 2, limits[1]))
        await bus.publish(sent[1:2])  # half of its line fits
        await until(lambda: b"dispatcher.dead_letter_failed" in log.read_bytes(), 15, "a failure")
        resource.prlimit(dispatcher.pid, resource.RLIMIT_FSIZE, limits)
        await bus.publish(sent[2:])
        await until(lambda: dead_letter.read_bytes().count(b"\n") >= 5, 15, "five dead letters")
    finally:
        await bus.close()
        dispatcher.send_signal(signal.SIGTERM)
        dispatcher.wait(15)

    kept, torn = [], []
    for text in lines():
        try:
            kept.append(orjson.loads(text)["event"]["id"])
        except orjson.JSONDecodeError:
            torn.append(text)
    assert not torn
    assert sorted(kept) == sorted(e["id"] for e in sent)


def file_dispatcher(
    redis_url: str, path: Path, data_dir: Path, log: Path
) -> subprocess.Popen[bytes]:
    return run_dispatcher(
        data_dir,
        log,
        "--service",
        "file",
        "--path",
        str(path),
        "--redis-url",
        redis_url,
        "--stream",
        "crashes:events",
        "--batch-wait",
        "0.05",
        "--claim-idle",
        "1",
    )


async def test_dispatchers_that_died_do_not_stay_in_their_consumer_group_for_good(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Every start joins the group under a new name, and a killed one never leaves it: without
    the live readers forgetting them, a group kept one consumer per crash (OOM kills, lost
    nodes, a rollout's SIGKILL after its grace period) for as long as Redis lives."""
    events_file = tmp_path / "events.jsonl"
    bus = RedisBus(redis_server.url, stream="crashes:events")

    def written() -> int:
        return events_file.read_bytes().count(b"\n") if events_file.exists() else 0

    async def consumers() -> list[bytes]:
        return [c["name"] for c in await bus.client.xinfo_consumers("crashes:events", "file")]

    async def one_event_through() -> None:
        before = written()
        await bus.publish([build(exchange(request={"n": before}, response=b"{}"))])
        await until(lambda: written() > before, 30, "the dispatcher to write the event")
        while (await bus.client.xpending("crashes:events", "file"))["pending"]:
            await asyncio.sleep(0.02)  # and to acknowledge it

    live: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(3):
            crashed = file_dispatcher(redis_server.url, events_file, tmp_path, tmp_path / "d.log")
            try:
                await one_event_through()
            finally:
                crashed.send_signal(signal.SIGKILL)
                crashed.wait(10)
        assert len(await consumers()) == 3  # each left its name, holding nothing

        live = file_dispatcher(redis_server.url, events_file, tmp_path, tmp_path / "live.log")
        await one_event_through()
        names = await consumers()
        deadline = time.monotonic() + 45  # idle for ten --claim-idle periods, then a claim pass
        while len(names) > 1:
            assert time.monotonic() < deadline, f"consumers never forgotten: {names}"
            await asyncio.sleep(0.2)
            names = await consumers()
        assert names[0].startswith(socket.gethostname().encode())
        await one_event_through()  # the live one still reads, under its own name
        assert await consumers() == names
        assert b"events.redis_dead_consumers_forgotten" in (tmp_path / "live.log").read_bytes()
    finally:
        if live is not None:
            live.send_signal(signal.SIGTERM)
            live.wait(15)
        await bus.close()
