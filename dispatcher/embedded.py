"""Dispatchers inside the server process: the usage aggregates always, a file log on request
(``llm-proxy server --file-event-log PATH``)."""

from __future__ import annotations

import socket
from pathlib import Path

from dispatcher.backends import Backend
from dispatcher.backends.file import FileBackend
from dispatcher.backends.usage import UsageBackend
from dispatcher.worker import BackendStartError, Worker, WorkerSettings
from llm_proxy.events.config import EventsConfig
from llm_proxy.events.gone_groups import INSTANCE_GROUP_PREFIX
from llm_proxy.events.pipeline import EventPipeline, start_event_pipeline
from llm_proxy.events.settlement import TokenSettler
from llm_proxy.pricing import PriceHolder
from llm_proxy.proxy.budget_ledger import BudgetLedger, RedisBudgetLedger, StoreBudgetLedger
from llm_proxy.proxy.rate_limits import RedisRateWindows, StoreRateWindows
from llm_proxy.store import Store


class FileEventLogError(BackendStartError):
    """The file event log (``--file-event-log``) cannot be opened for writing."""


async def _start(pipeline: EventPipeline, backend: Backend, settings: WorkerSettings) -> Worker:
    worker = Worker(pipeline.bus, backend, settings)
    await worker.open()
    worker.start()
    pipeline.attach(worker)
    return worker


async def start_file_event_log(
    pipeline: EventPipeline,
    path: Path,
    *,
    data_dir: Path,
    max_bytes: int = 100 * 1024 * 1024,
    backups: int = 5,
    drain_timeout: float = 10.0,
) -> Worker:
    """Write every event of ``pipeline``'s bus to ``path`` (JSONL), from this process.

    Joins the bus at once, so no event published afterwards is missed, and raises
    :class:`FileEventLogError` if the file cannot be opened. ``pipeline.close()``
    stops it after the pipeline's queue drained, letting it write what the bus still holds.

    On Redis the file has a consumer group of its own, named after this host and the file's path:
    the group ``file`` is a standalone file dispatcher's, and sharing it (or one group between
    instances) would give each file a share of the events. The name is the same at every start,
    so a restart goes on where the last run stopped; a new one starts from the next event, or from
    the first this process published if that reached Redis before the group could be made (Redis
    down at the first start: the spool's replay may come first). A new container has a new host
    name, so the servers delete a group no one has read for ``EVENTS_FILE_GROUP_IDLE``
    (llm_proxy/events/gone_groups.py): its instance is gone, and it would pin the stream for good.
    """
    on_redis = pipeline.bus.kind == "redis"
    try:
        return await _start(
            pipeline,
            FileBackend(path, max_bytes=max_bytes, backups=backups),
            WorkerSettings(
                service="file",
                group=_own_group(path) if on_redis else "",
                from_start=False,
                dead_letter_path=data_dir / "dead-letter-file.jsonl",
                batch_wait=0.05,  # a local file: write promptly rather than wait for big batches
                poll=0.25,  # also how long an idle bus takes to count as drained at shutdown
                drain_timeout=drain_timeout,
            ),
        )
    except BackendStartError as exc:
        cause = exc.__cause__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        raise FileEventLogError(f"cannot write {path}: {reason}") from exc


def _own_group(path: Path) -> str:
    return f"{INSTANCE_GROUP_PREFIX}{socket.gethostname()}:{path.resolve()}"


async def start_usage_aggregation(
    pipeline: EventPipeline, store: Store, *, data_dir: Path, drain_timeout: float = 10.0
) -> Worker:
    """Keep the usage aggregates of ``store`` up to date from ``pipeline``'s bus.

    On a Redis bus every server process joins the one ``usage`` consumer group, so each event is
    counted by one of them (at least once: a process that dies between writing a batch and
    acknowledging it leaves the batch to be counted again). ``pipeline.close()`` stops it, before
    the store is closed, once what the bus still holds was counted.
    """
    return await _start(
        pipeline,
        UsageBackend(store),
        WorkerSettings(
            service="usage",
            dead_letter_path=data_dir / "dead-letter-usage.jsonl",
            batch_size=500,  # a batch folds into one row per token and hour: bigger is cheaper
            batch_wait=0.2,  # figures a fraction of a second behind, at one write per batch
            # A drain at shutdown waits out the read in hand, and every server drains this worker:
            # in memory an idle wake-up is only a timer, so keep it short; on Redis it is a
            # blocking read.
            poll=0.05 if pipeline.bus.kind == "memory" else 0.5,
            drain_timeout=drain_timeout,
        ),
    )


async def start_events_here(
    config: EventsConfig,
    store: Store,
    *,
    file_event_log: Path | None,
    prices: PriceHolder | None = None,
) -> EventPipeline:
    """The event pipeline with its in-process dispatchers: usage aggregation, and the file log
    when asked. Run by the events process (and by the server itself with
    ``event_build_in="thread"``). Nothing is left running if a dispatcher cannot start.
    ``prices`` (reloadable) give the events' ``cost_usd``."""
    pipeline = await start_event_pipeline(config, prices)
    # The tpm windows live where the proxy path reads them: Redis with a Redis bus, else the store.
    windows = (
        RedisRateWindows(config.redis_url) if config.bus == "redis" else StoreRateWindows(store)
    )
    # Budget holds likewise, with the spend also kept in the database.
    budgets: BudgetLedger = (
        RedisBudgetLedger(config.redis_url, store)
        if config.bus == "redis"
        else StoreBudgetLedger(store)
    )
    pipeline.settler = TokenSettler(windows, budgets, pipeline.prices)
    try:
        await start_usage_aggregation(pipeline, store, data_dir=config.data_dir)
        if file_event_log is not None:
            await start_file_event_log(pipeline, file_event_log, data_dir=config.data_dir)
    except BaseException:
        await pipeline.close()
        raise
    return pipeline
