"""One ``/metrics`` page for the server and its events process.

Both processes register the same event and dispatcher families (the modules are imported in both),
but only the events process counts in them. The page adds the events process's samples to the
server's, family by family, so each family appears once: summing is what a Prometheus
``sum by (...)`` over the two processes would give, for counters, histogram buckets and the gauges
(queue depth, spool bytes) alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample


class MergedRegistry(Collector):
    """``registry``'s families with ``extra()``'s samples added in."""

    def __init__(self, registry: Collector, extra: Callable[[], Iterable[Metric]]) -> None:
        self._registry = registry
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        # Creation times (``*_created``, a family of their own in the text format): the server's
        # own are the ones to keep.
        extra = {f.name: f for f in self._extra() if not f.name.endswith("_created")}
        for family in self._registry.collect():
            other = extra.pop(family.name, None)
            yield family if other is None else _merge(family, other)
        yield from extra.values()


def _merge(ours: Metric, theirs: Metric) -> Metric:
    merged = Metric(ours.name, ours.documentation, ours.type, ours.unit)
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}
    for sample in ours.samples:
        totals[_key(sample)] = sample
    for sample in theirs.samples:
        if sample.name.endswith("_created"):
            continue
        key = _key(sample)
        if key in totals:
            totals[key] = totals[key]._replace(value=totals[key].value + sample.value)
        else:
            totals[key] = sample
    merged.samples = list(totals.values())
    return merged


def _key(sample: Sample) -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample.name, tuple(sorted(sample.labels.items()))
