"""In-process bus: a bounded queue per consumer group, fanned out on publish.

Publishing never waits: when a group's queue is full its oldest event is dropped and counted, so a
stuck dispatcher costs events, never request latency or unbounded memory. Unacknowledged deliveries
are not redelivered (there is no other process to hand them to); the in-process worker dead-letters
what it could not deliver instead.

An event published here is still only in this process's memory: :attr:`MemoryBus.unfinished`
counts those some group has not finished with (acknowledged, or dropped and counted), so that
what dies with the process is counted lost rather than taken for done (see ``offload.py``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Sequence

from llm_proxy.events import metrics
from llm_proxy.events.bus import BusKind, Delivery
from llm_proxy.events.event import Event


class _Group:
    __slots__ = ("drops", "events", "finished", "handed", "ready")

    def __init__(self, maxlen: int) -> None:
        self.events: deque[Delivery] = deque(maxlen=maxlen)
        self.ready = asyncio.Event()
        self.drops = metrics.Drops("events.memory_bus_oldest_dropped")
        self.handed = 0  # deliveries published to the group
        self.finished = 0  # of those: acknowledged, or dropped (and counted) when it was full


class MemorySubscription:
    def __init__(self, group: _Group, finished: Callable[[], None]) -> None:
        self._group = group
        self._finished = finished
        self.lost = 0  # a full group drops its oldest at publication, counted there

    async def read(self, count: int, wait: float) -> list[Delivery]:
        events = self._group.events
        if not events:
            self._group.ready.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._group.ready.wait()
            except TimeoutError:
                return []
        batch = [events.popleft() for _ in range(min(count, len(events)))]
        if not events:
            self._group.ready.clear()
        return batch

    async def ack(self, ids: Sequence[str]) -> None:
        """The deliveries left this process's queue when they were read: count them finished."""
        if ids:
            self._group.finished += len(ids)
            self._finished()

    @property
    def keep_every(self) -> float | None:
        return None  # no other consumer can take a delivery over

    async def keep(self, ids: Sequence[str]) -> None:
        """Nothing to do (see keep_every)."""

    async def close(self) -> None:
        """Nothing to release; the group keeps collecting for other consumers."""


class MemoryBus:
    kind: BusKind = "memory"

    def __init__(self, maxlen: int = 10_000) -> None:
        self._maxlen = maxlen
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count(1)
        # Called when a group finished with deliveries (the events process then tells its server).
        self.on_finished: Callable[[], None] | None = None

    @property
    def unfinished(self) -> int:
        """Events published that some group has not finished with: those its dispatcher has in
        hand or has yet to read. They are lost if this process dies."""
        return max((group.handed - group.finished for group in self._groups.values()), default=0)

    def _group_finished(self) -> None:
        if self.on_finished is not None:
            self.on_finished()

    async def publish(self, events: Sequence[Event]) -> None:
        ids = self._ids
        deliveries = [Delivery(str(next(ids)), event) for event in events]
        for name, group in self._groups.items():
            # The deque drops its oldest to take each delivery beyond its bound.
            overflow = max(len(group.events) + len(deliveries) - self._maxlen, 0)
            group.drops.add("memory_bus_full", overflow, group=name)
            group.handed += len(deliveries)
            group.finished += overflow
            group.events.extend(deliveries)
            group.ready.set()
        metrics.PUBLISHED.labels("memory").inc(len(events))

    def subscribe(
        self, group: str, consumer: str, *, from_start: bool = True
    ) -> MemorySubscription:
        """Join ``group``; a group receives the events published from its first subscription on."""
        joined = self._groups.setdefault(group, _Group(self._maxlen))
        return MemorySubscription(joined, self._group_finished)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        for group in self._groups.values():
            group.ready.set()
