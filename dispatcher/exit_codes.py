"""Exit codes of ``llm-proxy dispatcher`` and its subcommands: each names a different thing to fix.

2 is click's own, for a bad invocation. Each command lists the codes it uses in its ``--help``.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED = 1  # the backend could not start; ``check``: no dispatcher running, or lagging
    USAGE = 2
    BUS_UNAVAILABLE = 3  # Redis could not be reached
    DEAD_LETTERED = 4  # events went to a dead-letter file
    AUTH = 5  # the backend refused the credentials
    EVENTS_LOST = 6  # the bus lost events before this service read them
    INTERRUPTED = 7  # ``replay`` stopped by SIGINT or SIGTERM: run it again to resume
