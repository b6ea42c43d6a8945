"""tpm across instances (SPEC §6, §11): a client that sends its next request as soon as it has the
answer, to another instance, is judged on a window that holds that answer's tokens."""

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
from tests.processes import MockUpstream, ServerProcess, start_mock_upstream
from tests.runtime.test_events_process import wait_for_events_process
from tests.runtime.test_instances import Cluster, start_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.process]

# Every answer of the fake upstream uses more than the token's whole tpm.
ANSWER_TOKENS = 70
TPM = 60


@pytest.fixture
def cluster(postgres_url: str, redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    upstream: MockUpstream = start_mock_upstream(tmp_path, None, "--chunks", str(ANSWER_TOKENS))
    try:
        instances = start_cluster(tmp_path, upstream, postgres_url, redis_server.url)
        yield Cluster(instances)
        codes = [instance.stop(timeout=40) for instance in instances]
        for instance, code in zip(instances, codes, strict=True):
            assert code == 0, instance.process.stderr[-3000:]
    finally:
        upstream.process.stop()


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
