"""``runtime/supervisor.py`` with a stand-in worker body: what a forked worker starts with.

The real workers are driven in ``test_workers.py``; here the worker only reports the signal
state it was started in, which a real worker replaces within a second, too soon to observe."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

SUPERVISED = textwrap.dedent(
    """
    import json, select, signal, sys
    from pathlib import Path
    from llm_proxy.runtime.supervisor import Supervisor

    out = Path(sys.argv[1])

    def worker(index, restarts, lifeline):
        state = {
            "pid": __import__("os").getpid(),
            "sigint_default": signal.getsignal(signal.SIGINT) is signal.SIG_DFL,
            "sigterm_default": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
            "sighup_ignored": signal.getsignal(signal.SIGHUP) is signal.SIG_IGN,
            "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        }
        (out / f"{index}-{restarts}.json").write_text(json.dumps(state))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # As a real worker does, end when the parent does (were the test to kill it).
        read_end = lifeline.in_worker()
        while not select.select([read_end], [], [], 0.05)[0]:
            pass

    sys.exit(Supervisor(2, worker).run())
    """
)


def wait_for(path: Path, timeout: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path.name} never written"
        time.sleep(0.02)
    state: dict[str, object] = json.loads(path.read_text())
    return state


def test_workers_start_with_the_signals_own_actions_not_the_parents_handlers(
    tmp_path: Path,
) -> None:
    """A forked worker inherits its parent's handlers: until its loop installs its own, a SIGTERM
    would forward itself to the worker's siblings instead of ending it. Checked for the first
    workers and for a replacement (forked while the parent's handlers are installed)."""
    output = (tmp_path / "output").open("wb")
    parent = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED, str(tmp_path)],
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    try:
        first = [wait_for(tmp_path / f"{n}-0.json") for n in (0, 1)]
        os.kill(int(str(first[0]["pid"])), signal.SIGKILL)
        replacement = wait_for(tmp_path / "0-1.json")  # after the 1 s pause
        for state in [*first, replacement]:
            assert state["sigint_default"] and state["sigterm_default"], state
            assert state["sighup_ignored"] and state["blocked"] == [], state

        parent.send_signal(signal.SIGTERM)
        assert parent.wait(10) == 0, (tmp_path / "output").read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        output.close()
    # The parent logged the death and the replacement.
    log = (tmp_path / "output").read_text()
    assert "server.worker_died" in log and "server.worker_restarted" in log


CRASHING = textwrap.dedent(
    """
    import sys
    from llm_proxy.runtime.supervisor import Supervisor

    def worker(index, restarts, lifeline):
        sys.exit(1)  # dies at once, every time

    sys.exit(Supervisor(1, worker).run())
    """
)


def stop_after_deaths(script: str, output_path: Path, deaths: int) -> float:
    """Run ``script`` (a supervisor over a stand-in worker) until it has logged ``deaths`` worker
    deaths, then SIGTERM it; the seconds it took to stop."""
    with output_path.open("wb") as output:
        parent = subprocess.Popen(
            [sys.executable, "-c", script], stdout=output, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 15
            while output_path.read_text().count("server.worker_died") < deaths:
                assert time.monotonic() < deadline, output_path.read_text()
                time.sleep(0.05)
            parent.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            assert parent.wait(10) == 0, output_path.read_text()
            return time.monotonic() - stopped
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()


def pauses(output_path: Path) -> list[str]:
    """Each logged death's pause before the restart (structlog's console lines: nothing
    configured it in these scripts)."""
    return re.findall(r"server\.worker_died .*restart_in_seconds=(\S+)", output_path.read_text())


def test_a_worker_that_keeps_dying_is_restarted_ever_more_slowly_and_a_stop_still_ends_at_once(
    tmp_path: Path,
) -> None:
    # After the third death the pause is 4 s: no worker runs, and none ends to wake the parent.
    took = stop_after_deaths(CRASHING, tmp_path / "output", deaths=3)
    assert took < 3.0
    assert pauses(tmp_path / "output")[:3] == ["1.0", "2.0", "4.0"]


SERVING_A_WHILE = textwrap.dedent(
    """
    import sys, time
    from llm_proxy.runtime.supervisor import Supervisor

    def worker(index, restarts, lifeline):
        # No handler of its own, as a worker still starting: the parent's SIGTERM ends it by the
        # signal's own action, which is a clean stop.
        time.sleep(0.6)  # serves "a while" (0.5 s here), then dies
        sys.exit(1)

    sys.exit(Supervisor(1, worker, served_a_while=0.5).run())
    """
)


def test_a_worker_that_served_a_while_is_replaced_at_once_every_time(tmp_path: Path) -> None:
    stop_after_deaths(SERVING_A_WHILE, tmp_path / "output", deaths=3)
    assert pauses(tmp_path / "output")[:3] == ["0.0", "0.0", "0.0"]
