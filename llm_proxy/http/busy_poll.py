"""Adaptive busy polling: keep the event loop awake for a moment after socket activity.

On virtual machines, waking a process whose CPU went idle costs tens of microseconds (the idle
vCPU halted and must be rescheduled by the host). A proxied request waits twice for a peer that
usually answers within that time: the upstream's response, and the client's next request on a
keep-alive connection. Polling through those waits instead of sleeping lowered the latency the
proxy adds on one such machine, and not on another, nor pinned to one CPU, nor under a CPU quota
(figures: ``bench/README.md``): it is therefore off unless ``LLM_PROXY_BUSY_POLL_MICROS`` is set.

Polling unconditionally would burn CPU whenever traffic is sparse, so the window adapts the way
Linux's halt-polling does: it grows (doubling, up to ``max_seconds``) while activity keeps arriving
within it or shortly after it, and shrinks (halving, to nothing) each time it runs out with nothing
arriving. With an upstream that takes milliseconds to answer, or a trickle of requests, it settles
at zero and costs nothing; when the gaps are short, what it burns is bounded by those gaps.

The loop is kept polling by a callback that reschedules itself with ``call_soon``: while a callback
is ready, the loop polls its sockets without blocking.
"""

from __future__ import annotations

import asyncio
import time

from llm_proxy.stats import STATS

_GROW_FROM = 10e-6  # the first window after an idle period


class AdaptivePoll:
    """One per event loop. Call :meth:`poke` whenever a socket delivers data.

    A window starts when the loop has run what the data caused (the first poll after a poke), not
    at the poke: the proxy's own work must not eat into the time it waits for its peers.
    """

    __slots__ = (
        "_active",
        "_fresh",
        "_hits",
        "_idle_since",
        "_loop",
        "_max",
        "_until",
        "polls",
        "wasted",
        "window",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, max_seconds: float) -> None:
        self._loop = loop
        self._max = max_seconds
        self.window = 0.0  # the current window, seconds
        self._until = 0.0  # when the current poll ends
        self._idle_since = 0.0  # when the loop last had nothing left to do (as far as known)
        self._active = False
        self._fresh = False  # data arrived since the poll last looked
        self._hits = 0  # data arrivals during the current poll
        self.polls = 0  # polls started
        self.wasted = 0  # polls that ran out with nothing arriving

    def poke(self) -> None:
        if self._active:
            self._hits += 1
            self._fresh = True
            self._grow()  # data came while polling: the window pays
            return
        now = time.monotonic()
        if now - self._idle_since <= self._max:
            self._grow()  # the loop slept, but not for long: a window would have paid
        self._idle_since = now  # (the work this data causes runs first, so this is a lower bound)
        if self.window:
            self._active = self._fresh = True
            self.polls += 1
            STATS.busy_polls += 1
            self._loop.call_soon(self._poll)

    def _grow(self) -> None:
        self.window = min(self._max, self.window * 2 if self.window else _GROW_FROM)

    def _poll(self) -> None:
        now = time.monotonic()
        if self._fresh:
            # The callbacks of the data that arrived have run: the wait starts now.
            self._fresh = False
            self._until = now + self.window
        if now < self._until:
            self._loop.call_soon(self._poll)
            return
        self._active = False
        self._idle_since = now
        if not self._hits:
            # Nothing arrived while polling: shrink the window (below the start, stop polling).
            self.wasted += 1
            STATS.busy_polls_wasted += 1
            self.window = self.window / 2 if self.window / 2 >= _GROW_FROM else 0.0
        self._hits = 0
