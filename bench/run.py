"""What llm-proxy adds over going direct, against a local fake upstream.

Starts ``llm-proxy mock-upstream`` and ``llm-proxy server`` on loopback, creates a project and a
withering token through the management API, then runs the benchmark direct vs. through the proxy:
latency at concurrency 1, throughput at concurrency 64 and streamed time to first byte. Prints one
table; see bench/README.md for what the figures mean.

    .venv/bin/python bench/run.py [--requests N | --duration S] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console
from rich.table import Table

from llm_proxy.tools.benchmark.config import BenchmarkConfig
from llm_proxy.tools.benchmark.engine import run_benchmark
from llm_proxy.tools.benchmark.results import BenchmarkReport

UPSTREAM_KEY = "sk-bench-upstream-" + secrets.token_hex(8)
MANAGEMENT_TOKEN = "bench-" + secrets.token_urlsafe(24)
STREAM_CHUNKS = 20
STREAM_INTERVAL_MS = 5
THROUGHPUT_CONCURRENCY = 64
STREAM_CONCURRENCY = 8
ALLOWED = "[/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /v1/responses]"


class BenchError(Exception):
    """A step of the set-up failed; the message says which."""


@dataclass
class Run:
    """The three measurements of one run."""

    latency: BenchmarkReport
    throughput: BenchmarkReport
    streams: BenchmarkReport

    def figures(self) -> dict[str, float | None]:
        """The headline figures, in milliseconds or as a ratio; None where nothing succeeded."""
        latency, streams, alone = self.latency, self.streams, self.throughput.throughput
        return {
            "added_p50_ms": _get(latency.added and latency.added.latency_ms, "p50"),
            "added_p99_ms": _get(latency.added and latency.added.latency_ms, "p99"),
            "throughput_ratio": _get(alone, "ratio"),
            "proxy_rps": _get(alone and alone.proxy, "requests_per_second"),
            "direct_rps": _get(alone and alone.direct, "requests_per_second"),
            "added_ttfb_p50_ms": _get(streams.added and streams.added.ttfb_ms, "p50"),
            "direct_p50_ms": _get(latency.direct and latency.direct.latency_ms, "p50"),
            "direct_ttfb_p50_ms": _get(streams.direct and streams.direct.ttfb_ms, "p50"),
        }

    def errors(self) -> list[str]:
        """Every non-2xx answer and transport failure, by phase and route."""
        found = []
        for name, report in (
            ("c=1", self.latency),
            (f"c={THROUGHPUT_CONCURRENCY}", self.throughput),
            ("streams", self.streams),
        ):
            routes = [("proxy", report.proxy), ("direct", report.direct)]
            if report.throughput is not None:
                routes += [
                    ("proxy alone", report.throughput.proxy),
                    ("direct alone", report.throughput.direct),
                ]
            found += [
                f"{name} {route}: {stats.errors}"
                for route, stats in routes
                if stats and stats.errors
            ]
        return found


def _get(figures: object, name: str) -> float | None:
    value = getattr(figures, name, None) if figures else None
    return value if isinstance(value, float) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def llm_proxy_command(given: str | None) -> list[str]:
    """The llm-proxy console script of this interpreter's environment, else the one on PATH."""
    if given:
        return [given]
    beside = Path(sys.executable).with_name("llm-proxy")
    found = str(beside) if beside.exists() else shutil.which("llm-proxy")
    if found is None:
        raise BenchError("llm-proxy is not installed: run `make run` or `pip install -e .` first")
    return [found]


