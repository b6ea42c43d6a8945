"""The lean HTTP/1.1 upstream client, against real servers on loopback.

aiohttp apps play a well-behaved upstream; raw ``asyncio.start_server`` servers write exact bytes
where an upstream has to misbehave (drop mid-body, stall, send HTTP/1.0 or garbage).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509

from llm_proxy.errors import UpstreamTimeout, UpstreamUnavailable
from llm_proxy.http.client import HIGH_WATER, Http1Client, Http1Response, _Connection
from llm_proxy.http.upstream import Origin, Timeouts
from tests.certificates import self_signed
from tests.http.relaying import keeping, never_behind, read_all
from tests.raw_servers import Handler, RawServers

FAST = Timeouts(connect=1.0, response_header=1.0, idle=1.0)

RawServer = Callable[[Handler], Awaitable[Origin]]
AiohttpServer = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    http = Http1Client()
    yield http
    await http.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    servers = RawServers()

    async def start(handler: Handler) -> Origin:
        return Origin("http", "127.0.0.1", await servers.start(handler))

    yield start
    await servers.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


class FastUpstream:
    """Answers ``payload`` with a Content-Length, written as fast as the client reads it."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sent = 0  # bytes of the body written so far

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        total = len(self.payload)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for offset in range(0, total, 65536):
            writer.write(self.payload[offset : offset + 65536])
            await writer.drain()
            self.sent = offset + 65536


def origin_of(server: TestServer) -> Origin:
    return Origin(server.scheme, "127.0.0.1", server.port or 0)


async def get(client: Http1Client, origin: Origin, target: str = "/") -> bytes:
    return await read_all(await client.request("GET", origin, target, [], None, FAST))


def peer_port(request: web.Request) -> int:
    assert request.transport is not None
    port: int = request.transport.get_extra_info("peername")[1]
    return port


@pytest.fixture
async def ports_app(aiohttp_server: AiohttpServer) -> Origin:
    """An upstream answering with the client port it sees: one port, one connection."""

    async def hello(request: web.Request) -> web.Response:
        close = request.query.get("close") == "1"
        headers = {"Connection": "close"} if close else {}
        return web.Response(text=str(peer_port(request)), headers=headers)

    app = web.Application()
    app.router.add_get("/", hello)
    return origin_of(await aiohttp_server(app))


async def test_content_length_body_is_returned_with_status_reason_and_headers(
    aiohttp_server: AiohttpServer, client: Http1Client
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=201, body=b"x" * 1000, headers={"X-Thing": "a b"})

    app = web.Application()
    app.router.add_get("/thing", handler)
    origin = origin_of(await aiohttp_server(app))

    response = await client.request("GET", origin, "/thing", [], None, FAST)

    assert (response.status, response.reason) == (201, b"Created")
    assert (b"X-Thing", b"a b") in response.headers
    assert (b"Content-Length", b"1000") in response.headers
    assert await read_all(response) == b"x" * 1000


async def test_chunked_body_yields_each_chunk_as_it_arrives(
    aiohttp_server: AiohttpServer, client: Http1Client
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            await response.write(part)
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    response = await client.request(
        "GET", origin_of(await aiohttp_server(app)), "/", [], None, FAST
    )

    assert (b"Transfer-Encoding", b"chunked") in response.headers
    chunks: list[bytes] = []
    await response.relay(keeping(chunks), never_behind)
    await response.aclose()
    assert chunks == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]


async def test_sequential_requests_reuse_one_connection(
    ports_app: Origin, client: Http1Client
) -> None:
    ports = {await get(client, ports_app) for _ in range(3)}
    assert len(ports) == 1


async def test_connection_close_response_is_not_reused(
    ports_app: Origin, client: Http1Client
) -> None:
    assert await get(client, ports_app, "/?close=1") != await get(client, ports_app)


async def test_head_and_204_have_no_body_and_keep_the_connection(
    aiohttp_server: AiohttpServer, client: Http1Client
) -> None:
    ports: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        ports.append(peer_port(request))
        if request.path == "/empty":
            return web.Response(status=204)
        return web.Response(body=b"hello")

    app = web.Application()
    app.router.add_get("/", handler)
    app.router.add_get("/empty", handler)
    origin = origin_of(await aiohttp_server(app))

    head = await client.request("HEAD", origin, "/", [], None, FAST)
    assert head.status == 200 and (b"Content-Length", b"5") in head.headers
    assert await read_all(head) == b""
    empty = await client.request("GET", origin, "/empty", [], None, FAST)
    assert empty.status == 204
    assert await read_all(empty) == b""
    assert await get(client, origin) == b"hello"
    assert len(ports) == 3 and len(set(ports)) == 1


