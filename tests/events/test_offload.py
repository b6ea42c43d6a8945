"""The events process (the default): the server ships exchanges, the events process does the rest.

Every test drives the real server with ``event_build_in="process"``, which starts a real
``python -m llm_proxy.runtime.events_process`` beside it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from llm_proxy.events.offload import EventOffload, EventProcessError
from llm_proxy.events.pipe import Launch, frame
from llm_proxy.proxy.settling import SETTLE_WAIT_SECONDS
from llm_proxy.runtime.app import EVENTS_PROCESS, create_app, events_config
from llm_proxy.store.opening import open_store
from tests.conftest import Proxy, make_settings, start_proxy
from tests.events.events_support import RedisServer, exchange
from tests.fakes import UPSTREAM_LOG
from tests.waiting import wait_for_lines

pytestmark = pytest.mark.process

SHED = "llm_proxy_events_request_bodies_shed_total"
DROPPED, BACKLOG = "llm_proxy_events_dropped_total", {"reason": "events_process_backlog"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


async def chat(
    proxy: Proxy, token: str, count: int, body: dict[str, Any] | None = None
) -> list[str]:
    """Send ``count`` chat completions; the request ids the proxy answered with."""
    ids = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.post(
                f"{proxy.base_url}/v1/chat/completions",
                json=body or CHAT,
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                assert response.status == 200
                ids.append(response.headers["LLM-Proxy-Request-ID"])
    return ids


async def scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with proxy.operator.get(f"{proxy.base_url}/metrics") as response:
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} appears twice on /metrics"
            samples[key] = sample.value
    return samples


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def offload_of(proxy: Proxy) -> EventOffload:
    offload = proxy.components.offload
    assert isinstance(offload, EventOffload)
    return offload


def events_pid(proxy: Proxy) -> int:
    process = offload_of(proxy)._process
    assert process is not None
    return process.pid


async def test_events_usage_and_metrics_come_from_the_events_process(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log, event_build_in="process")
    assert proxy.components.pipeline is None  # nothing of the pipeline runs in the server
    assert events_pid(proxy) != os.getpid()
    published_key = ("llm_proxy_events_published_total", (("bus", "memory"),))
    delivered_key = ("llm_proxy_dispatcher_delivered_total", (("backend", "file"),))
    # This test process's own pipelines (other tests) counted too: the page shows the sum.
    before = await scrape(proxy)
    issued = await proxy.issue_token()
    ids = await chat(proxy, issued["token"], 12)

    events = await wait_for_lines(log, 12)
    assert [event["request_id"] for event in events] == ids
    assert all(event["usage"]["source"] == "upstream" for event in events)

    async def usage_counted() -> bool:
        _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
        return bool(token["usage"]["requests"] == 12)

    await eventually(usage_counted)

    async def metrics_merged() -> bool:
        samples = await scrape(proxy)
        return all(
            samples.get(key, 0) == before.get(key, 0) + 12 for key in (published_key, delivered_key)
        )

    await eventually(metrics_merged)
    samples = await scrape(proxy)
    # The server's own families are still there, next to the merged ones.
    chat_ok = (("endpoint", "/v1/chat/completions"), ("status_class", "2xx"))
    assert samples[("llm_proxy_requests_total", chat_ok)] >= 12


async def test_a_stopped_events_process_shows_as_a_backlog_and_loses_nothing(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log, event_build_in="process")
    backlog_key = ("llm_proxy_events_backlog_bytes", ())
    assert (await scrape(proxy))[backlog_key] == 0
    issued = await proxy.issue_token()
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "x" * 50_000}]}
    pid = events_pid(proxy)
    os.kill(pid, signal.SIGSTOP)  # it reads nothing: what the server sends waits
    try:
        # 600 KB of captured bodies: more than a pipe holds.
        ids = await chat(proxy, issued["token"], 12, long_chat)

        async def backlog_shows() -> bool:
            return (await scrape(proxy))[backlog_key] > 100_000

        await eventually(backlog_shows)
    finally:
        os.kill(pid, signal.SIGCONT)

    events = await wait_for_lines(log, 12)
    assert [event["request_id"] for event in events] == ids

    async def backlog_gone() -> bool:
        return (await scrape(proxy))[backlog_key] == 0

    await eventually(backlog_gone)
    assert offload_of(proxy).dropped == 0


async def test_closing_the_server_drains_every_event(tmp_path: Path, upstream_server: Any) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await _start(tmp_path, upstream_server, file_event_log=log)
    try:
        issued = await proxy.issue_token()
        ids = await chat(proxy, issued["token"], 30)
    finally:
        await proxy.operator.close()
        await proxy.client.close()  # at once: events are still queued in the server
    assert [event["request_id"] for event in await wait_for_lines(log, 30, timeout=0)] == ids


async def test_an_events_process_killed_while_the_server_closes_has_its_loss_counted(
    tmp_path: Path, upstream_server: Any
) -> None:
    """The server stops (SIGTERM) and its events process, draining, is killed (the OOM killer, an
    operator): the exchanges it had not finished are lost, and the shutdown's count says so."""
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await _start(tmp_path, upstream_server, file_event_log=log)
    offload = offload_of(proxy)
    first = events_pid(proxy)
    try:
        token = await proxy.token()
        os.kill(first, signal.SIGSTOP)  # it reads nothing more...
        await chat(proxy, token, 3)  # ...of these
    finally:
        await proxy.operator.close()
    closing = asyncio.ensure_future(proxy.client.close())
    await asyncio.sleep(0.5)  # the server waits for it to drain
    assert not closing.done()
    os.kill(first, signal.SIGKILL)
    with structlog.testing.capture_logs() as logs:
        await closing
    assert offload.dropped == 3
    closed = next(e for e in logs if e["event"] == "events.offload_closed")
    assert closed["dropped"] == 3


