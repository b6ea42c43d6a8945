"""The server's side of the events process (started from :mod:`llm_proxy.runtime.events_process`).

:class:`EventOffload` is the proxy's ``ExchangeSink`` in production. ``submit`` appends the
exchange's wire form to a bounded queue; every ``linger`` seconds, or at once when a frame's
worth is waiting, the queue is pickled onto the events process's input, at most
``FRAME_EXCHANGES`` to a frame. That is all the server does for instrumentation. Building,
publishing, dispatching and aggregating happen in the events process, whose metrics and bus
reachability come back on a status pipe, on its ready line and then about once a second, and are
merged into the server's ``/metrics`` and ``/ready``.

The events process reads no faster than it builds, so when it falls behind the exchanges wait in
this process's write buffer, bounded by ``backlog_bytes``. From half of it on, they are sent
without their request bodies (counted in ``llm_proxy_events_request_bodies_shed``): a long prompt
is most of an exchange's bytes and of the events process's work for it, and its usage, cost and
budget settlement come from the answer. Beyond the bound only exchanges whose usage settles a
budget hold or a tpm window are still sent, so that spend is counted exactly, up to twice the
bound.

An exchange that settles something is sent at once, without waiting for others: the next request
of its token waits for its settlement (see ``proxy/settling.py``), which the events process reports
on its status pipe as soon as it is done.

Nothing is dropped silently: a full queue, a backlog beyond the bound, or exchanges lost when the
events process dies are counted in ``llm_proxy_events_dropped{reason=...}``, and the budget
settlements and tpm records it was still trying again as given up. A dead events process is
started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import deque
from dataclasses import replace
from typing import Any

import orjson
import structlog
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from llm_proxy.events import metrics
from llm_proxy.events.pipe import Launch, frame
from llm_proxy.pricing import Prices
from llm_proxy.proxy.exchange import (
    Exchange,
    Wire,
    wire_captured_bytes,
    wire_settlement,
    wire_settles,
    wire_without_request_body,
)
from llm_proxy.proxy.settling import Settlements

log = structlog.get_logger(__name__)

# Exchanges per frame. A frame is made in one go on the server's loop, and a request arriving
# meanwhile waits for it: 256 (the events process's batch) took ~0.7 ms. The events process wakes
# for each frame, so fewer than 64 cost throughput at saturation (32: 3 %).
FRAME_EXCHANGES = 64

_STATUS_FRESH_SECONDS = 5.0  # an older status says nothing about the bus now
# Seconds between starts of the events process: the first restart, and at most (doubling between).
_RESTART_SPACING = (1.0, 30.0)
# A status line carries the events process's whole metrics text.
_STATUS_LINE_LIMIT = 4 * 1024 * 1024


class EventProcessError(Exception):
    """The events process could not start (for example: the file event log is not writable).

    ``setting`` is the setting the events process blamed, when it named one."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class EventOffload:
    """Ships finished exchanges to the events process; implements ``ExchangeSink``."""

    def __init__(
        self,
        launch: Launch,
        *,
        entry: str,
        start_timeout: float = 30.0,
        close_timeout: float = 30.0,
        backlog_bytes: int = 64 * 1024 * 1024,
        settlements: Settlements | None = None,
    ) -> None:
        events = launch.events
        self._launch = launch
        self._entry = entry  # the module run as the events process (``python -m``)
        # Each exchange's wire form, made at submit: a frame is then only pickled and written,
        # and the exchange's objects are freed one request at a time rather than a frame's at once.
        self._queue: deque[Wire] = deque()
        self._queue_size = events.queue_size
        self._queue_bytes = events.queue_bytes
        self._parked_bytes = 0  # bodies queued while no events process runs (see _park)
        self._frame_size = min(events.batch_size, FRAME_EXCHANGES)
        self._linger = events.linger
        self._start_timeout = start_timeout
        self._close_timeout = close_timeout
        self._backlog_bytes = backlog_bytes
        # Told which exchanges went to be settled and, from the events process's status lines,
        # which are (admission waits for them: see proxy/settling.py).
        self._settlements = settlements
        self._loop = asyncio.get_running_loop()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._input: asyncio.StreamWriter | None = None  # None while no events process runs
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        self._status: dict[str, Any] = {}
        self._status_at = 0.0
        # What the running events process last said it would lose if it died: budget
        # settlements and tpm records to try again, and unwritten spend (metrics.left_waiting).
        self._waiting: dict[str, int] = {}
        self._sent_to_current = 0  # exchanges sent to the running events process
        self._done = 0  # of those, how many it reported done with (published or counted dropped)
        self.sent = 0
        self._drops = metrics.Drops("events.offload_dropped")
        self._shed = metrics.Shed()
        self.restarts = 0

    # -- starting and watching ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the events process; raises :class:`EventProcessError` if it cannot start."""
        await self._spawn()
        self._watcher = self._loop.create_task(self._watch(), name="events-process-watch")

    async def _spawn(self) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self._entry,
            str(os.getpid()),  # its parent: it ends when this process does (parent_watch.py)
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=_STATUS_LINE_LIMIT,
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(frame(self._launch))
        try:
            async with asyncio.timeout(self._start_timeout):
                line = await process.stdout.readline()
        except TimeoutError:
            line = b""
        answer: dict[str, Any] = (
            orjson.loads(line) if line.strip() else {"error": "it did not answer"}
        )
        if not answer.get("ready"):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            if setting := answer.get("setting"):
                raise EventProcessError(str(answer.get("error")), setting=str(setting))
            raise EventProcessError(f"the events process did not start: {answer.get('error')}")
        self._process, self._input = process, process.stdin
        self._sent_to_current = 0
        # The ready line carries the first status, so /ready is right from the start.
        self._status, self._status_at = answer, time.monotonic()
        self._done = int(answer.get("done", 0))
        self._waiting = answer.get("waiting", {})
        log.info("events.process_attached", pid=process.pid)
        self._flush()  # what queued up while no events process ran

    async def _watch(self) -> None:
        """Read status lines; when the events process dies, count the loss and start another."""
        spacing = _RESTART_SPACING[0]
        while True:
            process = self._process
            assert process is not None and process.stdout is not None
            started = time.monotonic()
            while line := await process.stdout.readline():
                message = orjson.loads(line)
                settled = message.get("settled")
                if settled is not None:
                    if self._settlements is not None:
                        self._settlements.settled(settled)
                elif "metrics" in message:
                    self._status, self._status_at = message, time.monotonic()
                if "done" in message:
                    self._done = int(message["done"])
                if "waiting" in message:
                    self._waiting = message["waiting"]
            code = await process.wait()
            if self._settlements is not None:
                # What it was sent will not be settled: nothing is to be waited for.
                self._settlements.forget_all()
            if self._closing:
                if code != 0:  # killed while it drained (its clean exit counted all it was sent)
                    self._died(code)
                return
            self._input = None
            self._died(code)
            if time.monotonic() - started > 60:
                spacing = _RESTART_SPACING[0]  # it had been running fine: restart promptly
            while True:
                await asyncio.sleep(spacing)  # (close cancels this wait)
                spacing = min(spacing * 2, _RESTART_SPACING[1])
                try:
                    await self._spawn()
                except (EventProcessError, OSError) as exc:
                    log.error("events.process_restart_failed", error=str(exc))
                    continue
                self.restarts += 1
                break

    # -- the request path -------------------------------------------------------------------------

    def submit(self, exchange: Exchange) -> None:
        """Queue a finished exchange. Never blocks, never raises."""
        if self._closing:
            self._drops.add("closing", 1)
            return
        queue = self._queue
        if len(queue) >= self._queue_size:
            self._drop_oldest()
        queue.append(exchange.to_wire())
        if self._input is None:
            # Settled once another events process runs (seconds away): not waited for.
            self._park(exchange.captured_bytes)
            return
        settles = exchange.settles
        if settles and self._settlements is not None:
            self._settlements.expect(exchange.token_id, exchange.request_id)
        # submit runs after the response went out; a full frame is sent from here, a partial one
        # when the linger timer fires, or at once when the next request of its token may wait
        # for its settlement.
        if settles or len(queue) >= self._frame_size:
            self._flush()
        elif self._flush_timer is None:
            self._flush_timer = self._loop.call_later(self._linger, self._flush)

    def _park(self, captured_bytes: int) -> None:
        """No events process runs (it died and is being restarted): the queue waits for the next
        one, bounded by the bytes of the bodies it holds as well as by its length."""
        self._parked_bytes += captured_bytes
        while self._parked_bytes > self._queue_bytes and len(self._queue) > 1:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        oldest = self._queue.popleft()
        self._parked_bytes = max(self._parked_bytes - wire_captured_bytes(oldest), 0)
        self._drops.add("queue_full", 1)
        self._never_settled([oldest])

    def _flush(self) -> None:
        """Send what is queued, a batch per frame."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        stdin = self._input
        queue = self._queue
        if stdin is None or not queue:
            return  # no events process right now: the queue waits (bounded) for the next one
        if stdin.transport.is_closing():
            # It died, and its input closed, a moment before the watcher saw it end (writing now
            # would raise): the queue waits for the next one as above.
            return
        backlog = stdin.transport.get_write_buffer_size()
        if backlog > self._backlog_bytes // 2:
            self._lighten(backlog)
        while queue:
            batch = [queue.popleft() for _ in range(min(self._frame_size, len(queue)))]
            stdin.write(frame(batch))
            self.sent += len(batch)
            self._sent_to_current += len(batch)
        self._parked_bytes = 0

    def _lighten(self, backlog: int) -> None:
        """The events process is behind (half the backlog bound is waiting for it): send the
        queued exchanges without their request bodies, which are most of the bytes of a large
        request and which usage and settlement need only when the answer carries no usage (a hold
        is then charged whole); beyond the bound, drop those whose usage nothing settles, and
        beyond twice the bound every one (all counted)."""
        queue = self._queue
        if backlog > 2 * self._backlog_bytes:
            kept: list[Wire] = []
        elif backlog > self._backlog_bytes:
            kept = [wire for wire in queue if wire_settles(wire)]
        else:
            kept = list(queue)
        self._drops.add("events_process_backlog", len(queue) - len(kept))
        if not kept:
            self._never_settled(list(queue))
        lightened = [wire_without_request_body(wire) for wire in kept]
        self._shed.add(sum(1 for wire in lightened if wire[-1]))
        queue.clear()
        queue.extend(lightened)

    def _never_settled(self, dropped: list[Wire]) -> None:
        if self._settlements is not None:
            self._settlements.settled(wire_settlement(w) for w in dropped if wire_settles(w))

    def _died(self, code: int) -> None:
        """Count what the events process took with it."""
        lost = self._unfinished()
        self._drops.add("events_process_died", lost)
        log.error("events.process_died", exit_code=code, lost=lost)
        self._count_unsettled()

    def _count_unsettled(self) -> None:
        """The settlements a dead events process was trying again (the store or Redis holding
        them was away), and the spend it had not written, died with it: counted as given up, as
        it counts those left at its close. As of its last report, which comes with every batch
        it publishes (so an event on the bus has its spend counted, written or lost) and every
        status line."""
        waiting, self._waiting = self._waiting, {}
        budget, tpm = waiting.get("budget", 0), waiting.get("tpm", 0)
        if budget or tpm:
            metrics.BUDGET_SETTLEMENTS.labels("failed").inc(budget)
            metrics.TPM_UNRECORDED.inc(tpm)
            log.error("events.settlements_given_up", budget=budget, tpm=tpm, reason="process_died")
        if spend := waiting.get("spend", 0):
            metrics.SPEND_LOST.inc(spend)
            log.error("events.spend_lost", nanousd=spend, reason="process_died")

    def _unfinished(self) -> int:
        """Exchanges sent to the running events process that it had not reported done. It reports
        each batch the moment its bus answered, so this is exact but for a death while the answer
        was on its way: an upper bound, by at most the batch it was publishing."""
        return max(self._sent_to_current - self._done, 0)

    @property
    def dropped(self) -> int:
        return self._drops.total

    # -- what the events process reports ------------------------------------------------------------

    def bus_reachable(self) -> bool:
        """Whether the events process is up and, a moment ago, reached its bus."""
        fresh = time.monotonic() - self._status_at < _STATUS_FRESH_SECONDS
        return self._input is not None and fresh and self._status.get("bus_reachable") is True

    def backlog_bytes(self) -> int:
        """Bytes of exchanges written towards the events process that its pipe has not taken."""
        stdin = self._input
        return stdin.transport.get_write_buffer_size() if stdin is not None else 0

    def metric_families(self) -> list[Metric]:
        """The events process's metrics, as of its last status line, and the backlog towards it."""
        text = self._status.get("metrics")
        families = list(text_string_to_metric_families(text)) if isinstance(text, str) else []
        backlog = GaugeMetricFamily(
            "llm_proxy_events_backlog_bytes",
            "Finished exchanges waiting for the events process to read them, in bytes (it reads "
            f"no faster than it builds; from {self._backlog_bytes // 2} bytes on their request "
            f"bodies are left out, beyond {self._backlog_bytes} bytes they are dropped as "
            "events_process_backlog unless they settle a budget or tpm limit).",
            value=self.backlog_bytes(),
        )
        return [*families, backlog]

    # -- reloading ------------------------------------------------------------------------------------

    def prices_reloaded(self, prices: Prices) -> None:
        """The server reloaded its prices: the events process reloads too (SIGHUP), and one
        started after a death begins with these."""
        self._launch = replace(self._launch, prices=prices)
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGHUP)

    # -- stopping -------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Send what is queued, let the events process drain and exit (bounded), then stop."""
        self._flush()
        self._closing = True
        process, stdin = self._process, self._input
        log.info("events.offload_closing", sent=self.sent, timeout=self._close_timeout)
        if stdin is None:
            # No events process is running (between a death and a restart): nothing can drain.
            self._drops.add("closing", len(self._queue))
            self._never_settled(list(self._queue))
            self._queue.clear()
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher
        else:
            # End of input: the events process drains what it was sent, then exits (the watcher
            # sees it). Not stdin.wait_closed(): the pipe empties only as it reads.
            stdin.close()
        if self._watcher is not None and not self._watcher.done() and process is not None:
            try:
                async with asyncio.timeout(self._close_timeout):
                    await asyncio.shield(self._watcher)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                lost = self._unfinished()
                self._drops.add("closing", lost)
                log.error("events.process_killed", reason="did not drain in time", lost=lost)
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher
                await process.wait()  # reaped: SIGKILL ends even a stopped process at once
        log.info("events.offload_closed", sent=self.sent, dropped=self.dropped)
