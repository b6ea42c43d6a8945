"""What HTTP backends share: one JSON POST, and which answers are worth retrying.

408, 429 and 5xx (and network failures) may pass on a later attempt; any other 4xx will not, so
the event goes to the dead-letter file instead of being retried forever. 401 and 403 (and whatever
else a backend's service answers for a key it refuses) refuse the credentials, not the event: the
worker stops instead (see :class:`~dispatcher.backends.Rejection`). A retryable answer's
``Retry-After`` (seconds or an HTTP date) goes with the refusal, for the worker to wait that long.
A refusal's reason ends up in logs and the dead-letter file, and services echo what they were sent:
the backend's own secrets, and anything shaped like a key, are masked in it. A redirect is a
permanent refusal naming its target, never followed (see :func:`redirected`).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Mapping, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin

import aiohttp
import orjson

from dispatcher.backends import Rejection
from llm_proxy.crypto import mask_key, redact

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


def masked(text: str, secrets: Sequence[str]) -> str:
    """``text`` with ``secrets`` and anything shaped like a key masked, as the logs show them."""
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, mask_key(secret))
    return redact(text)


def refusal(
    status: int,
    detail: str,
    *,
    auth_statuses: frozenset[int] = AUTH_STATUSES,
    wait: float | None = None,
    secrets: Sequence[str] = (),
) -> Rejection | None:
    if 200 <= status < 300:
        return None
    if status in auth_statuses:
        return Rejection(f"HTTP {status}", retryable=False, auth=True)  # the body may echo the key
    retryable = status >= 500 or status in _RETRYABLE_4XX
    return Rejection(
        f"HTTP {status}: {masked(detail, secrets)[:200]}",
        retryable,
        retry_after=wait if retryable else None,
    )


def redirected(url: str, status: int, location: str | None, secrets: Sequence[str]) -> Rejection:
    """A redirect is not followed. A 301 or 302 would be followed as a GET without the events (the
    service then answers 404 or 405 to an empty request), and any other to another origin, an
    http:// URL moving to https:// included, without the key (401): either way the events would
    be refused for a reason that hides the real one, a URL to correct. Refused for good, naming
    where the service points, so the operator sets the URL to it and replays the dead letters."""
    target = urljoin(url, location) if location else "nowhere (no Location)"
    return Rejection(
        f"HTTP {status}: {masked(url, secrets)} redirects to {masked(target, secrets)[:300]};"
        " events are not sent on across a redirect: set the service's URL to where it points",
        retryable=False,
    )


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: object,
    headers: Mapping[str, str],
    *,
    auth_statuses: frozenset[int] = AUTH_STATUSES,
    secrets: Sequence[str] = (),
) -> tuple[Rejection | None, object]:
    """POST ``payload`` (or, as bytes, its JSON already encoded); the refusal (None when accepted)
    and the parsed answer body, if JSON."""
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    try:
        async with session.post(
            url,
            data=body if len(body) < _LARGE else io.BytesIO(body),
            headers={"Content-Type": "application/json", **headers},
            allow_redirects=False,  # see redirected()
        ) as response:
            # Not ``text()``: an error page that is not UTF-8 (a load balancer's) would raise, and
            # fail the whole batch, the events the service had accepted included.
            text = (await response.read()).decode("utf-8", "replace")
            status = response.status
            wait = retry_after(response.headers.get("Retry-After"), time.time())
            location = response.headers.get("Location")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Rejection(masked(f"{type(exc).__name__}: {exc}", secrets), retryable=True), None
    if 300 <= status < 400:
        return redirected(url, status, location, secrets), None
    try:
        answer: object = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        answer = None
    refused = refusal(status, text, auth_statuses=auth_statuses, wait=wait, secrets=secrets)
    return refused, answer
