"""Running a benchmark: warm-up, the measured phase (both routes interleaved when comparing), then
each route alone for throughput.

Each worker holds one keep-alive connection per route, kept across phases; with a comparison route
each worker alternates the two, half of the workers starting with either, so both see the same
machine noise. An interrupted run (Ctrl-C) stops where it is and reports what it measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httptools

from llm_proxy.tools.benchmark.client import Connection, Target
from llm_proxy.tools.benchmark.config import BenchmarkConfig
from llm_proxy.tools.benchmark.progress import ProgressSink
from llm_proxy.tools.benchmark.results import Added, BenchmarkReport, Delta, Throughput
from llm_proxy.tools.benchmark.sampling import Recorder

_TICK = 0.25


class _Plan:
    """Hands out request tickets until a count or a deadline is reached."""

    def __init__(self, requests: int | None, duration: float | None) -> None:
        self._left = requests
        self._started = time.perf_counter()
        self._deadline = self._started + (duration or 0.0)
        self.total = float(requests) if requests is not None else duration or 0.0
        self.done = 0

    def take(self) -> bool:
        if self._left is None:
            return time.perf_counter() < self._deadline
        self._left -= 1
        return self._left >= 0

    @property
    def progress(self) -> float:
        """Progress towards ``total``: tickets completed, or seconds elapsed."""
        return self.done if self._left is not None else time.perf_counter() - self._started


class _Engine:
    def __init__(self, config: BenchmarkConfig, progress: ProgressSink | None) -> None:
        self._config = config
        self._progress = progress
        self.proxy = config.target("proxy", config.base_url, config.token)
        self.direct = (
            config.target("direct", config.compare_url, config.compare_token)
            if config.compare_url is not None
            else None
        )
        # Connections outlive phases so that no phase pays for the previous one's set-up.
        self._pools: dict[str, list[Connection | None]] = {
            name: [None] * config.concurrency for name in ("proxy", "direct")
        }
        self._workers: list[asyncio.Task[None]] = []
        self.interrupted = False

    def interrupt(self) -> None:
        """Stop the run where it is; the requests in flight are dropped, neither timed nor failed."""
        self.interrupted = True
        for worker in self._workers:
            worker.cancel()

    async def run(self) -> BenchmarkReport:
        config = self._config
        both = [self.proxy] if self.direct is None else [self.proxy, self.direct]
        if config.warmup:
            await self._phase("warm-up", both, config.warmup, None)
        label = "measuring" if self.direct is None else "interleaved"
        recorders, seconds = await self._phase(label, both, config.requests, config.duration)
        proxy = recorders["proxy"].stats(self.proxy.url, seconds)
        if self.direct is None:
            return BenchmarkReport(config.describe(), proxy, interrupted=self.interrupted)
        direct = recorders["direct"].stats(self.direct.url, seconds)
        added = Added(
            Delta.between(proxy.latency_ms, direct.latency_ms),
            Delta.between(proxy.ttfb_ms, direct.ttfb_ms),
        )
        alone = {}
        for target in (self.direct, self.proxy):
            solo, solo_seconds = await self._phase(
                f"{target.name} alone", [target], config.requests, config.duration
            )
            alone[target.name] = solo[target.name].stats(target.url, solo_seconds)
        if self.interrupted:
            # One route alone, or both cut short at different points, make no ratio.
            return BenchmarkReport(config.describe(), proxy, direct, added, interrupted=True)
        direct_rps = alone["direct"].requests_per_second
        ratio = round(alone["proxy"].requests_per_second / direct_rps, 4) if direct_rps else None
        throughput = Throughput(alone["proxy"], alone["direct"], ratio)
        return BenchmarkReport(config.describe(), proxy, direct, added, throughput)

    async def _phase(
        self,
        label: str,
        targets: Sequence[Target],
        requests: int | None,
        duration: float | None,
    ) -> tuple[dict[str, Recorder], float]:
        recorders = {target.name: Recorder(self._config.stream) for target in targets}
        plan = _Plan(requests, duration)
        ticker = None
        if self._progress is not None:
            ticker = asyncio.create_task(_tick(self._progress, label, plan))
        started = time.perf_counter()
        try:
            # A cancelled worker (an interruption) ends the group like a finished one.
            async with asyncio.TaskGroup() as workers:
                self._workers = [
                    workers.create_task(self._worker(index, targets, plan, recorders))
                    for index in range(self._config.concurrency)
                ]
        finally:
            self._workers = []
            if ticker is not None:
                ticker.cancel()
                await asyncio.wait([ticker])
        return recorders, time.perf_counter() - started

    async def _worker(
        self,
        index: int,
        targets: Sequence[Target],
        plan: _Plan,
        recorders: dict[str, Recorder],
    ) -> None:
        turn = index
        while not self.interrupted and plan.take():
            for target in targets if turn % 2 == 0 else reversed(targets):
                await self._one(index, target, recorders[target.name])
            turn += 1
            plan.done += 1

    async def _one(self, index: int, target: Target, recorder: Recorder) -> None:
        pool = self._pools[target.name]
        conn = pool[index]
        try:
            if conn is None or not conn.open:
                conn = pool[index] = await self._connect(target)
                recorder.connections += 1
            started = await conn.exchange(target.payload)
        except (OSError, httptools.HttpParserError) as exc:
            recorder.failure(exc)
            if conn is not None:
                conn.close()
            pool[index] = None
            return
        recorder.response(conn, started)

    async def _connect(self, target: Target) -> Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._config.connect_timeout):
            _, conn = await loop.create_connection(
                lambda: Connection(loop, self._config.stream, self._config.timeout),
                target.host,
                target.port,
                ssl=True if target.tls else None,
            )
        return conn

    def close(self) -> None:
        for pool in self._pools.values():
            for conn in pool:
                if conn is not None:
                    conn.close()


async def _tick(progress: ProgressSink, label: str, plan: _Plan) -> None:
    progress.begin(label, plan.total)
    try:
        while True:
            await asyncio.sleep(_TICK)
            progress.update(plan.progress)
    finally:
        progress.end()


async def _interrupt_on(event: asyncio.Event, engine: _Engine) -> None:
    await event.wait()
    engine.interrupt()


async def run_benchmark(
    config: BenchmarkConfig,
    progress: ProgressSink | None = None,
    interrupt: asyncio.Event | None = None,
) -> BenchmarkReport:
    """Run the benchmark described by ``config``; transport failures are counted, not raised.

    Setting ``interrupt`` stops the run where it is: the report holds what was measured until
    then, and says it was interrupted."""
    engine = _Engine(config, progress)
    watcher = None
    if interrupt is not None:
        watcher = asyncio.create_task(_interrupt_on(interrupt, engine))
    try:
        return await engine.run()
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher])
        engine.close()
        # Let the transports run their close callbacks before the caller may close the loop.
        await asyncio.sleep(0)
