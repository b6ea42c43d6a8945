"""Every page in a real browser, on a phone (390 px) and a wide screen, with and without JavaScript:
nothing wider than the screen, nothing the Content-Security-Policy refuses, copy buttons only
where they work."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import ConsoleMessage, expect

from tests.admin_ui.conftest import PHONE, WIDE, AdminPages, OpenPage
from tests.conftest import Proxy
from tests.waiting import wait_for_usage

pytestmark = [pytest.mark.browser, pytest.mark.process]

LONG_NAME = "a-project-with-a-rather-long-name-that-goes-on-and-on-" + "x" * 30


async def _used(proxy: Proxy, token: str) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
    async with proxy.client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 200


async def every_page(admin: AdminPages, proxy: Proxy) -> list[str]:
    """An installation in use, and the path of every kind of page it has."""
    project_id = await admin.create_project(LONG_NAME)
    plain = await proxy.issue_token(project_id, max_requests=50)
    _, limited = await proxy.manage(
        "POST",
        "/tokens",
        {
            "project_id": project_id,
            "duration_minutes": 600,
            "rpm": 60,
            "tpm": 100_000,
            "budget_usd": 12.5,
            "allowed_models": [
                "gpt-4o-mini",
                *(f"gpt-4o-mini-with-a-long-model-name-{n}*" for n in range(8)),
            ],
            "metadata": {"owner": "someone-with-a-very-long-address@example.com" * 2},
        },
    )
    revoked = await proxy.issue_token(project_id)
    await admin.post(f"/admin/tokens/{revoked['id']}/revoke")
    for _ in range(3):
        await _used(proxy, limited["token"])
    await _used(proxy, plain["token"])
    await wait_for_usage(proxy, f"/tokens/{limited['id']}", 3)
    issued = await admin.issue_token(project_id)  # its value shown, so its page now says "gone"
    gone = issued.url.split(str(proxy.base_url), 1)[1]
    # The longest name and description the API takes, with nowhere to break a line.
    _, unbroken = await proxy.manage(
        "POST",
        "/projects",
        {"name": "N" * 200, "description": "D" * 2000, "api_key": "sk-upstream-key-1234567890"},
    )
    unbroken_token = await proxy.issue_token(unbroken["id"])
    return [
        "/admin/",
        "/admin/projects",
        "/admin/projects/new",
        f"/admin/projects/{project_id}",
        f"/admin/projects/{project_id}/edit",
        f"/admin/projects/{project_id}/delete",
        f"/admin/projects/{project_id}/revoke-tokens",
        f"/admin/projects/{project_id}/tokens/new",
        "/admin/tokens",
        "/admin/tokens?status=revoked",
        f"/admin/tokens/{plain['id']}",
        f"/admin/tokens/{limited['id']}",
        f"/admin/tokens/{plain['id']}/revoke",
        gone,
        "/admin/audit",
        f"/admin/audit?project_id={project_id}&action=token.create",
        "/admin/no/such/page",
        f"/admin/projects/{unbroken['id']}",
        f"/admin/projects/{unbroken['id']}/tokens/new",
        f"/admin/tokens/{unbroken_token['id']}/revoke",
    ]


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "no-js"])
@pytest.mark.parametrize("width", [PHONE, WIDE])
async def test_every_page_fits_the_screen_and_keeps_to_the_csp(
    admin: AdminPages, proxy: Proxy, open_page: OpenPage, width: int, javascript: bool
) -> None:
    paths = await every_page(admin, proxy)
    page = await open_page(width, javascript=javascript)
    refused: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            refused.append(message.text)

    page.on("console", on_console)
    for path in paths:
        response = await page.goto(path)
        assert response is not None and response.status in (200, 404, 410), path
        scroll_width = await page.evaluate("document.documentElement.scrollWidth")
        assert scroll_width <= width, f"{path} is {scroll_width} px wide at {width} px"
        # The stylesheet applied (a page without it would be as wide as its longest line).
        background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(246, 247, 249)", path
    assert refused == []

    # A stranger's page, the 401, fits and is styled too.
    stranger = await open_page(width, javascript=javascript, signed_in=False)
    response = await stranger.goto("/admin/")
    assert response is not None and response.status == 401
    assert await stranger.evaluate("document.documentElement.scrollWidth") <= width
    card = stranger.locator(".signin")
    await expect(card).to_be_visible()
    assert await card.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(255, 255, 255)"
    await expect(stranger.get_by_text("admin_password", exact=True).first).to_be_visible()


@pytest.mark.parametrize("width", [PHONE, WIDE])
async def test_the_revoke_buttons_can_be_reached_on_any_screen(
    admin: AdminPages, proxy: Proxy, open_page: OpenPage, width: int
) -> None:
    project_id = await admin.create_project(LONG_NAME)
    token_id = (await proxy.issue_token(project_id, budget_usd=3))["id"]
    page = await open_page(width, javascript=False)
    for path in ("/admin/tokens", f"/admin/projects/{project_id}"):
        await page.goto(path)
        revoke = page.get_by_role("link", name=f"Revoke token {token_id[:8]}…")
        await revoke.scroll_into_view_if_needed()  # the table scrolls inside its card
        await expect(revoke).to_be_in_viewport()
        assert await page.evaluate("document.documentElement.scrollWidth") <= width
        await revoke.click()
        await expect(page.get_by_role("heading", name=re.compile("Revoke token"))).to_be_visible()


async def test_copy_buttons_are_hidden_without_javascript_and_work_with_it(
    admin: AdminPages, proxy: Proxy, open_page: OpenPage
) -> None:
    project_id = await admin.create_project()
    for javascript in (False, True):
        page = await open_page(javascript=javascript)
        await page.goto(f"/admin/projects/{project_id}/tokens/new")
        await page.get_by_role("button", name="Issue token").click()
        await expect(page.get_by_role("heading", name="Token issued")).to_be_visible()
        buttons = page.locator("button[data-copy]")
        await expect(buttons).to_have_count(3)
        value = await page.locator("#token-value").input_value()
        if not javascript:
            for n in range(3):
                await expect(buttons.nth(n)).to_be_hidden()
            # The value can still be selected and copied by hand.
            await expect(page.locator("#token-value")).to_be_visible()
            continue
        for n in range(3):
            await expect(buttons.nth(n)).to_be_visible()
        await page.get_by_role("button", name="Copy variables").click()
        await expect(page.get_by_role("button", name="Copied")).to_be_visible()
        copied = await page.evaluate("navigator.clipboard.readText()")
        assert f'export OPENAI_API_KEY="{value}"' in copied


async def test_chart_bars_carry_their_figures_as_tooltips(
    admin: AdminPages, proxy: Proxy, open_page: OpenPage
) -> None:
    project_id = await admin.create_project()
    issued = await proxy.issue_token(project_id)
    for _ in range(2):
        await _used(proxy, issued["token"])
    await wait_for_usage(proxy, f"/tokens/{issued['id']}", 2)
    page = await open_page(PHONE, javascript=False)
    await page.goto(f"/admin/tokens/{issued['id']}")
    chart = page.locator("#chart-24h-requests")
    await expect(chart).to_have_attribute("role", "img")
    box = await chart.bounding_box()
    assert box is not None and 140 <= box["width"] <= PHONE / 2  # two charts side by side
    bar = chart.locator(".bar .fill")
    await expect(bar).to_have_count(1)
    bar_box = await bar.bounding_box()
    assert bar_box is not None and bar_box["height"] > 50  # the tallest bar fills the plot
    title = await chart.locator(".bar[data-value='2'] > title").text_content()
    assert title is not None and re.fullmatch(
        r"\w{3} \d+, \d\d:00\u2013\d\d:00 UTC: 2 requests", title
    )
    # The figures open without JavaScript.
    await page.locator("#timeline-24h summary").click()
    await expect(page.locator("#timeline-24h table")).to_be_visible()


# Where two pieces of text are drawn: the left edges of their first occurrences under a selector.
_LEFT_EDGES = """([selector, first, second]) => {
  const left = (text) => {
    const walker = document.createTreeWalker(document.querySelector(selector), NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const at = node.data.indexOf(text);
      if (at >= 0) {
        const range = document.createRange();
        range.setStart(node, at);
        range.setEnd(node, at + text.length);
        return range.getBoundingClientRect().left;
      }
    }
    return null;
  };
  return [left(first), left(second)];
}"""


async def test_a_name_with_a_bidi_override_reverses_only_itself(
    proxy: Proxy, open_page: OpenPage
) -> None:
    # U+202E RIGHT-TO-LEFT OVERRIDE, never closed: left to run, it reversed the rest of the line
    # around the name too ("Delete “?”dorp"), so a page could be made to say something else.
    project_id = await proxy.create_project("\u202eprod")
    token_id = (await proxy.issue_token(project_id))["id"]
    page = await open_page(javascript=False)
    sentences = [
        (f"/admin/tokens/{token_id}/revoke", ".warning", "refused", "next"),
        (f"/admin/projects/{project_id}/tokens/new", ".sub", "value", "shown"),
        (f"/admin/projects/{project_id}/delete", "h1", "Delete", "?"),
        (f"/admin/projects/{project_id}/revoke-tokens", "h1", "Revoke", "?"),
        (f"/admin/projects/{project_id}", "h1", "prod", "active"),
        (f"/admin/tokens/{token_id}", ".crumbs", "prod", "token"),
    ]
    for path, selector, first, second in sentences:
        await page.goto(path)
        left = await page.evaluate(_LEFT_EDGES, [selector, first, second])
        assert None not in left, (path, left)
        assert left[0] < left[1], f"{path}: {second!r} is drawn before {first!r}"
