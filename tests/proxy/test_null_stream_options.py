"""``"stream_options": null`` (or ``{"include_usage": null}``) is the OpenAI API's default, as if
absent: the proxy asks a stream's usage for it as it does when they are absent, and the client sees
the stream it asked for."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import Proxy
from tests.waiting import wait_for_lines

LIMITS: dict[str, dict[str, Any]] = {
    "unlimited": {},
    "tpm": {"tpm": 100_000},
    "budget": {"budget_usd": 1},
    "models": {"allowed_models": ["gpt-4o-mini*"]},
}
OPTIONS = {
    "null": b'"stream_options":null',
    "spaced-null": b'"stream_options" : \n null ',
    "null-first": b'"stream_options":null,"n":1',
    "empty": b'"stream_options":{}',
    "usage-null": b'"stream_options":{"include_usage":null}',
}


@pytest.fixture
async def proxy(proxy_factory: Any, tmp_path: Path) -> Proxy:
    started: Proxy = await proxy_factory(file_event_log=tmp_path / "events.jsonl")
    return started


async def _in_pieces(body: bytes) -> AsyncIterator[bytes]:
    for at in range(0, len(body), 1000):
        yield body[at : at + 1000]


def stream_body(path: str, options: bytes, padding: int) -> bytes:
    if path == "/v1/completions":
        fields = b'"model":"gpt-4o-mini","prompt":"hi%s"' % (b" " * padding)
    else:
        message = b'{"role":"user","content":"hi%s"}' % (b" " * padding)
        fields = b'"model":"gpt-4o-mini","messages":[' + message + b"]"
    if options.startswith(b'"stream_options":null,'):
        return b"{" + options + b"," + fields + b',"stream":true}'
    return b"{" + fields + b',"stream":true,' + options + b"}"


async def spent(proxy: Proxy, token_id: str) -> float:
    """The token's settled spend, once nothing is held for it any more."""
    for _ in range(300):
        _, shown = await proxy.manage("GET", f"/tokens/{token_id}")
        if shown["reserved_usd"] == 0 and shown["spent_usd"] > 0:
            return float(shown["spent_usd"])
        await asyncio.sleep(0.02)
    raise AssertionError(f"never settled: {shown}")


@pytest.mark.parametrize(
    ("path", "options", "framing"),
    [
        (path, options, framing)
        for path in ("/v1/chat/completions", "/v1/completions")
        for options in OPTIONS
        for framing in ("whole", "chunked", "large")
        if path == "/v1/chat/completions" or options == "null"
    ],
)
@pytest.mark.parametrize("limits", list(LIMITS))
async def test_a_stream_with_null_options_is_served_with_its_usage_asked_and_hidden(
    proxy: Proxy, tmp_path: Path, limits: str, options: str, framing: str, path: str
) -> None:
    # A tpm or budget token refused such a stream 400 (param_not_allowed, model_not_priced), as
    # if the client had turned include_usage off; an unlimited one served it without usage, its
    # tokens estimated from the text.
    issued = await proxy.issue_token(**LIMITS[limits])
    body = stream_body(path, OPTIONS[options], 70_000 if framing == "large" else 0)
    data = _in_pieces(body) if framing == "chunked" else body
    headers = {"Authorization": f"Bearer {issued['token']}", "Content-Type": "application/json"}
    response = await proxy.client.post(path, data=data, headers=headers)
    text = await response.read()
    assert response.status == 200, text
    sent = orjson.loads(proxy.upstream.last.body)
    assert sent["stream_options"] == {"include_usage": True}
    assert sent == {**orjson.loads(body), "stream_options": {"include_usage": True}}
    # The client did not ask for usage: no usage chunk, no "usage": null in its chunks.
    await _usage_hidden_and_counted(proxy, tmp_path, text, issued["id"], limits)


