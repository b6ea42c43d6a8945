"""The file-log consumer groups of server instances that are gone, on the Redis bus.

Each ``llm-proxy server --file-event-log PATH`` reads the stream in ``file@<host>:<path>``, and a
new container has a new host name: a group left by each replaced container would pin the stream
for good. Here an instance is "replaced" by one with another file path, which names another group
just as another host name would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from tests.events.events_support import RedisServer
from tests.processes import (
    MockUpstream,
    ServerProcess,
    children,
    clean_env,
    cli_command,
    http,
    run,
    start_mock_upstream,
    start_server,
    wait_until,
    write_api_config,
)

pytestmark = [pytest.mark.redis, pytest.mark.process]

STREAM = "llm-proxy:events"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path / "mock")
    yield mock
    mock.process.stop()


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def groups(redis: Redis) -> set[str]:
    return {group["name"].decode() for group in redis.xinfo_groups(STREAM)}


def request_logged(server: ServerProcess, token: str, log: Path) -> None:
    """One chat completion through ``server``, once its file log has written the event."""
    before = lines(log)
    status, _ = http("POST", f"{server.base_url}/v1/chat/completions", token=token, body=CHAT)
    assert status == 200
    wait_until(lambda: lines(log) > before, f"the event in {log.name}", 30)


def released(server: ServerProcess) -> list[dict[str, Any]]:
    """The lines of ``server``'s log that say it let go of a group."""
    return [
        line
        for raw in server.process.stderr_path.read_text().splitlines()
        if raw.startswith("{")
        and (line := json.loads(raw))["event"] == "events.redis_gone_instance_group_released"
    ]


def test_the_file_log_group_of_an_instance_gone_is_let_go_and_a_service_down_keeps_its_events(
    tmp_path: Path, redis_server: RedisServer, upstream: MockUpstream
) -> None:
    api_config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    env = {
        "LLM_PROXY_EVENT_BUS": "redis",
        "REDIS_URL": redis_server.url,
        "EVENTS_FILE_GROUP_IDLE": "4s",
    }
    redis = Redis.from_url(redis_server.url)
    service_log = tmp_path / "service.jsonl"

    def file_service_burst() -> None:
        dispatch = cli_command("dispatcher", "--service", "file", "--burst", "--batch-wait", "0")
        done = run([*dispatch, "--path", str(service_log)], clean_env(**env), timeout=60)
        assert done.returncode == 0, done.stderr

    def instance(name: str) -> tuple[ServerProcess, Path]:
        log = tmp_path / name / "events.jsonl"
        server = start_server(
            tmp_path / name, api_config, tmp_path / "logs", name, FILE_EVENT_LOG=str(log), **env
        )
        return server, log

    # The standalone file service ran once and is down from here on: its group stays.
    file_service_burst()
    stopped, stopped_log = instance("stopped")
    killed: ServerProcess | None = None
    live: ServerProcess | None = None
    try:
        request_logged(stopped, stopped.issue_token(), stopped_log)
        stopped.stop()  # a clean stop: its consumer leaves the group, which stays
        killed, killed_log = instance("killed")
        request_logged(killed, killed.issue_token(), killed_log)
        # Killed with its events process: its consumer stays in the group, never to read again.
        for pid in [*children(killed.process.popen.pid), killed.process.popen.pid]:
            os.kill(pid, signal.SIGKILL)
        killed.stop()
        gone = {f"file@{socket.gethostname()}:{log}" for log in (stopped_log, killed_log)}
        assert gone <= groups(redis)

        live, live_log = instance("live")
        request_logged(live, live.issue_token(), live_log)  # which the gone ones never read
        wait_until(
            lambda: not gone & groups(redis), f"the groups of the instances gone: {gone}", 25
        )
        assert {"file", "usage", f"file@{socket.gethostname()}:{live_log}"} <= groups(redis)

        request_logged(live, live.issue_token(), live_log)
        # Logged by whichever server let each go (the killed one may have, for the stopped's),
        # with what it had not read; and counted.
        by_killed, by_live = released(killed), released(live)
        assert sorted(line["group"] for line in by_killed + by_live) == sorted(gone)
        assert all(line["unacknowledged"] >= 1 for line in by_killed + by_live)
        with urllib.request.urlopen(f"{live.base_url}/metrics", timeout=5) as response:
            page = response.read().decode()
        counted = sum(line["unacknowledged"] for line in by_live)
        metric = 'llm_proxy_events_dropped_total{reason="instance_group_released"}'
        assert f"{metric} {counted}.0" in page
    finally:
        for server in (stopped, killed, live):
            if server is not None:
                server.stop()
        redis.close()

    # The file service, down all along, still gets every event.
    file_service_burst()
    assert lines(service_log) == 4


def test_once_a_replaced_instances_group_is_let_go_the_cap_trims_nothing_unread(
    tmp_path: Path, redis_server: RedisServer, upstream: MockUpstream
) -> None:
    """What an operator saw: past the cap, errors and drops every second for a group no one
    would ever read again."""
    api_config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    env = {
        "LLM_PROXY_EVENT_BUS": "redis",
        "REDIS_URL": redis_server.url,
        "EVENTS_FILE_GROUP_IDLE": "4s",
        "EVENTS_STREAM_MAX_LENGTH": "3",
    }
    redis = Redis.from_url(redis_server.url)
    old_log, new_log = tmp_path / "old" / "events.jsonl", tmp_path / "new" / "events.jsonl"
    old = start_server(
        tmp_path / "old", api_config, tmp_path / "logs", "old", FILE_EVENT_LOG=str(old_log), **env
    )
    new: ServerProcess | None = None
    try:
        request_logged(old, old.issue_token(), old_log)
        old.stop()  # replaced by a new container
        new = start_server(
            tmp_path / "new",
            api_config,
            tmp_path / "logs",
            "new",
            FILE_EVENT_LOG=str(new_log),
            **env,
        )
        token = new.issue_token()
        request_logged(new, token, new_log)
        gone = f"file@{socket.gethostname()}:{old_log}"
        wait_until(
            lambda: gone not in groups(redis), f"the group of the instance replaced: {gone}", 25
        )

        for _ in range(5):  # more than the cap holds
            request_logged(new, token, new_log)
        wait_until(lambda: redis.xlen(STREAM) <= 3, "the stream to be trimmed to its cap", 25)
        assert lines(new_log) == 6
        output = new.process.stdout + new.process.stderr
        assert "events.redis_unacknowledged_trimmed" not in output
        with urllib.request.urlopen(f"{new.base_url}/metrics", timeout=5) as response:
            page = response.read().decode()
        assert 'llm_proxy_events_dropped_total{reason="trimmed_unacknowledged"} 0.0' in page
    finally:
        for server in (old, new):
            if server is not None:
                server.stop()
        redis.close()
