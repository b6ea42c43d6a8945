"""``llm-proxy benchmark``: flags to a ``BenchmarkConfig``, a run on uvloop, a table or JSON out."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click
import orjson
import uvloop
from click.core import ParameterSource
from rich.console import Console

from llm_proxy.finite_range import FiniteFloatRange
from llm_proxy.secret_input import ON_THE_COMMAND_LINE, secret_option_value
from llm_proxy.tools.benchmark.config import METHODS, BenchmarkConfig
from llm_proxy.tools.benchmark.engine import run_benchmark
from llm_proxy.tools.benchmark.progress import RichProgress
from llm_proxy.tools.benchmark.report import render_report
from llm_proxy.tools.benchmark.results import BenchmarkReport

MAX_CONCURRENCY = 10_000
# The shells' status for a command stopped by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130


@click.command("benchmark")
@click.option("--base-url", required=True, help="Route under test, usually the proxy.")
@click.option("--endpoint", default="/v1/chat/completions", show_default=True)
@click.option(
    "--token",
    default=None,
    envvar="BENCHMARK_TOKEN",
    show_envvar=True,
    help="Bearer token for --base-url (a withering token); - reads it from stdin."
    f" {ON_THE_COMMAND_LINE}",
)
@click.option(
    "--requests",
    "requests_",
    type=click.IntRange(min=1),
    help="Requests per route and phase [default: 200 unless --duration].",
)
@click.option("--duration", type=FiniteFloatRange(min=0, min_open=True), help="Seconds per phase.")
# Each concurrent request holds a connection: beyond this a process runs out of file
# descriptors long before, and the run's per-slot lists would not fit in memory.
@click.option(
    "--concurrency", "-c", default=1, show_default=True, type=click.IntRange(1, MAX_CONCURRENCY)
)
@click.option("--stream", is_flag=True, help="Record first byte and inter-chunk gaps (SSE).")
@click.option(
    "--method", default="POST", show_default=True, type=click.Choice(METHODS, case_sensitive=False)
)
@click.option(
    "--body",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File sent as the JSON body, as is [default: a small chat completion request].",
)
@click.option("--compare-url", help="Direct route to compare with, e.g. the upstream itself.")
@click.option(
    "--compare-token",
    envvar="BENCHMARK_COMPARE_TOKEN",
    show_envvar=True,
    help="Bearer token for --compare-url (the real key); - reads it from stdin (the line after"
    f" --token's when both do). {ON_THE_COMMAND_LINE}",
)
@click.option(
    "--warmup",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests per route before measuring, not recorded.",
)
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    type=FiniteFloatRange(min=0, min_open=True),
    help="Seconds per request, from sending it to its last byte.",
)
@click.option(
    "--connect-timeout",
    default=10.0,
    show_default=True,
    type=FiniteFloatRange(min=0, min_open=True),
    help="Seconds per connection attempt.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def benchmark_command(
    base_url: str,
    endpoint: str,
    token: str | None,
    requests_: int | None,
    duration: float | None,
    concurrency: int,
    stream: bool,
    method: str,
    body: Path | None,
    compare_url: str | None,
    compare_token: str | None,
    warmup: int,
    timeout: float,
    connect_timeout: float,
    as_json: bool,
) -> None:
    """Measure latency and throughput of a route and, with --compare-url, what the proxy adds.

    With --compare-url both routes are measured interleaved in one phase (same machine noise),
    then each alone, back to back, for the throughput ratio. Timings cover 2xx responses; every
    other outcome is counted under "errors". Ctrl-C stops the run and reports the figures so
    far. Exit status: 0; 1 if every request failed; 130 if interrupted.

    \b
    --json prints one object:
      config          base_url, compare_url, endpoint, method, concurrency,
                      requests, duration, stream, warmup
      proxy           route stats of --base-url (interleaved phase when comparing)
      direct          route stats of --compare-url, or null
      added           null, or {latency_ms, ttfb_ms}: {p50, p90, p99} of
                      proxy minus direct percentiles, in ms
      throughput      null, or {proxy, direct: route stats of each route
                      alone, ratio: proxy 2xx/s over direct 2xx/s}
      interrupted     true when Ctrl-C stopped the run (throughput is then null)
    \b
    route stats:
      url, requests, succeeded, failed, connections (opened in the phase), seconds,
      requests_per_second (2xx per second), status {code: n},
      errors {code or exception name: n}, latency_ms, headers_ms (to the
      response head), ttfb_ms (to the first body byte), inter_chunk_ms
      (--stream only, else null), server_timing_ms {metric: ...} from
      Server-Timing "dur" values (the first 32 names); each timing is null or
      {count, min, mean, p50, p90, p99, max} in ms.
    """
    if requests_ is None and duration is None:
        requests_ = 200
    if token is not None:
        token = secret_option_value(token, "--token", "Token for --base-url")
    source = click.get_current_context().get_parameter_source("compare_token")
    if compare_url is None and source is ParameterSource.ENVIRONMENT:
        compare_token = None  # exported for the runs that compare, not an error in the others
    if compare_token is not None:
        compare_token = secret_option_value(
            compare_token, "--compare-token", "Token for --compare-url"
        )
    try:
        config = BenchmarkConfig(
            base_url=base_url,
            endpoint=endpoint,
            token=token,
            requests=requests_,
            duration=duration,
            concurrency=concurrency,
            stream=stream,
            method=method.upper(),
            body=body.read_bytes() if body is not None else None,
            compare_url=compare_url,
            compare_token=compare_token,
            warmup=warmup,
            timeout=timeout,
            connect_timeout=connect_timeout,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    errors = Console(stderr=True)
    progress = RichProgress(errors) if errors.is_terminal and not as_json else None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        report = runner.run(_measure(config, progress))
    if as_json:
        click.echo(orjson.dumps(report).decode())
    else:
        Console(highlight=False).print(render_report(report))
    if report.interrupted:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    if report.all_failed:
        raise click.exceptions.Exit(1)


async def _measure(config: BenchmarkConfig, progress: RichProgress | None) -> BenchmarkReport:
    """The run, which Ctrl-C stops where it is rather than throwing its figures away."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background of a script: Ctrl-C is not for this process.
        return await run_benchmark(config, progress)
    interrupt = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupt.set)
    try:
        return await run_benchmark(config, progress, interrupt)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
