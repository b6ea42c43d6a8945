"""``GET /metrics``: this process's families, merged with those the events process reports and,
under ``--workers N``, with the other workers' (``worker_metrics.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import Metric

from llm_proxy.runtime.metrics_merge import MergedRegistry, merge_families
from llm_proxy.runtime.worker_metrics import WorkerPeers, restarts_family, workers_family

# Metric families another process reports through this one (the events process).
MetricSource = Callable[[], Iterable[Metric]]
EXTRA_METRICS: web.AppKey[MetricSource] = web.AppKey("extra_metrics")
# This worker's siblings under ``--workers N``, whose pages ``/metrics`` adds to its own.
WORKER_PEERS: web.AppKey[WorkerPeers] = web.AppKey("worker_peers")


def _own_families(app: web.Application) -> list[Iterable[Metric]]:
    """This worker's registry first (its per-process families are the ones kept), then its events
    process's, how often its slot was replaced and, under ``--workers``, what the slot's earlier
    workers counted."""
    extra = app.get(EXTRA_METRICS)
    peers = app.get(WORKER_PEERS)
    sources: list[Iterable[Metric]] = [REGISTRY.collect()]
    if extra is not None:
        sources.append(extra())
    if peers is None:
        return [*sources, [restarts_family(0)]]
    return [*sources, [restarts_family(peers.restarts)], peers.slot.carried]


def own_page(app: web.Application) -> bytes:
    """This worker's page, without its siblings': what it serves them under ``--workers``, kept in
    its slot's file first (``slot_totals.py``)."""
    page = generate_latest(MergedRegistry(*_own_families(app)))
    peers = app.get(WORKER_PEERS)
    if peers is not None:
        peers.slot.keep(page)
    return page


async def metrics_endpoint(request: web.Request) -> web.Response:
    peers = request.app.get(WORKER_PEERS)
    own = _own_families(request.app)
    siblings: list[list[Metric]] = []
    answered, count = 0, 1
    if peers is not None:
        # Collected once: this worker's part of the sums, kept as its siblings keep theirs when
        # they serve it, then added to theirs.
        own = [merge_families(own)]
        peers.slot.keep(generate_latest(MergedRegistry(*own)))
        siblings, answered = await peers.gather()
        count = peers.count
    workers = [workers_family(1 + answered, count)]
    registry = MergedRegistry(*own, *siblings, workers)
    return web.Response(
        body=generate_latest(registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
