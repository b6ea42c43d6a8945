"""Prometheus metrics of dispatcher workers, in the default ``prometheus_client`` registry."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
LAG = Histogram(
    "llm_proxy_dispatcher_lag_seconds",
    "From the end of a request to its event being accepted by a backend.",
    ["backend"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
CLOUDWATCH_REJECTED = Counter(
    "llm_proxy_dispatcher_cloudwatch_rejected",
    "Events CloudWatch Logs refuses for their timestamp (too_old, too_new, expired).",
    ["kind"],
)
