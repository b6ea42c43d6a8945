"""A request-smuggling corpus against the real server, over real sockets.

Each case writes its bytes on one connection, reads until the server closes it, and then looks at
what the recording fake upstream received: never a smuggled request (its path carries the marker
``SMUGGLED``), never a request the proxy refused, and every answer from the proxy itself a 4xx.
"""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import pytest

from tests.conftest import Proxy

LIMITS = {"head_seconds": 1.0, "keepalive_seconds": 0.5, "body_seconds": 1.0}
SMUGGLED = b"GET /v1/models/SMUGGLED HTTP/1.1\r\nHost: upstream\r\n\r\n"
# (Whitespace around "chunked" is optional whitespace, legal HTTP, and tested as such below.)
BAD_CODINGS = [
    b"chunked\x0b",
    b"\x0bchunked",
    b"x-chunked",
    b"chunked, chunked",
    b"gzip, chunked",
    b"identity",
    b"chunked;q=1",
    b'"chunked"',
]


def _post(auth: bytes, *fields: bytes) -> bytes:
    return (
        b"POST /v1/files/upload HTTP/1.1\r\nHost: t\r\n"
        + auth
        + b"".join(f + b"\r\n" for f in fields)
    )


def corpus(auth: bytes) -> dict[str, bytes]:
    chunked_smuggle = b"0\r\n\r\n" + SMUGGLED
    cases = {
        "CL.TE": _post(auth, b"Content-Length: 6", b"Transfer-Encoding: chunked")
        + b"\r\n"
        + chunked_smuggle,
        "TE.CL": _post(auth, b"Transfer-Encoding: chunked", b"Content-Length: 4")
        + b"\r\n"
        + b"5c\r\n"
        + SMUGGLED
        + b"\r\n0\r\n\r\n",
        "TE.TE two lines": _post(auth, b"Transfer-Encoding: chunked", b"Transfer-Encoding: x")
        + b"\r\n"
        + chunked_smuggle,
        "CL.CL": _post(auth, b"Content-Length: 0", b"Content-Length: 44") + b"\r\n" + SMUGGLED,
        "CL with spaces": _post(auth, b"Content-Length : 0") + b"\r\n" + SMUGGLED,
        "TE in HTTP/1.0": _post(auth, b"Transfer-Encoding: chunked").replace(
            b"HTTP/1.1", b"HTTP/1.0", 1
        )
        + b"\r\n"
        + chunked_smuggle,
        "obs-fold TE": _post(auth, b"X: y", b" Transfer-Encoding: chunked")
        + b"\r\n"
        + chunked_smuggle,
        "LF-only head": _post(auth, b"Content-Length: 0").replace(b"\r\n", b"\n")
        + b"\n"
        + SMUGGLED,
        "CR-only line ends": _post(auth, b"Content-Length: 0").replace(b"\r\n", b"\r")
        + b"\r"
        + SMUGGLED,
        "NUL in a header": _post(auth, b"X-A: a\x00b", b"Content-Length: 0") + b"\r\n" + SMUGGLED,
        "chunk extension smuggle": _post(auth, b"Transfer-Encoding: chunked")
        + b"\r\n5;ext\nhello\r\n0\r\n\r\n"
        + SMUGGLED,
        "bare LF after chunk": _post(auth, b"Transfer-Encoding: chunked")
        + b"\r\n5\r\nhello\n0\r\n\r\n"
        + SMUGGLED,
        "oversized chunk size": _post(auth, b"Transfer-Encoding: chunked")
        + b"\r\n1"
        + b"0" * 20
        + b"\r\nx\r\n0\r\n\r\n"
        + SMUGGLED,
        "space before colon": _post(auth, b"Transfer-Encoding : chunked")
        + b"\r\n"
        + chunked_smuggle,
        "encoded CRLF in target": b"GET /v1/models/x%0d%0aX-Injected:%20yes HTTP/1.1\r\nHost: t\r\n"
        + auth
        + b"\r\n",
        "fragment in target": b"GET /v1/models#SMUGGLED HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n",
        # An upgrade is ignored, but llhttp leaves a body after an upgrade request unframed.
        "upgrade h2c with a body": _post(
            auth, b"Connection: Upgrade", b"Upgrade: h2c", b"Content-Length: %d" % len(SMUGGLED)
        )
        + b"\r\n"
        + SMUGGLED,
        "upgrade with a chunked body": _post(
            auth, b"Connection: Upgrade", b"Upgrade: websocket", b"Transfer-Encoding: chunked"
        )
        + b"\r\n"
        + b"%x\r\n%b\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
        "CONNECT": b"CONNECT upstream:443 HTTP/1.1\r\nHost: upstream:443\r\n"
        + auth
        + b"\r\n"
        + SMUGGLED,
    }
    for n, coding in enumerate(BAD_CODINGS):
        cases[f"coding {n} {coding!r}"] = (
            _post(auth, b"Transfer-Encoding: " + coding) + b"\r\n" + chunked_smuggle
        )
    return cases


