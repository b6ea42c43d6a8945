"""Finished requests of this process whose usage is not settled yet, so that the next request of
their token is admitted on what they really used.

A request's tokens reach its token's tpm window, and its cost its budget, once its event is built
(see ``events/settlement.py``): after the client has its answer. A client that sends its next
request at once would otherwise be judged on a window that lacks the last answer's tokens, or on a
budget still held whole by it. So the sink that settles says which exchanges it took
(:meth:`Settlements.expect`) and which are settled or will never be (:meth:`Settlements.settled`),
and admission of a token with a tpm window or a budget first waits, bounded, for those of its
requests this process already answered (:meth:`Settlements.wait`).

Only this process's own answers are known here: a client whose next request reaches another worker
or instance (a new connection, a load balancer) can still be a settlement ahead of it. For tpm,
answers are also marked where the window lives, and every process waits for those
(``rate_limits.py``); a budget has only this process's wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from llm_proxy.proxy.hold_leases import HoldLeases
from llm_proxy.sparse_warning import SparseWarning
from llm_proxy.stats import STATS

# The longest admission waits for a token's answered requests to settle. Settling takes a few
# milliseconds; this is reached only when the events process is far behind or lost them.
SETTLE_WAIT_SECONDS = 1.0


class _Unsettled:
    """The answered requests of one token under one request id (a client may reuse an id)."""

    __slots__ = ("count", "waiter")

    def __init__(self) -> None:
        self.count = 1
        self.waiter: asyncio.Future[None] | None = None  # made when someone waits

    def done(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Settlements:
    """This process's answered requests whose tpm tokens or budget are still to be settled."""

    def __init__(self, wait_seconds: float = SETTLE_WAIT_SECONDS) -> None:
        self._wait_seconds = wait_seconds
        self._by_token: dict[str, dict[str, _Unsettled]] = {}
        self._late = SparseWarning("admission.settlement_late")  # times: requests given up on
        # The budget holds renewed until their settlement is reported here (see hold_leases.py).
        self.hold_leases: HoldLeases | None = None

    def expect(self, token_id: str, request_id: str) -> None:
        """A finished request of ``token_id`` went to be settled."""
        pending = self._by_token.get(token_id)
        if pending is None:
            self._by_token[token_id] = {request_id: _Unsettled()}
            return
        entry = pending.get(request_id)
        if entry is None:
            pending[request_id] = _Unsettled()
        else:
            entry.count += 1

    def settled(self, requests: Iterable[Sequence[str]]) -> None:
        """These ``(token id, request id)`` were settled, or never will be (dropped, failed)."""
        if self.hold_leases is not None:
            requests = list(requests)
            self.hold_leases.settled(requests)
        by_token = self._by_token
        for token_id, request_id in requests:
            pending = by_token.get(token_id)
            if pending is None or (entry := pending.get(request_id)) is None:
                continue  # given up on already (see wait), or never expected
            entry.count -= 1
            if entry.count <= 0:
                del pending[request_id]
                entry.done()
                if not pending:
                    del by_token[token_id]

    def forget_all(self) -> None:
        """Nothing expected will be settled (the events process died with them)."""
        if self.hold_leases is not None:
            self.hold_leases.forget_handed()
        by_token, self._by_token = self._by_token, {}
        for pending in by_token.values():
            for entry in pending.values():
                entry.done()

    def unsettled(self, token_id: str) -> bool:
        """Whether requests of ``token_id`` this process answered are still to be settled."""
        return token_id in self._by_token

    async def wait(self, token_id: str) -> None:
        """Return once the requests of ``token_id`` answered so far are settled, or after
        ``wait_seconds`` (those still unsettled are then given up on, and not waited for again)."""
        pending = self._by_token.get(token_id)
        if not pending:
            return
        loop = asyncio.get_running_loop()
        waiters = []
        for entry in pending.values():
            if entry.waiter is None:
                entry.waiter = loop.create_future()
            waiters.append(entry.waiter)
        _, late = await asyncio.wait(waiters, timeout=self._wait_seconds)
        if not late:
            STATS.settlement_waits["settled"] += 1
            return
        STATS.settlement_waits["timed_out"] += 1
        # When the events process stalls, every request of every limited token times out here.
        self._late.happened(len(late))
        pending = self._by_token.get(token_id, {})
        for request_id, entry in list(pending.items()):
            if entry.waiter in late:
                del pending[request_id]
                entry.done()
        if not pending:
            self._by_token.pop(token_id, None)
