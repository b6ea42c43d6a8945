"""Writes straight into the SQLite file of a server that runs in the test's own event loop.

The write runs in a thread. Run in the loop, it would block the loop for as long as it waits for
SQLite's write lock, and the lock may be held by a transaction of the server's (the usage
aggregation's, an admission's) that only this same loop can finish: the write would then wait out
its whole busy timeout and fail with "database is locked".
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_SECONDS = 30.0


def _execute(database: Path, sql: str, parameters: Sequence[Any]) -> None:
    connection = sqlite3.connect(database, timeout=BUSY_TIMEOUT_SECONDS)
    try:
        with connection:  # one transaction, committed
            connection.execute(sql, parameters)
    finally:
        connection.close()


async def write_sqlite(database: Path, sql: str, parameters: Sequence[Any] = ()) -> None:
    """Run one statement in a transaction of its own, off the event loop."""
    await asyncio.to_thread(_execute, database, sql, parameters)