async def exchange(proxy: Proxy, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    received = bytearray()
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    return bytes(received)


@pytest.fixture
async def armed(proxy_factory: Any) -> tuple[Proxy, bytes]:
    proxy: Proxy = await proxy_factory(site=LIMITS)
    return proxy, f"Authorization: Bearer {await proxy.token()}\r\n".encode()


async def test_no_smuggled_request_ever_reaches_the_upstream(armed: tuple[Proxy, bytes]) -> None:
    proxy, auth = armed
    for name, data in corpus(auth).items():
        proxy.upstream.requests.clear()
        answer = await exchange(proxy, data)
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
        assert status is not None and 400 <= status < 500, (name, answer[:200])
        await asyncio.sleep(0.05)
        paths = [seen.path_qs for seen in proxy.upstream.requests]
        assert not any("SMUGGLED" in path for path in paths), (name, paths)
        assert paths == [], (name, paths)


@pytest.mark.parametrize("path", ["/v1/files/upload", "/health", "/manage/projects", "/admin/"])
async def test_gzip_bodies_are_never_inflated_into_requests_on_any_path(
    armed: tuple[Proxy, bytes], path: str
) -> None:
    proxy, auth = armed
    body = gzip.compress(b"{}" + b"\r\n\r\n" + SMUGGLED * 3)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Encoding: gzip\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode()
    # First a control request on the same connection, as in the original finding.
    data = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" + head + auth + b"Connection: close\r\n\r\n"
    answer = await exchange(proxy, data + body)
    assert answer.count(b"HTTP/1.1 ") == 2
    await asyncio.sleep(0.05)
    paths = [seen.path_qs for seen in proxy.upstream.requests]
    assert not any("SMUGGLED" in p for p in paths)
    assert paths == (["/v1/files/upload"] if path.startswith("/v1/") else [])


async def test_pipelining_across_proxy_and_control_paths_keeps_every_answer_in_place(
    armed: tuple[Proxy, bytes],
) -> None:
    proxy, auth = armed
    slow = b"GET /v1/audio/paced?n=3&gap=0.05 HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n"
    quick = b"GET /v1/models HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n"
    health = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
    closing = b"GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    answer = await exchange(proxy, slow + health + quick + health + closing)
    parts = answer.split(b"HTTP/1.1 ")[1:]
    assert [p[:3] for p in parts] == [b"200"] * 5
    assert b"data: [DONE]" in parts[0] and b'"ok"' in parts[1] and b'"object"' in parts[2]
    assert b'"ready"' in parts[4]
    assert [seen.path_qs for seen in proxy.upstream.requests] == [
        "/v1/audio/paced?n=3&gap=0.05",
        "/v1/models",
    ]


@pytest.mark.parametrize("coding", [b" chunked", b"chunked ", b"\tchunked", b"Chunked", b"CHUNKED"])
async def test_legal_spellings_of_chunked_frame_the_body_and_nothing_else(
    armed: tuple[Proxy, bytes], coding: bytes
) -> None:
    proxy, auth = armed
    data = _post(auth, b"Transfer-Encoding:" + coding) + b"\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    answer = await exchange(proxy, data)
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 401" in answer  # the pipelined request behind it, which has no token
    await asyncio.sleep(0.05)
    assert [(seen.path_qs, seen.body) for seen in proxy.upstream.requests] == [
        ("/v1/files/upload", b"hello")
    ]
