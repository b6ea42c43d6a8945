"""The standalone dispatcher logs as the server does: LOG_FORMAT and LOG_LEVEL apply, on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.processes import clean_env, cli_command, free_port, run

pytestmark = pytest.mark.process


def test_a_burst_dispatcher_logs_json_lines_on_stderr_without_the_redis_password(
    tmp_path: Path,
) -> None:
    redis_url = f"redis://:s3cret-pass@127.0.0.1:{free_port()}/0"  # nothing listens there
    env = clean_env(LOG_FORMAT="json", LOG_LEVEL="info", REDIS_URL=redis_url)
    result = run(
        cli_command("dispatcher", "--service", "file", "--data-dir", str(tmp_path), "--burst"),
        env,
    )
    assert result.returncode == 3, result.stderr  # the bus was unreachable
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "expected log lines"
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert logged and all("event" in entry and "level" in entry for entry in logged)
    assert "s3cret-pass" not in result.stderr + result.stdout


def test_a_bad_log_format_stops_the_dispatcher_with_one_line(tmp_path: Path) -> None:
    env = clean_env(LOG_FORMAT="xml")
    result = run(cli_command("dispatcher", "--service", "file", "--burst"), env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "llm-proxy: LOG_FORMAT: " + result.stderr.strip().split("LOG_FORMAT: ", 1)[1]
    ]
