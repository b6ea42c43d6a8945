"""Admin-page helpers: an operator's browser reduced to HTTP, with basic auth and CSRF tokens."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDictProxy
from playwright.async_api import Browser, BrowserContext, async_playwright
from playwright.async_api import Page as BrowserPage

from tests.conftest import Proxy


def basic(user: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


ADMIN = basic("admin", "admin-secret")
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_ISSUE_ID = re.compile(r'name="issue_id" value="([^"]+)"')
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

    async def issue_form(self, project_id: str) -> dict[str, str]:
        """The hidden fields of a fresh issue form: its CSRF token and its one-time id."""
        page = await self.get(f"/admin/projects/{project_id}/tokens/new")
        match = _ISSUE_ID.search(page.text)
        assert match, "the issue form has no one-time id"
        return {"csrf_token": csrf_token(page.text), "issue_id": match.group(1)}

    async def issue_token(self, project_id: str, **fields: str) -> Page:
        """Fill in a fresh issue form and send it, following the redirect to the value's page."""
        fields.setdefault("duration_minutes", "60")
        form = await self.issue_form(project_id)
        return await self.post(
            f"/admin/projects/{project_id}/tokens", {**form, **fields}, csrf=None
        )


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


# -- a real browser: Playwright driving Debian's chromium ----------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WIDE = 1280
PHONE = 390  # an iPhone 12 to 15, held upright

OpenPage = Callable[..., Awaitable[BrowserPage]]


@pytest.fixture
def chromium() -> Path:
    # A missing browser is a failure, not a skip: `make test` installs it (scripts/ensure-services.sh).
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing; install Debian's chromium package"
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        yield browser
        await browser.close()


@pytest.fixture
async def open_page(browser: Browser, proxy: Proxy) -> AsyncIterator[OpenPage]:
    """A new browser tab on the proxy: ``width`` wide, with or without JavaScript, signed in as
    the admin unless ``signed_in`` is False."""
    contexts: list[BrowserContext] = []

    async def new_page(
        width: int = WIDE, *, javascript: bool = True, signed_in: bool = True
    ) -> BrowserPage:
        context = await browser.new_context(
            base_url=proxy.base_url,
            # A stranger types a wrong password (with none at all, chromium gives up on the
            # challenge and shows no page).
            http_credentials={
                "username": "admin",
                "password": "admin-secret" if signed_in else "not-the-password",
            },
            viewport={"width": width, "height": 800},
            java_script_enabled=javascript,
            permissions=["clipboard-read", "clipboard-write"] if javascript else [],
        )
        contexts.append(context)
        return await context.new_page()

    yield new_page
    for context in contexts:
        await context.close()
