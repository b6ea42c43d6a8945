"""A TCP relay to a test's own PostgreSQL (or Redis) that cuts both directions into the
protocol's messages and passes each on through a hook, which a test's relay overrides to freeze,
hold back or cut off at an exact message: a hang or a lost answer between two given messages."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Self

from tests.raw_servers import RawServers

PROTOCOL_3 = 196608  # the startup message's version field: typed messages follow
ENCRYPTION_REQUESTS = (80877103, 80877104)  # SSLRequest, GSSENCRequest: a one-byte answer


class Chunks:
    """One connection's two streams as they are read: for Redis, whose commands go in one piece.
    ``ends_command``: whether the server has a whole command once it has this message."""

    async def client_messages(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while data := await reader.read(65536):
            yield data

    server_messages = client_messages

    def ends_command(self, message: bytes) -> bool:
        return True


class PostgresMessages(Chunks):
    """PostgreSQL's messages: from the client, length-prefixed packets up to the startup message
    (encryption and cancel requests come before it), then a type byte and a length each; from the
    server, typed messages but for the one byte answering an encryption request (``N``: TLS could
    not be cut)."""

    def __init__(self) -> None:
        self._owed_answers = 0

    async def client_messages(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        code = 0
        while code != PROTOCOL_3:
            length = await reader.readexactly(4)
            body = await reader.readexactly(int.from_bytes(length, "big") - 4)
            code = int.from_bytes(body[:4], "big")
            # Counted before the request goes on, so before its answer can arrive.
            self._owed_answers += code in ENCRYPTION_REQUESTS
            yield length + body
        while True:
            header = await reader.readexactly(5)
            yield header + await reader.readexactly(int.from_bytes(header[1:], "big") - 4)

    async def server_messages(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while kind := await reader.read(1):
            if self._owed_answers:
                self._owed_answers -= 1
                assert kind == b"N", f"the server answered {kind!r} to an encryption request"
                yield kind
                continue
            length = await reader.readexactly(4)
            yield kind + length + await reader.readexactly(int.from_bytes(length, "big") - 4)

    def ends_command(self, message: bytes) -> bool:
        return message[:1] in (b"S", b"Q")  # Sync (extended protocol), Query (simple)


@dataclass(eq=False)
class Link:
    """One client's connection through the relay, and the relay's own to the server."""

    to_client: asyncio.StreamWriter
    to_server: asyncio.StreamWriter
    framing: Chunks


class Relay:
    """A relay on 127.0.0.1 to the server on ``target_port`` passing every message on; subclasses
    change that in :meth:`from_client` and :meth:`from_server`. A client a hook cut off (its
    writer closed) ends its link."""

    def __init__(self, target_port: int, framing: Callable[[], Chunks] = PostgresMessages) -> None:
        self.target_port = target_port
        self._framing = framing
        self._servers = RawServers()
        self.port = 0

    def url(self, url: str) -> str:  # of a database on the target, through the relay
        return url.replace(f":{self.target_port}/", f":{self.port}/")

    async def start(self) -> None:
        self.port = await self._servers.start(self._relay)

    async def close(self) -> None:
        await self._servers.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def from_client(self, link: Link, message: bytes) -> None:
        link.to_server.write(message)
        await link.to_server.drain()

    async def from_server(self, link: Link, message: bytes) -> None:
        if not link.to_client.is_closing():
            link.to_client.write(message)

    def server_ended(self, link: Link) -> None:
        """Not passed on by default: what waits for the server to close (asyncpg's cancel request)
        waits as long as the relay is up, as the hang tests were written against."""

    async def _relay(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await asyncio.open_connection("127.0.0.1", self.target_port)
        link = Link(to_client, to_server, self._framing())

        async def answers() -> None:
            async for message in link.framing.server_messages(server):
                await self.from_server(link, message)
            self.server_ended(link)

        forwarding = asyncio.ensure_future(answers())
        try:
            async for message in link.framing.client_messages(client):
                await self.from_client(link, message)
                if to_client.is_closing():
                    break
        finally:
            forwarding.cancel()
            to_server.close()


class RelayThread:
    """``relay`` served from now until :meth:`close` by an event loop in a thread of its own, for
    a synchronous test (one driving servers in other processes, which blocks as it waits)."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.run(relay.start())

    def run(self, step: Coroutine[Any, Any, None]) -> None:
        """Run ``step`` on the relay's loop, and wait until it is done."""
        asyncio.run_coroutine_threadsafe(step, self._loop).result(10)

    def close(self) -> None:
        self.run(self._relay.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