async def test_a_killed_events_process_is_replaced_and_its_loss_counted(
    proxy_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log, event_build_in="process")
    offload = offload_of(proxy)
    token = await proxy.token()
    await chat(proxy, token, 3)
    await wait_for_lines(log, 3)

    async def reported_all_done() -> bool:
        return offload._status.get("done") == 3

    await eventually(reported_all_done)
    died_key = ("llm_proxy_events_dropped_total", (("reason", "events_process_died"),))
    published_key = ("llm_proxy_events_published_total", (("bus", "memory"),))
    before = await scrape(proxy)
    died_before = before.get(died_key, 0)
    # (The test process's own registry adds what earlier in-process pipelines published.)
    published_before = before[published_key]
    first = events_pid(proxy)
    os.kill(first, signal.SIGSTOP)  # it can no longer read, build or report...
    lost = await chat(proxy, token, 4)  # ...so these four are sent to it and never become events
    await asyncio.sleep(0.3)  # longer than the batch linger: they are on its input now
    os.kill(first, signal.SIGKILL)

    async def replaced() -> bool:
        return offload.restarts == 1 and offload.bus_reachable()

    await eventually(replaced)
    assert events_pid(proxy) != first
    kept = await chat(proxy, token, 2)
    events = await wait_for_lines(log, 5)
    got = [event["request_id"] for event in events]
    assert got[3:] == kept and not set(lost) & set(got)

    async def loss_counted() -> bool:
        samples = await scrape(proxy)
        return samples.get(died_key, 0) == died_before + 4

    await eventually(loss_counted)

    # The new events process counts from zero; the page goes on from what the old one reported,
    # as Prometheus would read a drop as the counter starting again.
    async def published_goes_on() -> bool:
        return (await scrape(proxy)).get(published_key) == published_before + 2

    await eventually(published_goes_on)


async def test_events_its_file_log_had_not_written_when_the_events_process_died_are_counted(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """On the memory bus an event published is not yet written: the events process's file log
    holds it until the file takes it. Killed then (the OOM killer), those events are lost and must
    be counted as such, not taken for done because they reached the in-process bus."""
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log, event_build_in="process")
    token = await proxy.token()
    await chat(proxy, token, 1)
    await wait_for_lines(log, 1)
    # The log can no longer be written: a directory where the file was (root writes anywhere).
    log.unlink()
    log.mkdir()
    died_key = (DROPPED, (("reason", "events_process_died"),))
    published_key = ("llm_proxy_events_published_total", (("bus", "memory"),))
    retried_key = (
        "llm_proxy_dispatcher_failures_total",
        (("backend", "file"), ("kind", "retryable")),
    )
    before = await scrape(proxy)
    await chat(proxy, token, 3)

    async def published_and_retried() -> bool:
        samples = await scrape(proxy)
        published = samples.get(published_key, 0) - before.get(published_key, 0)
        return published >= 3 and samples.get(retried_key, 0) > before.get(retried_key, 0)

    await eventually(published_and_retried)
    first = events_pid(proxy)
    os.kill(first, signal.SIGKILL)
    log.rmdir()  # the next events process can open the log again

    async def loss_counted() -> bool:
        return (await scrape(proxy)).get(died_key, 0) == before.get(died_key, 0) + 3

    await eventually(loss_counted)
    offload = offload_of(proxy)

    async def replaced() -> bool:
        return offload.restarts == 1 and offload.bus_reachable()

    await eventually(replaced)
    kept = await chat(proxy, token, 2)
    assert [event["request_id"] for event in await wait_for_lines(log, 2)] == kept
    assert (await scrape(proxy)).get(died_key, 0) == before.get(died_key, 0) + 3


