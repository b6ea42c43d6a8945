"""The store interface. The proxy path and the management layer depend only on :class:`Store`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from llm_proxy.models import (
    AuditEntry,
    AuditEvent,
    AuditFilter,
    BudgetHold,
    Claim,
    IssueForm,
    Project,
    RateSlot,
    RevokeCounts,
    Token,
    TokenGrant,
    UsageDelta,
    UsageRollup,
    UsageTotals,
)


class Store(Protocol):
    async def close(self) -> None: ...
    async def migrate(self) -> list[int]:
        """Apply the numbered migrations the database lacks; the versions applied. Raises
        :class:`~llm_proxy.store.migrations.SchemaNewerThanRelease`, having changed nothing, when
        the database records migrations this release does not ship and may not serve on (see
        ``migrations.refuse_newer``); applies nothing, with a warning, when it may."""
        ...

    async def ping(self) -> None:
        """Raise when the database does not answer."""
        ...

    # Projects
    async def create_project(self, project: Project, audit: AuditEntry) -> Project: ...
    async def get_project(self, project_id: str) -> Project | None: ...
    async def list_projects(self) -> list[Project]: ...
    async def update_project(
        self,
        project_id: str,
        changes: dict[str, Any],
        audit: AuditEntry,
        *,
        revoke_tokens: bool = False,
    ) -> Project | None:
        """Apply ``changes`` (column → value; ``updated_at`` set by the store) and, with
        ``revoke_tokens``, revoke the project's tokens in the same transaction (their counts in
        ``audit``): none is revoked by a change that fails."""
        ...

    async def delete_project(self, project_id: str, audit: AuditEntry) -> bool: ...
    async def revoke_project_tokens(
        self, project_id: str, audit: AuditEntry | None
    ) -> RevokeCounts:
        """Revoke every active token of the project; ``audit`` None when the caller audits the
        revocation as part of a larger change."""
        ...

    # Tokens
    async def create_token(self, token: Token, token_hash: str, audit: AuditEntry) -> Token: ...
    async def get_token(self, token_id: str) -> Token | None: ...
    async def list_tokens(self, project_id: str | None = None) -> list[Token]: ...
    async def find_token_id_by_hash(self, token_hash: str) -> str | None: ...
    async def grant_for_hash(self, token_hash: str) -> TokenGrant | None: ...
    async def update_token(
        self, token_id: str, changes: dict[str, Any], audit: AuditEntry
    ) -> Token | None: ...

    # Hot-path accounting
    async def consume_request(self, token_id: str, at: datetime) -> Claim | None:
        """Count one request against a quota-carrying token: the count now and the quota it was
        counted against, or None when it was used up or the token is inactive."""
        ...

    async def release_request(self, token_id: str) -> None:
        """Take back a request counted by :meth:`consume_request` that never reached upstream.
        Raises :class:`~llm_proxy.store.unavailable.CommitInDoubt` as :meth:`settle_budgets`."""
        ...

    async def take_rate_slot(self, token_id: str) -> RateSlot:
        """Admit one request into the token's ``rpm`` window (any rolling 60 s), or say how long
        until the window has room. One atomic step, whatever the number of instances."""
        ...

    async def give_back_rate_slot(self, token_id: str, at_micros: int) -> None:
        """Take back a slot of :meth:`take_rate_slot` whose request never reached upstream."""
        ...

    async def tpm_room(self, token_id: str, mark_bound: int = 0, upto: int = 0) -> RateSlot:
        """Whether the token's ``tpm`` window (tokens settled in any rolling 60 s) has room;
        ``unsettled`` when it has but answers marked less than ``mark_bound`` µs ago, and by
        ``upto`` (0: now), are not settled yet (see proxy/rate_limits.py)."""
        ...

    async def mark_answered(self, token_id: str, mark: str, bound: int) -> None:
        """Mark an answer of the token as not settled yet; marks older than ``bound`` µs go."""
        ...

    async def forget_mark(self, token_id: str, mark: str) -> None:
        """Remove an answer's mark (see :meth:`mark_answered`)."""
        ...

    async def record_tokens(self, token_id: str, tokens: int, mark: str = "") -> None:
        """Add a settled request's tokens to the token's ``tpm`` window, removing its answer's
        ``mark`` in the same step."""
        ...

    async def reserve_budget(
        self,
        token_id: str,
        hold_id: str,
        want_nanousd: int,
        minimum_nanousd: int,
        hold_seconds: float,
    ) -> BudgetHold:
        """Hold up to ``want_nanousd`` of the token's budget room (budget - spent - reserved) for
        a request, as hold ``hold_id`` lasting ``hold_seconds``; refused when the room is less
        than ``minimum_nanousd`` (``exhausted`` when the spend alone leaves less). A token without
        a budget, or no longer there, is admitted with no hold. One atomic step on the token's
        row, whatever the number of processes and instances."""
        ...

    async def note_budget_refused(
        self, token_id: str, budget_nanousd: int, minimum_nanousd: int
    ) -> None:
        """Remember that a request needing ``minimum_nanousd`` was refused for good on the token's
        budget of ``budget_nanousd`` (:attr:`Token.budget_refused_nanousd` keeps the least such);
        nothing when the budget changed meanwhile."""
        ...

    async def settle_budget(self, token_id: str, hold_id: str, cost_nanousd: int) -> None:
        """Add a request's cost to the token's spend and drop its hold, in one transaction. With
        ``hold_id`` "" (or a hold already reclaimed) only the cost is added; cost 0 releases."""
        ...

    async def settle_budgets(self, settlements: Sequence[tuple[str, str, int]]) -> None:
        """:meth:`settle_budget` for each ``(token_id, hold_id, cost_nanousd)``, all in one
        transaction: the events pipeline settles a batch at a time. Raises
        :class:`~llm_proxy.store.unavailable.CommitInDoubt` when the transaction may have
        committed although the call failed; any other failure left nothing written."""
        ...

    async def renew_budget_holds(self, hold_ids: Sequence[str], hold_seconds: float) -> None:
        """Have each of ``hold_ids`` still there expire ``hold_seconds`` from now, in one
        statement: the holds of requests this process is still serving (see
        ``proxy/hold_leases.py``). A hold already settled or reclaimed stays gone."""
        ...

    async def reclaim_budget_holds(self) -> int:
        """Return every expired hold (its request never settled: its process died) to its
        token's budget; how many."""
        ...

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        """Add each token's tallied requests to its count, all in one transaction. Raises
        :class:`~llm_proxy.store.unavailable.CommitInDoubt` as :meth:`settle_budgets` does."""
        ...

    # Usage aggregates, written off the request path by the usage dispatcher
    async def add_usage_rollup(self, rows: Sequence[UsageRollup]) -> None:
        """Add each row to its (token, hour) aggregate, all in one transaction."""
        ...

    async def token_usage(self, token_id: str) -> UsageTotals: ...
    async def project_usage(self, project_id: str) -> UsageTotals: ...
    async def project_token_usage(self, project_id: str) -> dict[str, UsageTotals]:
        """Usage of each token of a project that has any, by token id (one grouped query)."""
        ...

    async def usage_since(self, since: datetime) -> UsageTotals:
        """All usage from the start of the clock hour holding ``since`` on."""
        ...

    async def usage_by_hour(
        self, since: datetime, *, project_id: str | None = None, token_id: str | None = None
    ) -> list[tuple[datetime, UsageTotals]]:
        """Usage per clock hour from the hour holding ``since`` on, oldest first: all of it, or
        one project's, or one token's. Hours without any row are left out."""
        ...

    async def prune_usage_hourly(self, before: datetime) -> int:
        """Delete the aggregates of the clock hours before the one holding ``before``; how many
        rows went. The totals above then count only what is left."""
        ...

    async def prune_expired_tokens(self, before: datetime, at_most: int) -> int:
        """Delete tokens that expired before ``before`` (their budget holds with them), at most
        ``at_most`` of them; how many went. Their usage aggregates and audit events stay."""
        ...

    # Change feed: how other processes learn that a cached token went stale.
    async def latest_change(self) -> int: ...
    async def changes_since(self, cursor: int) -> tuple[int, list[tuple[str | None, str | None]]]:
        """The new cursor and the (project id, token id) of each change after ``cursor``; one
        naming neither when the feed's ids started again below the cursor, or when changes after
        the cursor were pruned (anything may have changed)."""
        ...

    async def prune_changes(self, before: datetime, at_most: int) -> int:
        """Delete the oldest changes, made before ``before``, at most ``at_most`` of them; how
        many went. Only the feed's head goes (never a change after one that stays), and never
        the last change of the head that goes (a reader that read it missed nothing, whatever
        gap follows its id), so never the newest change, which keeps the ids going on."""
        ...

    async def listen_changes(self, wake: Callable[[], None], connected: Callable[[], None]) -> None:
        """Push: call ``connected`` once subscribed, then ``wake`` whenever any process commits a
        change, until the channel is lost (raises). A backend without a push channel returns at
        once, and its users follow the polled feed alone."""
        ...

    # One-time ids of the admin pages' issue forms, shared by every process and instance
    async def claim_issue_form(self, form_id: str, remember_seconds: float) -> bool:
        """Claim ``form_id`` for the post about to issue with it: False when another post claimed
        it first (and is issuing, or has issued). One atomic step, whatever the number of
        processes and instances. Ids claimed more than ``remember_seconds`` ago are forgotten, a
        bounded number per call."""
        ...

    async def release_issue_form(self, form_id: str) -> None:
        """The claiming post issued nothing: the form may be sent again."""
        ...

    async def record_issue_form(self, form_id: str, token_id: str) -> None:
        """The claiming post issued ``token_id``."""
        ...

    async def issue_form(self, form_id: str) -> IssueForm | None:
        """What ``form_id`` did; None when it was never claimed, released or forgotten."""
        ...

    async def show_issue_form(self, form_id: str, token_id: str) -> bool:
        """Mark the value of the token ``form_id`` issued as shown: True for the one call that
        marks it first, wherever it runs; False ever after."""
        ...

    # Audit
    async def prune_audit(self, before: datetime, at_most: int) -> int:
        """Delete the oldest audit events, recorded before ``before``, at most ``at_most`` of
        them; how many went."""
        ...

    async def list_audit(
        self, filters: AuditFilter, page: int, page_size: int
    ) -> tuple[list[AuditEvent], int]: ...
