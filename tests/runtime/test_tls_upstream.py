"""A real server in front of a TLS upstream, as OpenAI is reached."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509

from tests.certificates import self_signed
from tests.processes import start_server
from tests.raw_servers import RawServers
from tests.waiting import wait_for_lines

pytestmark = pytest.mark.process

AiohttpServer = Callable[..., Awaitable[TestServer]]

UPSTREAM_KEY = "upstream-tls-0123456789abcdef"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def upstream_app(seen: list[str]) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"object": "chat.completion", "choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_the_trust_store_is_loaded_at_start_not_under_the_first_request(
    tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    # Loading the trust store blocks for ~30 ms: a server loading it under its first request
    # stalls every other request meanwhile. Loaded at start, a certificate file removed once
    # the server answers no longer matters.
    cert, key = self_signed(
        tmp_path, "127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    seen: list[str] = []
    upstream = await aiohttp_server(upstream_app(seen), ssl=context)
    api = tmp_path / "api.yaml"
    api.write_text(
        "default_api: openai\napis:\n  openai:\n"
        f"    base_url: https://127.0.0.1:{upstream.port}\n"
        "    allowed_endpoints: [/v1/chat/completions]\n    allowed_methods: [POST]\n"
    )
    trusted = tmp_path / "trusted.pem"
    trusted.write_bytes(cert.read_bytes())
    server = start_server(tmp_path / "data", api, tmp_path, SSL_CERT_FILE=str(trusted))
    try:
        token = server.issue_token(UPSTREAM_KEY)
        trusted.unlink()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{server.base_url}/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {token}"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
        assert seen == [f"Bearer {UPSTREAM_KEY}"]
    finally:
        server.stop()


async def test_a_body_delimited_by_the_close_needs_the_upstreams_close_notify(
    tmp_path: Path,
) -> None:
    # An HTTP/1.0 answer without a length ends at the close. Over TLS only a close_notify makes
    # that close the end: a connection cut without one (by anyone on the path) cut the body short.
    cert, key = self_signed(
        tmp_path, "127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"partial":')
        await writer.drain()
        await asyncio.sleep(0.1)
        if b"/v1/models/cut" in head:
            writer.get_extra_info("socket").shutdown(socket.SHUT_WR)  # no close_notify
            await asyncio.sleep(0.5)
            writer.transport.abort()
        # else: RawServers closes the stream, close_notify first

    servers = RawServers()
    server = None
    try:
        port = await servers.start(http10, tls=context)
        api = tmp_path / "api.yaml"
        api.write_text(
            "default_api: openai\napis:\n  openai:\n"
            f"    base_url: https://127.0.0.1:{port}\n"
            "    allowed_endpoints: [/v1/models]\n    allowed_methods: [GET]\n"
        )
        events = tmp_path / "events.jsonl"
        server = start_server(
            tmp_path / "data",
            api,
            tmp_path,
            SSL_CERT_FILE=str(cert),
            FILE_EVENT_LOG=str(events),
        )
        headers = {"Authorization": f"Bearer {server.issue_token(UPSTREAM_KEY)}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(f"{server.base_url}/v1/models/whole") as response:
                assert await response.read() == b'{"partial":'
            async with session.get(f"{server.base_url}/v1/models/cut") as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
        whole, cut = await wait_for_lines(events, 2)
        assert (whole["status"], whole["error"]) == (200, None)
        assert (cut["status"], cut["error"]) == (200, "upstream_unavailable")
    finally:
        if server is not None:
            server.stop()
        await servers.close()
