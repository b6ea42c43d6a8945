"""``llm-proxy benchmark``: the latency and throughput cost of a route, seen from the client.

The load generator is a minimal HTTP/1.1 client on httptools rather than aiohttp's, because a full
client spends tens of microseconds per request, which would drown the ~0.1 ms we want to see. Each
worker holds one keep-alive connection per route; connection set-up is never part of a sample.

With a comparison route, both routes are measured interleaved (each worker alternates them, half
of the workers starting with either) so both see the same machine noise, then each alone for
throughput. Percentiles come from HdrHistograms at microsecond resolution.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast
from urllib.parse import urlsplit

import click
import httptools
import orjson
import uvloop
from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TimeElapsedColumn
from rich.table import Table

_MAX_US = 600_000_000  # longer samples are clamped: a benchmark request past ten minutes is lost
_DEFAULT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
# No HEAD: the parser cannot tell that a HEAD response has no body.
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_BODYLESS = frozenset({"GET", "DELETE"})
_TICK = 0.25


class IncompleteResponse(ConnectionError):
    """The connection closed before the response ended."""


@dataclass(frozen=True, slots=True)
class BenchmarkConfig:
    """One benchmark run. Exactly one of ``requests`` (per route) and ``duration`` (seconds)."""

    base_url: str
    endpoint: str = "/v1/chat/completions"
    token: str | None = field(default=None, repr=False)
    requests: int | None = None
    duration: float | None = None
    concurrency: int = 1
    stream: bool = False
    method: str = "POST"
    body: bytes | None = None  # None: a small chat completion request for POST, nothing for GET
    compare_url: str | None = None
    compare_token: str | None = field(default=None, repr=False)
    warmup: int = 0  # requests per route before measuring, not recorded
    timeout: float = 60.0  # per request and per connection attempt

    def __post_init__(self) -> None:
        if (self.requests is None) == (self.duration is None):
            raise ValueError("give exactly one of requests and duration")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.concurrency < 1 or self.warmup < 0 or self.timeout <= 0:
            raise ValueError("concurrency and timeout must be positive, warmup not negative")
        if self.compare_token is not None and self.compare_url is None:
            raise ValueError("compare_token needs compare_url")
        if self.method.upper() not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        for name, value in (
            ("endpoint", self.endpoint),
            ("token", self.token),
            ("compare_token", self.compare_token),
        ):
            if value and (not value.isprintable() or " " in value):
                raise ValueError(f"{name} must be printable and without spaces")
        _Target.build("proxy", self.base_url, self.token, self)
        if self.compare_url is not None:
            _Target.build("direct", self.compare_url, self.compare_token, self)

    def request_body(self) -> bytes | None:
        if self.body is not None:
            return self.body
        if self.method.upper() in _BODYLESS:
            return None
        return orjson.dumps({**_DEFAULT_BODY, "stream": True} if self.stream else _DEFAULT_BODY)

    def describe(self) -> dict[str, object]:
        """The settings worth printing next to the figures; never the tokens."""
        return {
            "base_url": self.base_url,
            "compare_url": self.compare_url,
            "endpoint": self.endpoint,
            "method": self.method.upper(),
            "concurrency": self.concurrency,
            "requests": self.requests,
            "duration": self.duration,
            "stream": self.stream,
            "warmup": self.warmup,
        }


@dataclass(frozen=True, slots=True)
class Summary:
    """A distribution in milliseconds."""

    count: int
    min: float
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True)
class Delta:
    """How much slower one route is than another, percentile by percentile, in milliseconds."""

    p50: float
    p90: float
    p99: float

    @classmethod
    def between(cls, slow: Summary | None, fast: Summary | None) -> Delta | None:
        if slow is None or fast is None:
            return None
        return cls(
            round(slow.p50 - fast.p50, 3),
            round(slow.p90 - fast.p90, 3),
            round(slow.p99 - fast.p99, 3),
        )


@dataclass(frozen=True, slots=True)
class RouteStats:
    """What one route did in one phase. Timings cover 2xx responses only."""

    url: str
    requests: int
    succeeded: int
    failed: int
    connections: int
    seconds: float
    requests_per_second: float  # 2xx responses per second
    status: dict[str, int]
    errors: dict[str, int]  # non-2xx by status code, transport failures by exception name
    latency_ms: Summary | None
    headers_ms: Summary | None
    ttfb_ms: Summary | None
    inter_chunk_ms: Summary | None
    server_timing_ms: dict[str, Summary]


@dataclass(frozen=True, slots=True)
class Added:
    """What the proxy adds over the direct route: proxy percentiles minus direct percentiles."""

    latency_ms: Delta | None
    ttfb_ms: Delta | None


@dataclass(frozen=True, slots=True)
class Throughput:
    """Each route run alone, back to back, at the configured concurrency."""

    proxy: RouteStats
    direct: RouteStats
    ratio: float | None  # proxy requests/s over direct requests/s


@dataclass(frozen=True, slots=True)
class BenchmarkReport:
    """Everything measured; ``orjson.dumps`` turns it into the ``--json`` document."""

    config: dict[str, object]
    proxy: RouteStats
    direct: RouteStats | None = None
    added: Added | None = None
    throughput: Throughput | None = None

    @property
    def all_failed(self) -> bool:
        routes = [self.proxy, self.direct]
        if self.throughput is not None:
            routes += [self.throughput.proxy, self.throughput.direct]
        return not any(route.succeeded for route in routes if route is not None)


class ProgressSink(Protocol):
    """Told about each phase: its label, its total (requests or seconds) and progress ticks."""

    def begin(self, label: str, total: float) -> None: ...

    def update(self, completed: float) -> None: ...

    def end(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Target:
    name: str
    url: str
    host: str
    port: int
    tls: bool
    payload: bytes

    @classmethod
    def build(cls, name: str, base_url: str, token: str | None, config: BenchmarkConfig) -> _Target:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        authority = host if parts.port is None else f"{host}:{port}"
        target = parts.path.rstrip("/") + "/" + config.endpoint.lstrip("/")
        lines = [
            f"{config.method.upper()} {target} HTTP/1.1",
            f"Host: {authority}",
            "User-Agent: llm-proxy-benchmark",
            "Accept: */*",
        ]
        if token:
            lines.append(f"Authorization: Bearer {token}")
        body = config.request_body()
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        url = f"{parts.scheme}://{authority}{target}"
        return cls(name, url, parts.hostname, port, tls, head + (body or b""))


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keep_chunks: bool, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._keep_chunks = keep_chunks
        self._keep_alive = True
        self._now = 0.0
        self.open = False
        self.status = 0
        self.end_at = self.headers_at = self.first_body_at = 0.0
        self.chunk_times: list[float] = []
        self.server_timing: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.open = True

    def data_received(self, data: bytes) -> None:
        # One clock read per read(2): every event parsed from it happened at that moment.
        self._now = time.perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._finish(exc or IncompleteResponse("connection closed before the response ended"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"server-timing":
            self.server_timing.append(value)

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        self.headers_at = self._now

    def on_body(self, body: bytes) -> None:
        if not self.first_body_at:
            self.first_body_at = self._now
        if self._keep_chunks:
            self.chunk_times.append(self._now)

    def on_message_complete(self) -> None:
        self.end_at = self._now
        if not self._keep_alive:
            self.close()
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)

    def _expire(self) -> None:
        self._finish(TimeoutError("no complete response in time"))
        self.close()

    def close(self) -> None:
        self.open = False
        if self._transport is not None:
            self._transport.close()

    async def exchange(self, payload: bytes) -> float:
        """Send one request and wait for the whole response; return when it was sent."""
        assert self._transport is not None
        self.status = 0
        self.end_at = self.headers_at = self.first_body_at = 0.0
        self.chunk_times.clear()
        self.server_timing.clear()
        waiter = self._waiter = self._loop.create_future()
        # A bare timer rather than asyncio.timeout(): no task cancellation on the hot path.
        timer = self._loop.call_later(self._timeout, self._expire)
        started = time.perf_counter()
        self._transport.write(payload)
        try:
            await waiter
        finally:
            timer.cancel()
        return started


def parse_server_timing(header: str) -> list[tuple[str, float]]:
    """``proxy;dur=0.041, upstream;desc="x";dur=1.2`` → ``[("proxy", 0.041), ("upstream", 1.2)]``."""
    metrics = []
    for entry in header.split(","):
        name, *params = entry.split(";")
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() != "dur":
                continue
            with contextlib.suppress(ValueError):
                metrics.append((name.strip(), float(value.strip().strip('"'))))
            break
    return metrics


def _ms(microseconds: float) -> float:
    return round(microseconds / 1000, 3)


class _Samples:
    """An HdrHistogram plus the running total, because hdrh's own mean walks every bucket."""

    __slots__ = ("histogram", "total")

    def __init__(self) -> None:
        self.histogram = HdrHistogram(1, _MAX_US, 3)
        self.total = 0

    def add(self, seconds: float) -> None:
        microseconds = min(max(round(seconds * 1e6), 0), _MAX_US)
        self.histogram.record_value(microseconds)
        self.total += microseconds

    def summary(self) -> Summary | None:
        histogram = self.histogram
        count = histogram.get_total_count()
        if not count:
            return None
        at = histogram.get_percentile_to_value_dict([50, 90, 99])
        return Summary(
            count,
            _ms(histogram.get_min_value()),
            _ms(self.total / count),
            _ms(at[50]),
            _ms(at[90]),
            _ms(at[99]),
            _ms(histogram.get_max_value()),
        )


