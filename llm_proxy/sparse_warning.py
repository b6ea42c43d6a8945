"""A warning that something keeps happening, logged at most once every few seconds with how many
times it happened since the last line: what a client can repeat, or a stall repeats for every
request, must not fill the log (a metric counts each one)."""

from __future__ import annotations

import time

import structlog

log = structlog.get_logger(__name__)

EVERY_SECONDS = 10.0


class SparseWarning:
    def __init__(self, event: str, every_seconds: float = EVERY_SECONDS) -> None:
        self._event = event
        self._every = every_seconds
        self._said_at = float("-inf")
        self._unsaid = 0

    def happened(self, times: int = 1, **fields: object) -> None:
        self._unsaid += times
        now = time.monotonic()
        if now - self._said_at >= self._every:
            self._said_at = now
            log.warning(self._event, times=self._unsaid, **fields)
            self._unsaid = 0
