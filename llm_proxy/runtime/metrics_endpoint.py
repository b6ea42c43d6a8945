"""``GET /metrics``: this process's families, merged with those the events process reports."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import Metric

from llm_proxy.runtime.metrics_merge import MergedRegistry

# Metric families another process reports through this one (the events process).
MetricSource = Callable[[], Iterable[Metric]]
EXTRA_METRICS: web.AppKey[MetricSource] = web.AppKey("extra_metrics")


async def metrics_endpoint(request: web.Request) -> web.Response:
    extra = request.app.get(EXTRA_METRICS)
    registry = REGISTRY if extra is None else MergedRegistry(REGISTRY, extra)
    return web.Response(
        body=generate_latest(registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