async def test_body_delimited_by_close_is_read_to_the_end(
    raw_server: RawServer, client: Http1Client
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"second")

    origin = await raw_server(handler)
    assert await get(client, origin) == b"first second"
    assert await get(client, origin) == b"first second"


async def test_informational_response_is_skipped(
    raw_server: RawServer, client: Http1Client
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()

    response = await client.request("POST", await raw_server(handler), "/", [], b"{}", FAST)
    assert response.status == 200
    assert await read_all(response) == b"ok"


async def test_idle_connection_closed_by_upstream_is_not_used(
    raw_server: RawServer, client: Http1Client
) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    origin = await raw_server(handler)
    assert await get(client, origin) == b"ok"
    await asyncio.sleep(0.05)  # the upstream's FIN reaches the pooled connection
    assert await get(client, origin) == b"ok"
    assert connections == 2


def drops_the_second_request(requests: list[bytes]) -> Handler:
    """Answer the first request, then read the next one whole and close without answering, the way
    an upstream dying mid-request (or closing an idle connection as it arrives) would."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            requests.append(head.split(b"\r\n", 1)[0])
            if b"content-length: 3" in head.lower():
                await reader.readexactly(3)
            elif b"transfer-encoding: chunked" in head.lower():
                await reader.readuntil(b"0\r\n\r\n")
            if head.startswith((b"GET /second", b"POST /second")):
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return handler


async def streamed_abc() -> AsyncIterator[bytes]:
    await asyncio.sleep(0.01)
    yield b"abc"


@pytest.mark.parametrize(
    ("method", "body"),
    [("GET", None), ("POST", b"abc"), ("POST", "streamed")],
    ids=["get", "post", "post-streamed"],
)
async def test_request_written_to_a_reused_connection_that_then_closes_is_not_resent(
    raw_server: RawServer, client: Http1Client, method: str, body: bytes | str | None
) -> None:
    requests: list[bytes] = []
    origin = await raw_server(drops_the_second_request(requests))

    assert await get(client, origin, "/first") == b"ok"
    sent = streamed_abc() if body == "streamed" else body
    assert not isinstance(sent, str)
    with pytest.raises(UpstreamUnavailable, match="closed the connection") as caught:
        await client.request(method, origin, "/second", [], sent, FAST)
    assert caught.value.reached_upstream is True
    await asyncio.sleep(0.05)  # a resent request would have arrived by now
    assert requests == [b"GET /first HTTP/1.1", f"{method} /second HTTP/1.1".encode()]


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what is written to it: a pooled connection under the test's control."""

    def __init__(self, *, closing: bool = False) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def pooled_connection(client: Http1Client, origin: Origin, transport: RecordingTransport) -> None:
    """Put a connection on ``transport`` into the client's pool, as if a response had ended."""
    conn = _Connection(
        asyncio.get_running_loop(), client, (origin.scheme, origin.host, origin.port)
    )
    conn.connection_made(transport)
    client._release(conn)


def counting_server(connections: list[bytes]) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            connections.append(head.split(b"\r\n", 1)[0])
            if b"Content-Length: 3" in head:
                await reader.readexactly(3)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return handler


@pytest.mark.parametrize("how", ["closing", "lost"])
async def test_pooled_connection_found_dead_before_writing_is_replaced_by_a_fresh_one(
    raw_server: RawServer, client: Http1Client, how: str
) -> None:
    requests: list[bytes] = []
    origin = await raw_server(counting_server(requests))
    # "closing": the upstream's FIN was read, connection_lost() is still to come; "lost": it came.
    dead = RecordingTransport(closing=how == "closing")
    pooled_connection(client, origin, dead)
    if how == "lost":
        client._pools[(origin.scheme, origin.host, origin.port)][-1].connection_lost(None)

    response = await client.request("POST", origin, "/", [], b"abc", FAST)

    assert await read_all(response) == b"ok"
    assert dead.written == b""
    assert requests == [b"POST / HTTP/1.1"]


async def test_connection_lost_after_the_request_was_written_is_not_retried(
    raw_server: RawServer, client: Http1Client
) -> None:
    requests: list[bytes] = []
    origin = await raw_server(counting_server(requests))
    pooled = RecordingTransport()
    pooled_connection(client, origin, pooled)
    conn = client._pools[(origin.scheme, origin.host, origin.port)][-1]

    pending = asyncio.ensure_future(client.request("POST", origin, "/", [], b"abc", FAST))
    await asyncio.sleep(0)  # the request is written; the transport reports nothing wrong
    assert pooled.written.startswith(b"POST / HTTP/1.1\r\n") and pooled.written.endswith(b"abc")
    conn.connection_lost(ConnectionResetError())

    with pytest.raises(UpstreamUnavailable) as caught:
        await pending
    assert caught.value.reached_upstream is True
    assert pooled.written.count(b"POST") == 1
    assert requests == []  # no second attempt on a fresh connection either


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_upstream_dropping_mid_body_raises_unavailable(
    raw_server: RawServer, client: Http1Client, response: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(response)
        await writer.drain()
        await asyncio.sleep(0.05)

    got = await client.request("GET", await raw_server(handler), "/", [], None, FAST)
    chunks: list[bytes] = []
    with pytest.raises(UpstreamUnavailable):
        await got.relay(keeping(chunks), never_behind)
    await got.aclose()
    assert b"".join(chunks) in (b"0123456789", b"hello")


async def test_upstream_closing_before_the_head_raises_unavailable(
    raw_server: RawServer, client: Http1Client
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)

    with pytest.raises(UpstreamUnavailable, match="closed the connection"):
        await client.request("GET", await raw_server(handler), "/", [], None, FAST)


async def test_invalid_response_raises_unavailable(
    raw_server: RawServer, client: Http1Client
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await reader.read()

    with pytest.raises(UpstreamUnavailable, match="invalid HTTP response"):
        await client.request("GET", await raw_server(handler), "/", [], None, FAST)


async def test_bytes_after_the_response_drop_the_connection(
    raw_server: RawServer, client: Http1Client
) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
        await reader.read()

    origin = await raw_server(handler)
    assert await get(client, origin) == b"ok"
    assert await get(client, origin) == b"ok"
    assert connections == 2


async def test_connection_refused_raises_unavailable(client: Http1Client) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamUnavailable, match="cannot connect") as caught:
        await client.request("GET", Origin("http", "127.0.0.1", port), "/", [], None, FAST)
    assert caught.value.status == 502
    assert caught.value.reached_upstream is False  # the caller may count it as never sent


async def test_connect_timeout_covers_a_stalled_tls_handshake(raw_server: RawServer) -> None:
    # Nothing routable is reachable from a sandbox, so the stall is an upstream that accepts TCP
    # and never answers the TLS ClientHello: the connect timeout spans TCP and TLS.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    origin = await raw_server(handler)
    http = Http1Client(ssl_context=ssl.create_default_context())
    try:
        with pytest.raises(UpstreamTimeout, match="connect timeout") as caught:
            await http.request(
                "GET",
                Origin("https", origin.host, origin.port),
                "/",
                [],
                None,
                Timeouts(connect=0.1),
            )
        assert caught.value.reached_upstream is False
    finally:
        await http.close()


async def test_response_header_timeout(raw_server: RawServer, client: Http1Client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    headers = [(b"Authorization", b"Bearer sk-secret")]
    timeouts = Timeouts(response_header=0.1)
    with pytest.raises(UpstreamTimeout, match="response header timeout") as caught:
        await client.request("GET", await raw_server(handler), "/", headers, None, timeouts)
    assert "sk-secret" not in str(caught.value)
    assert caught.value.reached_upstream is True


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    return self_signed(tmp_path_factory.mktemp("tls"), "127.0.0.1", address)


async def test_tls_upstream_with_trusted_self_signed_certificate(
    aiohttp_server: AiohttpServer, certificate: tuple[Path, Path]
) -> None:
    cert_path, key_path = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_path, key_path)
    ports: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        ports.append(peer_port(request))
        return web.Response(body=b"over tls to " + request.headers["Host"].encode())

    app = web.Application()
    app.router.add_get("/", handler)
    server = await aiohttp_server(app, ssl=server_context)
    origin = Origin("https", "127.0.0.1", server.port or 0)

    untrusting = Http1Client()
    try:
        with pytest.raises(UpstreamUnavailable, match="SSLCertVerificationError"):
            await untrusting.request("GET", origin, "/", [], None, FAST)
    finally:
        await untrusting.close()

    http = Http1Client(ssl_context=ssl.create_default_context(cafile=str(cert_path)))
    try:
        assert await get(http, origin) == f"over tls to 127.0.0.1:{origin.port}".encode()
        assert await get(http, origin) == f"over tls to 127.0.0.1:{origin.port}".encode()
    finally:
        await http.close()
    assert len(set(ports)) == 1


@pytest.fixture
async def echo_hash_app(aiohttp_server: AiohttpServer) -> Origin:
    """Answers with the request body's SHA-256 and its framing headers."""

    async def handler(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
        framing = (
            f"{request.headers.get('Content-Length')} {request.headers.get('Transfer-Encoding')}"
        )
        return web.Response(text=f"{digest.hexdigest()} {framing}")

    app = web.Application()
    app.router.add_post("/", handler)
    return origin_of(await aiohttp_server(app))


async def test_large_bodies_both_ways_keep_their_integrity(
    aiohttp_server: AiohttpServer, echo_hash_app: Origin, client: Http1Client
) -> None:
    payload = os.urandom(20 * 1024 * 1024)
    expected = hashlib.sha256(payload).hexdigest()

    response = await client.request("POST", echo_hash_app, "/", [], payload, FAST)
    assert await read_all(response) == f"{expected} {len(payload)} None".encode()

    async def download(request: web.Request) -> web.Response:
        return web.Response(body=payload)

    app = web.Application()
    app.router.add_get("/", download)
    response = await client.request(
        "GET", origin_of(await aiohttp_server(app)), "/", [], None, FAST
    )
    assert hashlib.sha256(await read_all(response)).hexdigest() == expected


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
async def test_streamed_request_body_arrives_unchanged(
    echo_hash_app: Origin, client: Http1Client, with_length: bool
) -> None:
    parts = [os.urandom(100_000) for _ in range(30)] + [b""] + [b"tail"]
    data = b"".join(parts)

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    headers = [(b"Content-Length", b"%d" % len(data))] if with_length else []
    response = await client.request("POST", echo_hash_app, "/", headers, body(), FAST)
    framing = f"{len(data)} None" if with_length else "None chunked"
    assert await read_all(response) == f"{hashlib.sha256(data).hexdigest()} {framing}".encode()


async def test_slow_reader_pauses_a_fast_upstream(
    raw_server: RawServer, client: Http1Client
) -> None:
    total = 16 * 1024 * 1024
    upstream = FastUpstream(os.urandom(total))

    response = await client.request("GET", await raw_server(upstream), "/", [], None, FAST)
    connection = response._conn
    assert connection is not None
    await asyncio.sleep(0.2)  # no relay yet, while the upstream writes as fast as it can
    assert not connection._transport.is_reading()
    assert upstream.sent < total
    # asyncio reads at most 256 KiB at a time, so the buffer overshoots the mark by one read.
    assert HIGH_WATER < connection._buffered <= HIGH_WATER + 256 * 1024
    assert await read_all(response) == upstream.payload


async def test_abandoned_response_closes_its_connection(
    raw_server: RawServer, client: Http1Client
) -> None:
    closed = asyncio.Event()
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await reader.read()
        closed.set()

    origin = await raw_server(handler)
    response = await client.request("GET", origin, "/", [], None, FAST)
    connection = response._conn
    assert connection is not None
    for _ in range(200):  # wait (bounded) for the first bytes of the body, then walk away
        if connection._buffered:
            break
        await asyncio.sleep(0.01)
    assert list(connection._chunks) == [b"0123456789"]
    await response.aclose()
    await asyncio.wait_for(closed.wait(), 1)
    assert await read_all(response) == b""


async def test_early_response_stops_a_streamed_upload(
    raw_server: RawServer, client: Http1Client
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):
            yield b"x" * 1_000_000
            sent += 1

    response = await client.request("POST", await raw_server(handler), "/", [], body(), FAST)
    assert response.status == 413
    assert sent < 1000
    assert await read_all(response) == b""


async def test_request_head_framing(raw_server: RawServer, client: Http1Client) -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            heads.append(head)
            if b"Content-Length: 2\r\n" in head:
                await reader.readexactly(2)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    origin = await raw_server(handler)
    await read_all(
        await client.request("POST", origin, "/a?b=c", [(b"X-A", "é".encode())], None, FAST)
    )
    given = [(b"Host", b"api.example"), (b"Content-Length", b"2")]
    await read_all(await client.request("PUT", origin, "/", given, b"{}", FAST))
    await read_all(await client.request("GET", origin, "/", [], None, FAST))

    assert heads == [
        f"POST /a?b=c HTTP/1.1\r\nX-A: é\r\nHost: 127.0.0.1:{origin.port}\r\n"
        "Content-Length: 0\r\n\r\n".encode(),
        b"PUT / HTTP/1.1\r\nHost: api.example\r\nContent-Length: 2\r\n\r\n",
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode(),
    ]
    with pytest.raises(ValueError, match="line break"):
        await client.request("GET", origin, "/", [(b"X-A", b"a\r\nX-B: b")], None, FAST)


async def test_idle_pool_is_lifo_bounded_and_expires(ports_app: Origin) -> None:
    http = Http1Client(max_idle_per_origin=2, keepalive_expiry=0.1)

    async def together(n: int) -> list[Http1Response]:
        return await asyncio.gather(
            *(http.request("GET", ports_app, "/", [], None, FAST) for _ in range(n))
        )

    try:
        a, b, c = [await read_all(r) for r in await together(3)]  # c pushes a out: two idle at most
        first, second, third = await together(3)
        assert [await read_all(first), await read_all(second)] == [c, b]  # most recent first
        await asyncio.sleep(0.15)
        d = await read_all(third)  # b and c expired meanwhile: only d stays
        assert d not in (a, b, c)
        assert await get(http, ports_app) == d
        e, f = [await read_all(r) for r in await together(2)]
        await asyncio.sleep(0.15)
        assert await get(http, ports_app) not in (a, b, c, d, e, f)  # both idle ones expired
    finally:
        await http.close()


async def test_close_closes_idle_connections(raw_server: RawServer) -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()
        closed.set()

    origin = await raw_server(handler)
    http = Http1Client()
    pending = await http.request("GET", origin, "/", [], None, FAST)
    assert await get(http, origin) == b"ok"
    await http.close()
    await asyncio.wait_for(closed.wait(), 1)
    assert await read_all(pending) == b"ok"  # a response finished after close() is not pooled


async def test_slow_reader_is_not_subject_to_the_idle_timeout(
    raw_server: RawServer, client: Http1Client
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
        await asyncio.sleep(0.02)
        writer.write(b"3\r\ntwo\r\n0\r\n\r\n")
        await reader.read()

    timeouts = Timeouts(response_header=0.1, idle=0.1)
    response = await client.request("GET", await raw_server(handler), "/", [], None, timeouts)
    chunks: list[bytes] = []

    def behind(chunk: bytes) -> bool:
        chunks.append(chunk)
        return False

    async def slow_drain() -> None:
        await asyncio.sleep(0.15)  # longer than both timeouts, but the upstream is not the slow one

    await response.relay(behind, slow_drain)
    await response.aclose()
    assert chunks == [b"one", b"two"]


async def test_upstream_closing_during_a_streamed_upload_raises_unavailable(
    raw_server: RawServer, client: Http1Client
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(0.1)  # not reading: the client's writes back up, then the close

    async def body() -> AsyncIterator[bytes]:
        for _ in range(1000):
            yield b"x" * 1_000_000

    with pytest.raises(UpstreamUnavailable):
        await client.request("POST", await raw_server(handler), "/", [], body(), FAST)


async def test_body_sent_to_a_head_request_drops_the_connection(
    raw_server: RawServer, client: Http1Client
) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    origin = await raw_server(handler)
    assert await read_all(await client.request("HEAD", origin, "/", [], None, FAST)) == b""
    await asyncio.sleep(0.05)
    assert await get(client, origin) == b"hello"
    assert connections == 2


async def test_unread_but_complete_body_leaves_the_connection_reusable(
    raw_server: RawServer, client: Http1Client
) -> None:
    size = HIGH_WATER // 2  # below the pause mark, so the whole body can arrive unread
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)

    origin = await raw_server(handler)
    response = await client.request("GET", origin, "/", [], None, FAST)
    for _ in range(200):  # wait (bounded) until the whole body arrived, unread
        if response._conn is not None and response._conn.body_done:
            break
        await asyncio.sleep(0.01)
    await response.aclose()
    assert len(await get(client, origin)) == size
    assert connections == 1


async def test_caller_transfer_encoding_is_not_doubled(
    raw_server: RawServer, client: Http1Client
) -> None:
    received = asyncio.get_running_loop().create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        received.set_result(head + await reader.readuntil(b"0\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await reader.read()

    async def body() -> AsyncIterator[bytes]:
        yield b"hello"

    origin = await raw_server(handler)
    headers = [(b"Transfer-Encoding", b"chunked")]
    response = await client.request("POST", origin, "/", headers, body(), FAST)
    await response.aclose()
    assert await received == (
        f"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
        "5\r\nhello\r\n0\r\n\r\n".encode()
    )


async def test_complete_body_is_taken_whole_only_once_it_has_arrived(
    raw_server: RawServer, client: Http1Client
) -> None:
    connections = 0
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await go_on.wait()
        writer.write(b"world")
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    origin = await raw_server(handler)
    response = await client.request("GET", origin, "/", [], None, FAST)
    assert response.complete_body() is None  # half of it so far: nothing is taken
    go_on.set()
    assert await read_all(response) == b"helloworld"
    assert response.complete_body() is None  # read and released already
    response = await client.request("GET", origin, "/", [], None, FAST)
    for _ in range(200):  # wait (bounded) until the whole body arrived
        if response._conn is not None and response._conn.body_done:
            break
        await asyncio.sleep(0.01)
    assert response.complete_body() == b"ok"
    assert await read_all(response) == b""
    assert len(await get(client, origin)) == 2
    assert connections == 1  # taking the body released the connection to the pool


async def test_relay_pushes_every_chunk_then_pools_the_connection(
    raw_server: RawServer, client: Http1Client
) -> None:
    seen_by_upstream: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            seen_by_upstream.append(1)
            # The head and a first chunk in one write: the client has it buffered before relay().
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            for part in (b"second", b"third"):
                await asyncio.sleep(0.05)
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            writer.write(b"0\r\n\r\n")

    origin = await raw_server(handler)
    response = await client.request("GET", origin, "/", [], None, FAST)
    pushed: list[bytes] = []
    drained = 0

    async def drain() -> None:
        nonlocal drained
        drained += 1

    await response.relay(keeping(pushed), never_behind)
    await response.aclose()

    assert pushed == [b"first", b"second", b"third"]
    assert drained == 0  # the sink never said it was behind
    assert await get(client, origin) == b"firstsecondthird"
    assert len(seen_by_upstream) == 2  # the relayed response left its connection reusable


async def test_relay_stops_reading_while_the_sink_is_behind(
    raw_server: RawServer, client: Http1Client
) -> None:
    total = 8 * 1024 * 1024
    upstream = FastUpstream(os.urandom(total))

    timeouts = Timeouts(connect=1.0, response_header=1.0, idle=0.2)
    response = await client.request("GET", await raw_server(upstream), "/", [], None, timeouts)
    connection = response._conn
    assert connection is not None
    digest = hashlib.sha256()
    received = 0
    stalled_at: list[int] = []

    def sink(chunk: bytes) -> bool:
        # Behind once past what the client may buffer before relay() (HIGH_WATER and one read):
        # the pause is then the relay's own.
        nonlocal received
        digest.update(chunk)
        received += len(chunk)
        return bool(stalled_at) or received < 1024 * 1024

    async def drain() -> None:
        assert not stalled_at, "behind only once"
        await asyncio.sleep(0.3)  # longer than the idle timeout would allow, were it running
        assert not connection._transport.is_reading()
        stalled_at.append(upstream.sent)

    await response.relay(sink, drain)
    await response.aclose()

    assert stalled_at and stalled_at[0] < total  # the upstream was held back, not read whole
    assert digest.hexdigest() == hashlib.sha256(upstream.payload).hexdigest()


async def test_idle_timeout_between_body_chunks_runs_from_the_last_one(
    raw_server: RawServer, client: Http1Client
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):  # 0.6 s in all, each gap well inside the 0.25 s idle timeout
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nx\r\n")
        await reader.read()  # then nothing more

    timeouts = Timeouts(idle=0.25)
    response = await client.request("GET", await raw_server(handler), "/", [], None, timeouts)
    pushed: list[bytes] = []
    with pytest.raises(UpstreamTimeout, match="idle timeout"):
        await response.relay(keeping(pushed), never_behind)
    await response.aclose()
    assert pushed == [b"x"] * 6


async def test_relay_raises_what_the_sink_raised_and_drops_the_connection(
    raw_server: RawServer, client: Http1Client
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            await asyncio.sleep(0.05)
            writer.write(b"1\r\nx\r\n")
        await reader.read()

    response = await client.request("GET", await raw_server(handler), "/", [], None, FAST)
    connection = response._conn
    assert connection is not None
    calls = 0

    def sink(chunk: bytes) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a defect in the sink")
        return True

    # Not reported as the upstream's failure ("invalid HTTP response"): the defect is ours.
    with pytest.raises(RuntimeError, match="a defect in the sink"):
        await response.relay(sink, never_behind)
    await response.aclose()
    assert calls == 2
    assert connection.closed
