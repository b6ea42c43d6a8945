"""``llm-proxy dispatcher``: run a dispatcher worker, check that one is alive, or replay a
dead-letter file.

With :mod:`dispatcher.options`, the only place the dispatcher reads the environment (through
click's ``envvar``). A standalone dispatcher needs the Redis bus: the memory bus lives inside the
server process. Nothing printed here names a credential: Redis is shown as host:port, backends'
keys never at all.
"""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from redis.exceptions import RedisError

from dispatcher import health, replay
from dispatcher.backends import Backend
from dispatcher.deadletter import DeadLetterFile
from dispatcher.exit_codes import Exit
from dispatcher.handback import RedisHandback
from dispatcher.metrics_server import MetricsAddress, MetricsListenError, serving_metrics
from dispatcher.options import (
    DATA_DIR,
    SERVICES,
    BackendOptions,
    backend_options,
    build_backend,
    credentials,
    redis_location,
    redis_options,
    redis_problem,
)
from dispatcher.replay_progress import ProgressError, ProgressFile
from dispatcher.retry import Backoff
from dispatcher.worker import AuthFailed, BackendStartError, Worker, WorkerSettings
from llm_proxy.events.redis import RedisBus, client_from_url
from llm_proxy.finite_range import FiniteFloatRange
from llm_proxy.private_files import owner_only_files

HEARTBEAT_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class BusSettings:
    redis_url: str
    stream: str
    claim_idle: float

    def __repr__(self) -> str:
        # Not the URL: it may hold a password.
        return f"BusSettings(stream={self.stream!r}, claim_idle={self.claim_idle})"


# -- llm-proxy dispatcher ------------------------------------------------------------------------


async def _serve(
    bus_settings: BusSettings,
    backend: Backend,
    settings: WorkerSettings,
    metrics_address: MetricsAddress | None,
) -> Exit:
    bus = RedisBus(
        bus_settings.redis_url, stream=bus_settings.stream, claim_idle=bus_settings.claim_idle
    )
    heartbeat = health.RedisHeartbeat(
        bus.client, bus_settings.stream, settings.service, ttl=3 * settings.heartbeat_interval
    )
    handback = RedisHandback(bus.client, bus_settings.stream)
    worker = Worker(bus, backend, settings, heartbeat=heartbeat, handback=handback)
    exporting: AbstractAsyncContextManager[None] = (
        nullcontext() if metrics_address is None else serving_metrics(worker, metrics_address)
    )
    try:
        async with exporting:
            return await worker.serve()
    finally:
        await bus.close()


WORKER_EXITS = """\b
Exit codes:
  0  stopped by SIGTERM/SIGINT; with --burst: every event read was delivered
  1  the backend could not start (an unwritable path, a CloudWatch log group
     name AWS refuses), or --metrics-port could not be bound (in use); an
     endpoint that cannot be reached (CloudWatch's included) is retried per
     --max-attempts (0: until it answers) like any failed delivery; with
     --burst: events refused for good could not be written to the
     dead-letter file (they stay on the bus)
  2  bad invocation
  3  --burst: Redis unreachable; undelivered events stay on the bus
  4  --burst: events were dead-lettered (see --dead-letter and `replay`)
  5  the backend refused the credentials (HTTP 401/403, Lunary's 402 for a key
     that is not a project id, an AWS authentication error, or a permission
     the AWS key lacks, such as creating a missing log group): the dispatcher
     stops, dead-letters nothing, and leaves the events it did not deliver on
     the bus for the next start
  6  --burst: the bus lost events before this service read them (the stream's
     length cap trimmed them while the service was behind, or Redis lost the
     consumer group: restarted without persistence); logged as
     events.redis_unread_entries_trimmed, events.redis_entries_dropped or
     events.redis_group_lost
When several apply, 5 wins over 3, 3 over 6, and 6 over 4."""


