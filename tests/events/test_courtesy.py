"""The events process hands the CPU back between pieces of a batch (events/courtesy.py)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from llm_proxy.events.courtesy import courteously


def test_every_item_passes_once_in_order_whatever_the_spacing() -> None:
    for every in (1, 7, 16, 1000):
        assert list(courteously(range(100), every)) == list(range(100))
    assert list(courteously([])) == []


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


def _switched_away(every: int) -> int:
    """How often this thread gave the CPU up, not sleeping, over a batch of 1,600 items."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
    for _ in courteously(range(1600), every):
        pass
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw - before


def test_a_process_waiting_for_the_cpu_runs_between_pieces_of_a_batch() -> None:
    with _sharing_one_cpu_with_a_busy_process():
        without = _switched_away(every=10_000)  # no hand-back: the batch keeps its time slice
        handing_back = _switched_away(every=16)  # 100 hand-backs
    # Not every hand-back switches: the scheduler passes over a waiting task that has just had
    # more than its share (EEVDF's eligibility), so about a third of them do on Linux 6.
    assert handing_back >= without + 15, (handing_back, without)
