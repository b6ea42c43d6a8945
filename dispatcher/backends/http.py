"""What HTTP backends share: one JSON POST, and which answers are worth retrying.

408, 429 and 5xx (and network failures) may pass on a later attempt; any other 4xx will not, so
the event goes to the dead-letter file instead of being retried forever. 401 and 403 (and whatever
else a backend's service answers for a key it refuses) refuse the credentials, not the event: the
worker stops instead (see :class:`~dispatcher.backends.Rejection`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import aiohttp
import orjson

from dispatcher.backends import Rejection

_RETRYABLE_4XX = frozenset({408, 429})
AUTH_STATUSES = frozenset({401, 403})
_LARGE = 1024 * 1024  # aiohttp streams a file-like body in pieces instead of one blocking write


def refusal(
    status: int, detail: str, *, auth_statuses: frozenset[int] = AUTH_STATUSES
) -> Rejection | None:
    if 200 <= status < 300:
        return None
    if status in auth_statuses:
        return Rejection(f"HTTP {status}", retryable=False, auth=True)  # the body may echo the key
    retryable = status >= 500 or status in _RETRYABLE_4XX
    return Rejection(f"HTTP {status}: {detail[:200]}", retryable)


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
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Rejection(f"{type(exc).__name__}: {exc}", retryable=True), None
    try:
        answer: object = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        answer = None
    return refusal(status, text, auth_statuses=auth_statuses), answer
