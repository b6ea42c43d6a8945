"""Merging several processes' metric families into one page, with real ``prometheus_client`` registries."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from llm_proxy.runtime.metrics_merge import MergedRegistry

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class Process:
    """What one process registers: the same families everywhere, counted differently."""

    def __init__(self, start_time: float) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("requests", "Requests.", ["endpoint"], registry=self.registry)
        self.restarts = Counter("restarts", "Restarts.", registry=self.registry)
        self.latency = Histogram(
            "latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=self.registry
        )
        self.depth = Gauge("queue_depth", "Queue depth.", registry=self.registry)
        start = GaugeMetricFamily("process_start_time_seconds", "Start time.", value=start_time)
        self.registry.register(_Fixed(start))

    def page(self) -> list[Metric]:
        """The families as another worker gets them: through the text format."""
        return list(text_string_to_metric_families(generate_latest(self.registry).decode()))


class _Fixed(Collector):
    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> list[Metric]:
        return [self._family]


def samples_of(registry: MergedRegistry) -> dict[SampleKey, float]:
    """The merged page, rendered and parsed back as a scraper would; no sample twice."""
    samples: dict[SampleKey, float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} appears twice"
            samples[key] = sample.value
    return samples


def three_processes() -> tuple[Process, Process, Process]:
    first, second, third = Process(100.0), Process(200.0), Process(300.0)
    first.requests.labels("/v1/models").inc(2)
    second.requests.labels("/v1/models").inc(3)
    third.requests.labels("/v1/chat").inc(5)  # a label set only one process has counted
    second.restarts.inc()
    for value, process in ((0.05, first), (0.5, second), (5.0, third), (0.05, third)):
        process.latency.observe(value)
    first.depth.set(1)
    third.depth.set(4)
    return first, second, third


def test_counters_histograms_and_gauges_are_summed_over_every_source() -> None:
    first, second, third = three_processes()
    # The answering worker's own families, live; the others' parsed from their pages.
    samples = samples_of(MergedRegistry(first.registry.collect(), second.page(), third.page()))

    assert samples[("requests_total", (("endpoint", "/v1/models"),))] == 5
    assert samples[("requests_total", (("endpoint", "/v1/chat"),))] == 5
    assert samples[("restarts_total", ())] == 1
    assert samples[("latency_seconds_bucket", (("le", "0.1"),))] == 2
    assert samples[("latency_seconds_bucket", (("le", "1.0"),))] == 3
    assert samples[("latency_seconds_bucket", (("le", "+Inf"),))] == 4
    assert samples[("latency_seconds_count", ())] == 4
    assert samples[("latency_seconds_sum", ())] == 0.05 + 0.5 + 5.0 + 0.05
    assert samples[("queue_depth", ())] == 5


def test_creation_times_are_left_off_and_the_start_time_is_the_earliest_of_all() -> None:
    first, second, third = three_processes()
    # Live families carry them as samples, parsed pages as gauge families of their own.
    assert first.registry.get_sample_value("restarts_created") is not None
    assert any(f.name == "restarts_created" and f.type == "gauge" for f in second.page())
    samples = samples_of(MergedRegistry(first.registry.collect(), second.page(), third.page()))

    assert not [key for key in samples if key[0].endswith("_created")]
    assert samples[("restarts_total", ())] == 1
    # Neither summed nor repeated: the earliest, whichever source comes first (the worker that
    # answered the scrape), so that it does not change from one scrape to the next.
    assert samples[("process_start_time_seconds", ())] == 100.0
    reordered = samples_of(MergedRegistry(second.page(), first.page(), third.page()))
    assert reordered[("process_start_time_seconds", ())] == 100.0


def test_a_family_only_one_source_has_is_on_the_page() -> None:
    first, second, _ = three_processes()
    extra = GaugeMetricFamily("only_here", "Only in one process.", value=7)
    samples = samples_of(MergedRegistry(first.registry.collect(), [*second.page(), extra]))

    assert samples[("only_here", ())] == 7
    assert samples[("requests_total", (("endpoint", "/v1/models"),))] == 5


@pytest.mark.parametrize(
    "name", ["llm_proxy_change_feed_lag_seconds", "llm_proxy_events_backlog_bytes"]
)
def test_a_gauge_of_how_far_behind_is_the_worst_workers_not_a_sum(name: str) -> None:
    pages = [[GaugeMetricFamily(name, "Behind.", value=value)] for value in (0.2, 3.0, 0.5)]

    assert samples_of(MergedRegistry(*pages))[(name, ())] == 3.0


def test_a_counter_whose_name_ends_in_created_is_summed_not_taken_for_a_creation_time() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    for registry in (first, second):
        Counter("tokens_created", "Tokens created.", registry=registry).inc(2)
    parsed = [
        list(text_string_to_metric_families(generate_latest(r).decode())) for r in (first, second)
    ]
    samples = samples_of(MergedRegistry(*parsed))

    assert samples[("tokens_created_total", ())] == 4
