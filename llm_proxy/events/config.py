"""Settings of the event pipeline, built once by the CLI layer and passed in explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llm_proxy.events.bus import BusKind

SPOOL_FILE = "events-spool.jsonl"
# Every spool under DATA_DIR: each events process's own, and those of processes gone (a worker
# count that shrank, a spool taken while its slot's was still held), which any events process claims.
SPOOL_FAMILY = "events-spool*.jsonl"


@dataclass(frozen=True, slots=True)
class EventsConfig:
    bus: BusKind = "memory"
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    data_dir: Path = Path("data")
    stream: str = "llm-proxy:events"
    # The Redis stream's cap (EVENTS_STREAM_MAX_LENGTH): entries carry bodies, so not more; what
    # every group acknowledged goes long before.
    maxlen: int = 100_000
    # Event bytes the spool holds while Redis is away (EVENTS_SPOOL_MAX_BYTES); more are dropped.
    spool_max_bytes: int = 1024**3
    memory_maxlen: int = 10_000  # per consumer group, memory bus
    queue_size: int = 10_000  # exchanges waiting to become events; the oldest is dropped beyond
    # ... and the captured body bytes they may hold together (a request and an answer of up to
    # CAPTURE_BODY_BYTES each): ten thousand long-context exchanges would otherwise be gigabytes.
    queue_bytes: int = 256 * 1024 * 1024
    batch_size: int = 256  # exchanges built and published together
    linger: float = 0.05  # seconds a batch may wait to fill: events are not urgent, requests are
    close_timeout: float = 5.0  # seconds ``close`` waits for the queue to drain
    claim_idle: float = 60.0  # seconds before a dead consumer's pending entries are taken over
    # EVENTS_FILE_GROUP_IDLE: a server's file-log group unread for this long is taken for the group
    # of an instance that is gone (a replaced container) and deleted, or it would pin the stream.
    gone_group_idle: float = 3600.0
    worker: int = 0  # the server worker this events process serves (``--workers``)

    @property
    def spool_path(self) -> Path:
        """This events process's own spool: one per worker, as only its writer may empty it."""
        return self.data_dir / (
            SPOOL_FILE if not self.worker else f"events-spool-{self.worker}.jsonl"
        )
