"""The budget holds of the requests this process is serving, renewed while they run.

A hold lasts a short lease (``budget_ledger.HOLD_LEASE_SECONDS``) so that the holds of a process
that died return to their budgets soon. Those of a live process's requests must outlast them,
however long an answer streams: one background task renews them all every third of a lease, in
one round trip to where the holds live, never on the request path.

A hold is renewed from admission until its request ends: released (it never reached the
upstream) or handed to the events pipeline, which settles it. Renewal stops there, not at its
settlement, so that an events pipeline that stalls, or lost the exchange, cannot keep a hold for
ever: the hold then outlasts its request by most of a lease (see ``HOLD_LEASE_SECONDS``), and a
settlement later than that still counts the request's spend (see ``budget_ledger.py``).
"""

from __future__ import annotations

import asyncio

import structlog

from llm_proxy.proxy.budget_ledger import BudgetLedger

log = structlog.get_logger(__name__)


class HoldLeases:
    """The holds of this process's requests in progress; :meth:`renew_every` keeps them."""

    def __init__(self, ledger: BudgetLedger) -> None:
        self._ledger = ledger
        # hold id → (token id, hold id, amount held), as the ledger renews it
        self._live: dict[str, tuple[str, str, int]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def add(self, token_id: str, hold_id: str, held: int) -> None:
        """A request took hold ``hold_id``: renewed until :meth:`end`."""
        self._live[hold_id] = (token_id, hold_id, held)

    def end(self, hold_id: str) -> None:
        """The request of ``hold_id`` ended (released, or handed to its settlement)."""
        self._live.pop(hold_id, None)

    async def renew(self) -> None:
        """Renew every live hold once, in one round trip; raises when it failed."""
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
