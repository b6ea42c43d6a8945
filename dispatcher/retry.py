"""Capped exponential backoff with jitter, so retrying dispatchers do not hit a backend in step;
a service's own ``Retry-After`` wins when it gave one."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from dispatcher.backends import Rejection


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based): what the service
        asked for (``Retry-After``) up to ``cap``, else "equal jitter", half fixed so waits still
        grow, half random so workers spread out."""
        if retry_after is not None:
            # Not quite 0: a service that keeps answering "now" must not get a tight loop.
            return min(self.cap, max(retry_after, self.base / 2))
        ceiling = min(self.cap, self.base * 2.0 ** min(attempt - 1, 30))
        return ceiling / 2 + random.random() * ceiling / 2


def asked_wait(rejections: Iterable[Rejection]) -> float | None:
    """The longest ``Retry-After`` among retryable refusals, None if none asked for one."""
    return max(
        (r.retry_after for r in rejections if r.retryable and r.retry_after is not None),
        default=None,
    )
