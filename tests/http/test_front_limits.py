"""What a client may not do to a connection, over raw sockets: hold bytes the parser never frames,
trickle a body, or leave a closing connection open by not reading."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llm_proxy.http.front import FrontProtocol
from llm_proxy.http.policy import MAX_HEAD_FIELDS
from tests.conftest import Proxy
from tests.http.test_front import front_site, read_response, request
from tests.raw_servers import silent_server

HEAD_LIMIT = 64 * 1024


async def send_until_answered(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, piece: bytes, most: int
) -> tuple[int, bytes]:
    """Send ``piece`` after ``piece``, each its own read, until the server answers (or ``most``
    bytes went unanswered); the bytes sent and the answer's head."""
    sent = 0
    answered = asyncio.create_task(reader.readuntil(b"\r\n\r\n"))
    try:
        while not answered.done() and sent < most:
            with contextlib.suppress(ConnectionError):
                writer.write(piece)
                await writer.drain()
            sent += len(piece)
            await asyncio.sleep(0.002)
        head = await asyncio.wait_for(asyncio.shield(answered), 5)
    finally:
        answered.cancel()
    return sent, head


@pytest.mark.parametrize(
    "start",
    [b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-A: ", b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-"],
    ids=["value", "name"],
)
async def test_a_header_field_that_never_ends_is_refused_431_at_the_head_limit(
    proxy: Proxy, start: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(start)
    sent, head = await send_until_answered(writer, reader, b"a" * 4096, 4 * 1024 * 1024)
    assert head.startswith(b"HTTP/1.1 431 ") and b"\r\nConnection: close\r\n" in head
    # Refused once its bytes pass the limit (plus what was in flight), never held for more.
    assert sent < 2 * HEAD_LIMIT
    writer.close()
    assert proxy.upstream.requests == []


async def test_a_head_of_more_fields_than_kept_is_refused_431_even_before_it_ends(
    proxy: Proxy,
) -> None:
    """Each field kept costs the server ~100 bytes however short it was sent: a head of tiny
    fields, trickled for its 30 s, is refused once it holds more than MAX_HEAD_FIELDS, not held."""
    token = await proxy.token()
    start = request("GET", "/v1/models", token).removesuffix(b"\r\n")
    # At the limit it is served (a control request: the fake upstream, an aiohttp app, takes
    # fewer); one more field and it is refused, whole or still arriving.
    health = request("GET", "/health").removesuffix(b"\r\n")
    for head, count, expected in (
        (health, MAX_HEAD_FIELDS - 1, 200),  # with its Host
        (start, MAX_HEAD_FIELDS + 1, 431),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        writer.write(head + b"a:\r\n" * count + b"\r\n")
        status, _, _ = await read_response(reader)
        writer.close()
        assert status == expected, count
    assert proxy.upstream.requests == []
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(start)
    sent, head = await send_until_answered(writer, reader, b"a:\r\n" * 64, HEAD_LIMIT // 2)
    assert head.startswith(b"HTTP/1.1 431 ") and b"\r\nConnection: close\r\n" in head
    assert sent <= (MAX_HEAD_FIELDS + 128) * 4  # refused at the read after the one past it
    writer.close()
    assert proxy.upstream.requests == []


async def test_a_head_under_the_limit_arriving_in_pieces_after_a_pipelined_request_is_served(
    proxy: Proxy,
) -> None:
    token = await proxy.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    # The first read ends one request and begins the next, whose head (just under the limit, in
    # a field never forwarded) comes in pieces, the last with its body: none of it is refused.
    start = b"POST /v1/files/upload HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\n" % (
        token.encode()
    )
    field = b"X-Real-IP: " + b"p" * (HEAD_LIMIT - len(start) - 200) + b"\r\n"
    second = start + field + b"Content-Length: 5\r\n\r\nhello"
    writer.write(request("GET", "/v1/models", token) + second[:100])
    for at in range(100, len(second), 8192):
        await asyncio.sleep(0.01)
        writer.write(second[at : at + 8192])
    assert (await read_response(reader))[0] == 200
    status, _, body = await read_response(reader)
    assert status == 200 and b'"received":5' in body.replace(b" ", b"")
    writer.close()


def chunked_upload(token: str) -> bytes:
    return (
        "POST /v1/files/upload HTTP/1.1\r\nHost: t\r\n"
        f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    "framing", [b"1;a=", b"5\r\nhello\r\n0\r\nX-Trailer: "], ids=["extension", "trailer"]
)
async def test_chunk_framing_that_never_ends_is_refused_400(proxy: Proxy, framing: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(chunked_upload(await proxy.token()))
    await asyncio.sleep(0.05)  # admitted: the body is being streamed upstream
    writer.write(framing)
    sent, head = await send_until_answered(writer, reader, b"a" * 1024, 4 * 1024 * 1024)
    assert head.startswith(b"HTTP/1.1 400 ") and b"\r\nConnection: close\r\n" in head
    assert sent < 32 * 1024
    writer.close()
    assert proxy.upstream.requests == []  # its upstream request was aborted


async def test_a_chunked_body_in_many_small_reads_is_forwarded_whole(proxy: Proxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(chunked_upload(await proxy.token()))
    # More framing than data overall, but every read brings some data.
    for n in range(300):
        writer.write(b"1;n=%d\r\n%d\r\n" % (n, n % 10))
        await asyncio.sleep(0.001)
    writer.write(b"0\r\nX-Trailer: yes\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == 200
    assert proxy.upstream.last.body == b"0123456789" * 30
    writer.close()


async def test_a_body_trickled_below_the_minimum_rate_is_answered_408_and_its_upstream_aborted(
    proxy_factory: Any,
) -> None:
    # Never a gap of body_seconds, but after the first body_seconds fewer than body_min_rate
    # bytes a second; a body that keeps the rate goes through.
    proxy: Proxy = await proxy_factory(site={"body_seconds": 0.4, "body_min_rate": 100})
    token = await proxy.token()
    for piece, expected in ((b"a" * 5, 408), (b"a" * 40, 200)):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        writer.write(chunked_upload(token))
        answer = asyncio.create_task(read_response(reader))
        started = time.monotonic()
        while not answer.done() and time.monotonic() - started < 2.0:
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))  # 25 or 200 bytes a second
            await asyncio.sleep(0.2)
        if not answer.done():
            writer.write(b"0\r\n\r\n")
        status, headers, body = await answer
        assert status == expected, body
        if expected == 408:
            assert b"too slowly" in body and headers["connection"] == "close"
            assert proxy.upstream.requests == []  # its upstream request was aborted
        writer.close()
    assert len(proxy.upstream.requests) == 1


async def test_a_body_that_stops_arriving_while_the_server_stops_is_answered_408_not_cut(
    proxy_factory: Any,
) -> None:
    """The stop waits for the requests in flight; the body limit holds while it waits, so an
    upload that stalled is refused as ever instead of holding the stop until its grace ends."""
    proxy: Proxy = await proxy_factory(site={"body_seconds": 0.3, "grace_seconds": 3.0})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(chunked_upload(await proxy.token()) + b"5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)  # its head parsed: in flight when the stop begins

    stopping = asyncio.create_task(proxy.client.server.close())
    status, headers, body = await read_response(reader)

    assert status == 408, body
    assert headers["connection"] == "close"
    await stopping
    writer.close()


def unacknowledged(conn: FrontProtocol) -> int:
    """Bytes the kernel holds that the client has not acknowledged (Linux's SIOCOUTQ)."""
    assert conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])


@pytest.mark.parametrize(
    ("held_by", "last"),
    [
        ("transport", "Connection: close"),
        ("transport", "idle"),
        ("kernel", "Connection: close"),
        ("kernel", "idle"),
    ],
)
async def test_a_closing_connection_whose_client_stopped_reading_is_reset(
    proxy_factory: Any, held_by: str, last: str
) -> None:
    # Small answers fill the kernel's buffers, and some of the transport's (below its pause mark,
    # so nothing waits for a drain) or none; then the server closes, after a last request or
    # idleness. It waited for ever for the transport's bytes; the kernel kept its own for minutes.
    proxy: Proxy = await proxy_factory(site={"linger_seconds": 0.3, "keepalive_seconds": 0.5})
    site = front_site(proxy)
    others = set(site._connections)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.client.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)  # (reads 2 KiB ahead)
    await asyncio.sleep(0.05)
    (conn,) = site._connections - others
    assert conn.transport is not None
    # (A small send buffer on the server's side too, so that they fill in a moment.)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for _ in range(500):
        if held_by == "kernel" and unacknowledged(conn) > 2048:  # more than one send in flight
            break
        if conn.transport.get_write_buffer_size() > 16 * 1024:  # more than the kernel's room
            break
        writer.write(request("GET", "/health") * 5)
        await asyncio.sleep(0.05 if held_by == "kernel" else 0.005)
    await asyncio.sleep(0.1)
    if held_by == "kernel":
        assert unacknowledged(conn) and not conn.transport.get_write_buffer_size()
    else:
        assert 16 * 1024 < conn.transport.get_write_buffer_size() < 64 * 1024
    if last != "idle":
        writer.write(request("GET", "/health", Connection="close"))
    for _ in range(300):
        if conn not in site._connections:
            break
        await asyncio.sleep(0.01)
    assert conn not in site._connections
    # Reset, not closed: a closed socket would be left to the kernel, with its unsent bytes.
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(5):
            while await reader.read(65536):
                pass
    writer.close()


async def test_a_client_reading_slowly_gets_its_whole_answer_before_the_close(
    proxy_factory: Any,
) -> None:
    proxy: Proxy = await proxy_factory(site={"linger_seconds": 0.3})
    token = await proxy.token()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.client.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    writer.write(request("GET", "/v1/files/big?size=300000", token, Connection="close"))
    received = b""
    async with asyncio.timeout(10):
        while chunk := await reader.read(4096):  # 80 KB a second: ~4 s, far past the linger
            received += chunk
            await asyncio.sleep(0.05)
    assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"x" * 300_000)
    writer.close()


async def test_a_refused_upload_still_arriving_after_the_linger_time_is_read_to_its_end(
    proxy_factory: Any,
) -> None:
    """As nginx's lingering close: while the rest of a refused request's body keeps coming, the
    connection is kept to take (and discard) it, so that a client sending its whole body before
    it reads (requests, Node, Java) is not cut off mid-send and told "broken pipe" or "connection
    reset" instead of the answer."""
    proxy: Proxy = await proxy_factory(site={"linger_seconds": 0.5})
    port = proxy.client.port
    body = 2 * 1024 * 1024

    def upload_slowly() -> bytes:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/files/upload HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sk-"
                + b"Q" * 43
                + b"\r\nContent-Length: %d\r\n\r\n" % body
            )
            for _ in range(body // 65536):  # over two seconds: several linger times
                sock.sendall(b"x" * 65536)
                time.sleep(0.08)
            sock.settimeout(5)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    answer = await asyncio.to_thread(upload_slowly)
    assert answer.startswith(b"HTTP/1.1 401 ") and b'"token_not_found"' in answer
    assert proxy.upstream.requests == []


class Listener:
    """An upstream that answers nothing: it records what each connection sent and how it ended."""

    def __init__(self) -> None:
        self.connections: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen: dict[str, Any] = {"data": b"", "end": None}
        self.connections.append(seen)
        try:
            while chunk := await reader.read(65536):
                seen["data"] += chunk
            seen["end"] = "eof"
        except ConnectionResetError:
            seen["end"] = "reset"
        writer.close()


@pytest.fixture
async def listener(proxy_factory: Any) -> AsyncIterator[tuple[Listener, Proxy]]:
    upstream = Listener()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy: Proxy = await proxy_factory(
        api={"base_url": f"http://127.0.0.1:{port}"}, max_request_body_bytes=100_000
    )
    yield upstream, proxy
    server.close()


async def test_a_chunked_body_already_malformed_never_reaches_the_upstream(
    listener: tuple[Listener, Proxy],
) -> None:
    upstream, proxy = listener
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(chunked_upload(await proxy.token()) + b"zz\r\nhello\r\n")
    status, _, _ = await read_response(reader)
    assert status == 400
    writer.close()
    await asyncio.sleep(0.1)
    assert upstream.connections == []  # not even connected to, so never sent the key


async def test_a_chunked_body_over_the_limit_resets_its_upstream_request(
    listener: tuple[Listener, Proxy],
) -> None:
    upstream, proxy = listener
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(chunked_upload(await proxy.token()))
    piece = b"a" * 10_000
    for _ in range(20):
        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
    writer.write(b"0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 413 and b'"request_too_large"' in body
    writer.close()
    for _ in range(100):
        if upstream.connections and upstream.connections[0]["end"]:
            break
        await asyncio.sleep(0.01)
    (seen,) = upstream.connections
    assert seen["data"].startswith(b"POST /v1/files/upload ")  # the body was being streamed
    # A reset, never an end a server could take for that of a whole (truncated) body.
    assert seen["end"] == "reset"


async def test_a_chunked_upload_held_back_by_a_slow_upstream_is_not_refused_as_stalled(
    proxy_factory: Any,
) -> None:
    """While the upstream takes the body slowly, the proxy stops reading it (its high-water mark):
    the client, which cannot send, is not late, even for the chunks of the read parsed after the
    pause, and its request is not answered 408 for the upstream's slowness."""
    taken = asyncio.Event()

    async def slow_to_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.8)  # past the proxy's body timeout, within its upstream idle one
        while not (await reader.readuntil(b"\r\n")).startswith(b"0\r\n"):
            await reader.readuntil(b"\r\n")  # (the proxy's chunks end in CRLF, data aside)
        taken.set()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow_to_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy: Proxy = await proxy_factory(
        api={"base_url": f"http://127.0.0.1:{port}"}, site={"body_seconds": 0.5}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    try:
        writer.write(chunked_upload(await proxy.token()))
        piece = b"a" * 4000
        for _ in range(4000):  # 16 MB in small chunks: many to a read, more than buffers hold
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"ok")
        assert taken.is_set()
    finally:
        writer.close()
        server.close()


async def test_a_body_of_tiny_chunks_waiting_for_its_upstream_holds_little_memory(
    proxy_factory: Any,
) -> None:
    """The body buffered before the upstream takes it is bounded by what it costs, not only by its
    bytes: each piece of it is an object, and a body of 2-byte chunks held many times its size
    below the high-water mark's bytes."""
    async with silent_server() as port:  # its TLS handshake never ends: the body waits
        proxy: Proxy = await proxy_factory(
            api={
                "base_url": f"https://127.0.0.1:{port}",
                "timeouts": {"connect": "30s", "response_header": "1s", "idle": "1s"},
            }
        )
        sock = socket.create_connection(("127.0.0.1", proxy.client.port))
        body = b"2\r\nab\r\n" * 150_000  # 300 KB of data

        def send() -> None:
            with contextlib.suppress(TimeoutError):  # held back: the rest waits in the kernel
                sock.sendall(body)

        try:
            sock.sendall(chunked_upload(await proxy.token()))
            await asyncio.sleep(0.2)  # admitted: waiting for its upstream connection
            sock.settimeout(5)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                await asyncio.to_thread(send)
                await asyncio.sleep(0.5)
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert held < 3 * 1024 * 1024, held
        finally:
            sock.close()
