"""``llm-proxy server --workers N``: several processes on one port keep tokens' limits and revocation exact across them."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import (
    MockUpstream,
    ServerProcess,
    http,
    start_mock_upstream,
    start_server,
    write_api_config,
)

pytestmark = pytest.mark.process


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path)
    yield mock
    mock.process.stop()


@pytest.fixture
def workers(tmp_path: Path, upstream: MockUpstream) -> Iterator[ServerProcess]:
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(tmp_path / "data", config, tmp_path, WORKERS="2")
    yield server
    code = server.stop(timeout=10)
    assert code == 0, server.process.stderr[-3000:]


def test_quota_and_revocation_hold_across_worker_processes(workers: ServerProcess) -> None:
    base, management = workers.base_url, workers.management_token
    status, project = http(
        "POST", f"{base}/manage/projects", token=management, body={"name": "w", "api_key": "sk-k"}
    )
    assert status == 201
    status, limited = http(
        "POST",
        f"{base}/manage/tokens",
        token=management,
        body={"project_id": project["id"], "duration_minutes": 5, "max_requests": 20},
    )
    # New connections spread over both workers; every request opens its own.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(
                lambda _: http("GET", f"{base}/v1/models", token=limited["token"])[0], range(60)
            )
        )
    assert statuses.count(200) == 20 and statuses.count(429) == 40

    status, unlimited = http(
        "POST",
        f"{base}/manage/tokens",
        token=management,
        body={"project_id": project["id"], "duration_minutes": 5},
    )
    for _ in range(10):  # both workers have it cached now
        assert http("GET", f"{base}/v1/models", token=unlimited["token"])[0] == 200
    assert http("DELETE", f"{base}/manage/tokens/{unlimited['id']}", token=management)[0] == 204
    time.sleep(1.0)
    for _ in range(10):
        status, body = http("GET", f"{base}/v1/models", token=unlimited["token"])
        assert (status, body["error"]["code"]) == (401, "token_inactive")
    assert "server.workers_started" in workers.process.stderr