async def test_a_stalled_events_process_delays_a_limited_token_by_the_bound_only(
    proxy_factory: Any,
) -> None:
    """The next request of a token with a tpm window waits for its last answer to settle, up to
    SETTLE_WAIT_SECONDS; an unlimited token's never waits; a dead events process is not waited for."""
    proxy: Proxy = await proxy_factory(event_build_in="process")
    issued, unlimited = await proxy.issue_token(tpm=1_000_000), await proxy.token()
    limited = issued["token"]
    timed_out = ("llm_proxy_settlement_waits_total", (("outcome", "timed_out"),))
    before = (await scrape(proxy)).get(timed_out, 0)
    await chat(proxy, limited, 2)  # settled in time: no wait runs out

    async def all_settled() -> bool:
        return not proxy.components.authority.settlements.unsettled(issued["id"])

    await eventually(all_settled)
    first = events_pid(proxy)
    os.kill(first, signal.SIGSTOP)
    try:
        await chat(proxy, limited, 1)  # its settlement cannot come while the process is stopped
        started = time.monotonic()
        await chat(proxy, unlimited, 1)
        assert time.monotonic() - started < 0.5
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                started = time.monotonic()
                await chat(proxy, limited, 1)
                waited = time.monotonic() - started
                assert SETTLE_WAIT_SECONDS <= waited < SETTLE_WAIT_SECONDS + 0.5
    finally:
        os.kill(first, signal.SIGCONT)
    assert (await scrape(proxy)).get(timed_out, 0) == before + 2
    # Each is counted; the log says so once, not once a request.
    assert [e["event"] for e in logs].count("admission.settlement_late") == 1
    await eventually(all_settled)  # the last one, once the process reads again

    os.kill(first, signal.SIGSTOP)
    await chat(proxy, limited, 1)  # sent to the stopped process, which then dies with it
    os.kill(first, signal.SIGKILL)

    async def replaced() -> bool:
        return offload_of(proxy).restarts == 1 and offload_of(proxy).bus_reachable()

    await eventually(replaced)
    started = time.monotonic()
    await chat(proxy, limited, 2)
    assert time.monotonic() - started < 0.5
    assert (await scrape(proxy)).get(timed_out, 0) == before + 2


