"""Running the server: settings → secrets → app → listening socket, with a clean shutdown."""

from __future__ import annotations

import asyncio
import functools
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import structlog
import uvloop
from aiohttp import web

from llm_proxy.crypto import KeyCipher
from llm_proxy.events.offload import EventProcessError
from llm_proxy.http.front import FrontLimits, FrontSite, listening_socket
from llm_proxy.pricing import PricesError
from llm_proxy.runtime import secrets_store
from llm_proxy.runtime.app import (
    COMPONENTS,
    Components,
    check_encryption_key,
    create_app,
    open_settings_store,
)
from llm_proxy.runtime.fd_limit import raise_open_file_limit
from llm_proxy.runtime.gc_tuning import tune_garbage_collector
from llm_proxy.runtime.lifeline import Lifeline, watch
from llm_proxy.runtime.logging_setup import configure_logging
from llm_proxy.runtime.metrics_endpoint import WORKER_PEERS, own_page
from llm_proxy.runtime.settings import (
    Settings,
    SettingsError,
    database_label,
    parse_encryption_key,
)
from llm_proxy.runtime.supervisor import START_FAILED, Supervisor
from llm_proxy.runtime.worker_metrics import WorkerPeers, prepare_sockets
from llm_proxy.store.opening import default_database_url, open_store, sqlite_path
from llm_proxy.store.unavailable import DATABASE_ERRORS, without_credentials

log = structlog.get_logger(__name__)


def with_generated_secrets(settings: Settings, out: TextIO) -> Settings:
    """Fill unset secrets from ``DATA_DIR`` (creating them on first start) and announce them."""
    try:
        return _fill_secrets(settings, out)
    except OSError as exc:
        raise SettingsError(
            f"DATA_DIR: cannot keep secrets in {settings.data_dir}: {exc.strerror}"
        ) from None


def _fill_secrets(settings: Settings, out: TextIO) -> Settings:
    data_dir = settings.data_dir
    secrets_store.keep_private(data_dir)
    shown: list[str] = []  # what this start generated, for the banner
    kept: list[str] = []  # files an earlier start generated
    token_generated = False

    def load(name: str, make: Callable[[], str]) -> tuple[str, str | None]:
        """The secret, and the file keeping it when this start generated it."""
        secret = secrets_store.load_or_create(data_dir, name, make)
        path = str((data_dir / name).absolute())
        if not secret.created:
            kept.append(path)
        return secret.value, path if secret.created else None

    if not settings.management_token:
        token, new = load(secrets_store.MANAGEMENT_TOKEN_FILE, secrets_store.new_management_token)
        settings = replace(settings, management_token=token)
        if new:
            shown += [f"Management API token, kept in {new}:", f"  MANAGEMENT_TOKEN={token}"]
            token_generated = True
    if not settings.admin_password:
        password, new = load(secrets_store.ADMIN_PASSWORD_FILE, secrets_store.new_admin_password)
        settings = replace(settings, admin_password=password)
        if new:
            shown += [
                f"Admin pages (/admin/), the password kept in {new}:",
                f"  ADMIN_USER={settings.admin_user} ADMIN_PASSWORD={password}",
            ]
    if not settings.encryption_key:
        key, new = load(secrets_store.ENCRYPTION_KEY_FILE, secrets_store.new_encryption_key)
        settings = replace(settings, encryption_key=parse_encryption_key(key))
        if new:
            shown += [
                f"Encryption key of the stored upstream keys, kept in {new}",
                "  (not shown; back the file up: without it those keys cannot be read)",
            ]
    if shown:
        _announce(shown, token_generated, out)
    if kept:
        # Where the credentials are, without them, for an operator who missed the first start.
        log.info("server.generated_credentials_reused", files=kept)
    return settings


