"""The front door's HTTP/1.1 policy, driven byte by byte through a mock transport.

As uvicorn's protocol tests do, each test feeds exact bytes to a :class:`FrontProtocol` and reads
exactly what it wrote back; the handler behind it is the real proxy of the ``proxy`` fixture in
front of the recording fake upstream, so every test also asserts what the upstream received —
nothing, for the attacks.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
from collections.abc import Callable
from typing import Any

import pytest

from llm_proxy.http.control_bridge import ControlPlane
from llm_proxy.http.front import FrontLimits, FrontProtocol
from tests.conftest import Proxy
from tests.http.answers import Answers


class MockTransport(asyncio.Transport):
    """Records what the protocol writes; closing delivers ``connection_lost`` as asyncio does."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.closed = False
        self.eof_written = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof_written, "written after the end of the response stream"
        if not self.closed:
            self.written += bytes(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0  # written at once

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True


class Client:
    def __init__(self, proxy: Proxy, limits: FrontLimits) -> None:
        runner = proxy.client.server.runner
        assert runner is not None and runner.server is not None
        self.protocol = FrontProtocol(
            proxy.components.proxy, ControlPlane(runner.server), set(), limits
        )
        self.transport = MockTransport(self.protocol)
        self.protocol.connection_made(self.transport)
        self._seen = 0
        self.responses = Answers()

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    async def until(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.005)

    async def response(self, index: int = 0) -> dict[str, Any]:
        def parsed() -> bool:
            new = bytes(self.transport.written[self._seen :])
            self._seen += len(new)
            if new:
                self.responses.feed(new)
            return len(self.responses.items) > index

        await self.until(parsed)
        return self.responses.items[index]

    async def closed(self) -> None:
        await self.until(lambda: self.transport.closed or self.transport.eof_written)


@pytest.fixture
async def client(proxy: Proxy) -> Client:
    return Client(proxy, FrontLimits())


def head(method: str, target: str, *fields: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


ADMIN = "Authorization: Basic " + base64.b64encode(b"admin:admin-secret").decode()


async def auth(proxy: Proxy) -> str:
    return f"Authorization: Bearer {await proxy.token()}"


# -- request smuggling -----------------------------------------------------------------------


async def test_a_gzip_body_after_a_control_request_is_forwarded_as_sent_never_inflated(
    proxy: Proxy, client: Client
) -> None:
    smuggled = b"GET /admin/X HTTP/1.1\r\nHost: upstream\r\n\r\n"
    body = gzip.compress(b"x" * 64 + smuggled)
    client.send(head("GET", "/health", "Host: t"))
    assert (await client.response(0))["status"] == 200
    client.send(
        head(
            "POST",
            "/v1/files/upload",
            "Host: t",
            await auth(proxy),
            "Content-Encoding: gzip",
            f"Content-Length: {len(body)}",
        )
        + body
    )
    answer = await client.response(1)
    assert answer["status"] == 200
    assert [r.path_qs for r in proxy.upstream.requests] == ["/v1/files/upload"]
    # The fake upstream (aiohttp) inflates what it receives: the smuggled request is body content.
    assert proxy.upstream.last.body == b"x" * 64 + smuggled
    assert proxy.upstream.last.headers["Content-Encoding"] == "gzip"


@pytest.mark.parametrize(
    ("fields", "body"),
    [
        (["Content-Length: 5", "Transfer-Encoding: chunked"], b"0\r\n\r\n"),  # CL.TE
        (["Transfer-Encoding: chunked", "Content-Length: 5"], b"0\r\n\r\n"),  # TE.CL
        (["Transfer-Encoding: gzip", "Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
        (["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], b"0\r\n\r\n"),
        (["Transfer-Encoding: xchunked"], b"5\r\nhello\r\n0\r\n\r\n"),
        (["Transfer-Encoding: chunked, identity"], b"0\r\n\r\n"),
        (["Transfer-Encoding: chunked\t"], b"0\r\n\r\n"),
        (["Transfer-Encoding: gzip, chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
        (["Content-Length: 5", "Content-Length: 5"], b"hello"),
        (["Content-Length: 5, 5"], b"hello"),
        (["Content-Length: +5"], b"hello"),
        (["Content-Length: 0x5"], b"hello"),
        (["Content_Length: 5", "Transfer-Encoding: chunked"], b"0\r\n\r\n"),  # tolerated
    ],
)
async def test_ambiguous_framing_is_refused_and_never_reaches_upstream(
    proxy: Proxy, client: Client, fields: list[str], body: bytes
) -> None:
    client.send(head("POST", "/v1/files/upload", "Host: t", await auth(proxy), *fields) + body)
    answer = await client.response()
    if fields[0] == "Content_Length: 5":
        assert answer["status"] == 200
        seen = {k.lower() for k in proxy.upstream.last.headers}
        assert "content_length" not in seen  # an underscore spelling never goes on
        return
    assert answer["status"] == 400
    assert answer["headers"]["connection"] == "close"
    await client.closed()
    assert proxy.upstream.requests == []


@pytest.mark.parametrize("zeros", [1, 5000], ids=["one", "more-than-int-parses"])
async def test_a_content_length_with_leading_zeros_frames_its_body(
    proxy: Proxy, client: Client, zeros: int
) -> None:
    # 1*DIGIT (RFC 9110 §8.6): leading zeros are legal, and llhttp takes them. Past 4,300 digits
    # int() refused the text, and the request was answered 500 with an error logged.
    length = "Content-Length: " + "0" * zeros + "5"
    client.send(
        head("POST", "/v1/files/upload", "Host: t", await auth(proxy), length)
        + b"hello"
        + head("GET", "/health", "Host: t", length)
        + b"hello"
    )
    assert (await client.response(0))["status"] == 200
    assert proxy.upstream.last.body == b"hello"
    assert (await client.response(1))["status"] == 200


async def test_whitespace_after_a_field_value_is_not_part_of_it(
    proxy: Proxy, client: Client
) -> None:
    # RFC 9110 §5.5: a value excludes the whitespace around it; llhttp strips only the leading.
    client.send(
        head(
            "POST", "/v1/files/upload", "Host: t \t", await auth(proxy) + " ", "Content-Length: 5 "
        )
        + b"hello"
        + head("GET", "/health", "Host: t ", "Connection: close \t")
    )
    assert (await client.response(0))["status"] == 200
    assert proxy.upstream.last.body == b"hello"
    closing = await client.response(1)
    assert closing["status"] == 200 and closing["headers"]["connection"] == "close"


@pytest.mark.parametrize(
    ("chunks", "status", "code"),
    [
        (b"zz\r\nhello\r\n0\r\n\r\n", 400, b'"bad_request"'),
        (b"-5\r\nhello\r\n0\r\n\r\n", 400, b'"bad_request"'),
        (b"0x5\r\nhello\r\n0\r\n\r\n", 400, b'"bad_request"'),
        (b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n", 400, b'"bad_request"'),
        (b"3\r\nhello\r\n0\r\n\r\n", 400, b'"bad_request"'),  # chunk data overrun
        (b"5\nhello\n0\n\n", 400, b'"bad_request"'),  # LF-only chunk lines
        # Content-Length in the trailer
        (b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", 400, b'"bad_request"'),
        # Trailer fields over the head limit (they count to it): refused when the body was
        # already streamed, so the request must not be left waiting for an end that never comes.
        (
            b"5\r\nhello\r\n0\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
            431,
            b'"request_header_fields_too_large"',
        ),
    ],
)
async def test_a_bad_chunk_after_the_head_is_answered_at_once_and_the_upstream_request_aborted(
    proxy: Proxy, client: Client, chunks: bytes, status: int, code: bytes
) -> None:
    client.send(
        head("POST", "/v1/files/upload", "Host: t", await auth(proxy), "Transfer-Encoding: chunked")
    )
    await asyncio.sleep(0.05)  # admitted; the body is being streamed upstream
    client.send(chunks)
    answer = await client.response()  # (within 5 s)
    assert answer["status"] == status and code in answer["body"]
    await client.closed()
    assert proxy.upstream.requests == []  # the upstream never got a whole request


async def test_a_target_over_the_head_limit_is_refused_414_and_never_forwarded(
    proxy: Proxy, client: Client
) -> None:
    client.send(head("GET", "/v1/models?q=" + "a" * 70_000, "Host: t", await auth(proxy)))
    answer = await client.response()
    assert answer["status"] == 414 and b'"uri_too_long"' in answer["body"]
    await client.closed()
    assert proxy.upstream.requests == []


async def test_trailer_fields_never_become_headers(proxy: Proxy, client: Client) -> None:
    client.send(
        head("POST", "/v1/files/upload", "Host: t", await auth(proxy), "Transfer-Encoding: chunked")
        + b"5\r\nhello\r\n0\r\nX-Trailer: sneaky\r\nAuthorization: Bearer other\r\n\r\n"
    )
    assert (await client.response())["status"] == 200
    seen = {k.lower(): v for k, v in proxy.upstream.last.headers.items()}
    assert "x-trailer" not in seen and proxy.upstream.last.body == b"hello"
    assert seen["authorization"].startswith("Bearer sk-upstream-REAL-")


# -- headers ---------------------------------------------------------------------------------


async def test_hop_by_hop_connection_named_and_client_ip_headers_are_dropped(
    proxy: Proxy, client: Client
) -> None:
    client.send(
        head(
            "GET",
            "/v1/models",
            "Host: t",
            await auth(proxy),
            "Connection: keep-alive, X-Secret-Hop",
            "Connection: X-Other-Hop",
            "X-Secret-Hop: 1",
            "X-Other-Hop: 2",
            "X_Forwarded_For: 10.0.0.1",
            "Fastly-Client-IP: 10.0.0.2",
            "X-Original-Forwarded-For: 10.0.0.3",
            "True-Client-IP: 10.0.0.4",
            "CF_Connecting_IP: 10.0.0.5",
            "Proxy-Connection: keep-alive",
            "TE: trailers",
            "X-Kept: yes",
        )
    )
    assert (await client.response())["status"] == 200
    seen = {k.lower() for k in proxy.upstream.last.headers}
    for dropped in (
        "x-secret-hop",
        "x-other-hop",
        "x_forwarded_for",
        "fastly-client-ip",
        "x-original-forwarded-for",
        "true-client-ip",
        "cf_connecting_ip",
        "proxy-connection",
        "te",
        "connection",
    ):
        assert dropped not in seen
    assert "x-kept" in seen


async def test_a_method_override_never_reaches_the_upstream(proxy: Proxy, client: Client) -> None:
    """Some frameworks run a POST carrying one of these as the method it names: forwarded, they
    would turn an allowed POST into a DELETE that allowed_methods refuses."""
    client.send(
        head(
            "POST",
            "/v1/files/upload",
            "Host: t",
            await auth(proxy),
            "Content-Length: 2",
            "X-HTTP-Method-Override: DELETE",
            "X-HTTP-Method: DELETE",
            "X_Method_Override: DELETE",
        )
        + b"{}"
    )
    assert (await client.response())["status"] == 200
    seen = {k.lower().replace("_", "-") for k in proxy.upstream.last.headers}
    assert not seen & {"x-http-method-override", "x-http-method", "x-method-override"}
    assert proxy.upstream.last.method == "POST"


@pytest.mark.parametrize(
    "fields",
    [[], ["Host: a", "Host: b"], ["Host: a", "host: a"]],
    ids=["no-host", "two-hosts", "same-host-twice"],
)
async def test_host_is_required_exactly_once_on_http_1_1(
    proxy: Proxy, client: Client, fields: list[str]
) -> None:
    client.send(head("GET", "/v1/models", *fields, await auth(proxy)))
    assert (await client.response())["status"] == 400
    assert proxy.upstream.requests == []


@pytest.mark.parametrize(
    "host",
    [
        b"x:99999",
        b"evil.example:abc",
        b"\xff",
        b"[::1",
        b"[::zz]",
        b"a b",
        b"a/b",
        b"a@b",
        b"a%zz",
        b"h" * 400 + b" h",
    ],
)
@pytest.mark.parametrize("target", ["/admin", "/v1/models"])
async def test_a_host_that_is_no_host_is_refused_400_on_every_path(
    proxy: Proxy, client: Client, host: bytes, target: str
) -> None:
    # RFC 9112 §3.2: a Host field with an invalid value is answered 400, by the front door, not
    # left to a page that builds its own URL from it (the admin's redirect answered 500).
    credential = ADMIN if target == "/admin" else await auth(proxy)
    client.send(head("GET", target, credential).replace(b"\r\n", b"\r\nHost: %b\r\n" % host, 1))
    answer = await client.response()
    assert answer["status"] == 400 and b'"bad_request"' in answer["body"]
    assert proxy.upstream.requests == []


@pytest.mark.parametrize(
    "host", [b"", b"api.example.com:443", b"[::1]:8080", b"10.0.0.1", b"a_b:", b"h" * 1000]
)
async def test_every_form_of_host_rfc_3986_allows_is_served(
    proxy: Proxy, client: Client, host: bytes
) -> None:
    client.send(head("GET", "/admin", "Host: " + host.decode(), ADMIN))
    assert (await client.response())["status"] == 308
    client.send(head("GET", "/v1/models", "Host: " + host.decode(), await auth(proxy)))
    assert (await client.response(1))["status"] == 200


async def test_http_1_0_needs_no_host(proxy: Proxy, client: Client) -> None:
    client.send(head("GET", "/v1/models", await auth(proxy), version="1.0"))
    assert (await client.response())["status"] == 200


async def test_other_http_versions_are_refused(proxy: Proxy, client: Client) -> None:
    client.send(b"GET /v1HTTP/1.1\r\nHost: t\r\n\r\n")  # no version at all: "HTTP/0.9"
    assert (await client.response())["status"] == 400
    client = Client(proxy, FrontLimits())
    client.send(head("GET", "/v1/models", "Host: t", await auth(proxy), version="2.0"))
    assert (await client.response())["status"] == 400
    assert proxy.upstream.requests == []


async def test_100_continue_is_sent_only_after_admission(proxy: Proxy, client: Client) -> None:
    expecting = ("Host: t", "Content-Length: 5", "Expect: 100-continue")
    client.send(head("POST", "/v1/files/upload", *expecting, "Authorization: Bearer sk-nope"))
    answer = await client.response()
    assert answer["status"] == 401
    assert not client.transport.written.startswith(b"HTTP/1.1 100")
    await client.closed()
    again = Client(proxy, FrontLimits())
    again.send(head("POST", "/v1/files/upload", *expecting, await auth(proxy)))
    await again.until(lambda: again.transport.written == b"HTTP/1.1 100 Continue\r\n\r\n")
    again.transport.written.clear()
    again.send(b"hello")
    assert (await again.response())["status"] == 200
    assert proxy.upstream.last.body == b"hello"


# -- the request target ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models/gpt%3Fx",
        "/v1/models/gpt%23x",
        "/v1/models/a%20b?q=%3F%23&r=1",
        "/v1/models/ft:gpt-4o:org:custom:abc",
    ],
)
async def test_the_target_is_forwarded_exactly_as_sent(
    proxy: Proxy, client: Client, target: str
) -> None:
    client.send(head("GET", target, "Host: t", await auth(proxy)))
    await client.response()
    assert proxy.upstream.last.path_qs == target


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/v1/models/x%0d%0aX-Injected:%20yes", 400),
        ("/v1/models/x%0D", 400),
        ("/v1/models/x%00", 400),
        ("/v1/models/x%7f", 400),
        ("/v1/models#frag", 400),
        ("*", 400),
        ("/v1/models/%2e%2e/%2e%2e/admin", 404),
        ("/v1/models/%252e%252e/%252e%252e/admin", 404),
        ("/v1/models/..%2fadmin", 404),
        ("/v1/models/%2F..%2Fadmin", 404),
        ("/v1/models/..;/..;/admin", 404),
        ("/v1/models/%2e%2e;x/admin", 404),
        ("/v1/models/.;/x", 404),
        ("/v1/models/%c0%ae%c0%ae/admin", 404),
        ("/v1/models/%ff", 404),
    ],
)
async def test_dangerous_targets_are_refused_not_forwarded(
    proxy: Proxy, client: Client, target: str, status: int
) -> None:
    client.send(head("GET", target, "Host: t", await auth(proxy)))
    assert (await client.response())["status"] == status
    assert proxy.upstream.requests == []


async def test_an_absolute_form_target_is_served_by_its_path(proxy: Proxy, client: Client) -> None:
    client.send(
        head("GET", "http://gateway.example/v1/models?limit=2", "Host: t", await auth(proxy))
    )
    assert (await client.response())["status"] == 200
    assert proxy.upstream.last.path_qs == "/v1/models?limit=2"


# -- answers ---------------------------------------------------------------------------------


async def test_an_http_1_0_client_gets_a_close_delimited_stream(
    proxy: Proxy, client: Client
) -> None:
    client.send(head("GET", "/v1/audio/paced?n=2&gap=0.01", await auth(proxy), version="1.0"))
    await client.closed()
    head_bytes, _, body = bytes(client.transport.written).partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head_bytes.lower()
    assert b"Connection: close" in head_bytes
    assert body == b"data: 0\n\ndata: 1\n\ndata: [DONE]\n\n"


async def test_a_pipelined_health_check_after_a_proxy_request(proxy: Proxy, client: Client) -> None:
    client.send(
        head("GET", "/v1/models", "Host: t", await auth(proxy))
        + head("GET", "/health", "Host: t")
        + head("GET", "/metrics", "Host: t")
    )
    assert (await client.response(0))["status"] == 200
    assert b'"ok"' in (await client.response(1))["body"]
    assert b"llm_proxy_" in (await client.response(2))["body"]


async def test_quota_refusals_tell_sdks_not_to_retry(proxy: Proxy, client: Client) -> None:
    token = await proxy.token(max_requests=1)
    client.send(head("GET", "/v1/models", "Host: t", f"Authorization: Bearer {token}") * 2)
    assert (await client.response(0))["status"] == 200
    refused = await client.response(1)
    assert refused["status"] == 429 and refused["headers"]["x-should-retry"] == "false"