async def test_an_events_process_that_cannot_start_stops_the_server_with_its_reason(
    tmp_path: Path,
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    settings = make_settings(
        tmp_path, event_build_in="process", file_event_log=not_a_directory / "events.jsonl"
    )
    with pytest.raises(EventProcessError) as refused:
        await create_app(settings)
    assert refused.value.setting == "FILE_EVENT_LOG"
    assert str(refused.value) == f"cannot write {not_a_directory}/events.jsonl: File exists"


async def test_ready_follows_the_redis_bus_of_the_events_process(
    proxy_factory: Any, redis_server: RedisServer
) -> None:
    proxy: Proxy = await proxy_factory(
        event_bus="redis", redis_url=redis_server.url, event_build_in="process"
    )

    async def ready_is(status: int) -> bool:
        async with proxy.operator.get(f"{proxy.base_url}/ready") as response:
            return response.status == status

    await eventually(lambda: ready_is(200))
    redis_server.stop()
    await eventually(lambda: ready_is(503))
    redis_server.start()
    await eventually(lambda: ready_is(200))


def _launch(tmp_path: Path) -> Launch:
    """What the server would send its events process, for an offload started by a test itself."""
    settings = make_settings(tmp_path)
    return Launch(
        events=events_config(settings),
        database_url=settings.database_url,
        file_event_log=None,
        log_level="warning",
        log_format="json",
    )


async def test_a_backlog_on_the_pipe_is_dropped_and_counted(tmp_path: Path) -> None:
    offload = EventOffload(_launch(tmp_path), entry=EVENTS_PROCESS, backlog_bytes=0)
    await offload.start()
    process = offload._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        for _ in range(300):  # more than a batch: the first frame fills the pipe
            offload.submit(exchange(request={}, response=b"x" * 10_000))
        await asyncio.sleep(0.2)
        for _ in range(10):
            offload.submit(exchange(request={}, response=b"{}"))
        await asyncio.sleep(0.2)
        assert offload.dropped >= 10
    finally:
        os.kill(process.pid, signal.SIGCONT)
        await offload.close()


async def test_behind_the_events_process_request_bodies_go_first_then_what_settles_nothing(
    tmp_path: Path,
) -> None:
    log = tmp_path / "events.jsonl"
    launch = replace(_launch(tmp_path), file_event_log=log)
    await (await open_store(launch.database_url)).close()  # migrated, as the server would
    # Request bodies are left out beyond 50,000 bytes waiting, exchanges that settle nothing
    # dropped beyond 100,000, every exchange beyond 200,000.
    offload = EventOffload(launch, entry=EVENTS_PROCESS, backlog_bytes=100_000)
    await offload.start()
    process = offload._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)  # a pipe's 64 KiB, then the server's buffer, fill up
    sent: dict[str, str] = {}
    shed_before = REGISTRY.get_sample_value(SHED) or 0
    dropped_before = REGISTRY.get_sample_value(DROPPED, BACKLOG) or 0

    async def send(
        name: str, request: bytes, response: bytes = b"{}", settles: bool = False
    ) -> None:
        ex = exchange(request=request, response=response)
        if settles:
            ex.hold_id, ex.held_nanousd = f"hold-{name}", 1000
        sent[ex.request_id] = name
        offload.submit(ex)
        await asyncio.sleep(0.1)  # the linger timer (0.05 s, this loop) sends it

    try:
        await send("whole", b"a" * 150_000)  # nothing waits yet: sent whole; ~85,000 then wait
        await send("plain-shed", b"b" * 10_000)
        await send("pushes-past-the-bound", b"c" * 10_000, response=b"r" * 100_000)
        await send("plain-dropped", b"d" * 10_000)
        await send("settling-shed", b"e" * 10_000, settles=True)
        await send("pushes-past-twice", b"f" * 10_000, response=b"r" * 100_000, settles=True)
        await send("settling-dropped", b"g" * 10_000, settles=True)
        assert offload.backlog_bytes() > 200_000
    finally:
        os.kill(process.pid, signal.SIGCONT)
    await offload.close()

    events = {sent[e["request_id"]]: e for e in await wait_for_lines(log, 5, timeout=0)}
    assert set(events) == {
        "whole", "plain-shed", "pushes-past-the-bound", "settling-shed", "pushes-past-twice"
    }  # fmt: skip
    assert events["whole"]["request"] == "a" * 150_000
    for name, event in events.items():
        if name != "whole":
            assert event["request"] == "[body not kept: the events process was behind; 10000 bytes]"
            assert event["response"] == ("r" * 100_000 if "pushes" in name else {})
    # Counted on this (the server's) process's metrics.
    assert offload.dropped == 2
    assert REGISTRY.get_sample_value(DROPPED, BACKLOG) == dropped_before + 2
    assert REGISTRY.get_sample_value(SHED) == shed_before + 4


