"""Upstream answers that break HTTP/1.1, through the real proxy over real sockets.

A raw-socket upstream writes exact bytes; a raw client reads what the proxy made of them. The
proxy answers 502 ``upstream_unavailable`` for what it found wrong before a byte of the answer left,
cuts the answer short (no final chunk) for what it found after, never lets the upstream grow it
without bound, and never pools the upstream's connection after either.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_proxy.http.client import MAX_HEAD_BYTES, MAX_HEAD_FIELDS
from tests.conftest import UPSTREAM_KEY, Proxy
from tests.http.answers import Answers
from tests.processes import start_server, write_api_config
from tests.raw_servers import RawServers
from tests.waiting import wait_for_lines

# Answers one request on the upstream's side, given its writer.
Script = Callable[[asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
FLOOD_LINE = b"X-Big: " + b"a" * 8000 + b"\r\n"


@dataclass
class Connections:
    opened: int = 0  # connections the proxy opened to the upstream
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the proxy closed one


@dataclass
class Upstream:
    """A proxy in front of a raw upstream that answers ``/v1/models/ok`` with ``OK`` and anything
    else with the test's script."""

    proxy: Proxy
    token: str
    events: Path
    connections: Connections

    async def get(self, path: str = "/v1/models") -> tuple[dict[str, Any] | None, bytes]:
        """One GET on a new connection: the answer (None if it was cut short), and every byte
        the proxy wrote until the answer ended or the connection closed."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.client.port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {self.token}\r\n\r\n".encode()
        )
        answers, raw = Answers(), b""
        while not answers.items:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            raw += data
            answers.feed(data)
        writer.close()
        return (answers.items[0] if answers.items else None), raw

    async def event(self, count: int = 1) -> dict[str, Any]:
        """The ``count``-th event."""
        events = await wait_for_lines(self.events, count)
        return events[count - 1]


Start = Callable[[Script], Awaitable[Upstream]]


@pytest.fixture
async def upstream(proxy_factory: Any, tmp_path: Path) -> AsyncIterator[Start]:
    servers = RawServers()
    proxies: list[Proxy] = []

    async def start(script: Script) -> Upstream:
        connections = Connections()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.opened += 1
            try:
                while head := await reader.readuntil(b"\r\n\r\n"):
                    if head.startswith(b"GET /v1/models/ok "):
                        writer.write(OK)
                    else:
                        await script(writer)
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                connections.closed.set()
                raise

        port = await servers.start(serve)
        events = tmp_path / "events.jsonl"
        proxy: Proxy = await proxy_factory(
            api={"base_url": f"http://127.0.0.1:{port}"}, file_event_log=events
        )
        proxies.append(proxy)
        return Upstream(proxy, await proxy.token(), events, connections)

    yield start
    for proxy in proxies:  # first, so that the upstream sees its connections closed
        await proxy.client.close()
    await servers.close()


def error_of(answer: dict[str, Any] | None) -> tuple[int, str, str]:
    assert answer is not None
    error = orjson.loads(answer["body"])["error"]
    return answer["status"], error["code"], error["message"]


async def assert_not_pooled(upstream: Upstream) -> None:
    """The next request goes out on a new upstream connection, and is answered."""
    before = upstream.connections.opened
    answer, _ = await upstream.get("/v1/models/ok")
    assert answer is not None and answer["body"] == b"ok"
    assert upstream.connections.opened == before + 1


async def flood(writer: asyncio.StreamWriter, piece: bytes) -> None:
    """Write ``piece`` again and again until the proxy closes the connection (at most 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        writer.write(piece * 16)
        await writer.drain()


# -- the head --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "piece", [FLOOD_LINE, b"a" * 8000], ids=["endless field lines", "one endless line"]
)
async def test_an_endless_response_head_is_refused_502_and_its_connection_closed(
    upstream: Start, piece: bytes
) -> None:
    async def endless_head(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nX-Start: 1\r\n" + (b"X-Big: " if piece[:1] == b"a" else b"")
        )
        await flood(writer, piece)

    up = await upstream(endless_head)
    started = time.monotonic()
    answer, _ = await up.get()
    # At once, not at the response header timeout (1 s here): the flood is stopped at the cap.
    assert time.monotonic() - started < 0.9
    assert error_of(answer) == (502, "upstream_unavailable", "upstream sent too big a header")
    await asyncio.wait_for(up.connections.closed.wait(), 5)
    event = await up.event()
    assert (event["status"], event["error"]) == (502, "upstream_unavailable")
    await assert_not_pooled(up)


