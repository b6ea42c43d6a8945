"""What a store raises when its database cannot be reached, refuses us, or is not a database."""

from __future__ import annotations

import sqlite3

import asyncpg

DATABASE_ERRORS = (
    OSError,
    TimeoutError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
