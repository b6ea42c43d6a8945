"""``llm-proxy dispatcher --metrics-port``: a standalone dispatcher's ``GET /metrics`` and
``GET /health``, served by aiohttp on the dispatcher's own event loop, beside its worker.

The page holds what this process counts, from the counters the worker and the Redis bus already
keep (the server's events process reports the same families of its in-process dispatchers on the
server's ``/metrics``): the ``llm_proxy_dispatcher_*`` families, the events the bus lost before
this service read them (``llm_proxy_events_dropped``, ``llm_proxy_events_redis_groups_lost``),
and the process's own. Every sample carries ``service``, which the bus's families lack, so that
a loss can be told apart when several services' dispatchers are scraped.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from dispatcher import metrics
from dispatcher.worker import Worker
from llm_proxy.listen_addr import host_port

log = structlog.get_logger(__name__)

_PREFIXES = ("llm_proxy_dispatcher_", "process_", "python_")
# What the Redis subscription counts, in the families the server's events process uses too; the
# rest of the events families (publishing, spooling, settlements) never move in a dispatcher.
_BUS_FAMILIES = frozenset({"llm_proxy_events_dropped", "llm_proxy_events_redis_groups_lost"})

_WORKER: web.AppKey[Worker] = web.AppKey("worker", Worker)
_PAGE: web.AppKey[CollectorRegistry] = web.AppKey("page", CollectorRegistry)


@dataclass(frozen=True, slots=True)
class MetricsAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


class MetricsListenError(Exception):
    """The metrics port cannot be bound (in use, or a host that is not this machine's)."""


class _Page(Collector):
    """This process's families for the page, each sample labelled with the service, less the
    creation times (``x_created``) the server's page leaves off too: the text format writes them
    as gauges of their own, which dashboards would list as stray families beside the server's."""

    def __init__(self, service: str) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if not (family.name.startswith(_PREFIXES) or family.name in _BUS_FAMILIES):
                continue
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            created = f"{family.name}_created"
            labelled.samples = [
                sample._replace(labels={**sample.labels, "service": self._service})
                for sample in family.samples
                if sample.name != created
            ]
            yield labelled


def _page(service: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Page(service))
    return registry


def metrics_app(worker: Worker) -> web.Application:
    """``/metrics`` and ``/health`` of ``worker``; any other path is answered 404."""
    app = web.Application()
    app[_WORKER] = worker
    app[_PAGE] = _page(worker.settings.service)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    return app


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(request.app[_PAGE]), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _health(request: web.Request) -> web.Response:
    worker = request.app[_WORKER]
    # 503 while the backend starts (a CloudWatch log group being created) and once the loop ended.
    status = "ok" if worker.running else "not running"
    return web.Response(
        body=orjson.dumps({"status": status, "service": worker.settings.service}),
        status=200 if worker.running else 503,
        content_type="application/json",
    )


def _reason(exc: OSError) -> str:
    # asyncio words a failed bind its own way ("error while attempting to bind on address …");
    # the errno's text is what the server says of its own busy port. A name that does not resolve
    # comes as it is, with a (negative) resolver code for errno.
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


@asynccontextmanager
async def serving_metrics(worker: Worker, address: MetricsAddress) -> AsyncIterator[None]:
    """Serve ``worker``'s page at ``address`` for the duration; bound before the worker starts, so
    that a port that cannot be bound stops the dispatcher before it reads anything.

    Raises :class:`MetricsListenError`.
    """
    metrics.from_zero(worker.backend.name)
    # The worker handles the signals: this server only stops when the worker's drain is over.
    runner = web.AppRunner(metrics_app(worker), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, address.host, address.port).start()
    except OSError as exc:
        await runner.cleanup()
        raise MetricsListenError(f"cannot listen on {address}: {_reason(exc)}") from None
    log.info("dispatcher.metrics_listening", url=f"http://{address}/metrics")
    try:
        yield
    finally:
        await runner.cleanup()
