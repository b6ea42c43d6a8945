"""The dispatcher worker: drains one consumer group of the event bus into one backend.

Modelled on arq's worker: batches by size and time; retries refused events with capped exponential
backoff and jitter, or after the backend's ``Retry-After`` up to the same cap; writes permanent
refusals to a dead-letter file; acknowledges a bus entry only after the backend accepted it (or it
was dead-lettered), so a crash means redelivery, never loss.
On SIGTERM it stops reading, lets the batch in hand finish for at most ``drain_timeout`` seconds,
then stops and logs a summary. In ``burst`` mode it exits once the bus is idle, or as soon as the
bus cannot be reached. When the backend refuses the credentials it stops at once, dead-lettering
nothing: what it had not delivered stays unacknowledged, handed back for the next dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from dispatcher import metrics
from dispatcher.backends import Backend, BackendError, Rejection
from dispatcher.deadletter import DeadLetterFile
from dispatcher.exit_codes import Exit
from dispatcher.retry import Backoff, asked_wait
from llm_proxy.events import metrics as events_metrics
from llm_proxy.events.bus import BusUnavailable, Delivery, EventBus, Subscription
from llm_proxy.events.courtesy import courteously, release
from llm_proxy.events.event import end_epoch
from llm_proxy.events.redis import consumer_name

log = structlog.get_logger(__name__)

_BURST_ACK_ATTEMPTS = 5
# How long a stop waits for a heartbeat in flight to reach Redis before giving it up.
_LAST_BEAT_SECONDS = 5.0
# Events read at a time from a memory bus group left behind at a stop, to be dead-lettered.
_QUEUED_READ = 1000
# Attempts at an event the backend raised on, whatever max_attempts says: what raises again
# and again will not go through, and retried for ever it would hold up every event behind it.
_RAISED_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    service: str  # also the consumer group unless ``group`` says: each group gets every event
    dead_letter_path: Path
    batch_size: int = 100
    batch_wait: float = 1.0  # how long a started batch may wait to fill up
    poll: float = 1.0  # how long one read waits for a first event
    max_attempts: int = 0  # 0: retry until accepted (or shutdown); else dead-letter after this many
    backoff: Backoff = field(default_factory=Backoff)
    drain_timeout: float = 10.0
    burst: bool = False
    heartbeat_interval: float = 5.0
    # What an operator fixes when the backend refuses the credentials, for that log line.
    credentials: str = "the backend's credentials"
    group: str = ""  # the consumer group, when not the service's own
    from_start: bool = True  # a new group on a durable bus also gets the events it already holds


@dataclass(slots=True)
class Summary:
    delivered: int = 0
    dead_lettered: int = 0
    retried: int = 0
    redelivered: int = 0
    batches: int = 0


class Heartbeat(Protocol):
    async def beat(self, summary: Mapping[str, object]) -> None: ...

    async def clear(self) -> None: ...


class Handback(Protocol):
    async def release(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        """Make unacknowledged deliveries available to the group's other consumers at once."""
        ...


class BackendStartError(Exception):
    """The backend could not start (unreachable, unwritable path)."""


class AuthFailed(Exception):
    """The backend refused the credentials, at start or on a send. ``answer`` is its status or
    error code, never the credentials; ``unacknowledged`` counts the events read but not delivered,
    left on the bus."""

    def __init__(self, backend: str, answer: str, unacknowledged: int) -> None:
        super().__init__(f"{backend} refused the credentials ({answer})")
        self.backend = backend
        self.answer = answer
        self.unacknowledged = unacknowledged


