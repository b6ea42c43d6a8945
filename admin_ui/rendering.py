"""Templates, the filters they use, and the one function every page renders through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
import orjson
from aiohttp import web

from admin_ui.navigation import notice_text
from admin_ui.state import state
from llm_proxy.models import NANOS_PER_USD, Token, utcnow

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
JINJA = web.AppKey("admin_ui_jinja", jinja2.Environment)


def span(seconds: float) -> str:
    """A duration as people say it: ``45 s``, ``23 min``, ``3 h 5 min``, ``2 d 4 h``."""
    whole = int(abs(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes = whole // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).isoformat(timespec="seconds")


def ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    delta = (now - moment).total_seconds()
    if abs(delta) < 5:
        return "just now"
    return f"in {span(delta)}" if delta < 0 else f"{span(delta)} ago"


def countdown(token: Token, now: datetime) -> str:
    """``expires in 23 min`` or ``expired 5 min ago``."""
    remaining = (token.expires_at - now).total_seconds()
    if remaining > 0:
        return f"expires in {span(remaining)}"
    return f"expired {span(remaining)} ago"


def quota_percent(token: Token) -> int:
    if not token.max_requests:
        return 0
    return min(100, round(100 * token.request_count / token.max_requests))


def dollars(nanos: int | None) -> str:
    """Money as people read it: ``$12.50``, ``$1,250.00``; a fraction of a cent in full,
    ``$0.000042``, so a small spend never reads as nothing."""
    if nanos is None:
        return "—"
    whole, rest = divmod(nanos, NANOS_PER_USD)
    cent = NANOS_PER_USD // 100
    if rest % cent == 0:
        return f"${whole:,}.{rest // cent:02d}"
    return f"${whole:,}.{rest:09d}".rstrip("0")


def budget_percent(token: Token) -> int:
    if not token.budget_nanousd:
        return 0
    return min(100, round(100 * token.spent_nanousd / token.budget_nanousd))


def rate_limits(token: Token) -> str:
    """``60 rpm · 10,000 tpm``; empty without either."""
    parts = []
    if token.rpm is not None:
        parts.append(f"{token.rpm:,} rpm")
    if token.tpm is not None:
        parts.append(f"{token.tpm:,} tpm")
    return " · ".join(parts)


def json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def setup_templates(app: web.Application) -> None:
    filters: dict[str, Callable[..., str]] = {
        "when": when,
        "iso": iso,
        "span": span,
        "dollars": dollars,
        "json_text": json_text,
    }
    env = aiohttp_jinja2.setup(
        app,
        app_key=JINJA,
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        filters=filters,
    )
    env.globals.update(
        ago=ago,
        countdown=countdown,
        quota_percent=quota_percent,
        budget_percent=budget_percent,
        rate_limits=rate_limits,
    )


def _layout_context(request: web.Request) -> dict[str, Any]:
    """What the layout needs: the admin's name, a fresh CSRF token, the time."""
    admin = state(request)
    return {
        "admin_user": admin.admin_user,
        "csrf_token": admin.csrf.issue(admin.admin_user),
        "now": utcnow(),
        "path": request.path,
        "notice": notice_text(request),
    }


def render(
    request: web.Request,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
) -> web.Response:
    """Render a page, with what the layout needs."""
    return aiohttp_jinja2.render_template(
        template, request, {**_layout_context(request), **context}, app_key=JINJA, status=status
    )


async def render_long(
    request: web.Request, template: str, context: Mapping[str, Any]
) -> web.Response:
    """Render a page whose rows grow with what is stored (every token, or every token of a
    project) in a worker thread: tokens are kept for EXPIRED_TOKEN_RETENTION_DAYS once expired,
    and rendering that many held up the event loop, and every request of this process with it."""
    text = await asyncio.to_thread(
        aiohttp_jinja2.render_string,
        template,
        request,
        {**_layout_context(request), **context},
        app_key=JINJA,
    )
    return web.Response(text=text, content_type="text/html", charset="utf-8")


def error_page(
    request: web.Request,
    status: int,
    title: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    response = render(
        request, "error.html", {"status": status, "title": title, "message": message}, status=status
    )
    response.headers.update(headers or {})
    return response