def mock_command(llm_proxy: list[str]) -> list[str]:
    """``llm-proxy mock-upstream`` once the CLI has it; until then the module itself."""
    probe = subprocess.run(
        [*llm_proxy, "mock-upstream", "--help"], capture_output=True, check=False, timeout=30
    )
    if probe.returncode == 0:
        return [*llm_proxy, "mock-upstream"]
    return [sys.executable, "-m", "llm_proxy.tools.mock_upstream"]


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{url} exited with {process.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status < 500:
                return
        time.sleep(0.1)
    raise BenchError(f"{url} did not answer within {seconds:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def started(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    """Run ``command`` with its output in ``log``; SIGTERM it (then SIGKILL) on the way out."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def manage(base: str, path: str, body: dict[str, object]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.load(response)
            return answer
    except urllib.error.HTTPError as exc:
        raise BenchError(f"POST {path} answered {exc.code}: {exc.read()[:500]!r}") from exc


def issue_token(proxy: str) -> str:
    project = manage(proxy, "/manage/projects", {"name": "bench", "api_key": UPSTREAM_KEY})
    token = manage(proxy, "/manage/tokens", {"project_id": project["id"], "duration_minutes": 240})
    value: str = token["token"]
    return value


def measure(args: argparse.Namespace, proxy: str, token: str, upstream: str) -> Run:
    def config(concurrency: int, requests: int, stream: bool = False) -> BenchmarkConfig:
        return BenchmarkConfig(
            base_url=proxy,
            token=token,
            compare_url=upstream,
            compare_token=UPSTREAM_KEY,
            concurrency=concurrency,
            requests=None if args.duration else requests,
            duration=args.duration,
            stream=stream,
            warmup=max(concurrency * 4, 50),
        )

    async def all_three() -> Run:
        return Run(
            await run_benchmark(config(1, args.requests)),
            await run_benchmark(config(THROUGHPUT_CONCURRENCY, args.requests * 5)),
            await run_benchmark(config(STREAM_CONCURRENCY, max(args.requests // 20, 16), True)),
        )

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(all_three())


def median(runs: list[Run]) -> dict[str, float | None]:
    figures = [run.figures() for run in runs]
    result: dict[str, float | None] = {}
    for key in figures[0]:
        values = [value for f in figures if (value := f[key]) is not None]
        result[key] = round(statistics.median(values), 4) if values else None
    return result


def table(rows: list[tuple[str, dict[str, float | None]]], medians: dict[str, Any]) -> Table:
    def ms(value: float | None, sign: str = "+") -> str:
        return "—" if value is None else f"{value:{sign}.3f} ms"

    def rps(value: float | None) -> str:
        return "—" if value is None else f"{value:,.0f} req/s"

    out = Table(
        title="llm-proxy vs. direct, against llm-proxy mock-upstream",
        caption=(
            f"direct (medians): p50 {ms(medians['direct_p50_ms'], '')} at c=1, "
            f"{rps(medians['direct_rps'])} at c={THROUGHPUT_CONCURRENCY}, "
            f"stream TTFB p50 {ms(medians['direct_ttfb_p50_ms'], '')}"
        ),
    )
    for column in (
        "route",
        "added p50 at c=1",
        f"throughput at c={THROUGHPUT_CONCURRENCY} vs direct",
        "added TTFB streams",
    ):
        out.add_column(column, justify="left" if column == "route" else "right")
    for label, f in rows:
        ratio = f["throughput_ratio"]
        out.add_row(
            label,
            ms(f["added_p50_ms"]),
            "—" if ratio is None else f"{ratio:.1%} ({rps(f['proxy_rps'])})",
            ms(f["added_ttfb_p50_ms"]),
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--requests", type=int, default=2000, help="per route at c=1 [2000]")
    size.add_argument("--duration", type=float, help="seconds per phase instead of a count")
    parser.add_argument("--runs", type=int, default=1, help="repeat and report medians [1]")
    parser.add_argument("--llm-proxy", help="path of the llm-proxy executable")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    args = parser.parse_args()
    if args.requests < 1 or args.runs < 1 or (args.duration is not None and args.duration <= 0):
        parser.error("--requests, --duration and --runs must be positive")
    console = Console(stderr=True)
    try:
        runs = bench(args, console)
    except BenchError as exc:
        console.print(f"[red]bench: {exc}[/red]")
        return 1
    medians = median(runs)
    if args.json:
        print(json.dumps({"runs": [asdict(run) for run in runs], "median": medians}))
        return 0
    rows = [(f"proxy, run {i}", run.figures()) for i, run in enumerate(runs, 1)]
    if len(runs) > 1:
        rows.append((f"proxy, median of {len(runs)}", medians))
    Console().print(table(rows, medians))
    for i, run in enumerate(runs, 1):
        for problem in run.errors():
            console.print(f"[yellow]run {i}: errors in {problem}[/yellow]")
    return 0


def bench(args: argparse.Namespace, console: Console) -> list[Run]:
    llm_proxy = llm_proxy_command(args.llm_proxy)
    with tempfile.TemporaryDirectory(prefix="llm-proxy-bench-") as tmp:
        work = Path(tmp)
        mock_port, proxy_port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{mock_port}"
        proxy = f"http://127.0.0.1:{proxy_port}"
        mock = [
            *mock_command(llm_proxy),
            *("--port", str(mock_port), "--api-key", UPSTREAM_KEY),
            *("--chunks", str(STREAM_CHUNKS), "--chunk-interval-ms", str(STREAM_INTERVAL_MS)),
        ]
        config = work / "api_providers.yaml"
        config.write_text(
            "default_api: openai\n"
            "apis:\n"
            "  openai:\n"
            f"    base_url: {upstream}\n"
            f"    allowed_endpoints: {ALLOWED}\n"
            "    allowed_methods: [GET, POST, DELETE, OPTIONS]\n"
        )
        env = {
            "LISTEN_ADDR": f"127.0.0.1:{proxy_port}",
            "DATA_DIR": str(work / "data"),
            "API_CONFIG_PATH": str(config),
            "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        }
        with (
            started(mock, work / "mock.log") as mock_process,
            started([*llm_proxy, "server"], work / "proxy.log", env) as proxy_process,
        ):
            wait_until_up(f"{upstream}/mock/status/200", mock_process, work / "mock.log", 30)
            wait_until_up(f"{proxy}/health", proxy_process, work / "proxy.log", 60)
            token = issue_token(proxy)
            runs = []
            for i in range(args.runs):
                console.print(f"run {i + 1} of {args.runs} …")
                runs.append(measure(args, proxy, token, upstream))
            return runs


if __name__ == "__main__":
    sys.exit(main())
