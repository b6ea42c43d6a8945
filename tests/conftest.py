"""Shared fixtures: a real proxy server on loopback in front of a real fake-upstream aiohttp app."""

from __future__ import annotations

import io
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from yarl import URL

from llm_proxy.http.front import FrontLimits, FrontSite, listening_socket
from llm_proxy.proxy.api_config import ApiConfig, parse_api_config
from llm_proxy.runtime.app import COMPONENTS, create_app
from llm_proxy.runtime.logging_setup import configure_logging
from llm_proxy.runtime.settings import Settings
from tests.events.events_support import RedisServer
from tests.fakes import UPSTREAM_LOG, UpstreamLog, fake_upstream_app
from tests.freezing_relay import FreezingRelay
from tests.postgres import PostgresServer

MANAGEMENT_TOKEN = "mgmt-test-" + secrets.token_urlsafe(16)
UPSTREAM_KEY = "sk-upstream-REAL-" + secrets.token_urlsafe(16)
# What the management API shows of a token (never its value), through the API and the CLI alike.
TOKEN_FIELDS = frozenset(
    {
        "id",
        "project_id",
        "expires_at",
        "is_active",
        "request_count",
        "max_requests",
        "created_at",
        "last_used_at",
        "status",
        "rpm",
        "tpm",
        "budget_usd",
        "spent_usd",
        "reserved_usd",
        "allowed_models",
        "metadata",
    }
)

ALLOWED = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/responses",
    "/v1/moderations",
    "/v1/audio",
    "/v1/files",
]


def provider_config(base_url: str, **overrides: Any) -> ApiConfig:
    raw: dict[str, Any] = {
        "base_url": base_url,
        "allowed_endpoints": ALLOWED,
        "allowed_methods": ["GET", "POST", "DELETE", "OPTIONS"],
        "timeouts": {"connect": "2s", "response_header": "1s", "idle": "1s"},
    }
    raw.update(overrides)
    return parse_api_config({"default_api": "openai", "apis": {"openai": raw}})


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base = Settings(
        listen_host="127.0.0.1",
        listen_port=0,
        management_token=MANAGEMENT_TOKEN,
        admin_password="admin-secret",
        database_url=f"sqlite:///{tmp_path}/llm-proxy.db",
        encryption_key=b"k" * 32,
        data_dir=tmp_path,
        change_poll_seconds=0.05,
        usage_flush_seconds=0.2,
        event_build_in="thread",
    )
    return replace(base, **overrides)


