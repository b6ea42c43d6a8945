"""How far a ``replay`` got, so that one interrupted (a signal, a crash, a machine going down)
resumes where it stopped when run again, instead of sending again what it had delivered.

Kept next to FILE as ``FILE.replay-progress`` (JSON): how much of FILE was handled (every event
before that point delivered, or written to the new dead-letter file), that dead-letter file, and
FILE's identity (device and inode), so that it never applies to another file of the same name.
Rewritten whole and durably after every batch; removed once FILE was read to its end.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orjson

SUFFIX = ".replay-progress"


class ProgressError(Exception):
    """A progress file that cannot be used for this FILE; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Progress:
    offset: int  # bytes of FILE handled
    line: int  # lines of FILE handled
    dead_letter: Path  # where what failed so far was written, and what fails next goes


# The byte of FILE a replay locks (an open-file-description write lock, F_OFD_SETLK): far past
# any end, so no reader or appender meets it, and apart from the flock() dispatchers append under.
_CLAIMED_BYTE = 1 << 62


class ProgressFile:
    def __init__(self, file: Path) -> None:
        self.file = file
        self.path = file.with_name(file.name + SUFFIX)
        self._claim: int | None = None  # the descriptor holding the lock, while this replay runs

    def claim(self) -> None:
        """Stake this replay's claim to FILE, held until the process ends: a second replay of it
        at once would send again what the first is sending, and both would write one progress.
        A FILE this user may only read cannot be claimed: such a replay goes on unclaimed."""
        command = getattr(fcntl, "F_OFD_SETLK", None)  # Linux's; elsewhere a replay is unclaimed
        if command is None:
            return
        try:
            descriptor = os.open(self.file, os.O_RDWR)  # (a write lock needs it; nothing written)
        except OSError:
            return
        lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _CLAIMED_BYTE, 1, 0)
        try:
            fcntl.fcntl(descriptor, command, lock)
        except OSError:
            os.close(descriptor)
            raise ProgressError(
                f"another replay of {self.file} is running: let it end, or stop it (Ctrl-C) and"
                " run the same command again to resume"
            ) from None
        self._claim = descriptor
        self._remove_strays()

    def _remove_strays(self) -> None:
        """Remove what a replay of FILE killed while saving its progress left: the temporary
        file it was writing. Only with FILE claimed (no replay of it is saving now), and only
        this user's own regular files (a link is removed, never followed)."""
        pattern = glob.escape(self.path.name) + ".*.tmp"
        for stray in self.path.parent.glob(pattern):
            with contextlib.suppress(OSError):
                found = stray.lstat()
                if stat.S_ISREG(found.st_mode) and found.st_uid == os.geteuid():
                    stray.unlink()

    def release(self) -> None:
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None

    def _identity(self) -> list[int]:
        found = os.stat(self.file)
        return [found.st_dev, found.st_ino]

    def load(self) -> Progress | None:
        """The progress of an interrupted replay of FILE, or None when there is none."""
        start_over = f"remove {self.path} to replay {self.file} from its start"
        try:
            descriptor = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with open(descriptor, "rb") as handle:
            owner = os.fstat(handle.fileno()).st_uid
            raw = handle.read()
        if owner != os.geteuid():
            # Another user's (in a directory others can write): it names the dead-letter file the
            # replay appends to, which would be any file of this user's that it chose.
            raise ProgressError(f"{self.path} is not this user's own: {start_over}")
        try:
            record = orjson.loads(raw)
            progress = Progress(
                int(record["offset"]), int(record["line"]), Path(record["dead_letter"])
            )
            identity = [int(part) for part in record["file"]]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ProgressError(f"{self.path} is unreadable: {start_over}") from None
        if identity != self._identity() or os.stat(self.file).st_size < progress.offset:
            raise ProgressError(
                f"{self.path} is the progress of another file than {self.file} (replaced or"
                f" cut since): {start_over}"
            )
        return progress

    def save(self, progress: Progress) -> None:
        """Replace the progress, durably: a crash leaves the old one or the new one, whole."""
        data = orjson.dumps(
            {
                "file": self._identity(),
                "offset": progress.offset,
                "line": progress.line,
                "dead_letter": str(progress.dead_letter),
            }
        )
        # A new file of its own (O_EXCL, 0600, a name nobody chose beforehand): a fixed name was
        # opened as it stood, so a symlink planted there had the replay overwrite its target, and
        # two replays of FILE wrote into one file.
        handle, temporary = tempfile.mkstemp(
            prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent
        )
        try:
            with open(handle, "wb", buffering=0) as file:
                file.write(data)
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
