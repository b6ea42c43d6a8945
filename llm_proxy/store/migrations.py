"""Numbered SQL migrations shipped with the package, applied in order at start-up."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources


def migration_scripts(backend: str) -> list[tuple[int, str]]:
    """``(version, sql)`` for every ``NNN_name.sql`` of a backend, lowest version first."""
    folder = resources.files("llm_proxy.store").joinpath("migrations", backend)
    scripts = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            scripts.append((int(name[:3]), entry.read_text()))
    return sorted(scripts)


class SchemaNewerThanRelease(Exception):
    """The database records migrations this release does not ship: a newer release migrated it.

    Refused rather than served: this release would misread what the newer one writes, and write
    what it then misreads (a column the newer schema relies on left stale by every change made
    here), so the data stays as the newer release left it, for that release or a backup."""

    def __init__(self, versions: list[int]) -> None:
        self.versions = versions
        named = ", ".join(f"{v:03d}" for v in versions)
        super().__init__(
            f"it records migrations this release does not ship ({named}): a newer release"
            " migrated it; run that release (or a later one), or restore a backup taken before it"
        )


def refuse_newer(found: Iterable[int], backend: str) -> None:
    """Raise :class:`SchemaNewerThanRelease` when ``found`` (the versions a database records)
    holds any this release does not ship."""
    known = {version for version, _ in migration_scripts(backend)}
    unknown = sorted(set(found) - known)
    if unknown:
        raise SchemaNewerThanRelease(unknown)
