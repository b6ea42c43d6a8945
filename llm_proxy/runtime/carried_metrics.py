"""The events process's counters, carried past its restarts, so that ``/metrics`` never goes down.

A worker's page adds the counters its events process last reported to its own, and some families
have samples from both (``llm_proxy_events_dropped_total``, the processes' CPU seconds). When the
events process dies, the server starts another, which counts from zero: the page's sums would
drop, and Prometheus reads a drop as a reset of the whole series, so ``rate()`` would count the
server's own part again as new. :class:`CarriedAcrossRestarts` remembers the growing series the
old process last reported and adds them to its successor's, as ``slot_totals.py`` does for a
worker replaced under ``--workers``. What the old process counted after its last report is lost
with it.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.metrics_core import Metric

from llm_proxy.runtime.metrics_merge import growing, merge_families


class CarriedAcrossRestarts:
    """``source``'s families plus what earlier generations of its process reported last;
    ``generation`` tells when the process was replaced (its restart count)."""

    def __init__(self, source: Callable[[], list[Metric]], generation: Callable[[], int]) -> None:
        self._source = source
        self._generation = generation
        self._seen = generation()
        self._latest: list[Metric] = []  # the current generation's last report, as served
        self._carried: list[Metric] = []

    def __call__(self) -> list[Metric]:
        # Both read with no await between: the offload replaces its status and counts the
        # restart in one step of the loop, so a report never goes with the wrong generation.
        families = self._source()
        generation = self._generation()
        if generation != self._seen:
            self._carried = merge_families([self._carried, growing(self._latest)])
            self._seen = generation
        self._latest = families
        if not self._carried:
            return families
        return merge_families([families, self._carried])