@click.group(
    "dispatcher",
    invoke_without_command=True,
    help="Deliver instrumentation events from the Redis bus to one backend.",
    epilog=WORKER_EXITS,
)
@click.option(
    "--service",
    type=click.Choice(SERVICES),
    envvar="LLM_PROXY_DISPATCHER_SERVICE",
    show_envvar=True,
    help="Backend to deliver to; also the Redis consumer group, so each service gets every event.",
)
@click.option(
    "--event-bus",
    type=click.Choice(["memory", "redis"]),
    envvar="LLM_PROXY_EVENT_BUS",
    show_envvar=True,
    default="redis",
    show_default=True,
    help="Must be redis: the memory bus exists only inside the server process.",
)
@redis_options
@DATA_DIR
@click.option(
    "--dead-letter",
    type=click.Path(path_type=Path),
    help="Dead-letter JSONL file for events refused for good. "
    "[default: DATA_DIR/dead-letter-SERVICE.jsonl]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Most events sent to the backend at once.",
)
@click.option(
    "--batch-wait",
    type=FiniteFloatRange(min=0),
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
    type=FiniteFloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Longest retry wait, seconds; also caps the wait a backend asks for with Retry-After.",
)
@click.option(
    "--drain-timeout",
    type=FiniteFloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to finish on SIGTERM.",
)
@click.option(
    "--claim-idle",
    # Below a second the keep-alive of a batch in hand would spin (it runs every claim_idle / 3).
    type=FiniteFloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds before events pending on a dead dispatcher are taken over.",
)
@click.option(
    "--burst",
    is_flag=True,
    help="Exit once no events are waiting (or Redis cannot be reached); see the exit codes.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    envvar="LLM_PROXY_DISPATCHER_METRICS_PORT",
    show_envvar=True,
    help="Serve GET /metrics (Prometheus) and GET /health on this port. [default: off]",
)
@click.option(
    "--metrics-host",
    envvar="LLM_PROXY_DISPATCHER_METRICS_HOST",
    show_envvar=True,
    default="127.0.0.1",
    show_default=True,
    help="Address --metrics-port listens on (0.0.0.0 for a scraper on another host or pod).",
)
@backend_options
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
    metrics_port: int | None,
    metrics_host: str,
    **backend_options: Any,
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
    redis_location(redis_url)  # a malformed URL is a usage error, before anything starts
    backend = build_backend(service, BackendOptions(**backend_options), data_dir)
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
        credentials=credentials(service),
    )
    metrics_address = None if metrics_port is None else MetricsAddress(metrics_host, metrics_port)
    try:
        # Event logs and dead letters hold prompts and answers: DATA_DIR and the directories
        # the dispatcher makes for them are its owner's only, as the server's are.
        with owner_only_files():
            code = asyncio.run(
                _serve(
                    BusSettings(redis_url, stream, claim_idle), backend, settings, metrics_address
                )
            )
    except MetricsListenError as exc:
        click.echo(f"llm-proxy dispatcher: --metrics-port: {exc}", err=True)
        ctx.exit(Exit.FAILED)
    if code == Exit.BUS_UNAVAILABLE:
        click.echo(f"Redis unreachable at {redis_location(redis_url)}: burst run stopped", err=True)
    ctx.exit(code)


