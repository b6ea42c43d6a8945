"""What a store raises when its database cannot be reached, refuses us, or is not a database."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

import asyncpg

from llm_proxy.models import Claim


class UnreadableDatabaseUrl(Exception):
    """The database driver could not read the URL. asyncpg says so with a ValueError that may
    quote part of the password (it splits the credentials at another "@" than urllib), so only
    :func:`without_credentials` of it is kept."""


class CommitInDoubt(Exception):
    """A transaction's COMMIT went to the database and its answer never came back (the connection
    died, or timed out): it may or may not have committed. ``committed()`` asks the database which,
    and raises while it cannot tell (unreachable, or the transaction is still ending)."""

    def __init__(self, committed: Callable[[], Awaitable[bool]]) -> None:
        super().__init__("the database's answer to COMMIT was lost")
        self.committed = committed


class FateUnknown(Exception):
    """The database cannot tell yet whether a transaction whose COMMIT went unanswered committed
    (it is still ending): asked again later."""


DATABASE_ERRORS = (
    OSError,
    TimeoutError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # What the first query on a pooled connection raises once PostgreSQL has gone away under it
    # ("cannot switch to state …; another operation is in progress"); the pool drops it after.
    asyncpg.InternalClientError,
    UnreadableDatabaseUrl,
    # Unavailable too, for the caller: the database's answer was lost, or it cannot tell yet.
    CommitInDoubt,
    FateUnknown,
)

# The database's refusal of a row whose foreign key names no row (its parent was deleted meanwhile):
# an answer, unlike a timeout or a lost connection, which say nothing of the row.
FOREIGN_KEY_REFUSALS = (sqlite3.IntegrityError, asyncpg.ForeignKeyViolationError)

# The credentials of a URL: its authority up to the last "@" (urllib's reading; a driver may read
# less of it), and a password given as a query parameter.
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@")
_QUERY_PASSWORD = re.compile(r"[?&]password=([^&#]*)", re.IGNORECASE)
# Pieces of a password shorter than this are left in a message: masking them would mangle it.
_SHORTEST_PIECE = 3


def without_credentials(text: str, url: str) -> str:
    """``text`` (an error about ``url``) with the URL's password masked, and every piece of it
    between ``@`` and ``:``, which a driver that split the URL elsewhere may quote."""
    secrets: set[str] = set()
    userinfo = _USERINFO.match(url)
    if userinfo is not None:
        password = userinfo.group(1).partition(":")[2]
        secrets.update([password, *re.split(r"[@:]", password)])
    secrets.update(_QUERY_PASSWORD.findall(url))
    secrets |= {unquote(secret) for secret in secrets}
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _SHORTEST_PIECE:
            text = text.replace(secret, "***")
    return text


class ClaimInDoubt(CommitInDoubt):
    """A request claim's COMMIT went unanswered (see :class:`CommitInDoubt`); ``claim`` is what
    it wrote, which holds if it committed."""

    def __init__(self, committed: Callable[[], Awaitable[bool]], claim: Claim) -> None:
        super().__init__(committed)
        self.claim = claim
