"""Application assembly: resources opened in order, routes registered, teardown in reverse."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web

from admin_ui import admin_app
from dispatcher.embedded import start_file_event_log, start_usage_aggregation
from llm_proxy import __version__
from llm_proxy.api_config import ApiConfig, load_api_config
from llm_proxy.authority import TokenAuthority
from llm_proxy.crypto import KeyCipher
from llm_proxy.events import (
    EventPipeline,
    EventsConfig,
    UsageChunkFilter,
    inject_stream_usage,
    start_event_pipeline,
)
from llm_proxy.exchange import Exchange, ExchangeSink
from llm_proxy.http1 import Http1Client
from llm_proxy.management import management_app
from llm_proxy.metrics import metrics_endpoint
from llm_proxy.operations import Operations
from llm_proxy.proxy import ProxyHandler
from llm_proxy.settings import Settings
from llm_proxy.store import Store
from llm_proxy.store.sqlite import SqliteStore
from llm_proxy.upstream import UpstreamClient

log = structlog.get_logger(__name__)


class DiscardSink:
    """Used when no event pipeline is configured."""

    def submit(self, exchange: Exchange) -> None:
        return None


@dataclass
class Components:
    """Everything the routes share; one per application."""

    settings: Settings
    api_config: ApiConfig
    store: Store
    authority: TokenAuthority
    operations: Operations
    upstream: UpstreamClient
    sink: ExchangeSink
    pipeline: EventPipeline | None = None
    proxy: ProxyHandler | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


COMPONENTS = web.AppKey("components", Components)


def events_config(settings: Settings) -> EventsConfig:
    assert settings.event_bus != "none"
    return EventsConfig(
        bus=settings.event_bus,
        redis_url=settings.redis_url,
        data_dir=settings.data_dir,
        build_in=settings.event_build_in,
    )


async def open_store(settings: Settings) -> Store:
    return await SqliteStore.open(settings.sqlite_path)


async def health(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps({"status": "ok", "version": __version__}),
        content_type="application/json",
    )


async def ready(request: web.Request) -> web.Response:
    components = request.app[COMPONENTS]
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(components.store.ping(), timeout=2.0)
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; say which part
        log.warning("ready.database_failed", error=type(exc).__name__)
        checks["database"] = "unavailable"
    if components.settings.event_bus == "redis" and components.pipeline is not None:
        try:
            reachable = await asyncio.wait_for(components.pipeline.bus.ping(), timeout=2.0)
        except TimeoutError:
            reachable = False
        checks["redis"] = "ok" if reachable else "unavailable"
    ok = all(state == "ok" for state in checks.values())
    return web.Response(
        status=200 if ok else 503,
        body=orjson.dumps({"status": "ready" if ok else "not_ready", "checks": checks}),
        content_type="application/json",
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    components = app[COMPONENTS]
    settings = components.settings
    components.spawn(
        components.authority.run_background(
            settings.change_poll_seconds, settings.usage_flush_seconds
        ),
        "token-authority",
    )
    log.info(
        "server.started",
        version=__version__,
        database=str(settings.sqlite_path),
        upstream=components.api_config.default.origin.host_header,
        event_bus=settings.event_bus,
    )
    yield
    for task in list(components.tasks):
        task.cancel()
    for task in list(components.tasks):
        with contextlib.suppress(asyncio.CancelledError):
            await task
    try:
        flushed = await components.authority.flush_usage()
    except Exception:
        log.exception("server.usage_flush_failed")
        flushed = 0
    await components.upstream.close()
    if components.pipeline is not None:
        await components.pipeline.close()  # drains queued events into the bus and dispatchers
    await components.store.close()
    log.info("server.stopped", usage_rows_flushed=flushed)


async def create_app(
    settings: Settings,
    *,
    api_config: ApiConfig | None = None,
    upstream: UpstreamClient | None = None,
    sink: ExchangeSink | None = None,
) -> web.Application:
    """Open the store and build the application; the store is closed when the app shuts down."""
    api_config = api_config or load_api_config(settings.api_config_path)
    store = await open_store(settings)
    pipeline: EventPipeline | None = None
    try:
        cipher = KeyCipher(settings.encryption_key)
        authority = TokenAuthority(store, cipher, cache_seconds=settings.token_cache_seconds)
        await authority.start()
        if sink is None and settings.event_bus != "none":
            pipeline = await start_event_pipeline(events_config(settings))
            await start_usage_aggregation(pipeline, store, data_dir=settings.data_dir)
            if settings.file_event_log is not None:
                await start_file_event_log(
                    pipeline, settings.file_event_log, data_dir=settings.data_dir
                )
    except BaseException:
        # aiosqlite's worker thread (and the event builder) would keep a failed process alive.
        if pipeline is not None:
            await pipeline.close()
        await store.close()
        raise
    components = Components(
        settings=settings,
        api_config=api_config,
        store=store,
        authority=authority,
        operations=Operations(store, cipher, authority),
        upstream=upstream or Http1Client(),
        sink=sink or pipeline or DiscardSink(),
        pipeline=pipeline,
    )
    app = web.Application(client_max_size=settings.max_request_body_bytes)
    app[COMPONENTS] = components
    app.cleanup_ctx.append(_lifecycle)
    app.add_subapp("/manage/", management_app(components.operations, settings.management_token))
    app.add_subapp("/admin/", admin_app(components.operations, settings))
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_endpoint)
    proxy = components.proxy = ProxyHandler(
        api_config.default,
        authority,
        components.upstream,
        components.sink,
        max_body_bytes=settings.max_request_body_bytes,
        capture_bytes=settings.capture_body_bytes,
        store=store,
        token_info_path=api_config.token_info_path,
        stream_usage=(inject_stream_usage, UsageChunkFilter),
    )
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app