async def test_options_null_in_a_request_that_does_not_stream_go_upstream_unchanged(
    proxy: Proxy,
) -> None:
    token = await proxy.token(tpm=100_000)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for body in (
        b'{"model":"gpt-4o-mini","messages":[],"stream":false,"stream_options":null}',
        b'{"stream_options":null,"model":"gpt-4o-mini","messages":[]}',
    ):
        response = await proxy.client.post("/v1/chat/completions", data=body, headers=headers)
        assert response.status == 200
        assert b'"usage":{' in await response.read()
        assert proxy.upstream.last.body == body


def late_stream_body(stream: bytes) -> bytes:
    """A body as some clients and frameworks serialise it: stream_options null first, then
    megabytes of messages (here words, an image's worth), then stream last."""
    text = b"lorem ipsum " * 300_000
    message = b'{"role":"user","content":"' + text + b'"}'
    return (
        b'{"stream_options":null,"model":"gpt-4o-mini","messages":['
        + message
        + b'],"stream":'
        + stream
        + b"}"
    )


async def _usage_hidden_and_counted(
    proxy: Proxy, tmp_path: Path, text: bytes, token_id: str, limits: str
) -> None:
    """The client's stream ``text`` ended whole without usage; the event has the upstream's,
    and a budgeted token spent what the event cost."""
    assert b"usage" not in text and text.endswith(b"data: [DONE]\n\n")
    (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
    assert event["usage"]["source"] == "upstream"
    assert event["usage"]["prompt_tokens"] >= 1 and event["usage"]["completion_tokens"] >= 1
    if limits == "budget":
        assert await spent(proxy, token_id) == pytest.approx(event["cost_usd"])


async def _in_socket_reads(body: bytes) -> AsyncIterator[bytes]:
    for at in range(0, len(body), 65_536):
        yield body[at : at + 65_536]


async def _post_late(proxy: Proxy, token: str, body: bytes, framing: str) -> aiohttp.ClientResponse:
    """``body`` posted as a chat completion, with its length or chunked in socket-sized reads."""
    data = _in_socket_reads(body) if framing == "chunked" else io.BytesIO(body)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return await proxy.client.post("/v1/chat/completions", data=data, headers=headers)


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("limits", ["unlimited", "tpm", "budget", "models"])
async def test_a_stream_that_says_so_after_megabytes_has_its_null_options_replaced(
    proxy: Proxy, tmp_path: Path, limits: str, framing: str
) -> None:
    # Past 64 KiB held after the null, the null went upstream unchanged: a tpm or budget token
    # refused the stream 400, telling the client to set include_usage it had not touched; an
    # unlimited one served it without usage, its tokens estimated.
    issued = await proxy.issue_token(**LIMITS[limits])
    body = late_stream_body(b"true")
    response = await _post_late(proxy, issued["token"], body, framing)
    text = await response.read()
    assert response.status == 200, text
    null = body.index(b"null")
    assert proxy.upstream.last.body == body[:null] + b'{"include_usage":true}' + body[null + 4 :]
    await _usage_hidden_and_counted(proxy, tmp_path, text, issued["id"], limits)


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("limits", ["unlimited", "tpm", "budget", "models"])
async def test_megabytes_that_do_not_stream_keep_their_null_options(
    proxy: Proxy, limits: str, framing: str
) -> None:
    token = await proxy.token(**LIMITS[limits])
    body = late_stream_body(b"false")
    response = await _post_late(proxy, token, body, framing)
    assert response.status == 200, await response.read()
    assert proxy.upstream.last.body == body


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_megabytes_with_null_options_refused_for_their_model_never_reach_the_upstream(
    proxy: Proxy, framing: str
) -> None:
    # (While the null waits for "stream", the rest is held: a refusal still comes before any of
    # the body goes upstream.)
    token = await proxy.token(**LIMITS["models"])
    body = late_stream_body(b"true").replace(b'"gpt-4o-mini"', b'"gpt-4o"', 1)
    response = await _post_late(proxy, token, body, framing)
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "model_not_allowed"
    assert proxy.upstream.requests == []
