"""``llm-proxy dispatcher --metrics-port``: a real dispatcher process on a real Redis, scraped
over loopback while it delivers."""

from __future__ import annotations

import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.dispatcher.fakes import HELICONE_KEY, FakeHelicone, serving
from tests.dispatcher.test_cli import events, publish
from tests.events.events_support import RedisServer
from tests.processes import Process, clean_env, cli_command, free_port, run, spawn

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def scrape(base_url: str) -> Samples:
    status, body = get(f"{base_url}/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_until(
    base_url: str, done: Callable[[Samples], bool], process: Process, timeout: float = 20.0
) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(base_url)
        if done(samples):
            return samples
        assert time.monotonic() < deadline, process.stderr
        time.sleep(0.05)


@pytest.fixture
def start_dispatcher(tmp_path: Path) -> Iterator[Callable[..., tuple[Process, str]]]:
    """``llm-proxy dispatcher ARGS`` with its metrics on a free port, once /health answers 200;
    yields the process and the base URL of its metrics."""
    started: list[Process] = []

    def start(*args: str, **env: str) -> tuple[Process, str]:
        port = free_port()
        variables = clean_env(
            LLM_PROXY_DISPATCHER_METRICS_PORT=str(port), DATA_DIR=str(tmp_path), **env
        )
        process = spawn(cli_command("dispatcher", *args), variables, tmp_path, "dispatcher")
        started.append(process)
        base_url = f"http://127.0.0.1:{port}"
        process.wait_for(f"{base_url}/health")
        return process, base_url

    yield start
    for process in started:
        process.stop()


def test_metrics_count_the_events_delivered_to_the_file_and_stop_with_the_dispatcher(
    redis_server: RedisServer,
    tmp_path: Path,
    start_dispatcher: Callable[..., tuple[Process, str]],
) -> None:
    sent = events(7)
    publish(redis_server.url, "m:events", sent)
    process, base_url = start_dispatcher(
        "--service", "file", "--stream", "m:events", "--batch-wait", "0.05",
        REDIS_URL=redis_server.url,
    )  # fmt: skip

    file = {"backend": "file", "service": "file"}
    samples = scrape_until(
        base_url,
        lambda s: value(s, "llm_proxy_dispatcher_delivered_total", **file) == 7,
        process,
    )
    written = [
        orjson.loads(line)["id"] for line in (tmp_path / "events.jsonl").read_bytes().splitlines()
    ]
    assert written == [e["id"] for e in sent]
    assert value(samples, "llm_proxy_dispatcher_lag_seconds_count", **file) == 7
    assert (value(samples, "llm_proxy_dispatcher_batches_total", **file) or 0) >= 1
    # Nothing failed, and the series that would say so are there at 0 for alerts to see move.
    for kind in ("retryable", "permanent"):
        assert value(samples, "llm_proxy_dispatcher_failures_total", kind=kind, **file) == 0
    assert value(samples, "llm_proxy_dispatcher_dead_lettered_total", **file) == 0
    dropped = {"reason": "trimmed_before_delivery", "service": "file"}
    assert value(samples, "llm_proxy_events_dropped_total", **dropped) == 0
    assert value(samples, "llm_proxy_events_redis_groups_lost_total", service="file") == 0

    assert get(f"{base_url}/health") == (200, b'{"status":"ok","service":"file"}')
    assert get(f"{base_url}/")[0] == 404
    assert get(f"{base_url}/metrics/extra")[0] == 404

    process.popen.send_signal(signal.SIGTERM)
    assert process.popen.wait(timeout=20) == 0, process.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(base_url.rsplit(":", 1)[1])), timeout=1)


def test_a_refusing_backend_moves_the_failure_and_dead_letter_counters(
    redis_server: RedisServer,
    tmp_path: Path,
    start_dispatcher: Callable[..., tuple[Process, str]],
) -> None:
    sent = events(4)
    fake = FakeHelicone()
    fake.answers = [503] * 2 * len(sent)  # both attempts of every event
    with serving(fake.app) as url:
        publish(redis_server.url, "r:events", sent)
        process, base_url = start_dispatcher(
            "--service", "helicone", "--helicone-url", f"{url}/custom/v1/log",
            "--stream", "r:events", "--batch-wait", "0.05",
            "--max-attempts", "2", "--backoff-cap", "0.05",
            REDIS_URL=redis_server.url, HELICONE_API_KEY=HELICONE_KEY,
        )  # fmt: skip
        helicone = {"backend": "helicone", "service": "helicone"}
        samples = scrape_until(
            base_url,
            lambda s: value(s, "llm_proxy_dispatcher_dead_lettered_total", **helicone) == 4,
            process,
        )
    failures = "llm_proxy_dispatcher_failures_total"
    assert value(samples, failures, kind="retryable", **helicone) == 4
    assert value(samples, failures, kind="permanent", **helicone) == 4
    assert value(samples, "llm_proxy_dispatcher_delivered_total", **helicone) == 0
    dead = (tmp_path / "dead-letter-helicone.jsonl").read_bytes().splitlines()
    assert sorted(orjson.loads(line)["event"]["id"] for line in dead) == sorted(
        e["id"] for e in sent
    )
    assert not fake.logs


def test_a_lost_consumer_group_shows_on_the_page(
    redis_server: RedisServer, start_dispatcher: Callable[..., tuple[Process, str]]
) -> None:
    publish(redis_server.url, "g:events", events(2))
    process, base_url = start_dispatcher(
        "--service", "file", "--stream", "g:events", "--batch-wait", "0.05",
        REDIS_URL=redis_server.url,
    )  # fmt: skip
    delivered = ("llm_proxy_dispatcher_delivered_total", {"backend": "file", "service": "file"})
    scrape_until(base_url, lambda s: value(s, delivered[0], **delivered[1]) == 2, process)

    # Redis restarted without persistence, as far as the group can tell.
    client = redis.Redis(port=redis_server.port)
    client.delete("g:events")
    client.close()
    scrape_until(
        base_url,
        lambda s: value(s, "llm_proxy_events_redis_groups_lost_total", service="file") == 1,
        process,
    )


@pytest.mark.redis
def test_a_busy_metrics_port_stops_the_dispatcher_with_one_line(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with socket.socket() as rival:
        rival.bind(("127.0.0.1", 0))
        rival.listen()
        port = rival.getsockname()[1]
        result = run(
            cli_command(
                "dispatcher", "--service", "file", "--stream", "b:events",
                "--metrics-port", str(port),
            ),
            clean_env(REDIS_URL=redis_server.url, DATA_DIR=str(tmp_path), LOG_FORMAT="json"),
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"llm-proxy dispatcher: --metrics-port: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    ]
    # Nothing was read: the dispatcher stopped before it joined the bus.
    client = redis.Redis(port=redis_server.port)
    assert not client.exists("b:events")
    client.close()