def _with_the_groups_flags(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with those the subcommand was not given on its command line taken from the
    ``llm-proxy dispatcher`` options typed before it (``--service file check``, in the order of
    the running command's line), which click would otherwise drop without a word."""
    group = ctx.parent
    if group is None:
        return values
    merged = dict(values)
    for name in values:
        if (
            ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE
            and group.get_parameter_source(name) is ParameterSource.COMMANDLINE
        ):
            merged[name] = group.params[name]
    return merged


def _service_given(service: str | None) -> str:
    # Not click's required=True: that would refuse a --service given before the subcommand.
    if service is None:
        raise click.UsageError(f"Missing option '--service': {', '.join(SERVICES)}")
    return service


# -- llm-proxy dispatcher check ------------------------------------------------------------------


async def _check(
    redis_url: str, stream: str, service: str, max_age: float, max_lag: float | None
) -> health.Status:
    client = client_from_url(redis_url, timeout=2.0)
    try:
        return await health.check(client, stream, service, max_age=max_age, max_lag=max_lag)
    finally:
        await client.aclose()


CHECK_EXITS = """\b
Exit codes:
  0  a dispatcher for SERVICE is alive
  1  no dispatcher running for SERVICE, or it is lagging
  2  bad invocation
  3  Redis unreachable (or it refused the credentials in the URL)"""


@dispatcher_command.command("check", epilog=CHECK_EXITS)
@click.option(
    "--service",
    type=click.Choice(SERVICES),
    envvar="LLM_PROXY_DISPATCHER_SERVICE",
    show_envvar=True,
    help="Service whose dispatcher to check.  [required]",
)
@redis_options
@click.option(
    "--max-age",
    type=FiniteFloatRange(min=0),
    default=3 * HEARTBEAT_INTERVAL,
    show_default=True,
    help="Seconds since the last heartbeat that still count as alive.",
)
@click.option(
    "--max-lag",
    type=FiniteFloatRange(min=0),
    help="Also count as lagging when the oldest event not yet delivered waited longer than this, "
    "in seconds. [default: no limit; a liveness probe should not restart a dispatcher that "
    "waits for its backend]",
)
@click.pass_context
def check_command(
    ctx: click.Context,
    service: str | None,
    redis_url: str,
    stream: str,
    max_age: float,
    max_lag: float | None,
) -> None:
    """Say whether a dispatcher for SERVICE is alive, with its counts and backlog."""
    given = _with_the_groups_flags(
        ctx, {"service": service, "redis_url": redis_url, "stream": stream}
    )
    service, redis_url, stream = (
        _service_given(given["service"]),
        given["redis_url"],
        given["stream"],
    )
    redis_location(redis_url)
    try:
        status = asyncio.run(_check(redis_url, stream, service, max_age, max_lag))
    except (RedisError, OSError) as exc:
        click.echo(redis_problem(exc, redis_url), err=True)
        ctx.exit(Exit.BUS_UNAVAILABLE)
    if status.state != "alive":
        click.echo(status.line, err=True)
        ctx.exit(Exit.FAILED)
    click.echo(status.line)


# -- llm-proxy dispatcher replay -----------------------------------------------------------------

REPLAY_EXITS = """\b
Exit codes:
  0  every event in FILE was delivered (--dry-run: FILE was read)
  1  the backend could not start: nothing was sent
  2  bad invocation (FILE missing, --dead-letter exists), another replay of FILE
     running, or FILE.replay-progress not this user's own
  4  some events still fail: they are in the new dead-letter file
  5  the backend refused the credentials: nothing more was sent, and every
     event not delivered is in the new dead-letter file (when it refused them
     at start, nothing was sent and nothing written)
  7  interrupted (SIGINT, SIGTERM) after a batch: the same command resumes
     after it, from FILE.replay-progress (a second signal stops at once)"""


def _replay_output(file: Path, output: Path | None) -> Path:
    if output is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        output = file.with_name(f"{file.stem}.replay-{stamp}.jsonl")
    if output.exists():
        what = "FILE itself" if output.resolve() == file.resolve() else "a file that exists"
        raise click.BadParameter(
            f"{output} is {what}: replay writes what still fails to a new file",
            param_hint="--dead-letter",
        )
    return output


async def _replay_until_signalled(*args: Any, **kwargs: Any) -> replay.Report:
    """:func:`replay.replay`, stopped after the batch in hand by the first SIGINT or SIGTERM;
    a second one has its default effect, at once (the progress kept stays right)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def stopping(sig: signal.Signals) -> None:
        stop.set()
        loop.remove_signal_handler(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping, sig)
    try:
        return await replay.replay(*args, stop=stop, **kwargs)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@dispatcher_command.command("replay", epilog=REPLAY_EXITS)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--service",
    type=click.Choice(SERVICES),
    help="Backend to send the events to (need not be the one that refused them).  [required]",
)
@click.option(
    "--dead-letter",
    "output",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="New file for the events that still fail; must not exist. "
    "[default: next to FILE, its name without the suffix + .replay-UTCTIME.jsonl:"
    " dl-1.replay-20250101T000000Z.jsonl for dl-1.jsonl]",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Count FILE's events by the backend that refused them, and unreadable lines; send nothing.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Most events sent to the backend at once.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Attempts per event while the backend's refusals are retryable (429, 5xx, network).",
)
@DATA_DIR
@backend_options
@click.pass_context
def replay_command(
    ctx: click.Context,
    /,
    file: Path,
    service: str | None,
    output: Path | None,
    dry_run: bool,
    batch_size: int,
    max_attempts: int,
    data_dir: Path,
    **backend_options: Any,
) -> None:
    """Send the events of a dead-letter FILE to a backend again.

    FILE is only read, never changed. Every event not delivered goes to a new dead-letter file
    (only created when something fails), so nothing is lost and that file is the one to replay
    next. Move FILE aside before replaying it if a dispatcher may still be adding to it. How far
    it got is kept in FILE.replay-progress after every batch: interrupted, the same command
    resumes there, and nothing delivered is sent again. A second replay of FILE while one runs is
    refused.

    Replaying an event the backend already has: Lunary keeps it once (run ids come from event
    ids); Helicone may log it twice (the event id is sent as Helicone-Request-Id); CloudWatch
    and the file store it twice (each record carries the event id).
    """
    given = _with_the_groups_flags(
        ctx, {"service": service, "data_dir": data_dir, **backend_options}
    )
    service, data_dir = _service_given(given.pop("service")), given.pop("data_dir")
    backend_options = given
    if dry_run:  # FILE is only read: no backend, so no credentials, needed
        tally = replay.count(file)
        origins = ", ".join(f"{name}: {n}" for name, n in sorted(tally.by_backend.items()))
        click.echo(
            f"dry run: {file} holds {tally.events} events"
            + (f" ({origins})" if origins else "")
            + (f" and {tally.unreadable} unreadable lines" if tally.unreadable else "")
            + f"; nothing was sent to {service}"
        )
        return
    backend = build_backend(service, BackendOptions(**backend_options), data_dir)
    progress = ProgressFile(file)
    try:
        progress.claim()  # (released as the command ends: by close, or by the process's exit)
        ctx.call_on_close(progress.release)
        start = progress.load()
    except ProgressError as exc:
        raise click.BadParameter(str(exc), param_hint="FILE") from None
    if start is None:
        target = _replay_output(file, output)
    else:
        target = start.dead_letter
        if output is not None and output.absolute() != target.absolute():
            raise click.BadParameter(
                f"{file} was being replayed into {target}: resume without --dead-letter, or"
                f" remove {progress.path} to replay {file} from its start",
                param_hint="--dead-letter",
            )
        click.echo(
            f"resuming {file} after line {start.line}, where a replay of it was interrupted;"
            f" what fails goes on into {target}",
            err=True,
        )
    try:
        with owner_only_files():
            report = asyncio.run(
                _replay_until_signalled(
                    file,
                    backend,
                    DeadLetterFile(target, new=start is None),
                    batch_size=batch_size,
                    max_attempts=max_attempts,
                    progress=progress,
                    start=start,
                )
            )
    except AuthFailed as exc:
        click.echo(f"{exc}: nothing was sent; {file} is unchanged", err=True)
        click.echo(f"fix {credentials(service)} and replay {file} again", err=True)
        ctx.exit(Exit.AUTH)
    except BackendStartError as exc:
        click.echo(f"cannot start {exc}: nothing was sent; {file} is unchanged", err=True)
        ctx.exit(Exit.FAILED)
    click.echo(
        f"replayed {file} to {service}: {report.read} read, {report.delivered} delivered, "
        f"{report.failed} failed"
        + (f" ({report.unreadable} unreadable lines)" if report.unreadable else "")
    )
    click.echo(f"idempotency: {replay.IDEMPOTENCY[service]}")
    if report.failed:
        click.echo(f"what still fails is in {target}; {file} was not changed", err=True)
    if report.progress_unkept is not None:
        click.echo(
            f"warning: cannot keep the replay's progress ({report.progress_unkept}): had it"
            f" been interrupted, it would have started again from the start of {file}",
            err=True,
        )
    if report.interrupted_after is not None:
        resume = (
            f"run the same command again to resume there ({progress.path} holds where)"
            if report.progress_unkept is None
            else "replay the lines after it (what came before was handled)"
        )
        click.echo(
            f"interrupted after line {report.interrupted_after} of {file}: {resume}", err=True
        )
        ctx.exit(Exit.INTERRUPTED)
    if report.auth_failure is not None:
        click.echo(
            f"{service} refused the credentials ({report.auth_failure}): fix "
            f"{credentials(service)} and replay {target}",
            err=True,
        )
        ctx.exit(Exit.AUTH)
    ctx.exit(Exit.DEAD_LETTERED if report.failed else Exit.OK)
