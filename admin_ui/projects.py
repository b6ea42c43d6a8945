"""Project pages: list, create, detail, edit, activate/deactivate, revoke all tokens, delete."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from admin_ui import forms
from admin_ui.activity import timelines
from admin_ui.navigation import see_other
from admin_ui.rendering import render, render_long
from admin_ui.state import actor, operations
from llm_proxy.errors import InvalidField
from llm_proxy.models import Project, Token, utcnow


@dataclass(slots=True)
class TokenCounts:
    total: int = 0
    active: int = 0
    requests: int = 0


def count_tokens(tokens: Iterable[Token], now: datetime) -> dict[str, TokenCounts]:
    counts: dict[str, TokenCounts] = {}
    for token in tokens:
        tally = counts.setdefault(token.project_id, TokenCounts())
        tally.total += 1
        tally.requests += token.request_count
        if token.status(now) == "active":
            tally.active += 1
    return counts


async def project_list(request: web.Request) -> web.Response:
    ops = operations(request)
    projects = sorted(await ops.list_projects(), key=lambda p: p.name.casefold())
    counts = count_tokens(await ops.list_tokens(), utcnow())
    return render(
        request,
        "projects.html",
        {"projects": projects, "counts": counts, "empty": TokenCounts()},
    )


async def project_detail(request: web.Request) -> web.Response:
    ops = operations(request)
    project = await ops.get_project(request.match_info["project_id"])
    tokens = sorted(await ops.list_tokens(project.id), key=lambda t: t.created_at, reverse=True)
    now = utcnow()
    counts = count_tokens(tokens, now).get(project.id, TokenCounts())
    return await render_long(
        request,
        "project_detail.html",
        {
            "project": project,
            "tokens": tokens,
            "counts": counts,
            "usage": await ops.project_usage(project.id),
            "token_usage": await ops.project_token_usage(project.id),
            "timelines": await timelines(ops.store, now, project_id=project.id),
        },
    )


def _project_form(
    request: web.Request,
    project: Project | None,
    values: dict[str, str],
    error: InvalidField | None = None,
    *,
    status: int = 400,
    shown: dict[str, str] | None = None,
) -> web.Response:
    """The project form; ``shown``: what its boxes are compared with when it is posted (the
    project as it is now, unless the form being shown again came from an older page)."""
    if shown is None and project is not None:
        shown = {"name": project.name, "description": project.description}
    # The upstream key is never put back into the form: on a validation error it must be retyped.
    return render(
        request,
        "project_form.html",
        {"project": project, "values": values, "error": error, "shown": shown},
        status=status if error else 200,
    )


def _edits(
    form: forms.Form, typed: dict[str, str], project: Project
) -> tuple[dict[str, str], InvalidField | None]:
    """The fields the operator changed from what their page showed (posted back in
    ``shown_<field>``) to something the project does not hold yet; and the first of them that
    someone else changed too since, if any.

    Sent on as they are, the boxes of a page opened before someone else renamed the project
    would put the old name back unseen. A form without ``shown_*`` (not from these pages) sends
    every box that differs, as before.
    """
    edits: dict[str, str] = {}
    conflict: InvalidField | None = None
    for field, current in (("name", project.name), ("description", project.description)):
        value = typed[field]
        if f"shown_{field}" not in form:
            if value != current:
                edits[field] = value
            continue
        posted = {field: form[f"shown_{field}"]}
        shown = forms.name(posted, required=False) if field == "name" else forms.description(posted)
        if value in (shown, current):
            continue
        edits[field] = value
        if current != shown and conflict is None:
            conflict = InvalidField(
                field,
                f"changed since this page was opened; it is now \u201c{current}\u201d. Nothing"
                " was saved: check the project and save again.",
            )
    return edits, conflict


def _project_fields(form: forms.Form, *, key_required: bool) -> tuple[str, str, str]:
    """Name, description and upstream key of a project form (the same checks as the API)."""
    return (
        forms.name(form, required=True),
        forms.description(form),
        forms.upstream_key(form, required=key_required),
    )


def _shown_again(form: forms.Form) -> dict[str, str]:
    # The upstream key is never put back into a page, even one re-rendered after a typo.
    return {"name": form.get("name", ""), "description": form.get("description", "")}


async def project_new(request: web.Request) -> web.Response:
    return _project_form(request, None, {"name": "", "description": ""})


async def project_create(request: web.Request) -> web.Response:
    form = await forms.read_form(request)
    try:
        name, description, api_key = _project_fields(form, key_required=True)
    except InvalidField as exc:
        return _project_form(request, None, _shown_again(form), exc)
    project = await operations(request).create_project(
        actor(request), name=name, api_key=api_key, description=description
    )
    see_other(request, "project", project_id=project.id, notice="project_created")


async def project_edit(request: web.Request) -> web.Response:
    project = await operations(request).get_project(request.match_info["project_id"])
    return _project_form(
        request, project, {"name": project.name, "description": project.description}
    )


async def project_update(request: web.Request) -> web.Response:
    ops = operations(request)
    project = await ops.get_project(request.match_info["project_id"])
    form = await forms.read_form(request)
    try:
        name, description, api_key = _project_fields(form, key_required=False)
    except InvalidField as exc:
        first_shown = {
            field: form[f"shown_{field}"]
            for field in ("name", "description")
            if f"shown_{field}" in form
        }
        return _project_form(request, project, _shown_again(form), exc, shown=first_shown or None)
    # Only what differs is sent, so the audit entry names exactly what changed.
    edits, conflict = _edits(form, {"name": name, "description": description}, project)
    if conflict is not None:
        # The project as it is now, with the boxes the operator changed as they typed them: saved
        # again, having seen it, it applies.
        values = {"name": project.name, "description": project.description, **edits}
        return _project_form(request, project, values, conflict, status=409)
    new_name, new_description = edits.get("name"), edits.get("description")
    new_key = api_key or None  # blank keeps the stored key
    if new_name is not None or new_description is not None or new_key is not None:
        await ops.update_project(
            actor(request),
            project.id,
            name=new_name,
            description=new_description,
            api_key=new_key,
        )
    see_other(request, "project", project_id=project.id, notice="project_updated")


async def _set_active(request: web.Request, is_active: bool) -> web.Response:
    project_id = request.match_info["project_id"]
    await operations(request).update_project(actor(request), project_id, is_active=is_active)
    notice = "project_activated" if is_active else "project_deactivated"
    form = await forms.read_form(request)
    if form.get("back") == "list":
        see_other(request, "projects", notice=notice)
    see_other(request, "project", project_id=project_id, notice=notice)


async def project_activate(request: web.Request) -> web.Response:
    return await _set_active(request, True)


async def project_deactivate(request: web.Request) -> web.Response:
    return await _set_active(request, False)


async def project_revoke_tokens_confirm(request: web.Request) -> web.Response:
    """Ask before revoking every token: a page of its own, so it works without JavaScript."""
    ops = operations(request)
    project = await ops.get_project(request.match_info["project_id"])
    tokens = await ops.list_tokens(project.id)
    counts = count_tokens(tokens, utcnow()).get(project.id, TokenCounts())
    unrevoked = sum(1 for token in tokens if token.is_active)
    return render(
        request,
        "project_revoke_tokens.html",
        {"project": project, "counts": counts, "unrevoked": unrevoked},
    )


async def project_revoke_tokens(request: web.Request) -> web.Response:
    project_id = request.match_info["project_id"]
    counts = await operations(request).revoke_project_tokens(actor(request), project_id)
    see_other(
        request, "project", project_id=project_id, notice=f"tokens_revoked:{counts.revoked_count}"
    )


async def project_delete_confirm(request: web.Request) -> web.Response:
    ops = operations(request)
    project = await ops.get_project(request.match_info["project_id"])
    counts = count_tokens(await ops.list_tokens(project.id), utcnow()).get(
        project.id, TokenCounts()
    )
    return render(request, "project_delete.html", {"project": project, "counts": counts})


async def project_delete(request: web.Request) -> web.Response:
    await operations(request).delete_project(actor(request), request.match_info["project_id"])
    see_other(request, "projects", notice="project_deleted")
