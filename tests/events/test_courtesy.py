"""The events process hands the CPU back during a batch (events/courtesy.py): whenever a thread
has worked a slice since it last did, while iterating and while freeing a finished batch."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter_ns

import pytest

from llm_proxy.events.courtesy import RELEASED_AT_ONCE, SLICE_NS, courteously, release


def _work(ns: int) -> None:
    """Keep this CPU busy for ``ns``, as building an event does."""
    until = perf_counter_ns() + ns
    while perf_counter_ns() < until:
        pass


class _SlowToFree:
    """An object whose freeing takes a while, like an event holding long bodies."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __del__(self) -> None:
        _work(self.ns)


def test_every_item_passes_once_in_order() -> None:
    assert list(courteously(range(100))) == list(range(100))
    assert list(courteously([])) == []


@pytest.mark.parametrize(
    "length", [0, 1, RELEASED_AT_ONCE - 1, RELEASED_AT_ONCE, RELEASED_AT_ONCE + 1, 1000]
)
def test_a_released_batch_is_emptied_and_its_items_freed(length: int) -> None:
    freed: list[int] = []

    class Item:
        def __init__(self, n: int) -> None:
            self.n = n

        def __del__(self) -> None:
            freed.append(self.n)

    batch = [Item(n) for n in range(length)]
    release(batch)
    assert batch == []
    assert sorted(freed) == list(range(length))


@contextmanager
def _sharing_one_cpu_with_a_busy_process() -> Iterator[None]:
    """This thread and a process that never sleeps, on the same CPU."""
    cpu = min(os.sched_getaffinity(0))
    spinner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os; os.sched_setaffinity(0, {{{cpu}}}); print('spinning', flush=True)\n"
            "while True: pass",
        ],
        stdout=subprocess.PIPE,
    )
    said = spinner.stdout
    assert said is not None
    allowed = os.sched_getaffinity(0)
    try:
        assert said.readline() == b"spinning\n"
        os.sched_setaffinity(0, {cpu})
        yield
    finally:
        os.sched_setaffinity(0, allowed)
        spinner.kill()
        spinner.wait()
        said.close()


def _switches() -> int:
    """How often this thread has given the CPU up without sleeping."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw


# A batch of few, costly items: 160 of 4 slices each. Counting items between hand-backs (every 16,
# as before) would hand back ten times; the clock hands back after each item.
_ITEMS, _ITEM_NS = 160, 4 * SLICE_NS


def test_a_process_waiting_for_the_cpu_runs_during_a_batch_of_costly_items() -> None:
    with _sharing_one_cpu_with_a_busy_process():
        before = _switches()
        for _ in range(_ITEMS):
            _work(_ITEM_NS)
        without = _switches() - before  # the batch keeps the CPU for its time slice
        before = _switches()
        for _ in courteously(range(_ITEMS)):
            _work(_ITEM_NS)
        handing_back = _switches() - before
    # Not every hand-back switches: the scheduler passes over a waiting task that has just had
    # more than its share (EEVDF's eligibility), so a third to a half of them do on Linux 6.
    assert handing_back >= without + 20, (handing_back, without)


def test_a_process_waiting_for_the_cpu_runs_while_a_batch_is_freed() -> None:
    with _sharing_one_cpu_with_a_busy_process():
        batch = [
            _SlowToFree(_ITEM_NS // RELEASED_AT_ONCE) for _ in range(_ITEMS * RELEASED_AT_ONCE)
        ]
        before = _switches()
        batch.clear()  # everything freed in one go
        without = _switches() - before
        batch = [
            _SlowToFree(_ITEM_NS // RELEASED_AT_ONCE) for _ in range(_ITEMS * RELEASED_AT_ONCE)
        ]
        before = _switches()
        release(batch)
        handing_back = _switches() - before
    assert handing_back >= without + 20, (handing_back, without)
