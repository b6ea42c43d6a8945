"""A click number option that refuses ``nan`` and ``inf``.

``click.FloatRange`` lets both through: every comparison with ``nan`` is false, so no bound
refuses it, and ``float("inf")`` is within any range open above. As seconds they do harm far from
the command line: a timer given ``nan`` raises inside the event loop, and ``inf`` cannot become the
milliseconds a Redis command takes. So they are a bad invocation, as a negative number is.
"""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` for finite numbers only."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number
