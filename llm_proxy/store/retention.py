"""How long the hourly usage aggregates are kept: older hours are deleted now and then.

Every process of every instance may run the loop: a delete that finds nothing costs one indexed
query, and two that overlap delete each row once.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog

from llm_proxy.models import utcnow
from llm_proxy.store import Store

log = structlog.get_logger(__name__)

PRUNE_EVERY_SECONDS = 3600.0


async def prune_usage_once(store: Store, retention_days: int) -> int:
    """Delete the hourly aggregates older than ``retention_days``; how many rows went."""
    return await store.prune_usage_hourly(utcnow() - timedelta(days=retention_days))


async def prune_usage_every(
    store: Store, retention_days: int, seconds: float = PRUNE_EVERY_SECONDS
) -> None:
    """Prune at once, then every ``seconds`` until cancelled; failures are retried next time."""
    while True:
        try:
            if pruned := await prune_usage_once(store, retention_days):
                log.info("store.usage_pruned", rows=pruned, retention_days=retention_days)
        except Exception as exc:  # the next round tries again; the rows only wait longer
            log.warning("store.usage_prune_failed", error=repr(exc))
        await asyncio.sleep(seconds)
