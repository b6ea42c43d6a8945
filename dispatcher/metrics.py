"""Prometheus metrics of dispatcher workers, in the default ``prometheus_client`` registry."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from llm_proxy.stats import PlainHistogram

DELIVERED = Counter("llm_proxy_dispatcher_delivered", "Events a backend accepted.", ["backend"])
FAILURES = Counter(
    "llm_proxy_dispatcher_failures",
    "Failed delivery attempts of an event, by kind (retryable or permanent).",
    ["backend", "kind"],
)
DEAD_LETTERED = Counter(
    "llm_proxy_dispatcher_dead_lettered", "Events written to the dead-letter file.", ["backend"]
)
REDELIVERED = Counter(
    "llm_proxy_dispatcher_redelivered",
    "Events received again after a consumer died before acknowledging them (possible duplicates).",
    ["backend"],
)
DUPLICATES = Counter(
    "llm_proxy_dispatcher_duplicates",
    "Events a backend reported it already had (a redelivery after a crash).",
    ["backend"],
)
BATCHES = Counter("llm_proxy_dispatcher_batches", "Batches sent to a backend.", ["backend"])
TORN_LINES_CUT = Counter(
    "llm_proxy_dispatcher_torn_lines_cut",
    "Partial last lines (a dispatcher killed mid-write) cut from the event log before writing on "
    "(the events they began are redelivered from Redis, or were never acknowledged).",
)


_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class _LagCollector(Collector):
    """``llm_proxy_dispatcher_lag_seconds``, observed for every delivered event: in plain bucket
    lists, as the request path's histograms are (a ``prometheus_client`` Histogram here was a
    tenth of the events process's bytecodes)."""

    def __init__(self) -> None:
        self._backends: dict[str, PlainHistogram] = {}

    def of(self, backend: str) -> PlainHistogram:
        histogram = self._backends.get(backend)
        if histogram is None:
            histogram = self._backends[backend] = PlainHistogram(_LAG_BUCKETS)
        return histogram

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "llm_proxy_dispatcher_lag_seconds",
            "From the end of a request to its event being accepted by a backend.",
            labels=["backend"],
        )
        for backend, histogram in self._backends.items():
            family.add_metric([backend], histogram.buckets(), sum_value=histogram.total)
        yield family


LAG = _LagCollector()
REGISTRY.register(LAG)
CLOUDWATCH_REJECTED = Counter(
    "llm_proxy_dispatcher_cloudwatch_rejected",
    "Events CloudWatch Logs refuses for their timestamp (too_old, too_new, expired).",
    ["kind"],
)


def from_zero(backend: str) -> None:
    """Put ``backend``'s series on the page at 0 before anything happens: a series that first
    appears at 1 shows Prometheus no increase, so the first failure would go unalerted."""
    for counter in (DELIVERED, DEAD_LETTERED, REDELIVERED, DUPLICATES, BATCHES):
        counter.labels(backend)
    for kind in ("retryable", "permanent"):
        FAILURES.labels(backend, kind)
    LAG.of(backend)
