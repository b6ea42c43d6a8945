"""The spend of requests that held no budget, summed per token and written a few times a second.

A budgeted request's cost becomes its token's spend when its hold settles (``settlement.py``).
Every other priced request's cost is added to its token's spend too, so that ``spent_usd`` is the
token's lifetime spend and a budget set later starts from it (SPEC §6). Those requests are most of
the traffic, and one busy token without limits can send thousands a second: a write per request
would make the database the bottleneck of the events pipeline (on SQLite, every write takes the
lock that admission's writes on limited tokens wait for). Nothing needs this spend at once, as no
request holds against it, so it is batched instead: summed per token and written every
``FLUSH_SECONDS``, one UPDATE per token, and what is left at close (a server stopped by SIGTERM
drains its events into it first). A process that dies loses what it had not written: at most an
interval's worth while the database answers, beside the exchanges it had not built into events
yet; what waits is in ``llm_proxy_events_spend_pending_nanousd``, which the server counts as lost
(``llm_proxy_events_spend_lost_nanousd``) if the process dies, as this process counts what is still
unwritten at its close.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from llm_proxy.events import metrics
from llm_proxy.proxy.budget_ledger import BudgetLedger
from llm_proxy.sparse_warning import SparseWarning

log = structlog.get_logger(__name__)

# Short enough that the spend shows in the management API within a second of the answer.
FLUSH_SECONDS = 0.5


class SpendBatcher:
    """Sums the cost of unheld requests per token and adds it to their spend in batches."""

    def __init__(self, ledger: BudgetLedger, interval: float = FLUSH_SECONDS) -> None:
        self._ledger = ledger
        self._interval = interval
        self._pending: dict[str, int] = {}  # token id → nano-dollars not written yet
        self._due = asyncio.Event()  # something is pending
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed = SparseWarning("events.spend_flush_failed")  # retried every interval

    def add(self, token_id: str, cost: int) -> None:
        """Count ``cost`` nano-dollars against the token's spend at the next flush."""
        pending = self._pending
        pending[token_id] = pending.get(token_id, 0) + cost
        metrics.SPEND_PENDING.inc(cost)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._keep_flushing(), name="spend-flush"
            )
        self._due.set()

    async def _keep_flushing(self) -> None:
        while not self._closing.is_set():
            await self._due.wait()
            # Gather for the interval (cut short by a close), then write what came.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._closing.wait()
            self._due.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending; kept for the next flush when the write fails."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            await self._ledger.add_spend(pending)
            metrics.SPEND_PENDING.dec(sum(pending.values()))
        except Exception as exc:
            for token_id, cost in pending.items():
                self._pending[token_id] = self._pending.get(token_id, 0) + cost
            self._due.set()
            self._failed.happened(tokens=len(pending), error=str(exc))

    async def close(self) -> None:
        """Write what is pending, the last time: before the ledger and the store close."""
        self._closing.set()
        self._due.set()
        if self._task is not None:
            await self._task
        await self.flush()
        if self._pending:
            lost = sum(self._pending.values())
            metrics.SPEND_LOST.inc(lost)
            metrics.SPEND_PENDING.dec(lost)
            log.error("events.spend_lost", tokens=len(self._pending), nanousd=lost)
