"""Answers longer than the capture limit settle with the upstream's usage, not an estimate of the
part captured: the usage of a long answer comes at its end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from llm_proxy.tools.mock_upstream import MockSettings
from tests.conftest import Proxy
from tests.fakes import fake_upstream_app
from tests.waiting import wait_for_lines

PRICES = "long-model: {input: 1.00, output: 4.00}\n"
WORDS = 2000  # the mock's answer: 2,000 completion tokens, some 14 KB as JSON, 400 KB streamed
CAPTURE = 4096  # the capture limit of these proxies: every answer here is longer


@pytest.fixture
async def upstream_server() -> AsyncIterator[TestServer]:
    server = TestServer(fake_upstream_app(MockSettings(chunks=WORDS)))
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def proxy(proxy_factory: Any, tmp_path: Path) -> Proxy:
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    started: Proxy = await proxy_factory(
        prices_path=prices, capture_body_bytes=CAPTURE, file_event_log=tmp_path / "events.jsonl"
    )
    return started


def chat(**fields: Any) -> bytes:
    return orjson.dumps(
        {"model": "long-model", "messages": [{"role": "user", "content": "Go on."}], **fields}
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_a_long_answer_is_charged_and_counted_what_the_upstream_reported(
    proxy: Proxy, tmp_path: Path, stream: bool
) -> None:
    issued = await proxy.issue_token(budget_usd=10, tpm=1_000_000)
    fields: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    response = await proxy.client.post(
        "/v1/chat/completions",
        data=chat(**fields) if stream else chat(),
        headers={"Authorization": f"Bearer {issued['token']}"},
    )
    assert response.status == 200
    body = await response.read()
    if stream:
        lines = [line for line in body.split(b"\n") if line.startswith(b"data: {")]
        usage = orjson.loads(lines[-1][6:])["usage"]
    else:
        usage = orjson.loads(body)["usage"]
    assert usage["completion_tokens"] == WORDS and len(body) > CAPTURE

    (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
    assert event["usage"] == {**usage, "source": "upstream"}
    expected = (usage["prompt_tokens"] * 1.00 + WORDS * 4.00) / 1e6
    assert event["cost_usd"] == pytest.approx(expected)
    for _ in range(300):
        _, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
        if shown["reserved_usd"] == 0:
            break
        await asyncio.sleep(0.02)
    assert shown["spent_usd"] == pytest.approx(expected)


@pytest.fixture
async def paced_upstream() -> AsyncIterator[TestServer]:
    server = TestServer(fake_upstream_app(MockSettings(chunks=WORDS, chunk_interval=0.002)))
    await server.start_server()
    yield server
    await server.close()


@pytest.mark.parametrize("build_in", ["thread", "process"])
async def test_a_client_that_hangs_up_deep_into_a_long_stream_pays_for_what_it_was_sent(
    proxy_factory: Any, paced_upstream: TestServer, tmp_path: Path, build_in: str
) -> None:
    # Its usage never comes, so it is counted from the answer: all of it, not only the part the
    # capture kept (a few dozen words here, some thousand tokens at the default capture).
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    proxy: Proxy = await proxy_factory(
        prices_path=prices,
        capture_body_bytes=CAPTURE,
        file_event_log=tmp_path / "events.jsonl",
        event_build_in=build_in,
        api={"base_url": str(paced_upstream.make_url("")).rstrip("/")},
    )
    issued = await proxy.issue_token(budget_usd=10, tpm=1_000_000)
    response = await proxy.client.post(
        "/v1/chat/completions",
        data=chat(stream=True, max_tokens=5000),
        headers={"Authorization": f"Bearer {issued['token']}"},
    )
    read = 1000
    for _ in range(1 + read):  # the role's chunk, then as many words
        await response.content.readuntil(b"\n\n")
    response.close()

    (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
    assert (event["error"], event["usage"]["source"]) == ("client_disconnected", "estimated")
    assert read <= event["usage"]["completion_tokens"] <= WORDS
    for _ in range(300):
        _, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
        if shown["reserved_usd"] == 0:
            break
        await asyncio.sleep(0.02)
    assert shown["spent_usd"] >= read * 4.00 / 1e6
