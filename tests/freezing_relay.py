"""A relay to a test's own PostgreSQL that freezes the server (SIGSTOP, as
:meth:`PostgresServer.frozen`) the moment a chosen statement is sent, before passing it on: the
hang starts exactly between two statements of one call, which freezing from the test, at a time,
could not promise."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

from tests.postgres import PostgresServer
from tests.postgres_relay import Link, Relay


class FreezingRelay(Relay):
    """Once :meth:`arm`\\ ed, the first message a client sends holding ``word`` freezes the server,
    then goes on to it (unanswered until :meth:`thaw`). A statement's text is sent only the first
    time a connection prepares it, so arm before the call's statement is first used, or with a
    value only that call sends as a parameter (sent every time)."""

    def __init__(self, server: PostgresServer) -> None:
        super().__init__(server.port)
        self._server = server
        self._frozen = ExitStack()
        self._word = b""
        self.frozen = asyncio.Event()

    def arm(self, word: bytes) -> None:
        self._word = word.lower()

    def thaw(self) -> None:
        self._frozen.close()

    async def from_client(self, link: Link, message: bytes) -> None:
        if self._word and self._word in message.lower():
            self._word = b""
            self._frozen.enter_context(self._server.frozen())
            self.frozen.set()
        await super().from_client(link, message)

    async def close(self) -> None:
        self.thaw()
        await super().close()
