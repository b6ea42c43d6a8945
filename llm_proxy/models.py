"""Records shared by the store, the management API, the admin pages and the token cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def utcnow() -> datetime:
    return datetime.now(UTC)


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

    def status(self, now: datetime) -> str:
        if not self.is_active:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.max_requests is not None and self.request_count >= self.max_requests:
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


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Usage aggregates summed over a token, a project or a time window."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    errors: int = 0
    last_used_at: datetime | None = None

    def to_api(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "errors": self.errors,
            "last_used_at": isoformat(self.last_used_at),
        }
