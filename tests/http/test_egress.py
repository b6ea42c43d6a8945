"""Upstream connections through an HTTP CONNECT proxy: HTTPS_PROXY / HTTP_PROXY / NO_PROXY.

A real proxy (proxy.py, run as a process of its own) carries the tunnels; a tiny asyncio CONNECT
server of the test's own stands in where the exact CONNECT bytes matter or the proxy must misbehave.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from click.testing import CliRunner
from cryptography import x509

from llm_proxy.errors import UpstreamTimeout, UpstreamUnavailable
from llm_proxy.http.client import Http1Client, Http1Response
from llm_proxy.http.egress import Egress, NoProxy, parse_proxy_url, upstream_ssl_context
from llm_proxy.http.upstream import Origin, Timeouts
from llm_proxy.runtime.cli import build_settings
from llm_proxy.runtime.cli import server as server_command
from llm_proxy.runtime.settings import SettingsError
from tests.certificates import self_signed
from tests.conftest import Proxy
from tests.http.relaying import read_all
from tests.processes import PRODUCT_VARIABLES, Process, clean_env, free_port, spawn
from tests.raw_servers import Handler, RawServers

FAST = Timeouts(connect=2.0, response_header=2.0, idle=2.0)
ENCODED_PASSWORD = "pa%3Ass%40w%C3%B6rd"

AiohttpServer = Callable[..., Awaitable[TestServer]]
ConnectHandler = Handler


@dataclass
class ConnectProxy:
    """A running proxy.py, and what its access log says it tunnelled."""

    process: Process
    port: int
    log: Path

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    def tunnels(self, expected: int) -> list[str]:
        """The CONNECT targets logged so far, once there are ``expected`` of them (bounded wait).

        proxy.py logs a tunnel when it closes, so close the client first.
        """
        deadline = time.monotonic() + 10
        while True:
            text = self.log.read_text() if self.log.exists() else ""
            targets = re.findall(r" - CONNECT (\S+) - ", text)
            if len(targets) >= expected or time.monotonic() > deadline:
                return targets
            time.sleep(0.05)


def start_connect_proxy(directory: Path, *options: str) -> ConnectProxy:
    directory.mkdir(parents=True, exist_ok=True)
    port_file, log = directory / "port", directory / "access.log"
    args = [
        sys.executable,
        "-m",
        "proxy",
        "--hostname",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--threaded",
        "--num-acceptors",
        "1",
        "--log-level",
        "INFO",
        "--log-file",
        str(log),
        *options,
    ]
    # A home of its own: proxy.py makes its cache directories under ~/.proxy as it is imported.
    process = spawn(args, clean_env(HOME=str(directory)), directory, "proxy.py")
    deadline = time.monotonic() + 15
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.popen.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise AssertionError(f"proxy.py did not start:\n{process.stderr}")
        time.sleep(0.05)
    return ConnectProxy(process, int(port_file.read_text()), log)


@pytest.fixture
def connect_proxy(tmp_path: Path) -> Iterator[ConnectProxy]:
    proxy = start_connect_proxy(tmp_path / "proxy.py")
    yield proxy
    proxy.process.stop()


@pytest.fixture
def authenticating_proxy(tmp_path: Path) -> Iterator[ConnectProxy]:
    proxy = start_connect_proxy(tmp_path / "proxy.py-auth", "--basic-auth", "user:s3cret")
    yield proxy
    proxy.process.stop()


@pytest.fixture
async def connect_server() -> AsyncIterator[Callable[[ConnectHandler], Awaitable[int]]]:
    """Start a raw server of the test's own playing the proxy; answers its port."""
    servers = RawServers()
    yield servers.start
    await servers.close()


@pytest.fixture(scope="module")
def localhost_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate valid for the name ``localhost`` only (not for 127.0.0.1)."""
    directory = tmp_path_factory.mktemp("egress-tls")
    return self_signed(directory, "localhost", x509.DNSName("localhost"))


def echo_app() -> web.Application:
    """An upstream answering with the Host header it received."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.host}")

    app = web.Application()
    app.router.add_get("/", handler)
    return app


