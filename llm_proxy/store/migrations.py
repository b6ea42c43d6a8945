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


def unknown_versions(found: Iterable[int], backend: str) -> list[int]:
    """The versions recorded in a database that this release does not ship: a newer release
    migrated it (a rollback, or an old instance still running during an upgrade)."""
    known = {version for version, _ in migration_scripts(backend)}
    return sorted(set(found) - known)
