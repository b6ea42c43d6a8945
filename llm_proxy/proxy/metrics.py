"""The proxy path's metrics: each exchange and refusal counted in :data:`~llm_proxy.stats.STATS`."""

from __future__ import annotations

from llm_proxy.errors import ProxyError
from llm_proxy.http.messages import SERVER_STOPPING
from llm_proxy.proxy.api_config import ApiProvider
from llm_proxy.proxy.exchange import Exchange, ExchangeSink
from llm_proxy.stats import STATS

_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}
_UPSTREAM_ERROR_KIND = {"upstream_unavailable": "unavailable", "upstream_timeout": "timeout"}
# The paths whose label is remembered: as many as real traffic uses, as long as an API's paths
# get. A client's paths are its own choice, up to 64 KiB each: longer ones are matched again.
_REMEMBERED_PATHS = 10_000
_REMEMBERED_PATH_LENGTH = 256


class MetricsSink:
    """Records an exchange's metrics, then hands it to the next sink (the event pipeline)."""

    def __init__(self, provider: ApiProvider, inner: ExchangeSink) -> None:
        self._provider = provider
        self._inner = inner
        self._endpoints: dict[str, str] = {}

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
            if len(path) <= _REMEMBERED_PATH_LENGTH and len(self._endpoints) < _REMEMBERED_PATHS:
                self._endpoints[path] = label
        return label

    def refused(self, path: str, exc: ProxyError) -> None:
        """A request the proxy answered itself before it became an exchange."""
        STATS.requests[self._endpoint(path), _STATUS_CLASS.get(exc.status // 100, "other")] += 1
        STATS.refused[exc.code] += 1

    def submit(self, exchange: Exchange) -> None:
        try:
            self._observe(exchange)
        finally:
            self._inner.submit(exchange)

    def _observe(self, exchange: Exchange) -> None:
        stats = STATS
        status_class = _STATUS_CLASS.get(exchange.status // 100, "other")
        stats.requests[self._endpoint(exchange.path), status_class] += 1
        if exchange.left_by_client:
            stats.client_disconnects += 1
        error = exchange.error
        if error == SERVER_STOPPING:
            stats.cut_at_stop += 1
        elif error is not None:
            if error in _UPSTREAM_ERROR_KIND:
                kind = (
                    _UPSTREAM_ERROR_KIND[error] if not exchange.upstream_headers_at else "mid_body"
                )
                stats.upstream_errors[kind] += 1
            elif not exchange.upstream_started:
                stats.refused[error] += 1
        if exchange.upstream_headers_at:
            stats.upstream_latency.observe(exchange.upstream_headers_at - exchange.upstream_started)
            stats.upstream_duration.observe(exchange.ended - exchange.upstream_started)
            if exchange.first_byte_at:
                stats.added_latency.observe(
                    (exchange.upstream_started - exchange.started)
                    + (exchange.first_byte_at - exchange.upstream_headers_at)
                )
