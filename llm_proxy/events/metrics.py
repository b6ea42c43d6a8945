"""Prometheus metrics of the event pipeline and buses (default ``prometheus_client`` registry)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable
from typing import ClassVar

import structlog
from prometheus_client import Counter, Gauge

from llm_proxy.events.event import Event
from llm_proxy.pricing import Prices

_log = structlog.get_logger(__name__)

PUBLISHED = Counter("llm_proxy_events_published", "Events written to the bus.", ["bus"])
DROPPED = Counter(
    "llm_proxy_events_dropped",
    "Exchanges or events dropped: the pipeline queue or a memory-bus group was full, the event "
    "could not be built, or shutdown ran out of time. events_process_died: exchanges sent to an "
    "events process that died before they were published or counted dropped (on the memory bus, "
    "before every in-process dispatcher had finished with their events); an upper bound, "
    "exceeded by at most the batch it was publishing as it died.",
    ["reason"],
)
# Every reason events are dropped for, on the page at 0 from the start: a series that first
# appears at 1 shows Prometheus no increase, so the first drop of its kind would go unalerted.
DROP_REASONS = (
    "queue_full",
    "closing",
    "build_failed",
    "publish_failed",
    "memory_bus_full",
    "redis_unavailable",
    "spool_full",
    "spool_malformed",
    "bus_entry_unusable",
    "trimmed_before_delivery",
    "trimmed_unacknowledged",
    "instance_group_released",
    "events_process_died",
    "events_process_backlog",
    "unwritable",
    "undelivered_at_stop",
)
for _reason in DROP_REASONS:
    DROPPED.labels(_reason)
TRIMMED = Counter(
    "llm_proxy_events_trimmed",
    "Entries trimmed from the Redis stream that no one missed: every consumer group had "
    "acknowledged them, or no group existed (beyond the stream's length cap).",
    ["reason"],
)
for _reason in ("acknowledged", "no_group"):
    TRIMMED.labels(_reason)
GROUPS_LOST = Counter(
    "llm_proxy_events_redis_groups_lost",
    "Times a dispatcher found its consumer group gone from Redis (restarted without persistence, "
    "or the group deleted): the events it had not delivered are lost, how many is unknown.",
)
REQUEST_BODIES_SHED = Counter(
    "llm_proxy_events_request_bodies_shed",
    "Request bodies left out of their events because the events process was behind (the event "
    "shows the body's length; its usage and settlement come from the answer).",
)
SPOOLED = Counter(
    "llm_proxy_events_spooled", "Events written to the spool file while Redis was unreachable."
)
REPLAYED = Counter("llm_proxy_events_replayed", "Spooled events replayed into Redis.")
SPOOL_PENDING = Gauge("llm_proxy_events_spool_pending_bytes", "Spool bytes not yet replayed.")
QUEUE_DEPTH = Gauge("llm_proxy_events_queue_depth", "Exchanges waiting in the pipeline queue.")
USAGE = Counter("llm_proxy_events_usage", "Events by where their usage came from.", ["source"])
TPM_UNRECORDED = Counter(
    "llm_proxy_events_tpm_unrecorded",
    "Requests of tpm-limited tokens whose tokens were never added to the token's window: the "
    "store or Redis holding it stayed unreachable for the whole window, more were waiting than "
    "the bound, or the process stopped (or died) first.",
)
BUDGET_SETTLEMENTS = Counter(
    "llm_proxy_events_budget_settlements",
    "Budget holds settled once the usage was known, by outcome (settled: cost recorded; "
    "released: nothing to pay; failed: given up while the store or Redis holding it was "
    "unreachable, with more waiting than the bound or the process stopping or dying; the hold "
    "then lapses with its lease and the spend is missing).",
    ["outcome"],
)
for _outcome in ("settled", "released", "failed"):
    BUDGET_SETTLEMENTS.labels(_outcome)
SETTLEMENT_RETRIES = Counter(
    "llm_proxy_events_settlement_retries",
    "Budget settlements and tpm records tried again after the store or Redis holding them failed "
    "(each try of each one), by kind.",
    ["kind"],
)
SETTLEMENTS_WAITING = Gauge(
    "llm_proxy_events_settlements_waiting",
    "Budget settlements and tpm records waiting to be tried again, by kind.",
    ["kind"],
)
for _kind in ("budget", "tpm"):
    SETTLEMENT_RETRIES.labels(_kind)
    SETTLEMENTS_WAITING.labels(_kind)
SPEND_PENDING = Gauge(
    "llm_proxy_events_spend_pending_nanousd",
    "Cost of requests that held no budget, summed for their tokens' spent_usd and not yet "
    "written (it waits while the database is unreachable), in nano-dollars.",
)
SPEND_LOST = Counter(
    "llm_proxy_events_spend_lost_nanousd",
    "Cost of requests that held no budget that never reached their tokens' spent_usd: the "
    "database stayed unreachable until the events process stopped, or the process died first "
    "(as of its last report), in nano-dollars.",
)


def left_waiting() -> dict[str, int]:
    """What this process would take with it if it died now: the budget settlements and tpm
    records waiting to be tried again, and the spend not yet written (``spend``, nano-dollars).
    Sent to the server with each step of progress, so that a death between two periodic status
    lines still has what it lost counted (see ``offload.py``)."""
    waiting = {
        sample.labels["kind"]: int(sample.value)
        for family in SETTLEMENTS_WAITING.collect()
        for sample in family.samples
    }
    waiting["spend"] = sum(
        int(sample.value) for family in SPEND_PENDING.collect() for sample in family.samples
    )
    return waiting


BUDGET_OVERRUN = Counter(
    "llm_proxy_events_budget_overrun_nanousd",
    "Spend beyond what was held for the requests that cost more than their hold, in nano-dollars.",
)
# ``model`` is bounded: the glob of config/prices.yaml that priced the event's model, or "other".
TOKENS = Counter(
    "llm_proxy_tokens",
    "Tokens of proxied requests as their events counted them (from the upstream or estimated).",
    ["model", "kind"],
)
COST = Counter(
    "llm_proxy_cost_usd",
    "What proxied requests cost in USD, by config/prices.yaml (unpriced models add nothing).",
    ["model"],
)


def count_unwritable(unwritable: Iterable[tuple[Event, str]], where: str) -> None:
    """Events that could not be written as JSON (see ``event.dumps_each``): dropped, and said so."""
    for event, reason in unwritable:
        DROPPED.labels("unwritable").inc()
        _log.error(
            "events.unwritable_dropped",
            request_id=event.get("request_id"),
            where=where,
            reason=reason,
        )


def count_spend(events: Iterable[Event], prices: Prices) -> None:
    """Add a batch of events to ``llm_proxy_tokens_total`` and ``llm_proxy_cost_usd_total``."""
    tokens: Tally[tuple[str, str]] = Tally()
    cost: dict[str, float] = {}
    for event in events:
        usage, cost_usd = event["usage"], event["cost_usd"]
        if usage is None and not cost_usd:
            continue
        model = prices.label(event["model"])
        if usage is not None:
            tokens[model, "prompt"] += max(usage["prompt_tokens"], 0)
            tokens[model, "completion"] += max(usage["completion_tokens"], 0)
        if cost_usd:
            cost[model] = cost.get(model, 0.0) + cost_usd
    for labels, count in tokens.items():
        TOKENS.labels(*labels).inc(count)
    for model, usd in cost.items():
        COST.labels(model).inc(usd)


class _Tally:
    """What one component lost, counted in a metric; the log hears of the 1st, 10th, 100th and
    every 1000th after, so that an overload losing thousands a second does not also flood it."""

    __slots__ = ("_event", "total")
    _total_field: ClassVar[str]  # the log's name for the running total

    def __init__(self, event: str) -> None:
        self._event = event  # the log event name, such as ``events.pipeline_dropped``
        self.total = 0

    def _add(self, counter: Counter, count: int, **context: object) -> None:
        if count <= 0:
            return
        before, self.total = self.total, self.total + count
        counter.inc(count)
        if _crossed_a_mark(before, self.total):
            fields = {self._total_field: self.total, **context}
            _log.warning(self._event, count=count, **fields)


class Drops(_Tally):
    """The dropped exchanges or events of one component, in ``llm_proxy_events_dropped{reason}``."""

    __slots__ = ()
    _total_field = "dropped"

    def add(self, reason: str, count: int = 1, **context: object) -> None:
        self._add(DROPPED.labels(reason), count, reason=reason, **context)


class Shed(_Tally):
    """Request bodies left out of events, in ``llm_proxy_events_request_bodies_shed``."""

    __slots__ = ()
    _total_field = "shed"

    def __init__(self) -> None:
        super().__init__("events.request_bodies_shed")

    def add(self, count: int) -> None:
        self._add(REQUEST_BODIES_SHED, count)


def _crossed_a_mark(before: int, after: int) -> bool:
    return any(before < mark <= after for mark in (1, 10, 100)) or after // 1000 > before // 1000