@pytest.mark.parametrize(
    ("bound", "body"),
    [
        # A queue of 10 exchanges on both sides, frames of 5.
        ({"queue_size": 10, "batch_size": 5}, b"{}"),
        # A queue of 100,000 bytes in the events process (~4 of these), frames of 2.
        ({"queue_bytes": 100_000, "batch_size": 2}, b'{"a":"' + b"y" * 12_000 + b'"}'),
    ],
    ids=["exchanges", "bytes"],
)
async def test_a_burst_beyond_the_events_queue_waits_in_the_pipe_and_nothing_is_dropped(
    tmp_path: Path, bound: dict[str, Any], body: bytes
) -> None:
    launch = _launch(tmp_path)
    # The burst fits only if the events process reads the pipe no faster than it builds.
    launch = replace(launch, events=replace(launch.events, **bound))
    await (await open_store(launch.database_url)).close()  # migrated, as the server would
    offload = EventOffload(launch, entry=EVENTS_PROCESS)
    await offload.start()
    for _ in range(1000):
        offload.submit(exchange(request={"b": body.decode()}, response=body))
    await offload.close()

    families = {family.name: family for family in offload.metric_families()}
    dropped = {s.labels["reason"]: s.value for s in families["llm_proxy_events_dropped"].samples}
    published = sum(s.value for s in families["llm_proxy_events_published"].samples)
    assert offload.dropped == 0
    assert set(dropped.values()) == {0.0}, dropped
    assert published == 1000


async def test_while_no_events_process_runs_the_queue_is_bounded_by_bytes(tmp_path: Path) -> None:
    launch = _launch(tmp_path)
    launch = replace(launch, events=replace(launch.events, queue_bytes=50_000))
    await (await open_store(launch.database_url)).close()  # migrated, as the server would
    offload = EventOffload(launch, entry=EVENTS_PROCESS)
    await offload.start()
    process = offload._process
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    await process.wait()
    await asyncio.sleep(0.1)  # the watcher saw it die; it starts another after a second
    exchanges = [exchange(request=b"x" * 10_000, response=b"y" * 10_000) for _ in range(5)]
    for ex in exchanges:
        offload.submit(ex)  # 2 hold 40,000 bytes of bodies; each more pushes out the oldest
    assert offload.dropped == 3

    async def replaced() -> bool:
        return offload.restarts == 1 and offload.bus_reachable()

    await eventually(replaced)
    await offload.close()

    families = {family.name: family for family in offload.metric_families()}
    published = sum(s.value for s in families["llm_proxy_events_published"].samples)
    assert published == 2  # the two newest, sent to the new events process


async def test_closing_beside_an_events_process_that_stopped_reading_ends_in_time(
    tmp_path: Path,
) -> None:
    offload = EventOffload(_launch(tmp_path), entry=EVENTS_PROCESS, close_timeout=1.0)
    await offload.start()
    process = offload._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)  # it reads nothing more: the pipe fills and stays full
    try:
        for _ in range(300):
            offload.submit(exchange(request={}, response=b"x" * 10_000))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(offload.close(), 10.0)  # (before, it waited on the full pipe)
        assert offload.dropped == 300  # none of them became an event, and each is counted
        assert process.returncode is not None  # killed, not left behind
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)


async def _start(tmp_path: Path, upstream_server: Any, **overrides: Any) -> Proxy:
    client, app = await start_proxy(
        tmp_path, upstream_server, event_build_in="process", **overrides
    )
    return Proxy(client, upstream_server.app[UPSTREAM_LOG], app, aiohttp.ClientSession())


@pytest.mark.parametrize("gone", ["before it is ready", "while it runs"])
async def test_an_events_process_whose_server_is_gone_exits_quietly(
    tmp_path: Path, gone: str
) -> None:
    """A worker killed while its events process starts (a parent stopping a worker that is still
    starting), or a server killed outright: the status line meets a closed pipe, and the process
    must still close its store and exit, not wait forever on the store's thread, and without a
    BrokenPipeError traceback in the server's log."""
    launch = _launch(tmp_path)
    await (await open_store(launch.database_url)).close()  # migrated, as the server would
    status_read, status_write = os.pipe()
    if gone == "before it is ready":
        os.close(status_read)  # nobody will read the ready line
    stderr = (tmp_path / "events.stderr").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        EVENTS_PROCESS,
        stdin=asyncio.subprocess.PIPE,
        stdout=status_write,
        stderr=stderr,
    )
    os.close(status_write)
    stderr.close()
    try:
        assert process.stdin is not None
        process.stdin.write(frame(launch))
        await process.stdin.drain()
        if gone == "while it runs":
            with os.fdopen(status_read, "rb") as status:
                ready = await asyncio.to_thread(status.readline)
            assert b'"ready":true' in ready
        process.stdin.close()  # the server's end of both pipes is gone
        async with asyncio.timeout(30):
            code = await process.wait()
        assert code != 0  # it could not say all it had to, and says so by its exit code
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Traceback" not in (tmp_path / "events.stderr").read_text()