def _announce(shown: list[str], with_token: bool, out: TextIO) -> None:
    """Printed, not logged, and only by the start that generated them: a secret goes to the
    operator's terminal once and never to the log pipeline."""
    footer = [
        "",
        "`llm-proxy manage …` run here finds the server and this token by itself",
        "(it reads the same LISTEN_ADDR and DATA_DIR).",
    ]
    banner = [
        "",
        "llm-proxy generated these credentials on this first start. They are shown only",
        "now; each file is readable by its owner only and is reused on every later start.",
        "",
        *(f"  {line}" for line in shown),
        *(footer if with_token else []),
        "",
    ]
    print("\n".join(f"  {line}" if line else "" for line in banner), file=out, flush=True)


async def _serve(
    settings: Settings, peers: WorkerPeers | None = None, lifeline: int | None = None
) -> None:
    # Bound before the heavier start (the store, the events process), so a port that is taken or
    # a host that does not resolve stops start-up at once. Only bound: it listens, and so takes
    # connections, once the site starts.
    sock = _bound_socket(settings)
    try:
        app = await _create_app(settings)
    except BaseException:
        sock.close()
        raise
    if peers is not None:
        app[WORKER_PEERS] = peers
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    # From here on the store and background tasks are open: every exit must go through cleanup,
    # or aiosqlite's worker thread keeps a failed process alive.
    try:
        components = app[COMPONENTS]
        poller = components.poller
        limits = FrontLimits(
            head_seconds=settings.client_header_timeout,
            keepalive_seconds=settings.keepalive_timeout,
            body_seconds=settings.client_body_timeout,
        )
        # Before the port answers: a signal sent to a server that answers is always handled
        # (SIGHUP's default action would end the process).
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_prices, components)
        if lifeline is not None:
            watch(lifeline, functools.partial(_supervisor_gone, stop))
        site = FrontSite(
            runner, sock, components.proxy, limits=limits, on_data=poller.poke if poller else None
        )
        try:
            await site.start()
        except OSError as exc:
            # Another process bound the port too and listened first.
            sock.close()
            raise _cannot_listen(settings, exc) from None
        if peers is not None:
            # Only once this worker takes requests, so siblings count the workers that serve.
            await peers.serve(functools.partial(own_page, app))
        tune_garbage_collector()
        log.info("server.listening", url=f"http://{settings.listen_host}:{settings.listen_port}")
        await stop.wait()
    finally:
        log.info("server.stopping")
        if peers is not None:
            await peers.close()
        await runner.cleanup()


def _bound_socket(settings: Settings) -> socket.socket:
    try:
        return listening_socket(
            settings.listen_host, settings.listen_port, reuse_port=settings.workers > 1
        )
    except OSError as exc:
        raise _cannot_listen(settings, exc) from None


def _cannot_listen(settings: Settings, exc: OSError) -> SettingsError:
    address = f"{settings.listen_host}:{settings.listen_port}"
    return SettingsError(f"LISTEN_ADDR: cannot listen on {address}: {exc.strerror}")


async def _create_app(settings: Settings) -> web.Application:
    try:
        return await create_app(settings)
    except DATABASE_ERRORS as exc:
        raise database_error(settings.database_url, settings.data_dir, "cannot open", exc) from None
    except EventProcessError as exc:
        raise SettingsError(f"{exc.setting or 'events'}: {exc}") from None
    except PricesError as exc:
        raise SettingsError(f"PRICES_PATH: {exc}") from None


def _supervisor_gone(stop: asyncio.Event) -> None:
    log.warning("server.supervisor_gone", action="stopping as on SIGTERM")
    stop.set()


def reload_prices(components: Components) -> None:
    """SIGHUP: read PRICES_PATH again, here and in the events process. A file that does not load
    changes nothing: the prices in force stay."""
    try:
        prices = components.prices.reload()
    except PricesError as exc:
        log.error("server.prices_reload_failed", error=str(exc))
        return
    if components.offload is not None:
        components.offload.prices_reloaded(prices)
    log.info("server.prices_reloaded", entries=len(prices.entries))


