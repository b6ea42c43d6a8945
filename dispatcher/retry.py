"""Capped exponential backoff with jitter, so retrying dispatchers do not hit a backend in step."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based): "equal jitter", half
        fixed so waits still grow, half random so workers spread out."""
        ceiling = min(self.cap, self.base * 2.0 ** min(attempt - 1, 30))
        return ceiling / 2 + random.random() * ceiling / 2
