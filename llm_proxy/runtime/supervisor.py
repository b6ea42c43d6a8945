"""``--workers N``: the parent process keeps N workers serving until it is told to stop.

It forwards SIGINT and SIGTERM (stop: the workers finish their requests) and SIGHUP (reload the
prices) to every worker. A worker that dies while the parent is not stopping (the OOM killer, a
crash) is replaced, as nginx's master and gunicorn's arbiter replace theirs: at once after a
worker that had served a while, and with a doubling pause (1 s up to 30 s) after one that died
soon after it started, so a worker that cannot run does not fork in a loop. A worker of the
first generation that cannot start at all (a setting, the port, the database: it exits with
:data:`START_FAILED`) stops them all, so a bad start fails as it does with one worker. Were the
parent itself killed, the workers stop by themselves (``lifeline.py``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import structlog

from llm_proxy.runtime.lifeline import Lifeline

log = structlog.get_logger(__name__)

# A worker's exit code when it could not start (it printed why).
START_FAILED = 3
# A worker that dies sooner than this after starting is restarted after a pause that doubles
# from the first value up to the second; one that served longer is restarted at once.
RESTART_SPACING = (1.0, 30.0)
SERVED_A_WHILE = 30.0
_STOP_NOTICED_WITHIN = 1.0

# Called in the forked worker with its index, how often its slot was replaced, and the lifeline.
WorkerTarget = Callable[[int, int, Lifeline], None]


_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A worker's exit codes after a stop that are no failure: it finished, or the stop's signal ended it.
_STOPPED = (0, -signal.SIGTERM, -signal.SIGINT)


def _worker_main(target: WorkerTarget, index: int, restarts: int, lifeline: Lifeline) -> None:
    """In the forked worker: the signals' own actions until its loop installs handlers (SIGINT and
    SIGTERM end a worker that does not serve yet; SIGHUP is moot, it reads the prices as it
    starts), then the worker."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
    target(index, restarts, lifeline)


class _Slot:
    """Worker ``index``'s current process and when to start the next one."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: BaseProcess | None = None
        self.started = 0.0
        self.restart_at: float | None = None
        self.pause = 0.0
        self.restarts = 0


class Supervisor:
    def __init__(
        self, count: int, target: WorkerTarget, *, served_a_while: float = SERVED_A_WHILE
    ) -> None:
        self._target = target
        self._served_a_while = served_a_while
        self._context = multiprocessing.get_context("fork")
        self._lifeline = Lifeline()
        self._slots = [_Slot(n) for n in range(count)]
        self._stopping = False
        self._failed = False

    def run(self) -> int:
        """Start the workers and keep them running until SIGINT/SIGTERM; return an exit code."""
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGHUP, self._forward)  # each worker reloads its prices
        for slot in self._slots:
            self._start(slot)
        log.info("server.workers_started", workers=len(self._slots))
        try:
            while self._supervise():
                pass
        finally:
            self._lifeline.close()
        log.info("server.workers_stopped", workers=len(self._slots), failed=self._failed)
        return 1 if self._failed else 0

    def _supervise(self) -> bool:
        """Wait for a worker to end or a restart to fall due; False once all have ended."""
        running = [
            (slot.process.sentinel, slot) for slot in self._slots if slot.process is not None
        ]
        due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        if not running and (self._stopping or not due):
            return False
        timeout = None
        if due and not self._stopping:
            # At most a second: a stop asked for while no worker runs (all of them paused
            # between restarts) has no worker's end to wake this wait.
            timeout = min(max(min(due) - time.monotonic(), 0.0), _STOP_NOTICED_WITHIN)
        ended = set(wait([sentinel for sentinel, _ in running], timeout))
        for sentinel, slot in running:
            if sentinel in ended:
                self._ended(slot)
        now = time.monotonic()
        for slot in self._slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self._stopping:
                self._start(slot)
        return True

    def _start(self, slot: _Slot) -> None:
        process = self._context.Process(
            target=_worker_main,
            args=(self._target, slot.index, slot.restarts, self._lifeline),
            name=f"llm-proxy-worker-{slot.index}",
        )
        # A forked worker inherits this process's handlers, which would forward a signal to its
        # siblings instead of handling it: the signals wait, blocked, until it has its own.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        slot.process, slot.started, slot.restart_at = process, time.monotonic(), None
        if self._stopping:  # told to stop while this one was being forked
            self._forward(signal.SIGTERM, None)
        if slot.restarts:
            log.info("server.worker_restarted", worker=slot.index, pid=process.pid)

    def _ended(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None
        process.join()
        slot.process = None
        code = process.exitcode
        if self._stopping:
            # Ended by the signal forwarded to it counts as stopped: a worker still starting
            # (its handlers not yet installed) takes the signal's own action.
            self._failed |= code not in _STOPPED
            return
        if not slot.restarts and code == START_FAILED:
            log.error("server.worker_start_failed", worker=slot.index, action="stopping all")
            self._failed = True
            self._stop(signal.SIGTERM, None)
            return
        lived = time.monotonic() - slot.started
        if lived >= self._served_a_while:
            slot.pause = 0.0
        else:
            first, most = RESTART_SPACING
            slot.pause = min(max(slot.pause * 2, first), most)
        slot.restart_at = time.monotonic() + slot.pause
        slot.restarts += 1
        log.error(
            "server.worker_died",
            worker=slot.index,
            exit_code=code,
            lived_seconds=round(lived, 1),
            restart_in_seconds=slot.pause,
        )

    def _stop(self, signum: int, _frame: object) -> None:
        self._stopping = True
        for slot in self._slots:
            slot.restart_at = None
        self._forward(signum, _frame)

    def _forward(self, signum: int, _frame: object) -> None:
        # Not ``process.exitcode``: it reaps, and this runs as a signal handler, possibly while
        # the loop joins that process. A worker that died but is not joined yet is a zombie,
        # which a signal does not hurt.
        for slot in self._slots:
            process = slot.process
            if process is not None and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)
