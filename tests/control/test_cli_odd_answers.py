"""``llm-proxy manage`` pointed at something that is not the management API, or not only: a
redirect (an ingress sending http to https) is never followed, and an answer that is not JSON (a
login page) is one line. A real ``llm-proxy`` process against small aiohttp servers on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.processes import clean_env, cli_command
from tests.raw_servers import RawServers

pytestmark = pytest.mark.process

MakeServer = Callable[..., Awaitable[TestServer]]
TOKEN = "mgmt-odd-answers"


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


async def manage(base_url: str, *args: str, **env: str) -> Finished:
    """``llm-proxy manage ARGS`` as a process, the connection given by the environment (with
    ``env`` on top)."""
    process = await asyncio.create_subprocess_exec(
        *cli_command("manage", *args),
        env=clean_env(MANAGE_API_BASE_URL=base_url, MANAGEMENT_TOKEN=TOKEN, **env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


def one_line(result: Finished) -> str:
    """The one error line on stderr, exit status 1, nothing on stdout."""
    assert result.returncode == 1, result
    assert result.stdout == "", result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def json_error(result: Finished) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(one_line(result))["error"]
    return error


async def recorder(aiohttp_server: MakeServer, **options: Any) -> tuple[TestServer, list[Seen]]:
    """A server that records each request it gets, answering as the management API would;
    ``options`` go to ``aiohttp_server`` (a host, say)."""
    seen: list[Seen] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(Seen(request.method, request.path, request.headers.get("Authorization")))
        return web.json_response([])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    return await aiohttp_server(app, **options), seen


async def redirector(aiohttp_server: MakeServer, status: int, location: str) -> TestServer:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": location})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return await aiohttp_server(app)


def url(server: TestServer, path: str = "") -> str:
    return str(server.make_url(path))


WRITES = [
    ("project", "create", "--name", "n", "--api-key", "sk-x"),
    ("token", "generate", "--project-id", "some-project"),
]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("args", WRITES, ids=["project-create", "token-generate"])
async def test_a_redirect_is_not_followed_and_the_token_goes_nowhere(
    aiohttp_server: MakeServer, status: int, args: tuple[str, ...]
) -> None:
    target, seen = await recorder(aiohttp_server)
    location = url(target, "/manage/projects" if args[0] == "project" else "/manage/tokens")
    front = await redirector(aiohttp_server, status, location)
    line = one_line(await manage(url(front), *args))
    assert seen == []
    assert line.startswith("Error: ")
    assert str(status) in line and f"Location {location}" in line
    assert "--manage-api-base-url" in line and TOKEN not in line


async def test_a_redirect_under_json_is_one_json_error_not_a_list(
    aiohttp_server: MakeServer,
) -> None:
    target, seen = await recorder(aiohttp_server)
    front = await redirector(aiohttp_server, 302, url(target, "/manage/projects"))
    error = json_error(await manage(url(front), "--json", *WRITES[0]))
    assert seen == []
    assert (error["code"], error["status"]) == ("redirected", 302)
    assert url(target, "/manage/projects") in error["message"]


async def test_a_relative_redirect_names_the_url_it_leads_to(aiohttp_server: MakeServer) -> None:
    front = await redirector(aiohttp_server, 301, "/login?next=/manage/projects")
    line = one_line(await manage(url(front), "project", "list"))
    assert f"Location {url(front, '/login')}?next=/manage/projects" in line


async def login_page(aiohttp_server: MakeServer, body: bytes, content_type: str) -> TestServer:
    """What an SSO proxy in front of the API answers: 200 with its own page."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    return await aiohttp_server(app)


PAGES = [
    (b"<!doctype html><title>Sign in</title><form>", "text/html; charset=utf-8"),
    (b"\xff\xfe not even text", "application/octet-stream"),
    (b'{"truncated": ', "application/json"),
]


