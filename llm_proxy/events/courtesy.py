"""Handing the CPU back in the middle of a batch, so that requests do not wait behind it.

Events come in bursts: the server ships what it answered in frames, and the events process
builds, publishes, aggregates and finally frees them a batch at a time. Its lower priority (see
``runtime/events_process.py``) gives the server the larger share of a contended CPU, but not the
CPU at once: a server, upstream or client woken on the CPU where a burst runs waits for the
burst, even with another CPU idle (the kernel does not always look for one). Handing the CPU back
whenever a thread has worked ``SLICE_NS`` since it last did lets a task waiting for that CPU run
first, at the cost of a system call that returns at once when none is waiting. (bench/README.md,
"Handing the CPU back" and "Bursts of the events process, timed", have the figures.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from time import perf_counter_ns
from typing import Any, TypeVar

Item = TypeVar("Item")

# The most work between two hand-backs. Time, not a count of items: an event with a long body
# takes a hundred times one without.
SLICE_NS = 100_000
# Items a released batch lets go of at once: enough that the clock is read rarely, few enough
# that freeing them stays well inside a slice.
RELEASED_AT_ONCE = 16


class _Clock(threading.local):
    """When this thread last handed the CPU back (0: never). Per thread: the builder's thread and
    the event loop's run their bursts apart."""

    handed_back = 0


_clock = _Clock()


def courteously(items: Iterable[Item]) -> Iterator[Item]:
    """``items`` in order, handing the CPU back whenever this thread has worked ``SLICE_NS``
    since it last did (after a wait, at the first item)."""
    clock = _clock
    for item in items:
        yield item
        if perf_counter_ns() - clock.handed_back >= SLICE_NS:
            os.sched_yield()
            clock.handed_back = perf_counter_ns()


def release(items: list[Any]) -> None:
    """Empty a finished batch a few items at a time, handing the CPU back as :func:`courteously`
    does. Whatever holds an object last frees it, and a batch's list letting go of all its events
    at once is a burst of a millisecond and more."""
    for _ in courteously(range(len(items) // RELEASED_AT_ONCE + 1)):
        del items[-RELEASED_AT_ONCE:]