async def test_a_head_over_the_size_or_field_limit_in_one_piece_is_refused(
    upstream: Start,
) -> None:
    # Whole answers in one write, head and body: the caps count the head's own bytes and fields.
    def answer_with(fields: list[bytes]) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + b"".join(fields) + b"Content-Length: 2\r\n\r\nok"

    room = MAX_HEAD_BYTES - len(answer_with([b"X-Big: \r\n"])) + len(b"ok")
    many = [b"X-H%d: v\r\n" % n for n in range(MAX_HEAD_FIELDS)]  # Content-Length one more
    heads = {
        "/v1/models/at-the-limit": answer_with([b"X-Big: " + b"a" * room + b"\r\n"]),
        "/v1/models/a-byte-over": answer_with([b"X-Big: " + b"a" * (room + 1) + b"\r\n"]),
        "/v1/models/as-many-fields-as-allowed": answer_with(many[1:]),
        "/v1/models/one-field-more": answer_with(many),
    }
    assert len(heads["/v1/models/at-the-limit"]) == MAX_HEAD_BYTES + len(b"ok")
    paths = iter(heads)

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(heads[next(paths)])

    up = await upstream(answer)
    statuses = {}
    for path in heads:
        got, _ = await up.get(path)
        assert got is not None
        statuses[path] = got["status"]
        if got["status"] == 200:
            assert got["body"] == b"ok"
        else:
            assert error_of(got)[2].startswith("upstream sent too big a header")
    assert list(statuses.values()) == [200, 502, 200, 502]


