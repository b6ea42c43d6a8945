"""Budget settlements and tpm records that did not land, tried again until they do.

One fails when Redis or the database holding it cannot be reached (restarted, stalled, down).
Dropped, a settlement would leave its cost missing from the spend for good (its hold lapses
within a lease, and its cost is then neither held nor spent). So each is kept and tried again,
after a pause that grows while the store stays away, until it lands. Trying again is safe: a
ledger does only what a settlement has left and never adds a spend twice (see
``proxy/budget_ledger.py``); a tpm record carries an id of its own, which Redis adds once.

Bounded: at most ``limit`` of each kind wait, beyond which the oldest are given up; a tpm record
is given up once older than the window too, as it counts in none any more. Each one given up is
counted and logged. While the last try failed, new ones join those waiting rather than being
tried at once, so a stalled store does not hold every batch of the pipeline for its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from llm_proxy.events import metrics
from llm_proxy.models import RATE_WINDOW_MICROS
from llm_proxy.proxy.budget_ledger import BudgetLedger, Settlement
from llm_proxy.proxy.rate_limits import RateWindows
from llm_proxy.sparse_warning import SparseWarning

log = structlog.get_logger(__name__)

LIMIT = 100_000
FIRST_PAUSE = 0.25
LONGEST_PAUSE = 5.0
# Settlements tried at once: one round trip to each store per chunk.
CHUNK = 1_000
_WINDOW_SECONDS = RATE_WINDOW_MICROS / 1e6


@dataclass(slots=True)
class TokensToRecord:
    """A settled request's tokens, for its token's tpm window."""

    token_id: str
    tokens: int
    entry: str  # its id in the window
    since: float  # monotonic: when it was first tried
    mark: str = ""  # its answer's mark, removed with it (see rate_limits.py)


def count_settled(settlements: Iterable[Settlement]) -> None:
    """Count settlements that landed, in ``llm_proxy_events_budget_settlements``."""
    for s in settlements:
        metrics.BUDGET_SETTLEMENTS.labels("settled" if s.cost else "released").inc()
        if s.cost > s.held:
            # The bound was beaten (a price raised by a reload, an upstream counting otherwise):
            # the spend is recorded whole, and the overrun shows here.
            metrics.BUDGET_OVERRUN.inc(s.cost - s.held)


class SettlementRetry:
    """Keeps what failed to settle and tries it again in the background."""

    def __init__(
        self,
        budgets: BudgetLedger,
        windows: RateWindows,
        *,
        limit: int = LIMIT,
        first_pause: float = FIRST_PAUSE,
        longest_pause: float = LONGEST_PAUSE,
    ) -> None:
        self._budgets = budgets
        self._windows = windows
        self._limit = limit
        self._first_pause = first_pause
        self._longest_pause = longest_pause
        self._settlements: deque[Settlement] = deque()
        self._records: deque[TokensToRecord] = deque()
        # Whether the last try of each kind failed: new ones then wait with the others.
        self.budgets_failing = False
        self.windows_failing = False
        self._task: asyncio.Task[None] | None = None
        self._settle_failed = SparseWarning("events.budget_settle_failed")
        self._record_failed = SparseWarning("events.tpm_record_failed")

    def add_settlements(self, settlements: list[Settlement], error: str = "") -> None:
        """Try these again later (``error``: why they just failed, for the log)."""
        if error:
            self.budgets_failing = True
            self._settle_failed.happened(len(settlements), error=error, retried=True)
        self._settlements.extend(settlements)
        beyond = len(self._settlements) - self._limit
        if beyond > 0:
            for _ in range(beyond):
                self._settlements.popleft()
            self._give_up("budget", beyond, "too_many_waiting")
        self._start()

    def add_record(self, record: TokensToRecord, error: str = "") -> None:
        if error:
            self.windows_failing = True
            self._record_failed.happened(error=error, retried=True)
        self._records.append(record)
        if len(self._records) > self._limit:
            self._records.popleft()
            self._give_up("tpm", 1, "too_many_waiting")
        self._start()

    def _start(self) -> None:
        self._gauge()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._keep_trying(), name="settlement-retry"
            )

    def _gauge(self) -> None:
        metrics.SETTLEMENTS_WAITING.labels("budget").set(len(self._settlements))
        metrics.SETTLEMENTS_WAITING.labels("tpm").set(len(self._records))

    async def _keep_trying(self) -> None:
        pause = self._first_pause
        while self._settlements or self._records:
            await asyncio.sleep(pause)
            landed = await self.try_again()
            pause = self._first_pause if landed else min(pause * 2, self._longest_pause)
        log.info("events.settlements_caught_up")

    async def try_again(self) -> bool:
        """Try once what waits; whether anything landed."""
        budgets = await self._retry_settlements()
        windows = await self._retry_records()
        self._gauge()
        return budgets or windows

    async def _retry_settlements(self) -> bool:
        chunk = [self._settlements.popleft() for _ in range(min(CHUNK, len(self._settlements)))]
        if not chunk:
            return False
        metrics.SETTLEMENT_RETRIES.labels("budget").inc(len(chunk))
        try:
            await self._budgets.settle_many(chunk)
        except Exception as exc:
            self._settle_failed.happened(len(chunk), error=str(exc), retried=True)
        landed = [s for s in chunk if s.done]
        count_settled(landed)
        self._settlements.extendleft(reversed([s for s in chunk if not s.done]))
        self.budgets_failing = len(landed) < len(chunk)
        return bool(landed)

    async def _retry_records(self) -> bool:
        records = self._records
        stale = time.monotonic() - _WINDOW_SECONDS
        expired = 0
        while records and records[0].since < stale:
            records.popleft()
            expired += 1
        self._give_up("tpm", expired, "window_passed")
        landed = 0
        for _ in range(min(CHUNK, len(records))):
            record = records[0]
            metrics.SETTLEMENT_RETRIES.labels("tpm").inc()
            try:
                await self._windows.record_tokens(
                    record.token_id, record.tokens, record.entry, record.mark
                )
            except Exception as exc:
                self._record_failed.happened(error=str(exc), retried=True)
                break
            records.popleft()
            landed += 1
        self.windows_failing = bool(records) and not landed
        return bool(landed)

    def _give_up(self, kind: str, count: int, reason: str) -> None:
        if not count:
            return
        if kind == "budget":
            metrics.BUDGET_SETTLEMENTS.labels("failed").inc(count)
        else:
            metrics.TPM_UNRECORDED.inc(count)
        log.error("events.settlements_given_up", kind=kind, count=count, reason=reason)

    async def close(self) -> None:
        """Try once more what waits, then give the rest up (counted and logged)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._settlements or self._records:
            await self.try_again()
        self._give_up("budget", len(self._settlements), "closing")
        self._give_up("tpm", len(self._records), "closing")
        self._settlements.clear()
        self._records.clear()
        self._gauge()
