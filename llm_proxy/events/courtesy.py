"""Handing the CPU back in the middle of a batch, so that requests do not wait behind it.

Events come in bursts: the server ships what it answered every ``EventsConfig.linger``, and the
events process builds them all at once. Its lower priority (see ``runtime/events_process.py``)
gives the server the larger share of a contended CPU, but not always the CPU at once: a server,
upstream or client woken on the CPU where a burst runs can wait for the burst. Handing the CPU
back every few items lets a task waiting for it run first, at the cost of a system call that
returns at once when none is waiting. (bench/README.md, "Handing the CPU back", has the figures.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")

# Items between two hand-backs: a few hundred microseconds of building at most.
EVERY = 16


def courteously(items: Iterable[Item], every: int = EVERY) -> Iterator[Item]:
    """``items`` in order, handing the CPU to any task waiting for it after each ``every``."""
    for count, item in enumerate(items, 1):
        yield item
        if count % every == 0:
            os.sched_yield()
