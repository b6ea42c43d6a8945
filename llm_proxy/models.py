"""Records shared by the store, the management API, the admin pages and the token cache."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def utcnow() -> datetime:
    return datetime.now(UTC)


NANOS_PER_USD = 1_000_000_000


def usd(nanos: int | None) -> float | None:
    """Nano-dollars (how money is kept: integers add up exactly) as US dollars."""
    # The quotient of two exact doubles is already the double nearest n / 10**9 (n < 2**53, more
    # than any spend): round(x, 9), which formats and parses decimal digits, returned it unchanged.
    return None if nanos is None else nanos / NANOS_PER_USD


def nanousd(dollars: float) -> int:
    return round(dollars * NANOS_PER_USD)


def budget_spent(budget: int, spent: int, minimum: int) -> bool:
    """Whether a budget is spent for a request that costs at least ``minimum`` nano-dollars: what
    is left beside the spend, holds aside, can never pay for it. Admission refuses such a request
    ``budget_exceeded`` (the stores; the Redis ledger's script says the same in Lua), and a token
    is ``exhausted`` by the same rule (:meth:`Token.status`)."""
    return budget - spent < minimum


def isoformat(moment: datetime | None) -> str | None:
    """RFC 3339 UTC with a ``Z``, the one timestamp format of every API answer."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Project:
    id: str
    name: str
    description: str
    metadata: dict[str, Any]
    is_active: bool
    created_at: datetime
    updated_at: datetime
    api_key_masked: str
    api_key_encrypted: str = field(repr=False)

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "metadata": self.metadata,
            "is_active": self.is_active,
            "api_key": self.api_key_masked,
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    project_id: str
    expires_at: datetime
    is_active: bool
    request_count: int
    max_requests: int | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None = None
    rpm: int | None = None  # admitted requests in any rolling 60 s
    tpm: int | None = None  # prompt + completion tokens in any rolling 60 s
    budget_nanousd: int | None = None  # lifetime spend cap
    spent_nanousd: int = 0  # settled spend
    reserved_nanousd: int = 0  # held for requests in flight (when the store holds reservations)
    # The least a request refused ``budget_exceeded`` for good needed, since the budget was set.
    budget_refused_nanousd: int | None = None
    allowed_models: tuple[str, ...] | None = None  # globs; None: any model
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def has_limits(self) -> bool:
        """Whether admitting a request must count something shared (never per instance)."""
        return (
            self.max_requests is not None
            or self.rpm is not None
            or self.tpm is not None
            or self.budget_nanousd is not None
        )

    @property
    def least_request_nanousd(self) -> int:
        """The least a request on this token is known to cost, for telling whether its budget is
        spent. What a request costs depends on its model and its body, which the token does not
        know; what it knows is what admission refused for good (the least such a request needed)
        and, failing that, that a request costs something."""
        return max(self.budget_refused_nanousd or 0, 1)

    def status(self, now: datetime) -> str:
        if not self.is_active:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.max_requests is not None and self.request_count >= self.max_requests:
            return "exhausted"
        if self.budget_nanousd is not None and budget_spent(
            self.budget_nanousd, self.spent_nanousd, self.least_request_nanousd
        ):
            return "exhausted"
        return "active"

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project_id": self.project_id,
            "expires_at": isoformat(self.expires_at),
            "is_active": self.is_active,
            "request_count": self.request_count,
            "max_requests": self.max_requests,
            "created_at": isoformat(self.created_at),
            "last_used_at": isoformat(self.last_used_at),
            "revoked_at": isoformat(self.revoked_at),
            "status": self.status(utcnow()),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "budget_usd": usd(self.budget_nanousd),
            "spent_usd": usd(self.spent_nanousd),
            "reserved_usd": usd(self.reserved_nanousd),
            "allowed_models": list(self.allowed_models)
            if self.allowed_models is not None
            else None,
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A token joined with what the proxy path needs of its project, as looked up by hash."""

    token: Token
    project_is_active: bool
    api_key_encrypted: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One management change, written in the same transaction as the change itself."""

    actor: str
    action: str
    target_type: str
    target_id: str | None = None
    project_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    client_ip: str | None = None
    outcome: str = "success"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: int
    timestamp: datetime
    entry: AuditEntry

    def to_api(self) -> dict[str, Any]:
        e = self.entry
        return {
            "id": self.id,
            "timestamp": isoformat(self.timestamp),
            "actor": e.actor,
            "action": e.action,
            "target_type": e.target_type,
            "target_id": e.target_id,
            "project_id": e.project_id,
            "outcome": e.outcome,
            "details": e.details,
            "request_id": e.request_id,
            "client_ip": e.client_ip,
        }


@dataclass(frozen=True, slots=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    project_id: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class RevokeCounts:
    revoked_count: int
    already_revoked_count: int
    total_tokens: int


RATE_WINDOW_MICROS = 60_000_000  # rpm and tpm count over any rolling 60 s


@dataclass(frozen=True, slots=True)
class Claim:
    """A request counted against ``max_requests``: the count it made, and the quota it was
    counted against (the token's row when counted, which a change may have set since the token
    was read; None when it was lifted)."""

    count: int
    max_requests: int | None

    @property
    def remaining(self) -> int | None:
        return None if self.max_requests is None else self.max_requests - self.count


@dataclass(frozen=True, slots=True)
class RateSlot:
    """The answer of the rpm window: admitted at ``at_micros``, or refused for ``retry_after``."""

    admitted: bool
    at_micros: int = 0  # when the slot was taken (to give it back), epoch microseconds
    retry_after: float = 0.0  # seconds until the oldest request in the window leaves it
    # Refused because the window's last minute is unknown (the Redis holding it lost its data):
    # ``retry_after`` is when that minute is over.
    window_lost: bool = False
    # tpm: room, but answers of the token that went out are not settled yet (see rate_limits.py).
    unsettled: bool = False


@dataclass(frozen=True, slots=True)
class BudgetHold:
    """The answer to a budget reservation."""

    admitted: bool
    held_nanousd: int  # what was reserved (0 when refused)
    # budget - spent - reserved, after this hold (or at the refusal); never negative
    remaining_nanousd: int
    # refused because the spend alone leaves less than the minimum: permanent
    exhausted: bool = False
    # refused because what is held is unknown for this many seconds more (the Redis holding it
    # lost its data): transient
    unknown_for: float = 0.0


@dataclass(frozen=True, slots=True)
class IssueForm:
    """What one rendering of the admin pages' issue form did: the token it issued (None while
    the post that claimed it is issuing), and whether that token's value has been shown."""

    token_id: str | None
    shown: bool


def with_marks(
    room: RateSlot, marks: Iterable[int], now: int, bound: int, upto: int = 0
) -> RateSlot:
    """``room``, ``unsettled`` when it has room and one of the answers marked at ``marks`` (epoch
    microseconds) is younger than ``bound`` (0: none counts) and no younger than ``upto`` (0:
    ``now``), which the answer gives back in ``at_micros`` (see proxy/rate_limits.py)."""
    upto = upto or now
    if room.admitted and bound and any(now - bound < at <= upto for at in marks):
        return RateSlot(True, at_micros=upto, unsettled=True)
    return room


def tpm_room(log: list[tuple[int, int]], now: int, tpm: int) -> RateSlot:
    """Whether a token whose settled ``(at, tokens)`` log is ``log`` may take another request.

    The window is full once the tokens of the last 60 s reach ``tpm``; it has room again when
    enough of the oldest entries have left it.
    """
    recent = [(at, tokens) for at, tokens in log if at > now - RATE_WINDOW_MICROS]
    used = sum(tokens for _, tokens in recent)
    if used < tpm:
        return RateSlot(True)
    for at, tokens in sorted(recent):
        used -= tokens
        if used < tpm:
            return RateSlot(False, retry_after=(at + RATE_WINDOW_MICROS - now) / 1e6)
    return RateSlot(False, retry_after=RATE_WINDOW_MICROS / 1e6)  # unreachable: used reaches 0


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """Requests admitted in this process since the last flush, for tokens without a quota."""

    token_id: str
    requests: int
    last_used_at: datetime


def hour_start(moment: datetime) -> datetime:
    """The start of the UTC clock hour holding ``moment``: the bucket of the usage aggregates."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class UsageRollup:
    """One token's recorded traffic in one clock hour, folded from a batch of events.

    The store adds it to what the row already holds, so batches (and processes) may overlap.
    """

    token_id: str
    project_id: str
    hour: datetime
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    errors: int
    last_used_at: datetime
    cost_nanousd: int = 0


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Usage aggregates summed over a token, a project or a time window."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    errors: int = 0
    last_used_at: datetime | None = None
    cost_nanousd: int = 0

    def to_api(self) -> dict[str, Any]:
        return {
            "cost_usd": usd(self.cost_nanousd),
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "errors": self.errors,
            "last_used_at": isoformat(self.last_used_at),
        }
