"""The whole token lifecycle in a real browser: Playwright driving Debian's chromium."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from tests.conftest import Proxy

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
# `make screenshots` refreshes the committed pictures; a plain test run writes to a temp folder so
# that testing never changes tracked files.
DOC_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}

pytestmark = [pytest.mark.browser, pytest.mark.process]


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = DOC_SCREENSHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
async def page(browser: Browser, proxy: Proxy) -> AsyncIterator[Page]:
    context = await browser.new_context(
        base_url=proxy.base_url,
        http_credentials={"username": "admin", "password": "admin-secret"},
        viewport=VIEWPORT,
        permissions=["clipboard-read", "clipboard-write"],
    )
    page = await context.new_page()
    yield page
    await context.close()


async def _seed(proxy: Proxy) -> None:
    """Another project with some history, so the pages look like a proxy in use."""
    project_id = await proxy.create_project("support-bot", "sk-support-" + "x" * 40)
    for minutes, quota in ((240, 500), (15, None)):
        token = await proxy.token(project_id=project_id, minutes=minutes, max_requests=quota)
        for _ in range(3):
            response = await proxy.client.get(
                "/v1/models", headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status == 200
            response.release()


async def _shot(page: Page, folder: Path, name: str) -> None:
    await page.screenshot(path=str(folder / f"{name}.png"))


async def _proxy_status(proxy: Proxy, token: str) -> int:
    async with proxy.client.get(
        "/v1/models", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        await response.read()
        return response.status


async def test_operator_runs_the_token_lifecycle_in_a_browser(
    page: Page, proxy: Proxy, screenshots: Path
) -> None:
    await _seed(proxy)

    await page.goto("/admin/")
    await expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()

    # Create a project; the key is typed once and shown masked from then on.
    upstream_key = "sk-browser-upstream-" + "k" * 32
    await page.get_by_role("navigation").get_by_role("link", name="Projects").click()
    await page.get_by_role("link", name="New project").click()
    await page.get_by_label("Name").fill("checkout-assistant")
    await page.get_by_label("Description").fill("Answers questions on the checkout page.")
    await page.get_by_label("Upstream API key").fill(upstream_key)
    await page.get_by_role("button", name="Create project").click()
    await expect(page.get_by_role("status")).to_contain_text("Project created")
    await expect(page.get_by_role("heading", name=re.compile("checkout-assistant"))).to_be_visible()
    assert upstream_key not in await page.content()
    project_url = page.url

    # Issue a token and read its value, once.
    await page.get_by_role("link", name="Issue token").first.click()
    await page.get_by_label("Lifetime (minutes)").fill("30")
    await page.get_by_role("button", name="Issue token").click()
    await expect(page.get_by_role("heading", name="Token issued")).to_be_visible()
    token = await page.locator("#token-value").input_value()
    assert token.startswith("sk-")
    await expect(page.locator("#sdk-snippet")).to_contain_text(
        f'OpenAI(base_url="{proxy.base_url}/v1", api_key="{token}")'
    )
    # The copy button (the pages' only script) puts the value on the clipboard.
    await page.get_by_role("button", name="Copy", exact=True).click()
    await expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert await page.evaluate("navigator.clipboard.readText()") == token
    await _shot(page, screenshots, "token-issued")

    # The application uses it through the proxy.
    for _ in range(2):
        assert await _proxy_status(proxy, token) == 200

    await page.get_by_role("link", name="Token details").click()
    await expect(page.locator("#request-count")).to_have_text("2")
    assert token not in await page.content()

    # Give it limits, then revoke it; the next request is refused.
    await page.get_by_label("Maximum requests").fill("100")
    await page.get_by_label("Budget in US dollars").fill("2.50")
    await page.get_by_label("Allowed models").fill("gpt-4o-mini, gpt-4.1*")
    await page.get_by_role("button", name="Save limits").click()
    await expect(page.get_by_role("status")).to_contain_text("Quota saved")
    await expect(page.locator(".stat .hint").first).to_contain_text("of 100 allowed")
    await expect(page.locator("#budget-usd")).to_have_text("$2.50")
    await expect(page.locator("#allowed-models")).to_have_text("gpt-4o-mini, gpt-4.1*")
    await _shot(page, screenshots, "token-detail")
    await page.get_by_role("button", name="Revoke token").click()
    await expect(page.get_by_role("status")).to_contain_text("Token revoked")
    await expect(page.locator("h1 .badge")).to_have_text("revoked")
    assert await _proxy_status(proxy, token) == 401

    # The project page lists it with its status and usage.
    await page.goto(project_url)
    await expect(page.locator("#tokens tbody tr")).to_have_count(1)
    await expect(page.locator("#tokens tbody tr").first).to_contain_text("revoked")
    await _shot(page, screenshots, "project-detail")

    # The audit log shows the revocation, by the admin.
    await page.get_by_role("link", name="Audit log").click()
    await page.get_by_label("Action").fill("token.revoke")
    await page.get_by_role("button", name="Filter").click()
    row = page.locator("tbody tr").first
    await expect(row).to_contain_text("token.revoke")
    await expect(row).to_contain_text("admin")
    await expect(row).to_contain_text("checkout-assistant")
    await page.get_by_role("link", name="Reset").click()
    await _shot(page, screenshots, "audit")

    await page.get_by_role("navigation").get_by_role("link", name="Projects").click()
    await expect(page.locator("tbody tr")).to_have_count(2)
    await _shot(page, screenshots, "projects")
    await page.get_by_role("navigation").get_by_role("link", name="Dashboard").click()
    await expect(page.locator("#stat-projects")).to_have_text("2")
    await _shot(page, screenshots, "dashboard")
    assert token not in await page.content()
