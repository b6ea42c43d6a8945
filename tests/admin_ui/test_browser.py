"""The whole token lifecycle in a real browser: Playwright driving Debian's chromium.

`make screenshots` runs this file with UPDATE_SCREENSHOTS=1 to refresh docs/screenshots from what
it drives: real projects and tokens, and requests made through the real proxy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from tests.admin_ui.conftest import PHONE, OpenPage
from tests.conftest import Proxy
from tests.waiting import wait_for_usage

# A plain test run writes to a temp folder so that testing never changes tracked files.
DOC_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

pytestmark = [pytest.mark.browser, pytest.mark.process]


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = DOC_SCREENSHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def _chat(proxy: Proxy, token: str, *, fail: bool = False) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    if fail:
        path, body = "/v1/moderations", {"input": "x"}
        headers["X-Fake-Status"] = "503"
    else:
        path = "/v1/chat/completions"
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}
    async with proxy.client.post(path, json=body, headers=headers) as response:
        await response.read()
        return response.status


async def _seed(proxy: Proxy) -> None:
    """Another project with some history, so the pages look like a proxy in use."""
    project_id = await proxy.create_project("support-bot", "sk-support-" + "x" * 40)
    for minutes, quota, calls in ((240, 500, 6), (15, None, 3)):
        issued = await proxy.issue_token(project_id=project_id, minutes=minutes, max_requests=quota)
        for _ in range(calls):
            assert await _chat(proxy, issued["token"]) == 200
    assert await _chat(proxy, issued["token"], fail=True) == 503
    await wait_for_usage(proxy, f"/tokens/{issued['id']}", calls + 1)


async def _shot(page: Page, folder: Path, name: str, *, full: bool = False) -> None:
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=full)


async def _proxy_status(proxy: Proxy, token: str) -> int:
    async with proxy.client.get(
        "/v1/models", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        await response.read()
        return response.status


async def test_operator_runs_the_token_lifecycle_in_a_browser(
    open_page: OpenPage, proxy: Proxy, screenshots: Path
) -> None:
    await _seed(proxy)
    page = await open_page()

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
    project_url = page.url.split("?")[0]

    # Issue a token and read its value, once: the post redirects to the page that shows it.
    await page.get_by_role("link", name="Issue token").first.click()
    await page.get_by_label("Lifetime (minutes)").fill("30")
    await page.get_by_label("Budget in US dollars").fill("5")
    await page.get_by_role("button", name="Issue token").click()
    await expect(page.get_by_role("heading", name="Token issued")).to_be_visible()
    assert "/admin/tokens/issued/" in page.url
    token = await page.locator("#token-value").input_value()
    assert token.startswith("sk-") and token not in page.url
    await expect(page.locator("#sdk-snippet")).to_contain_text(
        f'OpenAI(base_url="{proxy.base_url}/v1", api_key="{token}")'
    )
    # The copy button (the pages' only script) puts the value on the clipboard.
    await page.get_by_role("button", name="Copy", exact=True).click()
    await expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert await page.evaluate("navigator.clipboard.readText()") == token
    await _shot(page, screenshots, "token-issued")

    # Reloading shows it no more, and issues nothing.
    await page.reload()
    await expect(
        page.get_by_role("heading", name="This token's value is not shown again")
    ).to_be_visible()
    assert token not in await page.content()
    _, tokens = await proxy.manage("GET", "/tokens")
    assert len(tokens) == 3

    # The application uses it through the proxy.
    for _ in range(2):
        assert await _chat(proxy, token) == 200
    token_id = next(t["id"] for t in tokens if t["budget_usd"] == 5)
    await wait_for_usage(proxy, f"/tokens/{token_id}", 2)

    await page.get_by_role("link", name=f"Token {token_id[:8]}").click()
    await expect(page.locator("#request-count")).to_have_text("2")
    await expect(page.locator("#chart-24h-requests .bar[data-value='2']")).to_have_count(1)
    assert token not in await page.content()

    # Give it limits; the charts and figures are on the page.
    await page.get_by_label("Maximum requests").fill("100")
    await page.get_by_label("Budget in US dollars").fill("2.50")
    await page.get_by_label("Allowed models").fill("gpt-4o-mini, gpt-4.1*")
    await page.get_by_role("button", name="Save limits").click()
    await expect(page.get_by_role("status")).to_contain_text("Quota saved")
    await expect(page.locator(".stat .hint").first).to_contain_text("of 100 allowed")
    await expect(page.locator("#budget-usd")).to_have_text("$2.50")
    await expect(page.locator("#allowed-models")).to_have_text("gpt-4o-mini, gpt-4.1*")
    await _shot(page, screenshots, "token-detail", full=True)

    # Revoking asks first; the next request is refused.
    await page.get_by_role("link", name="Revoke token…").click()
    await expect(page.get_by_role("heading", name=re.compile("Revoke token"))).to_be_visible()
    assert await _proxy_status(proxy, token) == 200
    await _shot(page, screenshots, "revoke-token")
    await page.get_by_role("button", name="Revoke token").click()
    await expect(page.get_by_role("status")).to_contain_text("Token revoked")
    await expect(page.locator("h1 .badge")).to_have_text("revoked")
    assert await _proxy_status(proxy, token) == 401

    # The project page lists it with its status, usage, spend and limits.
    await page.goto(project_url)
    await expect(page.locator("#tokens tbody tr")).to_have_count(1)
    row = page.locator("#tokens tbody tr").first
    await expect(row).to_contain_text("revoked")
    await expect(row).to_contain_text("/ $2.50")
    await expect(page.locator("#chart-30d-requests .bar .fill")).to_have_count(1)
    await _shot(page, screenshots, "project-detail", full=True)

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
    await expect(page.locator("#chart-24h-requests .bar .fill")).to_have_count(1)
    await _shot(page, screenshots, "dashboard", full=True)
    assert token not in await page.content()

    # The same dashboard on a phone, and the sign-in page anyone gets without the password.
    phone = await open_page(PHONE)
    await phone.goto("/admin/")
    await expect(phone.locator("#chart-24h-spend .bar .fill")).to_have_count(1)
    await _shot(phone, screenshots, "dashboard-phone", full=True)
    stranger = await open_page(signed_in=False)
    await stranger.goto("/admin/")
    await expect(stranger.get_by_role("heading", name="Sign-in required")).to_be_visible()
    await _shot(stranger, screenshots, "sign-in")
