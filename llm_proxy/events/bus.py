"""The event bus interface, implemented in-process (:mod:`.memory`) and on Redis Streams
(:mod:`.redis`).

Every consumer *group* (one per dispatcher service) receives every event; consumers within a group
share its events. A consumer acknowledges a delivery only after its backend accepted the event; what
happens to unacknowledged deliveries depends on the bus (Redis hands them to another consumer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from llm_proxy.events.event import Event

BusKind = Literal["memory", "redis"]


class BusUnavailable(Exception):
    """The bus cannot be reached right now; the caller should retry later."""


@dataclass(slots=True)  # not frozen: one or more per event, and a frozen __init__ costs more
class Delivery:
    id: str  # the bus's id for this delivery, passed back to ``ack``
    event: Event
    redelivered: bool = False  # handed out before, to a consumer that never acknowledged it


class Subscription(Protocol):
    # Events the bus lost before this group read them, as far as this consumer found out (Redis:
    # trimmed by the stream's cap while unread or unacknowledged; a group Redis lost counts one,
    # as how many it held is unknown).
    lost: int

    async def read(self, count: int, wait: float) -> list[Delivery]:
        """Up to ``count`` deliveries, waiting at most ``wait`` seconds for the first one.

        Raises :class:`BusUnavailable` when the bus cannot be reached.
        """
        ...

    async def ack(self, ids: Sequence[str]) -> None:
        """Mark deliveries done. Raises :class:`BusUnavailable` when the bus cannot be reached."""
        ...

    @property
    def keep_every(self) -> float | None:
        """How often a consumer must :meth:`keep` the deliveries it still works on, so that no
        other consumer takes them over as a dead one's; None where nobody would."""
        ...

    async def keep(self, ids: Sequence[str]) -> None:
        """Say these deliveries are still being worked on (a slow or retried delivery).
        Raises :class:`BusUnavailable` when the bus cannot be reached."""
        ...

    async def close(self) -> None: ...


class EventBus(Protocol):
    kind: BusKind

    async def publish(self, events: Sequence[Event]) -> None:
        """Hand events to the bus. Never raises: what cannot be delivered now is kept or counted."""
        ...

    def subscribe(self, group: str, consumer: str, *, from_start: bool = True) -> Subscription:
        """Join ``group`` as ``consumer``. A group new to a durable bus starts from the oldest
        event it holds, or, without ``from_start``, from the next one published."""
        ...

    async def ping(self) -> bool:
        """Whether the bus is reachable (for readiness checks)."""
        ...

    async def close(self) -> None: ...
