"""The events process: builds, publishes and aggregates events for one server process.

Started by :class:`~llm_proxy.events.offload.EventOffload` as ``python -m llm_proxy.runtime.events_process``.
It runs what the server would otherwise run beside its requests: the :class:`EventPipeline`, the
bus, and the in-process dispatchers (usage aggregates, the optional file log). The server then only
pickles batches of finished exchanges onto a pipe, so none of that work, nor the helper threads it
needs (aiosqlite, the builder), competes with requests for the server's GIL.

The pipe's protocol is described in :mod:`llm_proxy.events.pipe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import structlog
import uvloop
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from dispatcher.embedded import FileEventLogError, start_events_here
from dispatcher.worker import BackendStartError
from llm_proxy.events import metrics
from llm_proxy.events.cancelling import cancel_requested
from llm_proxy.events.courtesy import courteously
from llm_proxy.events.pipe import Launch, read_frame, read_sized_frame
from llm_proxy.events.pipeline import EventPipeline
from llm_proxy.pricing import PriceHolder, PricesError
from llm_proxy.proxy.exchange import Exchange
from llm_proxy.runtime.gc_tuning import tune_garbage_collector
from llm_proxy.runtime.logging_setup import configure_logging
from llm_proxy.runtime.parent_watch import PARENT_GONE, ParentWatch
from llm_proxy.store import Store
from llm_proxy.store.opening import open_store

log = structlog.get_logger(__name__)

NICENESS = 10
# Families this process reports to the server, which merges them into its own /metrics.
REPORTED_PREFIXES = (
    "llm_proxy_events_",
    "llm_proxy_dispatcher_",
    "llm_proxy_tokens",
    "llm_proxy_cost_usd",
)
# How often a status line waiting on a full pipe checks that the server is still there to read it.
_FULL_PIPE_CHECK_SECONDS = 0.5


class _Reported(Collector):
    """The metric families this process reports, out of everything registered in it."""

    def collect(self) -> Any:
        for family in REGISTRY.collect():
            if family.name.startswith(REPORTED_PREFIXES):
                yield family


_REPORTED = CollectorRegistry(auto_describe=False)
_REPORTED.register(_Reported())


class _Status:
    """Writes status lines to the server."""

    def __init__(self, fd: int, parent: ParentWatch) -> None:
        self._fd = fd
        self._parent = parent
        self.server_gone = False
        # Not blocking: the server's end may outlive the server (held by a process that inherited
        # it), and a write into that full pipe would never return.
        os.set_blocking(fd, False)

    def send(self, message: dict[str, Any]) -> None:
        if self.server_gone:
            return
        data = orjson.dumps(message) + b"\n"
        try:
            while data:
                try:
                    data = data[os.write(self._fd, data) :]
                except BlockingIOError:
                    # The server is behind (busy, or stopped): wait for it, as a blocking write
                    # would, but not for a server that has ended.
                    if not self._parent.parent_alive():
                        self.server_gone = True
                        return
                    select.select([], [self._fd], [], _FULL_PIPE_CHECK_SECONDS)
        except BrokenPipeError:
            # The server is gone (killed, or a worker stopped while it started): there is nobody
            # to tell. Our input ends with it, and that ends this process in the usual way.
            self.server_gone = True

    def done(self, count: int) -> None:
        """``count`` exchanges are done with (the pipeline's progress, told as it happens), and
        what their settlement left waiting: the spend of the events just published is then
        counted lost if this process dies before the next status line."""
        self.send({"done": count, "waiting": metrics.left_waiting()})


class _SettledReports:
    """Tells the server, on the status pipe, which of its exchanges are settled, as soon as they
    are: its next request on their tokens may be waiting for that (see ``proxy/settling.py``)."""

    def __init__(self, status: _Status) -> None:
        self._status = status

    def expect(self, token_id: str, request_id: str) -> None:
        return None  # the server knows what it sent

    def settled(self, requests: Iterable[Sequence[str]]) -> None:
        self._status.send({"settled": list(requests)})


async def _state(pipeline: EventPipeline) -> dict[str, Any]:
    """What a status line reports: progress, whether the bus answers now, the metrics."""
    try:
        async with asyncio.timeout(1.0):
            reachable = await pipeline.bus.ping()
    except TimeoutError:
        reachable = False
    return {
        "done": pipeline.done,
        "waiting": metrics.left_waiting(),
        "bus_reachable": reachable,
        "metrics": generate_latest(_REPORTED).decode(),
    }


async def _report(status: _Status, pipeline: EventPipeline) -> None:
    status.send(await _state(pipeline))


async def _report_every(seconds: float, status: _Status, pipeline: EventPipeline) -> None:
    while not cancel_requested():  # (its ping may swallow the cancellation: see cancelling.py)
        await asyncio.sleep(seconds)
        await _report(status, pipeline)


def _reload_prices(prices: PriceHolder) -> None:
    """SIGHUP, forwarded by the server after it reloaded its own: events built from now on are
    priced by the file as it is now."""
    try:
        current = prices.reload()
    except PricesError as exc:
        log.error("events.prices_reload_failed", error=str(exc))
    else:
        log.info("events.prices_reloaded", entries=len(current.entries))


async def _open(launch: Launch) -> tuple[EventPipeline, Store]:
    # The server migrated the database before starting this process.
    store = await open_store(launch.database_url, pool_size=2, migrate=False)
    try:
        pipeline = await start_events_here(
            launch.events,
            store,
            file_event_log=launch.file_event_log,
            prices=PriceHolder(launch.prices),
        )
    except BaseException:
        await store.close()
        raise
    return pipeline, store


def _server_gone(
    parent: ParentWatch,
    status: _Status,
    reader: asyncio.StreamReader,
    transport: asyncio.ReadTransport,
    fd: int,
) -> None:
    """The server ended (see ``parent_watch.py``): end the input as an end of file would, after
    what the pipe still holds, so that this process drains and exits the usual way. Usually the
    end of file is on its way anyway; it never comes if another process holds the server's end."""
    if parent.parent_alive():
        return  # not the server's end: the thread that started this process ended, or a stray kill
    status.server_gone = True  # nobody reads the status pipe any more
    if transport.is_closing():
        return  # the end of file came
    log.warning("events.server_gone", action="draining as at the end of input")
    transport.pause_reading()
    # What the server wrote before it ended is read and built like the rest, never left behind.
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 20):
            reader.feed_data(chunk)
    reader.feed_eof()


