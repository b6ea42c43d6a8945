"""Budgeted tokens: every request holds the most it can cost, settles what it used, and the
budget is never overshot, whatever the concurrency, the instances or the client's behaviour."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from llm_proxy import tokens
from llm_proxy.pricing import load_prices
from llm_proxy.proxy.budget_plan import plan_cost
from llm_proxy.proxy.cost_bound import CAP_FIELDS
from llm_proxy.tools.mock_upstream import MockSettings
from tests.conftest import ALLOWED, Proxy
from tests.events.events_support import RedisServer
from tests.fakes import fake_upstream_app, whole_answer_in_two_parts
from tests.raw_servers import silent_server
from tests.waiting import wait_for_lines

# USD per million tokens: 1 per input token and 4 per output token, in micro-dollars.
PRICES = """
budget-mini*: {input: 1.00, output: 4.00, max_output_tokens: 200}
uncapped-model: {input: 1.00, output: 4.00}
embed-model: {input: 0.50}
"""
OUTPUT_NANOUSD = 4_000  # per output token
INPUT_NANOUSD = 1_000


@pytest.fixture
async def upstream_server() -> AsyncIterator[TestServer]:
    """An upstream whose model answers with as many tokens as the request allows, up to its own
    200 (max_output_tokens in PRICES), one per chunk."""
    server = TestServer(fake_upstream_app(MockSettings(chunks=200)))
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
def prices_path(tmp_path: Path) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    return path


@pytest.fixture
async def budgeted(proxy_factory: Any, prices_path: Path) -> Proxy:
    proxy: Proxy = await proxy_factory(prices_path=prices_path)
    return proxy


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def chat(model: str = "budget-mini", **fields: Any) -> bytes:
    return orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hello there"}], **fields}
    )


async def post(proxy: Proxy, token: str, body: bytes, path: str = "/v1/chat/completions") -> Any:
    response = await proxy.client.post(path, data=body, headers=bearer(token))
    return response.status, response.headers, await response.read()


async def token_state(proxy: Proxy, token_id: str) -> dict[str, Any]:
    status, shown = await proxy.manage("GET", f"/tokens/{token_id}")
    assert status == 200
    return dict(shown)


async def settled(proxy: Proxy, token_id: str, spent_at_least: float = 0.0) -> dict[str, Any]:
    """The token once nothing is held any more (the events pipeline settles after the answer)."""
    for _ in range(300):
        shown = await token_state(proxy, token_id)
        if shown["reserved_usd"] == 0 and shown["spent_usd"] >= spent_at_least:
            return shown
        await asyncio.sleep(0.02)
    raise AssertionError(f"holds never settled: {shown}")


async def test_a_request_without_a_cap_gets_the_one_its_budget_affords(budgeted: Proxy) -> None:
    # 0.0005 USD: a small prompt (~30 tokens bound, 30 µUSD) leaves output for ~117 tokens, less
    # than the model's own 200.
    issued = await budgeted.issue_token(budget_usd=0.0005)
    status, headers, body = await post(budgeted, issued["token"], chat())
    assert status == 200, body
    sent = orjson.loads(budgeted.upstream.last.body)
    cap = sent["max_completion_tokens"]
    assert 16 <= cap < 200
    answer = orjson.loads(body)
    assert answer["usage"]["completion_tokens"] == cap
    assert answer["choices"][0]["finish_reason"] == "length"
    # What the header says is left is the budget less what this request holds.
    assert 0 <= float(headers["LLM-Proxy-Remaining-Budget-USD"]) < 0.0005
    shown = await settled(budgeted, issued["id"], spent_at_least=0.000001)
    prompt = answer["usage"]["prompt_tokens"]
    assert shown["spent_usd"] == pytest.approx(
        (prompt * INPUT_NANOUSD + cap * OUTPUT_NANOUSD) / 1e9
    )
    assert shown["spent_usd"] <= 0.0005


async def test_a_generous_budget_leaves_the_body_as_sent(budgeted: Proxy) -> None:
    issued = await budgeted.issue_token(budget_usd=10)
    body = chat()
    status, _, answer = await post(budgeted, issued["token"], body)
    assert status == 200
    # The model stops at its own 200 tokens: no cap needed, nothing rewritten.
    assert budgeted.upstream.last.body == body
    assert orjson.loads(answer)["usage"]["completion_tokens"] == 200


async def test_a_client_cap_is_kept_and_held_whole(budgeted: Proxy) -> None:
    issued = await budgeted.issue_token(budget_usd=0.001)
    status, headers, _ = await post(budgeted, issued["token"], chat(max_tokens=50))
    assert status == 200
    # Held: the prompt's bound and all 50 tokens of output.
    assert float(headers["LLM-Proxy-Remaining-Budget-USD"]) <= 0.001 - 50 * OUTPUT_NANOUSD / 1e9
    assert orjson.loads(budgeted.upstream.last.body)["max_tokens"] == 50
    assert "max_completion_tokens" not in orjson.loads(budgeted.upstream.last.body)
    # A cap the budget cannot afford is refused, before the upstream.
    seen = len(budgeted.upstream.requests)
    status, _, answer = await post(budgeted, issued["token"], chat(max_tokens=5000))
    assert (status, orjson.loads(answer)["error"]["code"]) == (429, "budget_exceeded")
    assert len(budgeted.upstream.requests) == seen


async def test_unpriced_models_and_unpriceable_requests_are_refused(budgeted: Proxy) -> None:
    issued = await budgeted.issue_token(budget_usd=1)
    token = issued["token"]
    seen = len(budgeted.upstream.requests)
    for body, path in [
        (chat("gpt-unknown"), "/v1/chat/completions"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "/v1/chat/completions"),
        (b"not json at all", "/v1/chat/completions"),
        # A model that has no cap of its own, on an endpoint where the proxy cannot set one.
        (orjson.dumps({"model": "uncapped-model", "input": "hi"}), "/v1/audio/speech"),
    ]:
        status, _, answer = await post(budgeted, token, body, path)
        assert (status, orjson.loads(answer)["error"]["code"]) == (400, "model_not_priced"), body
    assert len(budgeted.upstream.requests) == seen
    # Requests that name no model and cost nothing pass.
    response = await budgeted.client.get("/v1/models", headers=bearer(token))
    assert response.status == 200
    # Embeddings cost their input only.
    status, _, _ = await post(
        budgeted, token, orjson.dumps({"model": "embed-model", "input": "hi"}), "/v1/embeddings"
    )
    assert status == 200


async def test_a_body_naming_no_model_cannot_run_the_upstreams_default_one_unpriced(
    proxy_factory: Any, prices_path: Path
) -> None:
    # OpenAI's image generation runs dall-e-2 when the body names no model (gpt-image-1 when it
    # sets one of that model's parameters): such a body held nothing and passed even a spent budget.
    budgeted: Proxy = await proxy_factory(
        prices_path=prices_path, api={"allowed_endpoints": [*ALLOWED, "/v1/images"]}
    )
    issued = await budgeted.issue_token(budget_usd=0.000001)
    token = issued["token"]
    seen = len(budgeted.upstream.requests)
    for body, path in [
        (b'{"prompt": "a cat", "n": 10}', "/v1/images/generations"),
        (b'{"prompt": "a cat", "output_format": "webp"}', "/v1/images/generations"),
        (b'{"prompt": "a cat"}', "/v1/images/edits"),
        (b'{"input": "hi"}', "/v1/audio/speech"),
        (b'{"prompt": "a cat"}', "/v1/images/generations/"),
    ]:
        status, _, answer = await post(budgeted, token, body, path)
        assert (status, orjson.loads(answer)["error"]["code"]) == (400, "model_not_priced"), body
    assert len(budgeted.upstream.requests) == seen
    # Bodies that run no model, or a free one, still need none.
    for body, path in [
        (b'{"input": "hi"}', "/v1/moderations"),
        (b'{"metadata": {"topic": "cats"}}', "/v1/chat/completions/chatcmpl-123"),
    ]:
        await post(budgeted, token, body, path)
        assert budgeted.upstream.last.path_qs == path
    assert len(budgeted.upstream.requests) == seen + 2


async def test_a_tool_billed_apart_from_the_usage_cannot_run_on_a_budget(budgeted: Proxy) -> None:
    # The Responses API's image_generation tool is billed per image, outside the answer's usage:
    # the request held and settled its text only, so its images cost the budget nothing.
    token = (await budgeted.issue_token(budget_usd=1))["token"]
    seen = len(budgeted.upstream.requests)
    for tool in [
        b'{"type": "image_generation"}',
        b'{"type": "image_generation", "model": "budget-mini"}',
        b'{"type": "function", "type": "image\\u005fgeneration"}',
    ]:
        body = b'{"model": "budget-mini", "input": "draw a cat", "tools": [%s]}' % tool
        status, _, answer = await post(budgeted, token, body, "/v1/responses")
        assert (status, orjson.loads(answer)["error"]["code"]) == (400, "model_not_priced"), tool
    assert len(budgeted.upstream.requests) == seen
    function = b'{"type": "function", "name": "image_generation", "parameters": {}}'
    body = b'{"model": "budget-mini", "input": "draw a cat", "tools": [%s]}' % function
    status, _, _ = await post(budgeted, token, body, "/v1/responses")
    assert status == 200


async def test_a_cap_in_a_field_the_endpoint_does_not_read_bounds_nothing(
    budgeted: Proxy,
) -> None:
    # Text-to-speech reads no max_tokens, nor the Responses API max_completion_tokens: such a cap
    # was held as the request's bound while the upstream produced what it liked.
    token = (await budgeted.issue_token(budget_usd=1))["token"]
    seen = len(budgeted.upstream.requests)
    speech = {"model": "uncapped-model", "input": "hi", "voice": "alloy"}
    for cap in CAP_FIELDS:
        status, _, answer = await post(
            budgeted, token, orjson.dumps({**speech, cap: 16}), "/v1/audio/speech"
        )
        assert (status, orjson.loads(answer)["error"]["code"]) == (400, "model_not_priced"), cap
    assert len(budgeted.upstream.requests) == seen
    # Where the endpoint has a cap of its own, the proxy adds it, as to a body without one.
    body = {"model": "budget-mini", "input": "hi", "max_completion_tokens": 16, "max_tokens": 16}
    status, headers, _ = await post(budgeted, token, orjson.dumps(body), "/v1/responses")
    assert status == 200
    # Held: the model's own 200 tokens of output, not the 16 the Responses API never reads.
    assert float(headers["LLM-Proxy-Remaining-Budget-USD"]) <= 1 - 200 * OUTPUT_NANOUSD / 1e9


async def test_an_audio_answer_is_held_at_the_audio_price(proxy_factory: Any) -> None:
    # gpt-4o-audio-preview took gpt-4o*'s text prices: $10 per million output tokens, where OpenAI
    # bills its audio $80, so a budget paid for an eighth of the audio it let through.
    shipped = Path(__file__).parent.parent.parent / "config" / "prices.yaml"
    proxy: Proxy = await proxy_factory(prices_path=shipped)
    token = (await proxy.issue_token(budget_usd=0.02))["token"]
    body = chat(
        "gpt-4o-audio-preview",
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
        max_completion_tokens=500,
    )
    status, _, answer = await post(proxy, token, body)
    assert (status, orjson.loads(answer)["error"]["code"]) == (429, "budget_exceeded")
    assert proxy.upstream.requests == []


async def test_a_processing_tier_billed_above_the_listed_prices_cannot_run_on_a_budget(
    budgeted: Proxy,
) -> None:
    # prices.yaml lists Standard prices; OpenAI bills Priority processing up to twice them: such a
    # request held and settled at Standard prices, so a budget paid for half of what it let through.
    token = (await budgeted.issue_token(budget_usd=1))["token"]
    seen = len(budgeted.upstream.requests)
    for body, path in [
        (chat(service_tier="priority"), "/v1/chat/completions"),
        (b'{"model": "budget-mini", "input": "hi", "service_tier": "priority"}', "/v1/responses"),
        (chat(service_tier="scale"), "/v1/chat/completions"),
        (chat(service_tier=["priority"]), "/v1/chat/completions"),
        (chat()[:-1] + b', "service_\\u0074ier": "priority"}', "/v1/chat/completions"),
        (
            chat()[:-1] + b', "service_tier": "priority", "service_tier": "auto"}',
            "/v1/chat/completions",
        ),
    ]:
        status, _, answer = await post(budgeted, token, body, path)
        assert (status, orjson.loads(answer)["error"]["code"]) == (400, "model_not_priced"), body
    assert len(budgeted.upstream.requests) == seen
    # Tiers billed at the listed prices or below pass.
    for tier in ["auto", "default", "flex", None]:
        status, _, _ = await post(budgeted, token, chat(service_tier=tier))
        assert status == 200, tier
    assert len(budgeted.upstream.requests) == seen + 4


@pytest.mark.parametrize(
    "options",
    [
        b'"stream_options": {"include_usage": false}',
        b'"stream_options": {"include_usage": true, "include_usage": false}',
        b'"stream_options": {"include_usage": false, "include_usage": true}',
        b'"stream_options": {"include_\\u0075sage": false, "include_usage": true}',
        b'"stream": false',
        b'"stream_options": [1, 2]',
        b'"stream_options": [["include_usage", true]]',
    ],
    ids=["false", "false-last", "false-first", "escaped", "stream-twice", "array", "pairs"],
)
async def test_a_stream_that_hides_its_usage_is_refused(budgeted: Proxy, options: bytes) -> None:
    # Without the upstream's usage the stream is priced from its text, and a reasoning model's
    # hidden reasoning tokens, often most of the bill, went unpaid.
    token = (await budgeted.issue_token(budget_usd=1))["token"]
    body = chat(stream=True)[:-1] + b", " + options + b"}"
    status, _, answer = await post(budgeted, token, body)
    assert (status, orjson.loads(answer)["error"]["code"]) == (400, "model_not_priced")
    assert budgeted.upstream.requests == []
    # A stream that asks for its usage itself keeps it.
    body = chat(stream=True, stream_options={"include_usage": True})
    response = await budgeted.client.post("/v1/chat/completions", data=body, headers=bearer(token))
    assert response.status == 200
    assert b'"usage":{' in await response.read()
    assert budgeted.upstream.last.body == body


async def test_a_spent_budget_is_refused_once_through_the_sdk(budgeted: Proxy) -> None:
    issued = await budgeted.issue_token(budget_usd=0.0002)
    status, _, _ = await post(budgeted, issued["token"], chat())
    assert status == 200
    await settled(budgeted, issued["id"], spent_at_least=0.0001)
    seen = len(budgeted.upstream.requests)
    client = openai.AsyncOpenAI(
        base_url=budgeted.base_url + "/v1", api_key=issued["token"], max_retries=3
    )
    attempts = 0

    async def count(request: Any) -> None:
        nonlocal attempts
        attempts += 1

    client._client.event_hooks["request"].append(count)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(
            model="budget-mini", messages=[{"role": "user", "content": "hello"}]
        )
    await client.close()
    assert refused.value.code == "budget_exceeded"
    assert attempts == 1  # x-should-retry: false, though the SDK retries a 429 by default
    assert len(budgeted.upstream.requests) == seen


async def test_a_client_that_hangs_up_mid_stream_pays_for_what_it_received(
    proxy_factory: Any, prices_path: Path, tmp_path: Path
) -> None:
    slow = TestServer(fake_upstream_app(MockSettings(chunks=200, chunk_interval=0.01)))
    await slow.start_server()
    try:
        proxy: Proxy = await proxy_factory(
            prices_path=prices_path, api={"base_url": str(slow.make_url("")).rstrip("/")}
        )
        issued = await proxy.issue_token(budget_usd=1)
        body = chat(stream=True)
        response = await proxy.client.post(
            "/v1/chat/completions", data=body, headers=bearer(issued["token"])
        )
        assert response.status == 200
        received = 0
        async for line in response.content:
            if line.startswith(b"data: {") and b'"content":"' in line:
                received += 1
            if received == 20:
                break
        response.close()
        shown = await settled(proxy, issued["id"], spent_at_least=0.00001)
        # It paid for the chunks the upstream produced before the proxy cancelled it: at least
        # what the client read, far less than the 200 tokens held.
        output_paid = shown["spent_usd"] * 1e9 / OUTPUT_NANOUSD
        assert 20 <= output_paid < 200
        assert shown["reserved_usd"] == 0
    finally:
        await slow.close()


async def test_a_price_raised_while_a_stream_runs_cannot_make_it_overshoot_its_budget(
    proxy_factory: Any, prices_path: Path, tmp_path: Path
) -> None:
    """A request is held and capped at the prices in force when it goes upstream: settled at
    prices reloaded while it ran (here output at ten times the price), it cost ten times its
    hold, far past its token's budget."""
    slow = TestServer(fake_upstream_app(MockSettings(chunks=200, chunk_interval=0.005)))
    await slow.start_server()
    try:
        log = tmp_path / "events.jsonl"
        proxy: Proxy = await proxy_factory(
            prices_path=prices_path,
            file_event_log=log,
            api={"base_url": str(slow.make_url("")).rstrip("/")},
        )
        issued = await proxy.issue_token(budget_usd=0.0005)
        response = await proxy.client.post(
            "/v1/chat/completions", data=chat(stream=True), headers=bearer(issued["token"])
        )
        assert response.status == 200
        await response.content.readline()
        prices_path.write_text(PRICES.replace("output: 4.00", "output: 40.00"))
        proxy.components.prices.reload()
        await response.read()
        shown = await settled(proxy, issued["id"], spent_at_least=0.000001)
        assert shown["spent_usd"] <= 0.0005, shown
        (event,) = await wait_for_lines(log, 1)
        assert event["cost_usd"] == shown["spent_usd"]
    finally:
        await slow.close()