def proxy_peer_port(response: Http1Response) -> int:
    """The port our socket is connected to: the proxy's when the request went through a tunnel."""
    assert response._conn is not None
    port: int = response._conn._transport.get_extra_info("peername")[1]
    return port


def closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


@pytest.mark.process
async def test_http_upstream_is_reached_through_a_connect_tunnel_that_is_pooled(
    aiohttp_server: AiohttpServer, connect_proxy: ConnectProxy
) -> None:
    upstream = await aiohttp_server(echo_app())
    origin = Origin("http", "127.0.0.1", upstream.port or 0)
    http = Http1Client(egress=Egress(http_proxy=parse_proxy_url(connect_proxy.url())))
    try:
        for _ in range(2):
            response = await http.request("GET", origin, "/", [], None, FAST)
            assert proxy_peer_port(response) == connect_proxy.port
            assert await read_all(response) == f"hello 127.0.0.1:{origin.port}".encode()
    finally:
        await http.close()
    assert connect_proxy.tunnels(1) == [f"127.0.0.1:{origin.port}"]


@pytest.mark.process
async def test_https_upstream_runs_tls_inside_the_tunnel_and_trusts_ssl_cert_file(
    aiohttp_server: AiohttpServer,
    connect_proxy: ConnectProxy,
    localhost_certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert_path, key_path = localhost_certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_path, key_path)
    upstream = await aiohttp_server(echo_app(), ssl=server_context)
    # The certificate names localhost only: verifying it proves TLS checked the origin's name,
    # not the proxy's address.
    origin = Origin("https", "localhost", upstream.port or 0)
    egress = Egress(https_proxy=parse_proxy_url(connect_proxy.url()))

    untrusting = Http1Client(egress=egress)
    try:
        with pytest.raises(UpstreamUnavailable, match="SSLCertVerificationError") as caught:
            await untrusting.request("GET", origin, "/", [], None, FAST)
        assert caught.value.reached_upstream is False
    finally:
        await untrusting.close()

    monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))
    http = Http1Client(egress=egress)
    try:
        response = await http.request("GET", origin, "/", [], None, FAST)
        assert proxy_peer_port(response) == connect_proxy.port
        assert await read_all(response) == f"hello localhost:{origin.port}".encode()
    finally:
        await http.close()
    assert connect_proxy.tunnels(2) == [f"localhost:{origin.port}"] * 2


def test_ssl_cert_file_is_trusted_besides_the_system_store(
    localhost_certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    system = ssl.create_default_context().cert_store_stats()["x509"]
    if not system:
        pytest.skip("this machine has no system certificate bundle")
    monkeypatch.setenv("SSL_CERT_FILE", str(localhost_certificate[0]))
    # OpenSSL alone reads the variable instead of the system bundle...
    assert ssl.create_default_context().cert_store_stats()["x509"] == 1
    # ...the upstream context trusts both.
    assert upstream_ssl_context().cert_store_stats()["x509"] == system + 1


@pytest.mark.process
def test_the_tunnel_also_works_on_uvloop(
    connect_proxy: ConnectProxy, localhost_certificate: tuple[Path, Path]
) -> None:
    # The server runs on uvloop: the socket-level CONNECT and the TLS hand-over must work there too.
    cert_path, key_path = localhost_certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_path, key_path)

    async def scenario() -> bytes:
        upstream = TestServer(echo_app())
        await upstream.start_server(ssl=server_context)
        http = Http1Client(
            ssl_context=ssl.create_default_context(cafile=str(cert_path)),
            egress=Egress(https_proxy=parse_proxy_url(connect_proxy.url())),
        )
        try:
            origin = Origin("https", "localhost", upstream.port or 0)
            return await read_all(await http.request("GET", origin, "/", [], None, FAST))
        finally:
            await http.close()
            await upstream.close()
            # uvloop completes a TLS transport's close (and its socket's) on later loop turns; the
            # runner closing the loop before then reports the socket as never closed.
            await asyncio.sleep(0.1)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()).startswith(b"hello localhost:")
    assert len(connect_proxy.tunnels(1)) == 1