async def _run(status: _Status, parent: ParentWatch) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**31)
    stdin = os.fdopen(0, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    gone_args = (parent, status, reader, transport, stdin.fileno())
    loop.add_signal_handler(PARENT_GONE, _server_gone, *gone_args)
    # A server that ended before this handler was in place (even before this process asked to
    # be told) sent no signal: look once now. Every step before the read loop below is bounded,
    # so ending the input here is enough for the loop to see it.
    _server_gone(*gone_args)
    launch: Launch | None = await read_frame(reader)
    if launch is None:
        return 0  # the server went away before saying anything
    configure_logging(launch.log_level, launch.log_format, secrets=launch.log_secrets)
    try:
        pipeline, store = await _open(launch)
    except FileEventLogError as exc:
        # Named by its setting, as the server names its own start-up errors.
        status.send({"error": str(exc), "setting": "FILE_EVENT_LOG"})
        return 1
    except (BackendStartError, OSError) as exc:
        status.send({"error": str(exc)})
        return 1
    # From here the store is open: every exit goes through the finally below, or aiosqlite's
    # thread keeps the process alive.
    reporter: asyncio.Task[None] | None = None
    try:
        tune_garbage_collector()
        pipeline.settlements = _SettledReports(status)
        pipeline.progress = status.done
        loop.add_signal_handler(signal.SIGHUP, _reload_prices, pipeline.prices)
        # The ready line is the first status: the server serves once it has it, and its /ready
        # then answers from a real check of the bus rather than from no report at all.
        status.send({"ready": True, **await _state(pipeline)})
        log.info("events.process_started", pid=os.getpid(), bus=launch.events.bus)
        reporter = loop.create_task(_report_every(launch.status_seconds, status, pipeline))
        while (sized := await read_sized_frame(reader)) is not None:
            wires, size = sized
            # Read no further until the builder caught up: what waits stays in the pipe and the
            # server's backlog (bounded, and counted if it overflows). A frame's size bounds the
            # bodies it carries.
            await pipeline.wait_for_room(len(wires), size)
            for wire in courteously(wires):
                pipeline.submit(Exchange.from_wire(wire))
    finally:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        try:
            await pipeline.close()  # drains into the bus and the dispatchers
        finally:
            # Whatever the close raised: an open store's thread would keep this process (which
            # ignores SIGTERM) alive for good once its server is gone.
            await store.close()
        await _report(status, pipeline)
        log.info("events.process_stopped")
    # Non-zero when the server went away without hearing all this process had to say.
    return 1 if status.server_gone else 0


def _yield_to_requests() -> None:
    """Run as background work: on a busy host, requests come before events.

    Events tolerate delay (they queue, in order) and requests do not, so when CPUs are contended
    the kernel should give them to the server first. :data:`NICENESS` leaves this process a small
    share of a contended CPU; SCHED_BATCH stops it from preempting the server on wake-up. (Beyond
    what it can then keep up with, its queue stops taking exchanges, the pipe and the server's
    backlog fill, and what overflows that bound is counted as dropped.)
    """
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def main() -> None:
    # First: the server passes its pid, so that one that ended before this line is noticed too.
    parent = ParentWatch(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid())
    parent.arm()
    _yield_to_requests()
    # The server decides when this process stops (by closing its input, after draining); Ctrl-C
    # and a service manager's SIGTERM reach the whole process group and must not end it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # SIGHUP reloads the prices once the pipeline runs; until then it must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    status = _Status(os.dup(1), parent)
    os.dup2(2, 1)  # stray prints go to the log, never into the status pipe
    sys.stdout = sys.stderr
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(_run(status, parent))
    sys.exit(code)


if __name__ == "__main__":
    main()
