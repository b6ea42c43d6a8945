"""JSONL file backend: one event per line, fsync per batch, size-based rotation.

Rotation renames ``events.jsonl`` to ``events.jsonl.1`` (shifting older files up to ``backups``)
before a batch that would take the file past ``max_bytes``, so a batch is never split across files.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import orjson

from dispatcher.backends import BackendError, Rejection
from llm_proxy.events import event as wire
from llm_proxy.events.event import Event
from llm_proxy.private_files import owner_only


class FileBackend:
    name = "file"

    def __init__(self, path: Path, *, max_bytes: int = 100 * 1024 * 1024, backups: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: io.FileIO | None = None
        self._size = 0

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a failed write must not leave bytes in a buffer to resurface later.
        self._file = io.FileIO(self.path, "ab", opener=owner_only)
        self._size = os.fstat(self._file.fileno()).st_size

    async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
        lines: list[bytes] = []
        refused: dict[int, Rejection] = {}
        for index, event in enumerate(events):
            try:
                lines.append(wire.dumps(event) + b"\n")
            except orjson.JSONEncodeError as exc:  # never writable: it must not hold up the rest
                refused[index] = Rejection(f"not writable as JSON: {exc}", retryable=False)
        if not lines:
            return refused
        try:
            await asyncio.to_thread(self._write, b"".join(lines))
        except OSError as exc:  # disk full, permissions: may clear up, so retry
            raise BackendError(f"write {self.path}: {exc}", retryable=True) from exc
        return refused

    def _write(self, data: bytes) -> None:
        if self._file is None:
            self._open()
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        assert self._file is not None
        fd = self._file.fileno()
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view) :]
            os.fsync(fd)
        except OSError:
            # Cut a partly written batch, so the retry does not leave a torn line behind.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._size)
            raise
        self._size += len(data)

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        if self.backups > 0:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._open()

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
