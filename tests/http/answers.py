"""Responses read back from the bytes a server wrote, for tests that talk raw HTTP/1.1."""

from __future__ import annotations

from typing import Any

import httptools


class Answers:
    """Parses bytes fed in any pieces into responses: ``status``, ``headers`` (lower-case names)
    and ``body`` each; bytes that are not HTTP/1.1 responses fail the test."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._parser = httptools.HttpResponseParser(self)
        self._current: dict[str, Any] = {}

    def on_message_begin(self) -> None:
        self._current = {"headers": {}, "body": b""}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current["headers"][name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._current["status"] = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current["body"] += body

    def on_message_complete(self) -> None:
        self.items.append(self._current)

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            raise AssertionError(f"the server wrote a malformed response: {data[:200]!r}") from None