async def test_no_proxy_hosts_are_reached_directly(aiohttp_server: AiohttpServer) -> None:
    upstream = await aiohttp_server(echo_app())
    origin = Origin("http", "127.0.0.1", upstream.port or 0)
    dead_proxy = parse_proxy_url(f"http://127.0.0.1:{closed_port()}")

    direct = Http1Client(
        egress=Egress(http_proxy=dead_proxy, no_proxy=NoProxy("x.test, 127.0.0.1"))
    )
    tunnelled = Http1Client(egress=Egress(http_proxy=dead_proxy, no_proxy=NoProxy("localhost")))
    try:
        response = await direct.request("GET", origin, "/", [], None, FAST)
        assert await read_all(response) == f"hello 127.0.0.1:{origin.port}".encode()
        # Loopback is tunnelled like any host unless NO_PROXY names it (by address, not name).
        with pytest.raises(UpstreamUnavailable, match="egress proxy"):
            await tunnelled.request("GET", origin, "/", [], None, FAST)
    finally:
        await direct.close()
        await tunnelled.close()


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "direct"),
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        (".example.com", "api.example.com", 443, True),
        (".example.com", "example.com", 443, True),
        ("example.com", "badexample.com", 443, False),
        ("EXAMPLE.com", "Api.Example.COM.", 443, True),
        ("*", "anything.test", 80, True),
        ("a.test, *", "anything.test", 80, True),
        ("example.com:8443", "api.example.com", 8443, True),
        ("example.com:8443", "api.example.com", 443, False),
        ("127.0.0.1", "127.0.0.1", 8080, True),
        ("127.0.0.1", "127.0.0.2", 8080, False),
        ("localhost", "127.0.0.1", 8080, False),
        ("127.0.0.1", "localhost", 8080, False),
        ("10.0.0.0/8", "10.1.2.3", 443, True),
        ("10.0.0.0/8", "11.1.2.3", 443, False),
        ("10.0.0.0/8", "10.example.com", 443, False),
        ("::1", "::1", 443, True),
        ("[::1]", "::1", 443, True),
        ("[::1]:443", "::1", 443, True),
        ("[::1]:443", "::1", 80, False),
        ("fd00::/8", "fd12::1", 443, True),
        ("a.test b.test", "b.test", 443, True),
        ("", "example.com", 443, False),
    ],
)
def test_no_proxy_matching_follows_curl(no_proxy: str, host: str, port: int, direct: bool) -> None:
    assert NoProxy(no_proxy).matches(host, port) is direct


@pytest.mark.parametrize("value", ["10.0.0.0/99", "example.com:99999", "[::1", "[::1]x"])
def test_malformed_no_proxy_entries_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        NoProxy(value)


def test_proxy_url_credentials_become_basic_authorization_and_never_show() -> None:
    proxy = parse_proxy_url(f"http://user:{ENCODED_PASSWORD}@proxy.corp:3128")
    assert (proxy.host, proxy.port) == ("proxy.corp", 3128)
    assert proxy.authorization == "Basic dXNlcjpwYTpzc0B3w7ZyZA=="  # base64 of user:pa:ss@wörd
    assert "dXNlc" not in repr(proxy) and ENCODED_PASSWORD not in repr(proxy)
    assert parse_proxy_url("proxy.corp:8080") == parse_proxy_url("http://proxy.corp:8080/")
    assert parse_proxy_url("http://proxy.corp").port == 80
    assert parse_proxy_url("http://proxy.corp").authorization is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (f"socks5://u:{ENCODED_PASSWORD}@proxy:1080", "socks5:// proxy is not supported"),
        (f"https://u:{ENCODED_PASSWORD}@proxy:443", "https:// proxy is not supported"),
        (f"http://u:{ENCODED_PASSWORD}@proxy:99999", "port"),
        (f"http://u:{ENCODED_PASSWORD}@proxy:0", "port 0"),
        (f"http://u:{ENCODED_PASSWORD}@:3128", "no host"),
        (f"http://u:{ENCODED_PASSWORD}@proxy:3128/proxy.pac", "no path"),
    ],
)
def test_bad_proxy_urls_stop_start_up_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    for name in PRODUCT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(server_command, [], env={"HTTPS_PROXY": value})
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith("llm-proxy: HTTPS_PROXY: expected http://") and problem in line
    assert "\n" not in line and "pa%3A" not in line and "pa:ss" not in line


