"""Management operations shared by the management API and the admin pages.

Each operation changes the store (which writes the audit event in the same transaction) and then
evicts what the token cache of this process holds, so the change applies to the very next request.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypedDict

import structlog

from llm_proxy import errors
from llm_proxy.crypto import (
    KeyCipher,
    hash_token,
    is_token_shaped,
    mask_key,
    new_token_value,
    redact,
)
from llm_proxy.models import (
    AuditEntry,
    AuditEvent,
    AuditFilter,
    Project,
    RevokeCounts,
    Token,
    UsageTotals,
    hour_start,
    nanousd,
    usd,
    utcnow,
)
from llm_proxy.proxy.admission import TokenAuthority
from llm_proxy.store import Store
from llm_proxy.store.unavailable import FOREIGN_KEY_REFUSALS

log = structlog.get_logger(__name__)

MAX_DURATION_MINUTES = 525_600
# What a token may carry, checked where a request enters (API, pages) and published in the OpenAPI
# document. Counts stay well inside a signed 64-bit column.
MAX_COUNT = 2**62
MAX_BUDGET_USD = 1_000_000
MAX_ALLOWED_MODELS = 100
MAX_MODEL_PATTERN_LENGTH = 200
MAX_TOKEN_METADATA_BYTES = 16 * 1024


def _quoted(identifier: str) -> str:
    """An id given by a caller, quoted for a message; masked when it is a token's value or a key
    pasted where an id goes, since a message must never carry a secret (SPEC §6)."""
    if is_token_shaped(identifier):
        return f"{mask_key(identifier)!r} (a token's value, not an id)"
    return repr(redact(identifier))


class LimitChanges(TypedDict, total=False):
    """Limits of a token to change: a limit given as None is cleared, one left out is kept."""

    max_requests: int | None
    rpm: int | None
    tpm: int | None
    budget_usd: float | None
    allowed_models: Sequence[str] | None


def _storable(field_value: str) -> str:
    """A header value as text a database stores: the bytes of a field that are not UTF-8 come
    decoded as lone surrogates (surrogateescape), which neither backend can encode; each becomes
    U+FFFD, and the rest of the value is kept."""
    return field_value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asked for a change, for the audit log."""

    name: str
    request_id: str | None = None
    client_ip: str | None = None

    def entry(
        self,
        action: str,
        target_type: str,
        target_id: str | None,
        project_id: str | None = None,
        **details: Any,
    ) -> AuditEntry:
        return AuditEntry(
            actor=self.name,
            action=action,
            target_type=target_type,
            target_id=target_id,
            project_id=project_id,
            details=details,
            # The caller's X-Request-ID, which may be a key filled in by mistake: the audit log
            # is shown whole (API, pages), so masked as an event's request_id is.
            request_id=None if self.request_id is None else redact(_storable(self.request_id)),
            client_ip=self.client_ip,
        )


@dataclass(frozen=True, slots=True)
class UsageWindow:
    """Usage since ``since``: the start of a clock hour, the granularity of the aggregates."""

    since: datetime
    totals: UsageTotals


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: Token
    value: str  # shown once, never stored


