"""A JSON object that gives one key twice is ambiguous: parsers keep the first or the last, so the
management API refuses it, and ``manage`` before it sends anything."""

from __future__ import annotations

from typing import Any


class RepeatedKey(ValueError):
    """A JSON object gives one key twice."""


def unrepeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: the object, or RepeatedKey naming the key."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise RepeatedKey(f"the key {key!r} is given twice")
        seen.add(key)
    return dict(pairs)
