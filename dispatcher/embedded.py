"""A file dispatcher inside the server process, for ``llm-proxy server --file-event-log PATH``."""

from __future__ import annotations

from pathlib import Path

from dispatcher.backends.file import FileBackend
from dispatcher.worker import Worker, WorkerSettings
from llm_proxy.events.pipeline import EventPipeline


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
    :class:`~dispatcher.worker.BackendStartError` if the file cannot be opened. ``pipeline.close()``
    stops it after the pipeline's queue drained, letting it write what the bus still holds.
    """
    worker = Worker(
        pipeline.bus,
        FileBackend(path, max_bytes=max_bytes, backups=backups),
        WorkerSettings(
            service="file",
            dead_letter_path=data_dir / "dead-letter-file.jsonl",
            batch_wait=0.05,  # a local file: write promptly rather than wait for big batches
            poll=0.25,  # also how long an idle bus takes to count as drained at shutdown
            drain_timeout=drain_timeout,
        ),
    )
    await worker.open()
    worker.start()
    pipeline.attach(worker)
    return worker
