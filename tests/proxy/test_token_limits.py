"""Tokens with limits: the models they may use, and what every answer tells a client is left."""

from __future__ import annotations

import asyncio
import gzip
import io
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis
from structlog.testing import capture_logs

from llm_proxy.control.operations import MAX_COUNT
from llm_proxy.tools.mock_upstream import MockSettings
from tests.conftest import Proxy
from tests.events.events_support import RedisServer
from tests.fakes import fake_upstream_app, whole_answer_in_two_parts
from tests.raw_servers import silent_server
from tests.sqlite_writes import write_sqlite


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def chat(model: str, padding: int = 0) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi" + " " * padding}]}
    return orjson.dumps(body)


async def post(proxy: Proxy, token: str, body: bytes, **kwargs: Any) -> tuple[int, Any, Any]:
    response = await proxy.client.post(
        "/v1/chat/completions", data=body, headers=bearer(token), **kwargs
    )
    return response.status, response.headers, await response.json()


@pytest.fixture
async def limited(proxy: Proxy) -> dict[str, Any]:
    return await proxy.issue_token(allowed_models=["gpt-4o-mini*", "o4-mini"], max_requests=5)


async def test_an_allowed_model_passes_and_others_never_reach_the_upstream(
    proxy: Proxy, limited: dict[str, Any]
) -> None:
    token = limited["token"]
    assert (await post(proxy, token, chat("gpt-4o-mini-2024-07-18")))[0] == 200
    assert (await post(proxy, token, chat("o4-mini")))[0] == 200
    seen = len(proxy.upstream.requests)
    for body in (
        chat("gpt-4o"),
        chat("o4-mini-high"),
        b'{"messages": []}',  # no model: the upstream would pick one
        b'{"model": 4}',
        b'{"model": "gpt-4o-mini", "model": "gpt-4o"}',  # a repeated key: either may be read
    ):
        status, headers, answer = await post(proxy, token, body)
        assert (status, answer["error"]["code"]) == (403, "model_not_allowed"), body
        assert headers["x-should-retry"] == "false"
    assert len(proxy.upstream.requests) == seen
    # Refused before the upstream: the requests were not counted against max_requests.
    _, shown = await proxy.manage("GET", f"/tokens/{limited['id']}")
    assert shown["request_count"] == 2


async def test_large_and_chunked_bodies_are_checked_before_any_byte_goes_upstream(
    proxy: Proxy, limited: dict[str, Any]
) -> None:
    token = limited["token"]
    big = chat("gpt-4o", padding=3_000_000)  # past the small-body path: spooled, then checked

    async def chunks() -> Any:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    seen = len(proxy.upstream.requests)
    assert (await post(proxy, token, io.BytesIO(big)))[0] == 403  # type: ignore[arg-type]
    assert (await post(proxy, token, chunks()))[0] == 403  # type: ignore[arg-type]
    assert len(proxy.upstream.requests) == seen
    allowed = chat("gpt-4o-mini", padding=3_000_000)
    assert (await post(proxy, token, io.BytesIO(allowed)))[0] == 200  # type: ignore[arg-type]
    assert proxy.upstream.requests[-1].body == allowed  # unchanged, byte for byte


