"""A worker slot's counters outlive its worker: kept at each page, read for a silent sibling,
carried into a replacement, and forgotten by the next run."""

from __future__ import annotations

import stat
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric

from llm_proxy.runtime.metrics_merge import MergedRegistry
from llm_proxy.runtime.slot_totals import SlotTotals, last_page_path, read_last_page
from llm_proxy.runtime.worker_metrics import WorkerPeers, prepare_sockets, restarts_family


def worker_page(requests: int, in_flight: int, restarts: int = 0) -> bytes:
    """A worker's page: a counter, a histogram, a gauge and its slot's restarts."""
    registry = CollectorRegistry()
    Counter("requests", "Requests.", registry=registry).inc(requests)
    latency = Histogram("latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=registry)
    for _ in range(requests):
        latency.observe(0.5)
    Gauge("in_flight", "Requests in flight.", registry=registry).set(in_flight)
    return generate_latest(MergedRegistry(registry.collect(), [restarts_family(restarts)]))


def samples(families: list[Metric]) -> dict[str, float]:
    return {
        sample.name
        + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items())): sample.value
        for family in families
        for sample in family.samples
    }


def test_a_kept_page_holds_the_growing_series_only_in_a_private_file(tmp_path: Path) -> None:
    prepare_sockets(tmp_path, 2)
    SlotTotals(tmp_path, 1).keep(worker_page(requests=7, in_flight=3, restarts=2))

    assert stat.S_IMODE(last_page_path(tmp_path, 1).stat().st_mode) == 0o600
    assert samples(read_last_page(tmp_path, 1)) == {
        "requests_total": 7.0,
        "latency_seconds_bucket{le=0.1}": 0.0,
        "latency_seconds_bucket{le=1.0}": 7.0,
        "latency_seconds_bucket{le=+Inf}": 7.0,
        "latency_seconds_count": 7.0,
        "latency_seconds_sum": 3.5,
        "llm_proxy_worker_restarts_total": 2.0,
    }  # no gauge, no creation times
    assert read_last_page(tmp_path, 0) == []  # a slot that served no page


def test_a_replacement_carries_its_predecessors_counters_but_not_their_restarts(
    tmp_path: Path,
) -> None:
    prepare_sockets(tmp_path, 1)
    SlotTotals(tmp_path, 0).keep(worker_page(requests=5, in_flight=1, restarts=1))

    carried = samples(SlotTotals(tmp_path, 0).carried)

    assert carried["requests_total"] == 5.0
    assert carried["latency_seconds_count"] == 5.0
    assert "llm_proxy_worker_restarts_total" not in carried  # the parent passes the new count


def test_a_new_run_starts_its_slots_from_zero(tmp_path: Path) -> None:
    prepare_sockets(tmp_path, 2)
    for n in range(2):
        SlotTotals(tmp_path, n).keep(worker_page(requests=4, in_flight=0))

    prepare_sockets(tmp_path, 1)  # the next run, with fewer workers

    assert list((tmp_path / "run").glob("*.last")) == []
    assert SlotTotals(tmp_path, 0).carried == []


async def test_a_silent_sibling_is_counted_from_its_last_page(tmp_path: Path) -> None:
    prepare_sockets(tmp_path, 2)
    SlotTotals(tmp_path, 1).keep(worker_page(requests=9, in_flight=2))
    asking = WorkerPeers(tmp_path, 0, 2)  # worker 1 has no socket: it died, or never listened

    (page,), answered = await asking.gather()

    assert answered == 0
    assert samples(page)["requests_total"] == 9.0
    assert "in_flight" not in samples(page)  # a gauge is its worker's now, not kept


def test_a_slot_that_cannot_be_kept_or_read_is_logged_and_serving_goes_on(tmp_path: Path) -> None:
    prepare_sockets(tmp_path, 1)
    last_page_path(tmp_path, 0).write_text("requests_total{ not a page\n")
    with structlog.testing.capture_logs() as logs:
        slot = SlotTotals(tmp_path, 0)
        # Where the page is written first, something that is not a file (as a full or read-only
        # disk would refuse it; file modes do not stop root).
        last_page_path(tmp_path, 0).with_suffix(".tmp").mkdir()
        slot.keep(worker_page(requests=1, in_flight=0))

    assert slot.carried == []
    assert [entry["event"] for entry in logs] == [
        "server.worker_metrics_unreadable",
        "server.worker_metrics_not_kept",
    ]
