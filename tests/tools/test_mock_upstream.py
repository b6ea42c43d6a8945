"""The mock upstream answers like OpenAI: the real SDK parses every answer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from yarl import URL

from llm_proxy.tools.mock_upstream import MockSettings, build_app, mock_upstream_command
from tests.processes import clean_env, cli_command, run, start_mock_upstream, start_server

MakeServer = Callable[..., Awaitable[TestServer]]
MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def mock_url(aiohttp_server: MakeServer) -> str:
    server = await aiohttp_server(build_app(MockSettings(chunks=4)))
    return str(server.make_url("/v1"))


@pytest.fixture
async def sdk(mock_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=mock_url, api_key="sk-test", max_retries=0) as client:
        yield client


async def test_sdk_parses_a_chat_completion_with_usage_and_request_id(
    sdk: openai.AsyncOpenAI,
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "three little words"}]
    )
    completion = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == "Hello from the mock"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 4)
    assert completion.usage.total_tokens == 7


async def test_sdk_parses_a_streamed_chat_without_usage(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the mock"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1


async def test_streamed_chat_with_include_usage_ends_with_a_usage_only_chunk(
    sdk: openai.AsyncOpenAI,
) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": [{"type": "text", "text": "two words"}]}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 2
    assert chunks[-1].usage.completion_tokens == 4
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_max_tokens_cuts_the_answer_short(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert completion.choices[0].message.content == "Hello from"
    assert completion.choices[0].finish_reason == "length"


async def test_sdk_parses_legacy_completions_plain_and_streamed(sdk: openai.AsyncOpenAI) -> None:
    plain = await sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hello")
    assert plain.choices[0].text == "Hello from the mock"
    assert plain.usage is not None
    assert plain.usage.prompt_tokens == 2
    stream = await sdk.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="say hello",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello from the mock"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 6


async def test_embeddings_are_deterministic_unit_vectors_in_base64_and_float(
    sdk: openai.AsyncOpenAI,
) -> None:
    # The SDK asks for base64 unless told otherwise, then decodes it.
    decoded = await sdk.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    floats = await sdk.embeddings.create(
        model="text-embedding-3-small", input=["a b", "c"], encoding_format="float"
    )
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]
    first = floats.data[0].embedding
    assert len(first) == 16
    assert abs(sum(v * v for v in first) - 1) < 1e-5
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == 3
    tokens = await sdk.embeddings.create(
        model="text-embedding-3-small", input=[1, 2, 3], dimensions=4, encoding_format="float"
    )
    assert len(tokens.data) == 1
    assert len(tokens.data[0].embedding) == 4
    assert tokens.usage.prompt_tokens == 3


async def test_bad_embedding_requests_are_refused(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as empty:
        await sdk.embeddings.create(model="text-embedding-3-small", input=[])
    assert empty.value.param == "input"
    with pytest.raises(openai.BadRequestError) as dims:
        await sdk.embeddings.create(model="text-embedding-3-small", input="x", dimensions=9999)
    assert dims.value.param == "dimensions"


async def test_sdk_lists_and_retrieves_models(sdk: openai.AsyncOpenAI) -> None:
    models = [model.id async for model in sdk.models.list()]
    assert models == ["gpt-4o-mini", "text-embedding-3-small"]
    model = await sdk.models.retrieve("gpt-4o-mini")
    assert model.owned_by == "openai"
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.models.retrieve("gpt-unknown")
    assert missing.value.code == "model_not_found"


async def test_sdk_parses_a_responses_answer(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model="gpt-4.1", input="four words in here")
    assert response.output_text == "Hello from the mock"
    assert response.status == "completed"
    assert response.usage is not None
    assert response.usage.input_tokens == 4
    short = await sdk.responses.create(
        model="gpt-4.1",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        max_output_tokens=1,
    )
    assert short.status == "incomplete"


RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 4,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def test_sdk_streams_a_responses_answer_event_by_event(sdk: openai.AsyncOpenAI) -> None:
    async with sdk.responses.stream(model="gpt-4.1", input="four words in here") as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    assert [event.type for event in events] == RESPONSE_EVENTS
    assert [event.sequence_number for event in events] == list(range(len(RESPONSE_EVENTS)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == final.output_text == "Hello from the mock"
    assert final.status == "completed"
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (4, 4)
    assert final.usage.total_tokens == 8

    created = await sdk.responses.create(
        model="gpt-4.1", input="hi", stream=True, max_output_tokens=2
    )
    cut = [event async for event in created]
    assert [event.type for event in cut][-1] == "response.incomplete"
    last = cut[-1]
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete"
    assert last.response.output_text == "Hello from"
    assert last.response.usage is not None and last.response.usage.output_tokens == 2


async def test_a_responses_stream_names_its_events_and_sends_no_done(
    aiohttp_client: MakeClient,
) -> None:
    client = await aiohttp_client(build_app(MockSettings(chunks=2)))
    answer = await client.post("/v1/responses", json={"input": "hi", "stream": True})
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    frames = (await answer.text()).split("\n\n")
    assert frames[-1] == ""  # the last event ends with its blank line
    names = [frame.split("\n")[0] for frame in frames[:-1]]
    assert names[0] == "event: response.created" and names[-1] == "event: response.completed"
    assert "[DONE]" not in await answer.text()
    counts = await (await client.get("/mock/streams")).json()
    assert counts == {"started": 1, "completed": 1, "aborted": 0}


async def test_a_wrong_or_missing_key_gets_openais_401(aiohttp_server: MakeServer) -> None:
    server = await aiohttp_server(build_app(MockSettings(api_key="sk-right")))
    base = str(server.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as refused:
            await wrong.models.list()
    assert refused.value.code == "invalid_api_key"
    assert "sk-wrong" not in str(refused.value)
    async with ClientSession() as session:
        async with session.get(server.make_url("/v1/models")) as missing:
            assert missing.status == 401
            assert (await missing.json())["error"]["type"] == "invalid_request_error"
        headers = {"Authorization": "Bearer sk-right"}
        async with session.get(server.make_url("/v1/models"), headers=headers) as allowed:
            assert allowed.status == 200


async def test_echo_reports_what_arrived(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(build_app(MockSettings(api_key="sk-only")))
    # encoded=True: send the query as written, not as yarl would normalise it.
    target = URL(f"{client.make_url('/mock/echo/v1/chat/completions')}?a=1&b=%2F", encoded=True)
    response = await client.session.post(
        target,
        data=b'{"x": 1}',
        headers={"X-Forwarded-For": "10.0.0.1", "X-Custom": "one", "Authorization": "Bearer k"},
    )
    assert response.status == 200
    echo = await response.json()
    assert echo["method"] == "POST"
    assert echo["path"] == "/mock/echo/v1/chat/completions"
    assert echo["query"] == "a=1&b=%2F"
    assert echo["headers"]["x-forwarded-for"] == "10.0.0.1"
    assert echo["headers"]["authorization"] == "Bearer k"
    assert ["X-Custom", "one"] in echo["raw_headers"]
    assert echo["body"] == '{"x": 1}'
    assert echo["body_sha256"] == hashlib.sha256(b'{"x": 1}').hexdigest()
    plain = await client.get("/mock/echo", headers=[("X-Twice", "a"), ("X-Twice", "b")])
    assert (await plain.json())["headers"]["x-twice"] == "a, b"


@pytest.mark.parametrize(
    ("path", "status", "kind"),
    [
        ("/mock/status/503", 503, "server_error"),
        ("/mock/status/429/v1/chat/completions", 429, "rate_limit_error"),
        ("/mock/status/404", 404, "invalid_request_error"),
    ],
)
async def test_status_helper_answers_the_status_with_an_openai_error(
    aiohttp_client: MakeClient, path: str, status: int, kind: str
) -> None:
    client = await aiohttp_client(build_app())
    response = await client.post(path)
    assert response.status == status
    assert response.headers["x-request-id"].startswith("req_")
    error = (await response.json())["error"]
    assert error["type"] == kind
    assert set(error) == {"message", "type", "param", "code"}


async def test_status_helper_handles_success_and_out_of_range_codes(
    aiohttp_client: MakeClient,
) -> None:
    client = await aiohttp_client(build_app())
    ok = await client.get("/mock/status/201")
    assert (ok.status, await ok.json()) == (201, {"status": 201})
    empty = await client.get("/mock/status/204")
    assert (empty.status, await empty.read()) == (204, b"")
    odd = await client.get("/mock/status/700")
    assert odd.status == 400


async def test_unknown_routes_and_bad_bodies_get_openai_shaped_errors(
    aiohttp_client: MakeClient,
) -> None:
    client = await aiohttp_client(build_app())
    unknown = await client.get("/v1/nothing")
    assert unknown.status == 404
    assert (await unknown.json())["error"]["message"] == "Invalid URL (GET /v1/nothing)"
    wrong_method = await client.get("/v1/chat/completions")
    assert wrong_method.status == 405
    assert "error" in await wrong_method.json()
    not_json = await client.post("/v1/chat/completions", data=b"{nope")
    assert not_json.status == 400
    not_object = await client.post("/v1/embeddings", data=b"[1]")
    assert not_object.status == 400
    missing = await client.post("/v1/chat/completions", json={"model": "gpt-4o"})
    error = (await missing.json())["error"]
    assert (error["code"], error["param"]) == ("missing_required_parameter", "messages")


async def test_latency_and_chunk_interval_delay_the_answer(aiohttp_client: MakeClient) -> None:
    settings = MockSettings(latency=0.05, chunks=3, chunk_interval=0.02)
    client = await aiohttp_client(build_app(settings))
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json={"messages": [], "stream": True})
    head = time.perf_counter()
    body = await response.read()
    end = time.perf_counter()
    assert head - started >= 0.05
    assert end - started >= 0.05 + 3 * 0.02
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b"data: ") == 1 + 3 + 1 + 1


def test_settings_refuse_nonsense_and_hide_the_key() -> None:
    with pytest.raises(ValueError):
        MockSettings(latency=-1)
    with pytest.raises(ValueError):
        MockSettings(chunks=0)
    assert "sk-secret" not in repr(MockSettings(api_key="sk-secret"))


def test_command_help_names_its_options() -> None:
    result = CliRunner().invoke(mock_upstream_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--latency-ms", "--chunk-interval-ms", "--chunks"):
        assert option in result.output


@pytest.mark.process
async def test_module_runs_as_a_server_with_uvloop() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_proxy.tools.mock_upstream",
        "--port",
        "0",
        "--api-key",
        "sk-cli",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        url = line.split("Running on ")[1].split()[0]
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-cli") as client:
            models = await client.models.list()
        assert models.data[0].id == "gpt-4o-mini"
    finally:
        process.terminate()
        await process.communicate()
    assert process.returncode == 0


@pytest.mark.process
def test_a_port_in_use_stops_the_command_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(cli_command("mock-upstream", "--port", str(port)), clean_env(), timeout=30)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"llm-proxy: mock-upstream: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.process
@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("option", ["--latency-ms", "--chunk-interval-ms"])
def test_a_delay_that_is_not_a_finite_number_stops_the_command(option: str, value: str) -> None:
    # click's FloatRange lets nan through: the mock started, and answered every request 500.
    result = run(cli_command("mock-upstream", "--port", "0", option, value), clean_env())
    assert result.returncode == 2
    assert f"Invalid value for '{option}': '{value}' is not a finite number." in result.stderr


async def test_streams_cut_short_by_the_client_are_counted_as_aborted(
    aiohttp_client: MakeClient,
) -> None:
    client = await aiohttp_client(build_app(MockSettings(chunks=5, chunk_interval=0.02)))
    body = {"messages": [], "stream": True}
    complete = await client.post("/v1/chat/completions", json=body)
    await complete.read()
    cut = await client.post("/v1/chat/completions", json=body)
    await cut.content.readline()
    cut.close()
    for _ in range(100):
        counts = await (await client.get("/mock/streams")).json()
        if counts["aborted"]:
            break
        await asyncio.sleep(0.01)
    assert counts == {"started": 2, "completed": 1, "aborted": 1}


@pytest.mark.process
def test_the_sdk_streams_responses_through_the_proxy_whose_events_carry_the_usage(
    tmp_path: Path,
) -> None:
    """The README's quick start, streamed: the mock and the server as commands, the OpenAI SDK
    through the proxy; each event's usage is the upstream's, from its response.completed."""
    mock = start_mock_upstream(tmp_path / "mock")
    try:
        config = tmp_path / "api_providers.yaml"
        config.write_text(
            "apis:\n"
            "  openai:\n"
            f"    base_url: {mock.base_url}\n"
            "    allowed_endpoints: [/v1/responses]\n"
        )
        log = tmp_path / "events.jsonl"
        server = start_server(tmp_path / "data", config, tmp_path / "logs", FILE_EVENT_LOG=str(log))
        try:
            token = server.issue_token()
            with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=token) as client:
                with client.responses.stream(
                    model="gpt-4o-mini", input="four words in here"
                ) as stream:
                    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
                    final = stream.get_final_response()
                created = client.responses.create(
                    model="gpt-4o-mini", input="two words", stream=True
                )
                last = list(created)[-1]
            events = _lines(log, 2)
        finally:
            assert server.stop() == 0, server.process.stderr
    finally:
        mock.process.stop()
    assert "".join(deltas) == final.output_text == "Hello from the mock upstream,"
    assert last.type == "response.completed"
    assert final.usage is not None and last.response.usage is not None
    for event, usage in zip(events, (final.usage, last.response.usage), strict=True):
        assert event["stream"] is True and event["status"] == 200
        assert event["usage"] == {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
            "source": "upstream",
        }
        assert event["response"]["status"] == "completed"
    assert [e["usage"]["prompt_tokens"] for e in events] == [4, 2]


def _lines(path: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` JSON lines of ``path``, once it has them."""
    deadline = time.monotonic() + 10
    while True:
        text = path.read_text() if path.exists() else ""
        lines = text[: text.rfind("\n") + 1].splitlines()
        if len(lines) >= count:
            return [json.loads(line) for line in lines[:count]]
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
