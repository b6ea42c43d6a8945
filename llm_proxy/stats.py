"""Counters of the request path, exposed through the default ``prometheus_client`` registry.

Labels are bounded: the endpoint label is the allowlist entry a path matched (never the raw path),
statuses are grouped by class, and no token or project id is ever a label.

The request path only adds to plain integers and bucket lists (:class:`ProxyStats`); a collector
turns them into metric families when ``/metrics`` is scraped, because ``prometheus_client``'s own
counters take a lock on every increment.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# Up to 120 s: a long completion is a normal upstream time, not an outlier.
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_ADDED_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1)


def _bucket_label(bound: float) -> str:
    """Prometheus's own spelling of a bucket bound (``120.0``, ``5e-05``)."""
    return repr(float(bound))


class PlainHistogram:
    """A histogram kept in a plain bucket list, turned into a metric family when scraped:
    ``prometheus_client``'s own takes a lock and walks its buckets in Python for every value."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """The cumulative buckets of a ``HistogramMetricFamily``, ``+Inf`` last."""
        cumulative, buckets = 0, []
        labels = (*(_bucket_label(b) for b in self.bounds), "+Inf")
        for bound, count in zip(labels, self.counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        return buckets

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(
            name, documentation, buckets=self.buckets(), sum_value=self.total
        )


class ProxyStats:
    """Counts of this process, shared by every application it runs."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.refused: defaultdict[str, int] = defaultdict(int)
        self.upstream_errors: defaultdict[str, int] = defaultdict(int)
        self.client_disconnects = 0
        self.cut_at_stop = 0  # answers unfinished when the stop's grace period ended
        self.auth_failures: defaultdict[str, int] = defaultdict(int)  # by operator surface
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_stale_checks = 0  # checked against the store: the change feed was stale
        self.token_cache_entries = 0  # tokens whose checks are kept in memory
        # The change feed: when it was last read whole (monotonic), failed reads, the push channel.
        self.change_feed_read_at = time.monotonic()
        self.change_feed_failures = 0
        self.change_push_connected = False
        self.change_push_reconnects = 0
        # Management changes a sibling worker did not confirm in time (see worker_changes.py).
        self.worker_changes_unconfirmed = 0
        # Budget holds: taken and refused; open while their requests run (settled afterwards by
        # the events pipeline).
        self.budget_holds = 0
        self.budget_holds_refused = 0
        self.budget_holds_open = 0
        # Admissions that waited for the token's answered requests to settle, by outcome.
        self.settlement_waits: defaultdict[str, int] = defaultdict(int)
        self.busy_polls = 0  # see busy_poll.py
        self.busy_polls_wasted = 0
        self.upstream_latency = PlainHistogram(_UPSTREAM_BUCKETS)
        self.upstream_duration = PlainHistogram(_UPSTREAM_BUCKETS)
        self.added_latency = PlainHistogram(_ADDED_BUCKETS)


STATS = ProxyStats()