async def test_forms_are_checked_by_their_model_field_and_requests_without_a_body_pass(
    proxy: Proxy, limited: dict[str, Any]
) -> None:
    token = limited["token"]
    for model, status in (("gpt-4o-mini-transcribe", 200), ("whisper-1", 403)):
        form = aiohttp.FormData()
        form.add_field("model", model)
        form.add_field("file", b"RIFF", filename="a.wav")
        response = await proxy.client.post(
            "/v1/files/upload", data=form, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status == status
    response = await proxy.client.get("/v1/models", headers=bearer(token))
    assert response.status == 200


@pytest.mark.parametrize(
    "tools",
    [
        b'[{"type": "image_generation"}]',  # the upstream would pick the image model
        b'[{"type": "image_generation", "model": "gpt-image-1"}]',
        b'[{"type": "image_generation", "model": "gpt-image-1", "model": "gpt-4o-mini"}]',
        b'[{"type": "image_generation", "type": "function", "model": "gpt-image-1"}]',
        b'[{"type": "function", "type": "image_generation"}]',
        b'[{"type": "image\\u005fgeneration", "model": "gpt-image-1"}]',
        b'[{"type": "function", "name": "f", "parameters": {"x": "%s"}},'
        b' {"type": "image_generation", "model": "gpt-image-1"}]' % (b"y" * 100_000),
    ],
    ids=["unnamed", "named", "repeated-model", "repeated-type", "late-type", "escaped", "spooled"],
)
async def test_a_tool_that_runs_a_model_of_its_own_must_run_an_allowed_one(
    proxy: Proxy, tools: bytes
) -> None:
    # The Responses API's image_generation tool runs gpt-image-1 (or the model it names) besides
    # the request's own model, which alone was checked.
    token = await proxy.token(allowed_models=["gpt-4o-mini*"])
    body = b'{"model": "gpt-4o-mini", "input": "draw a cat", "tools": %s}' % tools
    response = await proxy.client.post("/v1/responses", data=body, headers=bearer(token))
    assert (response.status, (await response.json())["error"]["code"]) == (
        403,
        "model_not_allowed",
    )
    assert proxy.upstream.requests == []
    # A token that allows the tool's model too, or tools that run none, pass.
    image_token = await proxy.token(allowed_models=["gpt-4o-mini*", "gpt-image-1*"])
    named = b'{"type": "image_generation", "model": "gpt-image-1"}'
    function = b'{"type": "function", "name": "image_generation", "parameters": {}}'
    for passing, tools in ((image_token, b"[%s]" % named), (token, b"[%s]" % function)):
        body = b'{"model": "gpt-4o-mini", "input": "draw a cat", "tools": %s}' % tools
        response = await proxy.client.post("/v1/responses", data=body, headers=bearer(passing))
        assert response.status == 200
        assert proxy.upstream.last.body == body


async def test_tools_nested_deeper_than_the_parser_reads_are_refused_not_failed(
    proxy: Proxy,
) -> None:
    # Within the body reader's depth, past the recursion of the parser that reads the tools: a
    # 500 of the proxy's own before.
    token = await proxy.token(allowed_models=["gpt-4o-mini*"])
    tools = b"[" * 1020 + b'"image_generation"' + b"]" * 1020
    body = b'{"model": "gpt-4o-mini", "input": "draw a cat", "tools": %s}' % tools
    response = await proxy.client.post("/v1/responses", data=body, headers=bearer(token))
    assert response.status == 400, await response.text()
    assert proxy.upstream.requests == []


async def test_a_model_limited_token_cannot_delete_a_model_it_may_not_use(proxy: Proxy) -> None:
    # DELETE /v1/models/{id} deletes a fine-tuned model of the project's organisation: a token
    # limited to some models deleted any other one.
    token = await proxy.token(allowed_models=["ft:gpt-4o-mini:acme:*"])
    for target in ("/v1/models/ft:gpt-4o:acme::abc", "/v1/models/ft%3Agpt-4o%3Aacme%3A%3Aabc"):
        response = await proxy.client.delete(target, headers=bearer(token))
        assert (response.status, (await response.json())["error"]["code"]) == (
            403,
            "model_not_allowed",
        )
    assert proxy.upstream.requests == []
    # Reading about any model is no use of it; deleting an allowed one reaches the upstream.
    await proxy.client.get("/v1/models/gpt-4o", headers=bearer(token))
    assert proxy.upstream.last.path_qs == "/v1/models/gpt-4o"
    await proxy.client.delete("/v1/models/ft:gpt-4o-mini:acme::xyz", headers=bearer(token))
    assert proxy.upstream.last.method == "DELETE"


async def test_every_answer_tells_a_limited_token_what_is_left(proxy: Proxy) -> None:
    issued = await proxy.issue_token(max_requests=3)
    left = []
    for _ in range(3):
        response = await proxy.client.get("/v1/models", headers=bearer(issued["token"]))
        assert response.status == 200
        left.append(response.headers["LLM-Proxy-Remaining-Requests"])
        assert response.headers["LLM-Proxy-Token-Expires-At"] == issued["expires_at"]
    assert left == ["2", "1", "0"]
    response = await proxy.client.get("/v1/models", headers=bearer(issued["token"]))
    assert response.status == 429


async def test_a_token_without_limits_gets_no_limit_headers(proxy: Proxy) -> None:
    token = await proxy.token()
    response = await proxy.client.get("/v1/models", headers=bearer(token))
    assert response.status == 200
    assert not [name for name in response.headers if name.lower().startswith("llm-proxy-rem")]
    assert "LLM-Proxy-Token-Expires-At" not in response.headers


async def test_upstream_rate_limit_headers_pass_through_untouched(
    proxy: Proxy, limited: dict[str, Any]
) -> None:
    status, headers, _ = await post(proxy, limited["token"], chat("gpt-4o-mini"))
    assert status == 200
    assert headers.getall("x-ratelimit-remaining-requests") == ["499"]
    assert headers["LLM-Proxy-Remaining-Requests"] == "4"


@pytest.fixture
def proxy_database_url(database_url: str) -> str:
    """Every test here runs on SQLite and on a real PostgreSQL."""
    return database_url


async def test_rpm_admits_that_many_a_minute_and_says_when_to_retry(proxy: Proxy) -> None:
    issued = await proxy.issue_token(rpm=3, allowed_models=["gpt-4o-mini"])
    token = issued["token"]
    # A request refused before the upstream gives its slot back.
    assert (await post(proxy, token, chat("gpt-4o")))[0] == 403
    statuses = [(await post(proxy, token, chat("gpt-4o-mini")))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    status, headers, answer = await post(proxy, token, chat("gpt-4o-mini"))
    assert (status, answer["error"]["code"]) == (429, "rate_limited")
    assert 55 <= int(headers["Retry-After"]) <= 60
    assert "x-should-retry" not in headers  # transient: SDKs retry it after Retry-After
    assert (await proxy.client.get("/v1/models", headers=bearer(token))).status == 429


async def test_the_largest_limits_the_api_takes_admit_requests_on_every_backend(
    proxy: Proxy,
) -> None:
    """A limit set to the most the management API accepts, at issue or by a change, is a limit
    that admits requests, not one the database cannot compute with."""
    largest = {"max_requests": MAX_COUNT, "rpm": MAX_COUNT, "tpm": MAX_COUNT}
    issued = await proxy.issue_token(**largest)
    assert (await proxy.client.get("/v1/models", headers=bearer(issued["token"]))).status == 200
    changed = await proxy.issue_token(rpm=3)
    assert (await proxy.client.get("/v1/models", headers=bearer(changed["token"]))).status == 200
    status, _ = await proxy.manage("PATCH", f"/tokens/{changed['id']}", {"rpm": 2**31})
    assert status == 200
    response = await proxy.client.get("/v1/models", headers=bearer(changed["token"]))
    assert response.status == 200, await response.text()


async def test_rate_limit_is_checked_before_the_quota_and_gives_back_on_refusal(
    proxy: Proxy,
) -> None:
    issued = await proxy.issue_token(rpm=2, max_requests=1)
    token = issued["token"]
    assert (await proxy.client.get("/v1/models", headers=bearer(token))).status == 200
    response = await proxy.client.get("/v1/models", headers=bearer(token))
    assert (response.status, (await response.json())["error"]["code"]) == (429, "quota_exceeded")
    # The quota refusal gave its rpm slot back: the window still holds one request.
    status, _ = await proxy.manage("PATCH", f"/tokens/{issued['id']}", {"max_requests": 3})
    assert status == 200
    assert (await proxy.client.get("/v1/models", headers=bearer(token))).status == 200
    response = await proxy.client.get("/v1/models", headers=bearer(token))
    assert (response.status, (await response.json())["error"]["code"]) == (429, "rate_limited")


async def test_a_used_up_token_whose_reload_fails_gets_its_rpm_slot_back(
    proxy: Proxy, database_url: str
) -> None:
    """A token cached as used up takes its rpm slot, then asks the database whether a place came
    back; when that reload fails (the projects table gone a moment), the 503 gives the slot
    back, in the background (retried while the store is away): the token is not a request short
    for the rest of the minute once its quota is raised."""
    issued = await proxy.issue_token(rpm=2, max_requests=1)

    async def answer() -> tuple[int, str | None]:
        response = await proxy.client.get("/v1/models", headers=bearer(issued["token"]))
        if response.status == 200:
            return 200, None
        return response.status, (await response.json())["error"]["code"]

    assert await answer() == (200, None)
    assert await answer() == (429, "quota_exceeded")  # the token is now cached as used up
    await _rename_table(database_url, "projects", "projects_gone")
    try:
        assert await answer() == (503, "limits_unavailable")
    finally:
        await _rename_table(database_url, "projects_gone", "projects")
    status, _ = await proxy.manage("PATCH", f"/tokens/{issued['id']}", {"max_requests": 3})
    assert status == 200
    deadline = time.monotonic() + 10
    while (answered := await answer()) != (200, None):  # once the slot is back
        assert answered == (429, "rate_limited"), answered
        assert time.monotonic() < deadline, "the refused request kept its slot"
        await asyncio.sleep(0.2)
    assert await answer() == (429, "rate_limited")  # the window holds the two admitted


async def _rename_table(database_url: str, table: str, name: str) -> None:
    sql = f"ALTER TABLE {table} RENAME TO {name}"
    if database_url.startswith("sqlite:///"):
        await write_sqlite(Path(database_url.removeprefix("sqlite:///")), sql)
        return
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def test_with_redis_a_burst_of_rate_limited_requests_waits_for_connections_not_refused(
    proxy_factory: Any, redis_server: RedisServer
) -> None:
    """More rate-limited requests at once than the server keeps Redis connections are each
    admitted, none refused limits_unavailable while Redis is up."""
    proxy: Proxy = await proxy_factory(event_bus="redis", redis_url=redis_server.url)
    project_id = await proxy.create_project()
    tokens = [(await proxy.issue_token(project_id, rpm=1000))["token"] for _ in range(10)]
    # A session of its own without the client's cap on connections: all of them at once.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as burst:

        async def one(n: int) -> int:
            async with burst.get(
                f"{proxy.base_url}/v1/models", headers=bearer(tokens[n % len(tokens)])
            ) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(n) for n in range(300)))
    assert statuses.count(200) == 300, sorted(set(statuses))


