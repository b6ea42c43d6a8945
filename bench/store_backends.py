"""One instance on SQLite against one on PostgreSQL: added latency, throughput, and database work.

Starts ``llm-proxy mock-upstream`` and two ``llm-proxy server`` processes (one per backend, each its
own ``DATA_DIR``), issues a token without limits on each, then runs ``llm-proxy benchmark`` against
each with ``--compare-url`` (the mock upstream directly) at concurrency 1 and 64, ``--repeat`` times,
and prints the medians. For PostgreSQL it also counts the transactions the database committed
during each run (``pg_stat_database.xact_commit``): a cached token must cost no round trip, so the
count stays at the background work (the change feed read every second, usage written in batches)
whatever the number of requests.

    .venv/bin/python bench/store_backends.py --postgres-url postgresql://user@127.0.0.1:5432/db
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

MANAGEMENT_TOKEN = "mgmt-store-backends-0123456789abcdef"
ENCRYPTION_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # 32 bytes, base64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{process.args} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{url} did not answer")


def manage(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}/manage{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        answer: dict[str, Any] = json.load(response)
        return answer


def committed(postgres_url: str) -> int:
    database = postgres_url.rsplit("/", 1)[1].split("?")[0]
    out = subprocess.run(
        [
            "psql",
            "-X",
            "-At",
            "-d",
            postgres_url,
            "-c",
            f"SELECT pg_stat_force_next_flush(); SELECT xact_commit FROM pg_stat_database"
            f" WHERE datname = '{database}'",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


def benchmark(llm_proxy: str, base: str, direct: str, token: str, concurrency: int) -> Any:
    out = subprocess.run(
        [
            llm_proxy,
            "benchmark",
            "--base-url",
            base,
            "--compare-url",
            direct,
            "--compare-token",
            "sk-mock",
            "--token",
            token,
            "--endpoint",
            "/v1/chat/completions",
            "--concurrency",
            str(concurrency),
            "--requests",
            "2000" if concurrency == 1 else "6000",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", required=True)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    llm_proxy = str(bin_dir / "llm-proxy")
    work = Path(tempfile.mkdtemp(prefix="store-backends-"))
    processes: list[subprocess.Popen[bytes]] = []
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_PROXY", "_proxy"))}
    try:
        mock_port = free_port()
        mock = subprocess.Popen(
            [llm_proxy, "mock-upstream", "--port", str(mock_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(mock)
        direct = f"http://127.0.0.1:{mock_port}"
        wait_for(f"{direct}/mock/streams", mock)
        config = work / "api.yaml"
        config.write_text(
            "default_api: openai\napis:\n  openai:\n"
            f"    base_url: {direct}\n"
            "    allowed_endpoints: [/v1/chat/completions]\n"
            "    allowed_methods: [POST]\n"
        )
        routes: dict[str, tuple[str, str]] = {}
        for name, url in [
            ("sqlite", f"sqlite:///{work}/sqlite/llm-proxy.db"),
            ("postgresql", args.postgres_url),
        ]:
            port = free_port()
            server = subprocess.Popen(
                [llm_proxy, "server"],
                env={
                    **env,
                    "LISTEN_ADDR": f"127.0.0.1:{port}",
                    "DATA_DIR": str(work / name),
                    "DATABASE_URL": url,
                    "API_CONFIG_PATH": str(config),
                    "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
                    "ENCRYPTION_KEY": ENCRYPTION_KEY,
                    "ADMIN_PASSWORD": "bench",
                    "LOG_LEVEL": "warning",
                    "LOG_FORMAT": "json",
                },
                stdout=subprocess.DEVNULL,
                stderr=(work / f"{name}.log").open("wb"),
            )
            processes.append(server)
            base = f"http://127.0.0.1:{port}"
            wait_for(f"{base}/health", server)
            project = manage(base, "/projects", {"name": name, "api_key": "sk-mock"})
            token = manage(base, "/tokens", {"project_id": project["id"], "duration_minutes": 600})
            routes[name] = (base, token["token"])

        print(
            f"{'backend':<11} {'c':>3} {'added p50 ms':>13} {'added p99 ms':>13} {'ratio':>7} "
            f"{'requests':>9} {'db commits':>11}"
        )
        for concurrency in (1, 64):
            for name, (base, token) in routes.items():
                p50s, p99s, ratios, commits, requests = [], [], [], [], 0
                for _ in range(args.repeat):
                    before = committed(args.postgres_url) if name == "postgresql" else 0
                    result = benchmark(llm_proxy, base, direct, token, concurrency)
                    if name == "postgresql":
                        commits.append(committed(args.postgres_url) - before)
                    p50s.append(result["added"]["latency_ms"]["p50"])
                    p99s.append(result["added"]["latency_ms"]["p99"])
                    ratios.append(result["throughput"]["ratio"])
                    requests = (
                        result["proxy"]["requests"] + result["throughput"]["proxy"]["requests"]
                    )
                commit_text = f"{statistics.median(commits):.0f}" if commits else "-"
                print(
                    f"{name:<11} {concurrency:>3} {statistics.median(p50s):>13.3f}"
                    f" {statistics.median(p99s):>13.3f} {statistics.median(ratios):>7.3f}"
                    f" {requests:>9} {commit_text:>11}",
                    flush=True,
                )
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
