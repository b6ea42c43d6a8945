"""Appending lines to a file that must hold whole lines only (the events spool, the file event
log, dead letters), whatever the disk does to a write."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import IO


def append_or_cut_back(file: IO[bytes], data: bytes, size: int) -> None:
    """Write all of ``data`` to the unbuffered ``file`` and make it durable; when the disk takes
    only part of it (full), cut the file back to ``size``, where it ended before, and raise.

    A torn line left behind would have the next write glued onto it: a line that holds no event,
    and the good event in it lost. ``file`` is unbuffered, or closing it would write the rest
    again.
    """
    try:
        view = memoryview(data)
        while view:
            view = view[file.write(view) :]
        _sync(file.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(file.fileno(), size)
        raise


def _sync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        # A pipe, FIFO, socket or terminal (``/dev/stdout`` in a container) has nothing to sync:
        # what was written is with the reader already, and failing would write it again.
        if exc.errno != errno.EINVAL:
            raise