def serve(
    settings: Settings, peers: WorkerPeers | None = None, lifeline: int | None = None
) -> None:
    """Block serving until SIGINT/SIGTERM. Under ``--workers``: ``peers``, this worker's siblings;
    ``lifeline``, the pipe end that ends when the supervisor does (``lifeline.py``)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(settings, peers, lifeline))


def database_error(url: str, data_dir: Path, failed: str, exc: BaseException) -> SettingsError:
    """The one line a database that cannot be opened or migrated stops start-up with, without the
    URL's password (which a driver's message may quote). It names DATABASE_URL when the operator
    set it; the default database is DATA_DIR's, named by its file."""
    detail = " ".join(without_credentials(str(exc) or type(exc).__name__, url).split())
    if url == default_database_url(data_dir):
        return SettingsError(
            f"DATA_DIR: {failed} the database {sqlite_path(url).absolute()}: {detail}"
        )
    return SettingsError(f"DATABASE_URL: {failed} the database: {detail}")


async def _prepare_database(settings: Settings) -> None:
    try:
        store = await open_settings_store(settings)
    except DATABASE_ERRORS as exc:
        raise database_error(settings.database_url, settings.data_dir, "cannot open", exc) from None
    try:
        # Here too, so a wrong key stops start-up in one line before any worker starts.
        if settings.encryption_key_check:
            await check_encryption_key(store, KeyCipher(settings.encryption_key))
    except DATABASE_ERRORS as exc:
        raise database_error(settings.database_url, settings.data_dir, "cannot open", exc) from None
    finally:
        await store.close()


async def _migrate(url: str, data_dir: Path) -> list[int]:
    try:
        store = await open_store(url, migrate=False)
    except DATABASE_ERRORS as exc:
        raise database_error(url, data_dir, "cannot open", exc) from None
    try:
        return await store.migrate()
    except DATABASE_ERRORS as exc:
        raise database_error(url, data_dir, "cannot migrate", exc) from None
    finally:
        await store.close()


def migrate_database(url: str, data_dir: Path) -> tuple[list[int], str]:
    """Apply the migrations ``url`` lacks; the versions applied and the database's name for logs.
    ``data_dir`` is the DATA_DIR the default database lives under, for the error's wording."""
    return asyncio.run(_migrate(url, data_dir)), database_label(url)


def _worker(settings: Settings, index: int, restarts: int, lifeline: Lifeline) -> None:
    try:
        peers = WorkerPeers(settings.data_dir, index, settings.workers, restarts)
        serve(settings, peers, lifeline.in_worker())
    except SettingsError as exc:
        print(f"llm-proxy: {exc}", file=sys.stderr, flush=True)
        sys.exit(START_FAILED)


def serve_workers(settings: Settings) -> int:
    """Run ``settings.workers`` processes sharing the port (SO_REUSEPORT); return an exit code.

    Workers share nothing in memory: revocation reaches each through the store's change feed
    (within a second) and quotas are claimed atomically in the database, so a token's limits and
    revocation hold across them. ``/metrics`` on any of them sums all of them
    (``worker_metrics.py``). The parent only supervises (``supervisor.py``): it forwards signals,
    replaces a worker that dies, and if it is killed its workers stop by themselves.

    ``WORKERS`` defaults to 1, as the SPEC says: one uvloop process already serves the proxy path
    with its events process on a second core, and whether more workers pay on a 2-core machine,
    where they and their events processes compete for the same cores, is for the performance
    measurements to show.
    """
    # Create and migrate the database once, before the workers race to do it.
    asyncio.run(_prepare_database(settings))
    prepare_sockets(settings.data_dir, settings.workers)
    return Supervisor(settings.workers, functools.partial(_worker, settings)).run()


def run_server(settings: Settings) -> None:
    """Fill generated secrets, then serve; a start-up failure raises SettingsError naming the variable."""
    settings = with_generated_secrets(settings, sys.stdout)
    # Now that every secret is known, generated ones included (workers inherit this).
    configure_logging(settings.log_level, settings.log_format, secrets=settings.log_secrets)
    raise_open_file_limit()  # (forked workers inherit it)
    if settings.workers > 1:
        sys.exit(serve_workers(settings))
    serve(settings)
