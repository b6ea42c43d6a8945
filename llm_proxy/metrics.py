"""Prometheus metrics of the proxy path, in the default ``prometheus_client`` registry.

Labels are bounded: the endpoint label is the allowlist entry a path matched (never the raw path),
statuses are grouped by class, and no token or project id is ever a label. Observations are made
from the finished :class:`~llm_proxy.exchange.Exchange`, after the response has ended.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

from llm_proxy.api_config import ApiProvider
from llm_proxy.errors import ProxyError
from llm_proxy.exchange import Exchange, ExchangeSink

# Up to 120 s: a long completion is a normal upstream time, not an outlier.
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_ADDED_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1)

REQUESTS = Counter(
    "llm_proxy_requests",
    "Proxied requests by endpoint (the allowlist entry matched) and status class.",
    ["endpoint", "status_class"],
)
REFUSED = Counter(
    "llm_proxy_requests_refused",
    "Requests the proxy answered itself, by error code (bad path, token, quota, parameter).",
    ["reason"],
)
UPSTREAM_ERRORS = Counter(
    "llm_proxy_upstream_errors",
    "Upstream failures by kind: unavailable, timeout, or dropped mid-body.",
    ["kind"],
)
UPSTREAM_LATENCY = Histogram(
    "llm_proxy_upstream_latency_seconds",
    "From sending the request upstream to its response head arriving.",
    buckets=_UPSTREAM_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "llm_proxy_upstream_duration_seconds",
    "From sending the request upstream to the end of the response (whole streams included).",
    buckets=_UPSTREAM_BUCKETS,
)
ADDED_LATENCY = Histogram(
    "llm_proxy_added_latency_seconds",
    "Time the proxy itself added before the first byte: its work before sending upstream plus "
    "its work between the upstream head and the first byte to the client.",
    buckets=_ADDED_BUCKETS,
)
CLIENT_DISCONNECTS = Counter(
    "llm_proxy_client_disconnects", "Clients that went away before the response ended."
)
TOKEN_CACHE = Counter(
    "llm_proxy_token_cache_lookups", "Token admissions by cache result (hit or miss).", ["result"]
)

_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}
_UPSTREAM_ERROR_KIND = {
    "upstream_unavailable": "unavailable",
    "upstream_timeout": "timeout",
}


class MetricsSink:
    """Records an exchange's metrics, then hands it to the next sink (the event pipeline)."""

    def __init__(self, provider: ApiProvider, inner: ExchangeSink) -> None:
        self._provider = provider
        self._inner = inner
        self._endpoints: dict[str, str] = {}
        # Label lookups take a lock and build a tuple; the few children in use are kept here.
        self._request_counters: dict[tuple[str, str], Any] = {}

    def _endpoint(self, path: str) -> str:
        label = self._endpoints.get(path)
        if label is None:
            label = next(
                (
                    p
                    for p in self._provider.allowed_prefixes
                    if path == p or path.startswith(p + "/")
                ),
                "other",
            )
            if len(self._endpoints) < 10_000:
                self._endpoints[path] = label
        return label

    def _count(self, path: str, status: int) -> None:
        key = (self._endpoint(path), _STATUS_CLASS.get(status // 100, "other"))
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = REQUESTS.labels(*key)
        counter.inc()

    def refused(self, path: str, exc: ProxyError) -> None:
        """A request the proxy answered itself before it became an exchange."""
        self._count(path, exc.status)
        REFUSED.labels(exc.code).inc()

    def submit(self, exchange: Exchange) -> None:
        try:
            self._observe(exchange)
        finally:
            self._inner.submit(exchange)

    def _observe(self, exchange: Exchange) -> None:
        self._count(exchange.path, exchange.status)
        if exchange.client_disconnected:
            CLIENT_DISCONNECTS.inc()
        error = exchange.error
        if error is not None:
            if error in _UPSTREAM_ERROR_KIND:
                kind = (
                    _UPSTREAM_ERROR_KIND[error] if not exchange.upstream_headers_at else "mid_body"
                )
                UPSTREAM_ERRORS.labels(kind).inc()
            elif not exchange.upstream_started:
                REFUSED.labels(error).inc()
        if exchange.upstream_headers_at:
            UPSTREAM_LATENCY.observe(exchange.upstream_headers_at - exchange.upstream_started)
            UPSTREAM_DURATION.observe(exchange.ended - exchange.upstream_started)
            if exchange.first_byte_at:
                added = (exchange.upstream_started - exchange.started) + (
                    exchange.first_byte_at - exchange.upstream_headers_at
                )
                ADDED_LATENCY.observe(added)


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
