"""What the real OpenAI SDK gets through the proxy, against an upstream that answers as OpenAI does,
and what the event of each such answer records.

The upstream here is scripted: each test sets the status, head and body pieces of the next answers,
so a shape the mock upstream does not make (a streamed transcription, an image generation stream)
reaches the proxy exactly as OpenAI sends it.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Proxy
from tests.fakes import UPSTREAM_LOG, Seen, UpstreamLog
from tests.waiting import wait_for_lines, wait_for_usage

PRICES = (
    "gpt-4o-transcribe: {input: 2.50, output: 10.00}\n"
    "gpt-image-1: {input: 5.00, cached_input: 1.25, output: 40.00}\n"
    "bg-model: {input: 1.00, output: 4.00, max_output_tokens: 1000}\n"
)


@dataclass
class Script:
    """The answer the upstream gives next: status, head, and body pieces written one by one
    (chunked, or framed by their length)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    pieces: list[bytes] = field(default_factory=list)
    chunked: bool = True
    linger: float = 0.0  # seconds between the last piece and the end of the body
    compress: bool = False  # gzip the body for a request that accepts it, as OpenAI does


SCRIPT = web.AppKey("script", Script)


async def _scripted(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    request.app[UPSTREAM_LOG].requests.append(
        Seen(request.method, request.raw_path, dict(request.headers), body)
    )
    script = request.app[SCRIPT]
    headers, pieces = script.headers, script.pieces
    if script.compress and "gzip" in request.headers.get("Accept-Encoding", ""):
        headers = {**headers, "Content-Encoding": "gzip"}
        pieces = [gzip.compress(b"".join(pieces))]
    response = web.StreamResponse(status=script.status, headers=headers)
    if script.chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = sum(map(len, pieces))
    await response.prepare(request)
    for piece in pieces:
        await response.write(piece)
    await asyncio.sleep(script.linger)
    await response.write_eof()
    return response


@pytest.fixture
async def upstream_server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app[UPSTREAM_LOG] = UpstreamLog()
    app[SCRIPT] = Script()
    app.router.add_route("*", "/{tail:.*}", _scripted)
    server = TestServer(app)
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def proxy(proxy_factory: Any, tmp_path: Path) -> Proxy:
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    started: Proxy = await proxy_factory(
        prices_path=prices,
        file_event_log=tmp_path / "events.jsonl",
        api={
            "allowed_endpoints": [
                "/v1/audio",
                "/v1/images",
                "/v1/chat/completions",
                "/v1/responses",
                "/v1/embeddings",
                "/v1/files",
                "/v1/moderations",
            ]
        },
    )
    return started


def _answer(
    upstream: TestServer,
    *,
    status: int = 200,
    headers: dict[str, str],
    pieces: list[bytes],
    chunked: bool = True,
    linger: float = 0.0,
    compress: bool = False,
) -> None:
    script = upstream.app[SCRIPT]
    script.status, script.headers, script.pieces = status, headers, pieces
    script.chunked, script.linger, script.compress = chunked, linger, compress


def _sse(events: list[dict[str, Any]], *, named: bool = False) -> list[bytes]:
    """OpenAI's event stream: one ``data:`` line per event, with its ``event:`` line when named."""
    pieces = []
    for event in events:
        name = b"event: %s\n" % event["type"].encode() if named else b""
        pieces.append(name + b"data: " + orjson.dumps(event) + b"\n\n")
    return pieces


TRANSCRIPT_USAGE = {
    "type": "tokens",
    "input_tokens": 14,
    "input_token_details": {"text_tokens": 0, "audio_tokens": 14},
    "output_tokens": 45,
    "total_tokens": 59,
}
IMAGE_USAGE = {
    "input_tokens": 10,
    "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
    "output_tokens": 272,
    "total_tokens": 282,
}


async def test_a_streamed_transcription_and_image_generation_record_the_upstreams_usage(
    proxy: Proxy, upstream_server: TestServer, tmp_path: Path
) -> None:
    token = await proxy.token()
    _answer(
        upstream_server,
        headers={"Content-Type": "text/event-stream"},
        pieces=_sse(
            [
                {"type": "transcript.text.delta", "delta": "Hello", "logprobs": []},
                {"type": "transcript.text.delta", "delta": " world", "logprobs": []},
                {"type": "transcript.text.done", "text": "Hello world", "usage": TRANSCRIPT_USAGE},
            ]
        ),
    )
    async with proxy.sdk(token) as client:
        stream = await client.audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("a.wav", b"RIFF" + bytes(100)), stream=True
        )
        heard = [event async for event in stream]
    assert [event.type for event in heard][-1] == "transcript.text.done"

    image = {"b64_json": "iVBORw0K", "created_at": 1, "size": "1024x1024", "output_format": "png"}
    _answer(
        upstream_server,
        headers={"Content-Type": "text/event-stream"},
        pieces=_sse(
            [
                {"type": "image_generation.partial_image", "partial_image_index": 0, **image},
                {"type": "image_generation.completed", **image, "usage": IMAGE_USAGE},
            ],
            named=True,
        ),
    )
    async with proxy.sdk(token) as client:
        images = await client.images.generate(model="gpt-image-1", prompt="a cat", stream=True)
        drawn = [event async for event in images]
    assert drawn[-1].type == "image_generation.completed"

    transcription, generation = await wait_for_lines(tmp_path / "events.jsonl", 2)
    assert transcription["stream"] is True and transcription["model"] == "gpt-4o-transcribe"
    assert transcription["usage"] == {
        "prompt_tokens": 14,
        "completion_tokens": 45,
        "total_tokens": 59,
        "source": "upstream",
    }
    assert transcription["cost_usd"] == pytest.approx((14 * 2.50 + 45 * 10.00) / 1e6)
    assert generation["model"] == "gpt-image-1"
    assert generation["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 272,
        "total_tokens": 282,
        "source": "upstream",
    }
    assert generation["cost_usd"] == pytest.approx((10 * 5.00 + 272 * 40.00) / 1e6)


