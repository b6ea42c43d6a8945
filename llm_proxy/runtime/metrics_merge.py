"""One ``/metrics`` page out of several processes' families, summed sample by sample.

The sources are this worker's registry, its events process's report and, under
``llm-proxy server --workers N``, the pages of the other workers (``worker_metrics.py``). Every
process imports the same modules, so they register the same families; the page adds their samples
up, family by family and label set by label set, so each family appears once and a label set that
only one process has counted is still there. Summing is what a Prometheus ``sum by (...)`` over the
processes would give, for counters, histogram buckets and the gauges (queue depth, spool bytes)
alike; as every process's counters only grow, so does their sum, whichever worker answers.

Some series are left off or not summed:

- Creation times (``*_created``) are left off. The text format has no place for them in their
  counter's or histogram's family: ``prometheus_client`` writes them as gauges of their own
  (``x_created`` beside ``x_total``), which dashboards then list as stray gauges, and the page's
  sums have no single creation time anyway (each process started its counters at its own time).
  Prometheus tells a counter's restarts from its value going down, without them. Pages parsed from
  the text format carry them as those gauge families, recognised by the family beside them.
- Families that describe one process and mean nothing added up (:data:`PER_PROCESS`: its file
  descriptor limit, the Python version): the first source's, i.e. the answering worker's. The
  start time is the earliest of the sources' (:data:`EARLIEST`), not the answering worker's:
  workers start at different times (a replaced one seconds or days later), and a start time that
  changed with the worker a scrape landed on would read as a restart at every scrape to the
  alerts and panels that watch it (``changes()``, uptime). The rest of the default collectors'
  families are totals worth having: CPU seconds, resident and virtual memory, open file
  descriptors and the garbage collector's counts are summed over the workers.
- Gauges where the worst process is what matters (:data:`HIGHEST`: how stale a worker's change
  feed is; one lagging worker is serving revoked tokens, and a sum would be N times too high; how
  far a worker's events process is behind, against a bound that is per worker): the highest of
  the sources.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

PER_PROCESS = frozenset({"process_max_fds", "python_info"})
EARLIEST = frozenset({"process_start_time_seconds"})
# The types whose series only grow while their process lives (gauges go up and down).
GROWING = frozenset({"counter", "histogram", "summary"})
HIGHEST = frozenset({"llm_proxy_change_feed_lag_seconds", "llm_proxy_events_backlog_bytes"})

_COMBINE: dict[str, Callable[[float, float], float]] = {
    **dict.fromkeys(HIGHEST, max),
    **dict.fromkeys(EARLIEST, min),
}

# Families whose samples may include a creation time (``<family>_created``).
_WITH_CREATION_TIME = frozenset({"counter", "histogram", "gaugehistogram", "summary"})

_SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class MergedRegistry(Collector):
    """The families of ``sources`` merged into one page; each source is iterated once."""

    def __init__(self, *sources: Iterable[Metric]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        return iter(merge_families(self._sources))


def merge_families(sources: Sequence[Iterable[Metric]]) -> list[Metric]:
    """Each family once, its samples added up over ``sources`` (see the module's docstring)."""
    merged: dict[str, Metric] = {}
    totals: dict[str, dict[_SampleKey, Sample]] = {}
    for source in sources:
        for family, samples in _without_creation_times(source):
            if family.name not in merged:
                merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                totals[family.name] = {}
            elif family.name in PER_PROCESS:
                continue
            combine = _COMBINE.get(family.name, operator.add)
            _add(totals[family.name], samples, combine)
    for name, family in merged.items():
        family.samples = list(totals[name].values())
    return list(merged.values())


def growing(families: Iterable[Metric]) -> list[Metric]:
    """The families of ``families`` whose series only grow."""
    return [family for family in families if family.type in GROWING]


def _add(
    totals: dict[_SampleKey, Sample],
    samples: Iterable[Sample],
    combine: Callable[[float, float], float],
) -> None:
    for sample in samples:
        key = sample.name, tuple(sorted(sample.labels.items()))
        known = totals.get(key)
        totals[key] = (
            sample if known is None else known._replace(value=combine(known.value, sample.value))
        )


def _without_creation_times(families: Iterable[Metric]) -> list[tuple[Metric, list[Sample]]]:
    """Each family with its samples, less its creation times: a live family's ``x_created``
    samples, and a parsed page's ``x_created`` gauges beside ``x``."""
    listed = list(families)
    owners = {f.name for f in listed if f.type in _WITH_CREATION_TIME}
    kept: list[tuple[Metric, list[Sample]]] = []
    for family in listed:
        owner = family.name.removesuffix("_created")
        if family.type == "gauge" and owner != family.name and owner in owners:
            continue
        samples = family.samples
        if family.type in _WITH_CREATION_TIME:
            creation_time = family.name + "_created"
            samples = [s for s in samples if s.name != creation_time]
        kept.append((family, samples))
    return kept
