"""A TCP relay to a test's own PostgreSQL that freezes the server (SIGSTOP, as
:meth:`PostgresServer.frozen`) the moment a chosen statement is sent, before passing it on: the
hang starts exactly between two statements of one call, which freezing from the test, at a time,
could not promise."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

from tests.postgres import PostgresServer
from tests.raw_servers import RawServers


class FreezingRelay:
    """Once :meth:`arm`\\ ed, the first message a client sends holding ``word`` freezes the server,
    then goes on to it (unanswered until :meth:`thaw`). A statement's text is sent only the first
    time a connection prepares it, so arm before the call's statement is first used, or with a
    value only that call sends as a parameter (sent every time)."""

    def __init__(self, server: PostgresServer) -> None:
        self._server = server
        self._servers = RawServers()
        self._frozen = ExitStack()
        self._word = b""
        self.frozen = asyncio.Event()
        self.port = 0

    def url(self, database_url: str) -> str:
        """``database_url`` (a database on the server) through the relay."""
        return database_url.replace(f":{self._server.port}/", f":{self.port}/")

    def arm(self, word: bytes) -> None:
        self._word = word.lower()

    def thaw(self) -> None:
        self._frozen.close()

    async def _relay(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await asyncio.open_connection("127.0.0.1", self._server.port)

        async def answers() -> None:
            while data := await server.read(65536):
                to_client.write(data)

        forwarding = asyncio.ensure_future(answers())
        try:
            while data := await client.read(65536):
                if self._word and self._word in data.lower():
                    self._word = b""
                    self._frozen.enter_context(self._server.frozen())
                    self.frozen.set()
                to_server.write(data)
                await to_server.drain()
        finally:
            forwarding.cancel()
            to_server.close()

    async def start(self) -> None:
        self.port = await self._servers.start(self._relay)

    async def close(self) -> None:
        self.thaw()
        await self._servers.close()
