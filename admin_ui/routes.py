"""The admin sub-application: basic auth, CSRF checks, HTML error pages, and the route table."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp_jinja2
import structlog
from aiohttp import web

from admin_ui import issuing, overview, projects, tokens
from admin_ui.forms import read_form
from admin_ui.handover import Handovers
from admin_ui.rendering import JINJA, STATIC_DIR, error_page, setup_templates
from admin_ui.security import (
    CSRF_FIELD,
    CSRF_MAX_AGE_SECONDS,
    REALM,
    CsrfSigner,
    check_basic_auth,
    cross_site_reason,
)
from admin_ui.state import ADMIN, AdminState
from llm_proxy import errors, failed_sign_ins
from llm_proxy.client_address import client_address
from llm_proxy.control.operations import Operations
from llm_proxy.crypto import redact_path
from llm_proxy.store.unavailable import DATABASE_ERRORS

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_FORM_BYTES = 64 * 1024

_TITLES = {
    400: "That did not work",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    409: "Already being sent",
    413: "Too much data",
}

# Pages are only ever framed, scripted and styled by themselves.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _unauthorized(request: web.Request) -> web.Response:
    # Rendered without the layout: nothing about the installation is shown before login.
    body = aiohttp_jinja2.render_string("unauthorized.html", request, {}, app_key=JINJA)
    return web.Response(
        status=401,
        text=body,
        content_type="text/html",
        headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
    )


async def _check_csrf(request: web.Request, admin: AdminState) -> str | None:
    headers = request.headers
    cross_site = cross_site_reason(
        headers.get("Sec-Fetch-Site"), headers.get("Origin"), headers.get("Host")
    )
    if cross_site is not None:
        return cross_site
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_FORM_BYTES, request.content_length)
    form = await read_form(request)
    return admin.csrf.verify(form.get(CSRF_FIELD, ""), admin.admin_user)


def _is_static(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    return resource is not None and resource.name == "static"


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    admin = request.app[ADMIN]
    if _is_static(request):
        # The stylesheet and the copy script, the same for every installation: served to anyone,
        # so the sign-in page (401) can be styled too.
        try:
            return await handler(request)
        except OSError:
            # A name the filesystem refuses (too long, say): no such file, as for any other.
            raise web.HTTPNotFound() from None
    # Repeated, the values are one list, which no credential matches (as on the management API).
    supplied = ", ".join(request.headers.getall("Authorization", ())) or None
    if not check_basic_auth(supplied, admin.admin_user, admin.admin_password):
        if supplied:  # (a browser asks first without: the 401 makes it show the sign-in box)
            failed_sign_ins.refused("admin", client_address(request))
        return _unauthorized(request)
    try:
        if request.method == "POST":
            # The root application's client_max_size is the proxy's; a body sent chunked
            # announces no length for _check_csrf to refuse, so the form is also bounded as read.
            request = request.clone(client_max_size=MAX_FORM_BYTES)
            problem = await _check_csrf(request, admin)
            if problem is not None:
                log.warning(
                    "admin.csrf_refused",
                    path=redact_path(request.path),
                    client_ip=client_address(request),
                )
                return error_page(
                    request,
                    403,
                    "Request refused",
                    f"{problem} Nothing was changed. Go back, reload the page and try again.",
                )
        return await handler(request)
    except errors.ProxyError as exc:
        return error_page(request, exc.status, _TITLES.get(exc.status, "Error"), exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_page(
            request,
            exc.status,
            _TITLES.get(exc.status, exc.reason),
            "There is no such page here." if exc.status == 404 else exc.reason,
            headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None,
        )
    except DATABASE_ERRORS as exc:
        # As the management API answers it (503, retry): an outage, not a defect of the page.
        log.error(
            "admin.store_unavailable", method=request.method, path=request.path, error=repr(exc)
        )
        return error_page(
            request,
            503,
            "Database unavailable",
            "The database is unavailable; nothing was changed. Retry shortly.",
            headers={"Retry-After": "1"},
        )


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every request, check CSRF on every post, render failures as pages."""
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as redirect:
        redirect.headers.update(_SECURITY_HEADERS)
        raise
    response.headers.update(_SECURITY_HEADERS)
    if not _is_static(request):
        # Pages show live state (and once, a token value): never serve one from a cache.
        response.headers["Cache-Control"] = "no-store"
    return response


async def _add_slash(request: web.Request) -> web.StreamResponse:
    # A path, not a URL: built from Host and the scheme the server saw, behind a TLS-terminating
    # load balancer it sent the browser to http:// (or to whatever host the request named).
    raise web.HTTPPermanentRedirect(request.path + "/")


def admin_app(
    operations: Operations, *, user: str, password: str, signing_key: bytes
) -> web.Application:
    """The pages, to be mounted with ``app.add_subapp("/admin/", admin_app(...))``.

    ``signing_key`` (with the password) keys the CSRF tokens of the forms.
    """
    app = web.Application(middlewares=[admin_middleware])
    app[ADMIN] = AdminState(
        operations=operations,
        admin_user=user,
        admin_password=password,
        csrf=CsrfSigner(signing_key, password, max_age=CSRF_MAX_AGE_SECONDS),
        handovers=Handovers(signing_key, password),
    )
    setup_templates(app)
    router = app.router
    router.add_get("", _add_slash)
    router.add_get("/", overview.dashboard, name="dashboard")
    router.add_get("/projects", projects.project_list, name="projects")
    router.add_post("/projects", projects.project_create, name="project_create")
    router.add_get("/projects/new", projects.project_new, name="project_new")
    router.add_get("/projects/{project_id}", projects.project_detail, name="project")
    router.add_get("/projects/{project_id}/edit", projects.project_edit, name="project_edit")
    router.add_post("/projects/{project_id}/edit", projects.project_update)
    router.add_post(
        "/projects/{project_id}/activate", projects.project_activate, name="project_activate"
    )
    router.add_post(
        "/projects/{project_id}/deactivate", projects.project_deactivate, name="project_deactivate"
    )
    router.add_get(
        "/projects/{project_id}/revoke-tokens",
        projects.project_revoke_tokens_confirm,
        name="project_revoke_tokens",
    )
    router.add_post("/projects/{project_id}/revoke-tokens", projects.project_revoke_tokens)
    router.add_get(
        "/projects/{project_id}/delete", projects.project_delete_confirm, name="project_delete"
    )
    router.add_post("/projects/{project_id}/delete", projects.project_delete)
    router.add_get("/projects/{project_id}/tokens/new", issuing.token_new, name="token_new")
    router.add_post("/projects/{project_id}/tokens", issuing.token_issue, name="token_issue")
    router.add_get("/tokens", tokens.token_list, name="tokens")
    # GET only: a HEAD would use up the one showing of the value without showing it.
    router.add_get(
        "/tokens/issued/{form_id}", issuing.token_issued, name="token_issued", allow_head=False
    )
    router.add_get("/tokens/{token_id}", tokens.token_detail, name="token")
    router.add_post("/tokens/{token_id}/quota", tokens.token_quota, name="token_quota")
    router.add_get("/tokens/{token_id}/revoke", tokens.token_revoke_confirm, name="token_revoke")
    router.add_post("/tokens/{token_id}/revoke", tokens.token_revoke)
    router.add_get("/audit", overview.audit_log, name="audit")
    router.add_static("/static", STATIC_DIR, name="static", append_version=True)
    return app
