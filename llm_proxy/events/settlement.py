"""Settling what a request used, once its event knows the usage: its token's tpm window, its
budget hold, and its token's lifetime spend.

The proxy path refuses a request while its token's tpm window is full, and holds the most a
budgeted request can cost; both are settled here, off the request path, in the pipeline that builds
the events (the events process, or the server with ``event_build_in="thread"``), from the same
usage and cost the event reports: the upstream's, or the offline estimate when the upstream sent
none (a client that hung up mid-stream pays for what the upstream had produced by then; one that
hung up after its request went upstream and before the answer began, or in the middle of an answer
that is no stream before its usage came, pays all it held, as the upstream may have produced, or
did produce, the whole answer). A background response the upstream is still producing shows no
usage, nor does an answer that came compressed and longer than the capture (its usage at its end):
its tpm window counts the most it can use (``builder.most_tokens``).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Sequence

import structlog

from llm_proxy.events.builder import (
    answer_unseen,
    in_background,
    most_tokens,
    reasons,
    shown_request_id,
    usage_out_of_reach,
)
from llm_proxy.events.event import Event
from llm_proxy.events.lifetime_spend import SpendBatcher
from llm_proxy.events.settlement_retry import SettlementRetry, TokensToRecord, count_settled
from llm_proxy.models import nanousd
from llm_proxy.pricing import PriceHolder
from llm_proxy.proxy.budget_ledger import BudgetLedger, Settlement
from llm_proxy.proxy.exchange import Exchange
from llm_proxy.proxy.rate_limits import RateWindows

log = structlog.get_logger(__name__)


def settled_cost(event: Event, held: int, *, request_kept: bool = True) -> int:
    """What a held request pays: its cost; all it held when an answer that may have cost money
    has no cost to show (the model lost its price on a reload, the usage could not be read) or
    only an estimate without its request (the server left the body out: see offload.py); nothing
    when the upstream refused it."""
    cost = event["cost_usd"]
    usage = event["usage"]
    exact = request_kept or (usage is not None and usage["source"] == "upstream")
    if cost is not None and exact:
        return nanousd(cost)
    return held if 200 <= event["status"] < 300 else 0


class TokenSettler:
    """Records each request's tokens in its token's tpm window, settles its budget hold, and adds
    the cost of a request that held nothing to its token's spend (batched: see lifetime_spend.py).
    What fails is tried again until it lands (see settlement_retry.py)."""

    def __init__(self, windows: RateWindows, budgets: BudgetLedger, prices: PriceHolder) -> None:
        self._windows = windows
        self._budgets = budgets
        self._prices = prices  # the models' own output caps and which reason (see builder)
        self._spend = SpendBatcher(budgets)
        self._retry = SettlementRetry(budgets, windows)

    async def settle(self, batch: Sequence[Exchange], events: Sequence[Event]) -> None:
        # By request id as the event shows it, in the batch's order: a client may send one id
        # twice (a retry), and each of its requests has a hold of its own; events come in the
        # batch's order too.
        limited: dict[str, deque[Exchange]] = {}
        for exchange in batch:
            if exchange.settles:
                limited.setdefault(shown_request_id(exchange), deque()).append(exchange)
        settlements: list[Settlement] = []
        for event in events:
            same_id = limited.get(event["request_id"])
            if not same_id:
                self._add_spend(event)
                continue
            exchange = same_id.popleft()
            if exchange.hold_id:
                cost = (
                    exchange.held_nanousd  # the most the answer nobody saw could have cost
                    if exchange.left_before_answer
                    else settled_cost(
                        event, exchange.held_nanousd, request_kept=not exchange.request_bytes_shed
                    )
                )
                settlements.append(
                    Settlement(exchange.token_id, exchange.hold_id, exchange.held_nanousd, cost)
                )
            else:
                self._add_spend(event)
            if exchange.tpm_limited:
                usage = event["usage"]
                tokens = usage["total_tokens"] if usage else 0
                # An answer nobody saw whole, or whose usage could not be read, may have used
                # all the request allowed (a hold's usage already says what it paid for).
                reasoning = reasons(self._prices.current, event["model"])
                unseen = (
                    (answer_unseen(exchange, usage, reasoning) and not exchange.hold_id)
                    or (usage is None and in_background(event))
                    or usage_out_of_reach(exchange, usage)
                )
                if unseen:
                    tokens = max(tokens, most_tokens(event, self._prices.current))
                if tokens:
                    await self._record_tokens(event["token_id"], tokens, exchange.answer_mark)
                elif exchange.answer_mark:
                    await self._forget_mark(event["token_id"], exchange.answer_mark)
        if settlements:
            await self._settle_holds(settlements)

    def _add_spend(self, event: Event) -> None:
        """A request that held nothing: its cost joins its token's spend at the next flush."""
        cost = event["cost_usd"]
        if cost:
            self._spend.add(event["token_id"], nanousd(cost))

    async def _settle_holds(self, settlements: list[Settlement]) -> None:
        if self._retry.budgets_failing:
            self._retry.add_settlements(settlements)  # tried with those waiting
            return
        # One round trip for the batch: settled one by one, a busy proxy's events outran them.
        try:
            await self._budgets.settle_many(settlements)
        except Exception as exc:
            count_settled(s for s in settlements if s.done)
            self._retry.add_settlements([s for s in settlements if not s.done], error=str(exc))
            return
        count_settled(settlements)

    async def _record_tokens(self, token_id: str, tokens: int, mark: str) -> None:
        record = TokensToRecord(token_id, tokens, secrets.token_hex(8), time.monotonic(), mark)
        if self._retry.windows_failing:
            self._retry.add_record(record)
            return
        try:
            await self._windows.record_tokens(token_id, tokens, record.entry, mark)
        except Exception as exc:
            self._retry.add_record(record, error=str(exc))

    async def _forget_mark(self, token_id: str, mark: str) -> None:
        # Nothing to record: only the mark goes. One that cannot is ignored past its bound.
        try:
            await self._windows.forget_mark(token_id, mark)
        except Exception as exc:
            log.warning("settlement.mark_not_removed", token_id=token_id, error=str(exc))

    async def close(self) -> None:
        await self._spend.close()
        await self._retry.close()
        await self._windows.close()
        await self._budgets.close()
