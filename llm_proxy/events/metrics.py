"""Prometheus metrics of the event pipeline and buses (default ``prometheus_client`` registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

PUBLISHED = Counter("llm_proxy_events_published", "Events written to the bus.", ["bus"])
DROPPED = Counter(
    "llm_proxy_events_dropped",
    "Exchanges or events dropped: the pipeline queue or a memory-bus group was full, the event "
    "could not be built, or shutdown ran out of time.",
    ["reason"],
)
SPOOLED = Counter(
    "llm_proxy_events_spooled", "Events written to the spool file while Redis was unreachable."
)
REPLAYED = Counter("llm_proxy_events_replayed", "Spooled events replayed into Redis.")
SPOOL_PENDING = Gauge("llm_proxy_events_spool_pending_bytes", "Spool bytes not yet replayed.")
QUEUE_DEPTH = Gauge("llm_proxy_events_queue_depth", "Exchanges waiting in the pipeline queue.")
USAGE = Counter("llm_proxy_events_usage", "Events by where their usage came from.", ["source"])
