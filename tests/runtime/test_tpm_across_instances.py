"""tpm across instances and workers (SPEC §6, §11): a client that sends its next request as soon as
it has the answer, to another instance or worker, is judged on a window that holds that answer's
tokens."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.events.events_support import RedisServer
from tests.processes import (
    MockUpstream,
    ServerProcess,
    children,
    http,
    start_mock_upstream,
    start_server,
    write_api_config,
)
from tests.runtime.test_events_process import events_processes, wait_for_events_process
from tests.runtime.test_instances import Cluster, start_cluster
from tests.runtime.test_workers import wait_for_workers

pytestmark = pytest.mark.process

# Every answer of the fake upstream uses more than the token's whole tpm.
ANSWER_TOKENS = 70
TPM = 60


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path, None, "--chunks", str(ANSWER_TOKENS))
    yield mock
    mock.process.stop()


@pytest.fixture
def cluster(
    postgres_url: str, redis_server: RedisServer, upstream: MockUpstream, tmp_path: Path
) -> Iterator[Cluster]:
    instances = start_cluster(tmp_path, upstream, postgres_url, redis_server.url)
    yield Cluster(instances)
    codes = [instance.stop(timeout=40) for instance in instances]
    for instance, code in zip(instances, codes, strict=True):
        assert code == 0, instance.process.stderr[-3000:]


def chat(instance: ServerProcess, token: str, *, stream: bool) -> tuple[int, str | None]:
    """One chat completion read to its end (a stream to its ``data: [DONE]``): its status and
    error code."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    if stream:
        body["stream"] = True
    request = urllib.request.Request(
        f"{instance.base_url}/v1/chat/completions",
        data=orjson.dumps(body),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = response.read()
            if stream:
                assert answer.endswith(b"data: [DONE]\n\n"), answer[-200:]
            return int(response.status), None
    except urllib.error.HTTPError as exc:
        error = orjson.loads(exc.read())["error"]["code"]
        exc.close()
        return int(exc.code), error


def resume_later(pid: int, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), os.kill(pid, signal.SIGCONT)))
    thread.start()
    return thread


@pytest.mark.postgres
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_next_request_on_another_instance_waits_for_the_last_answer_to_settle(
    cluster: Cluster, stream: bool
) -> None:
    """Instance 0's events process is stopped, so its answer's tokens are not settled when the
    client sends its next request, to instance 1: that request waits for them (the events
    process resumes 0.3 s later) and is refused, the window being full."""
    token = cluster.issue(tpm=TPM)["token"]
    first, second = cluster.instances[0], cluster.instances[1]
    events_process = wait_for_events_process(first.process.popen.pid)
    os.kill(events_process, signal.SIGSTOP)
    try:
        assert chat(first, token, stream=stream) == (200, None)
        resuming = resume_later(events_process, 0.3)
        assert chat(second, token, stream=stream) == (429, "rate_limited")
        resuming.join()
    finally:
        os.kill(events_process, signal.SIGCONT)


@pytest.mark.postgres
def test_a_lost_settlement_holds_the_next_request_back_for_a_bounded_time(
    cluster: Cluster,
) -> None:
    """The events process that would settle the answer stays stopped: the next request, on
    another instance, is not held back for ever but judged on the window as it is."""
    token = cluster.issue(tpm=TPM)["token"]
    first, second = cluster.instances[0], cluster.instances[1]
    events_process = wait_for_events_process(first.process.popen.pid)
    os.kill(events_process, signal.SIGSTOP)
    try:
        assert chat(first, token, stream=False) == (200, None)
        started = time.monotonic()
        assert chat(second, token, stream=False) == (200, None)
        assert time.monotonic() - started < 10
    finally:
        os.kill(events_process, signal.SIGCONT)


def test_next_request_on_another_worker_waits_for_the_last_answer_to_settle(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    """``--workers 2`` on SQLite without Redis: every events process stopped, an answer, then the
    next request, which lands on either worker (four trials: on the other one at least once but
    one time in 16), is refused once they resume 0.3 s later."""
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(tmp_path / "data", config, tmp_path, WORKERS="2")
    try:
        wait_for_workers(server, 2)
        stopped = [
            pid for worker in children(server.process.popen.pid) for pid in events_processes(worker)
        ]
        assert len(stopped) == 2
        for trial in range(4):
            project = server.issue()["project_id"]
            status, issued = http(
                "POST",
                f"{server.base_url}/manage/tokens",
                token=server.management_token,
                body={"project_id": project, "duration_minutes": 5, "tpm": TPM},
            )
            assert status == 201, issued
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            try:
                assert chat(server, issued["token"], stream=trial % 2 == 1) == (200, None)
                resuming = [resume_later(pid, 0.3) for pid in stopped]
                assert chat(server, issued["token"], stream=False) == (429, "rate_limited"), trial
                for thread in resuming:
                    thread.join()
            finally:
                for pid in stopped:
                    os.kill(pid, signal.SIGCONT)
    finally:
        code = server.stop(timeout=40)
    assert code == 0, server.process.stderr[-3000:]
