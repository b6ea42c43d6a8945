"""One ``/metrics`` page out of several processes' families, summed sample by sample.

The sources are this worker's registry, its events process's report and, under
``llm-proxy server --workers N``, the pages of the other workers (``worker_metrics.py``). Every
process imports the same modules, so they register the same families; the page adds their samples
up, family by family and label set by label set, so each family appears once and a label set that
only one process has counted is still there. Summing is what a Prometheus ``sum by (...)`` over the
processes would give, for counters, histogram buckets and the gauges (queue depth, spool bytes)
alike; as every process's counters only grow, so does their sum, whichever worker answers.

Two kinds of series are not summed:

- Creation times (``*_created``): the earliest of the sources, so the page does not depend on
  which worker answered. Pages parsed from the text format carry them as families of their own
  (``x_created`` beside ``x``); they are folded back into their family first.
- Families that describe one process and mean nothing added up (:data:`PER_PROCESS`: its start
  time, its file descriptor limit, the Python version): the first source's, i.e. the answering
  worker's. The rest of the default collectors' families are totals worth having: CPU seconds,
  resident and virtual memory, open file descriptors and the garbage collector's counts are
  summed over the workers.
- Gauges where the worst process is what matters (:data:`HIGHEST`: how stale a worker's change
  feed is; one lagging worker is serving revoked tokens, and a sum would be N times too high):
  the highest of the sources.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

PER_PROCESS = frozenset({"process_start_time_seconds", "process_max_fds", "python_info"})
HIGHEST = frozenset({"llm_proxy_change_feed_lag_seconds"})

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
        for family, samples in _fold_creation_times(source):
            if family.name not in merged:
                merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                totals[family.name] = {}
            elif family.name in PER_PROCESS:
                continue
            combine = max if family.name in HIGHEST else operator.add
            _add(totals[family.name], family, samples, combine)
    for name, family in merged.items():
        family.samples = list(totals[name].values())
    return list(merged.values())


def _add(
    totals: dict[_SampleKey, Sample],
    family: Metric,
    samples: Iterable[Sample],
    combine: Callable[[float, float], float],
) -> None:
    creation_time = family.name + "_created"
    for sample in samples:
        key = sample.name, tuple(sorted(sample.labels.items()))
        known = totals.get(key)
        if known is None:
            totals[key] = sample
        elif sample.name == creation_time and family.type in _WITH_CREATION_TIME:
            totals[key] = known._replace(value=min(known.value, sample.value))
        else:
            totals[key] = known._replace(value=combine(known.value, sample.value))


def _fold_creation_times(families: Iterable[Metric]) -> list[tuple[Metric, list[Sample]]]:
    """Each family with its samples; the ``x_created`` gauges of a parsed page folded into ``x``."""
    listed = list(families)
    owners = {f.name for f in listed if f.type in _WITH_CREATION_TIME}
    creation_times: dict[str, list[Sample]] = {}
    rest: list[Metric] = []
    for family in listed:
        owner = family.name.removesuffix("_created")
        if family.type == "gauge" and owner != family.name and owner in owners:
            creation_times.setdefault(owner, []).extend(family.samples)
        else:
            rest.append(family)
    return [(f, [*f.samples, *creation_times.get(f.name, ())]) for f in rest]
