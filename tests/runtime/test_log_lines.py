"""Log lines stay whole when several processes share one stderr, as workers and their events
processes do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

_LOGGER = """
import structlog
from llm_proxy.runtime.logging_setup import configure_logging

configure_logging("info", "json")
log = structlog.get_logger("worker")
for i in range(4000):
    log.info("worker.line", i=i, padding="x" * 40)
"""


def test_lines_written_at_once_by_three_processes_never_run_together(tmp_path: Path) -> None:
    log_path = tmp_path / "shared.stderr"
    with log_path.open("wb") as shared:
        writers = [
            subprocess.Popen([sys.executable, "-c", _LOGGER], stderr=shared) for _ in range(3)
        ]
        for writer in writers:
            assert writer.wait(timeout=60) == 0
    lines = log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # a line run into another is not JSON
    assert len(entries) == 3 * 4000
    assert {entry["event"] for entry in entries} == {"worker.line"}
