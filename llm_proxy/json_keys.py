"""JSON objects that may give a key twice: parsers keep the first or the last, so such an object is
either refused as ambiguous (the management API, ``manage``) or read with every member it spells,
for a check that must hold whichever copy an upstream keeps (the proxy path)."""

from __future__ import annotations

import json
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


class Members(list[tuple[str, Any]]):
    """A JSON object as every (key, value) member it spells, repeated keys included."""


def with_every_member(text: bytes) -> object:
    """JSON text with each object read as its :class:`Members`; ValueError when it is not JSON or
    nests deeper than the parser's recursion allows."""
    try:
        return json.loads(text, object_pairs_hook=Members)
    except RecursionError:
        raise ValueError("nested too deeply") from None
