"""How long the hourly usage aggregates, the change feed, expired tokens and audit events are
kept: older rows are deleted now and then.

Every process of every instance may run the loops: a delete that finds nothing costs one indexed
query, and two that overlap delete each row once.

The change feed is read by every process several times a second. A reader that falls so far
behind that what followed its cursor was pruned is told that anything may have changed, and
reloads every token it has cached (``Store.changes_since``): pruning never makes it miss a
revocation. The retention only keeps that reload for readers cut off far longer than
REVOCATION_MAX_STALENESS, past which they trust no cached token anyway.

Withering tokens are short-lived by design, and one issued per job or session would otherwise stay
for good: every list of tokens (the management API's, the admin pages') and the table behind them
would grow with each one ever issued. A token expired for EXPIRED_TOKEN_RETENTION_DAYS is deleted;
its requests are refused ``token_not_found`` instead of ``token_expired``, and its usage
aggregates (kept on their own retention) and audit events stay.

Audit events are kept for good unless AUDIT_RETENTION_DAYS says otherwise: how long an audit trail
must last is the operator's policy, not a default to guess; one is written for every token issued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog

from llm_proxy.models import utcnow
from llm_proxy.store import Store

log = structlog.get_logger(__name__)

PRUNE_EVERY_SECONDS = 3600.0

CHANGES_RETENTION_SECONDS = 3600.0
PRUNE_CHANGES_EVERY_SECONDS = 60.0
# Rows deleted by one statement: a backlog (a feed never pruned before) goes in many short
# transactions, never one that holds SQLite's write lock long.
PRUNE_CHANGES_AT_ONCE = 5_000
# The pause after a pass that deleted as much as it may: more is waiting.
PRUNE_BACKLOG_SECONDS = 1.0


async def prune_usage_once(store: Store, retention_days: int) -> int:
    """Delete the hourly aggregates older than ``retention_days``; how many rows went."""
    return await store.prune_usage_hourly(utcnow() - timedelta(days=retention_days))


async def prune_usage_every(
    store: Store, retention_days: int, seconds: float = PRUNE_EVERY_SECONDS
) -> None:
    """Prune at once, then every ``seconds`` until cancelled; failures are retried next time."""
    await _keep_pruning(
        lambda: prune_usage_once(store, retention_days),
        "store.usage",
        seconds,
        at_once=None,
        retention_days=retention_days,
    )


def changes_retention(max_staleness: float) -> float:
    """Seconds the change feed keeps a change: well above ``max_staleness``
    (REVOCATION_MAX_STALENESS), however high that is set."""
    return max(CHANGES_RETENTION_SECONDS, 10 * max_staleness)


async def prune_changes_once(store: Store, retention_seconds: float) -> int:
    """Delete the oldest changes made over ``retention_seconds`` ago, a bounded number of them;
    how many rows went."""
    before = utcnow() - timedelta(seconds=retention_seconds)
    return await store.prune_changes(before, PRUNE_CHANGES_AT_ONCE)


async def prune_changes_every(
    store: Store, retention_seconds: float, seconds: float = PRUNE_CHANGES_EVERY_SECONDS
) -> None:
    """Prune the change feed at once, then every ``seconds`` (sooner while a backlog lasts) until
    cancelled; failures are retried next time."""
    await _keep_pruning(
        lambda: prune_changes_once(store, retention_seconds),
        "store.changes",
        seconds,
        at_once=PRUNE_CHANGES_AT_ONCE,
        retention_seconds=retention_seconds,
    )


# Rows deleted by one statement when tokens and audit events are pruned: a backlog (a database
# never pruned before) goes in many short transactions, as the change feed's does.
PRUNE_ROWS_AT_ONCE = 1_000


async def prune_expired_tokens_once(store: Store, retention_days: int) -> int:
    """Delete a bounded number of the tokens expired over ``retention_days`` ago; how many."""
    before = utcnow() - timedelta(days=retention_days)
    return await store.prune_expired_tokens(before, PRUNE_ROWS_AT_ONCE)


async def prune_expired_tokens_every(
    store: Store, retention_days: int, seconds: float = PRUNE_EVERY_SECONDS
) -> None:
    """Prune expired tokens at once, then every ``seconds`` (sooner while a backlog lasts) until
    cancelled; failures are retried next time."""
    await _keep_pruning(
        lambda: prune_expired_tokens_once(store, retention_days),
        "store.tokens",
        seconds,
        at_once=PRUNE_ROWS_AT_ONCE,
        retention_days=retention_days,
    )


async def prune_audit_once(store: Store, retention_days: int) -> int:
    """Delete a bounded number of the audit events recorded over ``retention_days`` ago; how
    many."""
    return await store.prune_audit(utcnow() - timedelta(days=retention_days), PRUNE_ROWS_AT_ONCE)


async def prune_audit_every(
    store: Store, retention_days: int, seconds: float = PRUNE_EVERY_SECONDS
) -> None:
    """Prune old audit events at once, then every ``seconds`` (sooner while a backlog lasts)
    until cancelled; failures are retried next time."""
    await _keep_pruning(
        lambda: prune_audit_once(store, retention_days),
        "store.audit",
        seconds,
        at_once=PRUNE_ROWS_AT_ONCE,
        retention_days=retention_days,
    )


async def _keep_pruning(
    prune_once: Callable[[], Awaitable[int]],
    event: str,
    seconds: float,
    *,
    at_once: int | None,
    **retention: float,
) -> None:
    """Run ``prune_once`` until cancelled: every ``seconds``, or after a short pause when it
    deleted the ``at_once`` rows it may (more is waiting; None: it deletes all there is). Each
    pass that deletes logs ``<event>_pruned`` with ``retention``; a failure logs, and the next
    pass tries again (the rows only wait longer)."""
    while True:
        pruned = 0
        try:
            if pruned := await prune_once():
                log.info(f"{event}_pruned", rows=pruned, **retention)
        except Exception as exc:
            log.warning(f"{event}_prune_failed", error=repr(exc))
        backlog = at_once is not None and pruned >= at_once
        await asyncio.sleep(PRUNE_BACKLOG_SECONDS if backlog else seconds)