@pytest.mark.parametrize(("body", "content_type"), PAGES, ids=["html", "binary", "broken-json"])
@pytest.mark.parametrize("args", [("project", "list"), WRITES[0]], ids=["list", "create"])
async def test_an_answer_that_is_not_json_is_one_line(
    aiohttp_server: MakeServer, body: bytes, content_type: str, args: tuple[str, ...]
) -> None:
    server = await login_page(aiohttp_server, body, content_type)
    result = await manage(url(server), *args)
    line = one_line(result)
    assert "Traceback" not in result.stderr
    assert line.startswith(f"Error: {url(server)} answered 200 with {content_type}")
    assert "not JSON" in line and "--manage-api-base-url" in line


async def test_an_answer_that_is_not_json_under_json_is_one_json_error(
    aiohttp_server: MakeServer,
) -> None:
    server = await login_page(aiohttp_server, *PAGES[0])
    error = json_error(await manage(url(server), "project", "list", "--json"))
    assert (error["code"], error["status"]) == ("not_json", 200)
    assert "text/html" in error["message"]


# -- proxies from the environment -----------------------------------------------------------


@dataclass
class Proxy:
    """An HTTP proxy on loopback that records what reaches it and answers as the API would."""

    url: str
    connections: int = 0
    received: bytes = b""


