"""Options of a PostgreSQL URL as libpq and SQLAlchemy write them, which asyncpg does not read.

asyncpg sends every option it does not know to the server as a setting, and PostgreSQL refuses
``connect_timeout`` and ``ssl`` as settings: a URL copied from a libpq, psycopg or SQLAlchemy
application would not open.
"""

from __future__ import annotations

from urllib.parse import unquote

CONNECT_TIMEOUT = "connect_timeout"
SQLALCHEMY_SSL = "ssl"  # SQLAlchemy's asyncpg dialect's name for libpq's sslmode
# libpq waits at least this long, whatever smaller number it is given.
MIN_CONNECT_SECONDS = 2


def split_connect_timeout(url: str) -> tuple[str, int | None]:
    """``url`` without its ``connect_timeout`` option, and the seconds it gives (None when it
    gives none, or 0 or less: libpq's "no limit", which here leaves the store's own bound).
    Raises ValueError when the option is not a whole number or is given twice."""
    head, mark, rest = url.partition("?")
    query, hash_mark, fragment = rest.partition("#")
    options = query.split("&") if mark else []
    kept: list[str] = []  # the other options, as written
    given: list[str] = []
    for option in options:
        name, _, value = option.partition("=")
        if unquote(name) == CONNECT_TIMEOUT:
            given.append(unquote(value))
        else:
            kept.append(option)
    if not given:
        return url, None
    if len(given) > 1:
        raise ValueError(f"{CONNECT_TIMEOUT} is given {len(given)} times")
    try:
        seconds = int(given[0])
    except ValueError:
        raise ValueError(f"{CONNECT_TIMEOUT} must be a whole number of seconds") from None
    rebuilt = f"{head}{'?' if kept else ''}{'&'.join(kept)}{hash_mark}{fragment}"
    return rebuilt, max(seconds, MIN_CONNECT_SECONDS) if seconds > 0 else None


def ssl_as_sslmode(url: str) -> str:
    """``url`` with its ``ssl=<mode>`` option named ``sslmode``, as asyncpg reads it. SQLAlchemy's
    asyncpg dialect spells the TLS mode ``ssl`` (it refuses ``sslmode``). Raises ValueError when
    the URL gives both."""
    head, mark, rest = url.partition("?")
    query, hash_mark, fragment = rest.partition("#")
    options = query.split("&") if mark else []
    names = [unquote(option.partition("=")[0]) for option in options]
    if SQLALCHEMY_SSL not in names:
        return url
    if "sslmode" in names:
        raise ValueError("give the TLS mode once, as ssl= or as sslmode=")
    renamed = [
        f"sslmode={option.partition('=')[2]}" if name == SQLALCHEMY_SSL else option
        for name, option in zip(names, options, strict=True)
    ]
    return f"{head}?{'&'.join(renamed)}{hash_mark}{fragment}"
