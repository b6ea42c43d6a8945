"""What HTTP backends share: one JSON POST, and which answers are worth retrying.

408, 429 and 5xx (and network failures) may pass on a later attempt; any other 4xx will not, so
the event goes to the dead-letter file instead of being retried forever. 401 and 403 (and whatever
else a backend's service answers for a key it refuses) refuse the credentials, not the event: the
worker stops instead (see :class:`~dispatcher.backends.Rejection`). A retryable answer's
``Retry-After`` (seconds or an HTTP date) goes with the refusal, for the worker to wait that long.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

import aiohttp
import orjson

from dispatcher.backends import Rejection

_RETRYABLE_4XX = frozenset({408, 429})
AUTH_STATUSES = frozenset({401, 403})
_LARGE = 1024 * 1024  # aiohttp streams a file-like body in pieces instead of one blocking write


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from ``now`` (epoch seconds) by a ``Retry-After`` header: delay-seconds or
    an HTTP date. None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000" reads as no zone; HTTP dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    return None if math.isnan(seconds) else max(0.0, seconds)


def refusal(
    status: int,
    detail: str,
    *,
    auth_statuses: frozenset[int] = AUTH_STATUSES,
    wait: float | None = None,
) -> Rejection | None:
    if 200 <= status < 300:
        return None
    if status in auth_statuses:
        return Rejection(f"HTTP {status}", retryable=False, auth=True)  # the body may echo the key
    retryable = status >= 500 or status in _RETRYABLE_4XX
    return Rejection(
        f"HTTP {status}: {detail[:200]}", retryable, retry_after=wait if retryable else None
    )


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: object,
    headers: Mapping[str, str],
    *,
    auth_statuses: frozenset[int] = AUTH_STATUSES,
) -> tuple[Rejection | None, object]:
    """POST ``payload`` (or, as bytes, its JSON already encoded); the refusal (None when accepted)
    and the parsed answer body, if JSON."""
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    try:
        async with session.post(
            url,
            data=body if len(body) < _LARGE else io.BytesIO(body),
            headers={"Content-Type": "application/json", **headers},
        ) as response:
            text = await response.text()
            status = response.status
            wait = retry_after(response.headers.get("Retry-After"), time.time())
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Rejection(f"{type(exc).__name__}: {exc}", retryable=True), None
    try:
        answer: object = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        answer = None
    return refusal(status, text, auth_statuses=auth_statuses, wait=wait), answer
