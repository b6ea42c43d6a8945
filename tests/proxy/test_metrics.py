"""``/metrics`` is scrapeable Prometheus text, and its figures move as traffic flows."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proxy
from tests.processes import start_server, write_api_config


async def scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await proxy.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_traffic(proxy: Proxy) -> None:
    before = await scrape(proxy)
    token = await proxy.token(max_requests=2)
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        await proxy.client.post(
            "/v1/chat/completions", json={"model": "gpt-4o", "messages": []}, headers=headers
        )
    await proxy.client.get("/v1/nope")
    await proxy.client.get("/v1/models", headers={"Authorization": "Bearer sk-" + "N" * 43})
    other = await proxy.token()
    await proxy.client.get("/v1/audio/slow-head?s=3", headers={"Authorization": f"Bearer {other}"})
    after = await scrape(proxy)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert (
        delta("llm_proxy_requests_total", endpoint="/v1/chat/completions", status_class="2xx") == 2
    )
    assert (
        delta("llm_proxy_requests_total", endpoint="/v1/chat/completions", status_class="4xx") == 1
    )
    assert delta("llm_proxy_requests_refused_total", reason="quota_exceeded") == 1
    assert delta("llm_proxy_requests_refused_total", reason="endpoint_not_found") == 1
    assert delta("llm_proxy_requests_refused_total", reason="token_not_found") == 1
    assert delta("llm_proxy_upstream_errors_total", kind="timeout") == 1
    assert delta("llm_proxy_upstream_latency_seconds_count") == 2
    assert delta("llm_proxy_added_latency_seconds_count") == 2
    assert value(after, "llm_proxy_upstream_latency_seconds_bucket", le="120.0") >= 2
    assert delta("llm_proxy_token_cache_lookups_total", result="hit") >= 2
    assert delta("llm_proxy_token_cache_lookups_total", result="miss") >= 2
    # Labels stay bounded: no raw paths, token ids or project ids.
    text = await (await proxy.client.get("/metrics")).text()
    assert "/v1/nope" not in text and token not in text


def _resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.process
async def test_random_long_paths_do_not_grow_the_server_s_memory(tmp_path: Path) -> None:
    # Nothing listens at the upstream: every request here is refused before it would go there.
    api_config = write_api_config(tmp_path / "api_providers.yaml", "http://127.0.0.1:9")
    server = start_server(tmp_path / "data", api_config, tmp_path / "logs")
    path_bytes = 32 * 1024  # a long target, well inside the 64 KiB a head may hold

    async def refuse(count: int) -> None:
        async with aiohttp.ClientSession(server.base_url) as session:

            async def one() -> None:
                target = f"/v1/{secrets.token_hex(path_bytes // 2)}"
                async with session.get(target) as answer:
                    assert answer.status == 404  # endpoint_not_found
                    await answer.read()

            for _ in range(0, count, 50):
                await asyncio.gather(*(one() for _ in range(50)))

    try:
        await refuse(200)  # the allocator's and the connection pool's working set
        before = _resident_kib(server.process.popen.pid)
        await refuse(3000)  # ~94 MiB of distinct paths
        grown_mib = (_resident_kib(server.process.popen.pid) - before) / 1024
    finally:
        server.stop()
    # A client choosing random paths must not make the server keep them: what it held for
    # metrics grew with every distinct path, up to 10,000 of them (~640 MiB of 64 KiB paths).
    assert grown_mib < 30, f"the server grew by {grown_mib:.0f} MiB"
