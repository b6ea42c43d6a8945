"""The budget holds of the requests this process is serving, renewed until they are settled.

A hold lasts a short lease (``budget_ledger.HOLD_LEASE_SECONDS``) so that the holds of a process
that died return to their budgets soon. Those of a live process's requests must outlast them,
however long an answer streams: one background task renews them all every third of a lease, in
one round trip to where the holds live, never on the request path.

A hold is renewed from admission until it is settled: released at once when its request never
reached the upstream, else handed with its exchange to the events pipeline, which settles it and
says so (``Settlements.settled``). A hold must live until then, or a request admitted meanwhile
could spend what the first one is about to be charged. But an events pipeline that stalls must not
keep holds for ever: one handed over is renewed for ``SETTLE_WITHIN_SECONDS`` at most, and not at
all once the pipeline lost it (its process died, it was dropped). A settlement later than the
lapse still counts the request's spend (see ``budget_ledger.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Sequence

import structlog

from llm_proxy.proxy.budget_ledger import BudgetLedger

log = structlog.get_logger(__name__)

# How long a hold handed to the events pipeline is renewed while it is not settled. Settling takes
# milliseconds, seconds when the pipeline is far behind; beyond this it is stuck or lost the
# exchange, and the hold is left to lapse rather than keep the budget from its token.
SETTLE_WITHIN_SECONDS = 300.0


class HoldLeases:
    """The holds of this process's requests not settled yet; :meth:`renew_every` keeps them."""

    def __init__(
        self, ledger: BudgetLedger, *, settle_within: float = SETTLE_WITHIN_SECONDS
    ) -> None:
        self._ledger = ledger
        self._settle_within = settle_within
        # hold id → (token id, hold id, amount held), as the ledger renews it
        self._live: dict[str, tuple[str, str, int]] = {}
        # Holds handed to the events pipeline, by the (token id, request id) its settlement is
        # reported by (a client may reuse a request id): (hold id, when handed, monotonic).
        self._handed: dict[tuple[str, str], deque[tuple[str, float]]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def add(self, token_id: str, hold_id: str, held: int) -> None:
        """A request took hold ``hold_id``: renewed until it is settled."""
        self._live[hold_id] = (token_id, hold_id, held)

    def end(self, hold_id: str) -> None:
        """Hold ``hold_id`` was released (or nothing will settle it): no longer renewed."""
        self._live.pop(hold_id, None)

    def hand_over(self, hold_id: str, request_id: str) -> None:
        """The request of ``hold_id`` ended and went to be settled: renewed until
        :meth:`settled` names it, for ``settle_within`` seconds at most."""
        live = self._live.get(hold_id)
        if live is not None:
            handed = self._handed.setdefault((live[0], request_id), deque())
            handed.append((hold_id, time.monotonic()))

    def settled(self, requests: Iterable[Sequence[str]]) -> None:
        """These ``(token id, request id)`` were settled, or never will be."""
        for token_id, request_id in requests:
            handed = self._handed.get((token_id, request_id))
            if handed is None:
                continue  # not this process's, or given up on already
            self._live.pop(handed.popleft()[0], None)
            if not handed:
                del self._handed[(token_id, request_id)]

    def forget_handed(self) -> None:
        """Nothing handed over will be settled (the events process died with it)."""
        for handed in self._handed.values():
            for hold_id, _ in handed:
                self._live.pop(hold_id, None)
        self._handed.clear()

    def _give_up_late(self) -> None:
        """Stop renewing holds handed over longer than ``settle_within`` ago."""
        limit = time.monotonic() - self._settle_within
        late = 0
        for key, handed in list(self._handed.items()):
            while handed and handed[0][1] < limit:
                self._live.pop(handed.popleft()[0], None)
                late += 1
            if not handed:
                del self._handed[key]
        if late:
            log.warning("token_authority.holds_unsettled", holds=late)

    async def renew(self) -> None:
        """Renew every hold not settled yet once, in one round trip; raises when it failed."""
        self._give_up_late()
        if self._live:
            await self._ledger.renew(list(self._live.values()))

    async def renew_every(self, seconds: float) -> None:
        """:meth:`renew` every ``seconds`` until cancelled. A failure is logged and the next tick
        tries again: the lease leaves room for two to fail."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.renew()
            except Exception as exc:
                log.warning("token_authority.hold_renewal_failed", holds=len(self), error=repr(exc))
