"""The dead-letter file: events a backend refused for good, one JSON object per line.

Each line is ``{"failed_at", "backend", "reason", "event"}`` and keeps the whole event, so an
operator can fix the cause and replay the file (``llm-proxy dispatcher replay``). A line that a
replay could not read back as an event is carried forward whole as ``"line"`` instead of ``"event"``.
Reasons are masked like log lines: a backend's answer may echo a key (backends mask their own).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from llm_proxy.crypto import redact
from llm_proxy.durable_append import append_or_cut_back
from llm_proxy.events.event import Event, rfc3339
from llm_proxy.private_files import owner_only


class DeadLetterFile:
    """Appends to ``path``; with ``new``, the first write creates it and fails if it exists."""

    def __init__(self, path: Path, *, new: bool = False) -> None:
        self.path = path
        self._mode = "xb" if new else "ab"

    async def write(self, backend: str, failures: Sequence[tuple[Event, str]]) -> None:
        if failures:
            records: list[dict[str, object]] = [
                {"reason": redact(reason), "event": event} for event, reason in failures
            ]
            await asyncio.to_thread(self._write, backend, records)

    async def write_unreadable(self, backend: str, lines: Sequence[tuple[str, str]]) -> None:
        """Lines of another dead-letter file that hold no event, as ``(text, reason)``."""
        if lines:
            records: list[dict[str, object]] = [
                {"reason": redact(reason), "line": text} for text, reason in lines
            ]
            await asyncio.to_thread(self._write, backend, records)

    def _write(self, backend: str, records: Sequence[dict[str, object]]) -> None:
        at = rfc3339(time.time())
        data = b"".join(_line(at, backend, record) for record in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a buffer left after a failed write would be written again as it closes.
        with open(self.path, self._mode, buffering=0, opener=owner_only) as file:
            # Locked, as other dispatchers (each worker's events process) may append to it too.
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            # Durable before the bus entry is acknowledged: once acked, this line is the only copy.
            append_or_cut_back(file, data, os.fstat(file.fileno()).st_size)
        self._mode = "ab"


def _line(at: str, backend: str, record: dict[str, object]) -> bytes:
    try:
        return orjson.dumps({"failed_at": at, "backend": backend, **record}) + b"\n"
    except orjson.JSONEncodeError as exc:
        # An event nested deeper than JSON is written here (only an older version built one):
        # kept as its Python text, as a line that holds no event, rather than lost with the batch.
        event = record.get("event", record.get("line"))
        reason = f"{record['reason']}; not writable as JSON: {exc}"
        return (
            orjson.dumps(
                {"failed_at": at, "backend": backend, "reason": reason, "line": repr(event)}
            )
            + b"\n"
        )