class Worker:
    def __init__(
        self,
        bus: EventBus,
        backend: Backend,
        settings: WorkerSettings,
        *,
        heartbeat: Heartbeat | None = None,
        handback: Handback | None = None,
        consumer: str | None = None,
    ) -> None:
        self.bus = bus
        self.backend = backend
        self.settings = settings
        self._group = settings.group or settings.service
        self.summary = Summary()
        self._heartbeat = heartbeat
        self._handback = handback
        self._consumer = consumer or consumer_name()
        self._dead_letters = DeadLetterFile(settings.dead_letter_path)
        self._subscription: Subscription | None = None
        self._backend_started = False
        self._task: asyncio.Task[Summary] | None = None
        self._deadline: asyncio.Timeout | None = None
        self._stopping = False
        self._draining = False  # stop() or drain() asked for a bounded finish
        self._burst = settings.burst
        self._inflight: list[Delivery] = []
        self._bus_failures = 0
        self._bus_lost = False  # a burst run gave up on an unreachable bus
        self._auth_failure: Rejection | None = None
        self._unkept = False  # a burst run stopped: refused events it could not dead-letter
        self._running = False
        self._beats_end = asyncio.Event()

    @property
    def running(self) -> bool:
        """Whether the loop runs: once the backend has started, until the loop ends (drain included)."""
        return self._running

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Join the consumer group and start the backend, so start-up errors surface here.

        Raises :class:`BackendStartError`, or :class:`AuthFailed`.
        """
        subscription = self._subscribe()
        if not self._backend_started:
            try:
                await self.backend.start()
            except Exception as exc:
                await subscription.close()
                self._subscription = None
                await self.backend.close()  # release what a half-done start opened
                if isinstance(exc, BackendError) and exc.rejection.auth:
                    raise AuthFailed(self.backend.name, exc.rejection.reason, 0) from None
                raise BackendStartError(f"{self.backend.name}: {exc}") from exc
            self._backend_started = True

    def _subscribe(self) -> Subscription:
        if self._subscription is None:
            self._subscription = self.bus.subscribe(
                self._group, self._consumer, from_start=self.settings.from_start
            )
        return self._subscription

    def start(self) -> asyncio.Task[Summary]:
        """Join the consumer group now (so nothing published from here on is missed) and run."""
        if self._task is None:
            self._subscribe()
            self._task = asyncio.get_running_loop().create_task(
                self._main(), name=f"dispatcher-{self.settings.service}"
            )
        return self._task

    async def async_run(self) -> Summary:
        """Run until stopped (or, in burst mode, idle).

        Raises :class:`BackendStartError`, or :class:`AuthFailed` (which stops a running worker).
        """
        return await self.start()

    async def serve(self) -> Exit:
        """Run with SIGTERM/SIGINT handlers installed; the exit code for the CLI."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.async_run()
        except AuthFailed as exc:
            # The one line an operator needs: which service, what it answered, what to do.
            log.error(
                "dispatcher.auth_failed",
                service=self.settings.service,
                status=exc.answer,
                unacknowledged=exc.unacknowledged,
                action=f"fix {self.settings.credentials} and restart: events not delivered "
                "stay on the bus, none were dead-lettered",
            )
            return Exit.AUTH
        except BackendStartError as exc:
            log.error("dispatcher.start_failed", service=self.settings.service, error=str(exc))
            return Exit.FAILED
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return self.outcome()

    def outcome(self) -> Exit:
        """How the run went, as an exit code. A burst run succeeds only if it delivered all it read;
        a long-running worker stopped by a signal has done its job, dead letters or not."""
        if self._bus_lost:
            return Exit.BUS_UNAVAILABLE
        if self._unkept:
            return Exit.FAILED
        if self.settings.burst and self._subscription is not None and self._subscription.lost:
            return Exit.EVENTS_LOST
        if self.settings.burst and self.summary.dead_lettered:
            return Exit.DEAD_LETTERED
        return Exit.OK

    def stop(self) -> None:
        """Stop taking work; the batch in hand has ``drain_timeout`` seconds to finish."""
        if self._stopping:
            return
        self._stopping = True
        log.info("dispatcher.stopping", service=self.settings.service)
        self._set_deadline()

    async def drain(self) -> Summary:
        """Deliver what the bus holds until it is idle (at most ``drain_timeout``), then stop.

        How an in-process dispatcher shuts down: the memory bus has no one else to hand events to.
        """
        self._burst = True
        self._set_deadline()
        return await self.start()

    async def close(self) -> None:
        await self.drain()

    def _set_deadline(self) -> None:
        self._draining = True
        if self._deadline is not None and self._running:
            when = asyncio.get_running_loop().time() + self.settings.drain_timeout
            if self._deadline.when() is None:
                self._deadline.reschedule(when)

    # -- the loop ----------------------------------------------------------------------------

    async def _main(self) -> Summary:
        started = time.monotonic()
        await self.open()
        subscription = self._subscribe()
        beating = asyncio.create_task(self._beat()) if self._heartbeat else None
        log.info("dispatcher.started", service=self.settings.service, consumer=self._consumer)
        timed_out = False
        self._running = True
        try:
            async with asyncio.timeout(None) as self._deadline:
                if self._draining:
                    self._set_deadline()  # stop() or drain() came before the loop began
                while not self._stopping:
                    batch = await self._collect(subscription)
                    if batch:
                        await self._process(subscription, batch)
                        release(batch)
                    elif self._burst:
                        # Idle, or unreachable: a burst run reports that rather than wait for it.
                        self._bus_lost = self._bus_failures > 0
                        break
        except TimeoutError:
            if self._deadline is None or not self._deadline.expired():
                raise  # not our drain deadline
            timed_out = True
            await self._abandon(subscription, "not delivered before shutdown")
        finally:
            self._running = False
            if self._auth_failure is not None:
                await self._abandon(
                    subscription, f"credentials refused ({self._auth_failure.reason})"
                )
            elif self._unkept:
                await self._abandon(subscription, "refused, and the dead-letter file unwritable")
            if beating is not None:
                await self._end_beats(beating)
                await self._clear_heartbeat()
            await subscription.close()
            await self.backend.close()
            log.info(
                "dispatcher.stopped",
                service=self.settings.service,
                seconds=round(time.monotonic() - started, 3),
                drain_timed_out=timed_out,
                **asdict(self.summary),
            )
        if self._auth_failure is not None:
            left = len(self._inflight) if self.bus.kind != "memory" else 0  # else dead-lettered
            raise AuthFailed(self.backend.name, self._auth_failure.reason, left)
        return self.summary

    async def _collect(self, subscription: Subscription) -> list[Delivery]:
        """A batch: the first events within ``poll``, then more until full or ``batch_wait``."""
        size = self.settings.batch_size
        # Draining an in-process bus: its publisher finished first, so all there is has been
        # queued and an empty read means done, without waiting ``poll`` to be sure.
        poll = 0.0 if self._draining and self.bus.kind == "memory" else self.settings.poll
        batch = await self._read(subscription, size, poll)
        if not batch or len(batch) >= size:
            return batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batch_wait
        while len(batch) < size and not self._stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            more = await self._read(subscription, size - len(batch), remaining)
            if not more:
                break
            batch.extend(more)
        return batch

    async def _read(self, subscription: Subscription, count: int, wait: float) -> list[Delivery]:
        try:
            deliveries = await subscription.read(count, wait)
        except BusUnavailable as exc:
            self._bus_failures += 1
            if self._bus_failures == 1 or self._bus_failures % 30 == 0:  # an outage, not a flood
                log.warning(
                    "dispatcher.bus_unavailable",
                    service=self.settings.service,
                    error=str(exc),
                    attempts=self._bus_failures,
                )
            await asyncio.sleep(min(self.settings.backoff.delay(self._bus_failures), 2.0))
            return []
        if self._bus_failures:
            log.info("dispatcher.bus_recovered", attempts=self._bus_failures)
            self._bus_failures = 0
        return deliveries

    async def _process(self, subscription: Subscription, batch: list[Delivery]) -> None:
        name = self.backend.name
        self.summary.batches += 1
        metrics.BATCHES.labels(name).inc()
        redelivered = sum(1 for d in batch if d.redelivered)
        if redelivered:
            self.summary.redelivered += redelivered
            metrics.REDELIVERED.labels(name).inc(redelivered)
        every = subscription.keep_every
        keeper = None if every is None else asyncio.create_task(self._keep(subscription, every))
        try:
            await self._deliver(subscription, batch)
        finally:
            if keeper is not None:
                # Waited for, so that a keep under way cannot land after the batch's acks, nor
                # its task be left pending when the dispatcher stops.
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)

    async def _keep(self, subscription: Subscription, every: float) -> None:
        """While a batch is delivered (slowly, or retried for minutes), keep its entries from
        being taken over by another dispatcher of the service as a dead one's."""
        while True:
            await asyncio.sleep(every)
            try:
                await subscription.keep([d.id for d in self._inflight])
            except BusUnavailable as exc:  # then the next reads fail as well, and say so
                log.warning("dispatcher.keep_failed", error=str(exc))

    async def _deliver(self, subscription: Subscription, pending: list[Delivery]) -> None:
        name = self.backend.name
        attempt = 0
        while pending:
            self._inflight = pending
            attempt += 1
            refused = await self._send(pending)
            accepted = [d for i, d in enumerate(pending) if i not in refused]
            auth = next((r for r in refused.values() if r.auth), None)
            if auth is not None:
                # Nothing else gets through either: keep what was delivered, stop, leave the rest.
                await self._ack(subscription, [d.id for d in accepted])
                self._count(accepted, [], [])
                self._inflight = [d for i, d in enumerate(pending) if i in refused]
                self._auth_failure = auth
                self._stopping = True
                return
            dead = [
                (d, refused[i].reason)
                for i, d in enumerate(pending)
                if i in refused and not refused[i].retryable
            ]
            retry = [
                (d, refused[i].reason)
                for i, d in enumerate(pending)
                if i in refused and refused[i].retryable
            ]
            if retry and 0 < self.settings.max_attempts <= attempt:
                dead += [(d, f"gave up after {attempt} attempts: {reason}") for d, reason in retry]
                retry = []
            elif attempt >= _RAISED_ATTEMPTS:
                raised = {
                    id(d) for i, d in enumerate(pending) if i in refused and refused[i].raised
                }
                dead += [
                    (d, f"gave up after {attempt} attempts: {reason}")
                    for d, reason in retry
                    if id(d) in raised
                ]
                retry = [(d, reason) for d, reason in retry if id(d) not in raised]
            if not await self._kept_dead(dead):
                # Acknowledged, they would be lost; crashing would send the accepted ones again.
                retry += dead
                dead = []
                if self.settings.burst:
                    # A burst run must end: leave them on the bus for the next run.
                    await self._ack(subscription, [d.id for d in accepted])
                    self._count(accepted, [], [])
                    self._inflight = [d for d, _ in retry]
                    self._unkept = True
                    self._stopping = True
                    return
            await self._ack(subscription, [d.id for d in accepted] + [d.id for d, _ in dead])
            self._count(accepted, dead, retry)
            pending = [d for d, _ in retry]
            if pending:
                delay = self.settings.backoff.delay(attempt, asked_wait(refused.values()))
                log.warning(
                    "dispatcher.delivery_failed",
                    backend=name,
                    count=len(pending),
                    attempt=attempt,
                    reason=retry[0][1],
                    delay=round(delay, 3),
                )
                await asyncio.sleep(delay)
        self._inflight = []

    async def _send(self, pending: Sequence[Delivery]) -> dict[int, Rejection]:
        try:
            return await self.backend.send([d.event for d in pending])
        except BackendError as exc:
            return dict.fromkeys(range(len(pending)), exc.rejection)
        except Exception as exc:  # a task boundary: an unexpected failure is retried, not fatal
            if len(pending) > 1:
                # Halves, down to the events that raise: the others go through meanwhile.
                half = len(pending) // 2
                first = await self._send(pending[:half])
                second = await self._send(pending[half:])
                return first | {half + i: rejection for i, rejection in second.items()}
            log.exception("dispatcher.backend_raised", backend=self.backend.name)
            return {0: Rejection(f"the backend raised {exc!r}", retryable=True, raised=True)}

    async def _dead_letter(self, dead: Sequence[tuple[Delivery, str]]) -> None:
        if dead:
            await self._dead_letters.write(self.backend.name, [(d.event, r) for d, r in dead])
            log.error(
                "dispatcher.dead_lettered",
                backend=self.backend.name,
                count=len(dead),
                reason=dead[0][1],
                path=str(self._dead_letters.path),
            )

    async def _kept_dead(self, dead: Sequence[tuple[Delivery, str]]) -> bool:
        """Dead-letter ``dead``; False when the file cannot be written (a full disk, a path
        that is not a directory): they stay in hand, tried again until it can."""
        try:
            await self._dead_letter(dead)
        except OSError as exc:
            log.error(
                "dispatcher.dead_letter_failed",
                backend=self.backend.name,
                count=len(dead),
                path=str(self._dead_letters.path),
                error=str(exc),
            )
            return False
        return True

    async def _ack(self, subscription: Subscription, ids: list[str]) -> None:
        attempt = 0
        while ids:
            try:
                await subscription.ack(ids)
                return
            except BusUnavailable as exc:
                # Not acknowledging means redelivery (a duplicate), so keep trying while we may;
                # a burst run gives up soon, as it does on reads.
                attempt += 1
                log.warning("dispatcher.ack_failed", error=str(exc), attempt=attempt)
                if self._burst and attempt >= _BURST_ACK_ATTEMPTS:
                    self._bus_lost = True
                    self._stopping = True
                    return
                await asyncio.sleep(self.settings.backoff.delay(attempt))

    def _count(
        self,
        accepted: Sequence[Delivery],
        dead: Sequence[tuple[Delivery, str]],
        retry: Sequence[tuple[Delivery, str]],
    ) -> None:
        name = self.backend.name
        self.summary.delivered += len(accepted)
        self.summary.dead_lettered += len(dead)
        self.summary.retried += len(retry)
        metrics.DELIVERED.labels(name).inc(len(accepted))
        metrics.DEAD_LETTERED.labels(name).inc(len(dead))
        metrics.FAILURES.labels(name, "retryable").inc(len(retry))
        metrics.FAILURES.labels(name, "permanent").inc(len(dead))
        now = time.time()
        lag = metrics.LAG.of(name)
        for delivery in courteously(accepted):
            lag.observe(max(0.0, now - end_epoch(delivery.event)))

    async def _abandon(self, subscription: Subscription, reason: str) -> None:
        """Stopping with a batch in hand that was not delivered (drain deadline, refused
        credentials); on the memory bus, with the events still queued for this dispatcher too."""
        if self.bus.kind == "memory":
            # Nothing will redeliver these; keep them where an operator can find them.
            left = list(self._inflight)
            while queued := await subscription.read(_QUEUED_READ, 0):
                left += queued
            if left:
                await self._dead_letter_left([(d, reason) for d in left])
                # Dead-lettered, or counted lost: the bus need not count them as in hand.
                await subscription.ack([d.id for d in left])
            return
        if not self._inflight:
            return
        count = len(self._inflight)
        if self._handback is not None:
            try:
                await self._handback.release(
                    self._group, self._consumer, [d.id for d in self._inflight]
                )
            except Exception as exc:  # a task boundary: they are still redelivered, only later
                log.warning("dispatcher.handback_failed", error=str(exc), count=count)
            else:
                log.info("dispatcher.unacked_handed_back", count=count)
                return
        log.warning("dispatcher.unacked_left_for_redelivery", count=count)

    async def _dead_letter_left(self, dead: Sequence[tuple[Delivery, str]]) -> None:
        try:
            await self._dead_letter(dead)
        except OSError as exc:
            # Nowhere to keep them either (the disk of the log is full, say): count them as lost.
            events_metrics.DROPPED.labels("undelivered_at_stop").inc(len(dead))
            log.error(
                "dispatcher.undelivered_dropped",
                backend=self.backend.name,
                count=len(dead),
                error=str(exc),
            )
            return
        self.summary.dead_lettered += len(dead)
        metrics.DEAD_LETTERED.labels(self.backend.name).inc(len(dead))

    async def _beat(self) -> None:
        assert self._heartbeat is not None
        while not self._beats_end.is_set():
            try:
                await self._heartbeat.beat({"consumer": self._consumer, **asdict(self.summary)})
            except Exception as exc:  # a task boundary: a missed beat must not stop delivery
                log.warning("dispatcher.heartbeat_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_interval):
                    await self._beats_end.wait()

    async def _end_beats(self, beating: asyncio.Task[None]) -> None:
        # A beat is let finish, not cancelled: a cancelled SET may still reach Redis after the
        # clear, and say "alive" for its whole ttl. One that hangs is cancelled after a while.
        self._beats_end.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_LAST_BEAT_SECONDS):
                await beating

    async def _clear_heartbeat(self) -> None:
        assert self._heartbeat is not None
        try:
            await self._heartbeat.clear()
        except Exception as exc:  # the key expires on its own anyway
            log.warning("dispatcher.heartbeat_clear_failed", error=str(exc))