class _Recorder:
    """Samples of one route in one phase."""

    def __init__(self, stream: bool) -> None:
        self.latency = _Samples()
        self.headers = _Samples()
        self.ttfb = _Samples()
        self.gaps = _Samples() if stream else None
        self.server_timing: dict[str, _Samples] = {}
        self.status: Counter[int] = Counter()
        self.errors: Counter[int | str] = Counter()
        self.requests = self.succeeded = self.connections = 0

    def response(self, conn: _Connection, started: float) -> None:
        self.requests += 1
        status = conn.status
        self.status[status] += 1
        if not 200 <= status < 300:
            self.errors[status] += 1
            return
        self.succeeded += 1
        self.latency.add(conn.end_at - started)
        self.headers.add(conn.headers_at - started)
        if conn.first_body_at:
            self.ttfb.add(conn.first_body_at - started)
        if self.gaps is not None:
            for before, after in zip(conn.chunk_times, conn.chunk_times[1:], strict=False):
                self.gaps.add(after - before)
        for header in conn.server_timing:
            for name, duration_ms in parse_server_timing(header.decode("latin-1")):
                samples = self.server_timing.get(name)
                if samples is None:
                    samples = self.server_timing[name] = _Samples()
                samples.add(duration_ms / 1000)

    def failure(self, exc: BaseException) -> None:
        self.requests += 1
        self.errors[type(exc).__name__] += 1

    def stats(self, url: str, seconds: float) -> RouteStats:
        return RouteStats(
            url=url,
            requests=self.requests,
            succeeded=self.succeeded,
            failed=self.requests - self.succeeded,
            connections=self.connections,
            seconds=round(seconds, 6),
            requests_per_second=round(self.succeeded / seconds, 3) if seconds > 0 else 0.0,
            status={str(code): n for code, n in sorted(self.status.items())},
            errors={str(kind): n for kind, n in self.errors.most_common()},
            latency_ms=self.latency.summary(),
            headers_ms=self.headers.summary(),
            ttfb_ms=self.ttfb.summary(),
            inter_chunk_ms=None if self.gaps is None else self.gaps.summary(),
            server_timing_ms={
                name: summary
                for name, samples in sorted(self.server_timing.items())
                if (summary := samples.summary()) is not None
            },
        )


