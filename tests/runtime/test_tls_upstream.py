"""A real server in front of a TLS upstream, as OpenAI is reached."""

from __future__ import annotations

import ipaddress
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
