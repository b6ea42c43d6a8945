"""Proxy memory per open stream: N concurrent SSE chat streams held open through llm-proxy.

For the target "at most 100 KB of proxy memory per open stream at 1,000 concurrent streams".
Starts a fake OpenAI upstream inside this script (aiohttp, on a free loopback port; it answers
``POST /v1/chat/completions`` with ``"stream": true`` by one content chunk at once, then one every
``--interval`` seconds for ``--hold`` seconds, a finish chunk, a usage chunk and ``data: [DONE]``)
and ``llm-proxy server`` in front of it (temp ``DATA_DIR``, SQLite), creates a project holding the
upstream key and a token through the management API, warms the proxy up with 20 short streams and
takes the idle memory of the server process(es) and of their events process(es). It then opens
``--streams`` concurrent streamed chat requests through the proxy, one connection each, waits until
every stream has its first chunk, samples memory over the hold (keeping the maximum while all
streams are open), lets the streams finish and checks that each got every content chunk, the usage
chunk and ``[DONE]``.

Memory is VmRSS from /proc (``--pss``: Pss from smaps_rollup, which splits the pages that forked
``--workers`` share). The per-stream figures are (peak - idle) / streams open, in KiB, for the
server alone and for server + events process. Server log lines (LOG_LEVEL=warning), the server's
open file descriptors and its RLIMIT_NOFILE are reported too.

    .venv/bin/python bench/open_streams.py --streams 1000
    .venv/bin/python bench/open_streams.py --streams 50 --hold 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web
from run import (
    MANAGEMENT_TOKEN,
    UPSTREAM_KEY,
    BenchError,
    free_port,
    issue_token,
    llm_proxy_command,
    started,
    tail,
    wait_until_up,
)

MODEL = "gpt-4o-mini"
WARMUP_STREAMS = 20
# The fake upstream holds streams whose "user" is this for a moment only.
WARMUP_USER = "open-streams-warmup"
WARMUP_HOLD, WARMUP_INTERVAL = 0.5, 0.1
SAMPLE_EVERY = 0.5
TARGET_KIB = 100 * 1000 / 1024  # "100 KB"


def content_chunks(hold: float, interval: float) -> int:
    """How many content chunks the fake upstream sends: one at once, then one per interval."""
    return 1 + int(hold / interval + 1e-9)


# The fake upstream.


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def upstream_app(hold: float, interval: float) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            error = {"message": "bad upstream key", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=401)
        body = orjson.loads(await request.read())
        if body.get("stream") is not True:
            return web.json_response({"error": {"message": "streams only"}}, status=400)
        warmup = body.get("user") == WARMUP_USER
        chunks = content_chunks(WARMUP_HOLD, WARMUP_INTERVAL) if warmup else count
        every = WARMUP_INTERVAL if warmup else interval
        base = {
            "id": f"chatcmpl-bench-{id(request):x}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", MODEL),
        }

        def choice(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "finish_reason": finish}

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in range(chunks):
            await asyncio.sleep(max(0.0, start + n * every - loop.time()))
            delta = {"role": "assistant", "content": "tok "} if n == 0 else {"content": "tok "}
            await response.write(sse({**base, "choices": [choice(delta)]}))
        usage = {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks}
        await response.write(
            sse({**base, "choices": [choice({}, "stop")]})
            + sse({**base, "choices": [], "usage": usage})
            + b"data: [DONE]\n\n"
        )
        await response.write_eof()
        return response

    count = content_chunks(hold, interval)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    return app


# Memory of the server's process tree.


def children_by_parent() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(entry.path, "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    tree, found = children_by_parent(), [root]
    for pid in found:
        found.extend(tree.get(pid, []))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def memory_kib(pid: int, pss: bool) -> int:
    """VmRSS (or Pss) of ``pid`` in KiB; 0 once it is gone."""
    path, key = (f"/proc/{pid}/smaps_rollup", "Pss:") if pss else (f"/proc/{pid}/status", "VmRSS:")
    try:
        with open(path) as lines:
            return next((int(line.split()[1]) for line in lines if line.startswith(key)), 0)
    except OSError:
        return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def nofile_limit(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}/{hard}"
    return "?"


@dataclass
class Footprint:
    server_kib: int = 0
    events_kib: int = 0
    server_fds: int = 0

    def peak(self, other: Footprint) -> Footprint:
        return Footprint(
            max(self.server_kib, other.server_kib),
            max(self.events_kib, other.events_kib),
            max(self.server_fds, other.server_fds),
        )


@dataclass
class Processes:
    """The server process(es) (supervisor and workers under ``--workers``) and events processes."""

    server: list[int]
    events: list[int]
    pss: bool

    @classmethod
    def of(cls, root: int, pss: bool) -> Processes:
        tree = process_tree(root)
        events = [pid for pid in tree if "events_process" in cmdline(pid)]
        return cls([pid for pid in tree if pid not in events], events, pss)

    def sample(self) -> Footprint:
        return Footprint(
            sum(memory_kib(pid, self.pss) for pid in self.server),
            sum(memory_kib(pid, self.pss) for pid in self.events),
            sum(open_fds(pid) for pid in self.server),
        )


# The streams.


@dataclass
class Stream:
    chunks: int = 0
    usage: bool = False
    done: bool = False
    error: str | None = None
    first_chunk_s: float | None = None

    def failure(self, expected_chunks: int) -> str | None:
        if self.error:
            return self.error
        if self.chunks != expected_chunks:
            return f"{self.chunks} of {expected_chunks} content chunks"
        if not self.usage:
            return "no usage chunk"
        return None if self.done else "no [DONE]"


@dataclass
class Progress:
    """Wakes the bench when every stream has its first chunk (or failed before) and at the first end."""

    streams: int
    settled: int = 0
    all_open: asyncio.Event = field(default_factory=asyncio.Event)
    first_done: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self) -> None:
        self.settled += 1
        if self.settled >= self.streams:
            self.all_open.set()


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: Stream, progress: Progress
) -> None:
    started_at = time.monotonic()
    try:
        async with session.post(url, data=body) as response:
            if response.status != 200:
                stream.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    stream.done = True
                    progress.first_done.set()
                    continue
                event = orjson.loads(data)
                if event.get("choices") == [] and event.get("usage"):
                    stream.usage = True
                elif any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    stream.chunks += 1
                    if stream.first_chunk_s is None:
                        stream.first_chunk_s = time.monotonic() - started_at
                        progress.settle()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if stream.first_chunk_s is None:
            progress.settle()


def session(token: str, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=30),
    )


def chat_body(user: str | None = None) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something, slowly."}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if user:
        body["user"] = user
    return orjson.dumps(body)


async def run_streams(
    proxy: str,
    token: str,
    count: int,
    body: bytes,
    total_s: float,
    on_all_open: Callable[[], None] | None = None,
    on_first_done: Callable[[], None] | None = None,
) -> tuple[list[Stream], float]:
    """``count`` concurrent streams, each given ``total_s``; also how long until all had their
    first chunk (or failed)."""
    streams = [Stream() for _ in range(count)]
    progress = Progress(count)
    url = f"{proxy}/v1/chat/completions"
    async with session(token, total_s) as client:
        started_at = time.monotonic()
        tasks = [
            asyncio.create_task(one_stream(client, url, body, stream, progress))
            for stream in streams
        ]
        try:
            await progress.all_open.wait()
            all_open_s = time.monotonic() - started_at
            if on_all_open:
                on_all_open()
            waiting = asyncio.create_task(progress.first_done.wait())
            await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if on_first_done:
                on_first_done()
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
    return streams, all_open_s


class Sampler:
    """Samples the server's memory every SAMPLE_EVERY seconds, keeping the peak per phase."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.phase = "opening"
        self.peaks: dict[str, Footprint] = {}
        self.samples: Counter[str] = Counter()

    def take(self) -> None:
        footprint = self.processes.sample()
        self.peaks[self.phase] = self.peaks.get(self.phase, Footprint()).peak(footprint)
        self.samples[self.phase] += 1

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.take()

    async def run(self) -> None:
        while True:
            self.take()
            await asyncio.sleep(SAMPLE_EVERY)

    def overall(self) -> Footprint:
        peak = Footprint()
        for footprint in self.peaks.values():
            peak = peak.peak(footprint)
        return peak


