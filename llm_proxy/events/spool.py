"""Append-only spool file for events that could not be written to Redis.

Lines are whole JSON events. A sidecar ``.offset`` file records how far replay has got, so a restart
resumes where it stopped (an event replayed just before a crash may be replayed twice, which the
at-least-once contract allows). When everything is replayed the file is emptied. A spool holds at
most ``max_bytes`` of events not yet replayed: a long outage drops (and counts) what comes beyond,
rather than fill the disk, which the SQLite database and the other spools may share.

The methods are blocking file I/O; :class:`~llm_proxy.events.redis.RedisBus` runs them in a thread
and serialises them with a lock.

Only one process may write or replay a spool: emptying it once replayed would wipe another's lines.
Each events process holds a :class:`SpoolClaim` (an exclusive ``flock``) on the spool it uses, and
claims the spools no live process holds (left by a process gone) to replay them.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import structlog

from llm_proxy.durable_append import append_or_cut_back
from llm_proxy.events import event as wire
from llm_proxy.events import metrics
from llm_proxy.events.event import Event
from llm_proxy.private_files import owner_only
from llm_proxy.sparse_warning import SparseWarning

log = structlog.get_logger(__name__)


class Spool:
    def __init__(self, path: Path, *, max_bytes: int | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes  # of events not yet replayed; None: no bound
        self._full = SparseWarning("events.spool_full")
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
        written = self._within_bound(written)
        if not written:
            return
        data = b"".join(line + b"\n" for line in written)
        # Durable, as the spool exists for when things go wrong; and whole lines only, or the
        # next line is glued to a torn one and replay, which goes by the size written, stops
        # short of the last lines and empties the spool with them in it.
        with open(self.path, "ab", buffering=0, opener=owner_only) as file:
            append_or_cut_back(file, data, self._size)
        self._size += len(data)
        metrics.SPOOLED.inc(len(written))
        metrics.SPOOL_PENDING.set(self.pending_bytes)

    def _within_bound(self, lines: list[bytes]) -> list[bytes]:
        """The first of ``lines`` that fit in ``max_bytes``; the others are dropped, counted."""
        if self.max_bytes is None:
            return lines
        room = self.max_bytes - self.pending_bytes
        fitting = 0
        for line in lines:
            room -= len(line) + 1
            if room < 0:
                break
            fitting += 1
        if dropped := len(lines) - fitting:
            metrics.DROPPED.labels("spool_full").inc(dropped)
            self._full.happened(dropped, path=str(self.path), max_bytes=self.max_bytes)
        return lines[:fitting]

    def read(self, max_events: int) -> tuple[list[Event], int]:
        """The next events after the replay offset, and the offset just past them."""
        events: list[Event] = []
        offset = self._offset
        with self.path.open("rb") as file:
            file.seek(offset)
            while len(events) < max_events and offset < self._size:
                line = file.readline()
                if not line:  # shorter than this process wrote: end here rather than spin
                    log.error("events.spool_shorter_than_written", path=str(self.path))
                    self._size = offset
                    break
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

    def discard(self) -> None:
        """Remove an empty stand-in spool as its process ends (nobody else writes to it)."""
        self.path.unlink(missing_ok=True)
        self._offset_path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".lock").unlink(missing_ok=True)


class SpoolClaim:
    """The exclusive right to write or replay the spool at ``path``, held until released (or the
    process ends: the kernel drops the lock)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def take(cls, path: Path) -> SpoolClaim | None:
        """The claim on ``path``, or None when another process (or another bus) holds it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        # The lock file stays: a process that opened it must never lock a file since replaced.
        os.close(self._fd)


def claim_own(path: Path) -> tuple[SpoolClaim, bool]:
    """The claim on ``path``, or, while another holds it (a predecessor still ending), on a spool
    of this process's own beside it, which anyone may claim and replay once this process is gone.
    Also says whether the spool is such a stand-in."""
    claim = SpoolClaim.take(path)
    stand_in = False
    while claim is None:
        stand_in = True
        other = path.with_name(f"{path.stem}-{uuid.uuid4().hex[:8]}{path.suffix}")
        log.warning("events.spool_held_elsewhere", path=str(path), instead=str(other))
        claim = SpoolClaim.take(other)
    return claim, stand_in


def claim_left(own: Path, family: str) -> list[tuple[Spool, SpoolClaim]]:
    """The spools matching ``family`` beside ``own`` that no process holds and that hold events
    (a worker count that shrank, a process that wrote to a stand-in)."""
    claimed: list[tuple[Spool, SpoolClaim]] = []
    for path in sorted(own.parent.glob(family)):
        if path == own or not path.is_file():
            continue
        claim = SpoolClaim.take(path)
        if claim is None:
            continue
        spool = Spool(path)
        if spool.pending:
            claimed.append((spool, claim))
        else:
            claim.release()
    return claimed