async def test_with_redis_the_rpm_window_lives_there_and_its_loss_refuses_only_limited_tokens(
    proxy_factory: Any, redis_server: RedisServer
) -> None:
    proxy: Proxy = await proxy_factory(event_bus="redis", redis_url=redis_server.url)
    limited = await proxy.issue_token(rpm=2)
    unlimited = await proxy.token()
    statuses = [
        (await proxy.client.get("/v1/models", headers=bearer(limited["token"]))).status
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
    client = Redis.from_url(redis_server.url)
    try:
        assert await client.zcard(f"llm-proxy:rpm:{limited['id']}") == 2
    finally:
        await client.aclose()

    redis_server.stop()
    response = await proxy.client.get("/v1/models", headers=bearer(limited["token"]))
    assert (response.status, (await response.json())["error"]["code"]) == (
        503,
        "limits_unavailable",
    )
    # A token without limits needs nothing from Redis.
    assert (await proxy.client.get("/v1/models", headers=bearer(unlimited))).status == 200
    redis_server.start()


async def _back_to_back(proxy: Proxy, token: str, count: int) -> list[aiohttp.ClientResponse]:
    """``count`` requests, each sent as soon as the previous answer was read."""
    responses = []
    for _ in range(count):
        response = await proxy.client.post(
            "/v1/chat/completions", data=chat("gpt-4o-mini"), headers=bearer(token)
        )
        await response.read()
        responses.append(response)
    return responses


async def test_tpm_refuses_while_the_settled_tokens_fill_the_window(proxy: Proxy) -> None:
    issued = await proxy.issue_token(tpm=5)  # one chat completion of the fake upstream is more
    first, response = await _back_to_back(proxy, issued["token"], 2)
    assert first.status == 200
    assert (await response.json())["error"]["code"] == "rate_limited"
    assert 55 <= int(response.headers["Retry-After"]) <= 60
    assert "x-should-retry" not in response.headers


async def _in_pieces(body: bytes) -> Any:
    for at in range(0, len(body), 1000):
        yield body[at : at + 1000]


@pytest.mark.parametrize("framing", ["whole", "chunked", "large"])
@pytest.mark.parametrize("models", [{}, {"allowed_models": ["gpt-4o-mini*"]}], ids=["tpm", "both"])
async def test_a_stream_that_hides_its_usage_cannot_slip_past_a_tpm_window(
    proxy: Proxy, framing: str, models: dict[str, Any]
) -> None:
    # Counted from its text, a stream's tokens were the part of it the capture kept, without a
    # reasoning model's hidden tokens: a client that turned include_usage off had answers of
    # thousands of tokens drawn from its tpm window as a few dozen.
    token = await proxy.token(tpm=1000, **models)
    padding = 70_000 if framing == "large" else 0
    for options in (b'"stream_options":{"include_usage":false}', b'"stream_options":"x"'):
        body = chat("gpt-4o-mini", padding)[:-1] + b',"stream":true,' + options + b"}"
        data = _in_pieces(body) if framing == "chunked" else body
        status, _, answer = await post(proxy, token, data)
        assert (status, answer["error"]["code"]) == (400, "param_not_allowed")
    compressed = {**bearer(token), "Content-Encoding": "gzip"}
    body = gzip.compress(chat("gpt-4o-mini", padding)[:-1] + b',"stream":true}')
    refused = await proxy.client.post("/v1/chat/completions", data=body, headers=compressed)
    assert refused.status == 415
    assert proxy.upstream.requests == []
    # A stream that leaves its usage to the proxy, or asks for it, is served.
    for options in (b'"n":1', b'"stream_options":{"include_usage":true}'):
        body = chat("gpt-4o-mini", padding)[:-1] + b',"stream":true,' + options + b"}"
        data = _in_pieces(body) if framing == "chunked" else body
        response = await proxy.client.post("/v1/chat/completions", data=data, headers=bearer(token))
        assert response.status == 200
        await response.read()
    assert all(b'"include_usage":true' in seen.body for seen in proxy.upstream.requests)


@pytest.mark.parametrize("build_in", ["thread", "process"])
async def test_tpm_counts_each_answer_before_the_next_request_sent_right_after_it(
    proxy_factory: Any, build_in: str
) -> None:
    proxy: Proxy = await proxy_factory(event_build_in=build_in)
    issued = await proxy.issue_token(tpm=20)
    responses = await _back_to_back(proxy, issued["token"], 12)
    used = (await responses[0].json())["usage"]["total_tokens"]
    admitted = -(-20 // used)  # admitted while the window holds fewer than 20 tokens
    assert admitted < 12
    assert [r.status for r in responses] == [200] * admitted + [429] * (12 - admitted)


async def _full_tpm_window_in_redis(
    proxy_factory: Any, redis_server: RedisServer
) -> tuple[Proxy, dict[str, Any]]:
    """A proxy whose tpm windows live in Redis, and a token of tpm 5 whose window is full."""
    proxy: Proxy = await proxy_factory(event_bus="redis", redis_url=redis_server.url)
    issued = await proxy.issue_token(tpm=5)
    first, response = await _back_to_back(proxy, issued["token"], 2)
    assert first.status == 200
    assert (await response.json())["error"]["code"] == "rate_limited"
    return proxy, issued


async def test_with_redis_the_tpm_window_lives_there(
    proxy_factory: Any, redis_server: RedisServer
) -> None:
    _, issued = await _full_tpm_window_in_redis(proxy_factory, redis_server)
    client = Redis.from_url(redis_server.url)
    try:
        assert await client.zcard(f"llm-proxy:tpm:{issued['id']}") >= 1
    finally:
        await client.aclose()


async def test_a_tpm_window_redis_lost_with_its_data_is_not_trusted_until_its_minute_is_over(
    proxy_factory: Any, redis_server: RedisServer
) -> None:
    """A Redis restarted without persistence (or flushed) comes back without the tokens settled
    in the last minute: a full tpm window must not look empty (SPEC §11), so its token is refused
    limits_unavailable, with Retry-After, until that minute is over."""
    proxy, issued = await _full_tpm_window_in_redis(proxy_factory, redis_server)
    client = Redis.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    with capture_logs() as logs:
        status, headers, answer = await post(proxy, issued["token"], chat("gpt-4o-mini"))
    assert (status, answer["error"]["code"]) == (503, "limits_unavailable")
    assert 0 < int(headers["Retry-After"]) <= 60
    # The operator is told why, not only shown 503s.
    (said,) = [line for line in logs if line["event"] == "limits.redis_lost_its_data"]
    assert said["limit"] == "tpm" and 0 < said["trusted_again_in_seconds"] <= 60


async def test_requests_given_back_after_an_outage_leave_the_quota_open(
    proxy_factory: Any, unused_tcp_port: int
) -> None:
    """Requests that held the last places while the upstream was down are given back; those
    refused meanwhile must not leave the token looking used up (a reviewer saw it refused for
    as long as the client kept retrying)."""
    proxy: Proxy = await proxy_factory(api={"base_url": f"http://127.0.0.1:{unused_tcp_port}"})
    issued = await proxy.issue_token(max_requests=5)
    token = issued["token"]
    statuses = await asyncio.gather(*(post(proxy, token, chat("gpt-4o-mini")) for _ in range(20)))
    codes = sorted({(s, a["error"]["code"]) for s, _, a in statuses})
    assert (502, "upstream_unavailable") in codes and (429, "quota_exceeded") in codes, codes
    _, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (shown["request_count"], shown["status"]) == (0, "active")

    upstream = TestServer(fake_upstream_app(), port=unused_tcp_port)
    await upstream.start_server()
    try:
        answers = [(await post(proxy, token, chat("gpt-4o-mini")))[0] for _ in range(6)]
    finally:
        await upstream.close()
    assert answers == [200] * 5 + [429]


async def test_without_events_a_tpm_or_budget_token_is_refused_not_left_unlimited(
    proxy_factory: Any,
) -> None:
    """LLM_PROXY_EVENT_BUS=none builds no events, so no answer's tokens or cost are ever settled:
    a tpm window would stay empty and a budget never be spent (a reviewer saw a tpm=5 token
    admitted every time). Such tokens are refused as when their store is away; others pass."""
    proxy: Proxy = await proxy_factory(event_bus="none")
    tpm = await proxy.issue_token(tpm=5)
    answers = [await post(proxy, tpm["token"], chat("gpt-4o-mini")) for _ in range(3)]
    codes = [(s, a.get("error", {}).get("code")) for s, _, a in answers]
    assert codes == [(503, "limits_unavailable")] * 3
    budgeted = await proxy.issue_token(budget_usd=1)
    status, _, answer = await post(proxy, budgeted["token"], chat("gpt-4o-mini"))
    assert (status, answer["error"]["code"]) == (503, "limits_unavailable")
    _, shown = await proxy.manage("GET", f"/tokens/{budgeted['id']}")
    assert shown["reserved_usd"] == 0
    others = await proxy.issue_token(rpm=10, max_requests=5)
    assert (await post(proxy, others["token"], chat("gpt-4o-mini")))[0] == 200
    assert len(proxy.upstream.requests) == 1


async def test_a_tpm_token_whose_client_leaves_before_the_answer_counts_what_it_may_have_used(
    proxy_factory: Any,
) -> None:
    """The request went upstream whole and the client hung up before the answer began: the
    upstream may produce all of it, unseen. It counted its prompt alone, so a client that always
    hung up had the upstream write without end on a tpm token (a reviewer saw it); it now counts
    its output cap too, as a budget pays all it held."""
    status, headers, answer = await _hang_up_before_the_answer_then_ask_again(
        proxy_factory, {"max_tokens": 1000}
    )
    assert (status, answer["error"]["code"]) == (429, "rate_limited")
    assert 1 <= int(headers["Retry-After"]) <= 60


async def _hang_up_before_the_answer_then_ask_again(
    proxy_factory: Any, cap: dict[str, int]
) -> tuple[int, Any, Any]:
    """A tpm=1000 token's chat request (with ``cap``) to an upstream that never answers, left by
    its client after 0.5 s; then the same request again: its answer."""
    async with silent_server() as port:
        proxy: Proxy = await proxy_factory(api={"base_url": f"http://127.0.0.1:{port}"})
        issued = await proxy.issue_token(tpm=1000)
        body = orjson.dumps(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **cap}
        )
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(post(proxy, issued["token"], body), 0.5)
        return await asyncio.wait_for(post(proxy, issued["token"], body), 10)


async def test_a_cap_in_a_field_the_endpoint_ignores_does_not_bound_what_a_tpm_window_counts(
    proxy_factory: Any,
) -> None:
    """Chat completions ignore max_output_tokens (a Responses field): a request giving it alone,
    whose client hung up before the answer, may still have used the model's own cap (16,384 for
    gpt-4o-mini), not one token."""
    status, _, answer = await _hang_up_before_the_answer_then_ask_again(
        proxy_factory, {"max_output_tokens": 1}
    )
    assert (status, answer["error"]["code"]) == (429, "rate_limited")


async def test_a_tpm_token_whose_client_leaves_in_the_middle_of_a_whole_answer_counts_what_it_may_have_used(
    proxy_factory: Any,
) -> None:
    """A non-streamed answer begins once the upstream produced all of it: a client that hangs up
    before its usage arrived left a whole answer unread. Counted from the part it read, a tpm
    token's client that always hung up early had the upstream write without end."""

    app = web.Application()
    app.router.add_post("/v1/chat/completions", whole_answer_in_two_parts(900))
    upstream = TestServer(app)
    await upstream.start_server()
    try:
        proxy: Proxy = await proxy_factory(api={"base_url": str(upstream.make_url("")).rstrip("/")})
        issued = await proxy.issue_token(tpm=1000)
        body = orjson.dumps(
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1000,
            }
        )
        response = await proxy.client.post(
            "/v1/chat/completions", data=body, headers=bearer(issued["token"])
        )
        assert response.status == 200
        await response.content.readexactly(100)
        response.close()
        status, headers, answer = await asyncio.wait_for(post(proxy, issued["token"], body), 10)
    finally:
        await upstream.close()
    assert (status, answer["error"]["code"]) == (429, "rate_limited")
    assert 1 <= int(headers["Retry-After"]) <= 60


