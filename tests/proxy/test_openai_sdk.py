"""The product promise: the real OpenAI SDK works unchanged with a withering token and base_url."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest

from tests.conftest import Proxy
from tests.waiting import wait_for_lines


async def test_chat_completion(proxy: Proxy) -> None:
    async with proxy.sdk(await proxy.token()) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
        )
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.total_tokens > 0


async def test_streaming_chat_completion(proxy: Proxy) -> None:
    async with proxy.sdk(await proxy.token()) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Say hello"}],
            stream=True,
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces).startswith("Hello")


async def test_streaming_with_usage_requested_by_the_client(proxy: Proxy) -> None:
    async with proxy.sdk(await proxy.token()) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Say hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


async def test_embeddings_and_models(proxy: Proxy) -> None:
    async with proxy.sdk(await proxy.token()) as client:
        embedding = await client.embeddings.create(model="text-embedding-3-small", input="hi")
        models = await client.models.list()
    assert len(embedding.data[0].embedding) > 0
    assert any(m.id for m in models.data)


@pytest.mark.parametrize(
    ("setup", "exception", "code"),
    [
        ("unknown", openai.AuthenticationError, "token_not_found"),
        ("malformed", openai.AuthenticationError, "invalid_token"),
        ("revoked", openai.AuthenticationError, "token_inactive"),
        ("inactive_project", openai.PermissionDeniedError, "project_inactive"),
        ("quota", openai.RateLimitError, "quota_exceeded"),
    ],
)
async def test_refusals_map_to_sdk_exceptions_with_code(
    proxy: Proxy, setup: str, exception: type[openai.APIStatusError], code: str
) -> None:
    token_value = "sk-" + "Z" * 43
    if setup == "malformed":
        token_value = "not-a-withering-token"
    elif setup != "unknown":
        issued = await proxy.issue_token(max_requests=1 if setup == "quota" else None)
        token_value = issued["token"]
        if setup == "revoked":
            await proxy.manage("DELETE", f"/tokens/{issued['id']}")
        elif setup == "inactive_project":
            await proxy.manage("PATCH", f"/projects/{issued['project_id']}", {"is_active": False})
        elif setup == "quota":
            async with proxy.sdk(token_value) as client:
                await client.models.list()
    async with proxy.sdk(token_value) as client:
        with pytest.raises(exception) as caught:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
    assert caught.value.code == code
    assert token_value not in str(caught.value)


async def test_disallowed_endpoint_is_not_found_error(proxy: Proxy) -> None:
    async with proxy.sdk(await proxy.token()) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.post("/fine_tuning/jobs", cast_to=dict[str, Any], body={})
    assert caught.value.code == "endpoint_not_found"


class _Attempts:
    """Counts the HTTP attempts an SDK makes, and can send each request body chunked."""

    def __init__(self, *, chunked: bool = False) -> None:
        self.count = 0
        self.chunked = chunked

    def client(self) -> httpx2.AsyncClient:
        attempts = self

        class Transport(httpx2.AsyncHTTPTransport):
            async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
                attempts.count += 1
                if attempts.chunked:
                    body = await request.aread()

                    async def pieces() -> AsyncIterator[bytes]:
                        for start in range(0, len(body), 256 * 1024):
                            yield body[start : start + 256 * 1024]

                    headers = [(k, v) for k, v in request.headers.items() if k != "content-length"]
                    request = httpx2.Request(
                        request.method, request.url, headers=headers, content=pieces()
                    )
                return await super().handle_async_request(request)

        return httpx2.AsyncClient(transport=Transport(), timeout=60)


def _vision_messages(image_bytes: int) -> list[dict[str, Any]]:
    image = base64.b64encode(b"\x89PNG" + b"\x00" * image_bytes).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture, in five words?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            ],
        }
    ]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_20_mb_vision_stream_gets_exact_usage_in_its_event(
    proxy_factory: Any, tmp_path: Path, chunked: bool
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    token = await proxy.token()
    messages = _vision_messages(15 * 1024 * 1024)  # 20 MB once in base64
    attempts = _Attempts(chunked=chunked)
    async with openai.AsyncOpenAI(
        base_url=proxy.base_url + "/v1", api_key=token, http_client=attempts.client()
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=messages,
            stream=True,  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream]
        plain = await client.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    assert attempts.count == 2
    assert all(chunk.choices for chunk in chunks)  # the usage chunk the proxy asked for is hidden
    sent = proxy.upstream.requests[0]
    assert len(sent.body) > 20_000_000
    assert orjson.loads(sent.body)["stream_options"] == {"include_usage": True}
    events = await wait_for_lines(log, 2)
    streamed = events[0]
    assert streamed["stream"] is True and streamed["usage"]["source"] == "upstream"
    assert plain.usage is not None
    assert streamed["usage"]["prompt_tokens"] == plain.usage.prompt_tokens
    assert streamed["usage"]["completion_tokens"] == plain.usage.completion_tokens


async def test_a_hopeless_refusal_is_tried_once(proxy: Proxy) -> None:
    token = await proxy.token(max_requests=1)
    attempts = _Attempts()
    async with openai.AsyncOpenAI(
        base_url=proxy.base_url + "/v1", api_key=token, http_client=attempts.client()
    ) as client:
        await client.models.list()
        with pytest.raises(openai.RateLimitError):
            await client.models.list()
    assert attempts.count == 2  # the SDK's own retries (2 by default) were not used


async def test_requests_that_never_reached_a_dead_upstream_use_no_quota(
    proxy_factory: Any, unused_tcp_port: int
) -> None:
    proxy: Proxy = await proxy_factory(api={"base_url": f"http://127.0.0.1:{unused_tcp_port}"})
    issued = await proxy.issue_token(max_requests=5)
    unlimited = await proxy.issue_token()
    for token in (issued["token"], unlimited["token"]):
        attempts = _Attempts()
        async with openai.AsyncOpenAI(
            base_url=proxy.base_url + "/v1",
            api_key=token,
            http_client=attempts.client(),
            max_retries=2,
        ) as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.models.list()
        assert caught.value.status_code == 502 and attempts.count == 3
    await proxy.components.authority.flush_usage()
    for issued_token in (issued, unlimited):
        status, token = await proxy.manage("GET", f"/tokens/{issued_token['id']}")
        assert status == 200 and token["request_count"] == 0


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_the_sdk_waits_out_rate_limited_as_told_and_is_then_admitted(proxy: Proxy) -> None:
    """rpm=1: the second call is refused with Retry-After; the SDK waits that long and succeeds."""
    issued = await proxy.issue_token(rpm=1)
    client = openai.AsyncOpenAI(
        base_url=proxy.base_url + "/v1", api_key=issued["token"], max_retries=1
    )
    async with client:
        await client.models.list()
        started = time.monotonic()
        models = await client.models.list()
        waited = time.monotonic() - started
    assert models.data
    # The refusal said to wait out the minute (less the moment since the first call); the SDK
    # retried once, after that, and was admitted.
    assert 55 <= waited <= 75
    assert len(proxy.upstream.requests) == 2  # the refused attempt never reached the upstream
