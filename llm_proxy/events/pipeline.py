"""The :class:`~llm_proxy.proxy.exchange.ExchangeSink` the proxy hands finished exchanges to.

``submit`` only appends to an in-memory queue bounded in exchanges and in captured body bytes
(dropping and counting the oldest beyond either), so the request path never waits on
instrumentation; a producer that can wait (the events process's reader) waits for room instead.
A background task takes exchanges in batches, has their events built in a worker thread
(decompressing, parsing, reassembling streams, counting tokens) and publishes them.

In production this runs in the events process (:mod:`llm_proxy.runtime.events_process`), not in the server:
there, its CPU work and helper threads would compete with every request for the GIL. The server
runs it in-process only with ``event_build_in="thread"`` (tests, and hosts where an extra process
is unwelcome).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from operator import attrgetter
from typing import Protocol

import structlog

from llm_proxy.events import builder, metrics
from llm_proxy.events.bus import EventBus
from llm_proxy.events.config import SPOOL_FAMILY, EventsConfig
from llm_proxy.events.courtesy import release
from llm_proxy.events.event import Event
from llm_proxy.events.memory import MemoryBus
from llm_proxy.events.redis import RedisBus
from llm_proxy.events.settlement import TokenSettler
from llm_proxy.pricing import PriceHolder, Prices
from llm_proxy.proxy.exchange import Exchange, SettlementListener

log = structlog.get_logger(__name__)

# Summed over a batch with map, in C (a generator costs bytecodes per exchange).
_CAPTURED_BYTES = attrgetter("captured_bytes")


class Closeable(Protocol):
    async def close(self) -> None: ...


class EventPipeline:
    """Turns exchanges into events and publishes them; implements ``ExchangeSink``."""

    def __init__(
        self,
        bus: EventBus,
        *,
        queue_size: int = 10_000,
        queue_bytes: int = 256 * 1024 * 1024,
        batch_size: int = 256,
        close_timeout: float = 5.0,
        linger: float = 0.05,
        build: Callable[[Exchange], Event] | None = None,
        prices: PriceHolder | None = None,
    ) -> None:
        self.bus = bus
        # Read once per event: a reload (SIGHUP) prices the requests sent upstream after it.
        self.prices = prices if prices is not None else PriceHolder(Prices())
        self._queue: deque[Exchange] = deque()
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes  # captured body bytes the queued exchanges may hold
        self._queued_bytes = 0
        self._batch_size = batch_size
        self._close_timeout = close_timeout
        self._linger = linger
        self._build = build or self._build_priced
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()  # set whenever a batch leaves the queue (see wait_for_room)
        # Set while a queued exchange settles something: its batch goes without lingering, as
        # the next request of its token may be waiting for the settlement.
        self._settling = asyncio.Event()
        self._settling_queued = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-proxy-events")
        self._task: asyncio.Task[None] | None = None
        self._attached: list[Closeable] = []
        self._closing = False
        self._drops = metrics.Drops("events.pipeline_dropped")
        self._in_hand = 0  # exchanges of the batch taken from the queue, until published
        self._batched = 0  # exchanges whose batch went to the bus, or failed (counted there)
        self.published = 0
        # Told ``done`` whenever it grows: the events process tells the server at once, so that
        # what a dead one had done is not counted as lost (see offload.py).
        self.progress: Callable[[int], None] | None = None
        self._told = 0  # the last ``done`` it was told
        # Fills the tpm windows of the requests' tokens from their events (see settlement.py).
        self.settler: TokenSettler | None = None
        # Told what settles and when it is settled (the proxy's admission, or the server on the
        # other side of the events process's status pipe).
        self.settlements: SettlementListener | None = None

    def _build_priced(self, exchange: Exchange) -> Event:
        # Priced as it was held: at the prices in force when it went upstream.
        sent = exchange.upstream_started or exchange.started
        return builder.build(exchange, prices=self.prices.in_force_at(sent))

    def start(self) -> None:
        if isinstance(self.bus, MemoryBus):
            self.bus.on_finished = self._progressed
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event-pipeline")

    def attach(self, component: Closeable) -> None:
        """Close ``component`` (an in-process dispatcher) once the queue drained, before the bus."""
        self._attached.append(component)

    def submit(self, exchange: Exchange) -> None:
        """Queue a finished exchange. Never blocks, never raises."""
        if self._closing:
            self._drops.add("closing", request_id=exchange.request_id)
            return
        queue = self._queue
        queue.append(exchange)
        self._queued_bytes += exchange.captured_bytes
        if exchange.settles:
            self._settling_queued += 1
            self._settling.set()
            if self.settlements is not None:
                self.settlements.expect(exchange.token_id, exchange.request_id)
        if len(queue) > self._queue_size or self._queued_bytes > self._queue_bytes:
            self._drop_beyond_bounds()
        self._wakeup.set()

    def _drop_beyond_bounds(self) -> None:
        """Drop the oldest exchanges until the queue is within both bounds (the newest is kept)."""
        queue = self._queue
        while len(queue) > 1 and (
            len(queue) > self._queue_size or self._queued_bytes > self._queue_bytes
        ):
            oldest = queue.popleft()
            self._queued_bytes -= oldest.captured_bytes
            self._drops.add("queue_full", request_id=oldest.request_id)
            self._taken([oldest])
        self._progressed()

    async def wait_for_room(self, count: int, size: int) -> None:
        """Return once ``count`` exchanges holding ``size`` bytes of bodies can be submitted without
        dropping any (or, for more than the queue holds, once it is empty; or on closing).

        For a producer that can be held back: the events process waits here before each frame it
        reads, so a burst its builder cannot keep up with waits in the pipe and the server's
        bounded backlog instead of being dropped from this queue.
        """
        queue = self._queue
        while (
            queue
            and not self._closing
            and (
                len(queue) + count > self._queue_size
                or self._queued_bytes + size > self._queue_bytes
            )
        ):
            self._room.clear()
            await self._room.wait()

    @property
    def dropped(self) -> int:
        return self._drops.total

    @property
    def done(self) -> int:
        """Exchanges submitted that are done with: their events published, or dropped and counted
        (by this pipeline, or as ``build_failed`` / ``publish_failed``). On the memory bus an event
        is published only once every in-process dispatcher finished with it: until then it dies
        with this process."""
        held = self.bus.unfinished if isinstance(self.bus, MemoryBus) else 0
        return self._batched + self._drops.total - held

    def _progressed(self) -> None:
        if self.progress is not None:
            done = self.done
            if done != self._told:  # (a group finishing behind another changes nothing)
                self._told = done
                self.progress(done)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(queue) < self._batch_size and not self._closing:
                # Let a batch form: every hand-off to the builder and the bus has a fixed cost
                # that, paid per request at moderate traffic, would cost more than the work itself.
                # Not when something waits for a settlement.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._linger):
                        await self._settling.wait()
            batch = [queue.popleft() for _ in range(min(self._batch_size, len(queue)))]
            self._in_hand = len(batch)
            self._queued_bytes -= sum(map(_CAPTURED_BYTES, batch))
            self._room.set()
            metrics.QUEUE_DEPTH.set(len(queue))
            try:
                try:
                    events = await self._build_events(batch)
                    if self.settler is not None:
                        await self.settler.settle(batch, events)
                finally:
                    self._taken(batch)  # settled, or never will be: waiting is over either way
                await self.bus.publish(events)
            except asyncio.CancelledError:
                raise
            except Exception:  # a task boundary: keep the pipeline alive whatever one batch does
                log.exception("events.batch_failed", size=len(batch))
                metrics.DROPPED.labels("publish_failed").inc(len(batch))
                self._in_hand = 0
                self._batched += len(batch)
                self._progressed()
                continue
            self._in_hand = 0
            self._batched += len(batch)
            self.published += len(events)
            # Told the moment the bus answered: only a death while its answer was on the way (the
            # batch in the bus or not, this process cannot know) leaves the server counting the
            # batch as lost.
            self._progressed()
            release(events)
            release(batch)

    def _taken(self, exchanges: list[Exchange]) -> None:
        """``exchanges`` left the queue, and what they settle is done with."""
        if not self._settling_queued:
            return
        settling = [(e.token_id, e.request_id) for e in exchanges if e.settles]
        if not settling:
            return
        self._settling_queued -= len(settling)
        if not self._settling_queued:
            self._settling.clear()
        if self.settlements is not None:
            self.settlements.settled(settling)

    async def _build_events(self, batch: list[Exchange]) -> list[Event]:
        built = await asyncio.get_running_loop().run_in_executor(
            self._executor, partial(builder.build_batch, batch, self._build)
        )
        events, failures = built.events, built.failures
        for request_id, error in failures:
            log.error("events.build_failed", request_id=request_id, error=error)
            metrics.DROPPED.labels("build_failed").inc()
        sources = Counter(
            event["usage"]["source"] if event["usage"] else "none" for event in events
        )
        for source, count in sources.items():
            metrics.USAGE.labels(source).inc(count)
        metrics.count_spend(events, self.prices.current)
        return events

    async def close(self) -> None:
        """Drain the queue into the bus (bounded by ``close_timeout``), then close what is attached
        and the bus. Exchanges still queued when time runs out are dropped and counted."""
        self._closing = True
        self._wakeup.set()
        self._room.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(self._close_timeout):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
                # The batch cancelled on its way to the bus is lost as well as the queue.
                left = len(self._queue) + self._in_hand
                self._in_hand = 0
                self._taken(list(self._queue))
                self._queue.clear()
                self._queued_bytes = 0
                self._drops.add("closing", left)
                log.warning("events.pipeline_drain_timed_out", dropped=left)
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        for component in self._attached:
            await component.close()
        if self.settler is not None:
            await self.settler.close()
        await self.bus.close()
        log.info("events.pipeline_closed", published=self.published, dropped=self.dropped)


async def open_bus(config: EventsConfig) -> EventBus:
    if config.bus == "redis":
        return await RedisBus.open(
            config.redis_url,
            stream=config.stream,
            maxlen=config.maxlen,
            spool_path=config.spool_path,
            spool_max_bytes=config.spool_max_bytes,
            spool_family=SPOOL_FAMILY,
            claim_idle=config.claim_idle,
            gone_group_idle=config.gone_group_idle,
        )
    return MemoryBus(config.memory_maxlen)


async def start_event_pipeline(
    config: EventsConfig, prices: PriceHolder | None = None
) -> EventPipeline:
    """Open the configured bus and start the pipeline. Redis need not be reachable yet.

    ``prices`` give the events' ``cost_usd``; without them no model is priced."""
    pipeline = EventPipeline(
        await open_bus(config),
        queue_size=config.queue_size,
        queue_bytes=config.queue_bytes,
        batch_size=config.batch_size,
        close_timeout=config.close_timeout,
        linger=config.linger,
        prices=prices,
    )
    pipeline.start()
    log.info("events.pipeline_started", bus=config.bus)
    return pipeline