class _Plan:
    """Hands out request tickets until a count or a deadline is reached."""

    def __init__(self, requests: int | None, duration: float | None) -> None:
        self._left = requests
        self._started = time.perf_counter()
        self._deadline = self._started + (duration or 0.0)
        self.total = float(requests) if requests is not None else duration or 0.0
        self.done = 0

    def take(self) -> bool:
        if self._left is None:
            return time.perf_counter() < self._deadline
        self._left -= 1
        return self._left >= 0

    @property
    def progress(self) -> float:
        """Progress towards ``total``: tickets completed, or seconds elapsed."""
        return self.done if self._left is not None else time.perf_counter() - self._started


class _Engine:
    def __init__(self, config: BenchmarkConfig, progress: ProgressSink | None) -> None:
        self._config = config
        self._progress = progress
        self.proxy = _Target.build("proxy", config.base_url, config.token, config)
        self.direct = (
            _Target.build("direct", config.compare_url, config.compare_token, config)
            if config.compare_url is not None
            else None
        )
        # Connections outlive phases so that no phase pays for the previous one's set-up.
        self._pools: dict[str, list[_Connection | None]] = {
            name: [None] * config.concurrency for name in ("proxy", "direct")
        }

    async def run(self) -> BenchmarkReport:
        config = self._config
        both = [self.proxy] if self.direct is None else [self.proxy, self.direct]
        if config.warmup:
            await self._phase("warm-up", both, config.warmup, None)
        label = "measuring" if self.direct is None else "interleaved"
        recorders, seconds = await self._phase(label, both, config.requests, config.duration)
        proxy = recorders["proxy"].stats(self.proxy.url, seconds)
        if self.direct is None:
            return BenchmarkReport(config.describe(), proxy)
        direct = recorders["direct"].stats(self.direct.url, seconds)
        alone = {}
        for target in (self.direct, self.proxy):
            solo, solo_seconds = await self._phase(
                f"{target.name} alone", [target], config.requests, config.duration
            )
            alone[target.name] = solo[target.name].stats(target.url, solo_seconds)
        direct_rps = alone["direct"].requests_per_second
        ratio = round(alone["proxy"].requests_per_second / direct_rps, 4) if direct_rps else None
        return BenchmarkReport(
            config.describe(),
            proxy,
            direct,
            Added(
                Delta.between(proxy.latency_ms, direct.latency_ms),
                Delta.between(proxy.ttfb_ms, direct.ttfb_ms),
            ),
            Throughput(alone["proxy"], alone["direct"], ratio),
        )

    async def _phase(
        self,
        label: str,
        targets: Sequence[_Target],
        requests: int | None,
        duration: float | None,
    ) -> tuple[dict[str, _Recorder], float]:
        recorders = {target.name: _Recorder(self._config.stream) for target in targets}
        plan = _Plan(requests, duration)
        ticker = None
        if self._progress is not None:
            ticker = asyncio.create_task(_tick(self._progress, label, plan))
        started = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as workers:
                for index in range(self._config.concurrency):
                    workers.create_task(self._worker(index, targets, plan, recorders))
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.wait([ticker])
        return recorders, time.perf_counter() - started

    async def _worker(
        self,
        index: int,
        targets: Sequence[_Target],
        plan: _Plan,
        recorders: dict[str, _Recorder],
    ) -> None:
        turn = index
        while plan.take():
            for target in targets if turn % 2 == 0 else reversed(targets):
                await self._one(index, target, recorders[target.name])
            turn += 1
            plan.done += 1

    async def _one(self, index: int, target: _Target, recorder: _Recorder) -> None:
        pool = self._pools[target.name]
        conn = pool[index]
        try:
            if conn is None or not conn.open:
                conn = pool[index] = await self._connect(target)
                recorder.connections += 1
            started = await conn.exchange(target.payload)
        except (OSError, httptools.HttpParserError) as exc:
            recorder.failure(exc)
            if conn is not None:
                conn.close()
            pool[index] = None
            return
        recorder.response(conn, started)

    async def _connect(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._config.timeout):
            _, conn = await loop.create_connection(
                lambda: _Connection(loop, self._config.stream, self._config.timeout),
                target.host,
                target.port,
                ssl=True if target.tls else None,
            )
        return conn

    def close(self) -> None:
        for pool in self._pools.values():
            for conn in pool:
                if conn is not None:
                    conn.close()