def _counters(
    name: str,
    documentation: str,
    labels: list[str],
    counts: Iterable[tuple[tuple[str, ...], int]],
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in sorted(counts):
        family.add_metric(list(values), count)
    return family


class _ProxyCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        s = STATS
        yield _counters(
            "llm_proxy_requests",
            "Requests on the proxy path by endpoint (the allowlist entry matched) and status class.",
            ["endpoint", "status_class"],
            s.requests.items(),
        )
        yield _counters(
            "llm_proxy_requests_refused",
            "Requests the proxy answered itself, by error code (path, token, quota, parameter).",
            ["reason"],
            (((reason,), count) for reason, count in s.refused.items()),
        )
        yield _counters(
            "llm_proxy_upstream_errors",
            "Upstream failures by kind: unavailable, timeout, or dropped mid-body.",
            ["kind"],
            (((kind,), count) for kind, count in s.upstream_errors.items()),
        )
        yield _counters(
            "llm_proxy_auth_failures",
            "Wrong credentials sent to the management API (its token) or the admin pages (their"
            " password).",
            ["surface"],
            (((surface,), count) for surface, count in s.auth_failures.items()),
        )
        yield CounterMetricFamily(
            "llm_proxy_client_disconnects",
            "Clients that went away before their response ended.",
            value=s.client_disconnects,
        )
        yield CounterMetricFamily(
            "llm_proxy_requests_cut_at_stop",
            "Requests whose answer was unfinished when the server's stop ended its grace period"
            " (their connections closed by the server).",
            value=s.cut_at_stop,
        )
        yield _counters(
            "llm_proxy_token_cache_lookups",
            "Token admissions by cache result (hit: checked from memory; miss: from the store).",
            ["result"],
            [
                (("hit",), s.cache_hits),
                (("miss",), s.cache_misses),
                (("stale_feed",), s.cache_stale_checks),
            ],
        )
        yield GaugeMetricFamily(
            "llm_proxy_token_cache_entries",
            "Tokens whose checks this process keeps in memory; those that expired, or that were not"
            " used for an hour (120 token cache periods), are dropped as often as a kept check is"
            " reloaded, so it follows the tokens in use, not every token ever seen.",
            value=s.token_cache_entries,
        )
        yield GaugeMetricFamily(
            "llm_proxy_change_feed_lag_seconds",
            "Time since the change feed (revocations and other management changes made by other "
            "instances) was last read whole; past REVOCATION_MAX_STALENESS every request is "
            "checked against the database.",
            value=time.monotonic() - s.change_feed_read_at,
        )
        yield CounterMetricFamily(
            "llm_proxy_change_feed_failures",
            "Reads of the change feed that failed (database unreachable).",
            value=s.change_feed_failures,
        )
        yield GaugeMetricFamily(
            "llm_proxy_change_push_connected",
            "1 while the push channel of the change feed (PostgreSQL LISTEN) is connected; with "
            "several workers, how many of them are connected.",
            value=int(s.change_push_connected),
        )
        yield CounterMetricFamily(
            "llm_proxy_change_push_reconnects",
            "Times the push channel of the change feed was lost or could not connect.",
            value=s.change_push_reconnects,
        )
        yield CounterMetricFamily(
            "llm_proxy_worker_changes_unconfirmed",
            "Management changes (with --workers) a sibling worker did not confirm evicting in "
            "time; that worker learns them from the change feed instead, within a second.",
            value=s.worker_changes_unconfirmed,
        )
        yield _counters(
            "llm_proxy_budget_holds",
            "Budget holds of requests on budgeted tokens, by outcome (taken, or refused: the budget"
            " was spent or held by requests in progress).",
            ["outcome"],
            [(("taken",), s.budget_holds), (("refused",), s.budget_holds_refused)],
        )
        yield GaugeMetricFamily(
            "llm_proxy_budget_holds_open",
            "Budget holds whose requests are still running (each is settled by the events"
            " pipeline once its usage is known).",
            value=s.budget_holds_open,
        )
        yield _counters(
            "llm_proxy_settlement_waits",
            "Requests on tokens with a tpm window or a budget that waited, before admission, for"
            " the token's requests already answered by this process to settle, by outcome"
            " (settled, or timed_out: admitted on what was settled by then).",
            ["outcome"],
            [((outcome,), s.settlement_waits[outcome]) for outcome in ("settled", "timed_out")],
        )
        yield _counters(
            "llm_proxy_busy_polls",
            "Busy-poll windows opened after socket activity, by outcome (paid: data arrived while "
            "polling; wasted: the window ran out empty and shrank).",
            ["outcome"],
            [
                (("paid",), s.busy_polls - s.busy_polls_wasted),
                (("wasted",), s.busy_polls_wasted),
            ],
        )
        yield s.upstream_latency.family(
            "llm_proxy_upstream_latency_seconds",
            "From sending the request upstream to its response head arriving.",
        )
        yield s.upstream_duration.family(
            "llm_proxy_upstream_duration_seconds",
            "From sending the request upstream to the end of its response (whole streams).",
        )
        yield s.added_latency.family(
            "llm_proxy_added_latency_seconds",
            "Time the proxy itself added before the first byte: its work before sending upstream "
            "plus its work between the upstream head and the first byte to the client.",
        )


REGISTRY.register(_ProxyCollector())
