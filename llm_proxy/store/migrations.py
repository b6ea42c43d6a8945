"""Numbered SQL migrations shipped with the package, applied in order at start-up.

Each script may declare, in a line of its own, the oldest schema version whose release may keep
serving on a database with it applied::

    -- serves-from: 009

That release writes everything the migration's schema relies on (an index, a column whose
default is right for every row the older release writes, a one-off rewrite of data it reads the
same way). The runner records the marker with the version, so a release that finds migrations it
does not ship can tell a rollback it may serve (each of them declares a version it ships) from
one it must refuse. Without the line no earlier release may serve: declare it only when that is
so, since an older release serving wrongly (a limit it does not enforce, a column it leaves
stale) is worse than one that does not start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources

import structlog

log = structlog.get_logger(__name__)

_SERVES_FROM = re.compile(r"^-- serves-from: (\d{3})\s*$", re.MULTILINE)


def migration_scripts(backend: str) -> list[tuple[int, str]]:
    """``(version, sql)`` for every ``NNN_name.sql`` of a backend, lowest version first."""
    folder = resources.files("llm_proxy.store").joinpath("migrations", backend)
    scripts = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            scripts.append((int(name[:3]), entry.read_text()))
    return sorted(scripts)


def serves_from(sql: str) -> int | None:
    """The version a script's ``-- serves-from: NNN`` line declares; None when it has none."""
    found = _SERVES_FROM.search(sql)
    return int(found.group(1)) if found else None


class SchemaNewerThanRelease(Exception):
    """The database records migrations this release does not ship, and at least one of them
    does not declare that this release may serve on it: a newer release migrated it.

    Refused rather than served: this release would misread what the newer one writes, and write
    what it then misreads (a column the newer schema relies on left stale by every change made
    here), so the data stays as the newer release left it, for that release or a backup."""

    def __init__(self, versions: list[int], incompatible: list[int], latest: int) -> None:
        self.versions = versions
        self.incompatible = incompatible
        named = ", ".join(f"{v:03d}" for v in versions)
        blocking = ", ".join(f"{v:03d}" for v in incompatible)
        super().__init__(
            f"it records migrations this release does not ship ({named}): a newer release"
            f" migrated it, and {blocking} {'does' if len(incompatible) == 1 else 'do'} not"
            f" declare that this release (schema"
            f" {latest:03d}) may serve on it; run that release (or a later one), or restore a"
            " backup taken before it"
        )


def refuse_newer(recorded: Mapping[int, int | None], backend: str) -> list[int]:
    """The versions ``recorded`` (a database's, each with its recorded serves-from) holds that
    this release does not ship, when every one of them lets this release serve; logs them in
    one warning line. Raises :class:`SchemaNewerThanRelease` when any of them does not."""
    shipped = [version for version, _ in migration_scripts(backend)]
    latest = max(shipped)
    unknown = sorted(set(recorded) - set(shipped))
    incompatible = [v for v in unknown if not _lets_serve(recorded[v], latest)]
    if incompatible:
        raise SchemaNewerThanRelease(unknown, incompatible, latest)
    if unknown:
        log.warning(
            "store.schema_newer_than_release",
            versions=", ".join(f"{v:03d}" for v in unknown),
            schema=f"{latest:03d}",
            serving="each of them declares that this release may serve on it",
        )
    return unknown


def _lets_serve(marker: int | None, latest: int) -> bool:
    return marker is not None and marker <= latest