async def _tick(progress: ProgressSink, label: str, plan: _Plan) -> None:
    progress.begin(label, plan.total)
    try:
        while True:
            await asyncio.sleep(_TICK)
            progress.update(plan.progress)
    finally:
        progress.end()


async def run_benchmark(
    config: BenchmarkConfig, progress: ProgressSink | None = None
) -> BenchmarkReport:
    """Run the benchmark described by ``config``; transport failures are counted, not raised."""
    engine = _Engine(config, progress)
    try:
        return await engine.run()
    finally:
        engine.close()
        # Let the transports run their close callbacks before the caller may close the loop.
        await asyncio.sleep(0)


class RichProgress:
    """A progress bar on a console, redrawn by the benchmark's own ticks: no refresh thread,
    whose rendering would compete with the measurement for the GIL."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            "{task.description}",
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
            auto_refresh=False,
            transient=True,
        )
        self._task: TaskID | None = None

    def begin(self, label: str, total: float) -> None:
        self._progress.start()
        self._task = self._progress.add_task(label, total=total)
        self._progress.refresh()

    def update(self, completed: float) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=completed)
            self._progress.refresh()

    def end(self) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        self._progress.stop()


def _cell(summary: Summary | None, key: str) -> str:
    return "—" if summary is None else f"{getattr(summary, key):.3f} ms"


def _delta_cell(delta: Delta | None, key: str) -> str:
    return "" if delta is None else f"{getattr(delta, key):+.3f} ms"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in counts.items()) or "none"


def render_report(report: BenchmarkReport) -> Table:
    """The report as a table: one column per route and, when comparing, the difference."""
    config = report.config
    size = f"{config['requests']} requests" if config["requests"] else f"{config['duration']} s"
    table = Table(
        title=f"{config['method']} {config['endpoint']}",
        caption=f"concurrency {config['concurrency']}, {size} per route"
        + (", streamed" if config["stream"] else ""),
    )
    routes = [report.proxy] if report.direct is None else [report.proxy, report.direct]
    table.add_column("")
    for title in ("proxy", "direct") if report.direct is not None else ("result",):
        table.add_column(title, justify="right")
    if report.added is not None:
        table.add_column("added", justify="right")

    def row(label: str, cells: list[str], added: str = "") -> None:
        table.add_row(label, *cells, *([added] if report.added is not None else []))

    row("requests", [str(route.requests) for route in routes])
    row("status", [_counts(route.status) for route in routes])
    row("errors", [_counts(route.errors) for route in routes])
    row("new connections", [str(route.connections) for route in routes])
    if report.throughput is None:
        row("2xx/s", [f"{route.requests_per_second:,.1f}" for route in routes])
    added = report.added or Added(None, None)
    figures: list[tuple[str, str, Delta | None, tuple[str, ...]]] = [
        ("latency", "latency_ms", added.latency_ms, ("p50", "p90", "p99")),
        ("headers", "headers_ms", None, ("p50", "p99")),
        ("first byte", "ttfb_ms", added.ttfb_ms, ("p50", "p90", "p99")),
    ]
    if config["stream"]:
        figures.append(("inter-chunk", "inter_chunk_ms", None, ("p50", "p99", "max")))
    for label, name, delta, keys in figures:
        for key in keys:
            summaries = [getattr(route, name) for route in routes]
            row(f"{label} {key}", [_cell(s, key) for s in summaries], _delta_cell(delta, key))
        if name == "latency_ms":
            row("latency max", [_cell(route.latency_ms, "max") for route in routes])
    names = sorted({name for route in routes for name in route.server_timing_ms})
    for name in names:
        for key in ("p50", "p99"):
            cells = [_cell(route.server_timing_ms.get(name), key) for route in routes]
            row(f"server-timing {name} {key}", cells)
    if report.throughput is not None:
        alone = [report.throughput.proxy, report.throughput.direct]
        ratio = report.throughput.ratio
        row(
            "2xx/s, each alone",
            [f"{route.requests_per_second:,.1f}" for route in alone],
            "—" if ratio is None else f"{ratio:.1%} of direct",
        )
        row("errors, each alone", [_counts(route.errors) for route in alone])
    return table


@click.command("benchmark")
@click.option("--base-url", required=True, help="Route under test, usually the proxy.")
@click.option("--endpoint", default="/v1/chat/completions", show_default=True)
@click.option("--token", default=None, help="Bearer token for --base-url (a withering token).")
@click.option(
    "--requests",
    "requests_",
    type=click.IntRange(min=1),
    help="Requests per route and phase [default: 200 unless --duration].",
)
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Seconds per phase.")
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(min=1))
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
@click.option("--compare-token", help="Bearer token for --compare-url (the real key).")
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
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds per request and per connection attempt.",
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
    as_json: bool,
) -> None:
    """Measure latency and throughput of a route and, with --compare-url, what the proxy adds.

    With --compare-url both routes are measured interleaved in one phase (same machine noise),
    then each alone, back to back, for the throughput ratio. Timings cover 2xx responses; every
    other outcome is counted under "errors". Exit status: 0, or 1 if every request failed.

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
    \b
    route stats:
      url, requests, succeeded, failed, connections (opened in the phase), seconds,
      requests_per_second (2xx per second), status {code: n},
      errors {code or exception name: n}, latency_ms, headers_ms (to the
      response head), ttfb_ms (to the first body byte), inter_chunk_ms
      (--stream only, else null), server_timing_ms {metric: ...} from
      Server-Timing "dur" values; each timing is null or
      {count, min, mean, p50, p90, p99, max} in ms.
    """
    if requests_ is None and duration is None:
        requests_ = 200
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
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    errors = Console(stderr=True)
    progress = RichProgress(errors) if errors.is_terminal and not as_json else None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        report = runner.run(run_benchmark(config, progress))
    if as_json:
        click.echo(orjson.dumps(report).decode())
    else:
        Console(highlight=False).print(render_report(report))
    if report.all_failed:
        raise click.exceptions.Exit(1)


if __name__ == "__main__":
    benchmark_command()