@dataclass
class Proxy:
    """A running proxy and helpers to drive it the way an operator and an application would."""

    client: TestClient[web.Request, web.Application]
    upstream: UpstreamLog
    app: web.Application
    # Management calls use connections of their own, so the proxy calls of a test always start
    # on the front door's fast path (a connection that asked for /manage is aiohttp's from then on).
    operator: aiohttp.ClientSession

    @property
    def base_url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}

    async def manage(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        response = await self.operator.request(
            method, f"{self.base_url}/manage{path}", json=json, headers=self.auth()
        )
        body = await response.json() if response.status != 204 else None
        return response.status, body

    async def create_project(self, name: str = "demo", api_key: str = UPSTREAM_KEY) -> str:
        status, body = await self.manage("POST", "/projects", {"name": name, "api_key": api_key})
        assert status == 201, body
        return str(body["id"])

    async def issue_token(
        self,
        project_id: str | None = None,
        *,
        minutes: int = 60,
        max_requests: int | None = None,
        **limits: Any,
    ) -> dict[str, Any]:
        """Issue a token; ``limits`` are further fields of the request (rpm, allowed_models, …)."""
        project_id = project_id or await self.create_project()
        payload: dict[str, Any] = {"project_id": project_id, "duration_minutes": minutes, **limits}
        if max_requests is not None:
            payload["max_requests"] = max_requests
        status, body = await self.manage("POST", "/tokens", payload)
        assert status == 201, body
        return dict(body)

    async def token(self, **kwargs: Any) -> str:
        return str((await self.issue_token(**kwargs))["token"])

    def sdk(self, token: str) -> openai.AsyncOpenAI:
        """The real OpenAI SDK pointed at this proxy with a withering token."""
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=token, max_retries=0)

    @property
    def components(self) -> Any:
        return self.app[COMPONENTS]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own, on a free port."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis that keeps its data across a restart (append-only file), as production runs it:
    events Redis acknowledged before it stopped are its to keep, not the proxy's, and the limits'
    windows and holds are still there (one that lost them refuses their tokens a while)."""
    server = RedisServer(tmp_path / "redis", durable=True)
    server.start()
    yield server
    server.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test using ``redis_server`` (or ``durable_redis``) starts one: it needs Redis and belongs
    to the process tier."""
    for item in items:
        if {"redis_server", "durable_redis"} & set(getattr(item, "fixturenames", ())):
            for mark in (pytest.mark.redis, pytest.mark.process):
                if item.get_closest_marker(mark.name) is None:
                    item.add_marker(mark)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Everything the application logs during the test, as text."""
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    yield stream
    # structlog's own defaults again: a level filter left behind would hide info lines from the
    # structlog.testing.capture_logs of later tests (it swaps the processors, not the filter).
    structlog.reset_defaults()


@pytest.fixture
async def upstream_server() -> AsyncIterator[TestServer]:
    server = TestServer(fake_upstream_app())
    await server.start_server()
    yield server
    await server.close()


class FrontTestServer(BaseTestServer):
    """The application served the way ``llm-proxy server`` serves it: through the front door."""

    def __init__(self, app: web.Application, **site_options: float) -> None:
        super().__init__()
        self.app = app
        self.site_options = site_options

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, access_log=None, **kwargs)

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.runner:
            return
        self.runner = await self._make_runner(handler_cancellation=True)
        await self.runner.setup()
        sock = listening_socket("127.0.0.1", 0, reuse_port=False)
        self.port = sock.getsockname()[1]
        self.scheme = "http"
        components = self.app[COMPONENTS]
        options = dict(self.site_options)
        grace = options.pop("grace_seconds", 1.0)
        poke = components.poller.poke if components.poller else None
        await FrontSite(
            self.runner,
            sock,
            components.proxy,
            limits=FrontLimits(**options),
            grace_seconds=grace,
            on_data=poke,
        ).start()
        self._root = URL(f"http://127.0.0.1:{self.port}")


async def start_proxy(
    tmp_path: Path, upstream_server: TestServer, **overrides: Any
) -> tuple[TestClient[web.Request, web.Application], web.Application]:
    api_overrides = overrides.pop("api", {})
    site_options = overrides.pop("site", {})
    settings = make_settings(tmp_path, **overrides)
    base_url = api_overrides.pop("base_url", str(upstream_server.make_url("")).rstrip("/"))
    api_config = provider_config(base_url, **api_overrides)
    app = await create_app(settings, api_config=api_config)
    client: TestClient[web.Request, web.Application] = TestClient(
        FrontTestServer(app, **site_options)
    )
    await client.start_server()
    return client, app


@pytest.fixture
def proxy_database_url(tmp_path: Path) -> str:
    """The database of the ``proxy`` fixtures; a module overrides it to run on each backend."""
    return f"sqlite:///{tmp_path}/llm-proxy.db"


@pytest.fixture
async def proxy_factory(
    tmp_path: Path, upstream_server: TestServer, proxy_database_url: str
) -> AsyncIterator[Any]:
    """Start proxies on one database (as separate processes would share it)."""
    started: list[TestClient[web.Request, web.Application]] = []

    sessions: list[aiohttp.ClientSession] = []

    async def start(**overrides: Any) -> Proxy:
        overrides.setdefault("database_url", proxy_database_url)
        client, app = await start_proxy(tmp_path, upstream_server, **overrides)
        started.append(client)
        sessions.append(aiohttp.ClientSession())
        return Proxy(client, upstream_server.app[UPSTREAM_LOG], app, sessions[-1])

    yield start
    for session in sessions:
        await session.close()
    for client in started:
        await client.close()


@pytest.fixture
async def proxy(proxy_factory: Any) -> Proxy:
    result: Proxy = await proxy_factory()
    return result


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (run as an unprivileged user when we are root)."""
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database of this test's own on the session's PostgreSQL server."""
    with postgres_server.database() as url:
        yield url


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, which it may stop and restart."""
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def own_database(own_postgres: PostgresServer) -> Iterator[str]:
    """A database on ``own_postgres``; request it before any server using it, so it outlives them."""
    with own_postgres.database() as url:
        yield url


@pytest.fixture
async def freezing_relay(own_postgres: PostgresServer) -> AsyncIterator[FreezingRelay]:
    """A relay to ``own_postgres`` that freezes it at a chosen statement (see freezing_relay.py);
    request it before any server using it, so it outlives them."""
    async with FreezingRelay(own_postgres) as relay:
        yield relay


FrozenProxyStarter = Callable[..., Awaitable[tuple[FreezingRelay, Proxy]]]


@pytest.fixture
async def proxy_on_freezing_relay(
    own_database: str, freezing_relay: FreezingRelay, proxy_factory: Any
) -> FrozenProxyStarter:
    """Start a proxy (``overrides`` as for ``proxy_factory``) whose database, ``own_database``,
    it reaches through ``freezing_relay``: the relay, to arm at a statement, and the proxy."""

    async def start(**overrides: Any) -> tuple[FreezingRelay, Proxy]:
        url = freezing_relay.url(own_database)
        proxy: Proxy = await proxy_factory(database_url=url, **overrides)
        return freezing_relay, proxy

    return start


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.process])]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend in turn: a SQLite file, then a PostgreSQL database of the test's own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/llm-proxy.db"
    url: str = request.getfixturevalue("postgres_url")
    return url
