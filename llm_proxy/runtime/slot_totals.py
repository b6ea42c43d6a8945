"""A worker slot's counters, kept past its worker, so that ``/metrics`` sums never go down.

Under ``llm-proxy server --workers N`` a scrape's page adds up every worker's counters
(``worker_metrics.py``). A worker that dies starts again from zero in its replacement, and one
that does not answer a scrape in time is left out of it: either way the sum would drop, and
Prometheus reads any drop as a counter reset, so ``rate()`` and ``increase()`` would count the
other workers' whole totals again as new (SPEC §11: no counters jumping between workers).

So each slot keeps the last page its worker served in ``DATA_DIR/run/metrics-worker-<n>.last``
(0600), written before the page leaves the worker, and reads back its growing series (counters,
histograms, summaries): the file holds at least every value a scrape has reported for the slot. The worker a
scrape lands on reads a silent sibling's file in place of its page, and a replacement worker adds
its predecessor's file to its own counters, which go on from there. What a worker counted after
its last page is lost with it, as with a single process. The parent removes an earlier run's files
as it starts. The files are written when a page is asked for (a scrape, every 15 s or so), never
on the request path.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from llm_proxy.private_files import owner_only
from llm_proxy.runtime.metrics_merge import growing

log = structlog.get_logger(__name__)

# The parent counts a slot's replacements itself and tells each new worker the total, so a
# predecessor's count is not added to it.
NOT_CARRIED = frozenset({"llm_proxy_worker_restarts"})


def last_page_path(data_dir: Path, index: int) -> Path:
    return data_dir / "run" / f"metrics-worker-{index}.last"


def remove_last_pages(data_dir: Path) -> None:
    """Forget an earlier run's slots: a new instance's counters start from zero."""
    for path in (data_dir / "run").glob("metrics-worker-*.last"):
        path.unlink(missing_ok=True)


def read_last_page(data_dir: Path, index: int) -> list[Metric]:
    """The growing series of the page slot ``index`` served last; none if it has served none."""
    path = last_page_path(data_dir, index)
    try:
        families = list(text_string_to_metric_families(path.read_text()))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("server.worker_metrics_unreadable", path=str(path), error=str(exc))
        return []
    return growing(families)


class SlotTotals:
    """This worker's slot: what its predecessors counted, and the file its pages are kept in."""

    def __init__(self, data_dir: Path, index: int) -> None:
        self._path = last_page_path(data_dir, index)
        self._temporary = self._path.with_suffix(".tmp")
        predecessors = read_last_page(data_dir, index)
        self.carried = [family for family in predecessors if family.name not in NOT_CARRIED]

    def keep(self, page: bytes) -> None:
        """Write ``page``, this slot's families in the text format, before it is served; it is
        read back without its gauges (``read_last_page``).

        A worker that cannot write still serves its page; its counters may then go down in the
        page's sums if it dies or stalls, and the log says why.
        """
        try:
            with open(self._temporary, "wb", opener=owner_only) as file:
                file.write(page)
            os.replace(self._temporary, self._path)
        except OSError as exc:
            log.warning("server.worker_metrics_not_kept", path=str(self._path), error=exc.strerror)
