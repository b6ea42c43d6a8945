"""``runtime/events_process.py`` beside a real server: it ends when its server does, however the
server ends, and loses nothing it was sent."""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os
import resource
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from llm_proxy.events import event
from llm_proxy.events.config import EventsConfig
from tests.events.events_support import RedisServer
from tests.processes import (
    START_TIMEOUT,
    MockUpstream,
    ServerProcess,
    children,
    clean_env,
    cli_command,
    free_port,
    has_exited,
    http,
    spawn,
    start_mock_upstream,
    start_server,
    write_api_config,
)

pytestmark = pytest.mark.process

_PIDFD_GETFD = 438  # the syscall's number, the same on every Linux architecture
_libc = ctypes.CDLL(None, use_errno=True)
STREAM = EventsConfig().stream
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path)
    yield mock
    mock.process.stop()


def events_processes(pid: int) -> list[int]:
    """The events processes ``pid`` started."""
    return [
        child
        for child in children(pid)
        if b"llm_proxy.runtime.events_process" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def wait_for_events_process(pid: int) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while not (found := events_processes(pid)):
        assert time.monotonic() < deadline, f"{pid} started no events process"
        time.sleep(0.005)
    return found[0]


def hold_pipes(pid: int) -> list[int]:
    """Copies, in this process, of every pipe and socket ``pid`` has open, as a process that
    inherited them would hold them (a child forked or spawned without closing them): the server's
    end of its events process's pipes stays open when the server is killed."""
    held = []
    pidfd = os.pidfd_open(pid)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(("pipe:", "socket:")):
                copy = _libc.syscall(_PIDFD_GETFD, pidfd, int(fd), 0)
                assert copy >= 0, os.strerror(ctypes.get_errno())
                held.append(copy)
    finally:
        os.close(pidfd)
    return held


def assert_ends_in_time(events_process: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not has_exited(events_process):
        assert time.monotonic() < deadline, f"events process {events_process} outlived its server"
        time.sleep(0.05)


def log_lines(stderr: str, name: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


def kill_and_check(server: int, events_process: int, stderr: Path) -> None:
    """SIGKILL ``server`` while its pipes are held elsewhere: its events process notices (its log
    says so) and ends by itself within seconds."""
    held = hold_pipes(server)
    try:
        os.kill(server, signal.SIGKILL)
        assert_ends_in_time(events_process)
    finally:
        for fd in held:
            os.close(fd)
        if not has_exited(events_process):
            os.kill(events_process, signal.SIGKILL)
    assert "events.server_gone" in stderr.read_text(), stderr.read_text()[-3000:]


def test_an_events_process_ends_when_its_server_is_killed_while_it_starts(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    port = free_port()
    env = clean_env(
        DATA_DIR=str(tmp_path / "data"),
        LISTEN_ADDR=f"127.0.0.1:{port}",
        API_CONFIG_PATH=str(config),
        LOG_FORMAT="json",
    )
    process = spawn(cli_command("server"), env, tmp_path, "server")
    try:
        events_process = wait_for_events_process(process.popen.pid)
        # Before it said it is ready: it may still be importing, or opening its store and bus.
        kill_and_check(process.popen.pid, events_process, process.stderr_path)
    finally:
        process.stop()


@pytest.mark.parametrize("traffic", [False, True], ids=["once it serves", "under traffic"])
def test_an_events_process_ends_when_its_serving_server_is_killed_and_drains_what_it_has(
    tmp_path: Path, upstream: MockUpstream, traffic: bool
) -> None:
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    events_log = tmp_path / "events.jsonl"
    server = start_server(tmp_path / "data", config, tmp_path, FILE_EVENT_LOG=str(events_log))
    pid = server.process.popen.pid
    stop = threading.Event()
    try:
        token = server.issue_token()
        events_process = wait_for_events_process(pid)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            if traffic:
                for _ in range(4):
                    pool.submit(keep_requesting, server, token, stop)
                time.sleep(1.0)
            kill_and_check(pid, events_process, server.process.stderr_path)
            stop.set()
    finally:
        stop.set()
        server.stop()
    # Every exchange it was sent became an event in the file: none dropped, none left behind.
    closed = log_lines(server.process.stderr, "events.pipeline_closed")
    assert len(closed) == 1 and closed[0]["dropped"] == 0, closed
    written = len(events_log.read_text().splitlines()) if events_log.exists() else 0
    assert written == closed[0]["published"]
    assert (written > 0) == traffic


def keep_requesting(server: ServerProcess, token: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            http("GET", f"{server.base_url}/v1/models", token=token, timeout=2)
        except OSError:
            return  # the server is gone


def test_a_workers_events_process_ends_when_its_worker_is_killed(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(tmp_path / "data", config, tmp_path, WORKERS="2")
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while len(workers := children(server.process.popen.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker = workers[0]
        events_process = wait_for_events_process(worker)
        kill_and_check(worker, events_process, server.process.stderr_path)
    finally:
        server.stop(timeout=10)


def died_count(server: ServerProcess) -> float:
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_proxy_events_dropped_total" and sample.labels == {
                "reason": "events_process_died"
            }:
                return sample.value
    raise AssertionError("no events_process_died sample")


def chat(server: ServerProcess, token: str, count: int) -> list[str]:
    """``count`` chat completions; the request ids they were answered with."""
    ids = []
    for _ in range(count):
        request = urllib.request.Request(
            f"{server.base_url}/v1/chat/completions",
            data=json.dumps(CHAT).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            ids.append(response.headers["LLM-Proxy-Request-ID"])
    return ids


def replaced(server: ServerProcess, dead: int) -> int:
    """The events process started after ``dead`` died, once the server sends it exchanges."""
    deadline = time.monotonic() + 15
    while True:
        attached = log_lines(server.process.stderr, "events.process_attached")
        if attached and attached[-1]["pid"] != dead:
            return int(str(attached[-1]["pid"]))
        assert time.monotonic() < deadline, "the events process was not replaced"
        time.sleep(0.02)


def test_exchanges_lost_with_a_killed_events_process_are_counted_exactly(
    tmp_path: Path, upstream: MockUpstream, redis_server: RedisServer
) -> None:
    """Killed once its bus has taken every exchange it was sent, an events process lost nothing,
    and nothing is counted; killed while it held exchanges it had not published, those are
    counted, one for one. (The server went by a status up to a second old, and counted as lost
    what the bus already had. Only a death while the bus's answer is on its way is still counted
    as a loss: that batch is in doubt, see the metric's help.)"""
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(
        tmp_path / "data",
        config,
        tmp_path,
        LLM_PROXY_EVENT_BUS="redis",
        REDIS_URL=redis_server.url,
    )
    redis = Redis.from_url(redis_server.url)
    try:
        token = server.issue_token()
        events_process = wait_for_events_process(server.process.popen.pid)
        delivered: list[str] = []
        for _ in range(2):  # a stale status shows within a second, so most times: twice
            delivered += chat(server, token, 5)
            deadline = time.monotonic() + 10
            while redis.xlen(STREAM) < len(delivered):
                assert time.monotonic() < deadline, "the events never reached the bus"
                time.sleep(0.002)
            time.sleep(0.05)  # the bus's answer is back (well within the status interval)
            os.kill(events_process, signal.SIGKILL)
            events_process = replaced(server, events_process)

        os.kill(events_process, signal.SIGSTOP)  # it can no longer read or publish...
        try:
            lost = chat(server, token, 4)  # ...so these are sent to it and never become events
            time.sleep(0.3)  # longer than the server's linger: they are on its input now
        finally:
            os.kill(events_process, signal.SIGKILL)
        replaced(server, events_process)

        on_the_bus = [event.loads(fields[b"e"])["request_id"] for _, fields in redis.xrange(STREAM)]
        assert on_the_bus == delivered
        deadline = time.monotonic() + 10
        while (counted := died_count(server)) < len(lost):
            assert time.monotonic() < deadline, counted
            time.sleep(0.05)
        assert counted == len(lost)
    finally:
        redis.close()
        server.stop(timeout=10)


def _wait_for(check: Callable[[], bool], why: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, why
        time.sleep(0.02)


def test_events_spooled_after_a_write_the_full_disk_cut_short_all_reach_redis(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    """Redis is down and the spool's disk fills in the middle of an event (here: the events
    process's file size limit): that event is lost and counted. Every event spooled once there is
    room again reaches Redis when it is back: the torn bytes left in the spool had been counted as
    nothing, so replay stopped that many bytes short, and emptied the spool with the last events
    in it, uncounted."""
    redis_server = RedisServer(tmp_path / "redis", durable=True)
    redis_server.start()
    redis = Redis.from_url(redis_server.url)
    # A dispatcher service that reads nothing yet: the stream keeps every event for it.
    redis.xgroup_create(STREAM, "later", id="0", mkstream=True)
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(
        tmp_path / "data", config, tmp_path, LLM_PROXY_EVENT_BUS="redis", REDIS_URL=redis_server.url
    )
    spool = tmp_path / "data" / "events-spool.jsonl"
    try:
        token = server.issue_token()
        events_process = wait_for_events_process(server.process.popen.pid)
        redis_server.stop()
        chat(server, token, 1)
        _wait_for(lambda: spool.exists() and spool.stat().st_size > 0, "nothing was spooled")
        line = spool.stat().st_size
        limits = resource.prlimit(events_process, resource.RLIMIT_FSIZE)
        resource.prlimit(events_process, resource.RLIMIT_FSIZE, (line + line // 2, limits[1]))
        chat(server, token, 1)  # half of its line fits
        _wait_for(lambda: "events.batch_failed" in server.process.stderr, "the write did not fail")
        resource.prlimit(events_process, resource.RLIMIT_FSIZE, limits)
        later = chat(server, token, 5)
        _wait_for(lambda: spool.read_bytes().count(b"\n") >= 6, "the later events were not spooled")

        redis_server.start()

        def on_the_bus() -> set[str]:
            return {event.loads(fields[b"e"])["request_id"] for _, fields in redis.xrange(STREAM)}

        deadline = time.monotonic() + 10
        while (missing := set(later) - on_the_bus()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not missing, f"{len(missing)} of the {len(later)} later events never reached Redis"
    finally:
        redis.close()
        server.stop(timeout=10)
        redis_server.stop()


def hold_outputs(pid: int) -> list[int]:
    """Copies, in this process, of the pipes and sockets ``pid`` has open but its input: once it
    is killed, its input is closed while the server still waits for the end of its status pipe,
    as it does for a moment under load before its watcher runs."""
    held = []
    for fd in hold_pipes(pid):
        if os.readlink(f"/proc/self/fd/{fd}") == os.readlink(f"/proc/{pid}/fd/0"):
            os.close(fd)
        else:
            held.append(fd)
    return held


def test_exchanges_answered_before_the_server_sees_its_events_process_died_are_not_lost(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    """The events process is killed and its input is closed, but the server has not seen it end
    yet: the requests it answers meanwhile keep their events (they go to the next events
    process) or are counted lost, never vanish. (Writing to the closed input raised: the batch
    being sent was lost uncounted, and the request's handler failed.)"""
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    events_log = tmp_path / "events.jsonl"
    server = start_server(tmp_path / "data", config, tmp_path, FILE_EVENT_LOG=str(events_log))
    try:
        token = server.issue_token()
        first = wait_for_events_process(server.process.popen.pid)
        held = hold_outputs(first)
        try:
            os.kill(first, signal.SIGKILL)
            _wait_for(lambda: has_exited(first), "the events process outlived SIGKILL")
            answered = []
            for _ in range(5):  # one at a time, each sent on its own after the linger
                answered += chat(server, token, 1)
                time.sleep(0.2)
        finally:
            for fd in held:
                os.close(fd)
        replaced(server, first)

        def accounted() -> bool:
            logged = events_log.read_text().splitlines() if events_log.exists() else []
            ids = {json.loads(line)["request_id"] for line in logged}
            return len(set(answered) - ids) <= died_count(server)

        _wait_for(accounted, "events neither written nor counted lost")
        assert "front.handler_failed" not in server.process.stderr
    finally:
        server.stop(timeout=10)


def test_an_events_process_ends_when_its_server_is_killed_while_redis_is_slow_to_answer(
    tmp_path: Path, upstream: MockUpstream, redis_server: RedisServer
) -> None:
    """Redis stalls (stopped for a few seconds) as the server is killed: the events process
    drains once Redis answers again and ends. (Its periodic status and the bus's trimmer were
    stopped by cancelling them, which the Redis command they were waiting on swallowed: the
    process lived on for good, holding its database and Redis connections.)"""
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(
        tmp_path / "data", config, tmp_path, LLM_PROXY_EVENT_BUS="redis", REDIS_URL=redis_server.url
    )
    assert redis_server.process is not None
    redis_pid = redis_server.process.pid
    try:
        events_process = wait_for_events_process(server.process.popen.pid)
        time.sleep(1.5)  # serving: its status and trimmer are running
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            time.sleep(2.2)  # a status line's ping and a trim are waiting for Redis
            os.kill(server.process.popen.pid, signal.SIGKILL)
            time.sleep(2)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        try:
            assert_ends_in_time(events_process, seconds=20)
        finally:
            if not has_exited(events_process):
                os.kill(events_process, signal.SIGKILL)
    finally:
        server.stop()
