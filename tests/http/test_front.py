"""The front door's HTTP/1.1 handling, byte by byte, with raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from llm_proxy.http.front import MAX_WAITING_REQUESTS, FrontSite
from tests.conftest import Proxy
from tests.raw_servers import RawServers

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def conn(proxy: Proxy) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    yield reader, writer
    writer.close()
    await writer.wait_closed()


RawUpstream = Callable[[dict[str, bytes]], Awaitable[Proxy]]


@pytest.fixture
async def raw_upstream(proxy_factory: Any) -> AsyncIterator[RawUpstream]:
    """A proxy in front of an upstream that answers each path with exact bytes, in one write."""
    servers: list[asyncio.Server] = []

    async def start(answers: dict[str, bytes]) -> Proxy:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while head := await reader.readuntil(b"\r\n\r\n"):
                    writer.write(answers[head.split(b" ")[1].decode()])
            except asyncio.IncompleteReadError:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        proxy: Proxy = await proxy_factory(api={"base_url": f"http://127.0.0.1:{port}"})
        return proxy

    yield start
    for server in servers:
        server.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = b""
    return status, headers, body


def request(
    method: str, path: str, token: str | None = None, body: bytes = b"", **extra: str
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_proxy_and_control_requests_share_a_keep_alive_connection(
    proxy: Proxy, conn: Conn
) -> None:
    reader, writer = conn
    token = await proxy.token()
    for _ in range(3):
        writer.write(request("GET", "/v1/models", token))
        status, headers, body = await read_response(reader)
        assert status == 200 and b'"object":"list"' in body.replace(b" ", b"")
    writer.write(request("GET", "/health"))
    status, _, body = await read_response(reader)
    assert status == 200 and b'"ok"' in body
    writer.write(request("GET", "/v1/models", token))
    status, headers, _ = await read_response(reader)
    assert status == 200 and "llm-proxy-request-id" in headers


async def test_pipelined_requests_are_answered_in_order(proxy: Proxy, conn: Conn) -> None:
    reader, writer = conn
    token = await proxy.token()
    writer.write(
        request("GET", "/v1/models", token, X_Request_ID="first")
        + request("GET", "/v1/nope", token, X_Request_ID="second")
        + request("GET", "/v1/models", token, X_Request_ID="third")
    )
    answers = [await read_response(reader) for _ in range(3)]
    assert [(s, h["llm-proxy-request-id"]) for s, h, _ in answers] == [
        (200, "first"),
        (404, "second"),
        (200, "third"),
    ]


async def test_pipelined_requests_across_proxy_and_control_paths(proxy: Proxy, conn: Conn) -> None:
    reader, writer = conn
    token = await proxy.token()
    writer.write(
        request("GET", "/v1/audio/paced?n=2&gap=0.05", token)
        + request("GET", "/health")
        + request("GET", "/v1/models", token)
        + request("GET", "/manage/projects")
    )
    status, _, body = await read_response(reader)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    status, _, body = await read_response(reader)
    assert status == 200 and b'"ok"' in body
    status, _, body = await read_response(reader)
    assert status == 200 and b'"object":"list"' in body.replace(b" ", b"")
    status, _, body = await read_response(reader)
    assert status == 401 and b'"unauthorized"' in body


def head_of(start: bytes, field: bytes, size: int) -> bytes:
    """``start`` (request line and fields) and copies of the empty field ``field`` (name, colon
    and space), padded by one more field to a head of exactly ``size`` bytes."""
    line = field + b"\r\n"
    count = (size - len(start) - 2) // len(line) - 1
    pad = size - len(start) - 2 - count * len(line) - len(line)
    return start + line * count + field + b"1" * pad + b"\r\n\r\n"


async def test_the_head_limit_counts_every_byte_the_client_sent(proxy: Proxy) -> None:
    token = await proxy.token()
    start = b"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\n" % token.encode()
    # 65,000 empty fields, 260 kB: names and values alone are under the 64 KiB limit.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(start + b"a:\r\n" * 65_000 + b"\r\n")
    status, headers, body = await read_response(reader)
    assert status == 431 and b'"request_header_fields_too_large"' in body
    assert headers["connection"] == "close"
    writer.close()
    assert proxy.upstream.requests == []
    # At the limit to the byte (in fields the proxy never forwards), and one byte over it.
    for size, expected in ((64 * 1024 + 1, 431), (64 * 1024, 200)):
        data = head_of(start, b"X-Real-IP: ", size)
        assert len(data) == size
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        writer.write(data)
        status, _, _ = await read_response(reader)
        writer.close()
        assert status == expected
    assert len(proxy.upstream.requests) == 1


async def test_a_request_line_over_the_head_limit_is_refused_414_as_nginx_does(
    proxy: Proxy,
) -> None:
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(request("GET", "/v1/models?q=" + "a" * 70_000, token))
    status, headers, body = await read_response(reader)
    assert status == 414 and b'"uri_too_long"' in body and headers["connection"] == "close"
    writer.close()
    assert proxy.upstream.requests == []


async def test_malformed_and_oversized_heads(proxy: Proxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 400 and headers["connection"] == "close"
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == 431
    writer.close()


async def test_an_upgrade_is_ignored_and_the_request_served_as_http_1_1(
    proxy: Proxy, conn: Conn
) -> None:
    # As nginx does (RFC 9110 §7.8 lets a server ignore Upgrade): curl --http2 asks for h2c on
    # every http:// request. The requests pipelined behind an upgrade are served as well.
    reader, writer = conn
    token = await proxy.token()
    writer.write(
        request(
            "GET",
            "/v1/models",
            token,
            Connection="Upgrade, HTTP2-Settings",
            Upgrade="h2c",
            HTTP2_Settings="AAMAAABkAARAAAAAAAIAAAAA",
        )
        + request("GET", "/health", Connection="Upgrade", Upgrade="websocket")
        + request("GET", "/v1/models", token, Connection="Upgrade", Upgrade="h2c")
    )
    answers = [await read_response(reader) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert "upgrade" not in answers[0][1] and "connection" not in answers[0][1]
    assert len(proxy.upstream.requests) == 2
    sent = {name.lower() for name in proxy.upstream.requests[0].headers}
    assert not sent & {"upgrade", "http2-settings", "connection"}
    writer.write(request("GET", "/v1/models", token))  # and the connection is kept
    assert (await read_response(reader))[0] == 200


async def test_connection_close_and_http_1_0(proxy: Proxy) -> None:
    token = await proxy.token()
    for raw in (
        request("GET", "/v1/models", token, Connection="close"),
        request("GET", "/v1/models", token).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        writer.write(raw)
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()


async def test_chunked_upload_and_expect_continue(proxy: Proxy, conn: Conn) -> None:
    reader, writer = conn
    token = await proxy.token()
    head = (
        "POST /v1/files/upload HTTP/1.1\r\nHost: t\r\n"
        f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    writer.write(head)
    assert (
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    payload = b"z" * 200_000
    for start in range(0, len(payload), 70_000):
        piece = payload[start : start + 70_000]
        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
    writer.write(b"0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200 and b'"received":200000' in body.replace(b" ", b"")
    assert proxy.upstream.last.body == payload


async def test_head_and_no_body_statuses(proxy: Proxy, conn: Conn) -> None:
    reader, writer = conn
    token = await proxy.token()
    writer.write(request("OPTIONS", "/v1/models"))
    status, _, body = await read_response(reader)
    assert status == 204 and body == b""
    writer.write(request("GET", "/v1/models", token))
    status, _, _ = await read_response(reader)
    assert status == 200


async def test_refusal_before_the_body_closes_the_connection(proxy: Proxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(
        b"POST /v1/files/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10
    )
    status, headers, _ = await read_response(reader)
    assert status == 401 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_refused_large_upload_still_reads_its_answer(proxy: Proxy) -> None:
    # The client sends its whole body without waiting; closing on it with unread bytes would reset
    # the connection and lose the answer, so the proxy lets the rest arrive and discards it.
    body = b"x" * (8 * 1024 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(
        b"POST /v1/files/upload HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sk-"
        + b"Q" * 43
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    status, _, answer = await read_response(reader)
    assert status == 401 and b'"token_not_found"' in answer
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert proxy.upstream.requests == []


async def test_streams_reach_the_client_with_chunked_framing(proxy: Proxy, conn: Conn) -> None:
    reader, writer = conn
    token = await proxy.token()
    writer.write(request("GET", "/v1/audio/paced?n=3&gap=0.01", token))
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


async def test_idle_and_slow_header_connections_are_closed(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(site={"keepalive_seconds": 0.3, "head_seconds": 0.3})
    token = await proxy.token()
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    idle_writer.write(request("GET", "/v1/models", token))
    assert (await read_response(idle_reader))[0] == 200
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    slow_writer.write(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n")  # never finishes its head
    # Both are closed by the server within a few sweeps; the reads end without data.
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    assert await asyncio.wait_for(slow_reader.read(), 5) == b""
    idle_writer.close()
    slow_writer.close()


async def test_stray_line_breaks_do_not_keep_an_idle_connection_open(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(site={"keepalive_seconds": 0.4})
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(request("GET", "/v1/models", token))
    assert (await read_response(reader))[0] == 200
    started = time.monotonic()
    closed = asyncio.create_task(reader.read())
    while not closed.done() and time.monotonic() - started < 5:
        writer.write(b"\r\n")  # bytes outside any request
        await asyncio.sleep(0.05)
    assert closed.done() and time.monotonic() - started < 5
    # Closed either cleanly or, when a line break crossed the close, with a reset: closed all the same.
    with contextlib.suppress(ConnectionResetError):
        assert closed.result() == b""
    writer.close()


async def test_a_silent_new_connection_is_closed_when_its_head_is_late(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(site={"head_seconds": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_stalled_body_is_answered_408_and_its_upstream_request_aborted(
    proxy_factory: Any,
) -> None:
    proxy: Proxy = await proxy_factory(site={"body_seconds": 0.3})
    token = await proxy.token()
    for framing in ("Content-Length: 200000", "Transfer-Encoding: chunked"):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        writer.write(
            f"POST /v1/files/upload HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
            f"{framing}\r\n\r\n".encode()
        )
        writer.write(b"a\r\n0123456789\r\n" if "chunked" in framing else b"0123456789")
        status, headers, body = await read_response(reader)
        assert status == 408 and b'"request_timeout"' in body
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert proxy.upstream.requests == []
    count = (await proxy.manage("GET", "/tokens"))[1][0]["request_count"]
    assert count == 0  # never reached the upstream whole: not counted


async def test_a_client_that_stops_reading_a_stream_is_dropped(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(site={"body_seconds": 0.5})
    token = await proxy.token()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.client.port))
    sock.setblocking(False)
    runner = proxy.client.server.runner
    assert runner is not None
    (site,) = [s for s in runner.sites if isinstance(s, FrontSite)]
    others = set(site._connections)
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(request("GET", "/v1/files/big?size=20000000", token))
    await asyncio.sleep(0.3)
    assert len(site._connections - others) == 1
    await asyncio.sleep(2.0)  # never reads: the proxy's writes stall, then it gives up
    assert not site._connections - others
    writer.close()


async def test_repeated_headers_first_value_counts_and_mixed_case_names_are_dropped(
    proxy: Proxy, conn: Conn
) -> None:
    reader, writer = conn
    token = await proxy.token()
    writer.write(
        (
            "GET /v1/models HTTP/1.1\r\nHost: t\r\n"
            f"authorization: Bearer {token}\r\n"
            "X-Request-Id: first\r\nx-request-id: second\r\n"
            "Cf-Ray: 1\r\nX-FORWARDED-FOR: 10.0.0.1\r\nX-Kept: a\r\n\r\n"
        ).encode()
    )
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["llm-proxy-request-id"] == "first"
    seen = {name.lower(): value for name, value in proxy.upstream.last.headers.items()}
    assert seen["x-request-id"] == "first" and seen["x-kept"] == "a"
    assert "cf-ray" not in seen and "x-forwarded-for" not in seen


async def test_every_other_request_field_reaches_the_upstream_as_the_bytes_it_came_as(
    proxy_factory: Any,
) -> None:
    """SPEC §7: hop-by-hop fields, those named in Connection and every spelling of a client-IP
    field (any case, with underscores, any CF-* name) are dropped; every other field goes upstream
    byte for byte: repeated fields each, in their order, values with odd but legal bytes."""
    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    servers = RawServers()
    port = await servers.start(record)
    try:
        proxy: Proxy = await proxy_factory(api={"base_url": f"http://127.0.0.1:{port}"})
        token = await proxy.token()
        kept = (
            b"X-Dup: 1\r\nx-other: a\r\nX-Dup: 2\r\nX-Odd: caf\xe9 \xff\tx\r\n"
            b"OpenAI-Beta: assistants=v2\r\nx-DUP: 3\r\n"
        )
        dropped = (
            b"X_Forwarded_For: 1\r\nx_real_ip: 1\r\nTrue_Client_IP: 1\r\n"
            b"FASTLY_CLIENT_IP: 1\r\nfastly-client-ip: 1\r\nX-Real-Ip: 1\r\n"
            b"CF_Connecting_IP: 1\r\ncf_anything: 1\r\nCf-Whatever: 1\r\nCF-IPCountry: x\r\n"
            b"Connection: keep-alive, X-Hop\r\nX-Hop: gone\r\nKeep-Alive: timeout=5\r\n"
            b"TE: trailers\r\nProxy-Connection: keep-alive\r\nX-Forwarded_For: 3\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        writer.write(
            b"GET /v1/models?q=a%20b&x=%2F&y=%E2%82%AC HTTP/1.1\r\nHost: t\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n" + dropped + kept + b"\r\n"
        )
        status, _, _ = await read_response(reader)
        writer.close()
    finally:
        await servers.close()
    assert status == 200
    request_line, _, fields = heads[0].partition(b"\r\n")
    assert request_line == b"GET /v1/models?q=a%20b&x=%2F&y=%E2%82%AC HTTP/1.1"
    names = [line.partition(b":")[0].lower() for line in fields.split(b"\r\n") if line]
    assert fields.startswith(kept)
    # After them, only the fields the proxy sets itself.
    assert names[6:] == [b"authorization", b"x-request-id", b"host"]
    assert len(names) == 9


async def test_small_answers_keep_their_framing_whole_in_one_piece(
    raw_upstream: RawUpstream,
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    proxy = await raw_upstream(
        {
            "/v1/files/one": chunked + b"2\r\n{}\r\n1\r\n\n\r\n0\r\n\r\n",
            "/v1/files/empty": chunked + b"0\r\n\r\n",
            "/v1/files/sized": b"HTTP/1.1 201 Made\r\nContent-Length: 3\r\n\r\nabc",
        }
    )
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    answers = []
    for path in ("/v1/files/one", "/v1/files/empty", "/v1/files/sized"):
        writer.write(request("GET", path, token))
        answers.append(await read_response(reader))
    assert [(status, body) for status, _, body in answers] == [
        (200, b"{}\n"),
        (200, b""),
        (201, b"abc"),
    ]
    assert answers[0][1]["transfer-encoding"] == answers[1][1]["transfer-encoding"] == "chunked"
    assert answers[2][1]["content-length"] == "3"
    writer.close()


async def test_field_bytes_and_reasons_are_relayed_exactly_as_they_came(
    raw_upstream: RawUpstream,
) -> None:
    # Upstream fields with obs-text (not UTF-8) and a client's UTF-8 request id come back as the
    # very bytes that were sent, never re-encoded on the way.
    proxy = await raw_upstream(
        {
            "/v1/files/odd": b"HTTP/1.1 299 Fine \xe9t\xe9\r\nX-Odd: caf\xe9 \xff\r\n"
            b"Content-Length: 2\r\n\r\nok",
        }
    )
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(
        b"GET /v1/files/odd HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\nX-Request-ID: r\xc3\xa9q-1\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 299 Fine \xe9t\xe9\r\n")
    assert b"\r\nX-Odd: caf\xe9 \xff\r\n" in head
    assert b"\r\nLLM-Proxy-Request-ID: r\xc3\xa9q-1\r\n" in head
    assert await reader.readexactly(2) == b"ok"
    writer.close()


async def test_a_relayed_head_has_one_date_and_the_framing_of_its_body(
    raw_upstream: RawUpstream,
) -> None:
    # The relay tells the writer which framing fields the upstream sent: its own Date is kept
    # (never a second one), a missing Date is added, and a body without a length goes out chunked.
    proxy = await raw_upstream(
        {
            "/v1/files/dated": b"HTTP/1.1 200 OK\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
            b"Content-Length: 2\r\n\r\nok",
            "/v1/files/undated": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            "/v1/files/unframed": b"HTTP/1.1 200 OK\r\nDate: Tue, 02 Jan 2024 00:00:00 GMT\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        }
    )
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    heads = {}
    for path in ("/v1/files/dated", "/v1/files/undated", "/v1/files/unframed"):
        writer.write(request("GET", path, token))
        heads[path] = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if b"chunked" in heads[path]:
            assert await reader.readuntil(b"0\r\n\r\n") == b"2\r\nok\r\n0\r\n\r\n"
        else:
            assert await reader.readexactly(2) == b"ok"
    writer.close()
    dated, undated, unframed = heads.values()
    assert dated.lower().count(b"\r\ndate: ") == 1
    assert b"\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\n" in dated
    assert undated.lower().count(b"\r\ndate: ") == 1
    assert b"\r\nDate: " in undated and b"2024" not in undated
    assert unframed.lower().count(b"\r\ndate: ") == 1
    assert unframed.lower().count(b"\r\ntransfer-encoding: chunked\r\n") == 1
    assert b"content-length" not in unframed.lower()


async def test_whole_answers_to_a_client_not_reading_wait_for_it(
    raw_upstream: RawUpstream,
) -> None:
    # Each answer arrives whole with its head; together they are more than the kernel's buffers
    # take, so the proxy waits (drains) between answers until the client reads.
    size, count = 96 * 1024, 100
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    proxy = await raw_upstream({"/v1/files/big": head + b"b" * size})
    token = await proxy.token()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.client.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=size * 2)
    writer.write(request("GET", "/v1/files/big", token) * count)
    await asyncio.sleep(0.3)
    for _ in range(count):
        status, _, body = await read_response(reader)
        assert status == 200 and body == b"b" * size
    writer.close()


async def test_a_small_body_arriving_in_pieces_is_forwarded_whole(proxy: Proxy, conn: Conn) -> None:
    reader, writer = conn
    token = await proxy.token()
    writer.write(request("POST", "/v1/files/upload", token, b"hello-world")[:-6])
    await writer.drain()
    await asyncio.sleep(0.05)  # the proxy reads the start of the body and waits for the rest
    writer.write(b"-world")
    status, _, body = await read_response(reader)
    assert status == 200 and b'"received":11' in body.replace(b" ", b"")
    assert proxy.upstream.last.body == b"hello-world"


async def test_stopping_closes_idle_connections_and_lets_requests_in_flight_finish(
    proxy: Proxy,
) -> None:
    token = await proxy.token()
    port = proxy.client.port
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(request("GET", "/v1/models", token))
    assert (await read_response(idle_reader))[0] == 200
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_writer.write(request("GET", "/v1/audio/paced?n=3&gap=0.1", token))
    await asyncio.wait_for(busy_reader.readuntil(b"\r\n\r\n"), 5)  # the stream has begun
    assert proxy.client.server.runner is not None
    (site,) = [s for s in proxy.client.server.runner.sites if isinstance(s, FrontSite)]
    stopping = asyncio.create_task(site.stop())
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    assert not stopping.done()
    rest = await asyncio.wait_for(busy_reader.read(), 5)  # the whole stream, then the close
    assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    await stopping
    idle_writer.close()
    busy_writer.close()


async def test_an_answer_finished_while_stopping_tells_its_client_the_connection_closes(
    proxy: Proxy,
) -> None:
    """The connection closes after the answer in flight: the answer says so, or the client (as
    keep-alive invites) sends its next request on it and has it cut off unanswered."""
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(request("GET", "/v1/audio/slow-head?s=0.5", token))
    await asyncio.sleep(0.1)  # the request is with the upstream
    stopping = asyncio.create_task(front_site(proxy).stop())

    status, headers, _ = await asyncio.wait_for(read_response(reader), 5)

    assert status == 200
    assert headers.get("connection") == "close"
    await stopping
    writer.close()


async def test_a_half_closed_client_ends_its_request_and_the_upstream_one(proxy: Proxy) -> None:
    # As nginx does by default: a client that shuts its side has gone away; its request in flight
    # (and the upstream request behind it) is ended rather than left running.
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(request("GET", "/v1/audio/hang", token))
    await asyncio.wait_for(reader.readuntil(b"data: first\n\n"), 5)  # the stream has begun
    writer.write_eof()
    await asyncio.wait_for(reader.read(), 5)  # the server closes: nothing hangs
    await asyncio.wait_for(proxy.upstream.cancelled.wait(), 5)
    writer.close()


def front_site(proxy: Proxy) -> FrontSite:
    runner = proxy.client.server.runner
    assert runner is not None
    (site,) = [s for s in runner.sites if isinstance(s, FrontSite)]
    return site


async def test_a_flood_of_pipelined_requests_is_answered_up_to_the_limit_then_closed(
    proxy: Proxy, conn: Conn
) -> None:
    reader, writer = conn
    writer.write(request("GET", "/health") * 1000)  # 33 KB: one read, 1,000 requests

    answers = [await read_response(reader) for _ in range(MAX_WAITING_REQUESTS)]

    assert {status for status, _, _ in answers} == {200}
    assert answers[-1][1]["connection"] == "close"
    # The rest was not parsed; a pipelining client sends it again on a new connection.
    assert await asyncio.wait_for(reader.read(), 10) == b""


async def test_a_client_pipelining_without_reading_is_held_back_by_tcp(proxy: Proxy) -> None:
    """While a request is answered, the server reads no further than the next request: the
    client's sends block on TCP's window instead of the server queueing without end."""
    token = await proxy.token()
    others = set(front_site(proxy)._connections)
    sock = socket.create_connection(("127.0.0.1", proxy.client.port))
    sock.sendall(request("GET", "/v1/audio/paced?n=30&gap=0.1", token))  # over 3 s
    # Requests of ~4 KB, so one read holds fewer than MAX_WAITING_REQUESTS of them.
    pipelined = request("GET", "/health", X_Pad="p" * 4000) * 16
    sent, limit = 0, 256 * 1024 * 1024

    def flood() -> None:
        nonlocal sent
        sock.settimeout(0.2)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and sent < limit:
            with contextlib.suppress(TimeoutError):  # blocked: the window is full
                sent += sock.send(pipelined)

    try:
        await asyncio.to_thread(flood)
        assert len(front_site(proxy)._connections - others) == 1  # still served
        # What the kernel's buffers take on loopback (a few MB), not what the client can send.
        assert sent < 32 * 1024 * 1024, sent
    finally:
        sock.close()


async def test_a_closed_connection_and_what_it_queued_are_freed_at_once(proxy: Proxy) -> None:
    """Without waiting for the garbage collector's rare full passes (the server makes them
    rare: runtime/gc_tuning.py)."""
    token = await proxy.token()
    site = front_site(proxy)
    others = set(site._connections)
    gc.disable()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        writer.write(
            request("GET", "/v1/audio/paced?n=2&gap=0.5", token) + request("GET", "/health")
        )
        await asyncio.sleep(0.2)
        (connection,) = site._connections - others
        freed = weakref.ref(connection)
        del connection
        writer.close()  # with a request in flight and one waiting
        await writer.wait_closed()
        for _ in range(50):
            if freed() is None:
                break
            await asyncio.sleep(0.02)
        assert freed() is None
    finally:
        gc.enable()


async def test_a_head_begun_behind_a_waiting_request_is_not_late(proxy_factory: Any) -> None:
    """Reading is held while a pipelined request waits: a head begun meanwhile is due from the
    end of the answers ahead of it, so a long answer ahead of it does not get the connection
    closed."""
    proxy: Proxy = await proxy_factory(site={"head_seconds": 0.5})
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(
        request("GET", "/v1/audio/paced?n=15&gap=0.1", token)  # answered over 1.5 s
        + request("GET", "/health")  # waits its turn
        + b"GET /health HTTP/1.1\r\nHost: t\r\n"  # a third head, begun, not finished
    )
    status, _, body = await read_response(reader)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert (await read_response(reader))[0] == 200
    writer.write(b"\r\n")  # the third head ends, well within its 0.5 s from the answers' end
    assert (await read_response(reader))[0] == 200
    writer.close()


@pytest.mark.parametrize("waiting", [0, 1], ids=["right behind it", "behind a waiting one"])
async def test_a_head_begun_behind_a_long_answer_is_not_late(
    proxy_factory: Any, waiting: int
) -> None:
    """A head begun while a request is answered is due from the end of that answer, as nginx's
    client_header_timeout: a long answer ahead of it (the one in flight, or the one waiting with
    it) is not cut short by the closing of a connection whose next head seemed late."""
    proxy: Proxy = await proxy_factory(site={"head_seconds": 0.5})
    token = await proxy.token()
    long = request("GET", "/v1/audio/paced?n=15&gap=0.1", token)  # answered over 1.5 s
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    try:
        writer.write(long * (1 + waiting) + b"GET /health HTTP/1.1\r\nHost: t\r\n")
        for _ in range(1 + waiting):
            status, _, body = await read_response(reader)
            assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        writer.write(b"\r\n")  # the head ends, well within its 0.5 s from the answers' end
        assert (await read_response(reader))[0] == 200
    finally:
        writer.close()


async def test_a_head_begun_behind_an_answer_and_never_finished_is_closed(
    proxy_factory: Any,
) -> None:
    proxy: Proxy = await proxy_factory(site={"head_seconds": 0.3})
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    try:
        writer.write(request("GET", "/v1/models", token) + b"GET /health HTTP/1.1\r\nHost: t\r\n")
        assert (await read_response(reader))[0] == 200
        assert await asyncio.wait_for(reader.read(), 5) == b""  # its head is late: closed
    finally:
        writer.close()


async def test_a_body_begun_behind_a_long_answer_is_not_late(proxy_factory: Any) -> None:
    """Reading is held while a pipelined request waits: the part of its body that came with its
    head is not the start of a stall, so the answer ahead of it may take longer than the body
    timeout without the request being refused 408 (and the connection closed)."""
    proxy: Proxy = await proxy_factory(site={"body_seconds": 0.5})
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    try:
        writer.write(
            request("GET", "/v1/audio/paced?n=15&gap=0.1", token)  # answered over 1.5 s
            + request("POST", "/v1/files/upload", token, Content_Length="10")
            + b"hello"  # half of its body, in the same write
        )
        status, _, body = await read_response(reader)
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        writer.write(b"world")
        status, _, body = await read_response(reader)
        assert status == 200, body
        assert proxy.upstream.last.body == b"helloworld"
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/health/x", 404, "not_found"),
        ("GET", "/ready/", 404, "not_found"),
        ("GET", "/metrics/x", 404, "not_found"),
        ("POST", "/health", 405, "method_not_allowed"),
        ("DELETE", "/metrics", 405, "method_not_allowed"),
        ("TRACE", "/ready", 405, "method_not_allowed"),
    ],
)
async def test_refusals_beside_the_service_endpoints_have_the_error_shape(
    proxy: Proxy, conn: Conn, method: str, path: str, status: int, code: str
) -> None:
    reader, writer = conn
    writer.write(request(method, path))
    got, headers, body = await read_response(reader)
    assert got == status and headers["content-type"].startswith("application/json")
    assert orjson.loads(body)["error"]["code"] == code
    if status == 405:
        assert headers["allow"] == "GET,HEAD"
