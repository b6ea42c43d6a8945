"""JSONL file backend: one event per line, fsync per batch, size-based rotation.

Rotation renames ``events.jsonl`` to ``events.jsonl.1`` (shifting older files up to ``backups``)
before a batch that would take the file past ``max_bytes``, so a batch is never split across files.

Several dispatchers may append to one file (``llm-proxy server --workers N --file-event-log``: each
worker's events process runs one). Every write, the cut of a failed one and rotation happen under an
exclusive ``flock`` of the file, with its size read from the file itself, so that no dispatcher cuts
another's lines or writes into a file another rotated away. A last line torn by a dispatcher killed
mid-write is cut, under the lock, before the next write, so that nothing is glued onto it and every
line stays one whole event.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
from collections.abc import Sequence
from pathlib import Path

import orjson
import structlog

from dispatcher import metrics
from dispatcher.backends import BackendError, Rejection
from llm_proxy.durable_append import append_or_cut_back
from llm_proxy.events import event as wire
from llm_proxy.events.event import Event
from llm_proxy.private_files import owner_only

log = structlog.get_logger(__name__)

_TAIL_PIECE = 64 * 1024  # bytes read back at a time looking for the end of the last whole line


class FileBackend:
    name = "file"

    def __init__(self, path: Path, *, max_bytes: int = 100 * 1024 * 1024, backups: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: io.FileIO | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> io.FileIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a failed write must not leave bytes in a buffer to resurface later. Readable
        # too, to find the end of a torn last line.
        self._file = io.FileIO(self.path, "a+b", opener=owner_only)
        return self._file

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
        file = self._lock()
        try:
            size = self._whole_lines(file.fileno())
            if size and size + len(data) > self.max_bytes:
                self._rotate(file)  # (closing it let go of its lock)
                file = self._lock()
                size = self._whole_lines(file.fileno())  # another may have written it meanwhile
            # Only this batch is cut if the disk refuses part of it: no other writes while the
            # lock is held.
            append_or_cut_back(file, data, size)
        finally:
            if not file.closed:
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)

    def _lock(self) -> io.FileIO:
        """The file at ``path``, locked; reopened when another dispatcher rotated it away."""
        while True:
            file = self._file if self._file is not None else self._open()
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            try:
                named = os.stat(self.path)
            except FileNotFoundError:
                named = None
            opened = os.fstat(file.fileno())
            if named is not None and (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino):
                return file
            file.close()
            self._file = None

    def _whole_lines(self, fd: int) -> int:
        """The size of the locked file, once a torn last line is cut."""
        size = os.fstat(fd).st_size
        if not size or os.pread(fd, 1, size - 1) == b"\n":
            return size
        whole = size
        while whole:  # back to just after the last newline, a piece at a time
            start = max(0, whole - _TAIL_PIECE)
            newline = os.pread(fd, whole - start, start).rfind(b"\n")
            if newline >= 0:
                whole = start + newline + 1
                break
            whole = start
        os.ftruncate(fd, whole)
        metrics.TORN_LINES_CUT.inc()
        log.warning("dispatcher.torn_line_cut", path=str(self.path), bytes=size - whole)
        return whole

    def _rotate(self, file: io.FileIO) -> None:
        if self.backups > 0:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        file.close()
        self._file = None

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