async def test_a_tpm_token_whose_client_leaves_a_reasoning_stream_early_counts_what_it_may_have_used(
    proxy_factory: Any,
) -> None:
    """A reasoning model (o4-mini) thinks in hidden tokens before the first word its stream shows:
    counted from the words read, a client that hung up after the first one had the upstream
    think without end on a tpm token."""
    slow = TestServer(fake_upstream_app(MockSettings(chunks=200, chunk_interval=0.01)))
    await slow.start_server()
    try:
        proxy: Proxy = await proxy_factory(api={"base_url": str(slow.make_url("")).rstrip("/")})
        issued = await proxy.issue_token(tpm=1000)
        body = orjson.dumps(
            {
                "model": "o4-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "max_completion_tokens": 1000,
                "stream": True,
            }
        )
        response = await proxy.client.post(
            "/v1/chat/completions", data=body, headers=bearer(issued["token"])
        )
        assert response.status == 200
        async for line in response.content:
            if b'"content":"' in line:
                break
        response.close()
        status, headers, answer = await asyncio.wait_for(post(proxy, issued["token"], body), 10)
    finally:
        await slow.close()
    assert (status, answer["error"]["code"]) == (429, "rate_limited")
    assert 1 <= int(headers["Retry-After"]) <= 60


async def _sent_across(
    proxy: Proxy, token: str, body: bytes, change: tuple[str, str, Any], *, chunked: bool
) -> aiohttp.ClientResponse:
    """Send ``body`` slowly: its head and first bytes, then the management ``change``, then the
    rest (a slow upload that a change overtakes)."""
    go = asyncio.Event()

    async def slow_upload() -> Any:
        yield body[:10]
        await go.wait()
        yield body[10:]

    headers = bearer(token)
    if not chunked:
        headers["Content-Length"] = str(len(body))  # read whole before admission
    sending = asyncio.create_task(
        proxy.client.post("/v1/chat/completions", data=slow_upload(), headers=headers)
    )
    await asyncio.sleep(0.3)  # the head is in and checked; the body waits for the change
    method, path, fields = change
    status, shown = await proxy.manage(method, path, fields)
    assert status == 200, shown
    go.set()
    return await sending


