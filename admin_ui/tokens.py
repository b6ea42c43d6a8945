"""Token pages: issue (value shown once), list, detail with usage, edit quota, revoke."""

from __future__ import annotations

from aiohttp import web

from admin_ui import forms
from admin_ui.navigation import see_other
from admin_ui.rendering import render
from admin_ui.state import actor, operations
from llm_proxy import errors
from llm_proxy.control.operations import MAX_DURATION_MINUTES
from llm_proxy.errors import InvalidField
from llm_proxy.models import Project, Token, utcnow

MAX_REQUESTS_LIMIT = 2**62
STATUSES = ("active", "expired", "revoked", "exhausted")
# Offered in the duration box; any whole number of minutes in range is accepted.
DURATION_PRESETS = (
    (15, "15 minutes"),
    (60, "1 hour"),
    (480, "8 hours"),
    (1440, "1 day"),
    (10080, "7 days"),
    (43200, "30 days"),
)


def _token_form(
    request: web.Request,
    project: Project,
    values: dict[str, str],
    error: errors.ProxyError | None = None,
    status: int = 200,
) -> web.Response:
    return render(
        request,
        "token_new.html",
        {
            "project": project,
            "values": values,
            "error": error,
            "presets": DURATION_PRESETS,
            "max_duration": MAX_DURATION_MINUTES,
        },
        status=status,
    )


async def token_new(request: web.Request) -> web.Response:
    project = await operations(request).get_project(request.match_info["project_id"])
    return _token_form(request, project, {"duration_minutes": "60", "max_requests": ""})


async def token_issue(request: web.Request) -> web.Response:
    """Issue a token and show its value in this response only: no redirect, nothing to reload."""
    ops = operations(request)
    project = await ops.get_project(request.match_info["project_id"])
    form = await forms.read_form(request)
    values = {key: form.get(key, "") for key in ("duration_minutes", "max_requests")}
    try:
        duration = forms.number(
            form, "duration_minutes", minimum=1, maximum=MAX_DURATION_MINUTES, required=True
        )
        max_requests = forms.number(
            form, "max_requests", minimum=1, maximum=MAX_REQUESTS_LIMIT, required=False
        )
    except InvalidField as exc:
        return _token_form(request, project, values, exc, 400)
    assert duration is not None  # required=True
    try:
        issued = await ops.issue_token(
            actor(request),
            project_id=project.id,
            duration_minutes=duration,
            max_requests=max_requests,
        )
    except errors.ProjectInactive:
        problem = errors.ProjectInactive(
            "This project is inactive. Activate it before issuing tokens for it."
        )
        return _token_form(request, project, values, problem, 403)
    response = render(
        request,
        "token_issued.html",
        {
            "project": project,
            "token": issued.token,
            "value": issued.value,
            "base_url": f"{request.url.origin()}/v1",
        },
        status=201,
    )
    response.headers["Cache-Control"] = "no-store"
    return response


async def token_list(request: web.Request) -> web.Response:
    ops = operations(request)
    status = request.query.get("status", "")
    now = utcnow()
    tokens = [
        token
        for token in await ops.list_tokens()
        if status not in STATUSES or token.status(now) == status
    ]
    tokens.sort(key=lambda t: t.created_at, reverse=True)
    names = {project.id: project.name for project in await ops.list_projects()}
    return render(
        request,
        "tokens.html",
        {"tokens": tokens, "names": names, "status": status, "statuses": STATUSES},
    )


async def _token_page(
    request: web.Request, token: Token, error: InvalidField | None = None, quota: str = ""
) -> web.Response:
    ops = operations(request)
    # Tokens go with their project (ON DELETE CASCADE), so a token always has one.
    project = await ops.get_project(token.project_id)
    usage = await ops.token_usage(token.id)
    return render(
        request,
        "token_detail.html",
        {"token": token, "project": project, "usage": usage, "error": error, "quota": quota},
        status=400 if error else 200,
    )


async def token_detail(request: web.Request) -> web.Response:
    token = await operations(request).get_token(request.match_info["token_id"])
    quota = "" if token.max_requests is None else str(token.max_requests)
    return await _token_page(request, token, quota=quota)


async def token_quota(request: web.Request) -> web.Response:
    """Set or clear (blank) the request quota."""
    ops = operations(request)
    token = await ops.get_token(request.match_info["token_id"])
    form = await forms.read_form(request)
    try:
        max_requests = forms.number(
            form, "max_requests", minimum=1, maximum=MAX_REQUESTS_LIMIT, required=False
        )
    except InvalidField as exc:
        return await _token_page(request, token, exc, form.get("max_requests", ""))
    await ops.update_token(
        actor(request),
        token.id,
        max_requests=max_requests,
        clear_max_requests=max_requests is None,
    )
    see_other(request, "token", token_id=token.id, notice="quota_updated")


async def token_revoke(request: web.Request) -> web.Response:
    token = await operations(request).revoke_token(actor(request), request.match_info["token_id"])
    see_other(request, "token", token_id=token.id, notice="token_revoked")
