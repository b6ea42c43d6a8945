"""The dead-letter file: events a backend refused for good, one JSON object per line.

Each line keeps the whole event, so an operator can fix the cause and replay the file.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from llm_proxy.events.event import Event, rfc3339
from llm_proxy.private_files import owner_only


class DeadLetterFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def write(self, backend: str, failures: Sequence[tuple[Event, str]]) -> None:
        if failures:
            await asyncio.to_thread(self._write, backend, failures)

    def _write(self, backend: str, failures: Sequence[tuple[Event, str]]) -> None:
        at = rfc3339(time.time())
        data = b"".join(
            orjson.dumps({"failed_at": at, "backend": backend, "reason": reason, "event": event})
            + b"\n"
            for event, reason in failures
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab", opener=owner_only) as file:
            file.write(data)
            file.flush()
            # Written before the bus entry is acknowledged: once acked, this line is the only copy.
            os.fsync(file.fileno())
