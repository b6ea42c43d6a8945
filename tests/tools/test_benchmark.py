"""The benchmark counts every request, and reports ordered percentiles, against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from click.testing import CliRunner
from rich.console import Console

from llm_proxy.tools.benchmark.command import benchmark_command
from llm_proxy.tools.benchmark.config import BenchmarkConfig
from llm_proxy.tools.benchmark.engine import run_benchmark
from llm_proxy.tools.benchmark.progress import RichProgress
from llm_proxy.tools.benchmark.report import render_report
from llm_proxy.tools.benchmark.results import BenchmarkReport, RouteStats, Summary
from llm_proxy.tools.benchmark.sampling import parse_server_timing
from llm_proxy.tools.mock_upstream import MockSettings, build_app
from tests.processes import clean_env, cli_command

MakeServer = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def mock(aiohttp_server: MakeServer) -> str:
    server = await aiohttp_server(build_app(MockSettings(chunks=4, chunk_interval=0.002)))
    return str(server.make_url("")).rstrip("/")


MOCK_KEY = "sk-benchmark-mock-key-0123456789"


@pytest.fixture
def threaded_mock() -> Iterator[str]:
    """The mock on its own loop and thread, for the CLI, which runs a loop of its own."""
    with _mock_thread(MockSettings(chunks=3)) as url:
        yield url


@pytest.fixture
def keyed_mock() -> Iterator[str]:
    """The threaded mock, answering 401 to any bearer but MOCK_KEY."""
    with _mock_thread(MockSettings(chunks=3, api_key=MOCK_KEY)) as url:
        yield url


@contextmanager
def _mock_thread(settings: MockSettings) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_app(settings), access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(runner.cleanup())
        loop.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _assert_ordered(summary: Summary | None) -> None:
    assert summary is not None
    assert 0 <= summary.min <= summary.p50 <= summary.p90 <= summary.p99 <= summary.max
    assert summary.min <= summary.mean <= summary.max


def _assert_all_ok(route: RouteStats, requests: int) -> None:
    assert (route.requests, route.succeeded, route.failed) == (requests, requests, 0)
    assert route.status == {"200": requests}
    assert route.errors == {}
    _assert_ordered(route.latency_ms)
    _assert_ordered(route.headers_ms)
    _assert_ordered(route.ttfb_ms)


async def test_counts_every_request_and_orders_percentiles(mock: str) -> None:
    report = await run_benchmark(BenchmarkConfig(mock, requests=20, concurrency=3))
    _assert_all_ok(report.proxy, 20)
    assert report.proxy.latency_ms is not None
    assert report.proxy.latency_ms.count == 20
    assert report.proxy.connections == 3
    assert report.proxy.inter_chunk_ms is None
    assert report.proxy.requests_per_second > 0
    assert (report.direct, report.added, report.throughput) == (None, None, None)
    assert not report.all_failed


async def test_errors_are_counted_by_status_and_never_timed(mock: str) -> None:
    config = BenchmarkConfig(mock, endpoint="/mock/status/500", requests=6, concurrency=2)
    report = await run_benchmark(config)
    assert (report.proxy.requests, report.proxy.succeeded, report.proxy.failed) == (6, 0, 6)
    assert report.proxy.status == {"500": 6}
    assert report.proxy.errors == {"500": 6}
    assert report.proxy.latency_ms is None
    assert report.all_failed


async def test_transport_errors_are_counted_by_exception_kind() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    report = await run_benchmark(BenchmarkConfig(url, requests=4, concurrency=2))
    assert report.proxy.requests == 4
    assert report.proxy.status == {}
    assert report.proxy.errors == {"ConnectionRefusedError": 4}
    assert report.all_failed


async def test_streams_report_first_byte_and_inter_chunk_gaps(mock: str) -> None:
    report = await run_benchmark(BenchmarkConfig(mock, requests=6, concurrency=2, stream=True))
    _assert_all_ok(report.proxy, 6)
    _assert_ordered(report.proxy.inter_chunk_ms)
    assert report.proxy.inter_chunk_ms is not None
    assert report.proxy.inter_chunk_ms.count >= 6 * 4


async def test_compare_mode_reports_added_latency_and_throughput_ratio(mock: str) -> None:
    config = BenchmarkConfig(
        mock,
        token="sk-withering",
        requests=10,
        concurrency=2,
        stream=True,
        compare_url=mock,
        compare_token="sk-real",
        warmup=2,
    )
    report = await run_benchmark(config)
    assert report.direct is not None
    assert report.added is not None
    assert report.throughput is not None
    for route in (report.proxy, report.direct, report.throughput.proxy, report.throughput.direct):
        _assert_all_ok(route, 10)
    assert report.added.latency_ms is not None
    assert report.added.ttfb_ms is not None
    assert report.throughput.ratio is not None
    assert report.throughput.ratio > 0
    # Warm-up opened every connection; the measured phases reused them.
    assert report.proxy.connections == report.throughput.proxy.connections == 0
    assert report.config["compare_url"] == mock
    assert "sk-" not in json.dumps(report.config)


async def test_compare_mode_with_nothing_succeeding_has_no_added_figures(mock: str) -> None:
    config = BenchmarkConfig(
        mock, endpoint="/mock/status/502", requests=2, compare_url=mock, concurrency=2
    )
    report = await run_benchmark(config)
    assert report.added is not None
    assert report.throughput is not None
    assert (report.added.latency_ms, report.added.ttfb_ms, report.throughput.ratio) == (None,) * 3
    assert report.throughput.direct.errors == {"502": 2}
    assert report.all_failed


async def test_duration_mode_runs_until_the_deadline(mock: str) -> None:
    report = await run_benchmark(BenchmarkConfig(mock, duration=0.2, concurrency=2))
    assert report.proxy.requests > 0
    assert report.proxy.succeeded == report.proxy.requests
    assert report.proxy.seconds >= 0.2


async def test_server_timing_durations_are_aggregated_per_metric(
    aiohttp_server: MakeServer,
) -> None:
    async def timed(request: web.Request) -> web.Response:
        timing = 'proxy;dur=0.041, upstream;desc="model";dur=1.2, cache, bad;dur=x'
        return web.Response(text="{}", headers={"Server-Timing": timing})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", timed)
    server = await aiohttp_server(app)
    report = await run_benchmark(BenchmarkConfig(str(server.make_url("")), requests=5))
    timings = report.proxy.server_timing_ms
    assert set(timings) == {"proxy", "upstream"}
    assert (timings["proxy"].count, timings["proxy"].p50, timings["proxy"].p99) == (5, 0.041, 0.041)
    assert timings["upstream"].p50 == 1.2


async def test_server_timing_names_that_change_per_response_do_not_grow_the_report(
    aiohttp_server: MakeServer,
) -> None:
    # Every new metric name got a histogram of its own (some 170 KiB) and two table rows: a
    # server naming a metric after each request grew the benchmark without bound.
    served = itertools.count()

    async def timed(request: web.Request) -> web.Response:
        timing = f"proxy;dur=0.5, request-{next(served)};dur=1"
        return web.Response(text="{}", headers={"Server-Timing": timing})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", timed)
    server = await aiohttp_server(app)
    report = await run_benchmark(BenchmarkConfig(str(server.make_url("")), requests=200))
    timings = report.proxy.server_timing_ms
    assert timings["proxy"].count == 200
    assert len(timings) <= 32


async def test_server_timing_descriptions_may_hold_commas_and_semicolons(
    aiohttp_server: MakeServer,
) -> None:
    # The header was split at every comma and semicolon, quoted or not: "db" was lost and its
    # duration reported under a metric named "b".
    async def timed(request: web.Request) -> web.Response:
        timing = 'db;desc="SELECT a, b; -- x";dur=3, app;dur=1'
        return web.Response(text="{}", headers={"Server-Timing": timing})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", timed)
    server = await aiohttp_server(app)
    report = await run_benchmark(BenchmarkConfig(str(server.make_url("")), requests=3))
    timings = report.proxy.server_timing_ms
    assert set(timings) == {"db", "app"}
    assert (timings["db"].count, timings["db"].mean, timings["app"].mean) == (3, 3.0, 1.0)


def test_server_timing_parser_keeps_only_durations() -> None:
    header = 'a;dur=1.5, b;desc="x";dur="2", c;desc=y, d;dur=oops, e;DUR=3'
    assert parse_server_timing(header) == [("a", 1.5), ("b", 2.0), ("e", 3.0)]
    assert parse_server_timing("") == []


async def test_requests_carry_the_token_method_and_body(aiohttp_server: MakeServer) -> None:
    seen: list[tuple[str, str, str | None, bytes]] = []

    async def record(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        seen.append((request.method, request.path_qs, auth, await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(app)
    base = str(server.make_url("/prefix/"))
    await run_benchmark(BenchmarkConfig(base, token="sk-t", requests=1, stream=True))
    await run_benchmark(BenchmarkConfig(base, endpoint="/v1/models?x=1", method="GET", requests=1))
    await run_benchmark(BenchmarkConfig(base, body=b'{"raw": true}', requests=1))
    assert seen[0][:3] == ("POST", "/prefix/v1/chat/completions", "Bearer sk-t")
    assert json.loads(seen[0][3]) == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
    }
    assert seen[1] == ("GET", "/prefix/v1/models?x=1", None, b"")
    assert seen[2][3] == b'{"raw": true}'


async def test_slow_answers_time_out_and_are_counted(aiohttp_server: MakeServer) -> None:
    server = await aiohttp_server(build_app(MockSettings(latency=1.0)))
    # The 50 ms bound is on the answer only; connecting has its own, generous one.
    config = BenchmarkConfig(str(server.make_url("")), requests=2, timeout=0.05)
    report = await run_benchmark(config)
    assert report.proxy.errors == {"TimeoutError": 2}
    assert report.proxy.connections == 2


async def _raw_server(answer: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(1024)
        writer.write(answer)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "IncompleteResponse"),
        (b"NOT HTTP AT ALL\r\n\r\n", "HttpParserError"),
    ],
)
async def test_broken_responses_are_counted_by_exception_kind(answer: bytes, kind: str) -> None:
    server = await _raw_server(answer)
    async with server:
        port = server.sockets[0].getsockname()[1]
        report = await run_benchmark(BenchmarkConfig(f"http://127.0.0.1:{port}", requests=2))
    assert report.proxy.errors == {kind: 2}


@pytest.mark.parametrize(
    "head", [b"HTTP/1.0 200 OK\r\n", b"HTTP/1.1 200 OK\r\nConnection: close\r\n"]
)
async def test_answers_that_end_where_the_server_closes_are_complete(head: bytes) -> None:
    # Without Content-Length or chunked framing a response ends with the connection (HTTP/1.0's
    # way): every such answer was counted as an IncompleteResponse and the run exited 1.
    server = await _raw_server(head + b"Content-Type: application/json\r\n\r\n{}")
    async with server:
        port = server.sockets[0].getsockname()[1]
        report = await run_benchmark(BenchmarkConfig(f"http://127.0.0.1:{port}", requests=3))
    _assert_all_ok(report.proxy, 3)
    assert report.proxy.connections == 3
    assert not report.all_failed


@contextlib.asynccontextmanager
async def _keep_alive_server(*parts: bytes) -> AsyncIterator[int]:
    """A port that answers each request on a connection with ``parts``, written one at a time, a
    pause apart so that the client reads each on its own."""
    handlers: list[asyncio.Task[object]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                for part in parts:
                    await asyncio.sleep(0.02)
                    writer.write(part)
                    await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]
    # The benchmark closed its connections: each handler ends at that EOF.
    await asyncio.gather(*handlers)


@pytest.mark.parametrize("interim", [b"100 Continue", b"103 Early Hints\r\nLink: </style.css>"])
async def test_interim_answers_are_skipped_for_the_final_one(interim: bytes) -> None:
    # Clients must read 1xx answers before the final one (RFC 9110 15.2): the 1xx ended the
    # request, counted as an error, and its final answer was taken for the next request's.
    final = b"HTTP/1.1 200 OK\r\nServer-Timing: app;dur=7\r\nContent-Length: 2\r\n\r\n{}"
    async with _keep_alive_server(b"HTTP/1.1 " + interim + b"\r\n\r\n", final) as port:
        config = BenchmarkConfig(f"http://127.0.0.1:{port}", method="GET", requests=4)
        report = await run_benchmark(config)
    _assert_all_ok(report.proxy, 4)
    assert report.proxy.connections == 1
    assert report.proxy.server_timing_ms["app"].count == 4


async def test_a_switch_of_protocols_is_counted_as_its_status() -> None:
    # httptools reports a 101 by raising HttpParserUpgrade, which was not caught: the run
    # ended in a traceback instead of a report.
    upgrade = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    async with _keep_alive_server(upgrade) as port:
        report = await run_benchmark(BenchmarkConfig(f"http://127.0.0.1:{port}", requests=2))
    assert report.proxy.requests == 2
    assert report.proxy.status == report.proxy.errors == {"101": 2}
    assert report.proxy.connections == 2  # the old one speaks another protocol now


async def test_connection_close_answers_are_followed_by_a_new_connection(
    aiohttp_server: MakeServer,
) -> None:
    async def closing(request: web.Request) -> web.Response:
        response = web.Response(text="{}")
        response.force_close()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", closing)
    server = await aiohttp_server(app)
    report = await run_benchmark(BenchmarkConfig(str(server.make_url("")), requests=3))
    assert report.proxy.succeeded == 3
    assert report.proxy.connections == 3


async def test_progress_is_shown_on_a_terminal(aiohttp_server: MakeServer) -> None:
    server = await aiohttp_server(build_app(MockSettings(latency=0.1)))
    output = io.StringIO()
    progress = RichProgress(Console(file=output, force_terminal=True, width=100))
    config = BenchmarkConfig(str(server.make_url("")), requests=4, warmup=1)
    report = await run_benchmark(config, progress)
    assert report.proxy.succeeded == 4
    assert "measuring" in output.getvalue()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"requests": 1, "duration": 1.0},
        {"requests": 0},
        {"duration": 0.0},
        {"requests": 1, "concurrency": 0},
        {"requests": 1, "compare_token": "sk-x"},
        {"requests": 1, "token": "sk-x\r\nX-Injected: 1"},
        {"requests": 1, "endpoint": "/v1/a b"},
        {"requests": 1, "method": "HEAD"},
        {"requests": 1, "compare_url": "ftp://nowhere"},
    ],
)
def test_nonsense_configs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BenchmarkConfig("http://127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


def test_a_config_repr_hides_tokens() -> None:
    config = BenchmarkConfig(
        "http://h", token="sk-a", requests=1, compare_url="http://d", compare_token="sk-b"
    )
    assert "sk-" not in repr(config)
    assert config.describe()["base_url"] == "http://h"


def _invoke(*args: str, stdin: str | None = None, **env: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        benchmark_command, list(args), env={"COLUMNS": "160", **env}, input=stdin
    )
    return result.exit_code, result.output


def test_cli_json_has_every_documented_key(threaded_mock: str) -> None:
    code, output = _invoke(
        "--base-url", threaded_mock, "--requests", "5", "--concurrency", "2", "--json"
    )
    assert code == 0
    report = json.loads(output)
    assert set(report) == {"config", "proxy", "direct", "added", "throughput", "interrupted"}
    assert report["interrupted"] is False
    assert set(report["proxy"]) == {
        "url",
        "requests",
        "succeeded",
        "failed",
        "connections",
        "seconds",
        "requests_per_second",
        "status",
        "errors",
        "latency_ms",
        "headers_ms",
        "ttfb_ms",
        "inter_chunk_ms",
        "server_timing_ms",
    }
    assert set(report["proxy"]["latency_ms"]) == {
        "count",
        "min",
        "mean",
        "p50",
        "p90",
        "p99",
        "max",
    }
    assert report["proxy"]["status"] == {"200": 5}


def test_cli_compare_json_and_table(threaded_mock: str, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(b'{"model": "gpt-4o", "messages": [], "stream": true}')
    common = ["--base-url", threaded_mock, "--compare-url", threaded_mock, "--requests", "4"]
    code, output = _invoke(*common, "--stream", "--body", str(body), "--json")
    assert code == 0
    report = json.loads(output)
    assert set(report["added"]) == {"latency_ms", "ttfb_ms"}
    assert set(report["added"]["latency_ms"]) == {"p50", "p90", "p99"}
    assert set(report["throughput"]) == {"proxy", "direct", "ratio"}
    assert report["proxy"]["inter_chunk_ms"] is not None
    code, table = _invoke(*common, "--stream", "--warmup", "1")
    assert code == 0
    for text in ("proxy", "direct", "added", "latency p50", "inter-chunk p99", "of direct"):
        assert text in table


def test_cli_table_shows_errors_and_exits_1_when_everything_failed(threaded_mock: str) -> None:
    code, output = _invoke(
        "--base-url", threaded_mock, "--endpoint", "/mock/status/503", "--requests", "3"
    )
    assert code == 1
    assert "503: 3" in output
    assert "2xx/s" in output


def test_cli_defaults_to_200_requests_and_accepts_lowercase_methods(threaded_mock: str) -> None:
    code, output = _invoke(
        "--base-url", threaded_mock, "--endpoint", "/v1/models", "--method", "get"
    )
    assert code == 0
    assert "200: 200" in output


@pytest.mark.parametrize(
    "args",
    [
        ["--requests", "1", "--duration", "1"],
        ["--requests", "1", "--compare-token", "sk-x"],
        ["--requests", "0"],
        ["--method", "HEAD"],
        # Far more connections than a process may open: it ended in a MemoryError traceback.
        ["--requests", "1", "--concurrency", "100000000000"],
    ],
)
def test_cli_bad_arguments_exit_2(args: list[str]) -> None:
    code, _ = _invoke("--base-url", "http://127.0.0.1:1", *args)
    assert code == 2


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("option", ["--timeout", "--connect-timeout", "--duration"])
def test_cli_seconds_that_are_not_a_finite_number_exit_2(
    threaded_mock: str, option: str, value: str
) -> None:
    # click's FloatRange lets nan through: --timeout nan ended in a traceback, --duration nan
    # measured nothing and reported "nan s per route".
    code, output = _invoke("--base-url", threaded_mock, option, value, "--json")
    assert code == 2, output
    assert f"Invalid value for '{option}'" in output and "not a finite number" in output


def _statuses(output: str) -> tuple[object, object]:
    report = json.loads(output)
    return report["proxy"]["status"], report["direct"]["status"]


def test_cli_takes_the_tokens_from_the_environment(keyed_mock: str) -> None:
    """Off the command line, where every user of the machine can read them (ps)."""
    routes = ["--base-url", keyed_mock, "--compare-url", keyed_mock, "--requests", "2", "--json"]
    code, output = _invoke(*routes, BENCHMARK_TOKEN=MOCK_KEY, BENCHMARK_COMPARE_TOKEN=MOCK_KEY)
    assert code == 0, output
    assert _statuses(output) == ({"200": 2}, {"200": 2})
    code, output = _invoke(*routes)
    assert _statuses(output) == ({"401": 2}, {"401": 2})  # the mock wants the key


def test_cli_reads_dash_tokens_from_stdin_one_line_each(keyed_mock: str) -> None:
    code, output = _invoke(
        *("--base-url", keyed_mock, "--token", "-", "--requests", "2", "--json"),
        *("--compare-url", keyed_mock, "--compare-token", "-"),
        stdin=f"{MOCK_KEY}\n wrong-key \n",
    )
    assert code == 0, output
    assert _statuses(output) == ({"200": 2}, {"401": 2})
    code, output = _invoke("--base-url", keyed_mock, "--token", "-", "--requests", "1", stdin="")
    assert code == 2 and "--token" in output and "stdin" in output


def test_cli_ignores_an_exported_compare_token_when_not_comparing(keyed_mock: str) -> None:
    code, output = _invoke(
        "--base-url", keyed_mock, "--requests", "1", "--json",
        BENCHMARK_TOKEN=MOCK_KEY, BENCHMARK_COMPARE_TOKEN="sk-real",
    )  # fmt: skip
    assert code == 0, output
    assert json.loads(output)["proxy"]["status"] == {"200": 1}


def test_cli_bad_url_exits_2() -> None:
    code, output = _invoke("--base-url", "not-a-url", "--requests", "1")
    assert code == 2
    assert "not an http(s) URL" in output


@pytest.mark.parametrize("host", ["a..b", "a" * 64 + ".example"])
def test_cli_host_name_the_resolver_cannot_take_exits_2(host: str) -> None:
    # The resolver's IDNA encoding refused it mid-run: a traceback per worker, exit 1.
    code, output = _invoke("--base-url", f"http://{host}:1", "--requests", "1", "--json")
    assert code == 2, output
    assert "not a valid host name" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("option", ["--base-url", "--compare-url"])
def test_cli_refuses_a_password_in_a_url_without_printing_it(
    threaded_mock: str, option: str
) -> None:
    # It was never sent (the token is the credential), and the report printed the URL whole.
    with_password = threaded_mock.replace("http://", "http://user:s3cret-pw@")
    urls = {"--base-url": threaded_mock, "--compare-url": threaded_mock, option: with_password}
    code, output = _invoke(*(arg for pair in urls.items() for arg in pair), "--json")
    assert code == 2, output
    assert "s3cret-pw" not in output
    assert "user name or password" in output


def test_render_report_shows_dashes_for_missing_figures_and_server_timing() -> None:
    timing = Summary(1, 0.041, 0.041, 0.041, 0.041, 0.041, 0.041)
    route = RouteStats(
        "http://h/v1/x",
        *(1, 0, 1, 0, 1.0, 0.0),
        *({}, {"TimeoutError": 1}),
        *(None, None, None, None),
        {"proxy": timing},
    )
    config = BenchmarkConfig("http://h", duration=1.0).describe()
    console = Console(file=io.StringIO(), width=120)
    console.print(render_report(BenchmarkReport(config, route)))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "TimeoutError: 1" in text
    assert "—" in text
    assert "1.0 s per route" in text
    assert "server-timing proxy p99" in text
    assert "0.041 ms" in text


@pytest.mark.process
async def test_ctrl_c_reports_the_figures_so_far_and_exits_130(aiohttp_server: MakeServer) -> None:
    # Ctrl-C threw every figure away ("Aborted!") and exited 1, the status of a run where every
    # request failed.
    answered = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal answered
        await asyncio.sleep(0.02)
        answered += 1
        return web.Response(text="{}")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", slow)
    server = await aiohttp_server(app)
    process = await asyncio.create_subprocess_exec(
        *cli_command("benchmark", "--base-url", str(server.make_url("")), "--duration", "60"),
        *("-c", "2", "--compare-url", str(server.make_url("")), "--json"),
        env=clean_env(BENCHMARK_TOKEN="sk-never-printed", BENCHMARK_COMPARE_TOKEN="sk-real-key"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        while answered < 10 and process.returncode is None:
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 130, stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True
    assert report["throughput"] is None
    for route in (report["proxy"], report["direct"]):
        # The requests cut short by Ctrl-C are not counted as failures.
        assert route["succeeded"] == route["requests"] >= 4
        assert route["latency_ms"]["p50"] >= 20
    assert report["added"]["latency_ms"] is not None
    assert b"sk-" not in stdout + stderr
