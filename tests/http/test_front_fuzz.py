"""Random and mutated request bytes against the real server: it always answers or closes in time.

Each example sends well-formed requests, mutated byte by byte (flips, insertions of framing bytes,
deletions, truncation, repetition), in random pieces, on one connection, then reads until the
server closes it. The properties: the connection always ends within the timeouts (never a hang),
no answer is a 5xx of the proxy's own making, and every request of the connection that reached the
upstream had its answer come back from there (none that the proxy refused).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Proxy
from tests.http.answers import Answers

LIMITS = {"head_seconds": 0.5, "keepalive_seconds": 0.3, "body_seconds": 0.5}
TOKEN = "sk-fuzz-token-placeholder-never-valid-00000"


def _requests(token: str) -> list[bytes]:
    # Every request names itself (X-Request-ID: the proxy forwards and echoes it), with a tag each
    # example replaces, so that a straggler of an earlier example is never taken for one of its own.
    auth = f"Authorization: Bearer {token}\r\nX-Request-ID: fuzz-TAGTAG\r\n".encode()
    chat = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    return [
        b"GET /v1/models HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n",
        b"POST /v1/files/upload HTTP/1.1\r\nHost: t\r\n"
        + auth
        + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
        + auth
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(chat)
        + chat,
        b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /manage/projects HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}",
    ]


_INSERTS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b"\x00", b":", b"0", b"chunked", b";", b"%0d"]


@st.composite
def _connection_bytes(draw: st.DrawFn, requests: list[bytes]) -> tuple[list[bytes], bool]:
    chosen = draw(st.lists(st.sampled_from(range(len(requests))), min_size=1, max_size=3))
    data = bytearray(b"".join(requests[i] for i in chosen))
    mutated = draw(st.booleans())
    if mutated:
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data)))
            kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]))
            if kind == "flip":
                # Drawn whatever the position, so that every example draws the same way.
                value = draw(st.integers(0, 255))
                if at < len(data):
                    data[at] = value
            elif kind == "insert":
                data[at:at] = draw(st.sampled_from(_INSERTS))
            elif kind == "delete":
                del data[at : at + draw(st.integers(1, 8))]
            elif kind == "truncate":
                del data[at:]
            elif kind == "repeat":
                data[at:at] = data[at : at + draw(st.integers(1, 40))]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    pieces = [bytes(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [p for p in pieces if p], mutated


@pytest.fixture
async def fuzzed(proxy_factory: Any) -> tuple[Proxy, list[bytes]]:
    proxy: Proxy = await proxy_factory(site=LIMITS)
    return proxy, _requests(await proxy.token())


@pytest.mark.slow
@pytest.mark.timeout(300)
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure here is never the draw's luck
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_any_bytes_get_an_answer_or_a_close_in_time_and_nothing_refused_goes_upstream(
    fuzzed: tuple[Proxy, list[bytes]], data: st.DataObject
) -> None:
    proxy, requests = fuzzed
    tag = os.urandom(3).hex().encode()
    pieces, _ = data.draw(_connection_bytes([r.replace(b"TAGTAG", tag) for r in requests]))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    received = bytearray()
    started = time.monotonic()
    try:
        for piece in pieces:
            if writer.is_closing():
                break
            writer.write(piece)
            await asyncio.sleep(0.002)
        # Head 0.5 s, body gap 0.5 s, idle 0.3 s, each swept within a tenth of a second: a
        # connection still open after a few seconds is hung.
        async with asyncio.timeout(4):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionError:
        pass  # the server closed first, as it may after a refusal
    finally:
        writer.close()
    assert time.monotonic() - started < 4
    answers = Answers()
    if received:
        answers.feed(bytes(received))
    for answer in answers.items:
        from_upstream = answer["headers"].get("x-request-id", "").startswith("req_")
        assert answer["status"] < 500 or from_upstream, answer
    answered = {
        answer["headers"]["llm-proxy-request-id"]
        for answer in answers.items
        if answer["headers"].get("x-request-id", "").startswith("req_")
    }
    await asyncio.sleep(0.05)  # the upstream records a request once it has read it whole
    reached = {seen.headers.get("X-Request-ID", "") for seen in proxy.upstream.requests}
    assert answered <= reached
    # Nothing of this connection reached the upstream without its answer coming back from there.
    assert {rid for rid in reached if tag.decode() in rid} <= answered
