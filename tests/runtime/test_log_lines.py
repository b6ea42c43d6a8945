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


_FORM_READER = """
from llm_proxy.proxy.form_scan import FormInspector
from llm_proxy.runtime.logging_setup import configure_logging

configure_logging("info", "json")
for body in (b"--x\\r\\nnot a part at all", b"garbage before --x\\r\\n", b"a=1&&&b==c&"):
    media = b"application/x-www-form-urlencoded" if b"=" in body else b"multipart/form-data"
    form = FormInspector(frozenset({"model"}), media + b"; boundary=x")
    form.feed(body)
    form.finish()
    print(form.well_formed)
"""


def test_a_malformed_form_from_a_client_writes_no_log_line() -> None:
    """Forms are the clients' to send: a line per malformed one would let any client fill the log
    (python-multipart warns of each); the proxy answers them instead."""
    done = subprocess.run(
        [sys.executable, "-c", _FORM_READER], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "False" in done.stdout  # at least one was read as malformed
    assert done.stderr == ""
