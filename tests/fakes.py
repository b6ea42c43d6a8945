"""A fake upstream for the proxy's tests: the mock OpenAI server plus routes that misbehave on cue.

It records what arrived (method, path, headers, body) so tests can assert what the proxy forwarded.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import zlib
from dataclasses import dataclass, field

import brotli
import orjson
import zstandard
from aiohttp import web
from multidict import CIMultiDict
from python_multipart import parse_form

from llm_proxy.tools.mock_upstream import MockSettings, build_app


@dataclass
class Seen:
    method: str
    path_qs: str  # the target exactly as it arrived (raw, not decoded)
    headers: dict[str, str]
    body: bytes


@dataclass
class UpstreamLog:
    requests: list[Seen] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    slow_to_decode_sent: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def last(self) -> Seen:
        return self.requests[-1]


UPSTREAM_LOG = web.AppKey("upstream_log", UpstreamLog)


@web.middleware
async def _record(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    body = await request.read()
    request.app[UPSTREAM_LOG].requests.append(
        Seen(request.method, request.raw_path, dict(request.headers), body)
    )
    response = await handler(request)
    if not response.prepared:
        # As OpenAI does: the proxy must pass its own rate-limit headers through untouched.
        response.headers["x-ratelimit-remaining-requests"] = "499"
    return response


async def _slow_head(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "5")))
    return web.json_response({"late": True})


async def _drop_mid_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'data: {"partial": true}\n\n')
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()
    return response


async def _hang_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: first\n\n")
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        request.app[UPSTREAM_LOG].cancelled.set()
        raise
    return response


async def _paced_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for n in range(int(request.query.get("n", "3"))):
        await response.write(f"data: {n}\n\n".encode())
        await asyncio.sleep(float(request.query.get("gap", "0.05")))
    await response.write(b"data: [DONE]\n\n")
    await asyncio.sleep(float(request.query.get("linger", "0")))  # before the end of the body
    return response


async def _gzip_json(request: web.Request) -> web.Response:
    body = gzip.compress(b'{"compressed": true}', mtime=0)
    return web.Response(
        body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )


async def _big(request: web.Request) -> web.Response:
    size = int(request.query.get("size", str(5 * 1024 * 1024)))
    return web.Response(body=b"x" * size, content_type="application/octet-stream")


async def _mirror(request: web.Request) -> web.Response:
    """The request's JSON body as the answer (a body nested as deep as the client's)."""
    return web.Response(body=await request.read(), content_type="application/json")


async def _upload(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"received": len(body)})


async def _transcription(request: web.Request) -> web.Response:
    """Reads the form the way Starlette (so most OpenAI-compatible servers) would."""
    fields: dict[bytes, bytes] = {}
    files: dict[bytes, int] = {}
    parse_form(
        {"Content-Type": request.headers["Content-Type"].encode()},
        io.BytesIO(request.app[UPSTREAM_LOG].last.body),  # _record has read the body
        lambda field: fields.__setitem__(field.field_name, field.value),
        lambda file: files.__setitem__(file.field_name, file.size),
    )
    heard = f"{files[b'file']} bytes heard by {fields[b'model'].decode()}"
    return web.json_response({"text": heard})


async def _status_from_header(request: web.Request) -> web.Response:
    status = int(request.headers.get("X-Fake-Status", "200"))
    return web.json_response(
        {"error": {"message": "upstream says no", "type": "server_error", "code": "fake"}},
        status=status,
        headers={"X-Upstream-Header": "kept", "Server-Timing": "db;dur=5"},
    )


async def _key_refused(request: web.Request) -> web.Response:
    """A 401 quoting the key it refused, whole, as some OpenAI-compatible servers' errors do;
    gzip-compressed with ``?compressed``."""
    answer = web.json_response(
        {"error": {"message": f"Invalid key: {request.headers.get('Authorization')}"}},
        status=401,
    )
    if "compressed" in request.query:
        answer.enable_compression(web.ContentCoding.gzip)
    return answer


async def _key_refused_in_pieces(request: web.Request) -> web.StreamResponse:
    """The same 401, its body sent in two writes that cut the key in two (after its first
    ``?cut=N`` characters, 8 by default); with ``?drop``, the connection closed instead of the
    second write."""
    body = orjson.dumps(
        {"error": {"message": f"Invalid key: {request.headers.get('Authorization')}"}}
    )
    cut = body.index(b"Bearer ") + len(b"Bearer ") + int(request.query.get("cut", "8"))
    response = web.StreamResponse(status=401, headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[:cut])
    await asyncio.sleep(0.05)
    if "drop" in request.query:
        assert request.transport is not None
        request.transport.close()
        return response
    await response.write(body[cut:])
    return response


def _encoded(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(body, mtime=0)
    if coding == "deflate":
        return zlib.compress(body)
    if coding == "br":
        return bytes(brotli.compress(body))
    if coding == "zstd":
        return zstandard.ZstdCompressor().compress(body)
    return b"\x1f\x9d" + body[::-1]  # a coding nobody decodes (here: `compress`, LZW)


def split_in_key(body: bytes, coding: str, kept: int) -> tuple[bytes, bytes]:
    """``body`` in ``coding`` as two parts, the first decoding on its own to ``body`` up to the
    first ``kept`` characters of the key it quotes (a zstd block, a flushed deflate or brotli
    stream ends there)."""
    middle = body.index(b"Bearer ") + len(b"Bearer ") + kept
    if coding == "zstd":
        zstd = zstandard.ZstdCompressor().compressobj()
        first = zstd.compress(body[:middle]) + zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return first, zstd.compress(body[middle:]) + zstd.flush()
    if coding == "br":
        br = brotli.Compressor()
        first = br.process(body[:middle]) + br.flush()
        return first, br.process(body[middle:]) + br.finish()
    deflate = zlib.compressobj(wbits=31 if coding == "gzip" else zlib.MAX_WBITS)
    first = deflate.compress(body[:middle]) + deflate.flush(zlib.Z_SYNC_FLUSH)
    return first, deflate.compress(body[middle:]) + deflate.flush()


async def _key_refused_encoded(request: web.Request) -> web.StreamResponse:
    """The 401 quoting the key, in the content coding ``?coding=`` names (gzip by default); with
    ``?pad=N``, N spaces after it (a body that decodes long); with ``?garbage=N``, N bytes that are
    no coding at all; with ``?empty-frames``, 1 MiB of empty zstd frames; with ``?cut=N``, a body
    cut short just after its first part ends N characters into the key (13 when N is not given;
    see split_in_key), with ``?split=N`` the whole body in those two parts; with ``?also=C``, a second Content-Encoding field C; its body sent apart
    from its head, in two writes, with ``?pieces``."""
    await request.read()
    coding = request.query.get("coding", "gzip")
    quote = orjson.dumps(
        {"error": {"message": f"Invalid key: {request.headers.get('Authorization')}"}}
    )
    body = _encoded(quote + b" " * int(request.query.get("pad", "0")), coding)
    if "garbage" in request.query:
        body = b"x" * int(request.query["garbage"])
    if "cut" in request.query:
        first, rest = split_in_key(quote, coding, int(request.query["cut"] or "13"))
        body = first + rest[:2]
    if "split" in request.query:
        body = b"".join(split_in_key(quote, coding, int(request.query["split"])))
    if "empty-frames" in request.query:  # 1 MiB of zstd frames that decode to nothing
        frame = zstandard.ZstdCompressor().compress(b"")
        body = frame * ((1 << 20) // len(frame))
    headers = CIMultiDict({"Content-Type": "application/json", "Content-Encoding": coding})
    if "also" in request.query:
        headers.add("Content-Encoding", request.query["also"])
    if "pieces" not in request.query:
        return web.Response(status=401, body=body, headers=headers)
    response = web.StreamResponse(status=401, headers=headers)
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    await asyncio.sleep(0.05)
    await response.write(body[len(body) // 2 :])
    return response


def slow_to_decode() -> bytes:
    """A zstd body within the proxy's 1 MiB bound for error answers that is slow to decode: one
    frame per byte it holds, each declaring the largest window a decoder accepts by default."""
    parameters = zstandard.ZstdCompressionParameters(
        window_log=27, write_content_size=False, write_checksum=False
    )
    compressor = zstandard.ZstdCompressor(compression_params=parameters).compressobj()
    frame = compressor.compress(b"a") + compressor.flush()
    return frame * ((1 << 20) // len(frame))


async def _slow_to_decode(request: web.Request) -> web.StreamResponse:
    """A 401 in zstd that is slow to decode (see slow_to_decode); says when it was all sent."""
    await request.read()
    headers = {"Content-Type": "application/json", "Content-Encoding": "zstd"}
    response = web.StreamResponse(status=401, headers=headers)
    body = slow_to_decode()
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body)
    request.app[UPSTREAM_LOG].slow_to_decode_sent.set()
    return response


async def _after_slow_to_decode(request: web.Request) -> web.Response:
    """An answer sent ``?s=`` seconds (0.05 by default) after the body slow to decode was."""
    await request.app[UPSTREAM_LOG].slow_to_decode_sent.wait()
    await asyncio.sleep(float(request.query.get("s", "0.05")))
    return web.json_response({"after": True})


async def _key_echoed(request: web.Request) -> web.Response:
    """An answer of status ``?status=`` echoing the request's Authorization in a debug header,
    and the key alone in another, as a misconfigured gateway in front of a provider might."""
    authorization = request.headers.get("Authorization", "")
    return web.json_response(
        {"echoed": True},
        status=int(request.query.get("status", "200")),
        headers={
            "X-Debug-Authorization": authorization,
            "X-Debug-Key": f"key={authorization.removeprefix('Bearer ')}; seen",
        },
    )


async def _key_echoed_in_body(request: web.Request) -> web.Response:
    """A successful answer quoting the request's Authorization in its body, as an echo server or a
    debugging gateway does."""
    return web.json_response({"seen": {"authorization": request.headers.get("Authorization")}})


def fake_upstream_app(settings: MockSettings | None = None) -> web.Application:
    app = build_app(settings)
    app[UPSTREAM_LOG] = UpstreamLog()
    app.middlewares.append(_record)
    app.router.add_get("/v1/audio/slow-head", _slow_head)
    app.router.add_get("/v1/audio/drop", _drop_mid_body)
    app.router.add_get("/v1/audio/hang", _hang_stream)
    app.router.add_get("/v1/audio/paced", _paced_stream)
    app.router.add_get("/v1/files/gzip", _gzip_json)
    app.router.add_get("/v1/files/big", _big)
    app.router.add_post("/v1/files/upload", _upload)
    app.router.add_post("/v1/files/mirror", _mirror)
    app.router.add_post("/v1/files/key-refused", _key_refused)
    app.router.add_post("/v1/files/key-refused-in-pieces", _key_refused_in_pieces)
    app.router.add_post("/v1/files/key-refused-encoded", _key_refused_encoded)
    app.router.add_get("/v1/files/key-echoed", _key_echoed)
    app.router.add_get("/v1/files/key-echoed-in-body", _key_echoed_in_body)
    app.router.add_post("/v1/files/slow-to-decode", _slow_to_decode)
    app.router.add_get("/v1/files/after-slow-to-decode", _after_slow_to_decode)
    app.router.add_post("/v1/audio/transcriptions", _transcription)
    app.router.add_route("*", "/v1/moderations", _status_from_header)
    return app


def whole_answer_in_two_parts(words: int) -> web.Handler:
    """A handler answering a chat completion of ``words`` tokens as an upstream far away sends a
    whole answer: in two parts two seconds apart, its usage in the second (a client may leave
    between them)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        body = orjson.dumps(
            {
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "word " * words}}
                ],
                "usage": {
                    "prompt_tokens": 9,
                    "completion_tokens": words,
                    "total_tokens": 9 + words,
                },
            }
        )
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:100])
        await asyncio.sleep(2)
        await response.write(body[100:])
        return response

    return answer
