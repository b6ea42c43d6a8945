"""Redirects after a change (POST → 303 → GET) and the one-line notices they carry."""

from __future__ import annotations

from typing import NoReturn

from aiohttp import web

# A redirect names a notice by code; the text lives here so no page echoes arbitrary query text.
NOTICES = {
    "project_created": "Project created. Its upstream key is stored encrypted and shown masked.",
    "project_updated": "Project saved.",
    "project_activated": "Project activated: its tokens work again.",
    "project_deactivated": "Project deactivated: its tokens are refused from the next request.",
    "project_deleted": "Project deleted; its tokens stopped working at once.",
    "tokens_revoked": "Revoked {n} token(s).",
    "token_revoked": "Token revoked: it is refused from the next request.",
    "quota_updated": "Quota saved.",
}


def see_other(
    request: web.Request, route: str, *, notice: str | None = None, **parts: str
) -> NoReturn:
    """Answer a successful form post with 303 to the page that shows the result."""
    url = request.app.router[route].url_for(**parts)
    if notice is not None:
        code, _, count = notice.partition(":")
        url = url.with_query({"notice": code, **({"n": count} if count else {})})
    raise web.HTTPSeeOther(url)


def notice_text(request: web.Request) -> str | None:
    template = NOTICES.get(request.query.get("notice", ""))
    if template is None:
        return None
    count = request.query.get("n", "")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    known = count.isascii() and count.isdigit() and len(count) < 10
    return template.format(n=int(count) if known else 0)