CHANGES = {
    # name: (limits at issue, requests made first, the change, the answer after it)
    "models-tightened": ({"allowed_models": ["gpt-4o*"]}, 0, {"allowed_models": ["o4-mini"]}, 403),
    "models-loosened": ({"allowed_models": ["o4-mini"]}, 0, {"allowed_models": ["gpt-4o*"]}, 200),
    "models-set": ({"max_requests": 9}, 0, {"allowed_models": ["o4-mini"]}, 403),
    "models-lifted": ({"allowed_models": ["o4-mini"]}, 0, {"allowed_models": None}, 200),
    "quota-lowered": ({"max_requests": 5}, 2, {"max_requests": 2}, 429),
    "quota-raised": ({"max_requests": 2}, 2, {"max_requests": 3}, 200),
    "quota-set": ({"allowed_models": ["gpt-4o*"]}, 2, {"max_requests": 2}, 429),
    "rpm-lowered": ({"rpm": 5}, 2, {"rpm": 2}, 429),
    "rpm-raised": ({"rpm": 2}, 2, {"rpm": 3}, 200),
    "budget-lowered": ({"budget_usd": 1}, 0, {"budget_usd": 0.000001}, 429),
    "budget-raised": ({"budget_usd": 0.000001}, 0, {"budget_usd": 1}, 200),
    # Its body was not priced: sent again (as the SDKs do with a 503), it is.
    "budget-set": ({"max_requests": 9}, 0, {"budget_usd": 1}, 503),
}
CODES = {
    403: ("model_not_allowed",),
    429: ("quota_exceeded", "rate_limited", "budget_exceeded"),
    503: ("limits_unavailable",),
}


