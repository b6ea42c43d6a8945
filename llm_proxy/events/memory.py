"""In-process bus: a bounded queue per consumer group, fanned out on publish.

Publishing never waits: when a group's queue is full its oldest event is dropped and counted, so a
stuck dispatcher costs events, never request latency or unbounded memory. Unacknowledged deliveries
are not redelivered (there is no other process to hand them to); the in-process worker dead-letters
what it could not deliver instead.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Sequence

from llm_proxy.events import metrics
from llm_proxy.events.bus import BusKind, Delivery
from llm_proxy.events.event import Event


class _Group:
    __slots__ = ("drops", "events", "ready")

    def __init__(self, maxlen: int) -> None:
        self.events: deque[Delivery] = deque(maxlen=maxlen)
        self.ready = asyncio.Event()
        self.drops = metrics.Drops("events.memory_bus_oldest_dropped")


class MemorySubscription:
    def __init__(self, group: _Group) -> None:
        self._group = group
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
        """Nothing to do: a delivery left this process's queue when it was read."""

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

    async def publish(self, events: Sequence[Event]) -> None:
        ids = self._ids
        deliveries = [Delivery(str(next(ids)), event) for event in events]
        for name, group in self._groups.items():
            # The deque drops its oldest to take each delivery beyond its bound.
            group.drops.add(
                "memory_bus_full", len(group.events) + len(deliveries) - self._maxlen, group=name
            )
            group.events.extend(deliveries)
            group.ready.set()
        metrics.PUBLISHED.labels("memory").inc(len(events))

    def subscribe(
        self, group: str, consumer: str, *, from_start: bool = True
    ) -> MemorySubscription:
        """Join ``group``; a group receives the events published from its first subscription on."""
        return MemorySubscription(self._groups.setdefault(group, _Group(self._maxlen)))

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        for group in self._groups.values():
            group.ready.set()