def log_summary(log: Path) -> dict[str, Any]:
    """What the server logged at warning and above, by level and event."""
    events: Counter[str] = Counter()
    examples: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            key = f"{record.get('level', '?')}: {record.get('event', '?')}"
        except ValueError:
            key = "unparsed: " + line[:80]
        if key not in events and len(examples) < 5:
            examples.append(line[:500])
        events[key] += 1
    return {"lines": sum(events.values()), "by_event": dict(events), "examples": examples}


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    llm_proxy = llm_proxy_command(args.llm_proxy)
    upstream_port, proxy_port = free_port(), free_port()
    upstream, proxy = f"http://127.0.0.1:{upstream_port}", f"http://127.0.0.1:{proxy_port}"
    runner = web.AppRunner(
        upstream_app(args.hold, args.interval), access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", upstream_port, backlog=4096).start()
        config = work / "api_providers.yaml"
        config.write_text(
            "default_api: openai\n"
            f"apis:\n  openai:\n    base_url: {upstream}\n"
            "    allowed_endpoints: [/v1/chat/completions]\n"
        )
        env = {
            "LISTEN_ADDR": f"127.0.0.1:{proxy_port}",
            "DATA_DIR": str(work / "data"),
            "DATABASE_URL": f"sqlite:///{work / 'data' / 'llm-proxy.db'}",
            "API_CONFIG_PATH": str(config),
            "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
            "LOG_LEVEL": "warning",
            "LOG_FORMAT": "json",
            # Given, so that the server prints no banner of generated credentials.
            "ADMIN_PASSWORD": secrets.token_urlsafe(16),
            "ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        }
        command = [*llm_proxy, "server", "--workers", str(args.workers)]
        log = work / "server.log"
        seen: set[int] = set()
        try:
            with started(command, log, env) as server:
                await asyncio.to_thread(wait_until_up, f"{proxy}/health", server, log, 60)
                seen.update(process_tree(server.pid))
                token = await asyncio.to_thread(issue_token, proxy)
                result = await measure(args, proxy, token, server.pid, seen)
                result["server_log"] = log_summary(log)
                return result
        except BenchError:
            raise
        except Exception as exc:
            raise BenchError(f"{type(exc).__name__}: {exc}\nserver log:\n{tail(log)}") from exc
        finally:
            # The server stops its events process; anything of its tree still here is ended.
            for pid in seen:
                if "llm" in cmdline(pid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
    finally:
        await runner.cleanup()


async def measure(
    args: argparse.Namespace, proxy: str, token: str, server_pid: int, seen: set[int]
) -> dict[str, Any]:
    timeout = args.hold + 120
    warm, _ = await run_streams(proxy, token, WARMUP_STREAMS, chat_body(WARMUP_USER), 60)
    expected = content_chunks(WARMUP_HOLD, WARMUP_INTERVAL)
    warm_failures = [f for s in warm if (f := s.failure(expected))]
    if warm_failures:
        raise BenchError(f"warm-up: {len(warm_failures)} failed, first: {warm_failures[0]}")
    processes = Processes.of(server_pid, args.pss)
    seen.update(processes.server + processes.events)
    if not processes.events:
        print("bench: no events process found under the server", file=sys.stderr)
    await asyncio.sleep(2)  # let the warm-up's events and usage flush settle
    idle_samples = []
    for _ in range(3):
        idle_samples.append(processes.sample())
        await asyncio.sleep(0.5)
    idle = Footprint(
        int(statistics.median(s.server_kib for s in idle_samples)),
        int(statistics.median(s.events_kib for s in idle_samples)),
        int(statistics.median(s.server_fds for s in idle_samples)),
    )

    sampler = Sampler(processes)
    sampling = asyncio.create_task(sampler.run())
    try:
        streams, all_open_s = await run_streams(
            proxy,
            token,
            args.streams,
            chat_body(),
            timeout,
            on_all_open=lambda: sampler.enter("open"),
            on_first_done=lambda: sampler.enter("closing"),
        )
        await asyncio.sleep(2)  # the events process sees the streams' events after they end
        sampler.take()
    finally:
        sampling.cancel()
    seen.update(Processes.of(server_pid, args.pss).server)

    expected = content_chunks(args.hold, args.interval)
    failures = Counter(f for s in streams if (f := s.failure(expected)))
    opened = sum(1 for s in streams if s.first_chunk_s is not None)
    peak = sampler.peaks.get("open", Footprint())
    overall = sampler.overall()
    first_chunks = sorted(s.first_chunk_s for s in streams if s.first_chunk_s is not None)

    def per_stream(kib: int) -> float | None:
        return round(kib / opened, 1) if opened else None

    return {
        "streams": args.streams,
        "streams_opened": opened,
        "streams_completed": args.streams - sum(failures.values()),
        "failures": sum(failures.values()),
        "failure_reasons": dict(failures.most_common(10)),
        "workers": args.workers,
        "hold_s": args.hold,
        "interval_s": args.interval,
        "memory": "pss" if args.pss else "rss",
        "server_rss_idle_mib": mib(idle.server_kib),
        "server_rss_peak_mib": mib(peak.server_kib),
        "events_rss_idle_mib": mib(idle.events_kib),
        "events_rss_peak_mib": mib(peak.events_kib),
        "server_kib_per_stream": per_stream(peak.server_kib - idle.server_kib),
        "combined_kib_per_stream": per_stream(
            peak.server_kib + peak.events_kib - idle.server_kib - idle.events_kib
        ),
        "samples_while_open": sampler.samples["open"],
        # Over the whole run, including opening and the streams' ends.
        "server_rss_max_mib": mib(overall.server_kib),
        "events_rss_max_mib": mib(overall.events_kib),
        "all_open_after_s": round(all_open_s, 2),
        "first_chunk_p50_ms": (
            round(1000 * statistics.median(first_chunks), 1) if first_chunks else None
        ),
        "first_chunk_max_ms": round(1000 * first_chunks[-1], 1) if first_chunks else None,
        "server_fds_idle": idle.server_fds,
        "server_fds_peak": peak.server_fds,
        "server_nofile_limit": nofile_limit(server_pid),
    }


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, for this process and the server it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def report(result: dict[str, Any]) -> str:
    combined = result["combined_kib_per_stream"]
    verdict = (
        "n/a"
        if combined is None
        else f"{'met' if combined <= TARGET_KIB else 'MISSED'} (<= 100 KB = {TARGET_KIB:.1f} KiB)"
    )
    return (
        f"{result['streams_opened']}/{result['streams']} streams open,"
        f" {result['streams_completed']} completed, {result['failures']} failed;"
        f" server {result['memory'].upper()} {result['server_rss_idle_mib']}"
        f" -> {result['server_rss_peak_mib']} MiB ({result['server_kib_per_stream']} KiB/stream),"
        f" events {result['events_rss_idle_mib']} -> {result['events_rss_peak_mib']} MiB;"
        f" server+events {combined} KiB/stream, target {verdict}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams [1000]")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds each stream lasts [20]")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between chunks [1]")
    parser.add_argument("--workers", type=int, default=1, help="llm-proxy server --workers [1]")
    parser.add_argument("--pss", action="store_true", help="Pss instead of VmRSS")
    parser.add_argument("--llm-proxy", help="path of the llm-proxy executable")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    if args.streams < 1 or args.workers < 1 or args.hold < 0 or args.interval <= 0:
        parser.error("--streams and --workers must be positive, --hold not negative")
    raise_nofile_limit()
    # SIGTERM cleans up as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="llm-proxy-open-streams-") as tmp,
            asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        ):
            result = runner.run(bench(args, Path(tmp)))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print(report(result))
    log = result["server_log"]
    if log["lines"]:
        print(f"server logged {log['lines']} line(s): {log['by_event']}", file=sys.stderr)
        for line in log["examples"]:
            print(f"  {line}", file=sys.stderr)
    for reason, count in result["failure_reasons"].items():
        print(f"  {count} x {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0 if result["failures"] == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
