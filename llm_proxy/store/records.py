"""What both store backends share: the columns a change may touch, and audit details."""

from __future__ import annotations

from dataclasses import replace

from llm_proxy.models import AuditEntry, RevokeCounts

PROJECT_COLUMNS = frozenset(
    {"name", "description", "metadata", "api_key_encrypted", "api_key_masked", "is_active"}
)
TOKEN_COLUMNS = frozenset(
    {
        "is_active",
        "max_requests",
        "revoked_at",
        "rpm",
        "tpm",
        "budget_nanousd",
        "budget_refused_nanousd",
        "allowed_models",
    }
)
# How many forgotten issue-form ids one claim deletes: each claim adds one row, so the table stays
# as small as the forms of the remembered span while no claim does unbounded work.
FORGET_ISSUE_FORMS_AT_ONCE = 100


def check_columns(kind: str, changes: dict[str, object], allowed: frozenset[str]) -> None:
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not a {kind} column: {sorted(unknown)}")


def with_revoke_counts(entry: AuditEntry, counts: RevokeCounts) -> AuditEntry:
    """The audit entry of a bulk revocation, with what it revoked in its details."""
    return replace(
        entry,
        details={
            **entry.details,
            "revoked_count": counts.revoked_count,
            "already_revoked_count": counts.already_revoked_count,
            "total_tokens": counts.total_tokens,
        },
    )
