"""Files that may hold prompts and answers (event logs, dead letters, the spool) are created
readable by their owner only; an operator who wants them shared can widen the mode."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def owner_only(path: str, flags: int) -> int:
    """An ``opener`` for ``open()``/``io.FileIO`` creating new files with mode 0600."""
    return os.open(path, flags, 0o600)


@contextmanager
def owner_only_files() -> Iterator[None]:
    """Create files and directories readable by their owner only (umask 077), as PostgreSQL does
    for its data directory: DATA_DIR (0700), the SQLite database and its -wal and -shm (0600,
    which SQLite copies from the database), whoever of the server's or dispatcher's parts
    creates them."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)
