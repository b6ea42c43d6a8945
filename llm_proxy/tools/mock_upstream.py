"""A local fake OpenAI server: JSON and SSE answers shaped like OpenAI's, with configurable latency.

Used for demos, for the proxy's tests and as the benchmark upstream, so handlers stay cheap: no
per-request randomness beyond a counter, no sleeping unless asked to.

Besides the OpenAI endpoints it serves test helpers:

- ``/mock/echo`` (any method, any sub-path) answers with what arrived: method, raw path, raw query,
  headers and body. Point the proxy's ``base_url`` at ``http://mock/mock/echo`` to see what the proxy
  forwarded for ``/v1/...``.
- ``/mock/status/{code}`` (any method, any sub-path) answers with that status and an OpenAI-shaped
  error body.
- ``GET /mock/streams`` counts the SSE streams started, completed and aborted by the client (also
  readable in-process as ``app[STREAMS]``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import math
import os
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click
import orjson
import uvloop
from aiohttp import web

from llm_proxy.finite_range import FiniteFloatRange
from llm_proxy.http.front import listening_socket
from llm_proxy.tools.mock_responses import MockResponse

_CREATED = 1_700_000_000
_WORDS = ("Hello", "from", "the", "mock", "upstream,", "a", "fake", "OpenAI", "server.")
_MAX_BODY = 64 * 2**20
_LIMITS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


@dataclass(frozen=True, slots=True)
class MockSettings:
    """How the mock answers. Times are in seconds."""

    latency: float = 0.0  # before the response head, on every /v1/ endpoint
    chunks: int = 5  # words in every answer; content chunks in every stream
    chunk_interval: float = 0.0  # before each streamed content chunk
    model: str = "gpt-4o-mini"  # used when a request names none; listed by /v1/models
    embedding_model: str = "text-embedding-3-small"
    embedding_dimensions: int = 16
    api_key: str | None = field(default=None, repr=False)  # None: any bearer is accepted

    def __post_init__(self) -> None:
        if self.latency < 0 or self.chunk_interval < 0:
            raise ValueError("latency and chunk_interval must not be negative")
        if self.chunks < 1 or self.embedding_dimensions < 1:
            raise ValueError("chunks and embedding_dimensions must be positive")


class _OpenAIError(Exception):
    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = _error_body(status, message, code, param)


def _error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "rate_limit_error"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


class _Ids:
    """Unique ids without the cost of a random draw per request."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self, kind: str) -> str:
        return f"{kind}{self._prefix}{next(self._counter):012x}"


@dataclass(slots=True)
class StreamCounts:
    """How the mock's streams ended, so tests can see that a client hang-up reached upstream."""

    started: int = 0
    completed: int = 0
    aborted: int = 0