def test_proxy_settings_are_read_from_the_environment_as_curl_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in PRODUCT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    url = f"http://user:{ENCODED_PASSWORD}@proxy.corp:3128"
    monkeypatch.setenv("HTTPS_PROXY", "http://upper.corp:1")
    monkeypatch.setenv("https_proxy", url)  # the lower-case spelling wins, as in curl
    monkeypatch.setenv("HTTP_PROXY", "http://plain.corp:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,10.0.0.0/8")
    ctx = server_command.make_context("server", [])
    settings = build_settings(**ctx.params, is_tty=False)

    assert settings.https_proxy == url
    assert settings.http_proxy == "http://plain.corp:3128"
    assert settings.no_proxy == "localhost,10.0.0.0/8"
    # The password is masked; the rest of the URL stays, for debugging.
    assert ENCODED_PASSWORD not in repr(settings) and "user:***@proxy.corp:3128" in repr(settings)
    egress = settings.egress
    assert egress is not None
    tunnel = egress.tunnel_for("https", "api.openai.com", 443)
    assert tunnel is not None and tunnel.proxy.host == "proxy.corp"
    assert egress.tunnel_for("https", "api.openai.com", 443) is tunnel  # decided once per origin
    assert egress.tunnel_for("https", "10.1.1.1", 443) is None

    monkeypatch.setenv("NO_PROXY", "10.0.0.0/99")
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(SettingsError, match=r"^NO_PROXY: bad network"):
        build_settings(**server_command.make_context("server", []).params, is_tty=False)


def test_without_a_proxy_connections_stay_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PRODUCT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "localhost")
    settings = build_settings(**server_command.make_context("server", []).params, is_tty=False)
    assert settings.egress is None


async def test_connect_request_carries_proxy_authorization_and_a_407_is_refused(
    connect_server: Callable[[ConnectHandler], Awaitable[int]],
) -> None:
    received: list[bytes] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="corp"\r\nContent-Length: 0\r\n\r\n'
        )
        await writer.drain()
        await reader.read()

    port = await connect_server(refuse)
    url = f"http://user:{ENCODED_PASSWORD}@127.0.0.1:{port}"
    http = Http1Client(egress=Egress(https_proxy=parse_proxy_url(url)))
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await http.request("GET", Origin("https", "api.example.com", 443), "/", [], None, FAST)
    finally:
        await http.close()
    assert received == [
        b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n"
        b"Proxy-Authorization: Basic dXNlcjpwYTpzc0B3w7ZyZA==\r\n\r\n"
    ]
    error = caught.value
    assert error.status == 502 and error.reached_upstream is False
    assert error.message == "egress proxy refused CONNECT: 407 Proxy Authentication Required"
    assert ENCODED_PASSWORD not in error.message and "dXNlc" not in error.message


@pytest.mark.process
async def test_real_proxy_accepts_the_right_credentials_only(
    aiohttp_server: AiohttpServer, authenticating_proxy: ConnectProxy
) -> None:
    upstream = await aiohttp_server(echo_app())
    origin = Origin("http", "127.0.0.1", upstream.port or 0)

    async def fetch(credentials: str) -> bytes:
        url = authenticating_proxy.url(credentials)
        http = Http1Client(egress=Egress(http_proxy=parse_proxy_url(url)))
        try:
            return await read_all(await http.request("GET", origin, "/", [], None, FAST))
        finally:
            await http.close()

    assert await fetch("user:s3cret@") == f"hello 127.0.0.1:{origin.port}".encode()
    with pytest.raises(UpstreamUnavailable, match="refused CONNECT: 407") as caught:
        await fetch("user:wrong@")
    assert caught.value.reached_upstream is False


