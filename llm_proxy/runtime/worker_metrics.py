"""``/metrics`` summed over the workers of ``llm-proxy server --workers N``.

Workers share a port (``SO_REUSEPORT``), so each scrape reaches one of them. Every worker serves its
own page (its registry and its events process's report, in the Prometheus text format) on a private
unix socket, ``DATA_DIR/run/metrics-worker-<n>.sock`` (directory 0700, socket 0600); the worker
that answers a scrape fetches its siblings' pages concurrently and sums them with its own
(``metrics_merge.py``). Nothing changes on the request path: it still only adds to the plain
integers of ``llm_proxy/stats.py``, and families are built only when a page is asked for.
``prometheus_client``'s multiprocess mode was the alternative; it takes a lock per increment and
writes every counter to an mmap file.

A sibling that does not answer within :data:`FETCH_SECONDS` (stalled, or dead and not yet
replaced) does not hold the scrape: the page adds the counters of the last page it served
instead (``slot_totals.py``, as a replacement worker carries its predecessor's), so the sums
never go down, and says so in ``llm_proxy_workers{state="reporting"|"missing"}``;
``llm_proxy_worker_restarts_total`` counts the workers the parent replaced (``supervisor.py``).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import cast

import structlog
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from llm_proxy.runtime.settings import SettingsError
from llm_proxy.runtime.slot_totals import SlotTotals, read_last_page, remove_last_pages

log = structlog.get_logger(__name__)

# A process's own page in the Prometheus text format.
PageSource = Callable[[], bytes]

FETCH_SECONDS = 1.0
# Ends every page, so a page cut short by a worker dying while it wrote is told from a whole one
# (the text format's parser reads it as a comment).
_END = b"# EOF\n"
# sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
_MAX_SOCKET_PATH = 107


def socket_path(data_dir: Path, index: int) -> Path:
    return data_dir / "run" / f"metrics-worker-{index}.sock"


def private_listener(path: Path) -> socket.socket:
    """A listening, non-blocking unix socket at ``path`` that only this user may connect to (0600,
    in the 0700 run directory), replacing a stale one from an earlier run; closed if a step fails.
    The metrics and the management changes of sibling workers each listen on one."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        sock.bind(os.fsdecode(path))
        path.chmod(0o600)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def prepare_sockets(data_dir: Path, workers: int) -> None:
    """Create the sockets' directory (0700; DATA_DIR too when nothing created it yet, as one
    server would), once, before the workers start, without an earlier run's slot totals; fail
    with one line."""
    longest = socket_path(data_dir, workers - 1)
    if len(os.fsencode(longest)) > _MAX_SOCKET_PATH:
        raise SettingsError(
            f"DATA_DIR: {data_dir} is too long a path for the workers' metrics sockets "
            f"({longest} is over {_MAX_SOCKET_PATH} bytes)"
        )
    try:
        longest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        longest.parent.chmod(0o700)
        remove_last_pages(data_dir)
    except OSError as exc:
        raise SettingsError(
            f"DATA_DIR: cannot create {longest.parent} for the workers' metrics: {exc.strerror}"
        ) from None


class _PageProtocol(asyncio.Protocol):
    """Writes the page to whoever connects, then closes."""

    def __init__(self, page: PageSource) -> None:
        self._page = page

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio's classes, so no isinstance).
        transport = cast(asyncio.Transport, transport)
        try:
            transport.write(self._page() + _END)
        except Exception:  # a collector failing must not take the loop's callback down
            log.exception("server.worker_metrics_failed")
        transport.close()


class WorkerPeers:
    """This worker's page, served to its siblings, and theirs, fetched for a scrape."""

    def __init__(self, data_dir: Path, index: int, count: int, restarts: int = 0) -> None:
        self.index = index
        self.count = count
        self.restarts = restarts  # how often the parent replaced this worker before this one
        self.slot = SlotTotals(data_dir, index)
        self._data_dir = data_dir
        self._server: asyncio.AbstractServer | None = None

    async def serve(self, page: PageSource) -> None:
        """Listen on this worker's socket, replacing a stale one from an earlier run.

        A worker that cannot listen still serves requests; its siblings report it missing.
        """
        path = socket_path(self._data_dir, self.index)
        try:
            sock = private_listener(path)
        except OSError as exc:
            log.error("server.worker_metrics_unavailable", path=str(path), error=exc.strerror)
            return
        try:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(lambda: _PageProtocol(page), sock=sock)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            socket_path(self._data_dir, self.index).unlink(missing_ok=True)

    async def gather(self) -> tuple[list[list[Metric]], int]:
        """Every sibling's families, and how many of them answered in time: the page of one that
        answered, the counters of the last page it served for one that did not."""
        siblings = [n for n in range(self.count) if n != self.index]
        pages = await asyncio.gather(*(self._fetch(n) for n in siblings))
        families = [
            read_last_page(self._data_dir, n)
            if page is None
            else list(text_string_to_metric_families(page))
            for n, page in zip(siblings, pages, strict=True)
        ]
        return families, sum(page is not None for page in pages)

    async def _fetch(self, index: int) -> str | None:
        path = socket_path(self._data_dir, index)
        try:
            async with asyncio.timeout(FETCH_SECONDS):
                reader, writer = await asyncio.open_unix_connection(os.fsdecode(path))
                try:
                    data = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("server.worker_metrics_missing", worker=index, error=type(exc).__name__)
            return None
        if not data.endswith(_END):
            log.warning("server.worker_metrics_missing", worker=index, error="truncated")
            return None
        return data[: -len(_END)].decode()


def workers_family(reporting: int, count: int) -> GaugeMetricFamily:
    """How many workers a page sums, and how many it had to leave out."""
    family = GaugeMetricFamily(
        "llm_proxy_workers",
        "Server worker processes whose metrics this page sums (reporting), and those left out "
        "because they did not answer in time (missing).",
        labels=["state"],
    )
    family.add_metric(["reporting"], reporting)
    family.add_metric(["missing"], count - reporting)
    return family


def restarts_family(restarts: int) -> CounterMetricFamily:
    """How often the parent replaced a worker that died; each worker reports its own slot's
    count, so a page's sum is the instance's."""
    return CounterMetricFamily(
        "llm_proxy_worker_restarts",
        "Server worker processes that died and were replaced by the parent process since it "
        "started (llm-proxy server --workers N; the log says why, as server.worker_died).",
        value=restarts,
    )