SETTINGS = web.AppKey("mock_settings", MockSettings)
IDS = web.AppKey("mock_ids", _Ids)
STREAMS = web.AppKey("mock_streams", StreamCounts)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _front_door(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    try:
        if request.path.startswith("/v1/"):
            _check_key(request, settings.api_key)
            if settings.latency:
                await asyncio.sleep(settings.latency)
        return await handler(request)
    except _OpenAIError as exc:
        return web.Response(status=exc.status, body=exc.body, content_type="application/json")
    except web.HTTPException as exc:
        # aiohttp's own errors (the router's 404/405, 413) would be plain text; OpenAI answers JSON.
        message = exc.reason
        if exc.status in (404, 405):
            message = f"Invalid URL ({request.method} {request.path})"
        body = _error_body(exc.status, message, None)
        return web.Response(status=exc.status, body=body, content_type="application/json")


def _check_key(request: web.Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("Authorization", "")
    if not given:
        raise _OpenAIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise _OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-request-id"] = request.app[IDS].next("req_")


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise _OpenAIError(400, "We could not parse the JSON body of your request.")
    return body


def _require(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise _OpenAIError(
            400,
            f"Missing required parameter: '{name}'.",
            code="missing_required_parameter",
            param=name,
        )
    return body[name]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _words(value: object) -> int:
    """Token counts are word counts: crude, but the same text always counts the same."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return _words(value.get("content")) + _words(value.get("text"))
    return 0


def _pieces(settings: MockSettings, body: dict[str, Any]) -> tuple[list[str], str]:
    """The answer's words (one per stream chunk) and its finish reason."""
    count = settings.chunks
    limit = next((body[k] for k in _LIMITS if k in body), None)
    finish = "stop"
    if isinstance(limit, int) and 0 < limit < count:
        count, finish = limit, "length"
    words = [_WORDS[i % len(_WORDS)] for i in range(count)]
    return [word + " " for word in words[:-1]] + words[-1:], finish


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def _stream(
    request: web.Request,
    settings: MockSettings,
    events: Iterator[dict[str, Any] | None],
    *,
    named: bool = False,
) -> web.StreamResponse:
    """Send ``events`` as SSE; a ``None`` event stands for "sleep one chunk interval". Chat and
    completions streams end with ``data: [DONE]``; ``named`` ones (the Responses API) name each
    event by its type instead, and end with their last event."""
    streams = request.app[STREAMS]
    streams.started += 1
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    ended = False
    try:
        for event in events:
            if event is None:
                if settings.chunk_interval:
                    await asyncio.sleep(settings.chunk_interval)
                continue
            data = b"data: " + orjson.dumps(event) + b"\n\n"
            if named:
                data = b"event: " + str(event["type"]).encode() + b"\n" + data
            await response.write(data)
        if not named:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        ended = True
    except ConnectionResetError:
        # The client hung up mid-stream: expected (the proxy's cancellation tests do it), so it is
        # counted rather than logged as a handler failure.
        pass
    finally:
        # A server with handler_cancellation (aiohttp's test server) cancels instead: same count.
        if ended:
            streams.completed += 1
        else:
            streams.aborted += 1
    return response


async def _chat(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    body = await _json_body(request)
    prompt = _words(_require(body, "messages"))
    pieces, finish = _pieces(settings, body)
    head = {
        "id": request.app[IDS].next("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or settings.model,
        "system_fingerprint": "fp_mock",
    }
    if body.get("stream") is True:
        head["object"] = "chat.completion.chunk"
        return await _stream(request, settings, _chat_events(head, pieces, finish, prompt, body))
    message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return _json({**head, "choices": [choice], "usage": _usage(prompt, len(pieces))})


def _chat_events(
    head: dict[str, Any], pieces: list[str], finish: str, prompt: int, body: dict[str, Any]
) -> Iterator[dict[str, Any] | None]:
    usage = _include_usage(body)
    if usage:
        # OpenAI sends "usage": null on every chunk but the last when usage was asked for.
        head = {**head, "usage": None}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for piece in pieces:
        yield None
        yield chunk({"content": piece})
    yield chunk({}, finish)
    if usage:
        yield {**head, "choices": [], "usage": _usage(prompt, len(pieces))}


async def _completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    body = await _json_body(request)
    prompt = _words(_require(body, "prompt"))
    pieces, finish = _pieces(settings, body)
    head = {
        "id": request.app[IDS].next("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model") or settings.model,
    }
    if body.get("stream") is True:
        return await _stream(
            request, settings, _completion_events(head, pieces, finish, prompt, body)
        )
    choice = {"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": finish}
    return _json({**head, "choices": [choice], "usage": _usage(prompt, len(pieces))})


def _completion_events(
    head: dict[str, Any], pieces: list[str], finish: str, prompt: int, body: dict[str, Any]
) -> Iterator[dict[str, Any] | None]:
    def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    for piece in pieces:
        yield None
        yield chunk(piece)
    yield chunk("", finish)
    if _include_usage(body):
        yield {**head, "choices": [], "usage": _usage(prompt, len(pieces))}


async def _embeddings(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    body = await _json_body(request)
    given = _require(body, "input")
    items = [given] if isinstance(given, str) or _is_tokens(given) else given
    if not isinstance(items, list) or not items:
        raise _OpenAIError(400, "'input' must be a string or a non-empty array.", param="input")
    dimensions = body.get("dimensions") or settings.embedding_dimensions
    if not isinstance(dimensions, int) or not 0 < dimensions <= 4096:
        raise _OpenAIError(400, "'dimensions' must be between 1 and 4096.", param="dimensions")
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for index, item in enumerate(items):
        tokens += len(item) if _is_tokens(item) else _words(item)
        vector = _vector(orjson.dumps(item), dimensions)
        encoded: object = base64.b64encode(vector.tobytes()).decode() if as_base64 else list(vector)
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    model = body.get("model") or settings.embedding_model
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return _json({"object": "list", "data": data, "model": model, "usage": usage})


def _is_tokens(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def _vector(seed: bytes, dimensions: int) -> array[float]:
    """A unit vector derived from the input, in float32 so float and base64 answers agree."""
    raw = array("H", hashlib.shake_256(seed).digest(2 * dimensions))
    values = [v / 32767.5 - 1.0 for v in raw]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return array("f", (v / norm for v in values))


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _CREATED, "owned_by": "openai"}


def _model_ids(settings: MockSettings) -> list[str]:
    return list(dict.fromkeys((settings.model, settings.embedding_model)))


async def _models(request: web.Request) -> web.Response:
    ids = _model_ids(request.app[SETTINGS])
    return _json({"object": "list", "data": [_model(model_id) for model_id in ids]})


async def _get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    if model_id not in _model_ids(request.app[SETTINGS]):
        message = f"The model '{model_id}' does not exist"
        raise _OpenAIError(404, message, code="model_not_found", param="model")
    return _json(_model(model_id))


async def _responses(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    body = await _json_body(request)
    prompt = _words(_require(body, "input"))
    pieces, finish = _pieces(settings, body)
    ids = request.app[IDS]
    answer = MockResponse(
        id=ids.next("resp_"),
        message_id=ids.next("msg_"),
        model=body.get("model") or settings.model,
        created_at=int(time.time()),
        pieces=pieces,
        finish=finish,
        prompt_tokens=prompt,
    )
    if body.get("stream") is True:
        return await _stream(request, settings, answer.events(), named=True)
    return _json(answer.body())


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    raw = [[name.decode("latin-1"), value.decode("latin-1")] for name, value in request.raw_headers]
    # The request target exactly as sent, so path and query normalisation can be checked.
    path, _, query = request.raw_path.partition("?")
    return _json(
        {
            "method": request.method,
            "path": path,
            "query": query,
            "headers": headers,
            "raw_headers": raw,
            "body": body.decode("utf-8", "replace"),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
    )


async def _stream_counts(request: web.Request) -> web.Response:
    counts = request.app[STREAMS]
    return _json(
        {"started": counts.started, "completed": counts.completed, "aborted": counts.aborted}
    )


async def _status(request: web.Request) -> web.Response:
    status = int(request.match_info["code"])
    if not 200 <= status <= 599:
        raise _OpenAIError(400, "The mock answers statuses 200 to 599 only.")
    if status >= 400:
        body = _error_body(status, f"Mock upstream answered {status}.", None)
        return web.Response(status=status, body=body, content_type="application/json")
    if status in (204, 304):
        return web.Response(status=status)
    return _json({"status": status}, status)


def build_app(settings: MockSettings | None = None) -> web.Application:
    """The fake OpenAI server as an aiohttp application."""
    app = web.Application(middlewares=[_front_door], client_max_size=_MAX_BODY)
    app[SETTINGS] = settings or MockSettings()
    app[IDS] = _Ids()
    app[STREAMS] = StreamCounts()
    app.on_response_prepare.append(_add_request_id)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _get_model)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_get("/mock/streams", _stream_counts)
    app.router.add_route("*", "/mock/echo", _echo)
    app.router.add_route("*", "/mock/echo/{tail:.*}", _echo)
    app.router.add_route("*", r"/mock/status/{code:\d{3}}", _status)
    app.router.add_route("*", r"/mock/status/{code:\d{3}}/{tail:.*}", _status)
    return app


@click.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8081, show_default=True, type=click.IntRange(0, 65535), help="0: any free."
)
@click.option(
    "--latency-ms",
    default=0.0,
    show_default=True,
    type=FiniteFloatRange(min=0),
    help="Delay before every /v1/ response head.",
)
@click.option(
    "--chunk-interval-ms",
    default=0.0,
    show_default=True,
    type=FiniteFloatRange(min=0),
    help="Delay before each streamed content chunk.",
)
@click.option(
    "--chunks",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Words per answer, i.e. content chunks per stream.",
)
@click.option(
    "--model",
    default="gpt-4o-mini",
    show_default=True,
    help="Model named when a request names none.",
)
@click.option(
    "--api-key",
    envvar="MOCK_UPSTREAM_API_KEY",
    show_envvar=True,
    default=None,
    help="Accept only this bearer key (default: accept any).",
)
def mock_upstream_command(
    host: str,
    port: int,
    latency_ms: float,
    chunk_interval_ms: float,
    chunks: int,
    model: str,
    api_key: str | None,
) -> None:
    """Run a local fake OpenAI server (JSON and SSE answers, configurable latency)."""
    settings = MockSettings(
        latency=latency_ms / 1000,
        chunks=chunks,
        chunk_interval=chunk_interval_ms / 1000,
        model=model,
        api_key=api_key,
    )
    try:
        # Bound here, so that a port in use is one line rather than run_app's traceback.
        sock = listening_socket(host, port, reuse_port=False)
        sock.listen(128)
    except OSError as exc:
        click.echo(
            f"llm-proxy: mock-upstream: cannot listen on {host}:{port}: {exc.strerror}", err=True
        )
        sys.exit(1)
    web.run_app(
        build_app(settings),
        sock=sock,
        loop=uvloop.new_event_loop(),
        access_log=None,
        print=click.echo,
    )


if __name__ == "__main__":
    mock_upstream_command()
