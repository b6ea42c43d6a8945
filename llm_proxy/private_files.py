"""Files that may hold prompts and answers (event logs, dead letters, the spool) are created
readable by their owner only; an operator who wants them shared can widen the mode."""

from __future__ import annotations

import os


def owner_only(path: str, flags: int) -> int:
    """An ``opener`` for ``open()``/``io.FileIO`` creating new files with mode 0600."""
    return os.open(path, flags, 0o600)