def _chat_stream(deltas: list[dict[str, Any]], *, with_usage: bool) -> list[bytes]:
    """A chat completion stream as OpenAI sends it, with or without ``include_usage``: asked for
    usage, every chunk carries ``"usage":null`` and a usage-only chunk comes last."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = []
    for delta in deltas:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        chunk: dict[str, Any] = {**head, "choices": [choice]}
        if with_usage:
            chunk["usage"] = None
        chunks.append(chunk)
    if with_usage:
        usage = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
        chunks.append({**head, "choices": [], "usage": usage})
    return [b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks] + [b"data: [DONE]\n\n"]


async def test_chunks_whose_text_is_usage_reach_the_client_as_without_the_usage_asked_for(
    proxy: Proxy, upstream_server: TestServer, tmp_path: Path
) -> None:
    call = {"index": 0, "id": "call_1", "type": "function"}
    deltas = [
        {"role": "assistant", "content": ""},
        {"content": "usage"},  # a token of the answer's text
        {"tool_calls": [{**call, "function": {"name": "usage", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
    ]
    _answer(
        upstream_server,
        headers={"Content-Type": "text/event-stream"},
        pieces=_chat_stream(deltas, with_usage=True),
    )
    token = await proxy.token()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    raw = await proxy.client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert await raw.read() == b"".join(_chat_stream(deltas, with_usage=False))
    async with proxy.sdk(token) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert len(chunks) == len(deltas)
    assert not [chunk for chunk in chunks if "usage" in chunk.model_fields_set]
    events = await wait_for_lines(tmp_path / "events.jsonl", 2)
    assert [event["usage"]["total_tokens"] for event in events] == [17, 17]


@pytest.mark.parametrize("content", ["hi", "x" * 70_000], ids=["read-whole", "streamed-up"])
async def test_an_error_answer_to_a_stream_asked_for_usage_keeps_its_content_length(
    proxy: Proxy, upstream_server: TestServer, content: str
) -> None:
    # The proxy asks for usage in a streamed chat; an answer that is no event stream is relayed
    # as it came, framing included.
    answer = b'{"error":{"message":"Rate limit reached","type":"requests","code":null}}'
    _answer(
        upstream_server,
        status=429,
        headers={"Content-Type": "application/json", "x-request-id": "req_1"},
        pieces=[answer],
        chunked=False,
    )
    token = await proxy.token()
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "stream": True}
    response = await proxy.client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert b'"include_usage":true' in proxy.upstream.last.body  # asked for usage on the way
    assert response.status == 429
    assert response.headers.get("Content-Length") == str(len(answer))
    assert "Transfer-Encoding" not in response.headers
    assert await response.read() == answer


def _responses_stream(text: list[str], usage: dict[str, Any]) -> list[dict[str, Any]]:
    """A Responses API stream as OpenAI sends it: its last event, response.completed, carries the
    whole response with its usage (and no ``[DONE]`` follows)."""
    head = {"id": "resp_1", "object": "response", "status": "in_progress", "model": "m"}
    started = {**head, "output": [], "usage": None}
    part = {"type": "output_text", "text": "".join(text), "annotations": []}
    item = {"id": "msg_1", "type": "message", "role": "assistant", "content": [part]}
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    return [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        *({"type": "response.output_text.delta", **at, "delta": delta} for delta in text),
        {"type": "response.output_text.done", **at, "text": part["text"]},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {
            "type": "response.completed",
            "response": {**head, "status": "completed", "output": [item], "usage": usage},
        },
    ]


async def test_a_client_that_leaves_once_it_read_response_completed_is_not_recorded_as_gone(
    proxy_factory: Any, upstream_server: TestServer, tmp_path: Path
) -> None:
    # The SDK user stops at response.completed, the Responses API's last event, and closes the
    # stream; the upstream's end of body may come later. That client had the whole answer.
    # (The upstream's idle timeout is longer than its linger: on a busy machine the client may
    # take more than the tests' usual second to leave.)
    proxy: Proxy = await proxy_factory(
        file_event_log=tmp_path / "events.jsonl",
        api={
            "allowed_endpoints": ["/v1/responses"],
            "timeouts": {"connect": "2s", "response_header": "10s", "idle": "30s"},
        },
    )
    usage = {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12}
    _answer(
        upstream_server,
        headers={"Content-Type": "text/event-stream"},
        pieces=_sse(_responses_stream(["Hello", " world"], usage), named=True),
        linger=5,
    )
    token = await proxy.token()
    async with proxy.sdk(token) as client:
        stream = await client.responses.create(model="m", input="hi", stream=True)
        async for event in stream:
            if event.type == "response.completed":
                break
        await stream.close()
    (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
    assert (event["status"], event["error"]) == (200, None)
    assert event["usage"]["source"] == "upstream"


async def test_a_responses_stream_cut_in_a_function_call_counts_the_arguments_it_sent(
    proxy: Proxy, upstream_server: TestServer, tmp_path: Path
) -> None:
    # Its usage never comes: the estimate is all the event has, and it must count the call.
    started = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    call = {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "write_file"}
    at = {"item_id": "fc_1", "output_index": 0}
    delta = {"type": "response.function_call_arguments.delta", **at, "delta": " lorem ipsum dolor"}
    _answer(
        upstream_server,
        headers={"Content-Type": "text/event-stream"},
        pieces=_sse(
            [
                {"type": "response.created", "response": {**started, "usage": None}},
                {"type": "response.output_item.added", "output_index": 0, "item": call},
                *[delta] * 100,
            ],
            named=True,
        ),
        linger=5,
    )
    token = await proxy.token()
    async with proxy.sdk(token) as client:
        stream = await client.responses.create(model="gpt-4o", input="hi", stream=True)
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                break
        await stream.close()
    (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
    assert event["error"] == "client_disconnected"
    assert event["response"]["output"] == [{**call, "arguments": " lorem ipsum dolor" * 100}]
    assert event["usage"]["completion_tokens"] >= 300  # three tokens a delta, and the name


async def _settled(proxy: Proxy, token_id: str) -> dict[str, Any]:
    """The token once nothing is held for it any more."""
    for _ in range(300):
        _, shown = await proxy.manage("GET", f"/tokens/{token_id}")
        if shown["reserved_usd"] == 0 and shown["spent_usd"]:
            break
        await asyncio.sleep(0.02)
    return dict(shown)


async def test_a_background_response_pays_its_hold_once_and_fetching_it_costs_nothing(
    proxy: Proxy, upstream_server: TestServer, tmp_path: Path
) -> None:
    # background: the answer comes at once, queued; the model works on, and the client fetches
    # the result (as often as it likes) with GET /v1/responses/{id}.
    issued = await proxy.issue_token(budget_usd=1)
    queued = {"id": "resp_1", "object": "response", "status": "queued", "model": "bg-model"}
    _answer(
        upstream_server,
        headers={"Content-Type": "application/json"},
        pieces=[orjson.dumps({**queued, "output": [], "usage": None})],
    )
    async with proxy.sdk(issued["token"]) as client:
        started = await client.responses.create(
            model="bg-model", input="Write a long essay.", background=True
        )
        assert started.status == "queued"
        usage = {"input_tokens": 5, "output_tokens": 1000, "total_tokens": 1005}
        done = {**queued, "status": "completed", "output": [], "usage": usage}
        _answer(
            upstream_server,
            headers={"Content-Type": "application/json"},
            pieces=[orjson.dumps(done)],
        )
        for _ in range(2):
            fetched = await client.responses.retrieve("resp_1")
            assert fetched.usage is not None and fetched.usage.output_tokens == 1000
        cancelled = await client.responses.cancel("resp_1")  # a POST that generates nothing
        assert cancelled.usage is not None

    create, *fetches = await wait_for_lines(tmp_path / "events.jsonl", 4)
    # Its tokens are unknown when it is queued: it pays all it held, the most it can cost.
    assert create["usage"] is None
    # Fetching used no tokens: neither fetch costs what the response cost again.
    assert [(f["usage"], f["cost_usd"]) for f in fetches] == [(None, 0.0)] * 3
    await asyncio.sleep(0.5)  # the fetches' spend, if they had any, joins at the next flush
    token = await _settled(proxy, issued["id"])
    held = (5 + 1000 * 4.00) / 1e6  # at most the prompt's bound and the whole output cap
    assert 1000 * 4.00 / 1e6 <= token["spent_usd"] <= held + 100 / 1e6
    assert create["cost_usd"] == token["spent_usd"]


async def test_a_held_request_whose_tokens_are_unknown_shows_in_its_event_what_it_was_charged(
    proxy: Proxy, upstream_server: TestServer, tmp_path: Path
) -> None:
    # A background response is queued when answered: its tokens are unknown and its hold is
    # charged whole. Its event said cost_usd null, so the token's usage (summed from events) showed
    # $0 where its spent_usd showed all it held, and the JSONL log, Helicone and Lunary lost it.
    issued = await proxy.issue_token(budget_usd=1)
    queued = {"id": "resp_1", "object": "response", "status": "queued", "model": "bg-model"}
    _answer(
        upstream_server,
        headers={"Content-Type": "application/json"},
        pieces=[orjson.dumps({**queued, "output": [], "usage": None})],
    )
    async with proxy.sdk(issued["token"]) as client:
        await client.responses.create(model="bg-model", input="Write an essay.", background=True)
    (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
    token = await _settled(proxy, issued["id"])
    assert token["spent_usd"] >= 1000 * 4.00 / 1e6  # the whole output cap, and the prompt
    assert event["usage"] is None and event["cost_usd"] == token["spent_usd"]
    usage = await wait_for_usage(proxy, f"/tokens/{issued['id']}", 1)
    assert usage["cost_usd"] == token["spent_usd"]


@pytest.mark.parametrize("cap", [1000, None])
async def test_a_background_response_fills_a_tpm_window_with_the_most_it_can_use(
    proxy: Proxy, upstream_server: TestServer, cap: int | None
) -> None:
    # Queued, its tokens are unknown, and the model may write them all after the answer: it counts
    # its prompt and its output cap (the request's, else the model's own in prices.yaml). Counted
    # as nothing, a tpm token sent background responses without end (a reviewer saw it).
    issued = await proxy.issue_token(tpm=1500)
    queued = {"id": "resp_1", "object": "response", "status": "queued", "model": "bg-model"}
    _answer(
        upstream_server,
        headers={"Content-Type": "application/json"},
        pieces=[orjson.dumps({**queued, "background": True, "output": [], "usage": None})],
    )
    capped: dict[str, Any] = {} if cap is None else {"max_output_tokens": cap}
    async with proxy.sdk(issued["token"]) as client:
        for _ in range(2):
            started = await client.responses.create(
                model="bg-model", input="Write a long essay.", background=True, **capped
            )
            assert started.status == "queued"
        with pytest.raises(openai.RateLimitError) as refused:
            await client.responses.create(model="bg-model", input="Hi.", background=True)
    assert refused.value.code == "rate_limited"
    assert len(upstream_server.app[UPSTREAM_LOG].requests) == 2


async def test_a_budgeted_token_counts_a_responses_input_for_free(
    proxy: Proxy, upstream_server: TestServer, tmp_path: Path
) -> None:
    # POST /v1/responses/input_tokens counts a request's input tokens and generates nothing:
    # priced as a generation, it was refused as having no output cap the proxy could set.
    issued = await proxy.issue_token(budget_usd=1)
    counted = {"object": "response.input_tokens", "input_tokens": 11}
    _answer(
        upstream_server,
        headers={"Content-Type": "application/json"},
        pieces=[orjson.dumps(counted)],
    )
    async with proxy.sdk(issued["token"]) as client:
        count = await client.responses.input_tokens.count(model="bg-model", input="Hello there.")
    assert count.input_tokens == 11
    assert b"max_output_tokens" not in upstream_server.app[UPSTREAM_LOG].last.body
    (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
    assert event["status"] == 200 and not event["cost_usd"]
    _, shown = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert shown["spent_usd"] == 0 and shown["reserved_usd"] == 0


async def test_a_stream_whose_media_type_is_in_capitals_is_relayed_without_the_usage_asked_for(
    proxy: Proxy, upstream_server: TestServer, tmp_path: Path
) -> None:
    # A media type is case-insensitive (RFC 9110 §8.3.1): an upstream may spell it as it likes.
    deltas = [{"role": "assistant", "content": ""}, {"content": "Hello"}]
    _answer(
        upstream_server,
        headers={"Content-Type": "Text/Event-Stream; charset=utf-8"},
        pieces=_chat_stream(deltas, with_usage=True),
    )
    token = await proxy.token()
    async with proxy.sdk(token) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert [chunk.choices[0].delta.content for chunk in chunks] == ["", "Hello"]
    assert not [chunk for chunk in chunks if "usage" in chunk.model_fields_set]
    (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
    assert event["stream"] is True
    assert event["usage"]["total_tokens"] == 17 and event["usage"]["source"] == "upstream"
    assert event["response"]["choices"][0]["message"]["content"] == "Hello"


async def test_a_compressed_answer_too_long_to_read_its_usage_fills_a_tpm_window_with_the_most_it_can_use(
    proxy: Proxy, upstream_server: TestServer, tmp_path: Path
) -> None:
    # OpenAI compresses its answer for a client that accepts gzip, as the SDK does. An embeddings
    # batch's answer, longer than the capture even compressed, keeps its usage (at its end) out of
    # the event's reach; its request, longer than the capture too, cannot be counted instead. Its
    # tokens are unknown, not none: the tpm window counted nothing, batch after batch.
    issued = await proxy.issue_token(tpm=50_000)
    vectors = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(os.urandom(6144)).decode(),
        }
        for i in range(100)
    ]
    usage = {"prompt_tokens": 60_000, "total_tokens": 60_000}
    answer = {"object": "list", "data": vectors, "model": "text-embedding-3-small", "usage": usage}
    _answer(
        upstream_server,
        headers={"Content-Type": "application/json"},
        pieces=[orjson.dumps(answer)],
        chunked=False,
        compress=True,
    )
    async with proxy.sdk(issued["token"]) as client:
        embedded = await client.embeddings.create(
            model="text-embedding-3-small", input=["word " * 600] * 100
        )
        assert len(embedded.data) == 100 and embedded.usage.total_tokens == 60_000
        (event,) = await wait_for_lines(tmp_path / "events.jsonl", 1)
        assert event["usage"] is None  # unknown
        with pytest.raises(openai.RateLimitError) as refused:
            await client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert refused.value.code == "rate_limited"


async def test_a_model_limited_token_may_make_the_calls_that_run_no_model(
    proxy: Proxy, upstream_server: TestServer
) -> None:
    # A file upload or a stored completion's update names no model and runs none: a token limited
    # to some models was refused both (model_not_allowed), so its application could not upload
    # the file its next request reads.
    token = await proxy.token(allowed_models=["gpt-4o-mini*"])
    uploaded = {"id": "file-1", "object": "file", "bytes": 8, "created_at": 1, "filename": "a"}
    stored = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m"}
    log = upstream_server.app[UPSTREAM_LOG]
    async with proxy.sdk(token) as client:
        _answer(
            upstream_server,
            headers={"Content-Type": "application/json"},
            pieces=[orjson.dumps({**uploaded, "purpose": "user_data", "status": "processed"})],
        )
        file = await client.files.create(file=("a.pdf", b"%PDF-1.7"), purpose="user_data")
        assert file.id == "file-1" and log.last.path_qs == "/v1/files"
        _answer(
            upstream_server,
            headers={"Content-Type": "application/json"},
            pieces=[orjson.dumps({**stored, "choices": [], "metadata": {"a": "b"}})],
        )
        updated = await client.chat.completions.update("chatcmpl-1", metadata={"a": "b"})
        assert updated.metadata == {"a": "b"}
        # A call that runs the upstream's default model when it names none is still refused.
        seen = len(log.requests)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.moderations.create(input="hello")
    assert refused.value.code == "model_not_allowed"
    assert len(log.requests) == seen


async def test_a_compressed_image_too_long_to_read_its_usage_fills_a_tpm_window_with_the_most_it_can_use(
    proxy: Proxy, upstream_server: TestServer, tmp_path: Path
) -> None:
    # An image comes as base64 in the JSON answer, its usage at the end: compressed (the SDK
    # accepts gzip), a token with a tpm window drew images without end, each counted as nothing.
    issued = await proxy.issue_token(tpm=10_000)
    image = base64.b64encode(os.urandom(600_000)).decode()
    answer = {"created": 1, "data": [{"b64_json": image}], "usage": IMAGE_USAGE}
    _answer(
        upstream_server,
        headers={"Content-Type": "application/json"},
        pieces=[orjson.dumps(answer)],
        chunked=False,
        compress=True,
    )
    async with proxy.sdk(issued["token"]) as client:
        drawn = await client.images.generate(model="gpt-image-1", prompt="a cat")
        assert drawn.data is not None and drawn.data[0].b64_json == image
        with pytest.raises(openai.RateLimitError) as refused:
            await client.images.generate(model="gpt-image-1", prompt="a dog")
    assert refused.value.code == "rate_limited"