async def test_unreachable_proxy_is_upstream_unavailable_before_reaching_the_upstream() -> None:
    url = f"http://user:{ENCODED_PASSWORD}@127.0.0.1:{closed_port()}"
    http = Http1Client(egress=Egress(https_proxy=parse_proxy_url(url)))
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await http.request("GET", Origin("https", "api.example.com", 443), "/", [], None, FAST)
    finally:
        await http.close()
    error = caught.value
    assert error.status == 502 and error.reached_upstream is False
    assert error.message == "cannot connect to the egress proxy (ConnectionRefusedError)"


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


async def accept_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await reader.read()  # then never answers the TLS ClientHello


@pytest.mark.parametrize("handler", [silent, accept_then_silent], ids=["connect", "tls"])
async def test_connect_timeout_spans_the_connect_exchange_and_the_tls_handshake(
    connect_server: Callable[[ConnectHandler], Awaitable[int]], handler: ConnectHandler
) -> None:
    port = await connect_server(handler)
    http = Http1Client(egress=Egress(https_proxy=parse_proxy_url(f"127.0.0.1:{port}")))
    try:
        with pytest.raises(UpstreamTimeout, match="connect timeout") as caught:
            await http.request(
                "GET", Origin("https", "localhost", 443), "/", [], None, Timeouts(connect=0.2)
            )
    finally:
        await http.close()
    assert caught.value.reached_upstream is False


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (b"", "closed the connection before answering CONNECT"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "invalid answer to CONNECT"),
        (b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 200 OK\r\n", "data after accepting CONNECT"),
        (b"HTTP/1.1 599 Whatever\r\n\r\n", "refused CONNECT: 599$"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 3000, "overlong answer"),
        # More digits than int() converts: a ValueError, which no caller expected (a 500).
        (b"HTTP/1.1 " + b"2" * 5000 + b" OK\r\n\r\n", "invalid answer to CONNECT"),
        (b"HTTP/1.1 0200 OK\r\n\r\n", "invalid answer to CONNECT"),
        (b"\r\n\r\n", "invalid answer to CONNECT"),
    ],
    ids=[
        "closed",
        "garbage",
        "early-data",
        "odd-status",
        "overlong",
        "endless-status",
        "4-digits",
        "empty",
    ],
)
async def test_misbehaving_proxies_are_upstream_unavailable(
    connect_server: Callable[[ConnectHandler], Awaitable[int]], answer: bytes, problem: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if answer:
            await reader.read()

    port = await connect_server(handler)
    http = Http1Client(egress=Egress(http_proxy=parse_proxy_url(f"127.0.0.1:{port}")))
    try:
        with pytest.raises(UpstreamUnavailable, match=problem) as caught:
            await http.request("GET", Origin("http", "127.0.0.1", 9), "/", [], None, FAST)
    finally:
        await http.close()
    assert caught.value.reached_upstream is False


@pytest.mark.process
async def test_the_gateway_reaches_its_upstream_through_the_proxy(
    proxy_factory: Any, upstream_server: TestServer, connect_proxy: ConnectProxy
) -> None:
    gateway: Proxy = await proxy_factory(
        https_proxy=connect_proxy.url(), http_proxy=connect_proxy.url()
    )
    async with gateway.sdk(await gateway.token()) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
        )
    assert completion.choices[0].message.content
    assert gateway.upstream.last.path_qs == "/v1/chat/completions"
    await gateway.components.upstream.close()  # proxy.py logs a tunnel once it closes
    assert connect_proxy.tunnels(1) == [f"127.0.0.1:{upstream_server.port}"]
