"""``GET /metrics`` as Prometheus reads it: every family of the type it is (no creation time posing
as a gauge of its own), and the tokens and spend of proxied requests by model, counted by the events
process and summed over the workers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from llm_proxy.events.metrics import DROP_REASONS
from tests.conftest import Proxy
from tests.processes import (
    MockUpstream,
    ServerProcess,
    http,
    start_mock_upstream,
    start_server,
    wait_until,
    write_api_config,
)

ROOT = Path(__file__).resolve().parents[2]
PRICED = "gpt-4o-mini*"
# USD per million tokens.
PRICES = f"{PRICED}: {{input: 1, output: 2}}\n"
SpendKey = tuple[str, ...]


def families_of(text: str) -> list[Metric]:
    return list(text_string_to_metric_families(text))


def mistyped(families: list[Metric]) -> list[str]:
    """Families a scraper would take for something they are not: creation times as gauges, and
    samples outside any declared family."""
    return [
        f"{family.name} ({family.type})"
        for family in families
        if (family.type == "gauge" and family.name.endswith("_created"))
        or family.type in ("untyped", "unknown")
        or any(sample.name.endswith("_created") for sample in family.samples)
    ]


def spend(families: list[Metric]) -> dict[SpendKey, float]:
    """``llm_proxy_tokens_total`` by (model, kind) and ``llm_proxy_cost_usd_total`` by model."""
    found: dict[SpendKey, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == "llm_proxy_tokens_total":
                found["tokens", sample.labels["model"], sample.labels["kind"]] = sample.value
            elif sample.name == "llm_proxy_cost_usd_total":
                found["cost", sample.labels["model"]] = sample.value
    return found


def dropped(families: list[Metric]) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for family in families
        for sample in family.samples
        if sample.name == "llm_proxy_events_dropped_total"
    }


# -- a real server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path_factory.mktemp("mock"))
    yield mock
    mock.process.stop()


def scrape(server: ServerProcess) -> list[Metric]:
    """One ``GET /metrics`` on a new connection (so, under ``--workers``, on any worker)."""
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=5) as response:
        return families_of(response.read().decode())


def worker_page(server: ServerProcess, index: int) -> list[Metric]:
    """What worker ``index`` and its events process alone counted, from its private socket."""
    path = server.data_dir / "run" / f"metrics-worker-{index}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        return families_of(b"".join(iter(lambda: sock.recv(65536), b"")).decode())


def workers_reporting(server: ServerProcess) -> float:
    for family in scrape(server):
        for sample in family.samples:
            if sample.name == "llm_proxy_workers" and sample.labels["state"] == "reporting":
                return sample.value
    raise AssertionError("no llm_proxy_workers on /metrics")


def chat_requests(server: ServerProcess, token: str, models: list[str]) -> list[dict[str, int]]:
    """One chat completion per model, each on a new connection; the usages the upstream answered."""

    def one(model: str) -> dict[str, int]:
        body = {"model": model, "messages": [{"role": "user", "content": "one two three"}]}
        status, answer = http(
            "POST", f"{server.base_url}/v1/chat/completions", token=token, body=body
        )
        assert status == 200, answer
        return dict(answer["usage"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, models))


@pytest.mark.process
@pytest.mark.parametrize("workers", [1, 2])
def test_tokens_and_cost_by_model_reach_the_page_and_no_creation_time_poses_as_a_gauge(
    tmp_path: Path, upstream: MockUpstream, workers: int
) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(
        tmp_path / "data", config, tmp_path, PRICES_PATH=str(prices), WORKERS=str(workers)
    )
    try:
        wait_until(lambda: workers_reporting(server) == workers, f"{workers} workers")
        first = scrape(server)
        assert mistyped(first) == []
        # Every reason is there at 0 before anything was dropped (see DROP_REASONS).
        assert dropped(first) == dict.fromkeys(DROP_REASONS, 0.0)
        assert spend(first) == {}

        token = server.issue_token()
        priced = chat_requests(server, token, ["gpt-4o-mini"] * 30)
        unpriced = chat_requests(server, token, ["my-fine-tune-7"] * 10)
        status, _ = http("GET", f"{server.base_url}/v1/models", token="sk-" + "N" * 43)
        assert status == 401  # refused before the upstream: nothing to count

        expected = {
            ("tokens", model, kind): float(sum(u[f"{kind}_tokens"] for u in usages))
            for model, usages in ((PRICED, priced), ("other", unpriced))
            for kind in ("prompt", "completion")
        }
        cost = sum(u["prompt_tokens"] * 1 + u["completion_tokens"] * 2 for u in priced) / 1e6

        def counted() -> bool:
            now = spend(scrape(server))
            return {key: value for key, value in now.items() if key[0] == "tokens"} == expected

        wait_until(counted, "the events process to count every request's tokens")
        after = scrape(server)
        assert mistyped(after) == []
        assert spend(after)["cost", PRICED] == pytest.approx(cost)
        assert ("cost", "other") not in spend(after)  # unpriced models add nothing
        if workers > 1:
            # Each worker's events process counted some of them; every scrape shows the sum.
            own = [
                spend(worker_page(server, n)).get(("tokens", PRICED, "prompt"), 0.0) for n in (0, 1)
            ]
            assert all(count > 0 for count in own), own
            assert sum(own) == expected["tokens", PRICED, "prompt"]
            for _ in range(6):
                assert spend(scrape(server))["tokens", PRICED, "prompt"] == sum(own)
    finally:
        code = server.stop(timeout=10)
    assert code == 0, server.process.stderr[-3000:]


# -- events built in the server's own process (event_build_in="thread") -----------------------


async def test_with_events_built_in_the_server_the_page_has_spend_and_no_created_gauges(
    proxy: Proxy,
) -> None:
    async def page() -> list[Metric]:
        async with proxy.operator.get(f"{proxy.base_url}/metrics") as response:
            assert response.status == 200
            return families_of(await response.text())

    before = spend(await page())
    token = await proxy.token()
    response = await proxy.client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status == 200
    deadline = time.monotonic() + 10
    while spend(families := await page()) == before:
        assert time.monotonic() < deadline, "tokens never counted"
        await asyncio.sleep(0.05)
    assert mistyped(families) == []
    grew = {key for key, value in spend(families).items() if value > before.get(key, 0.0)}
    assert {key[0] for key in grew} == {"tokens", "cost"}


# -- the reasons in the code -----------------------------------------------------------------------

# Where the code names a reason for dropping events: ``Drops.add("…")``,
# ``DROPPED.labels("…")`` and the Redis bus's ``_drop(ids, "…")``.
_REASON = re.compile(r'(?:\.add|DROPPED\.labels|\._drop)\((?:[^,()]+,\s*)?"([a-z_]+)"')


def test_every_reason_the_code_drops_events_for_is_created_at_zero() -> None:
    named = {
        reason
        for path in (ROOT / "llm_proxy").rglob("*.py")
        for reason in _REASON.findall(path.read_text())
    }
    assert len(named) >= 8, named  # the pattern still finds them
    assert named <= set(DROP_REASONS), named - set(DROP_REASONS)
