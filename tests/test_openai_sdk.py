"""The product promise: the real OpenAI SDK works unchanged with a withering token and base_url."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import Proxy


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
