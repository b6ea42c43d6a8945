"""Answers in a content coding the client chose: a budgeted request is charged what it cost, and
never nothing because its answer could not be read.

The proxy passes `Accept-Encoding` through untouched (SPEC §7), so the client picks the coding of
its answers; OpenAI's edge answers zstd to the clients that offer it (httpx does once `zstandard`
is installed).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Proxy
from tests.fakes import UPSTREAM_LOG, UpstreamLog
from tests.waiting import wait_for_lines

PRICES = "coded-model: {input: 1.00, output: 4.00, max_output_tokens: 1000}\n"
USAGE = {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500}
ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-coded",
        "object": "chat.completion",
        "model": "coded-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Fine."}}],
        "usage": USAGE,
    }
)


async def _chat(request: web.Request) -> web.Response:
    await request.read()
    coding = request.headers.get("Accept-Encoding", "identity")
    if coding == "zstd":
        body = zstandard.ZstdCompressor().compress(ANSWER)
    elif coding == "identity":
        body = ANSWER
    else:
        body = b"\x1f\x9d" + ANSWER[::-1]  # a coding nobody decodes (here: `compress`, LZW)
    return web.Response(
        body=body, headers={"Content-Type": "application/json", "Content-Encoding": coding}
    )


@pytest.fixture
async def upstream_server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app[UPSTREAM_LOG] = UpstreamLog()
    app.router.add_post("/v1/chat/completions", _chat)
    server = TestServer(app)
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def proxy(proxy_factory: Any, tmp_path: Path) -> Proxy:
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    started: Proxy = await proxy_factory(
        prices_path=prices, file_event_log=tmp_path / "events.jsonl"
    )
    return started


async def _settled(proxy: Proxy, token_id: str) -> dict[str, Any]:
    for _ in range(300):
        _, shown = await proxy.manage("GET", f"/tokens/{token_id}")
        if shown["reserved_usd"] == 0 and shown["spent_usd"]:
            break
        await asyncio.sleep(0.02)
    return dict(shown)


async def _ask(proxy: Proxy, token: str, coding: str) -> bytes:
    body = {"model": "coded-model", "messages": [{"role": "user", "content": "Hi."}]}
    response = await proxy.client.post(
        "/v1/chat/completions",
        data=orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Accept-Encoding": coding},
        auto_decompress=False,
    )
    assert response.status == 200
    assert response.headers["Content-Encoding"] == coding  # passed through as it came
    return await response.read()


async def test_a_zstd_answer_is_charged_its_usage(proxy: Proxy, tmp_path: Path) -> None:
    issued = await proxy.issue_token(budget_usd=5)
    raw = await _ask(proxy, issued["token"], "zstd")
    assert zstandard.ZstdDecompressor().decompress(raw) == ANSWER

    (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
    assert event["usage"] == {**USAGE, "source": "upstream"}
    assert event["response"]["choices"][0]["message"]["content"] == "Fine."
    expected = (1200 * 1.00 + 300 * 4.00) / 1e6
    assert event["cost_usd"] == pytest.approx(expected)
    assert (await _settled(proxy, issued["id"]))["spent_usd"] == pytest.approx(expected)


async def test_an_answer_nobody_can_decode_is_charged_all_it_held(
    proxy: Proxy, tmp_path: Path
) -> None:
    issued = await proxy.issue_token(budget_usd=5)
    await _ask(proxy, issued["token"], "compress")

    (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
    assert event["usage"] is None  # unknown, not free
    assert str(event["response"]).startswith("[body not decoded: content-encoding compress")
    # The hold: the prompt's bound and the model's whole output cap (1,000 tokens at $4/M).
    spent = (await _settled(proxy, issued["id"]))["spent_usd"]
    assert spent >= 1000 * 4.00 / 1e6
    assert event["cost_usd"] == spent  # what it was charged
