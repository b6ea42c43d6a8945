"""Real ``llm-proxy`` processes for end-to-end tests: the server and the mock upstream.

Output goes to files, never pipes, so a chatty process can never block on a full pipe; every process
is stopped by its owner (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Variables the product reads; cleared so a developer's shell cannot change what a test sees.
PRODUCT_VARIABLES = (
    "LISTEN_ADDR",
    "MANAGEMENT_TOKEN",
    "ADMIN_USER",
    "ADMIN_PASSWORD",
    "DATABASE_URL",
    "ENCRYPTION_KEY",
    "ENCRYPTION_KEY_CHECK",
    "REQUIRED_SETTINGS",
    "API_CONFIG_PATH",
    "PRICES_PATH",
    "LLM_PROXY_EVENT_BUS",
    "REDIS_URL",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "DATA_DIR",
    "FILE_EVENT_LOG",
    "WORKERS",
    "DATABASE_POOL_SIZE",
    "REVOCATION_MAX_STALENESS",
    "CHANGE_FEED_PUSH",
    "MAX_REQUEST_BODY",
    "GRACEFUL_SHUTDOWN_TIMEOUT",
    "MANAGE_API_BASE_URL",
    "MOCK_UPSTREAM_API_KEY",
    "BENCHMARK_TOKEN",
    "BENCHMARK_COMPARE_TOKEN",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "FORWARDED_ALLOW_IPS",
    "EVENTS_STREAM_MAX_LENGTH",
    "EVENTS_SPOOL_MAX_BYTES",
    "EVENTS_FILE_GROUP_IDLE",
    "LLM_PROXY_EVENT_STREAM",
    "LLM_PROXY_DISPATCHER_METRICS_PORT",
    "LLM_PROXY_DISPATCHER_METRICS_HOST",
)
START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PRODUCT_VARIABLES}
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    """``python -m llm_proxy …``: the console script's commands, from this interpreter."""
    return [sys.executable, "-m", "llm_proxy", *args]


def http(
    method: str, url: str, *, token: str | None = None, body: Any = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """One blocking request; answers ``(status, parsed JSON or None)``, errors included."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
        exc.close()
    return status, json.loads(raw) if raw else None


@dataclass
class Process:
    """A child process whose stdout and stderr are captured to files."""

    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    _files: list[Any] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait, SIGKILL as a last resort; the exit status (negative: killed by signal)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for handle in self._files:
            handle.close()
        self._files.clear()
        return int(self.popen.returncode)

    def wait_for(self, url: str, timeout: float = START_TIMEOUT) -> None:
        """Poll ``url`` until it answers 200; fail with the process output if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"process exited with {self.popen.returncode} before {url} answered:\n"
                    f"{self.stdout}\n{self.stderr}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"{url} did not answer in {timeout}s:\n{self.stdout}\n{self.stderr}")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def proc_stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state, parent pid, …; None once reaped."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def has_exited(pid: int) -> bool:
    """Every thread of ``pid`` is gone, so its sockets are closed. A killed process's main thread
    shows as a zombie while its other threads (aiosqlite's, the builder's) still hold the open
    files, the listening socket among them: a connection made then is reset when they go."""
    stat = proc_stat(pid)
    if stat is None:
        return True
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    return stat[0] == "Z" and threads == [str(pid)]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, found in ``/proc``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None and stat[1] == str(pid):
                found.append(int(entry.name))
    return found


def spawn(
    args: list[str], env: dict[str, str], logs: Path, name: str, cwd: Path | None = None
) -> Process:
    logs.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
    out, err = stdout_path.open("wb"), stderr_path.open("wb")
    popen = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL
    )
    return Process(popen, stdout_path, stderr_path, [out, err])


