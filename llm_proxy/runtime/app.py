"""Application assembly: resources opened in order, routes registered, teardown in reverse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web

from admin_ui import admin_app
from dispatcher.embedded import start_events_here
from llm_proxy import __version__, errors
from llm_proxy.client_address import FORWARDED_TRUST
from llm_proxy.control.management import management_app
from llm_proxy.control.operations import Operations
from llm_proxy.crypto import DecryptionError, KeyCipher, redact_path
from llm_proxy.events import EventPipeline, EventsConfig, UsageChunkFilter
from llm_proxy.events.offload import EventOffload
from llm_proxy.events.pipe import Launch
from llm_proxy.http.busy_poll import AdaptivePoll
from llm_proxy.http.client import Http1Client
from llm_proxy.http.egress import upstream_ssl_context
from llm_proxy.http.upstream import UpstreamClient
from llm_proxy.pricing import PriceHolder, Prices
from llm_proxy.proxy.admission import TokenAuthority
from llm_proxy.proxy.api_config import ApiConfig, load_api_config
from llm_proxy.proxy.budget_ledger import RedisBudgetLedger
from llm_proxy.proxy.exchange import Exchange, ExchangeSink
from llm_proxy.proxy.handler import ProxyHandler
from llm_proxy.proxy.rate_limits import RedisRateWindows
from llm_proxy.runtime.carried_metrics import CarriedAcrossRestarts
from llm_proxy.runtime.metrics_endpoint import EXTRA_METRICS, MetricSource, metrics_endpoint
from llm_proxy.runtime.settings import Settings, SettingsError
from llm_proxy.store import Store
from llm_proxy.store.opening import open_store
from llm_proxy.store.retention import (
    changes_retention,
    prune_audit_every,
    prune_changes_every,
    prune_expired_tokens_every,
    prune_usage_every,
)

log = structlog.get_logger(__name__)

EVENTS_PROCESS = "llm_proxy.runtime.events_process"


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
    proxy: ProxyHandler
    pipeline: EventPipeline | None = None  # events built in this process (event_build_in=thread)
    offload: EventOffload | None = None  # events built in the events process (the default)
    poller: AdaptivePoll | None = None  # poked by the front door and the upstream client
    # The model prices in force; SIGHUP swaps ``prices.current`` (server.py).
    prices: PriceHolder = field(default_factory=lambda: PriceHolder(Prices()))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


COMPONENTS = web.AppKey("components", Components)
TASK_STOP_SECONDS = 5.0  # how long stopping waits for the cancelled background tasks
READY_CHECK_SECONDS = 2.0  # how long /ready waits for the database (probes wait a little more)


def events_config(settings: Settings) -> EventsConfig:
    assert settings.event_bus != "none"
    return EventsConfig(
        bus=settings.event_bus,
        redis_url=settings.redis_url,
        data_dir=settings.data_dir,
        stream=settings.events_stream,
        maxlen=settings.events_stream_max_length,
        spool_max_bytes=settings.events_spool_max_bytes,
        gone_group_idle=settings.events_file_group_idle,
        worker=settings.worker_index,
    )


async def open_settings_store(settings: Settings, *, migrate: bool = True) -> Store:
    return await open_store(
        settings.database_url, pool_size=settings.database_pool_size, migrate=migrate
    )


@web.middleware
async def _service_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals beside /health, /ready and /metrics (an unknown path, a method they
    do not take) in the error shape, as every other path of the port answers them; the
    management API and the admin pages render their own."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        if request.path.startswith("/admin"):
            raise
        return errors.MethodNotAllowed(
            f"Method {request.method} is not allowed on {redact_path(request.path)}.",
            headers={"Allow": ",".join(sorted(exc.allowed_methods))},
        ).to_response()
    except web.HTTPNotFound:
        if request.path.startswith("/admin"):
            raise
        # A path may hold a token's value pasted into it: named masked, as every message does.
        return errors.NotFound(f"No route {redact_path(request.path)}.").to_response()


async def health(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps({"status": "ok", "version": __version__}),
        content_type="application/json",
    )


async def ready(request: web.Request) -> web.Response:
    components = request.app[COMPONENTS]
    checks = {"database": "ok" if await _database_answers(components) else "unavailable"}
    if components.settings.event_bus == "redis":
        checks["redis"] = "ok" if await _bus_reachable(components) else "unavailable"
    ok = all(state == "ok" for state in checks.values())
    return web.Response(
        status=200 if ok else 503,
        body=orjson.dumps({"status": "ready" if ok else "not_ready", "checks": checks}),
        content_type="application/json",
    )


async def _database_answers(components: Components) -> bool:
    """Whether the database answered a ping within READY_CHECK_SECONDS. A ping that overruns is
    left to end in the background rather than cancelled and awaited here: cancelling a query
    waits for the database to acknowledge the cancellation, which a hung database never does,
    so the probe would wait for the store's own timeout instead of its bound."""
    ping = asyncio.create_task(components.store.ping(), name="ready-ping")
    components.tasks.add(ping)
    ping.add_done_callback(components.tasks.discard)
    ping.add_done_callback(_retrieve_failure)
    try:
        async with asyncio.timeout(READY_CHECK_SECONDS):
            await asyncio.shield(ping)
    except Exception as exc:  # any failure means not ready
        log.warning("server.ready_database_failed", error=type(exc).__name__)
        return False
    return True