async def test_a_status_below_100_is_refused_502_at_once(
    upstream: Start,
) -> None:
    async def status_99(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 099 Weird\r\nContent-Length: 0\r\n\r\n")

    up = await upstream(status_99)
    started = time.monotonic()
    answer, _ = await up.get()
    # Not taken for an interim answer, waiting out the response header timeout for a 504.
    assert time.monotonic() - started < 0.9
    assert error_of(answer) == (502, "upstream_unavailable", "upstream sent an invalid status code")
    await assert_not_pooled(up)


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"identity"])
async def test_a_transfer_coding_other_than_chunked_is_refused_502(
    upstream: Start, coding: bytes
) -> None:
    async def coded(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n" % coding)
        writer.write(gzip.compress(b"hello"))

    up = await upstream(coded)
    answer, _ = await up.get()
    assert error_of(answer) == (
        502,
        "upstream_unavailable",
        "upstream sent an unknown Transfer-Encoding",
    )
    event = await up.event()
    assert (event["status"], event["error"]) == (502, "upstream_unavailable")
    await assert_not_pooled(up)


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity, chunked", b",chunked"])
async def test_a_refused_transfer_coding_that_ends_in_chunked_does_not_pool_its_connection(
    upstream: Start, coding: bytes
) -> None:
    # The body is well-framed chunks, so the parser reaches its end: the connection looks whole,
    # but the answer was refused as ambiguous, and another reader may frame it otherwise.
    async def coded(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n2\r\nok\r\n0\r\n\r\n" % coding
        )

    up = await upstream(coded)
    answer, _ = await up.get()
    assert error_of(answer) == (
        502,
        "upstream_unavailable",
        "upstream sent an unknown Transfer-Encoding",
    )
    await asyncio.wait_for(up.connections.closed.wait(), 5)
    await assert_not_pooled(up)


async def test_chunked_in_any_case_is_relayed(upstream: Start) -> None:
    async def chunked(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")

    up = await upstream(chunked)
    answer, _ = await up.get()
    assert answer is not None and (answer["status"], answer["body"]) == (200, b"ok")


@pytest.mark.parametrize(
    "body",
    [b"zz\r\n", b"5\r\nhello\r\nzz\r\n"],
    ids=["at the first chunk", "after a chunk held back"],
)
async def test_a_bad_chunk_before_anything_was_sent_is_answered_502(
    upstream: Start, body: bytes
) -> None:
    # A small answer's head waits to leave with its body: a framing error found meanwhile is
    # answered, not a bare close.
    async def bad_chunk(writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD % b"application/json" + body)

    up = await upstream(bad_chunk)
    answer, _ = await up.get()
    assert error_of(answer) == (
        502,
        "upstream_unavailable",
        "invalid HTTP response from upstream",
    )
    assert answer is not None and "x-request-id" in answer["headers"]
    event = await up.event()
    assert (event["status"], event["error"]) == (502, "upstream_unavailable")
    await assert_not_pooled(up)


async def test_fields_named_in_connection_are_not_relayed(
    upstream: Start,
) -> None:
    async def hop(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Foo\r\nX-Foo: bar\r\n"
            b"Connection: x-secret-internal, Content-Type\r\nX-Secret-Internal: node-17\r\n"
            b'Keep-Alive: timeout=5\r\nSet-Cookie: a=b\r\nAlt-Svc: h3=":443"\r\n'
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )

    up = await upstream(hop)
    answer, _ = await up.get()
    assert answer is not None and answer["body"] == b"{}"
    headers = answer["headers"]
    assert {"x-foo", "x-secret-internal", "connection", "keep-alive"}.isdisjoint(headers)
    # End-to-end fields stay, even one a Connection names (which a sender must not do).
    assert headers["set-cookie"] == "a=b" and headers["alt-svc"] == 'h3=":443"'
    assert headers["content-type"] == "application/json"
    assert up.connections.opened == 1  # the keep-alive upstream connection is kept


async def test_an_upstream_echoing_the_credential_never_shows_the_project_key_to_the_client(
    upstream: Start,
) -> None:
    # As an upstream (a debugging mock, a gateway) that reflects request headers does.
    async def echo(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nAuthorization: Bearer %s\r\n"
            b"Proxy-Authorization: Bearer %s\r\nContent-Length: 2\r\n\r\n{}"
            % (UPSTREAM_KEY.encode(), UPSTREAM_KEY.encode())
        )

    up = await upstream(echo)
    answer, raw = await up.get()
    assert answer is not None and (answer["status"], answer["body"]) == (200, b"{}")
    assert UPSTREAM_KEY.encode() not in raw
    assert {"authorization", "proxy-authorization"}.isdisjoint(answer["headers"])


async def test_an_upstream_at_an_ipv6_address_is_sent_a_valid_host(
    proxy_factory: Any, tmp_path: Path
) -> None:
    hosts: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        hosts.extend(line[6:] for line in head.split(b"\r\n") if line.lower().startswith(b"host: "))
        writer.write(OK)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy: Proxy = await proxy_factory(
            api={"base_url": f"http://[::1]:{port}"}, file_event_log=tmp_path / "events.jsonl"
        )
        up = Upstream(proxy, await proxy.token(), tmp_path / "events.jsonl", Connections())
        answer, _ = await up.get()
        assert answer is not None and (answer["status"], answer["body"]) == (200, b"ok")
        # Brackets, as RFC 3986 writes an IPv6 authority: "::1:PORT" is no host an upstream parses.
        assert hosts == [b"[::1]:%d" % port]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_connection_near_the_upstreams_keep_alive_timeout_is_not_reused(
    proxy_factory: Any, tmp_path: Path
) -> None:
    # The upstream closes a connection left idle for its Keep-Alive timeout, here at the moment a
    # request arrives on it (the race with its timer): that request would be lost, a 502.
    servers = RawServers()
    connections = Connections()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.opened += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=2, max=100\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request, once idle past the timeout

    port = await servers.start(serve)
    try:
        proxy: Proxy = await proxy_factory(api={"base_url": f"http://127.0.0.1:{port}"})
        up = Upstream(proxy, await proxy.token(), tmp_path / "events.jsonl", connections)
        first, raw = await up.get()
        assert first is not None and first["body"] == b"ok"
        assert b"Keep-Alive" not in raw  # hop-by-hop: the upstream's, not the client's
        # Within the timeout, but too near its end for a request to be sure to arrive in time.
        await asyncio.sleep(1.5)
        second, _ = await up.get()
        assert second is not None and (second["status"], second["body"]) == (200, b"ok")
        assert connections.opened == 2
    finally:
        await servers.close()


async def test_a_request_whose_pooled_connection_closes_unanswered_is_sent_upstream_once(
    upstream: Start,
) -> None:
    """SPEC §7: a request is sent upstream at most once. A pooled connection that the upstream
    closes after the request was written on it may have run it: the client gets a 502, and the
    request is never sent again (on a fresh connection, as a client library's retry would)."""
    arrived = 0

    async def close_unanswered(writer: asyncio.StreamWriter) -> None:
        nonlocal arrived
        arrived += 1
        writer.close()

    up = await upstream(close_unanswered)
    first, _ = await up.get("/v1/models/ok")  # its connection is pooled
    assert first is not None and first["body"] == b"ok"
    answer, _ = await up.get("/v1/chat/completions")
    assert error_of(answer)[:2] == (502, "upstream_unavailable")
    await asyncio.sleep(0.2)  # a request sent again would have arrived by now
    assert arrived == 1
    assert up.connections.opened == 1


@pytest.mark.parametrize(
    "timeout", [b"9" * 5000, b"0" * 5000 + b"30"], ids=["endless", "leading zeros"]
)
async def test_a_keep_alive_timeout_of_thousands_of_digits_is_relayed_and_pooled(
    upstream: Start, timeout: bytes
) -> None:
    # Past 4,300 digits int() refuses a number: the proxy answered its own 500 to an upstream's
    # good answer, and logged a traceback.
    async def long_keep_alive(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=%b\r\n" % timeout + OK[17:])

    up = await upstream(long_keep_alive)
    answer, _ = await up.get()
    assert answer is not None and (answer["status"], answer["body"]) == (200, b"ok")
    answer, _ = await up.get("/v1/models/ok")
    assert answer is not None and answer["body"] == b"ok"
    assert up.connections.opened == 1  # kept for the next request


@pytest.mark.parametrize(
    ("status_line", "relayed"),
    [
        (b"HTTP/1.1 200 O\x00K", b"HTTP/1.1 200 OK\r\n"),
        (b"HTTP/1.1 404 Not\x1bFound", b"HTTP/1.1 404 Not Found\r\n"),
        (b"HTTP/1.1 201 Fine\tand dandy \xe9", b"HTTP/1.1 201 Fine\tand dandy \xe9\r\n"),
    ],
    ids=["nul", "escape", "legal"],
)
async def test_a_reason_phrase_with_control_characters_is_replaced_by_the_standard_one(
    upstream: Start, status_line: bytes, relayed: bytes
) -> None:
    # A client's parser may refuse the whole answer over one (h11, under the OpenAI Python SDK,
    # refuses a NUL), and the phrase carries no meaning: the answer is relayed with a legal one.
    async def odd_reason(writer: asyncio.StreamWriter) -> None:
        writer.write(status_line + b"\r\nContent-Length: 2\r\n\r\n{}")

    up = await upstream(odd_reason)
    answer, raw = await up.get()
    assert answer is not None and answer["body"] == b"{}"
    assert raw.startswith(relayed)


async def test_the_proxys_cors_answer_is_the_only_one_the_browser_sees(
    proxy_factory: Any,
) -> None:
    # An upstream that answers CORS itself, allowing every origin: two
    # Access-Control-Allow-Origin values make a browser refuse the answer, and the proxy's
    # allowed_origins decide which origins may read it.
    servers = RawServers()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(
                b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\n"
                b"Access-Control-Allow-Credentials: true\r\n"
                b"Access-Control-Expose-Headers: X-Request-ID\r\nContent-Length: 2\r\n\r\n{}"
            )
            await writer.drain()

    port = await servers.start(serve)
    try:
        proxy: Proxy = await proxy_factory(
            api={"base_url": f"http://127.0.0.1:{port}", "allowed_origins": ["https://app.example"]}
        )
        token = await proxy.token()
        seen = {}
        for origin in ("https://app.example", "https://evil.example"):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
            writer.write(
                f"GET /v1/models HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            answers, raw = Answers(), b""
            while not answers.items:
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data
                raw += data
                answers.feed(data)
            writer.close()
            head = raw.partition(b"\r\n\r\n")[0].lower()
            seen[origin] = [
                line.partition(b": ")[2]
                for line in head.split(b"\r\n")
                if line.startswith(b"access-control-allow-")
            ]
            assert b"access-control-expose-headers: x-request-id" in head
        assert seen == {"https://app.example": [b"https://app.example"], "https://evil.example": []}
        await proxy.client.close()  # first, so that the upstream sees its connections closed
    finally:
        await servers.close()


async def test_an_upstream_gateways_own_llm_proxy_fields_are_not_relayed_beside_ours(
    upstream: Start,
) -> None:
    # An upstream that is itself a gateway like this one (a team's proxy in front of another)
    # answers with the fields of its own token: the client must read its own token's alone.
    async def gateway(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nLLM-Proxy-Request-ID: inner\r\n"
            b"LLM-Proxy-Token-Expires-At: 2000-01-01T00:00:00Z\r\n"
            b"LLM-Proxy-Remaining-Requests: 3\r\nLLM-Proxy-Remaining-Budget-USD: 0.5\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )

    up = await upstream(gateway)
    up.token = await up.proxy.token(max_requests=10)
    answer, raw = await up.get()
    assert answer is not None and answer["body"] == b"{}"
    fields = [
        line.partition(b": ")
        for line in raw.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
        if line.startswith(b"llm-proxy-")
    ]
    names = [name for name, _, _ in fields]
    assert sorted(names) == [
        b"llm-proxy-remaining-requests",
        b"llm-proxy-request-id",
        b"llm-proxy-token-expires-at",
    ]
    values = {name: value for name, _, value in fields}
    assert values[b"llm-proxy-remaining-requests"] == b"9"
    assert values[b"llm-proxy-request-id"] == answer["headers"]["x-request-id"].encode()


@pytest.mark.process
async def test_an_upstream_closing_while_a_streamed_upload_waits_for_its_end_is_a_502(
    tmp_path: Path,
) -> None:
    # On uvloop (the server's loop), writing to a connection that is gone raises: the end of a
    # chunked upload written after the upstream closed must not make a 500 of the proxy's own.
    servers = RawServers()
    closed = asyncio.Event()

    async def close_mid_upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"}\r\n")  # every chunk of the body, not yet its end
        writer.close()
        closed.set()

    port = await servers.start(close_mid_upload)
    api_config = write_api_config(tmp_path / "api.yaml", f"http://127.0.0.1:{port}")
    server = start_server(tmp_path / "data", api_config, tmp_path / "logs")
    try:
        token = await asyncio.to_thread(server.issue_token)
        host, _, server_port = server.base_url.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(server_port))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %b\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1\r\n{\r\n1\r\n}\r\n" % token.encode()
        )
        await asyncio.wait_for(closed.wait(), 5)
        await asyncio.sleep(0.5)  # for the proxy to see the close before the upload ends
        writer.write(b"0\r\n\r\n")
        answers = Answers()
        while not answers.items:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the proxy closed the connection without an answer"
            answers.feed(data)
        writer.close()
        assert error_of(answers.items[0])[:2] == (502, "upstream_unavailable")
    finally:
        server.stop()
        await servers.close()
    assert "front.handler_failed" not in server.process.stderr


# -- the trailer section ---------------------------------------------------------------------------


async def test_trailer_fields_never_join_the_head(
    upstream: Start,
) -> None:
    async def trailers(writer: asyncio.StreamWriter) -> None:
        # Head, body and trailers in one write, as a small answer comes.
        writer.write(
            CHUNKED_HEAD
            % b"application/json"
            + b'7\r\n{"a":1}\r\n0\r\nSet-Cookie: session=attacker\r\n'
            b"X-Request-ID: forged\r\nContent-Type: text/html\r\n\r\n"
        )

    up = await upstream(trailers)
    answer, raw = await up.get()
    assert answer is not None and answer["status"] == 200 and answer["body"] == b'{"a":1}'
    assert b"attacker" not in raw and b"forged" not in raw and b"text/html" not in raw
    assert answer["headers"]["x-request-id"] == answer["headers"]["llm-proxy-request-id"]
    assert (await up.event())["upstream_request_id"] is None
    await up.get("/v1/models/ok")
    assert up.connections.opened == 1  # trailers are legal: the connection is kept


@pytest.mark.parametrize(
    "piece",
    [b"X-Trailer: " + b"a" * 8000 + b"\r\n", b"a" * 8000],
    ids=["endless field lines", "one endless line"],
)
async def test_an_endless_trailer_section_cuts_the_answer_short(
    upstream: Start, piece: bytes
) -> None:
    async def endless_trailers(writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD % b"text/event-stream" + b"a\r\ndata: {}\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"0\r\n" + (b"X-Trailer: " if piece[:1] == b"a" else b""))
        await flood(writer, piece)

    up = await upstream(endless_trailers)
    started = time.monotonic()
    answer, raw = await up.get("/v1/models")
    # Cut short at the cap, not at the idle timeout (1 s here).
    assert time.monotonic() - started < 0.9
    assert answer is None and raw.startswith(b"HTTP/1.1 200 ")
    assert raw.endswith(b"a\r\ndata: {}\n\n\r\n")  # the body, never its end
    await asyncio.wait_for(up.connections.closed.wait(), 5)
    event = await up.event()
    assert (event["status"], event["error"]) == (200, "upstream_unavailable")
    await assert_not_pooled(up)


async def test_trailer_bytes_do_not_keep_a_stream_past_its_idle_timeout(
    upstream: Start,
) -> None:
    async def trickling_trailer(writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD % b"text/event-stream" + b"a\r\ndata: {}\n\n\r\n0\r\nX-T: ")
        for _ in range(40):
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"a")

    up = await upstream(trickling_trailer)
    started = time.monotonic()
    answer, _ = await up.get()
    assert answer is None and time.monotonic() - started < 2.5  # idle timeout: 1 s
    assert (await up.event())["error"] == "upstream_timeout"


# -- a body delimited by the close -----------------------------------------------------------------


@pytest.mark.parametrize("end", ["fin", "reset"])
async def test_a_body_delimited_by_the_close_ends_only_at_a_clean_close(
    upstream: Start, end: str
) -> None:
    async def http10(writer: asyncio.StreamWriter) -> None:
        writer.write(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"partial":')
        await writer.drain()
        await asyncio.sleep(0.1)
        if end == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
        raise ConnectionResetError  # (ends the fake's loop)

    up = await upstream(http10)
    answer, raw = await up.get()
    event = await up.event()
    if end == "fin":
        assert answer is not None and answer["body"] == b'{"partial":'
        assert (event["status"], event["error"]) == (200, None)
    else:
        # Cut short: the bytes that came, without the final chunk that would say they are all.
        assert answer is None and raw.endswith(b'{"partial":\r\n')
        assert (event["status"], event["error"]) == (200, "upstream_unavailable")


# -- a stream the proxy asked usage for ------------------------------------------------------------


async def test_an_endless_event_that_looks_like_the_usage_chunk_is_relayed_as_it_comes(
    upstream: Start,
) -> None:
    """The proxy holds back an incomplete event of a stream it asked usage for, to take out the
    usage chunk once it is whole: an event begun like that chunk but never ended is held only up
    to a bound, then relayed as it comes, so an upstream cannot grow the proxy without end (every
    chunk added to what is held, copied and searched again)."""
    ended = asyncio.Event()
    start = b'data: {"choices":[],"usage":{"x":"'

    async def endless_event(writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD % b"text/event-stream")
        writer.write(b"%x\r\n%b\r\n" % (len(start), start))
        for _ in range(64):  # 1 MiB of one event, and no end to it yet
            writer.write(b"4000\r\n" + b"a" * 0x4000 + b"\r\n")
            await writer.drain()
        await ended.wait()
        writer.write(b'3\r\n"}}\r\n0\r\n\r\n')

    up = await upstream(endless_event)
    chat = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    reader, writer = await asyncio.open_connection("127.0.0.1", up.proxy.client.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %b\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (up.token.encode(), len(chat), chat)
        )
        received = b""
        while received.count(b"a") < 512 * 1024:  # half of it relayed while the event goes on
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, received[:300]
            received += data
        ended.set()
        while not received.endswith(b"0\r\n\r\n"):
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data
            received += data
        answers = Answers()
        answers.feed(received)
        assert answers.items[0]["body"] == start + b"a" * 64 * 0x4000 + b'"}}'
    finally:
        ended.set()
        writer.close()
