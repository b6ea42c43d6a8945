"""Admin-page helpers: an operator's browser reduced to HTTP, with basic auth and CSRF tokens."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from html import unescape
from typing import Any

import pytest
from multidict import CIMultiDictProxy

from tests.conftest import Proxy


def basic(user: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


ADMIN = basic("admin", "admin-secret")
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_HREF = re.compile(r'href="(/admin/[^"#]*)"')


def csrf_token(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "page has no CSRF token"
    return unescape(match.group(1))


def admin_links(html: str) -> set[str]:
    return {unescape(link) for link in _HREF.findall(html)}


@dataclass
class Page:
    status: int
    text: str
    headers: CIMultiDictProxy[str]
    url: str


@dataclass
class AdminPages:
    """Drives the admin pages over HTTP the way a browser without JavaScript would."""

    proxy: Proxy

    async def get(self, path: str, *, auth: dict[str, str] | None = ADMIN) -> Page:
        async with self.proxy.client.get(path, headers=auth) as response:
            return Page(response.status, await response.text(), response.headers, str(response.url))

    async def csrf(self) -> str:
        return csrf_token((await self.get("/admin/projects/new")).text)

    async def post(
        self,
        path: str,
        fields: dict[str, str] | None = None,
        *,
        csrf: str | None = "fresh",
        follow: bool = True,
    ) -> Page:
        data: dict[str, Any] = dict(fields or {})
        if csrf == "fresh":
            data["csrf_token"] = await self.csrf()
        elif csrf is not None:
            data["csrf_token"] = csrf
        async with self.proxy.client.post(
            path, data=data, headers=ADMIN, allow_redirects=follow
        ) as response:
            return Page(response.status, await response.text(), response.headers, str(response.url))

    async def create_project(
        self, name: str = "demo", api_key: str = "sk-upstream-key-1234567890"
    ) -> str:
        page = await self.post("/admin/projects", {"name": name, "api_key": api_key}, follow=False)
        assert page.status == 303, page.text
        location = page.headers["Location"]
        return location.split("/admin/projects/")[1].split("?")[0]

    async def issue_token(self, project_id: str, **fields: str) -> Page:
        fields.setdefault("duration_minutes", "60")
        return await self.post(f"/admin/projects/{project_id}/tokens", fields)


async def crawl(admin: AdminPages, start: str = "/admin/", limit: int = 200) -> dict[str, Page]:
    """Every admin page reachable from ``start`` by following links (GET only, like a visitor)."""
    seen: dict[str, Page] = {}
    queue = [start]
    while queue and len(seen) < limit:
        path = queue.pop()
        if path in seen:
            continue
        page = await admin.get(path)
        seen[path] = page
        queue.extend(link for link in admin_links(page.text) if link not in seen)
    return seen


@pytest.fixture
def admin(proxy: Proxy) -> AdminPages:
    return AdminPages(proxy)