def _retrieve_failure(ping: asyncio.Task[None]) -> None:
    """Mark a late ping's failure as seen: its probe was already answered 503."""
    if not ping.cancelled():
        ping.exception()


async def _bus_reachable(components: Components) -> bool:
    if components.offload is not None:
        return components.offload.bus_reachable()
    if components.pipeline is None:
        return False
    try:
        async with asyncio.timeout(2.0):
            return await components.pipeline.bus.ping()
    except TimeoutError:
        return False


# One cleanup context per resource, appended in the order the resources were opened, so aiohttp
# closes them in reverse, and a failure closing one still closes the others.


async def _store_context(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[COMPONENTS].store.close()
    log.info("server.stopped")


async def _events_context(app: web.Application) -> AsyncIterator[None]:
    yield
    components = app[COMPONENTS]
    if components.pipeline is not None:
        await components.pipeline.close()  # drains queued events into the bus and dispatchers
    if components.offload is not None:
        await components.offload.close()  # ... or lets the events process do so


async def _upstream_context(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[COMPONENTS].upstream.close()


async def _background_context(app: web.Application) -> AsyncIterator[None]:
    """The token authority's change feed and usage flushes, stopped before what they use."""
    components = app[COMPONENTS]
    settings = components.settings
    authority = components.authority
    components.spawn(
        authority.follow_changes(settings.change_poll_seconds, settings.change_poll_seconds_pushed),
        "change-feed",
    )
    if settings.change_push:
        components.spawn(authority.keep_listening(), "change-push")
    components.spawn(authority.flush_usage_every(settings.usage_flush_seconds), "usage-flush")
    # As often as a cached grant is reloaded anyway.
    components.spawn(
        authority.forget_stale_every(settings.token_cache_seconds), "token-cache-sweep"
    )
    components.spawn(authority.renew_holds_every(), "budget-hold-renewal")
    components.spawn(authority.reclaim_holds_every(), "budget-hold-reclaim")
    components.spawn(
        prune_changes_every(components.store, changes_retention(settings.revocation_max_staleness)),
        "change-feed-prune",
    )
    if settings.usage_hourly_retention_days:
        components.spawn(
            prune_usage_every(components.store, settings.usage_hourly_retention_days), "usage-prune"
        )
    if settings.expired_token_retention_days:
        components.spawn(
            prune_expired_tokens_every(components.store, settings.expired_token_retention_days),
            "expired-token-prune",
        )
    if settings.audit_retention_days:
        components.spawn(
            prune_audit_every(components.store, settings.audit_retention_days), "audit-prune"
        )
    log.info(
        "server.started",
        version=__version__,
        database=settings.database_label,
        upstream=components.api_config.default.origin.host_header.decode(
            "utf-8", "surrogateescape"
        ),
        event_bus=settings.event_bus,
        price_entries=len(components.prices.current.entries),  # 0: no model is priced
    )
    prices = components.prices.current
    if not prices.entries and prices.source is not None and not prices.source.path.exists():
        # PRICES_PATH left unset names config/prices.yaml under the working directory: started
        # from elsewhere, the server would otherwise price nothing without a word.
        log.warning(
            "server.no_prices",
            path=str(prices.source.path.absolute()),
            consequence="every event's cost_usd is null and budgeted tokens are refused"
            " (model_not_priced); set PRICES_PATH",
        )
    yield
    tasks = list(components.tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        # Bounded: a loop that swallowed its cancel must not keep the usage tallies below from
        # being written (a service manager would kill the server first).
        _, stuck = await asyncio.wait(tasks, timeout=TASK_STOP_SECONDS)
        for task in stuck:
            log.error("server.task_did_not_stop", task=task.get_name())
    await components.authority.close()
    try:
        flushed = await components.authority.flush_usage()
    except Exception:
        log.exception("server.usage_flush_failed")
    else:
        log.info("server.usage_flushed", tokens=flushed)


_LISTED = 20  # project ids named in a log line; the count says how many there are


async def check_encryption_key(store: Store, cipher: KeyCipher) -> None:
    """Stop start-up when ENCRYPTION_KEY opens none of the stored upstream keys: it is not the
    key they were stored with, and every request would be refused. When it opens some, the
    others' projects are logged (their requests are refused until their key is set anew)."""
    projects = await store.list_projects()
    unreadable = []
    for project in projects:
        try:
            cipher.decrypt(project.api_key_encrypted)
        except DecryptionError:
            unreadable.append(project.id)
    if projects and len(unreadable) == len(projects):
        raise SettingsError(
            f"ENCRYPTION_KEY: it opens none of the {len(projects)} upstream keys in the database,"
            " which were stored under another key: give the one they were stored with (the"
            " encryption_key file in the DATA_DIR of the server that stored them); if it is"
            " lost, start once with ENCRYPTION_KEY_CHECK=off and set each project's key anew"
        )
    if unreadable:
        log.error(
            "server.upstream_keys_undecryptable",
            count=len(unreadable),
            projects=unreadable[:_LISTED],
            fix="set those projects' keys anew (they were stored under another ENCRYPTION_KEY)",
        )


def _launch(settings: Settings, prices: Prices) -> Launch:
    return Launch(
        events=events_config(settings),
        database_url=settings.database_url,
        file_event_log=settings.file_event_log,
        log_level=settings.log_level,
        log_format=settings.log_format,
        prices=prices,
        log_secrets=settings.log_secrets,
    )


async def create_app(
    settings: Settings,
    *,
    api_config: ApiConfig | None = None,
    prices: Prices | None = None,
    upstream: UpstreamClient | None = None,
    sink: ExchangeSink | None = None,
) -> web.Application:
    """Open the store and build the application; the store is closed when the app shuts down.

    Raises :class:`~llm_proxy.pricing.PricesError` when ``prices`` are not given and the file
    PRICES_PATH names does not load."""
    api_config = api_config or load_api_config(settings.api_config_path)
    price_holder = PriceHolder(prices if prices is not None else settings.price_file.load())
    store = await open_settings_store(settings)
    pipeline: EventPipeline | None = None
    offload: EventOffload | None = None
    try:
        cipher = KeyCipher(settings.encryption_key)
        if settings.encryption_key_check:
            await check_encryption_key(store, cipher)
        authority = TokenAuthority(
            store,
            cipher,
            cache_seconds=settings.token_cache_seconds,
            max_staleness=settings.revocation_max_staleness,
            # With Redis configured, the rpm windows live there (no database round trip).
            rate_windows=(
                RedisRateWindows(settings.redis_url) if settings.event_bus == "redis" else None
            ),
            budget_ledger=(
                RedisBudgetLedger(
                    settings.redis_url, store, lease_seconds=settings.budget_hold_lease_seconds
                )
                if settings.event_bus == "redis"
                else None
            ),
            settles=settings.event_bus != "none",
            hold_lease_seconds=settings.budget_hold_lease_seconds,
        )
        await authority.start()
        if sink is None and settings.event_bus != "none":
            if settings.event_build_in == "process":
                offload = EventOffload(
                    _launch(settings, price_holder.current),
                    entry=EVENTS_PROCESS,
                    backlog_bytes=settings.events_backlog_bytes,
                    settlements=authority.settlements,
                )
                await offload.start()
            else:
                pipeline = await start_events_here(
                    events_config(settings),
                    store,
                    file_event_log=settings.file_event_log,
                    prices=price_holder,  # the server's own: its SIGHUP reloads both
                )
                pipeline.settlements = authority.settlements
    except BaseException:
        # aiosqlite's worker thread (and the event builder) would keep a failed process alive.
        if pipeline is not None:
            await pipeline.close()
        await store.close()
        raise
    poller = (
        AdaptivePoll(asyncio.get_running_loop(), settings.busy_poll_micros / 1e6)
        if settings.busy_poll_micros
        else None
    )
    upstream = upstream or Http1Client(
        on_data=poller.poke if poller else None,
        egress=settings.egress,
        # Loading the trust store takes ~30 ms: here, not on the event loop under the first request.
        ssl_context=upstream_ssl_context()
        if any(p.origin.scheme == "https" for p in api_config.providers.values())
        else None,
    )
    sink = sink or pipeline or offload or DiscardSink()
    proxy = ProxyHandler(
        api_config.default,
        authority,
        upstream,
        sink,
        max_body_bytes=settings.max_request_body_bytes,
        capture_bytes=settings.capture_body_bytes,
        store=store,
        token_info_path=api_config.token_info_path,
        stream_usage=UsageChunkFilter,
        prices=price_holder,
    )
    components = Components(
        settings=settings,
        api_config=api_config,
        store=store,
        authority=authority,
        operations=Operations(store, cipher, authority),
        upstream=upstream,
        sink=sink,
        proxy=proxy,
        pipeline=pipeline,
        offload=offload,
        poller=poller,
        prices=price_holder,
    )
    app = web.Application(
        client_max_size=settings.max_request_body_bytes, middlewares=[_service_errors]
    )
    app[COMPONENTS] = components
    # Read by the management API and the admin pages (sub-applications) where they record a client.
    app[FORWARDED_TRUST] = settings.forwarded_allow_ips
    if offload is not None:
        events_metrics: MetricSource = CarriedAcrossRestarts(
            offload.metric_families, lambda: offload.restarts
        )
        app[EXTRA_METRICS] = events_metrics
    app.cleanup_ctx.extend(
        [_store_context, _events_context, _upstream_context, _background_context]
    )
    app.add_subapp("/manage/", management_app(components.operations, settings.management_token))
    admin = admin_app(
        components.operations,
        user=settings.admin_user,
        password=settings.admin_password,
        signing_key=settings.encryption_key,
    )
    app.add_subapp("/admin/", admin)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_endpoint)
    return app
