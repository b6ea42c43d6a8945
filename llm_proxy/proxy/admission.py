"""Admission of withering tokens on the request path.

A token validated recently is checked from memory: one SHA-256 and one dict lookup. The database is
touched only on a cache miss, and for tokens that carry ``max_requests``, whose count must be exact
across every process and instance and is therefore claimed with one conditional ``UPDATE``. Requests
of unlimited tokens are tallied in memory and written in batches by :meth:`flush_usage`.

Staleness: a management change made in this process evicts the affected entries at once, and,
under ``--workers``, in the sibling workers before the change is answered (:meth:`changed`).
Changes made elsewhere are rows of the store's change feed, read from a cursor
by :meth:`poll_changes`: at once when the store pushes a wake-up (PostgreSQL ``NOTIFY``, through
:meth:`keep_listening`), and on a timer as the fallback (:meth:`follow_changes`), so every process
follows within a second. A listener that reconnects reads the feed from its cursor, so nothing
missed while it was away is lost.

Fail closed: when the feed has not been read successfully for ``max_staleness`` (the database is
down, or this process is cut off from it), the cache is not trusted and every request's token is
checked against the store, which refuses the request when it cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from functools import partial

import structlog

from llm_proxy import errors
from llm_proxy.crypto import (
    DecryptionError,
    KeyCipher,
    hash_token,
    is_sendable_key,
    is_token_shaped,
)
from llm_proxy.models import (
    RATE_WINDOW_MICROS,
    BudgetHold,
    Claim,
    RateSlot,
    UsageDelta,
    isoformat,
    usd,
)
from llm_proxy.proxy.budget_ledger import HOLD_LEASE_SECONDS, BudgetLedger, StoreBudgetLedger
from llm_proxy.proxy.budget_plan import CostPlan
from llm_proxy.proxy.hold_leases import HoldLeases
from llm_proxy.proxy.rate_limits import RateWindows, StoreRateWindows
from llm_proxy.proxy.settling import SETTLE_WAIT_SECONDS, Settlements
from llm_proxy.sparse_warning import SparseWarning
from llm_proxy.stats import STATS
from llm_proxy.store import Store
from llm_proxy.store.unavailable import ClaimInDoubt, CommitInDoubt

log = structlog.get_logger(__name__)

_NEGATIVE_TTL = 5.0
# How often admission asks again whether a token's marked answers are settled (rate_limits.py).
_MARK_POLL_SECONDS = 0.005
_NEGATIVE_MAX = 10_000
# Holds and rpm slots being given back in the background while their store is away.
_GIVE_BACKS_MAX = 10_000
# How long a max_requests place's give-back is retried while its store is away. Unlike a hold or
# an rpm slot it never expires: given up on, it is quota the token lost for good. An outage
# longer than this is an incident of its own, and the place is then logged lost.
_PLACE_GIVE_BACK_SECONDS = 3600.0
# A grant not reloaded for this many cache periods is forgotten: one in use is reloaded every
# period, so it belongs to a token unused that long (an hour, by default).
_UNUSED_CACHE_PERIODS = 120


def _unsettled_limits() -> errors.ProxyError:
    return errors.LimitsUnavailable(
        "This server settles no answers (it runs without events), so it cannot enforce this"
        " token's tpm or budget; use a server with an event bus."
    )


_WINDOW_LOST = (
    "window lost its last minute (Redis restarted without its data), so the limit cannot be"
    " counted until that minute is over"
)


@dataclass(slots=True, eq=False)
class Grant:
    """What the proxy path needs to admit and forward a request for one token."""

    digest: str  # SHA-256 of the token value: the cache key
    token_id: str
    project_id: str
    expires_at: float  # epoch seconds
    is_active: bool
    project_is_active: bool
    max_requests: int | None
    # b"Bearer <project key>", as sent; b"" when the key cannot be sent. Never logged.
    upstream_authorization: bytes
    loaded_at: float  # monotonic
    exhausted: bool = False
    allowed_models: tuple[str, ...] | None = None  # globs the body's "model" must match
    rpm: int | None = None
    tpm: int | None = None
    budget: int | None = None  # nano-dollars, lifetime
    # The least a request refused for good on this budget needed (Token.budget_refused_nanousd).
    budget_refused: int | None = None
    # Answers carry LLM-Proxy-* headers about what is left (tokens with limits only).
    limited: bool = False
    expires_at_header: str = ""  # expires_at in RFC 3339, for LLM-Proxy-Token-Expires-At
    # The project key alone (upstream_authorization without "Bearer "), masked wherever an answer
    # quotes it; kept here so a request does not cut it out again. Never logged.
    upstream_key: bytes = b""
    _models_seen: dict[str, bool] = field(default_factory=dict)

    def model_allowed(self, model: object) -> bool:
        """Whether ``model`` (the body's value) matches one of the token's globs."""
        if self.allowed_models is None:
            return True
        if not isinstance(model, str):
            return False
        allowed = self._models_seen.get(model)
        if allowed is None:
            allowed = any(fnmatchcase(model, glob) for glob in self.allowed_models)
            if len(self._models_seen) < 256:  # bounded: the model string is the client's
                self._models_seen[model] = allowed
        return allowed

    def __repr__(self) -> str:
        return f"Grant(token_id={self.token_id!r}, project_id={self.project_id!r})"


@dataclass(slots=True)
class Admission:
    """One admitted request: its grant, and what was counted for it (to give back if needed)."""

    grant: Grant
    remaining_requests: int | None  # for a token with max_requests: how many are left
    rate_slot: int = 0  # the rpm window's slot taken (epoch microseconds), 0 for none
    hold_id: str = ""  # the budget hold taken, "" for none
    held: int = 0  # nano-dollars held
    remaining_budget: int | None = None  # for a budgeted token: what is neither spent nor held
    # A give-back of its place whose COMMIT went unanswered: asked about before another.
    release_in_doubt: CommitInDoubt | None = None


# Tells other processes which project or token a management change made stale (both None: all).
TellSiblings = Callable[[str | None, str | None], Awaitable[None]]


class TokenAuthority:
    def __init__(
        self,
        store: Store,
        cipher: KeyCipher,
        *,
        cache_seconds: float,
        max_staleness: float = 5.0,
        rate_windows: RateWindows | None = None,
        budget_ledger: BudgetLedger | None = None,
        settlements: Settlements | None = None,
        settles: bool = True,
        hold_lease_seconds: float = HOLD_LEASE_SECONDS,
    ) -> None:
        self._store = store
        # Whether anything settles answers (no events pipeline: LLM_PROXY_EVENT_BUS=none). Without
        # it a tpm window never fills and a budget is never spent, so such tokens are refused.
        self._settles = settles
        # This process's answered requests whose tpm tokens or cost are not settled yet: told by
        # the sink that settles them (see settling.py).
        self.settlements = settlements or Settlements()
        self._mark_failed = SparseWarning("admission.answer_mark_failed")
        # Whether rpm/tpm windows and budgets live in the database too (no Redis configured).
        self._limits_in_store = rate_windows is None or budget_ledger is None
        self._rate_windows = rate_windows or StoreRateWindows(store)
        self.budget_ledger = budget_ledger or StoreBudgetLedger(
            store, lease_seconds=hold_lease_seconds
        )
        # The holds of this process's requests not settled yet, renewed until they are; the
        # sink that settles them tells (through settlements) when they are.
        self.hold_leases = HoldLeases(self.budget_ledger)
        self.settlements.hold_leases = self.hold_leases
        self._cipher = cipher
        self._cache_seconds = cache_seconds
        self._forget_unused_after = cache_seconds * _UNUSED_CACHE_PERIODS
        self._max_staleness = max_staleness
        self._wake = asyncio.Event()
        self.push_connected = False
        self._feed_read_at = time.monotonic()  # when the change feed was last read whole
        self._by_hash: dict[str, Grant] = {}
        # Counts invalidations: a lookup that overlapped one read the store before the change
        # it announces, and its answer is not cached (see _fetch).
        self._invalidations = 0
        self._unknown: dict[str, float] = {}
        self._loading: dict[str, asyncio.Future[Grant | None]] = {}
        self._pending: dict[str, list[float]] = {}  # token_id → [requests, last_used epoch]
        # Tallies whose write's COMMIT went unanswered (see `flush_usage`).
        self._usage_in_doubt: list[tuple[CommitInDoubt, dict[str, list[float]]]] = []
        self._change_cursor = 0
        # Under --workers: tells the sibling workers of a change made here, and returns once they
        # evicted it (see :meth:`changed`).
        self.tell_siblings: TellSiblings | None = None
        # Holds and rpm slots being given back in the background (see `_give_back_later`).
        self._orphan_releases: set[asyncio.Future[None]] = set()
        # Refusals while the Redis holding the limits is not trusted after it lost its data:
        # otherwise the operator would see only 503s, with no word of why.
        self._limits_lost = SparseWarning("limits.redis_lost_its_data")
        # Refusals for good being written to the token's row (see `_note_refused`).
        self._refusal_notes: set[asyncio.Future[None]] = set()
        # Projects whose stored upstream key ENCRYPTION_KEY does not open (stored under another
        # key): logged once each, their requests refused with a clear answer.
        self._undecryptable: set[str] = set()

    async def start(self) -> None:
        started = time.monotonic()
        self._change_cursor = await self._store.latest_change()
        self._feed_read(started)
        await self._rate_windows.start()
        await self.budget_ledger.start()

    # -- the request path ----------------------------------------------------------------------

    async def admit(self, grant: Grant, plan: CostPlan | None = None) -> Admission:
        """Count a request of a checked token against its limits, or raise the refusal.

        Limits are checked in the order of their refusals: the rpm and tpm windows (429
        ``rate_limited``, transient), ``max_requests`` (429 ``quota_exceeded``, permanent), then
        the budget, which holds the most the request can cost (``plan``; 429 ``budget_exceeded``).
        What one took is given back when a later one refuses. The tpm window and the budget are
        read once the token's requests this process already answered are settled (bounded).

        The request is counted against the grant as it is now, which the returned admission
        carries: a change made while the request's body was arriving (a slow upload) applies to
        it, as it would to the next request. The caller checks its body against that grant again
        when it is not the one it was given.
        """
        if self._by_hash.get(grant.digest) is not grant:
            # A change evicted the grant since the check, while the request's body was arriving
            # (a slow upload): a token stopped meanwhile is not forwarded after the operator was
            # told it stopped, and new limits count it.
            grant = await self.current(grant)
        elif (now := time.monotonic()) - max(self._feed_read_at, grant.loaded_at) > (
            self._max_staleness
        ):
            # The feed fell silent while the body was arriving: the cache's word is no longer
            # enough (fail closed), unless the grant itself was read since.
            STATS.cache_stale_checks += 1
            grant = await self._load_or_refuse(grant, grant.digest, now)
            self._refuse_unusable(grant)
        wall = time.time()
        if wall >= grant.expires_at:
            # It expired while the request's body was arriving (read whole before admission).
            raise errors.TokenExpired("This token has expired.")
        slot = 0
        if grant.tpm is not None:
            if not self._settles:
                raise _unsettled_limits()
            if self.settlements.unsettled(grant.token_id):
                await self.settlements.wait(grant.token_id)
            await self._check_tpm(grant)
        if grant.rpm is not None:
            slot = await self._take_rate_slot(grant)
        if grant.max_requests is None:
            tally = self._pending.get(grant.token_id)
            if tally is None:
                self._pending[grant.token_id] = [1, wall]
            else:
                tally[0] += 1
                tally[1] = wall
            admission = Admission(grant, None, slot)
        else:
            claim = None if grant.exhausted else await self._claim(grant, wall, slot)
            if claim is None:
                claim = await self._claim_after_refusal(grant, wall, slot)
            # What is left of the quota the database counted against: a change may have set
            # another since this grant was read (during a slow upload, or in another instance).
            admission = Admission(grant, claim.remaining, slot)
        if grant.budget is not None and plan is not None:
            async with self._given_back_if_refused(admission):
                if not self._settles:
                    raise _unsettled_limits()
                if self.settlements.unsettled(grant.token_id):
                    await self.settlements.wait(grant.token_id)
                await self._hold(admission, grant.budget, plan)
        if grant.limited and self._by_hash.get(grant.digest) is not grant:
            # A change evicted the grant while its limits were counted (a store slow to answer,
            # a wait for settlements): the same promise as above, given back what it took.
            async with self._given_back_if_refused(admission):
                self._refuse_unusable(
                    self._by_hash.get(grant.digest)
                    or await self._load_or_refuse(grant, grant.digest, time.monotonic())
                )
        return admission

    @contextlib.asynccontextmanager
    async def _given_back_if_refused(self, admission: Admission) -> AsyncIterator[None]:
        """Give back what ``admission`` counted when the block refuses the request (or its client
        leaves): before the refusal goes out, so that counts are exact when it arrives, but in
        the background when a store failed, since one that hangs would hold the refusal another
        timeout for the give-back."""
        try:
            yield
        except errors.LimitsUnavailable:
            self._release_in_background(admission)
            raise
        except BaseException:
            await self.release(admission)
            raise

    def is_current(self, grant: Grant) -> bool:
        """Whether ``grant`` is still its token's cached grant: no change evicted it."""
        return self._by_hash.get(grant.digest) is grant

    async def current(self, grant: Grant) -> Grant:
        """The grant of ``grant``'s token as it is now: ``grant`` itself while no change evicted
        it, else the one cached since or read again, refused if the token may no longer be used."""
        current = self._by_hash.get(grant.digest)
        if current is grant:
            return grant
        current = current or await self._load_or_refuse(grant, grant.digest, time.monotonic())
        self._refuse_unusable(current)
        return current

    async def _hold(self, admission: Admission, budget: int, plan: CostPlan) -> None:
        grant = admission.grant
        hold_id = random.randbytes(12).hex()
        call = asyncio.ensure_future(
            self.budget_ledger.hold(
                grant.token_id, hold_id, budget, plan.want, plan.minimum, grant.expires_at
            )
        )
        try:
            hold = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The client hung up while the hold was being taken, and the ledger may take it all
            # the same (the script or transaction is already on its way): give it back once taken,
            # rather than keep that much of the budget until its lease ends.
            call.add_done_callback(lambda done: self._release_orphan(grant.token_id, hold_id, done))
            raise
        except Exception as exc:
            # No answer in time, or the connection died: the hold may have been taken all the
            # same, or may be yet (a stalled Redis runs the script when it wakes).
            self._give_back_later(
                "release_hold", lambda: self.budget_ledger.cancel(grant.token_id, hold_id)
            )
            log.error("token_authority.store_failed", operation="budget_hold", error=str(exc))
            raise errors.LimitsUnavailable(
                "The store holding this token's limits is unavailable; retry shortly."
            ) from None
        admission.remaining_budget = hold.remaining_nanousd
        if not hold.admitted:
            STATS.budget_holds_refused += 1
            if hold.unknown_for:
                raise self._lost_with_redis_data(
                    "budget",
                    hold.unknown_for,
                    "lost the holds of requests in progress (Redis restarted without its data),"
                    " so it cannot be counted until they are taken again",
                )
            if hold.exhausted:
                self._note_refused(grant, budget, plan.minimum)
                raise errors.BudgetExceeded(
                    f"This token's budget of ${usd(budget)} is spent"
                    f" (${usd(hold.remaining_nanousd)} left, less than this request needs)."
                )
            # The rest of the budget is held by requests still running: it may come back.
            raise errors.RateLimited(
                "The rest of this token's budget is held by requests in progress; retry shortly.",
                headers={"Retry-After": "1"},
            )
        STATS.budget_holds += 1
        STATS.budget_holds_open += 1
        admission.hold_id = hold_id
        admission.held = hold.held_nanousd
        self.hold_leases.add(grant.token_id, hold_id, hold.held_nanousd)

    def _note_refused(self, grant: Grant, budget: int, minimum: int) -> None:
        """Have the token's row remember a refusal for good, so that its status says exhausted by
        the rule admission refused by (``models.budget_spent``). Written in the background, once
        per grant and least request: a client retrying the same request is refused from the
        ledger alone."""
        # A need beyond the whole budget says no more than one just over it (never affordable),
        # and may not fit the store's 64-bit column ("n": 1e18 asks that many answers).
        minimum = min(minimum, budget + 1)
        if grant.budget_refused is not None and grant.budget_refused <= minimum:
            return
        grant.budget_refused = minimum
        note = asyncio.ensure_future(
            self._store.note_budget_refused(grant.token_id, budget, minimum)
        )
        self._refusal_notes.add(note)
        note.add_done_callback(self._refusal_noted)

    def _refusal_noted(self, note: asyncio.Future[None]) -> None:
        self._refusal_notes.discard(note)
        if not note.cancelled() and (exc := note.exception()) is not None:
            # The refusal stands; only the status may say active until the next one is noted.
            log.error("token_authority.store_failed", operation="note_refused", error=str(exc))

    def _release_orphan(
        self, token_id: str, hold_id: str, call: asyncio.Future[BudgetHold]
    ) -> None:
        if call.cancelled() or call.exception() is not None:
            self._give_back_later(
                "release_hold", lambda: self.budget_ledger.cancel(token_id, hold_id)
            )
        elif (hold := call.result()).admitted:
            self._give_back_later(
                "release_hold",
                lambda: self.budget_ledger.settle(token_id, hold_id, hold.held_nanousd, 0),
            )

    def _give_back_later(
        self, operation: str, give_back: Callable[[], Awaitable[None]], within: float = 0.0
    ) -> None:
        """Run ``give_back`` in the background until it succeeds (the store is back), for at
        most ``within`` seconds (by default a hold's lease): after that the hold has expired, or
        the slot left its window."""
        within = within or self.budget_ledger.lease_seconds
        if len(self._orphan_releases) >= _GIVE_BACKS_MAX:
            # The hold or slot stays until it expires: a lost release errs on the side of the limit.
            log.error("token_authority.store_failed", operation=operation, error="too many waiting")
            return
        release = asyncio.ensure_future(self._keep_giving_back(operation, give_back, within))
        self._orphan_releases.add(release)
        release.add_done_callback(self._orphan_releases.discard)

    async def _keep_giving_back(
        self, operation: str, give_back: Callable[[], Awaitable[None]], within: float
    ) -> None:
        deadline = time.monotonic() + within
        pause = 0.25
        while True:
            try:
                await give_back()
                return
            except Exception as exc:
                if time.monotonic() + pause > deadline:
                    # It stays until it expires: a lost release errs on the side of the limit.
                    log.error("token_authority.store_failed", operation=operation, error=str(exc))
                    return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)

    async def release(self, admission: Admission) -> None:
        """Take back what :meth:`admit` counted, when the request never reached the upstream.

        The admission's hold is this call's from its start (ended here, once). What is given back
        is given back to its end by a task of its own, which a caller cancelled meanwhile (its
        client left while the store was slow) stops waiting for: cut halfway, a hold would be
        left to its lease and a ``max_requests`` place lost for good."""
        await asyncio.shield(self._release_in_background(admission))

    def _release_in_background(self, admission: Admission) -> asyncio.Future[None]:
        """:meth:`release` without waiting for it: the task giving back what was counted."""
        hold_id, admission.hold_id = admission.hold_id, ""
        if hold_id:
            self.hold_ended(hold_id)
        giving_back = asyncio.ensure_future(self._give_back(admission, hold_id))
        self._orphan_releases.add(giving_back)  # (awaited by close, like those given back later)
        giving_back.add_done_callback(self._orphan_releases.discard)
        return giving_back

    async def _give_back(self, admission: Admission, hold_id: str) -> None:
        """Release hold ``hold_id`` (none when "") and give back the request's place, each retried
        in the background while its store is away."""
        grant = admission.grant
        if hold_id:
            settle = partial(self.budget_ledger.settle, grant.token_id, hold_id, admission.held, 0)
            try:
                await settle()
            except Exception as exc:
                log.warning(
                    "token_authority.store_failed", operation="release_hold", error=str(exc)
                )
                # Retried while the store is away, until the hold expires: kept, it would keep
                # the budget from its token for a lease. Settling nothing, a release that ran
                # after all changes nothing when it runs again.
                self._give_back_later("release_hold", settle)
        try:
            await self._give_back_place(admission)
        except Exception as exc:
            log.warning("token_authority.store_failed", operation="release", error=str(exc))
            # Retried while the store is away: a place kept for good is quota the token lost.
            self._give_back_place_later(admission)

    async def mark_answered(self, token_id: str, mark: str) -> None:
        """Mark an answer of a tpm-limited token as going out unsettled (see rate_limits.py).
        A store that cannot take it does not hold the answer back: the next request of the
        token then finds the store unavailable, or the window as it is."""
        try:
            await self._rate_windows.mark_answered(token_id, mark)
        except Exception as exc:
            self._mark_failed.happened(error=str(exc))

    def hold_ended(self, hold_id: str, request_id: str = "") -> None:
        """The request of hold ``hold_id`` ended: released, or (``request_id`` given) handed to
        the events pipeline, which settles the hold (renewed until then: see hold_leases.py)."""
        STATS.budget_holds_open -= 1
        if request_id:
            self.hold_leases.hand_over(hold_id, request_id)
        else:
            self.hold_leases.end(hold_id)

    def release_unsent(self, admission: Admission) -> None:
        """Take back, in the background, what :meth:`admit` counted for a request whose client
        left before it reached the upstream; its budget hold, if any, is left to its settlement."""
        admission.hold_id = ""
        self._give_back_place_later(admission)

    async def _give_back_place(self, admission: Admission) -> None:
        """Give back the request's rpm slot and its ``max_requests`` place; raises when the store
        failed, and can be called again until it returns: what was given back is not again."""
        grant = admission.grant
        if admission.rate_slot:
            await self._rate_windows.give_back(grant.token_id, admission.rate_slot)
            admission.rate_slot = 0
        if grant.max_requests is None:
            # The tally may have been written already: a negative one takes the request back.
            self._pending.setdefault(grant.token_id, [0, time.time()])[0] -= 1
            return
        doubt = admission.release_in_doubt
        if doubt is None or not await doubt.committed():  # (raises while it cannot tell)
            admission.release_in_doubt = None
            try:
                await self._store.release_request(grant.token_id)
            except CommitInDoubt as lost:
                admission.release_in_doubt = lost
                raise
        grant.exhausted = False
        cached = self._by_hash.get(grant.digest)
        if cached is not None:  # the token may have been reloaded since this request's grant
            cached.exhausted = False

    async def _take_rate_slot(self, grant: Grant) -> int:
        token_id, slot_id = grant.token_id, random.randbytes(8).hex()
        call = asyncio.ensure_future(self._rate_windows.take(token_id, grant.rpm or 0, slot_id))
        try:
            slot = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The client left meanwhile: the slot may be taken all the same (SQLite's transaction
            # runs to its end, and its cancel() knows no slot), given back once that is known.
            call.add_done_callback(partial(self._give_back_taken_slot, token_id, slot_id))
            raise
        except BaseException as exc:
            # No answer in time, or the connection died: the slot may have been taken all the
            # same, or may be yet (a stalled Redis runs the script when it wakes).
            self._give_back_later(
                "give_back",
                lambda: self._rate_windows.cancel(token_id, slot_id),
                RATE_WINDOW_MICROS / 1e6,
            )
            if not isinstance(exc, Exception):
                raise
            log.error("token_authority.store_failed", operation="rate", error=str(exc))
            raise errors.LimitsUnavailable(
                "The store holding this token's limits is unavailable; retry shortly."
            ) from None
        if not slot.admitted:
            if slot.window_lost:
                raise self._lost_with_redis_data("rpm", slot.retry_after, _WINDOW_LOST)
            retry_after = max(1, math.ceil(slot.retry_after))
            raise errors.RateLimited(
                f"This token allows {grant.rpm} requests per minute; retry in {retry_after} s.",
                headers={"Retry-After": str(retry_after)},
            )
        return slot.at_micros

    def _give_back_taken_slot(
        self, token_id: str, slot_id: str, call: asyncio.Future[RateSlot]
    ) -> None:
        """Give back, in the background, the rpm slot of a request whose client left while it
        was taken (see :meth:`_take_rate_slot`)."""
        if call.cancelled() or call.exception() is not None:
            give_back = partial(self._rate_windows.cancel, token_id, slot_id)
        elif (taken := call.result()).admitted and taken.at_micros:
            give_back = partial(self._rate_windows.give_back, token_id, taken.at_micros)
        else:
            return
        self._give_back_later("give_back", give_back, RATE_WINDOW_MICROS / 1e6)

    async def _check_tpm(self, grant: Grant) -> None:
        """Refuse a request whose token's tpm window is full, once the answers of the token that
        went out from any process are settled: waited for by polling, as settling takes
        milliseconds, and for :data:`SETTLE_WAIT_SECONDS` at most in all (see rate_limits.py)."""
        deadline = 0.0
        marks = True
        upto = 0  # once waiting: only the answers that went out before the first look
        while True:
            try:
                room = await self._rate_windows.tpm_room(
                    grant.token_id, grant.tpm or 0, marks=marks, upto=upto
                )
            except Exception as exc:
                log.error("token_authority.store_failed", operation="tpm", error=str(exc))
                raise errors.LimitsUnavailable(
                    "The store holding this token's limits is unavailable; retry shortly."
                ) from None
            if not room.unsettled:
                break
            upto = room.at_micros
            now = time.monotonic()
            if not deadline:
                deadline = now + SETTLE_WAIT_SECONDS
            elif now >= deadline:
                STATS.settlement_waits["timed_out"] += 1
                marks = False  # waited long enough: the window as it is decides
                continue
            await asyncio.sleep(_MARK_POLL_SECONDS)
        if deadline and marks:
            STATS.settlement_waits["settled"] += 1
        if not room.admitted:
            if room.window_lost:
                raise self._lost_with_redis_data("tpm", room.retry_after, _WINDOW_LOST)
            retry_after = max(1, math.ceil(room.retry_after))
            raise errors.RateLimited(
                f"This token allows {grant.tpm} tokens per minute; retry in {retry_after} s.",
                headers={"Retry-After": str(retry_after)},
            )

    def _lost_with_redis_data(self, limit: str, seconds: float, why: str) -> errors.ProxyError:
        """The refusal of a token whose ``limit`` Redis lost with its data, counted again in
        ``seconds``; logged (sparsely), or the operator would see only 503s with no word of why."""
        retry_after = max(1, math.ceil(seconds))
        self._limits_lost.happened(limit=limit, trusted_again_in_seconds=retry_after)
        return errors.LimitsUnavailable(
            f"The store holding this token's {limit} {why}; retry in {retry_after} s.",
            headers={"Retry-After": str(retry_after)},
        )

    def _give_back_slot_later(self, token_id: str, slot: int) -> None:
        """Give back, in the background, the rpm slot of a request refused because the store
        failed: given back inline, on a store that hangs (the rpm window in the database), the
        refusal would wait another timeout. Retried until the store answers or the slot has left
        its window; a refund that never lands is logged, and errs on the side of the limit."""
        if slot:
            give_back = partial(self._rate_windows.give_back, token_id, slot)
            self._give_back_later("give_back", give_back, RATE_WINDOW_MICROS / 1e6)

    async def _give_back_slot(self, token_id: str, slot: int) -> None:
        # Inline where the store answered: the slot is free again before the refusal goes out.
        if not slot:
            return
        try:
            await self._rate_windows.give_back(token_id, slot)
        except Exception as exc:
            # The slot stays taken: a lost refund errs on the side of the limit.
            log.error("token_authority.store_failed", operation="give_back", error=str(exc))

    async def check(self, authorization: str | None) -> Grant:
        """Validate a bearer credential without counting a request."""
        if not authorization or authorization[:7].lower() != "bearer ":
            raise errors.InvalidToken("Missing bearer token in the Authorization header.")
        value = authorization[7:].strip()
        if not is_token_shaped(value):
            raise errors.InvalidToken("The bearer token is not a withering token.")
        digest = hash_token(value)
        grant = self._by_hash.get(digest)
        now = time.monotonic()
        if grant is None:
            STATS.cache_misses += 1
            grant = await self._load(digest, now)
        elif now - grant.loaded_at > self._cache_seconds:
            STATS.cache_misses += 1
            # Known to this process: refused for its limits if the database cannot answer.
            grant = await self._load_or_refuse(grant, digest, now)
        elif now - self._feed_read_at > self._max_staleness:
            # The cache may have missed a revocation: ask the store (fail closed).
            STATS.cache_stale_checks += 1
            grant = await self._load_or_refuse(grant, digest, now)
        else:
            STATS.cache_hits += 1
        self._refuse_unusable(grant)
        return grant

    def _refuse_unusable(self, grant: Grant) -> None:
        """Raise the refusal of a token that may not be used now, if any."""
        if not grant.is_active:
            raise errors.TokenInactive("This token has been revoked.")
        if time.time() >= grant.expires_at:
            raise errors.TokenExpired("This token has expired.")
        if not grant.project_is_active:
            raise errors.ProjectInactive("The project of this token is inactive.")
        if not grant.upstream_authorization:
            # Refused before anything is counted: such a request could never reach the upstream.
            if grant.project_id in self._undecryptable:
                raise errors.ServiceUnavailable(
                    "The upstream key of this token's project cannot be read with this server's"
                    " ENCRYPTION_KEY (it was stored under another); an operator must restore that"
                    " key or set the project's key anew.",
                    headers={"x-should-retry": "false"},
                )
            raise errors.ServiceUnavailable(
                "The upstream key of this token's project cannot be used (it holds a control"
                " character); an operator must set a new one.",
                headers={"x-should-retry": "false"},
            )

    async def _claim(self, grant: Grant, wall: float, slot: int) -> Claim | None:
        token_id = grant.token_id
        call = asyncio.ensure_future(
            self._store.consume_request(token_id, datetime.fromtimestamp(wall, UTC))
        )
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            # The client left while the request was being counted, and the count may land all
            # the same (SQLite's transaction runs to its end): never reaching the upstream, the
            # request gives back what it took once that is known.
            call.add_done_callback(partial(self._give_back_claim, grant, slot))
            raise
        except ClaimInDoubt as doubt:
            # Counted or not, it must not stay counted and refused: admitted when the database
            # says it counted, else refused; given back once it can tell, when it cannot yet.
            try:
                if await doubt.committed():
                    return doubt.claim
            except BaseException as exc:
                self._give_back_place_later(Admission(grant, None), doubt)
                if not isinstance(exc, Exception):
                    self._give_back_slot_later(token_id, slot)
                    raise
            self._give_back_slot_later(token_id, slot)
            log.error("token_authority.store_failed", operation="consume", error=str(doubt))
            raise errors.LimitsUnavailable(
                "The store holding this token's limits is unavailable; retry shortly."
            ) from None
        except Exception as exc:
            self._give_back_slot_later(token_id, slot)
            log.error("token_authority.store_failed", operation="consume", error=str(exc))
            # Never admitted uncounted: a limit enforced by this instance alone is no limit.
            raise errors.LimitsUnavailable(
                "The store holding this token's limits is unavailable; retry shortly."
            ) from None

    def _give_back_claim(self, grant: Grant, slot: int, call: asyncio.Future[Claim | None]) -> None:
        """Give back, in the background, the place and the rpm slot of a request whose client
        left while its place was claimed (see :meth:`_claim`)."""
        failed = None if call.cancelled() else call.exception()
        if call.cancelled() or failed is not None or call.result() is None:
            if isinstance(failed, ClaimInDoubt):
                self._give_back_place_later(Admission(grant, None), failed)
            self._give_back_slot_later(grant.token_id, slot)
            return
        self.release_unsent(Admission(grant, None, slot))

    def _give_back_place_later(
        self, admission: Admission, doubt: ClaimInDoubt | None = None
    ) -> None:
        """Give back ``admission``'s rpm slot and ``max_requests`` place in the background, retried
        for :data:`_PLACE_GIVE_BACK_SECONDS`; with ``doubt``, the place of a claim whose COMMIT
        went unanswered, once the database tells it committed. One admission for every attempt
        (see :meth:`_give_back_place`): a give-back whose own COMMIT went unanswered is asked
        about before another, as given twice, a place would be a request the quota never
        counted."""

        async def give_back() -> None:
            if doubt is None or await doubt.committed():  # (raises while it cannot tell)
                await self._give_back_place(admission)

        self._give_back_later("release", give_back, _PLACE_GIVE_BACK_SECONDS)

    async def _claim_after_refusal(self, grant: Grant, wall: float, slot: int) -> Claim:
        """A claim failed, or was not tried on a grant seen used up: either the quota is used up,
        or another process revoked the token a moment ago, or (refused from memory) a place came
        back since (a request that never reached the upstream gave its own back, maybe in another
        process or instance). The reloaded grant tells which: the place is claimed, or the client
        gets the right refusal."""
        try:
            # A database that cannot answer leaves the limit uncountable: limits_unavailable.
            fresh = await self._load_or_refuse(grant, grant.digest, time.monotonic())
        except errors.LimitsUnavailable:
            self._give_back_slot_later(grant.token_id, slot)
            raise
        except BaseException:
            await self._give_back_slot(grant.token_id, slot)
            raise
        if grant.exhausted and fresh.is_active and not fresh.exhausted:
            # (It gives the slot back itself when the store fails.)
            claim = await self._claim(grant, wall, slot)
            if claim is not None:
                return claim
        await self._give_back_slot(grant.token_id, slot)
        if not fresh.is_active:
            raise errors.TokenInactive("This token has been revoked.")
        # (``fresh.exhausted`` says what the database says: requests that held the last places
        # when the claim failed may have been given back since, and the next request may pass.)
        raise errors.QuotaExceeded(
            f"This token has used all {grant.max_requests} of its requests.",
        )

    async def _load_or_refuse(self, cached: Grant, digest: str, now: float) -> Grant:
        """Reload a cached grant; when the database cannot answer, a token with a limit held
        there is refused as SPEC §11 says (``limits_unavailable``), any other as unverifiable."""
        try:
            return await self._load(digest, now)
        except errors.ServiceUnavailable:
            if cached.max_requests is not None or (cached.limited and self._limits_in_store):
                raise errors.LimitsUnavailable(
                    "The store holding this token's limits is unavailable; retry shortly."
                ) from None
            raise

    async def _load(self, digest: str, now: float) -> Grant:
        if self._unknown.get(digest, 0.0) > now:
            raise errors.TokenNotFound("Unknown token.")
        pending = self._loading.get(digest)
        if pending is None:
            # A task of its own that every request for the token awaits through a shield: a
            # request cancelled while waiting (its client went away) stops waiting, and never
            # fails the load the others wait on with its CancelledError.
            pending = asyncio.ensure_future(self._fetch(digest, now))
            self._loading[digest] = pending
            pending.add_done_callback(lambda done: self._loaded(digest, done))
        grant = await asyncio.shield(pending)
        if grant is None:
            raise errors.TokenNotFound("Unknown token.")
        return grant

    def _loaded(self, digest: str, done: asyncio.Future[Grant | None]) -> None:
        if self._loading.get(digest) is done:
            del self._loading[digest]
        if not done.cancelled():
            done.exception()  # retrieved: every request waiting for it may have gone

    async def _fetch(self, digest: str, now: float) -> Grant | None:
        invalidations = self._invalidations
        try:
            row = await self._store.grant_for_hash(digest)
        except Exception as exc:
            log.error("token_authority.store_failed", operation="lookup", error=str(exc))
            raise errors.ServiceUnavailable(
                "The token store is unavailable; retry shortly."
            ) from None
        if row is None:
            if len(self._unknown) >= _NEGATIVE_MAX:
                self._unknown.clear()
            self._unknown[digest] = now + _NEGATIVE_TTL
            self._by_hash.pop(digest, None)
            STATS.token_cache_entries = len(self._by_hash)
            return None
        token = row.token
        authorization = self._authorization(token.project_id, row.api_key_encrypted)
        grant = Grant(
            digest=digest,
            token_id=token.id,
            project_id=token.project_id,
            expires_at=token.expires_at.timestamp(),
            is_active=token.is_active,
            project_is_active=row.project_is_active,
            max_requests=token.max_requests,
            upstream_authorization=authorization,
            upstream_key=authorization.removeprefix(b"Bearer "),
            loaded_at=now,
            exhausted=token.max_requests is not None and token.request_count >= token.max_requests,
            allowed_models=token.allowed_models,
            rpm=token.rpm,
            tpm=token.tpm,
            budget=token.budget_nanousd,
            budget_refused=token.budget_refused_nanousd,
            limited=token.has_limits,
            expires_at_header=isoformat(token.expires_at) or "",
        )
        if invalidations == self._invalidations:
            self._by_hash[digest] = grant
            STATS.token_cache_entries = len(self._by_hash)
        # else: a change was announced while the store answered, maybe a revocation of this very
        # token that the row predates: good for the requests that were waiting, not for later.
        return grant

    def _authorization(self, project_id: str, api_key_encrypted: str) -> bytes:
        """The project's Authorization field; b"" for a key that cannot be sent in one, which
        the management API refuses but an older version may have stored, or that ENCRYPTION_KEY
        does not open."""
        try:
            key = self._cipher.decrypt(api_key_encrypted)
        except DecryptionError:
            if project_id not in self._undecryptable:
                self._undecryptable.add(project_id)
                log.error(
                    "token_authority.project_key_undecryptable",
                    project_id=project_id,
                    fix="start with the ENCRYPTION_KEY that stored it, or set the project's key"
                    " anew",
                )
            return b""
        self._undecryptable.discard(project_id)
        if not is_sendable_key(key):
            log.error("token_authority.project_key_unsendable", project_id=project_id)
            return b""
        return b"Bearer " + key.encode("utf-8", "surrogateescape")

    # -- off the request path ------------------------------------------------------------------

    async def changed(self, *, project_id: str | None = None, token_id: str | None = None) -> None:
        """A management change this process committed: evicted here at once and, under
        ``--workers``, in the sibling workers before this returns, so that it holds on every
        worker of the machine from the management call's answer on. Other instances learn it
        from the change feed."""
        self.invalidate(project_id=project_id, token_id=token_id)
        if self.tell_siblings is not None:
            await self.tell_siblings(project_id, token_id)

    def invalidate(self, *, project_id: str | None = None, token_id: str | None = None) -> None:
        """Forget cached grants of a token or of a whole project (of every token when neither is
        named); the next request reloads.

        Lookups in flight read the store before this change: requests arriving from now on do
        not join them, and what they read is not cached."""
        self._invalidations += 1
        self._loading.clear()
        stale = [
            digest
            for digest, grant in self._by_hash.items()
            if (token_id is not None and grant.token_id == token_id)
            or (project_id is not None and grant.project_id == project_id)
            or (token_id is None and project_id is None)
        ]
        for digest in stale:
            del self._by_hash[digest]
        STATS.token_cache_entries = len(self._by_hash)

    def forget_stale(self) -> None:
        """Drop the cached grants of tokens that have expired, and of tokens not used for
        ``_UNUSED_CACHE_PERIODS`` cache periods.

        An expired token is refused whether or not it is cached (a request reloads it), and a
        token's next request after a cache period reloads its grant anyway, while tokens are
        many and may live a year: kept, every token a process ever saw would stay in its memory
        until it expired, and each change would scan them all (:meth:`invalidate`). Kept an hour
        rather than one period, a grant still names the limits of a token in use through a
        database outage (``limits_unavailable``, see :meth:`_load_or_refuse`)."""
        now = time.time()
        unused_since = time.monotonic() - self._forget_unused_after
        stale = [
            digest
            for digest, grant in self._by_hash.items()
            if now >= grant.expires_at or grant.loaded_at < unused_since
        ]
        for digest in stale:
            del self._by_hash[digest]
        STATS.token_cache_entries = len(self._by_hash)

    async def forget_stale_every(self, seconds: float) -> None:
        """:meth:`forget_stale` every ``seconds`` until cancelled."""
        while True:
            await asyncio.sleep(seconds)
            self.forget_stale()

    async def poll_changes(self) -> int:
        """Evict what other processes changed since the last poll; returns how many changes."""
        started = time.monotonic()
        cursor, changes = await self._store.changes_since(self._change_cursor)
        self._change_cursor = cursor
        self._feed_read(started)
        for project_id, token_id in changes:
            if token_id is not None:
                self.invalidate(token_id=token_id)
            elif project_id is not None:
                self.invalidate(project_id=project_id)
            else:  # the feed started again lower: what it had may be lost
                self.invalidate()
        return len(changes)

    async def flush_usage(self) -> int:
        """Write the in-memory request tallies; returns how many tokens were written."""
        await self._resolve_usage_in_doubt()
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        deltas = [
            UsageDelta(token_id, int(count), datetime.fromtimestamp(last, UTC))
            for token_id, (count, last) in pending.items()
        ]
        try:
            await self._store.add_usage(deltas)
        except CommitInDoubt as doubt:
            # Written again, they might count twice: the next flush asks the database first.
            self._usage_in_doubt.append((doubt, pending))
            raise
        except Exception:
            self._keep_tallies(pending)  # for the next attempt rather than lose them
            raise
        return len(deltas)

    async def _resolve_usage_in_doubt(self) -> None:
        """Learn whether the tallies whose COMMIT went unanswered were written; keep them for
        the next write when not. Raises while the database cannot tell (they stay in doubt)."""
        # Taken out while the database is asked: a flush running meanwhile (the timer's and a
        # management call's) must not keep the same tallies a second time.
        doubts, self._usage_in_doubt = self._usage_in_doubt, []
        for index, (doubt, tallies) in enumerate(doubts):
            try:
                committed = await doubt.committed()
            except BaseException:
                self._usage_in_doubt.extend(doubts[index:])
                raise
            if not committed:
                self._keep_tallies(tallies)

    def _keep_tallies(self, tallies: dict[str, list[float]]) -> None:
        for token_id, (count, last) in tallies.items():
            tally = self._pending.setdefault(token_id, [0, last])
            tally[0] += count
            tally[1] = max(tally[1], last)

    async def follow_changes(self, poll_seconds: float, pushed_poll_seconds: float) -> None:
        """Read the change feed when woken by a push, else on a timer, until cancelled.

        While a push channel is up the timer only backs it up, so it runs less often.
        """
        failing = False
        while True:
            timeout = pushed_poll_seconds if self.push_connected else poll_seconds
            # Read at least twice per staleness window, or a quiet feed would look stale.
            timeout = min(timeout, self._max_staleness / 2)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.poll_changes()
            except Exception as exc:
                STATS.change_feed_failures += 1
                if not failing:  # once per outage, not once per poll
                    log.warning("token_authority.change_feed_failed", error=str(exc))
                failing = True
            else:
                if failing:
                    log.info("token_authority.change_feed_recovered")
                failing = False

    async def keep_listening(self, retry_seconds: float = 1.0) -> None:
        """Hold the store's push channel open, reconnecting when it drops, until cancelled.

        Returns at once for a store without one (SQLite: its processes share the file and follow
        the timer).
        """
        delay = retry_seconds
        while True:
            try:
                await self._store.listen_changes(self._wake.set, self._push_connected)
                return
            except Exception as exc:
                was_up = self.push_connected
                if was_up:
                    log.warning("token_authority.push_lost", error=str(exc) or type(exc).__name__)
                self._set_push(False)
                # The timer waits on the pushed cadence: have the feed read now, and on the
                # faster one from then on.
                self._wake.set()
                STATS.change_push_reconnects += 1
            # Back off while the database refuses us; retry at once-ish after a lost channel.
            delay = retry_seconds if was_up else min(delay * 2, 5.0)
            await asyncio.sleep(delay)

    def _feed_read(self, started: float) -> None:
        # The feed is known complete up to when the read began, not when it answered.
        self._feed_read_at = STATS.change_feed_read_at = max(self._feed_read_at, started)

    def _push_connected(self) -> None:
        self._set_push(True)
        # Changes made while no channel was up are in the feed: read it now.
        self._wake.set()

    def _set_push(self, up: bool) -> None:
        self.push_connected = up
        STATS.change_push_connected = up

    async def close(self) -> None:
        if self._orphan_releases or self._refusal_notes:
            await asyncio.wait(self._orphan_releases | self._refusal_notes, timeout=5)
        if waiting := list(self._orphan_releases):
            # Their store is still away. Holds and rpm slots expire, but a max_requests place
            # not given back stays used for good: the operator hears how many were left.
            log.warning("token_authority.give_backs_abandoned", count=len(waiting))
            for release in waiting:
                release.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        await self._rate_windows.close()
        await self.budget_ledger.close()

    @property
    def hold_renewal_seconds(self) -> float:
        """How often the holds of requests not settled yet are renewed, and expired ones reclaimed:
        a third of a lease, so that two renewals may fail before a hold lapses."""
        return self.budget_ledger.lease_seconds / 3

    async def renew_holds_every(self) -> None:
        """Renew the budget holds of this process's requests not settled yet until cancelled."""
        await self.hold_leases.renew_every(self.hold_renewal_seconds)

    async def reclaim_holds_every(self) -> None:
        """Return expired budget holds to their budgets until cancelled, soon after their lease
        ended (holds in the store only: Redis drops expired ones on the token's next hold)."""
        ledger = self.budget_ledger
        if not isinstance(ledger, StoreBudgetLedger):
            return
        while True:
            await asyncio.sleep(self.hold_renewal_seconds)
            try:
                if reclaimed := await ledger.reclaim():
                    log.warning("token_authority.budget_holds_reclaimed", holds=reclaimed)
            except Exception as exc:
                log.warning("token_authority.reclaim_failed", error=repr(exc))

    async def flush_usage_every(self, seconds: float) -> None:
        """Write the request tallies every ``seconds`` until cancelled; failures are retried."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.flush_usage()
            except Exception as exc:  # the tallies are kept for the next attempt
                log.warning("token_authority.usage_flush_failed", error=repr(exc))
