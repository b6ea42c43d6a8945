"""Append-only spool file for events that could not be written to Redis.

Lines are whole JSON events. A sidecar ``.offset`` file records how far replay has got, so a restart
resumes where it stopped (an event replayed just before a crash may be replayed twice, which the
at-least-once contract allows). When everything is replayed the file is emptied.

The methods are blocking file I/O; :class:`~llm_proxy.events.redis.RedisBus` runs them in a thread
and serialises them with a lock.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from llm_proxy.events import event as wire
from llm_proxy.events import metrics
from llm_proxy.events.event import Event
from llm_proxy.private_files import owner_only

log = structlog.get_logger(__name__)


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset_path = path.with_name(path.name + ".offset")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._size = self._repair()
        self._offset = self._read_offset()
        metrics.SPOOL_PENDING.set(self.pending_bytes)

    def _repair(self) -> int:
        """Cut a line torn by a crash mid-write, so replay never stalls on it."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        whole = data.rfind(b"\n") + 1
        if whole != len(data):
            with self.path.open("r+b") as file:
                file.truncate(whole)
            log.warning("events.spool_torn_line_cut", path=str(self.path))
        return whole

    def _read_offset(self) -> int:
        try:
            offset = int(self._offset_path.read_text())
        except (FileNotFoundError, ValueError):
            return 0
        return offset if 0 <= offset <= self._size else 0

    @property
    def pending_bytes(self) -> int:
        return self._size - self._offset

    @property
    def pending(self) -> bool:
        return self._size > self._offset

    def append(self, events: Sequence[Event]) -> None:
        written, unwritable = wire.dumps_each(events)
        metrics.count_unwritable(unwritable, "spool")
        data = b"".join(line + b"\n" for line in written)
        with open(self.path, "ab", opener=owner_only) as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the spool exists for when things go wrong; make it stick
        self._size += len(data)
        metrics.SPOOLED.inc(len(written))
        metrics.SPOOL_PENDING.set(self.pending_bytes)

    def read(self, max_events: int) -> tuple[list[Event], int]:
        """The next events after the replay offset, and the offset just past them."""
        events: list[Event] = []
        offset = self._offset
        with self.path.open("rb") as file:
            file.seek(offset)
            while len(events) < max_events and offset < self._size:
                line = file.readline()
                offset += len(line)
                try:
                    events.append(wire.loads(line))
                except ValueError:
                    metrics.DROPPED.labels("spool_malformed").inc()
                    log.error(
                        "events.spool_malformed_line_skipped", path=str(self.path), offset=offset
                    )
        return events, offset

    def advance(self, offset: int) -> None:
        """Record that everything before ``offset`` reached Redis; empty the spool once all has."""
        self._offset = offset
        if self._offset >= self._size:
            self.path.write_bytes(b"")
            self._offset_path.unlink(missing_ok=True)
            self._size = self._offset = 0
        else:
            temporary = self._offset_path.with_name(self._offset_path.name + ".tmp")
            temporary.write_text(str(offset))
            os.replace(temporary, self._offset_path)
        metrics.SPOOL_PENDING.set(self.pending_bytes)
