"""libpq's ``connect_timeout`` in a PostgreSQL URL, which asyncpg does not read.

asyncpg sends every option it does not know to the server as a setting, and PostgreSQL refuses
``connect_timeout`` as one: a URL copied from a libpq or psycopg application would not open.
"""

from __future__ import annotations

from urllib.parse import unquote

OPTION = "connect_timeout"
# libpq waits at least this long, whatever smaller number it is given.
MIN_SECONDS = 2


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
        if unquote(name) == OPTION:
            given.append(unquote(value))
        else:
            kept.append(option)
    if not given:
        return url, None
    if len(given) > 1:
        raise ValueError(f"{OPTION} is given {len(given)} times")
    try:
        seconds = int(given[0])
    except ValueError:
        raise ValueError(f"{OPTION} must be a whole number of seconds") from None
    rebuilt = f"{head}{'?' if kept else ''}{'&'.join(kept)}{hash_mark}{fragment}"
    return rebuilt, max(seconds, MIN_SECONDS) if seconds > 0 else None
