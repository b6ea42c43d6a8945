"""``make run`` keeps everything under DATA_DIR (``./data`` when unset), the event log included.

The real Makefile target starts the real server; only the install step is skipped (``make -o``):
this interpreter's environment already holds the project.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import (
    MockUpstream,
    Process,
    clean_env,
    free_port,
    http,
    start_mock_upstream,
    write_api_config,
)

pytestmark = pytest.mark.process

REPOSITORY = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path_factory.mktemp("mock"))
    yield mock
    mock.process.stop()


def stop_group(process: Process) -> None:
    """SIGTERM to make and the server it started (their own process group), as Ctrl-C would."""
    group = process.popen.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        process.popen.poll()  # reap make, or the group never empties
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    process.stop()


@contextlib.contextmanager
def make_run(
    cwd: Path, logs: Path, *make_variables: str, **env: str
) -> Iterator[tuple[Process, str]]:
    port = free_port()
    cwd.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    out, err = (logs / "make.stdout").open("wb"), (logs / "make.stderr").open("wb")
    popen = subprocess.Popen(
        [
            "make",
            "--no-print-directory",
            "-f",
            str(REPOSITORY / "Makefile"),
            f"VENV={VENV}",
            "-o",
            f"{VENV}/.installed",
            *make_variables,
            "run",
        ],
        cwd=cwd,
        env=clean_env(LISTEN_ADDR=f"127.0.0.1:{port}", LOG_FORMAT="json", **env),
        stdout=out,
        stderr=err,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    process = Process(popen, logs / "make.stdout", logs / "make.stderr", [out, err])
    base_url = f"http://127.0.0.1:{port}"
    try:
        process.wait_for(f"{base_url}/health")
        yield process, base_url
    finally:
        stop_group(process)


def one_event(base_url: str, data_dir: Path) -> None:
    """A proxied request, so the event log gets a line; the management token from DATA_DIR."""
    management = (data_dir / "management_token").read_text().strip()
    status, project = http(
        "POST",
        f"{base_url}/manage/projects",
        token=management,
        body={"name": "make run", "api_key": "sk-x"},
    )
    assert status == 201, project
    status, issued = http(
        "POST",
        f"{base_url}/manage/tokens",
        token=management,
        body={"project_id": project["id"], "duration_minutes": 5},
    )
    assert status == 201, issued
    status, _ = http("GET", f"{base_url}/v1/models", token=issued["token"])
    assert status == 200


def wait_for_event(path: Path, timeout: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if lines:
            event: dict[str, object] = json.loads(lines[0])
            return event
        time.sleep(0.05)
    raise AssertionError(f"no event in {path} after {timeout}s")


@pytest.mark.parametrize("given_as", ["environment", "make variable"])
def test_make_run_keeps_everything_under_data_dir(
    tmp_path: Path, upstream: MockUpstream, given_as: str
) -> None:
    api_config = write_api_config(tmp_path / "api_providers.yaml", upstream.base_url)
    data_dir = tmp_path / "elsewhere"
    cwd = tmp_path / "checkout"
    variables = [f"DATA_DIR={data_dir}"] if given_as == "make variable" else []
    env = {"DATA_DIR": str(data_dir)} if given_as == "environment" else {}
    with make_run(cwd, tmp_path / "logs", *variables, API_CONFIG_PATH=str(api_config), **env) as (
        _process,
        base_url,
    ):
        one_event(base_url, data_dir)
        assert wait_for_event(data_dir / "events.jsonl")["path"] == "/v1/models"
    assert (data_dir / "llm-proxy.db").exists()
    assert not (cwd / "data").exists()


def test_make_run_with_nothing_set_uses_dot_data(tmp_path: Path, upstream: MockUpstream) -> None:
    api_config = write_api_config(tmp_path / "api_providers.yaml", upstream.base_url)
    cwd = tmp_path / "checkout"
    with make_run(cwd, tmp_path / "logs", API_CONFIG_PATH=str(api_config)) as (process, base_url):
        one_event(base_url, cwd / "data")
        assert wait_for_event(cwd / "data" / "events.jsonl")["path"] == "/v1/models"
        assert "MANAGEMENT_TOKEN=" in process.stdout
    assert (cwd / "data" / "llm-proxy.db").exists()


def test_make_run_honours_file_event_log(tmp_path: Path, upstream: MockUpstream) -> None:
    api_config = write_api_config(tmp_path / "api_providers.yaml", upstream.base_url)
    cwd, events = tmp_path / "checkout", tmp_path / "logs" / "chosen.jsonl"
    with make_run(
        cwd, tmp_path / "logs", API_CONFIG_PATH=str(api_config), FILE_EVENT_LOG=str(events)
    ) as (_process, base_url):
        one_event(base_url, cwd / "data")
        assert wait_for_event(events)["path"] == "/v1/models"
    assert not (cwd / "data" / "events.jsonl").exists()
