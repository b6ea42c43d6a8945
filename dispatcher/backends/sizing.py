"""What backends with size limits share: batches bounded by count and bytes, and bodies cut to fit.

A service refuses a whole request that is too large, so a batch is split before it is sent rather
than dead-lettered after; a body that alone would be too large is cut and sent as text, so one
long prompt does not cost its event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import orjson

TRUNCATED = "…[truncated by llm-proxy]"

T = TypeVar("T")


def fit(value: object, limit: int) -> tuple[object, str | None]:
    """``value`` if its JSON fits in ``limit`` bytes, else None and its JSON text cut to fit."""
    text = orjson.dumps(value)
    if len(text) <= limit:
        return value, None
    return None, text[:limit].decode("utf-8", "ignore") + TRUNCATED


def batches(
    items: Sequence[T],
    size: Callable[[T], int],
    *,
    max_items: int,
    max_bytes: int,
    apart: Callable[[T, T], bool] | None = None,
) -> Iterator[list[T]]:
    """Split ``items``, in order, into batches of at most ``max_items`` items and ``max_bytes``
    bytes (by ``size``), where no item is ``apart`` from its batch's first. An item larger than
    ``max_bytes`` makes a batch of its own: cutting it to fit is the caller's business."""
    batch: list[T] = []
    total = 0
    for item in items:
        item_size = size(item)
        if batch and (
            len(batch) >= max_items
            or total + item_size > max_bytes
            or (apart is not None and apart(batch[0], item))
        ):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += item_size
    if batch:
        yield batch
