"""``GET /metrics``: this process's families, merged with those the events process reports and,
under ``--workers N``, with the other workers' (``worker_metrics.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import Metric

from llm_proxy.runtime.metrics_merge import MergedRegistry
from llm_proxy.runtime.worker_metrics import WorkerPeers, restarts_family, workers_family

# Metric families another process reports through this one (the events process).
MetricSource = Callable[[], Iterable[Metric]]
EXTRA_METRICS: web.AppKey[MetricSource] = web.AppKey("extra_metrics")
# This worker's siblings under ``--workers N``, whose pages ``/metrics`` adds to its own.
WORKER_PEERS: web.AppKey[WorkerPeers] = web.AppKey("worker_peers")


def _own_families(app: web.Application) -> list[Iterable[Metric]]:
    """This worker's registry first (its per-process families are the ones kept), then its events
    process's, then how often its slot was replaced."""
    extra = app.get(EXTRA_METRICS)
    peers = app.get(WORKER_PEERS)
    restarts = [restarts_family(0 if peers is None else peers.restarts)]
    if extra is None:
        return [REGISTRY.collect(), restarts]
    return [REGISTRY.collect(), extra(), restarts]


def own_page(app: web.Application) -> bytes:
    """This worker's page, without its siblings': what it serves them under ``--workers``."""
    return generate_latest(MergedRegistry(*_own_families(app)))


async def metrics_endpoint(request: web.Request) -> web.Response:
    peers = request.app.get(WORKER_PEERS)
    siblings = [] if peers is None else await peers.gather()
    count = 1 if peers is None else peers.count
    workers = [workers_family(1 + len(siblings), count)]
    registry = MergedRegistry(*_own_families(request.app), *siblings, workers)
    return web.Response(
        body=generate_latest(registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
