"""``GRACEFUL_SHUTDOWN_TIMEOUT``: how long a stopping server lets the streams in flight finish.

A rollout sends SIGTERM; the platform waits its own grace (the Helm chart's
terminationGracePeriodSeconds) before SIGKILL. Streams that fit the server's grace end whole; the
rest are cut and recorded ``server_stopping``; either way their events are written before exit.
"""

from __future__ import annotations

import http.client as http_client
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import (
    MockUpstream,
    ServerProcess,
    clean_env,
    cli_command,
    free_port,
    run,
    start_mock_upstream,
    start_server,
    wait_until,
    write_api_config,
)

pytestmark = pytest.mark.process

CHUNK_SECONDS = 1.0
# Longer than the 10 s the server gave every stream before the grace was a setting.
LONG_STREAM_CHUNKS = 12


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    """Streams of one content chunk a second: LONG_STREAM_CHUNKS of them unless max_tokens says
    fewer."""
    mock = start_mock_upstream(
        tmp_path_factory.mktemp("mock"),
        None,
        "--chunks",
        str(LONG_STREAM_CHUNKS),
        "--chunk-interval-ms",
        str(int(CHUNK_SECONDS * 1000)),
    )
    yield mock
    mock.process.stop()


def _start(tmp_path: Path, upstream: MockUpstream, **env: str) -> ServerProcess:
    config = write_api_config(tmp_path / "api_providers.yaml", upstream.base_url)
    return start_server(
        tmp_path / "data", config, tmp_path / "logs", FILE_EVENT_LOG=str(_events(tmp_path)), **env
    )


def _events(tmp_path: Path) -> Path:
    return tmp_path / "events.jsonl"


def _open_stream(server: ServerProcess, chunks: int) -> tuple[Any, http_client.HTTPResponse]:
    """A chat stream of ``chunks`` content chunks, its first line read: it is in flight."""
    token = server.issue_token()
    host, port = server.base_url.removeprefix("http://").split(":")
    conn = http_client.HTTPConnection(host, int(port), timeout=30)
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "think"}],
        "stream": True,
        "max_tokens": chunks,
    }
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return conn, response


def _stop_and_read(server: ServerProcess, response: http_client.HTTPResponse) -> bytes | None:
    """SIGTERM, then the rest of the stream: None when the server cut it."""
    server.process.popen.send_signal(signal.SIGTERM)
    try:
        return response.read()
    except http_client.IncompleteRead:  # no end of the chunked body came
        return None


def _only_event(server: ServerProcess, tmp_path: Path) -> dict[str, Any]:
    assert server.process.popen.wait(timeout=60) == 0, server.process.stderr
    chats = [
        event
        for line in _events(tmp_path).read_text().splitlines()
        if (event := json.loads(line))["path"] == "/v1/chat/completions"
    ]
    assert len(chats) == 1, chats
    return chats[0]


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_stream_longer_than_ten_seconds_ends_whole_after_sigterm_within_the_grace(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    """While it waits, the server takes no new connection and closes idle kept-alive ones, so a
    load balancer sends new requests elsewhere."""
    server = _start(tmp_path, upstream, GRACEFUL_SHUTDOWN_TIMEOUT="30s")
    try:
        port = int(server.base_url.rpartition(":")[2])
        idle = http_client.HTTPConnection("127.0.0.1", port, timeout=10)
        idle.request("GET", "/health")
        assert idle.getresponse().read()
        conn, response = _open_stream(server, LONG_STREAM_CHUNKS)

        server.process.popen.send_signal(signal.SIGTERM)
        wait_until(lambda: _refused(port), "the port to refuse new connections", 5.0)
        assert idle.sock is not None
        assert idle.sock.recv(1) == b""  # closed by the server, nothing more to say
        rest = response.read()

        assert rest.endswith(b"data: [DONE]\n\n")
        event = _only_event(server, tmp_path)
        assert (event["status"], event["error"], event["stream"]) == (200, None, True)
        conn.close()
        idle.close()
    finally:
        server.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_stream_longer_than_the_grace_is_cut_and_recorded_server_stopping(
    tmp_path: Path, upstream: MockUpstream, workers: str
) -> None:
    server = _start(tmp_path, upstream, GRACEFUL_SHUTDOWN_TIMEOUT="1s", WORKERS=workers)
    try:
        conn, response = _open_stream(server, 4)

        assert _stop_and_read(server, response) is None

        event = _only_event(server, tmp_path)
        assert (event["status"], event["error"]) == (200, "server_stopping")
        conn.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("given", "value"),
    [("variable", "forever"), ("variable", "0s"), ("flag", "-5s")],
)
def test_a_grace_that_is_no_duration_stops_start_up_with_one_line_naming_it(
    tmp_path: Path, given: str, value: str
) -> None:
    env = clean_env(DATA_DIR=str(tmp_path / "data"), LISTEN_ADDR=f"127.0.0.1:{free_port()}")
    args = ["server"]
    if given == "variable":
        env["GRACEFUL_SHUTDOWN_TIMEOUT"] = value
    else:
        args += [f"--graceful-shutdown-timeout={value}"]

    result = run(cli_command(*args), env)

    assert result.returncode == 2  # as every other bad setting
    assert result.stderr.splitlines() == [
        f"llm-proxy: GRACEFUL_SHUTDOWN_TIMEOUT: expected a duration such as 30s, got {value!r}"
    ]
