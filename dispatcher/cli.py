"""``llm-proxy dispatcher``: run a dispatcher worker, or check that one is alive.

The only place the dispatcher reads the environment (through click's ``envvar``). A standalone
dispatcher needs the Redis bus: the memory bus lives inside the server process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import click

from dispatcher import health
from dispatcher.backends import Backend
from dispatcher.backends import helicone as helicone_backend
from dispatcher.backends import lunary as lunary_backend
from dispatcher.backends.file import FileBackend
from dispatcher.retry import Backoff
from dispatcher.worker import Worker, WorkerSettings
from llm_proxy.events.redis import RedisBus, client_from_url

SERVICES = ("file", "helicone", "cloudwatch", "lunary")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_STREAM = "llm-proxy:events"
HEARTBEAT_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class BusSettings:
    redis_url: str
    stream: str
    claim_idle: float

    def __repr__(self) -> str:
        # Not the URL: it may hold a password.
        return f"BusSettings(stream={self.stream!r}, claim_idle={self.claim_idle})"


@dataclass(frozen=True, slots=True)
class BackendOptions:
    path: Path | None
    max_bytes: int
    backups: int
    helicone_url: str
    helicone_api_key: str | None = field(repr=False)
    log_group: str
    log_stream: str
    region: str | None
    endpoint_url: str | None
    lunary_url: str
    lunary_public_key: str | None = field(repr=False)


def _required(value: str | None, option: str, service: str) -> str:
    if not value:
        raise click.UsageError(f"--service {service} needs {option}")
    return value


def build_backend(service: str, options: BackendOptions, data_dir: Path) -> Backend:
    if service == "file":
        return FileBackend(
            options.path or data_dir / "events.jsonl",
            max_bytes=options.max_bytes,
            backups=options.backups,
        )
    if service == "helicone":
        key = _required(options.helicone_api_key, "--helicone-api-key / HELICONE_API_KEY", service)
        return helicone_backend.HeliconeBackend(key, url=options.helicone_url)
    if service == "cloudwatch":
        # aiobotocore comes with the "cloudwatch" extra; the default install does without it.
        try:
            from dispatcher.backends.cloudwatch import CloudWatchBackend
        except ImportError:
            raise click.UsageError(
                "the cloudwatch service needs the cloudwatch extra: pip install 'llm-proxy[cloudwatch]'"
            ) from None
        return CloudWatchBackend(
            options.log_group,
            options.log_stream,
            region=_required(options.region, "--region / AWS_REGION", service),
            endpoint_url=options.endpoint_url,
        )
    key = _required(options.lunary_public_key, "--lunary-public-key / LUNARY_PUBLIC_KEY", service)
    return lunary_backend.LunaryBackend(key, url=options.lunary_url)


async def _serve(bus_settings: BusSettings, backend: Backend, settings: WorkerSettings) -> int:
    bus = RedisBus(
        bus_settings.redis_url, stream=bus_settings.stream, claim_idle=bus_settings.claim_idle
    )
    heartbeat = health.RedisHeartbeat(
        bus.client, bus_settings.stream, settings.service, ttl=3 * settings.heartbeat_interval
    )
    try:
        return await Worker(bus, backend, settings, heartbeat=heartbeat).serve()
    finally:
        await bus.close()


@click.group(
    "dispatcher",
    invoke_without_command=True,
    help="Deliver instrumentation events from the Redis bus to one backend.",
)
@click.option("--service", type=click.Choice(SERVICES), envvar="LLM_PROXY_DISPATCHER_SERVICE")
@click.option(
    "--event-bus",
    type=click.Choice(["memory", "redis"]),
    envvar="LLM_PROXY_EVENT_BUS",
    default="redis",
    show_default=True,
    help="Must be redis: the memory bus exists only inside the server process.",
)
@click.option("--redis-url", envvar="REDIS_URL", default=DEFAULT_REDIS_URL, show_default=True)
@click.option(
    "--stream", envvar="LLM_PROXY_EVENT_STREAM", default=DEFAULT_STREAM, show_default=True
)
@click.option(
    "--data-dir",
    envvar="DATA_DIR",
    type=click.Path(path_type=Path),
    default=Path("data"),
    show_default=True,
)
@click.option(
    "--dead-letter",
    type=click.Path(path_type=Path),
    help="Dead-letter JSONL file. [default: DATA_DIR/dead-letter-SERVICE.jsonl]",
)
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option(
    "--batch-wait",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds a batch may wait to fill.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Dead-letter an event after this many failed attempts; 0 retries until it is accepted.",
)
@click.option(
    "--backoff-cap",
    type=float,
    default=30.0,
    show_default=True,
    help="Longest retry wait, seconds.",
)
@click.option(
    "--drain-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to finish on SIGTERM.",
)
@click.option(
    "--claim-idle",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds before events pending on a dead dispatcher are taken over.",
)
@click.option("--burst", is_flag=True, help="Exit once no events are waiting.")
@click.option(
    "--path",
    envvar="LLM_PROXY_EVENT_LOG",
    type=click.Path(path_type=Path),
    help="file: the JSONL file. [default: DATA_DIR/events.jsonl]",
)
@click.option(
    "--max-bytes",
    type=click.IntRange(1),
    default=100 * 1024 * 1024,
    show_default=True,
    help="file: rotate beyond this size.",
)
@click.option(
    "--backups",
    type=click.IntRange(0),
    default=5,
    show_default=True,
    help="file: rotated files kept.",
)
@click.option(
    "--helicone-url", envvar="HELICONE_URL", default=helicone_backend.DEFAULT_URL, show_default=True
)
@click.option(
    "--helicone-api-key",
    envvar="HELICONE_API_KEY",
    help="helicone: API key (env HELICONE_API_KEY).",
)
@click.option("--log-group", envvar="CLOUDWATCH_LOG_GROUP", default="llm-proxy", show_default=True)
@click.option("--log-stream", envvar="CLOUDWATCH_LOG_STREAM", default="events", show_default=True)
@click.option("--region", envvar="AWS_REGION", help="cloudwatch: AWS region (env AWS_REGION).")
@click.option(
    "--endpoint-url",
    envvar="AWS_ENDPOINT_URL",
    help="cloudwatch: endpoint override (env AWS_ENDPOINT_URL).",
)
@click.option(
    "--lunary-url", envvar="LUNARY_API_URL", default=lunary_backend.DEFAULT_URL, show_default=True
)
@click.option(
    "--lunary-public-key",
    envvar="LUNARY_PUBLIC_KEY",
    help="lunary: project public key (env LUNARY_PUBLIC_KEY).",
)
@click.pass_context
def dispatcher_command(
    ctx: click.Context,
    /,
    service: str | None,
    event_bus: str,
    redis_url: str,
    stream: str,
    data_dir: Path,
    dead_letter: Path | None,
    batch_size: int,
    batch_wait: float,
    max_attempts: int,
    backoff_cap: float,
    drain_timeout: float,
    claim_idle: float,
    burst: bool,
    path: Path | None,
    max_bytes: int,
    backups: int,
    helicone_url: str,
    helicone_api_key: str | None,
    log_group: str,
    log_stream: str,
    region: str | None,
    endpoint_url: str | None,
    lunary_url: str,
    lunary_public_key: str | None,
) -> None:
    """Run a dispatcher: ``llm-proxy dispatcher --service file|helicone|cloudwatch|lunary``."""
    if ctx.invoked_subcommand is not None:
        return
    if service is None:
        raise click.UsageError("--service is required: file, helicone, cloudwatch or lunary")
    if event_bus != "redis":
        raise click.UsageError(
            "a standalone dispatcher needs the redis bus (LLM_PROXY_EVENT_BUS=redis); the memory "
            "bus is in-process: use `llm-proxy server --file-event-log PATH`"
        )
    options = BackendOptions(
        path,
        max_bytes,
        backups,
        helicone_url,
        helicone_api_key,
        log_group,
        log_stream,
        region,
        endpoint_url,
        lunary_url,
        lunary_public_key,
    )
    backend = build_backend(service, options, data_dir)
    settings = WorkerSettings(
        service=service,
        dead_letter_path=dead_letter or data_dir / f"dead-letter-{service}.jsonl",
        batch_size=batch_size,
        batch_wait=batch_wait,
        max_attempts=max_attempts,
        backoff=Backoff(cap=backoff_cap),
        drain_timeout=drain_timeout,
        burst=burst,
        heartbeat_interval=HEARTBEAT_INTERVAL,
    )
    bus = BusSettings(redis_url, stream, claim_idle)
    ctx.exit(asyncio.run(_serve(bus, backend, settings)))


async def _check(redis_url: str, stream: str, service: str, max_age: float) -> str | None:
    client = client_from_url(redis_url, timeout=2.0)
    try:
        return await health.check(client, stream, service, max_age=max_age)
    finally:
        await client.aclose()


@dispatcher_command.command("check")
@click.option(
    "--service", type=click.Choice(SERVICES), envvar="LLM_PROXY_DISPATCHER_SERVICE", required=True
)
@click.option("--redis-url", envvar="REDIS_URL", default=DEFAULT_REDIS_URL, show_default=True)
@click.option(
    "--stream", envvar="LLM_PROXY_EVENT_STREAM", default=DEFAULT_STREAM, show_default=True
)
@click.option(
    "--max-age",
    type=float,
    default=3 * HEARTBEAT_INTERVAL,
    show_default=True,
    help="Seconds since the last heartbeat that still count as alive.",
)
@click.pass_context
def check_command(
    ctx: click.Context, service: str, redis_url: str, stream: str, max_age: float
) -> None:
    """Exit 0 if a dispatcher for SERVICE sent a heartbeat recently, else 1."""
    line = asyncio.run(_check(redis_url, stream, service, max_age))
    if line is None:
        click.echo(f"no live dispatcher for {service}", err=True)
        ctx.exit(1)
    click.echo(line)
