"""Raw asyncio servers that play a peer (an upstream, an egress proxy) byte by byte in tests."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServers:
    """Servers on 127.0.0.1 whose every connection runs a handler; all stopped by ``close``."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, handler: Handler, tls: ssl.SSLContext | None = None) -> int:
        """Start a server running ``handler`` per connection (over TLS with ``tls``); its port."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                self._tasks.discard(task)

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            server.close()
            await server.wait_closed()


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A server that accepts and never answers (a TLS handshake with it never ends); its port."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    servers = RawServers()
    try:
        yield await servers.start(silent)
    finally:
        await servers.close()


@dataclass
class FailingWhenTold:
    """A server whose connections wait, once ``connected`` is set, until ``fail`` is set, then
    close with what they were sent unread (reset): a TLS handshake with it fails then."""

    port: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    fail: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def failing_when_told() -> AsyncIterator[FailingWhenTold]:
    """A :class:`FailingWhenTold` server for the duration."""
    server = FailingWhenTold()

    async def wait_then_fail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connected.set()
        await server.fail.wait()

    servers = RawServers()
    try:
        server.port = await servers.start(wait_then_fail)
        yield server
    finally:
        await servers.close()