def run(
    args: list[str], env: dict[str, str], timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (for start-ups that must fail)."""
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def run_start_that_fails(env: dict[str, str], why: str) -> subprocess.CompletedProcess[str]:
    """``llm-proxy server`` whose start-up must fail: it has to exit by itself (``why`` if not).

    Generously bounded: a worker that cannot start still closes its events process, which under
    a loaded CI machine once took the whole of an earlier 20 s bound."""
    try:
        return run(cli_command("server"), env, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(why) from None


@dataclass
class MockUpstream:
    process: Process
    base_url: str


def start_mock_upstream(logs: Path, api_key: str | None = None, *options: str) -> MockUpstream:
    """``llm-proxy mock-upstream`` on a free port; ``options`` are more of its flags."""
    port = free_port()
    extra = {"MOCK_UPSTREAM_API_KEY": api_key} if api_key else {}
    process = spawn(
        cli_command("mock-upstream", "--port", str(port), *options),
        clean_env(**extra),
        logs,
        "mock",
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        process.wait_for(f"{base_url}/mock/streams")
    except BaseException:
        process.stop()
        raise
    return MockUpstream(process, base_url)


def write_api_config(path: Path, upstream_base_url: str) -> Path:
    path.write_text(
        "default_api: openai\n"
        "apis:\n"
        "  openai:\n"
        f"    base_url: {upstream_base_url}\n"
        "    allowed_endpoints: [/v1/chat/completions, /v1/models, /v1/embeddings]\n"
        "    allowed_methods: [GET, POST, DELETE, OPTIONS]\n"
        "    timeouts: {connect: 2s, response_header: 5s, idle: 5s}\n"
    )
    return path


@dataclass
class ServerProcess:
    process: Process
    base_url: str
    data_dir: Path
    preset_management_token: str | None = None

    @property
    def management_token(self) -> str:
        """The ``MANAGEMENT_TOKEN`` the server was started with, or else the one announced in
        its start-up banner on stdout."""
        if self.preset_management_token is not None:
            return self.preset_management_token
        for line in self.process.stdout.splitlines():
            name, sep, value = line.strip().partition("=")
            if sep and name == "MANAGEMENT_TOKEN":
                return value
        raise AssertionError(f"no MANAGEMENT_TOKEN= line on stdout:\n{self.process.stdout}")

    def stop(self, timeout: float = 5.0) -> int:
        return self.process.stop(timeout)

    def issue_token(self, api_key: str = "sk-upstream") -> str:
        """The value of a five-minute token of a new project holding ``api_key``."""
        return str(self.issue(api_key)["token"])

    def issue(self, api_key: str = "sk-upstream") -> dict[str, Any]:
        """A five-minute token of a new project holding ``api_key``, through the management API:
        the answer of ``POST /manage/tokens`` (its id, value and project)."""
        base, management = self.base_url, self.management_token
        status, project = http(
            "POST",
            f"{base}/manage/projects",
            token=management,
            body={"name": "p", "api_key": api_key},
        )
        assert status == 201, project
        status, token = http(
            "POST",
            f"{base}/manage/tokens",
            token=management,
            body={"project_id": project["id"], "duration_minutes": 5},
        )
        assert status == 201, token
        return dict(token)


def start_server(
    data_dir: Path,
    api_config: Path,
    logs: Path,
    name: str = "server",
    listen_host: str = "127.0.0.1",
    **env: str,
) -> ServerProcess:
    """``python -m llm_proxy server`` on a free loopback port (on ``listen_host``, which holds
    127.0.0.1: ``[::]`` for a dual-stack listener); returns once ``/health`` answers."""
    port = free_port()
    variables = {
        "DATA_DIR": str(data_dir),
        "LISTEN_ADDR": f"{listen_host}:{port}",
        "API_CONFIG_PATH": str(api_config),
        "LOG_FORMAT": "json",
        **env,
    }
    process = spawn(cli_command("server"), clean_env(**variables), logs, name)
    base_url = f"http://127.0.0.1:{port}"
    try:
        process.wait_for(f"{base_url}/health")
    except BaseException:
        process.stop()
        raise
    return ServerProcess(process, base_url, data_dir, env.get("MANAGEMENT_TOKEN"))
