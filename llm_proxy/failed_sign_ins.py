"""Refused credentials on the operator surfaces (the management API's token, the admin pages'
password): counted on ``/metrics`` and logged, so that someone guessing shows.

The log says so at most once every ``LOG_EVERY_SECONDS`` per surface, with how many were refused
since: a client repeating a wrong credential must not be able to fill the log.
"""

from __future__ import annotations

import time

import structlog

from llm_proxy.stats import STATS

log = structlog.get_logger(__name__)

LOG_EVERY_SECONDS = 10.0
_last_logged: dict[str, float] = {}
_unlogged: dict[str, int] = {}


def refused(surface: str, client_ip: str | None) -> None:
    """Note a wrong credential sent to ``surface`` (``management`` or ``admin``)."""
    STATS.auth_failures[surface] += 1
    _unlogged[surface] = _unlogged.get(surface, 0) + 1
    now = time.monotonic()
    if now - _last_logged.get(surface, float("-inf")) >= LOG_EVERY_SECONDS:
        _last_logged[surface] = now
        log.warning(
            "auth.credentials_refused",
            surface=surface,
            client_ip=client_ip,
            refused=_unlogged.pop(surface),
        )
