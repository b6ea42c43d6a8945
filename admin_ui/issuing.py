"""Issuing a token from the pages: the form, its post, and the one page that shows the value.

Post/redirect/get: the post issues and answers 303 to the page showing the value, which a reload
cannot show again; a form posted twice issues one token, whichever processes and instances the
posts reach (see :mod:`admin_ui.handover`).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from admin_ui import forms
from admin_ui.handover import (
    COOKIE,
    FORM_FIELD,
    HANDOVER_SECONDS,
    REMEMBER_SECONDS,
    Handed,
    is_form_id,
    new_form_id,
)
from admin_ui.rendering import render
from admin_ui.state import actor, operations, state
from admin_ui.tokens import LIMIT_FIELDS, read_limits, read_metadata
from llm_proxy import errors
from llm_proxy.control.operations import MAX_DURATION_MINUTES
from llm_proxy.errors import InvalidField
from llm_proxy.models import Project

# Offered in the duration box; any whole number of minutes in range is accepted.
DURATION_PRESETS = (
    (15, "15 minutes"),
    (60, "1 hour"),
    (480, "8 hours"),
    (1440, "1 day"),
    (10080, "7 days"),
    (43200, "30 days"),
)
ISSUE_FIELDS = ("duration_minutes", *LIMIT_FIELDS, "metadata")
# A form posted again while its first post is still issuing waits this long for that to finish,
# asking the store every REPEAT_POLL_SECONDS (the first post may be on another process).
REPEAT_WAIT_SECONDS = 5.0
REPEAT_POLL_SECONDS = 0.05


class StaleForm(errors.ProxyError):
    """The post carried no one-time form id: a form from before it had one, or not a form."""

    status = 400
    code = "stale_form"


class FormInFlight(errors.ProxyError):
    """The same form is still being issued by its first post."""

    status = 409
    code = "form_in_flight"


def _token_form(
    request: web.Request,
    project: Project,
    values: dict[str, str],
    form_id: str,
    error: errors.ProxyError | None = None,
    status: int = 200,
) -> web.Response:
    return render(
        request,
        "token_new.html",
        {
            "project": project,
            "values": values,
            "form_id": form_id,
            "error": error,
            "presets": DURATION_PRESETS,
            "max_duration": MAX_DURATION_MINUTES,
        },
        status=status,
    )


async def token_new(request: web.Request) -> web.Response:
    project = await operations(request).get_project(request.match_info["project_id"])
    values = dict.fromkeys(ISSUE_FIELDS, "")
    values["duration_minutes"] = "60"
    return _token_form(request, project, values, new_form_id())


def _to_value_page(request: web.Request, form_id: str, sealed: str | None) -> web.HTTPSeeOther:
    url = request.app.router["token_issued"].url_for(form_id=form_id)
    redirect = web.HTTPSeeOther(url)
    if sealed is not None:
        redirect.set_cookie(
            COOKIE,
            sealed,
            path=url.path,
            max_age=HANDOVER_SECONDS,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
    return redirect


async def _repeated(request: web.Request, form_id: str) -> web.HTTPSeeOther | None:
    """A form posted again: where its first post went, once that has finished; None when the
    first post issued nothing (the form may issue now), and it is claimed for this post."""
    store = operations(request).store
    handovers = state(request).handovers
    deadline = asyncio.get_running_loop().time() + REPEAT_WAIT_SECONDS
    while not await store.claim_issue_form(form_id, REMEMBER_SECONDS):
        earlier = await store.issue_form(form_id)
        if earlier is not None and earlier.token_id is not None:
            # The value again only when this process has it and no page has shown it yet.
            sealed = None if earlier.shown else handovers.resendable(form_id)
            return _to_value_page(request, form_id, sealed)
        if asyncio.get_running_loop().time() > deadline:
            raise FormInFlight(
                "This form is still being sent. Open the project's page to see the token it issued."
            )
        await asyncio.sleep(REPEAT_POLL_SECONDS)
    return None


async def token_issue(request: web.Request) -> web.Response:
    """Issue a token, then redirect to the one page that shows its value."""
    ops = operations(request)
    project = await ops.get_project(request.match_info["project_id"])
    form = await forms.read_form(request)
    values = {key: form.get(key, "") for key in ISSUE_FIELDS}
    form_id = form.get(FORM_FIELD, "")
    if not is_form_id(form_id):
        stale = StaleForm(
            "This form is out of date, so nothing was issued. Check it and send it again."
        )
        return _token_form(request, project, values, new_form_id(), stale, 400)
    try:
        duration = forms.number(
            form, "duration_minutes", minimum=1, maximum=MAX_DURATION_MINUTES, required=True
        )
        limits = read_limits(form)
        metadata = read_metadata(form, "metadata")
    except InvalidField as exc:
        return _token_form(request, project, values, form_id, exc, 400)
    assert duration is not None  # required=True
    if (earlier := await _repeated(request, form_id)) is not None:
        raise earlier
    admin = state(request)
    try:
        issued = await ops.issue_token(
            actor(request),
            project_id=project.id,
            duration_minutes=duration,
            **limits,
            metadata=metadata,
        )
    except errors.ProjectInactive:
        await ops.store.release_issue_form(form_id)
        problem = errors.ProjectInactive(
            "This project is inactive. Activate it before issuing tokens for it."
        )
        return _token_form(request, project, values, form_id, problem, 403)
    except BaseException:
        await ops.store.release_issue_form(form_id)
        raise
    # Sealed (and kept for a repeated post) before it is recorded: a repeated post to this
    # process that finds the record finds the sealed value too.
    sealed = admin.handovers.finish(
        form_id, Handed(issued.token.id, project.id, issued.value), admin.admin_user
    )
    await ops.store.record_issue_form(form_id, issued.token.id)
    raise _to_value_page(request, form_id, sealed)


async def token_issued(request: web.Request) -> web.Response:
    """The issued token's value, shown on the first visit only; the cookie it came in is
    cleared."""
    form_id = request.match_info["form_id"]
    if not is_form_id(form_id):
        raise web.HTTPNotFound()
    admin = state(request)
    ops = operations(request)
    sealed = request.cookies.get(COOKIE, "")
    handed = admin.handovers.open(sealed, form_id, admin.admin_user) if sealed else None
    # Marked shown in the store before it is shown, so that of the pages asked with the cookie,
    # on any process, one shows the value.
    if handed is not None and await ops.store.show_issue_form(form_id, handed.token_id):
        response = render(
            request,
            "token_issued.html",
            {
                "project": await ops.get_project(handed.project_id),
                "token": await ops.get_token(handed.token_id),
                "value": handed.value,
                "base_url": f"{_origin(request)}/v1",
            },
        )
    else:
        issued = await ops.store.issue_form(form_id)
        response = await _already_shown(request, None if issued is None else issued.token_id)
    response.del_cookie(COOKIE, path=request.path)
    return response


def _origin(request: web.Request) -> str:
    """Where the browser reached this server. Behind a TLS-terminating load balancer the server
    sees http, so a snippet built from that told the application to send its token in the clear;
    the balancer names the browser's scheme in X-Forwarded-Proto (compose's nginx sets it).
    Believing the header is safe here: the page is shown only to whoever sent it. The Host is
    shown as sent, not parsed into a URL: one yarl refuses ("a:b:c") raised after the value was
    marked shown, and the value was lost."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    scheme = forwarded if forwarded in ("http", "https") else request.scheme
    return f"{scheme}://{request.host}"


async def _already_shown(request: web.Request, token_id: str | None) -> web.Response:
    token = None
    if token_id is not None:
        try:
            token = await operations(request).get_token(token_id)
        except errors.TokenIdNotFound:
            token = None
    return render(
        request,
        "token_gone.html",
        {"token": token, "handover_seconds": HANDOVER_SECONDS},
        status=410,
    )