async def recording_proxy(servers: RawServers) -> Proxy:
    proxy = Proxy("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy.connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        proxy.received += head
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: 2\r\nConnection: close\r\n\r\n[]")
        await writer.drain()

    proxy.url = f"http://127.0.0.1:{await servers.start(serve)}"
    return proxy


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
async def test_the_management_api_on_loopback_is_never_reached_through_a_proxy(
    aiohttp_server: MakeServer, host: str, variable: str
) -> None:
    """A proxy set for the server's egress must not see the management token in clear."""
    target, seen = await recorder(aiohttp_server)
    servers = RawServers()
    try:
        proxy = await recording_proxy(servers)
        base_url = f"http://{host}:{target.port}"
        result = await manage(base_url, "--json", "project", "list", **{variable: proxy.url})
    finally:
        await servers.close()
    assert result.returncode == 0, result
    assert (proxy.connections, proxy.received) == (0, b"")
    assert seen == [Seen("GET", "/manage/projects", f"Bearer {TOKEN}")]


def this_machine_s_address() -> str | None:
    """An address of this machine that is not loopback, if it has one (a UDP socket's connect
    picks the interface of its route and sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


async def test_the_server_found_at_its_listen_addr_is_never_reached_through_a_proxy(
    aiohttp_server: MakeServer,
) -> None:
    """LISTEN_ADDR names this machine, whatever its address: a proxy set for the server's egress
    must not see the management token in clear there either."""
    address = this_machine_s_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    target, seen = await recorder(aiohttp_server, host=address)
    servers = RawServers()
    try:
        proxy = await recording_proxy(servers)
        process = await asyncio.create_subprocess_exec(
            *cli_command("manage", "--json", "project", "list"),
            env=clean_env(
                LISTEN_ADDR=f"{address}:{target.port}", MANAGEMENT_TOKEN=TOKEN, HTTP_PROXY=proxy.url
            ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
    finally:
        await servers.close()
    assert (process.returncode, stdout, stderr) == (0, b"[]\n", b"")
    assert (proxy.connections, proxy.received) == (0, b"")
    assert seen == [Seen("GET", "/manage/projects", f"Bearer {TOKEN}")]


async def test_a_management_api_elsewhere_is_reached_through_the_environment_s_proxy() -> None:
    """An operator may need the proxy to reach a remote management API: urllib's rules hold."""
    servers = RawServers()
    try:
        proxy = await recording_proxy(servers)
        result = await manage(
            "http://manage.example.invalid:8080", "--json", "project", "list", HTTP_PROXY=proxy.url
        )
    finally:
        await servers.close()
    assert result.returncode == 0, result
    assert proxy.received.startswith(
        b"GET http://manage.example.invalid:8080/manage/projects HTTP/1.1\r\n"
    )


# -- credentials in URLs ------------------------------------------------------------------------

SECRET = "PASSWORD-in-the-url-7Kq2"


@pytest.mark.parametrize(
    "given",
    [
        f"http://operator:{SECRET}@127.0.0.1:{{port}}",
        f"operator:{SECRET}@127.0.0.1:{{port}}",
        f"http://operator:{SECRET}@127.0.0.1:{{port}}x",
        f"http://operator:{SECRET}@[::1",
    ],
    ids=["url", "host-port", "bad-port", "bad-ipv6"],
)
async def test_a_password_in_the_base_url_is_refused_and_never_printed(
    aiohttp_server: MakeServer, given: str
) -> None:
    """urllib would look "operator:PASSWORD@127.0.0.1" up in DNS and print it in its error."""
    target, seen = await recorder(aiohttp_server)
    result = await manage(given.format(port=target.port), "project", "list")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert SECRET not in result.stderr and "operator" not in result.stderr
    assert "MANAGE_API_BASE_URL" in lines[0]
    assert seen == []


async def test_a_redirect_s_location_is_shown_without_its_credentials(
    aiohttp_server: MakeServer,
) -> None:
    front = await redirector(aiohttp_server, 302, f"https://sso:{SECRET}@login.example/manage")
    line = one_line(await manage(url(front), "project", "list"))
    assert "Location https://login.example/manage" in line
    assert SECRET not in line


# -- something else answers at the URL ------------------------------------------------------------

NOT_THE_API = "did not answer as the llm-proxy management API does"


async def test_a_server_that_does_not_speak_http_is_one_line() -> None:
    """An SSH daemon on the port answers its banner: http.client's BadStatusLine."""

    async def ssh(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        await reader.read(1024)

    servers = RawServers()
    try:
        base_url = f"http://127.0.0.1:{await servers.start(ssh)}"
        plain = await manage(base_url, "project", "list")
        as_json = await manage(base_url, "project", "list", "--json")
    finally:
        await servers.close()
    line = one_line(plain)
    assert NOT_THE_API in line and base_url in line, line
    error = json_error(as_json)
    assert error["code"] == "unexpected_answer" and NOT_THE_API in error["message"]


ODD_SHAPES = [{"status": 200}, ["a", "b"], [{"id": 1}], {"error": None}, 42, "ok"]
COMMANDS = [
    ("project", "list"),
    ("project", "list", "--json"),
    ("token", "list"),
    ("token", "list", "--json"),
    ("project", "get", "abcdef"),
    ("token", "revoke", "abcdef", "--json"),
    ("token", "revoke", "--project-id", "abcdef"),
    ("project", "create", "--name", "n", "--api-key", "sk-x", "--json"),
    ("token", "generate", "--project-id", "abcdef"),
    ("token", "update", "abcdef", "--rpm", "5"),
]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda shape: json.dumps(shape))
async def test_json_of_another_shape_is_one_line_not_a_result(
    aiohttp_server: MakeServer, shape: Any
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(shape)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    other = await aiohttp_server(app)
    for args in COMMANDS:
        result = await manage(url(other), *args)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        line = one_line(result)
        shown = json.loads(line)["error"]["message"] if "--json" in args else line
        assert NOT_THE_API in shown and url(other) in shown, (args, line)


async def test_an_error_whose_code_is_null_shows_no_code(aiohttp_server: MakeServer) -> None:
    """The error shape lets ``code`` be null, as OpenAI's does: not the text "None"."""

    async def boom(request: web.Request) -> web.Response:
        error = {"message": "boom", "type": "server_error", "code": None}
        return web.json_response({"error": error}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", boom)
    failing = await aiohttp_server(app)
    assert one_line(await manage(url(failing), "project", "list")) == "Error: boom (500)"
    error = json_error(await manage(url(failing), "project", "list", "--json"))
    assert error == {"message": "boom", "code": None, "status": 500}
