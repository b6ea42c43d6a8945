"""Memory and time of large request bodies through the proxy: N concurrent uploads of M MB each.

Starts ``llm-proxy mock-upstream`` and ``llm-proxy server`` (from the venv this runs in, or the
checkout given with ``--checkout``), then sends ``--concurrency`` streamed vision-style chat
requests of ``--size-mb`` each, with ``Content-Length`` and chunked, through the proxy and
directly, ``--repeat`` times (the routes' order alternating: the host's noise comes in spells).
It prints the wall time of each round, the server process's resident memory before and at its
peak (sampled every 10 ms), and for each framing the ratio of the proxy's median MB/s to
direct's. ``--whitelist`` adds a ``param_whitelist`` on ``model``, so every body is read whole
(and spooled) before it goes upstream.

    .venv/bin/python bench/large_bodies.py                 # 20 x 20 MB
    .venv/bin/python bench/large_bodies.py --whitelist
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson

MANAGEMENT_TOKEN = "mgmt-large-bodies-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def vision_body(size_mb: int) -> bytes:
    image = base64.b64encode(b"\0" * (size_mb * 1_000_000 * 3 // 4)).decode()
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
    ]
    return orjson.dumps(
        {"messages": [{"role": "user", "content": content}], "model": "gpt-4o", "stream": True}
    )


async def measure(
    base: str, direct: str, server_pid: int, body: bytes, concurrency: int, repeat: int
) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(f"{base}/health") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        auth = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
        async with session.post(
            f"{base}/manage/projects", json={"name": "bench", "api_key": "sk-bench"}, headers=auth
        ) as response:
            project = (await response.json())["id"]
        async with session.post(
            f"{base}/manage/tokens",
            json={"project_id": project, "duration_minutes": 60},
            headers=auth,
        ) as response:
            token = (await response.json())["token"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        before = rss_kib(server_pid)
        peak = before

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_kib(server_pid))
                await asyncio.sleep(0.01)

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 256 * 1024):
                yield body[start : start + 256 * 1024]

        async def one(url: str, chunked: bool) -> int:
            data = pieces() if chunked else io.BytesIO(body)
            async with session.post(
                f"{url}/v1/chat/completions", data=data, headers=headers
            ) as response:
                await response.read()
                return response.status

        sampler = asyncio.create_task(sample())
        rates: dict[tuple[str, bool], list[float]] = {}
        for repetition in range(repeat):
            # Alternate which route goes first: the host's noise comes in spells.
            routes = [("proxy", base), ("direct", direct)]
            for route, url in routes if repetition % 2 == 0 else routes[::-1]:
                for chunked in (False, True):
                    started = time.monotonic()
                    statuses = await asyncio.gather(
                        *(one(url, chunked) for _ in range(concurrency))
                    )
                    took = time.monotonic() - started
                    framing = "chunked" if chunked else "content-length"
                    megabytes = concurrency * len(body) / 1e6
                    rates.setdefault((route, chunked), []).append(megabytes / took)
                    print(
                        f"{route:6} {framing:15} {concurrency} x {len(body) / 1e6:.1f} MB:"
                        f" statuses {sorted(set(statuses))}, {took:.2f} s"
                        f" ({megabytes / took:.0f} MB/s)"
                    )
        sampler.cancel()
        print(
            f"server RSS {before / 1024:.0f} MiB before, {peak / 1024:.0f} MiB at peak"
            f" (+{(peak - before) / 1024:.0f} MiB)"
        )
        for chunked in (False, True):
            proxied, straight = rates["proxy", chunked], rates["direct", chunked]
            ratios = ", ".join(f"{p / d:.2f}" for p, d in zip(proxied, straight, strict=True))
            print(
                f"{'chunked' if chunked else 'content-length'}: proxy/direct"
                f" {statistics.median(proxied) / statistics.median(straight):.2f} (medians of"
                f" {len(proxied)}: {statistics.median(proxied):.0f} / "
                f"{statistics.median(straight):.0f} MB/s; repetitions {ratios})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size-mb", type=int, default=20)
    parser.add_argument("--whitelist", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of both routes (medians)")
    args = parser.parse_args()
    bin_dir = (args.checkout / ".venv" / "bin") if args.checkout else Path(sys.executable).parent
    llm_proxy = str(bin_dir / "llm-proxy")
    port, upstream_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as scratch:
        api = (
            f"apis:\n  openai:\n    base_url: http://127.0.0.1:{upstream_port}\n"
            "    allowed_endpoints: [/v1/chat/completions]\n"
        )
        if args.whitelist:
            api += "    param_whitelist: {model: [gpt-4o*]}\n"
        Path(scratch, "api.yaml").write_text(api)
        env = {
            **os.environ,
            "API_CONFIG_PATH": f"{scratch}/api.yaml",
            "DATA_DIR": scratch,
            "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
            "LISTEN_ADDR": f"127.0.0.1:{port}",
            "LOG_LEVEL": "warning",
        }
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        upstream = subprocess.Popen(
            [llm_proxy, "mock-upstream", "--port", str(upstream_port)], **quiet
        )
        server = subprocess.Popen([llm_proxy, "server"], env=env, **quiet)
        try:
            body = vision_body(args.size_mb)
            asyncio.run(
                measure(
                    f"http://127.0.0.1:{port}",
                    f"http://127.0.0.1:{upstream_port}",
                    server.pid,
                    body,
                    args.concurrency,
                    args.repeat,
                )
            )
        finally:
            server.send_signal(signal.SIGTERM)
            upstream.terminate()
            server.wait(30)
            upstream.wait(30)


if __name__ == "__main__":
    main()