async def test_a_client_that_hangs_up_mid_stream_on_a_reasoning_model_pays_all_it_held(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """A reasoning model thinks before it writes, in tokens billed as output that no stream
    shows: a client that left after the first words paid for those words, while the upstream
    billed all its reasoning (reading one chunk and hanging up made a budget all but free)."""
    slow = TestServer(fake_upstream_app(MockSettings(chunks=200, chunk_interval=0.01)))
    await slow.start_server()
    try:
        log = tmp_path / "events.jsonl"
        shipped = Path(__file__).parent.parent.parent / "config" / "prices.yaml"
        proxy: Proxy = await proxy_factory(
            prices_path=shipped,
            file_event_log=log,
            api={"base_url": str(slow.make_url("")).rstrip("/")},
        )
        issued = await proxy.issue_token(budget_usd=1)
        response = await proxy.client.post(
            "/v1/chat/completions",
            data=chat("o3-mini", stream=True),
            headers=bearer(issued["token"]),
        )
        assert response.status == 200
        held = 1 - float(response.headers["LLM-Proxy-Remaining-Budget-USD"])
        async for line in response.content:
            if line.startswith(b"data: {") and b'"content":"' in line:
                break
        response.close()
        shown = await settled(proxy, issued["id"], spent_at_least=0.000001)
        # All it held: the prompt's bound and o3-mini's own 100,000 output tokens at $4.40 per 1M.
        assert shown["spent_usd"] == pytest.approx(held) and held > 100_000 * 4.4e-6, shown
        (event,) = await wait_for_lines(log, 1)
        assert event["cost_usd"] == shown["spent_usd"]
        assert event["usage"]["completion_tokens"] >= 100_000
    finally:
        await slow.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_hangs_up_before_the_answer_begins_pays_all_it_held(
    proxy_factory: Any, prices_path: Path, tmp_path: Path, stream: bool
) -> None:
    """The upstream got the request and may produce the whole answer, which nobody sees: hanging
    up just before a non-streamed answer (it begins only once complete) must not be free."""
    slow = TestServer(fake_upstream_app(MockSettings(chunks=200, latency=2.0)))
    await slow.start_server()
    try:
        log = tmp_path / "events.jsonl"
        proxy: Proxy = await proxy_factory(
            prices_path=prices_path,
            file_event_log=log,
            api={"base_url": str(slow.make_url("")).rstrip("/")},
        )
        issued = await proxy.issue_token(budget_usd=1)
        # The encoder a budget counts prompts with is built on its first use (~0.4 s, see
        # tokens.py): built here, so that the request is upstream before the client leaves.
        await asyncio.to_thread(tokens.encoding, "o200k_base")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(post(proxy, issued["token"], chat(stream=stream)), 0.3)
        shown = await settled(proxy, issued["id"], spent_at_least=0.00001)
        # All it held: the prompt's bound and the model's 200 output tokens.
        assert shown["spent_usd"] * 1e9 > 200 * OUTPUT_NANOUSD, shown
        (event,) = await wait_for_lines(log, 1)
        # 499, as nginx logs a client that closed first; the usage is what the charge paid for:
        # the prompt and the output the rest buys (the model's 200 tokens, and what the prompt's
        # bound held over its estimate).
        assert (event["status"], event["error"]) == (499, "client_disconnected")
        usage = event["usage"]
        assert usage["source"] == "estimated" and usage["prompt_tokens"] > 0
        assert 200 <= usage["completion_tokens"] < 220
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert event["cost_usd"] == shown["spent_usd"]
    finally:
        await slow.close()


async def test_a_client_that_hangs_up_in_the_middle_of_a_whole_answer_pays_all_it_held(
    proxy_factory: Any, prices_path: Path, tmp_path: Path
) -> None:
    """A non-streamed answer begins once the upstream produced all of it: a client that hangs up
    before its usage arrived left a whole answer unread, whose cost is unknown."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", whole_answer_in_two_parts(200))
    upstream = TestServer(app)
    await upstream.start_server()
    try:
        log = tmp_path / "events.jsonl"
        proxy: Proxy = await proxy_factory(
            prices_path=prices_path,
            file_event_log=log,
            api={"base_url": str(upstream.make_url("")).rstrip("/")},
        )
        issued = await proxy.issue_token(budget_usd=1)
        response = await proxy.client.post(
            "/v1/chat/completions", data=chat(), headers=bearer(issued["token"])
        )
        assert response.status == 200
        await response.content.readexactly(100)
        response.close()
        shown = await settled(proxy, issued["id"])
        assert shown["spent_usd"] * 1e9 > 200 * OUTPUT_NANOUSD, shown
        (event,) = await wait_for_lines(log, 1)
        assert (event["status"], event["error"]) == (200, "client_disconnected")
        assert event["cost_usd"] == shown["spent_usd"]
    finally:
        await upstream.close()


async def test_a_request_that_never_reaches_the_upstream_releases_its_hold(
    proxy_factory: Any, prices_path: Path
) -> None:
    proxy: Proxy = await proxy_factory(
        prices_path=prices_path, api={"base_url": "http://127.0.0.1:9"}
    )
    issued = await proxy.issue_token(budget_usd=1)
    status, _, answer = await post(proxy, issued["token"], chat())
    assert (status, orjson.loads(answer)["error"]["code"]) == (502, "upstream_unavailable")
    shown = await token_state(proxy, issued["id"])
    assert (shown["spent_usd"], shown["reserved_usd"]) == (0, 0)


async def _spend_concurrently(proxies: list[Proxy], token: str, requests: int) -> list[int]:
    async def one(i: int) -> int:
        proxy = proxies[i % len(proxies)]
        response = await proxy.client.post(
            "/v1/chat/completions", data=chat(stream=True), headers=bearer(token)
        )
        await response.read()
        return response.status

    return list(await asyncio.gather(*(one(i) for i in range(requests))))


# One request's most: ~30 prompt tokens (bound) and 200 output tokens.
_ONE_REQUEST_USD = (30 * INPUT_NANOUSD + 200 * OUTPUT_NANOUSD) / 1e9


@pytest.mark.parametrize("where", ["store", "redis"])
async def test_concurrent_streams_on_three_instances_never_overshoot(
    proxy_factory: Any, prices_path: Path, redis_server: RedisServer, where: str
) -> None:
    options: dict[str, Any] = {"prices_path": prices_path}
    if where == "redis":
        options.update(event_bus="redis", redis_url=redis_server.url)
    proxies = [await proxy_factory(**options) for _ in range(3)]
    budget = round(_ONE_REQUEST_USD * 10, 6)
    for _ in range(3):
        issued = await proxies[0].issue_token(budget_usd=budget)
        statuses = await _spend_concurrently(proxies, issued["token"], 64)
        assert statuses.count(200) >= 5
        assert set(statuses) <= {200, 429}
        if where == "redis":
            await _redis_holds_gone(redis_server.url, issued["id"])
        shown = await settled(proxies[0], issued["id"], spent_at_least=budget * 0.5)
        assert shown["spent_usd"] <= budget
        # The clamp is not so cautious that the budget is wasted.
        assert shown["spent_usd"] >= 0.8 * budget, shown


async def _redis_holds_gone(url: str, token_id: str) -> None:
    client = Redis.from_url(url)
    try:
        for _ in range(300):
            if not await client.zcard(f"llm-proxy:holds:{token_id}"):
                await asyncio.sleep(0.2)  # the spend goes to the database right after
                return
            await asyncio.sleep(0.02)
        raise AssertionError("holds in Redis never settled")
    finally:
        await client.aclose()


async def test_with_redis_down_budgeted_tokens_are_refused_and_others_served(
    proxy_factory: Any, prices_path: Path, redis_server: RedisServer
) -> None:
    proxy: Proxy = await proxy_factory(
        prices_path=prices_path, event_bus="redis", redis_url=redis_server.url
    )
    issued = await proxy.issue_token(budget_usd=1)
    unlimited = await proxy.token()
    assert (await post(proxy, issued["token"], chat()))[0] == 200
    redis_server.stop()
    try:
        status, _, answer = await post(proxy, issued["token"], chat())
        assert (status, orjson.loads(answer)["error"]["code"]) == (503, "limits_unavailable")
        assert (await post(proxy, unlimited, chat()))[0] == 200
    finally:
        redis_server.start()


async def test_the_token_sees_its_budget_through_the_token_endpoint(budgeted: Proxy) -> None:
    issued = await budgeted.issue_token(budget_usd=0.01)
    assert (await post(budgeted, issued["token"], chat()))[0] == 200
    shown = await settled(budgeted, issued["id"], spent_at_least=0.0001)
    response = await budgeted.client.get("/v1/llm-proxy/token", headers=bearer(issued["token"]))
    assert response.status == 200
    info = await response.json()
    assert info["budget_usd"] == 0.01
    assert info["spent_usd"] == shown["spent_usd"]
    assert info["remaining_budget_usd"] == pytest.approx(0.01 - shown["spent_usd"])
    left = float(response.headers["LLM-Proxy-Remaining-Budget-USD"])
    assert left == pytest.approx(0.01 - shown["spent_usd"])


@pytest.mark.parametrize("where", ["store", "redis"])
async def test_a_stream_in_progress_shows_its_hold_to_the_operator(
    proxy_factory: Any, prices_path: Path, redis_server: RedisServer, where: str
) -> None:
    slow = TestServer(fake_upstream_app(MockSettings(chunks=200, chunk_interval=0.005)))
    await slow.start_server()
    options: dict[str, Any] = {
        "prices_path": prices_path,
        "api": {"base_url": str(slow.make_url("")).rstrip("/")},
    }
    if where == "redis":  # holds then live in Redis only, never in the token's row
        options.update(event_bus="redis", redis_url=redis_server.url)
    try:
        proxy: Proxy = await proxy_factory(**options)
        issued = await proxy.issue_token(budget_usd=1)
        response = await proxy.client.post(
            "/v1/chat/completions", data=chat(stream=True), headers=bearer(issued["token"])
        )
        assert response.status == 200
        await response.content.readline()
        held = (await token_state(proxy, issued["id"]))["reserved_usd"]
        # The most this request can cost: its prompt bound and the model's 200 output tokens.
        assert 200 * OUTPUT_NANOUSD / 1e9 < held <= 1.1 * _ONE_REQUEST_USD
        status, listed = await proxy.manage("GET", f"/tokens?project_id={issued['project_id']}")
        assert status == 200 and [t["reserved_usd"] for t in listed] == [held]
        await response.read()
        shown = await settled(proxy, issued["id"], spent_at_least=200 * OUTPUT_NANOUSD / 1e9)
        assert shown["spent_usd"] < held
    finally:
        await slow.close()


async def test_a_list_of_many_budgeted_tokens_shows_each_ones_hold_from_redis(
    proxy_factory: Any, prices_path: Path, redis_server: RedisServer
) -> None:
    """An operator listing more budgeted tokens than the server keeps Redis connections sees
    every token's spend and holds as Redis has them, not the database's view of some."""
    slow = TestServer(fake_upstream_app(MockSettings(chunks=200, chunk_interval=0.01)))
    await slow.start_server()
    try:
        proxy: Proxy = await proxy_factory(
            prices_path=prices_path,
            api={"base_url": str(slow.make_url("")).rstrip("/")},
            event_bus="redis",
            redis_url=redis_server.url,
        )
        project_id = await proxy.create_project()
        for _ in range(120):
            await proxy.issue_token(project_id, budget_usd=1)
        issued = await proxy.issue_token(project_id, budget_usd=1)
        response = await proxy.client.post(
            "/v1/chat/completions", data=chat(stream=True), headers=bearer(issued["token"])
        )
        assert response.status == 200
        await response.content.readline()
        held = (await token_state(proxy, issued["id"]))["reserved_usd"]
        assert held > 0
        status, listed = await proxy.manage("GET", f"/tokens?project_id={project_id}")
        assert status == 200 and len(listed) == 121
        assert [t["reserved_usd"] for t in listed if t["id"] == issued["id"]] == [held]
        response.close()
    finally:
        await slow.close()


@pytest.mark.parametrize("where", ["store", "redis"])
async def test_an_admission_cancelled_while_holding_gives_the_hold_back(
    proxy_factory: Any, prices_path: Path, redis_server: RedisServer, where: str
) -> None:
    """A client that hangs up cancels its request wherever it is, the budget hold included: the
    hold the ledger took regardless returns at once, not after an hour."""
    options: dict[str, Any] = {"prices_path": prices_path}
    if where == "redis":
        options.update(event_bus="redis", redis_url=redis_server.url)
    proxy: Proxy = await proxy_factory(**options)
    authority = proxy.components.authority
    issued = await proxy.issue_token(budget_usd=1)
    grant = await authority.check(f"Bearer {issued['token']}")
    plan = plan_cost(
        "/v1/chat/completions", {"model": ["budget-mini"]}, load_prices(prices_path), 30
    )
    assert plan is not None
    for steps in range(12):
        admitting = asyncio.ensure_future(authority.admit(grant, plan))
        for _ in range(steps):
            await asyncio.sleep(0)
        admitting.cancel()
        try:
            admission = await admitting
        except asyncio.CancelledError:
            continue
        await authority.release(admission)  # admitted before the cancel: the handler's part
    shown = await settled(proxy, issued["id"])
    assert (shown["spent_usd"], shown["reserved_usd"]) == (0, 0)
    # And the store still takes holds.
    assert (await post(proxy, issued["token"], chat()))[0] == 200


@pytest.mark.parametrize("build_in", ["thread", "process"])
@pytest.mark.parametrize("where", ["store", "redis"])
async def test_the_request_sent_right_after_an_answer_finds_its_cost_settled(
    proxy_factory: Any, prices_path: Path, redis_server: RedisServer, where: str, build_in: str
) -> None:
    """An uncapped request holds all the budget affords until its answer settles; the client's
    next request, sent as soon as it read the answer, is admitted on what that answer cost."""
    options: dict[str, Any] = {"prices_path": prices_path, "event_build_in": build_in}
    if where == "redis":
        options.update(event_bus="redis", redis_url=redis_server.url)
    proxy: Proxy = await proxy_factory(**options)
    issued = await proxy.issue_token(budget_usd=0.01)  # ~2,500 output tokens; an answer is 200
    answers = []
    for _ in range(5):
        status, _, body = await post(proxy, issued["token"], chat("uncapped-model"))
        assert status == 200, body
        answers.append(orjson.loads(body)["usage"])
        # Its cap is what the budget affords once the answers before it were paid for (~1,900
        # tokens at first, the prompt's bound taken; ~200 fewer after each answer), not the crumbs
        # left beside a hold not settled yet.
        cap = orjson.loads(proxy.upstream.last.body)["max_completion_tokens"]
        assert cap > 1000
    assert [used["completion_tokens"] for used in answers] == [200] * 5
    cost = sum(u["prompt_tokens"] * INPUT_NANOUSD + 200 * OUTPUT_NANOUSD for u in answers) / 1e9
    shown = await settled(proxy, issued["id"], spent_at_least=cost * 0.999)
    assert shown["spent_usd"] == pytest.approx(cost)


async def test_requests_sharing_a_request_id_each_settle_their_own_hold(budgeted: Proxy) -> None:
    """A client may send one X-Request-ID twice (its own retry): each request holds and settles
    on its own, and none is left holding the budget."""
    issued = await budgeted.issue_token(budget_usd=0.01)
    headers = {**bearer(issued["token"]), "X-Request-ID": "client-retry-1"}

    async def one() -> int:
        body = chat(max_completion_tokens=5)
        response = await budgeted.client.post("/v1/chat/completions", data=body, headers=headers)
        await response.read()
        return response.status

    assert await asyncio.gather(*(one() for _ in range(8))) == [200] * 8
    shown = await settled(budgeted, issued["id"])
    assert shown["spent_usd"] > 0


async def test_after_a_redis_restart_limited_tokens_are_served_at_once(
    proxy_factory: Any, prices_path: Path, durable_redis: RedisServer
) -> None:
    """The pooled connections to the Redis that went away are dead; the first requests after it
    came back must not be refused for them (a reviewer saw 195 of 200 get 503). A Redis that
    keeps its data, as production runs it: one that lost it refuses limited tokens a while."""
    redis_server = durable_redis
    proxy: Proxy = await proxy_factory(
        prices_path=prices_path, event_bus="redis", redis_url=redis_server.url
    )
    budgeted = (await proxy.issue_token(budget_usd=100))["token"]
    rated = (await proxy.issue_token(rpm=1000))["token"]

    async def burst() -> list[int]:
        answers = await asyncio.gather(
            *(post(proxy, token, chat()) for token in (budgeted, rated) for _ in range(30))
        )
        return [status for status, _, _ in answers]

    assert await burst() == [200] * 60  # many pooled connections
    redis_server.stop()
    redis_server.start()
    await asyncio.sleep(0.5)
    assert await burst() == [200] * 60


async def test_a_client_that_hangs_up_before_its_request_went_upstream_pays_nothing(
    proxy_factory: Any, prices_path: Path
) -> None:
    """The proxy was still connecting (a TLS handshake that never ends): nothing reached the
    upstream, so the hold is released (SPEC §6), unlike a hang-up after the request went up."""

    async with silent_server() as port:
        proxy: Proxy = await proxy_factory(
            prices_path=prices_path, api={"base_url": f"https://127.0.0.1:{port}"}
        )
        issued = await proxy.issue_token(budget_usd=1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(post(proxy, issued["token"], chat()), 0.3)
        shown = await settled(proxy, issued["id"])
        assert (shown["spent_usd"], shown["reserved_usd"]) == (0, 0)


async def test_a_token_sent_as_the_request_id_is_masked_in_the_event_and_still_settles(
    proxy_factory: Any, prices_path: Path, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(prices_path=prices_path, file_event_log=log)
    issued = await proxy.issue_token(budget_usd=1)
    token = issued["token"]
    # A client that fills X-Request-ID from the wrong variable.
    headers = {**bearer(token), "X-Request-ID": token}
    response = await proxy.client.post("/v1/chat/completions", data=chat(), headers=headers)
    assert response.status == 200
    assert response.headers["LLM-Proxy-Request-ID"] == token  # its own, back to it alone
    (event,) = await wait_for_lines(log, 1)
    assert event["request_id"].startswith("sk-") and "…" in event["request_id"]
    assert token not in log.read_text()
    # The hold is settled by the event all the same: its cost spent, nothing left held.
    shown = await settled(proxy, issued["id"], spent_at_least=event["cost_usd"])
    assert shown["spent_usd"] > 0
