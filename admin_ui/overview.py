"""The dashboard and the audit log."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web

from admin_ui.activity import timelines
from admin_ui.rendering import render
from admin_ui.state import operations
from llm_proxy.control import validation
from llm_proxy.errors import InvalidField
from llm_proxy.models import AuditFilter, utcnow

AUDIT_PAGE_SIZE = 50
AUDIT_TEXT_FILTERS = ("action", "actor", "project_id", "target_id")
# Offered as suggestions in the action filter; any value may be typed.
KNOWN_ACTIONS = (
    "project.create",
    "project.update",
    "project.delete",
    "project.revoke_tokens",
    "token.create",
    "token.update",
    "token.revoke",
)


async def dashboard(request: web.Request) -> web.Response:
    ops = operations(request)
    now = utcnow()
    projects = await ops.list_projects()
    tokens = await ops.list_tokens()
    events, _ = await ops.audit_log(AuditFilter(), 1, 8)
    usage = [
        ("hour", "Last hour", await ops.usage_since(now - timedelta(hours=1))),
        ("day", "Last 24 hours", await ops.usage_since(now - timedelta(hours=24))),
    ]
    recent = sorted(
        (t for t in tokens if t.last_used_at is not None),
        key=lambda t: t.last_used_at or now,
        reverse=True,
    )[:5]
    context: dict[str, Any] = {
        "project_count": len(projects),
        "active_project_count": sum(1 for p in projects if p.is_active),
        "token_count": len(tokens),
        "active_token_count": sum(1 for t in tokens if t.status(now) == "active"),
        "request_count": sum(t.request_count for t in tokens),
        "recent_tokens": recent,
        "names": {p.id: p.name for p in projects},
        "events": events,
        "usage": usage,
        "timelines": await timelines(ops.store, now),
    }
    return render(request, "dashboard.html", context)


def _page_query(values: dict[str, str], page: int) -> dict[str, str]:
    query = {key: value for key, value in values.items() if value}
    if page > 1:
        query["page"] = str(page)
    return query


async def audit_log(request: web.Request) -> web.Response:
    ops = operations(request)
    values = {
        key: request.query.get(key, "").strip() for key in (*AUDIT_TEXT_FILTERS, "since", "until")
    }
    error: InvalidField | None = None
    events: list[Any] = []
    total = 0
    page = 1
    try:
        filters = AuditFilter(
            **{key: values[key] or None for key in AUDIT_TEXT_FILTERS},
            since=validation.timestamp(values["since"], "since"),
            until=validation.timestamp(values["until"], "until"),
        )
        page = validation.query_int(
            request.query.get("page"), "page", default=1, minimum=1, maximum=10**9
        )
    except InvalidField as exc:
        error = exc
    else:
        events, total = await ops.audit_log(filters, page, AUDIT_PAGE_SIZE)
    pages = max(1, -(-total // AUDIT_PAGE_SIZE))
    projects = sorted(await ops.list_projects(), key=lambda p: p.name.casefold())
    return render(
        request,
        "audit.html",
        {
            "values": values,
            "error": error,
            "events": events,
            "total": total,
            "page": page,
            "pages": pages,
            "first_shown": (page - 1) * AUDIT_PAGE_SIZE + 1,
            # From past the last page (an old link, a typed number), "newer" is the last page.
            "previous_query": _page_query(values, min(page - 1, pages)) if page > 1 else None,
            "next_query": _page_query(values, page + 1) if page < pages else None,
            "projects": projects,
            "names": {p.id: p.name for p in projects},
            "actions": KNOWN_ACTIONS,
        },
        status=400 if error else 200,
    )
