"""Settling what a request used into its token's windows, once its event knows the usage.

The proxy path refuses a request while its token's tpm window is full; the window is filled here,
off the request path, in the pipeline that builds the events (the events process, or the server
with ``event_build_in="thread"``), from the same usage the event reports: the upstream's, or the
offline estimate when the upstream sent none.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from llm_proxy.events import metrics
from llm_proxy.events.event import Event
from llm_proxy.proxy.exchange import Exchange
from llm_proxy.proxy.rate_limits import RateWindows

log = structlog.get_logger(__name__)


class TokenWindowSettler:
    """Records the tokens of each request on a tpm-limited token in that token's window."""

    def __init__(self, windows: RateWindows) -> None:
        self._windows = windows

    async def settle(self, batch: Sequence[Exchange], events: Sequence[Event]) -> None:
        limited = {exchange.request_id for exchange in batch if exchange.tpm_limited}
        if not limited:
            return
        for event in events:
            usage = event["usage"]
            if event["request_id"] not in limited or not usage or not usage["total_tokens"]:
                continue
            try:
                await self._windows.record_tokens(event["token_id"], usage["total_tokens"])
            except Exception as exc:
                # Counted, never silent: the window is short by this request until it slides on.
                metrics.TPM_UNRECORDED.inc()
                log.error(
                    "events.tpm_record_failed", request_id=event["request_id"], error=str(exc)
                )

    async def close(self) -> None:
        await self._windows.close()