@pytest.mark.parametrize(
    ("change", "chunked"),
    [
        (change, chunked)
        for change, (limits, *_) in CHANGES.items()
        # (A chunked body of a token whose models are not checked goes upstream as it comes,
        # admitted before it arrives.)
        for chunked in (
            [False, True] if {"allowed_models", "budget_usd"} & set(limits) else [False]
        )
    ],
)
async def test_a_change_made_while_a_body_arrives_applies_to_its_request(
    proxy: Proxy, change: str, chunked: bool
) -> None:
    # Revocation and expiry were checked again once the body was in, but not the token's models
    # and limits: a request whose slow upload a PATCH overtook was decided by the token as it
    # was when its head arrived (a model taken away still served, a quota lowered to what was
    # used still admitted one more, and a model granted still refused).
    limits, used, fields, expected = CHANGES[change]
    issued = await proxy.issue_token(**limits)
    token = issued["token"]
    for _ in range(used):
        assert (await post(proxy, token, chat("gpt-4o-mini")))[0] == 200
    forwarded = len(proxy.upstream.requests)
    response = await _sent_across(
        proxy,
        token,
        chat("gpt-4o-mini"),
        ("PATCH", f"/tokens/{issued['id']}", fields),
        chunked=chunked,
    )
    answer = await response.json()
    assert response.status == expected, answer
    if expected == 200:
        assert len(proxy.upstream.requests) == forwarded + 1
        return
    code = answer["error"]["code"]
    assert code in CODES[expected]
    assert len(proxy.upstream.requests) == forwarded
    # The next request is answered as the change says, as this one now is.
    status, _, again = await post(proxy, token, chat("gpt-4o-mini"))
    if expected == 503:
        assert status == 200
    else:
        assert (status, again["error"]["code"]) == (expected, code)


async def test_a_body_too_large_is_refused_for_its_size_whatever_changed_while_it_arrived(
    proxy_factory: Any,
) -> None:
    # Read for its checks until it passed the limit, it has no models to check again: a change
    # to the token's models meanwhile leaves it refused 413, not 503 for a body never whole.
    proxy: Proxy = await proxy_factory(max_request_body_bytes=100_000)
    issued = await proxy.issue_token(allowed_models=["gpt-4o*"])
    body = chat("gpt-4o-mini", 150_000)
    change = ("PATCH", f"/tokens/{issued['id']}", {"allowed_models": ["o4-mini"]})
    response = await _sent_across(proxy, issued["token"], body, change, chunked=True)
    assert (response.status, (await response.json())["error"]["code"]) == (
        413,
        "request_too_large",
    )
    assert proxy.upstream.requests == []