class Operations:
    def __init__(self, store: Store, cipher: KeyCipher, authority: TokenAuthority) -> None:
        self.store = store
        self._cipher = cipher
        self._authority = authority

    # -- projects ------------------------------------------------------------------------------

    async def create_project(
        self,
        actor: Actor,
        *,
        name: str,
        api_key: str,
        description: str = "",
        metadata: dict[str, Any] | None = None,
    ) -> Project:
        now = utcnow()
        project = Project(
            id=str(uuid.uuid4()),
            name=name,
            description=description,
            metadata=metadata or {},
            is_active=True,
            created_at=now,
            updated_at=now,
            api_key_masked=mask_key(api_key),
            api_key_encrypted=self._cipher.encrypt(api_key),
        )
        entry = actor.entry("project.create", "project", project.id, project.id, name=name)
        return await self.store.create_project(project, entry)

    async def get_project(self, project_id: str) -> Project:
        project = await self.store.get_project(project_id)
        if project is None:
            raise errors.ProjectNotFound(f"No project with id {_quoted(project_id)}.")
        return project

    async def list_projects(self) -> list[Project]:
        return await self.store.list_projects()

    async def update_project(
        self,
        actor: Actor,
        project_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        api_key: str | None = None,
        is_active: bool | None = None,
        revoke_tokens: bool = False,
    ) -> Project:
        changes: dict[str, Any] = {}
        if name is not None:
            changes["name"] = name
        if description is not None:
            changes["description"] = description
        if metadata is not None:
            changes["metadata"] = metadata
        if is_active is not None:
            changes["is_active"] = is_active
        if api_key is not None:
            changes["api_key_encrypted"] = self._cipher.encrypt(api_key)
            changes["api_key_masked"] = mask_key(api_key)
        if not changes and revoke_tokens:
            # Only revoke_tokens was asked for: that is one change, audited once.
            unchanged = await self.get_project(project_id)
            await self.revoke_project_tokens(actor, project_id)
            return unchanged
        # Nothing at all (revoke_tokens false alone) is still a PATCH accepted, audited once
        # like every other (SPEC §5), as a token PATCH giving today's values is.
        # The audit trail names what changed, never the key itself.
        changed = sorted(k for k in changes if k != "api_key_masked")
        changed = ["api_key" if k == "api_key_encrypted" else k for k in changed]
        details: dict[str, Any] = {"changed": changed}
        if is_active is not None:
            details["is_active"] = is_active
        entry = actor.entry("project.update", "project", project_id, project_id, **details)
        # One call, one audit event (SPEC §5): the update's, with what was revoked; one
        # transaction, so that a change that fails revokes nothing either.
        project = await self.store.update_project(
            project_id, changes, entry, revoke_tokens=revoke_tokens
        )
        if project is None:
            raise errors.ProjectNotFound(f"No project with id {_quoted(project_id)}.")
        await self._authority.changed(project_id=project_id)
        return project

    async def delete_project(self, actor: Actor, project_id: str) -> None:
        entry = actor.entry("project.delete", "project", project_id, project_id)
        token_ids = [token.id for token in await self.store.list_tokens(project_id)]
        if not await self.store.delete_project(project_id, entry):
            raise errors.ProjectNotFound(f"No project with id {_quoted(project_id)}.")
        await self._authority.changed(project_id=project_id)
        try:
            await self._authority.budget_ledger.forget(token_ids)
        except Exception as exc:  # they expire a day after their tokens would have
            log.warning("manage.budget_forget_failed", tokens=len(token_ids), error=str(exc))

    async def revoke_project_tokens(self, actor: Actor, project_id: str) -> RevokeCounts:
        await self.get_project(project_id)
        entry = actor.entry("project.revoke_tokens", "project", project_id, project_id)
        counts = await self.store.revoke_project_tokens(project_id, entry)
        await self._authority.changed(project_id=project_id)
        return counts

    # -- tokens --------------------------------------------------------------------------------

    async def issue_token(
        self,
        actor: Actor,
        *,
        project_id: str,
        duration_minutes: int,
        max_requests: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        budget_usd: float | None = None,
        allowed_models: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> IssuedToken:
        project = await self.get_project(project_id)
        if not project.is_active:
            raise errors.ProjectInactive("Cannot issue a token for an inactive project.")
        now = utcnow()
        value = new_token_value()
        token = Token(
            id=str(uuid.uuid4()),
            project_id=project_id,
            expires_at=now + timedelta(minutes=duration_minutes),
            is_active=True,
            request_count=0,
            max_requests=max_requests,
            created_at=now,
            last_used_at=None,
            rpm=rpm,
            tpm=tpm,
            budget_nanousd=None if budget_usd is None else nanousd(budget_usd),
            allowed_models=None if allowed_models is None else tuple(allowed_models),
            metadata=metadata or {},
        )
        # The limits as stored (the budget in whole nano-dollars). Not the metadata: it may be
        # large, and the token the entry names keeps it.
        entry = actor.entry(
            "token.create",
            "token",
            token.id,
            project_id,
            duration_minutes=duration_minutes,
            max_requests=max_requests,
            rpm=rpm,
            tpm=tpm,
            budget_usd=usd(token.budget_nanousd),
            allowed_models=None if allowed_models is None else list(allowed_models),
        )
        try:
            await self.store.create_token(token, hash_token(value), entry)
        except FOREIGN_KEY_REFUSALS:
            # The project deleted since it was read: its tokens' foreign key refuses the row.
            # That is the caller's 404, not a database outage. Asked only when the database
            # answered: after a timeout, a database that hangs would hold the 503 another one.
            if await self.store.get_project(project_id) is None:
                raise errors.ProjectNotFound(f"No project with id {_quoted(project_id)}.") from None
            raise
        return IssuedToken(token, value)

    async def get_token(self, token_id: str) -> Token:
        # Counts of unlimited tokens are tallied in memory; write them so the answer is current.
        await self._authority.flush_usage()
        token = await self.store.get_token(token_id)
        if token is None:
            raise errors.TokenIdNotFound(f"No token with id {_quoted(token_id)}.")
        return await self._with_ledger(token)

    async def list_tokens(self, project_id: str | None = None) -> list[Token]:
        await self._authority.flush_usage()
        return await self._with_ledgers(await self.store.list_tokens(project_id))

    async def _with_ledger(self, token: Token) -> Token:
        return (await self._with_ledgers([token]))[0]

    async def _with_ledgers(self, tokens: list[Token]) -> list[Token]:
        """The tokens as their budget ledger sees them: with Redis, holds live only there and
        spend reaches the database after Redis, so the rows alone would show nothing reserved."""
        budgeted = [token.id for token in tokens if token.budget_nanousd is not None]
        if not budgeted:
            return tokens
        try:
            known = await self._authority.budget_ledger.spent_and_held_many(budgeted)
        except Exception as exc:  # an unreachable Redis leaves the database's view, not an error
            log.warning("manage.budget_status_failed", tokens=len(budgeted), error=str(exc))
            return tokens
        return [
            replace(token, spent_nanousd=ledger[0], reserved_nanousd=ledger[1])
            if (ledger := known.get(token.id)) is not None
            else token
            for token in tokens
        ]

    async def update_token(
        self,
        actor: Actor,
        token_id: str,
        *,
        is_active: bool | None = None,
        limits: LimitChanges | None = None,
    ) -> Token:
        limits = limits or {}
        current = await self.get_token(token_id)
        changes: dict[str, Any] = {}
        # The audit entry names what changed and its new value, in the API's terms.
        details: dict[str, Any] = {}
        if is_active is not None:
            changes["is_active"] = is_active
            changes["revoked_at"] = None if is_active else (current.revoked_at or utcnow())
            details["is_active"] = is_active
        if "max_requests" in limits:
            changes["max_requests"] = details["max_requests"] = limits["max_requests"]
        if "rpm" in limits:
            changes["rpm"] = details["rpm"] = limits["rpm"]
        if "tpm" in limits:
            changes["tpm"] = details["tpm"] = limits["tpm"]
        if "budget_usd" in limits:
            budget = limits["budget_usd"]
            changes["budget_nanousd"] = None if budget is None else nanousd(budget)
            details["budget_usd"] = usd(changes["budget_nanousd"])
            if changes["budget_nanousd"] != current.budget_nanousd:
                # What was refused on the old budget says nothing of the new one.
                changes["budget_refused_nanousd"] = None
        if "allowed_models" in limits:
            models = limits["allowed_models"]
            changes["allowed_models"] = details["allowed_models"] = (
                None if models is None else list(models)
            )
        entry = actor.entry(
            "token.update",
            "token",
            token_id,
            current.project_id,
            changed=sorted(details),
            **details,
        )
        token = await self.store.update_token(token_id, changes, entry)
        if token is None:
            raise errors.TokenIdNotFound(f"No token with id {_quoted(token_id)}.")
        await self._authority.changed(token_id=token_id)
        return await self._with_ledger(token)

    async def revoke_token(self, actor: Actor, token_id: str) -> Token:
        current = await self.get_token(token_id)
        if not current.is_active:
            # Nothing changes, but the call is audited like every other (SPEC §5).
            entry = actor.entry(
                "token.revoke", "token", token_id, current.project_id, already_revoked=True
            )
            await self.store.update_token(token_id, {}, entry)
            return current
        entry = actor.entry("token.revoke", "token", token_id, current.project_id)
        token = await self.store.update_token(
            token_id, {"is_active": False, "revoked_at": utcnow()}, entry
        )
        await self._authority.changed(token_id=token_id)
        return token or current

    async def revoke_token_by_value(self, actor: Actor, value: str) -> Token:
        token_id = (
            await self.store.find_token_id_by_hash(hash_token(value))
            if is_token_shaped(value)
            else None
        )
        if token_id is None:
            raise errors.TokenIdNotFound("No token with that value.")
        return await self.revoke_token(actor, token_id)

    # -- usage aggregates ----------------------------------------------------------------------
    # Counted from the events, off the request path: a request shows up here a fraction of a
    # second after it was answered. ``request_count`` of a token is its quota counter, not this.

    async def token_usage(self, token_id: str) -> UsageTotals:
        return await self.store.token_usage(token_id)

    async def project_usage(self, project_id: str) -> UsageTotals:
        return await self.store.project_usage(project_id)

    async def project_token_usage(self, project_id: str) -> dict[str, UsageTotals]:
        return await self.store.project_token_usage(project_id)

    async def usage_since(self, since: datetime) -> UsageWindow:
        """All usage from the clock hour holding ``since`` on: "the last hour" seen at 14:20 is
        what happened since 13:00."""
        start = hour_start(since)
        return UsageWindow(start, await self.store.usage_since(start))

    # -- audit ---------------------------------------------------------------------------------

    async def audit_log(
        self, filters: AuditFilter, page: int, page_size: int
    ) -> tuple[list[AuditEvent], int]:
        return await self.store.list_audit(filters, page, page_size)
