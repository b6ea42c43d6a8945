"""What a body's capture for its event costs in memory while the request is in flight."""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

from llm_proxy.proxy.exchange import CappedBuffer
from tests.conftest import Proxy
from tests.raw_servers import RawServers

PIECE = b"ab"
PIECES = 65_536  # 128 KiB of body, within the default capture of 256 KiB


async def test_a_body_sent_in_tiny_chunks_costs_about_its_bytes_to_capture(
    proxy_factory: Any,
) -> None:
    """An upload of 2-byte chunks was kept as 65,536 objects of ~48 bytes each (plus a list slot),
    some 25 times its 128 KiB, held for as long as the client kept the request open: a token's
    holder could hold gigabytes with a few thousand connections. Joined, the capture costs about
    its bytes."""
    received = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while data := await reader.read(65536):
            received += len(data)

    servers = RawServers()
    port = await servers.start(upstream)
    try:
        proxy: Proxy = await proxy_factory(api={"base_url": f"http://127.0.0.1:{port}"})
        issued = await proxy.issue_token()
        host, proxy_port = proxy.client.server.host, proxy.client.server.port
        head = (
            "POST /v1/files HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {issued['token']}\r\n"
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        body = b"2\r\n" + PIECE + b"\r\n"
        payload = head + body * PIECES  # no last chunk: the request stays open
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            _reader, writer = await asyncio.open_connection(host, proxy_port)
            writer.write(payload)
            await writer.drain()
            # Every piece has gone through the proxy once the upstream has had them all.
            for _ in range(400):
                if received >= len(PIECE) * PIECES:
                    break
                await asyncio.sleep(0.05)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        writer.close()
        assert received >= len(PIECE) * PIECES
        assert grown < 1_000_000, grown  # 128 KiB captured; it was over 3 MB
    finally:
        await servers.close()


def test_a_tail_kept_in_tiny_pieces_is_joined_and_still_ends_with_the_body() -> None:
    """An answer's tail (where its usage comes) kept in 2-byte pieces is joined as the head is,
    and still holds the body's last bytes and counts what passed."""
    capture = CappedBuffer(16, tail_limit=4000)
    body = b"".join(i.to_bytes(2, "big") for i in range(5000))
    for start in range(0, len(body), 2):
        capture.add(body[start : start + 2])
    assert capture.tail_chunks is not None and len(capture.tail_chunks) < 1024
    assert len(capture.tail) >= 4000 and body.endswith(capture.tail)
    assert capture.getvalue() == body[:16]
    assert capture.passed == len(body)
