"""Every action of the admin pages in a real browser with JavaScript turned off, each checked
through the management API: the pages are server-rendered forms and nothing more."""

from __future__ import annotations

import pytest
from aiohttp import web
from playwright.async_api import Page, Response, expect

from tests.admin_ui.conftest import AdminPages, OpenPage
from tests.conftest import Proxy

pytestmark = [pytest.mark.browser, pytest.mark.process]


async def _status(proxy: Proxy, token: str) -> tuple[int, str | None]:
    async with proxy.client.get(
        "/v1/models", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        body = await response.json()
        return response.status, None if response.status == 200 else body["error"]["code"]


async def _issue(page: Page, project_url: str, **fields: str) -> str:
    """Issue a token from the project's page; the value as the page shows it, once."""
    await page.goto(project_url)
    await page.get_by_role("link", name="Issue token").first.click()
    await page.get_by_label("Lifetime (minutes)").fill("30")
    for label, value in fields.items():
        await page.get_by_label(label).fill(value)
    await page.get_by_role("button", name="Issue token").click()
    await expect(page.get_by_role("heading", name="Token issued")).to_be_visible()
    return await page.locator("#token-value").input_value()


async def test_every_action_works_without_javascript(open_page: OpenPage, proxy: Proxy) -> None:
    page = await open_page(javascript=False)
    await page.goto("/admin/")
    await expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()

    # Create a project.
    await page.get_by_role("navigation").get_by_role("link", name="Projects").click()
    await page.get_by_role("link", name="New project").click()
    await page.get_by_label("Name").fill("no-script")
    await page.get_by_label("Upstream API key").fill("sk-no-script-upstream-" + "k" * 30)
    await page.get_by_role("button", name="Create project").click()
    await expect(page.get_by_role("status")).to_contain_text("Project created")
    project_url = page.url.split("?")[0]
    project_id = project_url.rsplit("/", 1)[1]
    _, project = await proxy.manage("GET", f"/projects/{project_id}")
    assert project["name"] == "no-script" and project["is_active"] is True

    # Edit it.
    await page.get_by_role("link", name="Edit").click()
    await page.get_by_label("Name").fill("no-script-renamed")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.get_by_role("status")).to_be_visible()
    _, project = await proxy.manage("GET", f"/projects/{project_id}")
    assert project["name"] == "no-script-renamed"

    # Issue a token: its value is shown once, and never again.
    token = await _issue(page, project_url)
    assert token.startswith("sk-") and token not in page.url
    assert await _status(proxy, token) == (200, None)
    await page.reload()
    await expect(
        page.get_by_role("heading", name="This token's value is not shown again")
    ).to_be_visible()
    assert token not in await page.content()
    await page.go_back()  # to the issue form: a fresh one, nothing filled in, nothing issued
    assert token not in await page.content()
    await page.go_forward()
    assert token not in await page.content()
    _, tokens = await proxy.manage("GET", f"/tokens?project_id={project_id}")
    assert len(tokens) == 1
    token_id = tokens[0]["id"]

    # The list shows it, without its value.
    await page.get_by_role("navigation").get_by_role("link", name="Tokens").click()
    await expect(page.get_by_role("link", name=token_id[:8], exact=True)).to_be_visible()
    assert token not in await page.content()

    # Edit every limit.
    await page.get_by_role("link", name=token_id[:8], exact=True).click()
    await page.get_by_label("Maximum requests").fill("40")
    await page.get_by_label("Requests per minute").fill("30")
    await page.get_by_label("Tokens per minute").fill("5000")
    await page.get_by_label("Budget in US dollars").fill("3.25")
    await page.get_by_label("Allowed models").fill("gpt-4o-mini, gpt-4.1*")
    await page.get_by_role("button", name="Save limits").click()
    await expect(page.get_by_role("status")).to_contain_text("Quota saved")
    _, limits = await proxy.manage("GET", f"/tokens/{token_id}")
    assert (
        limits["max_requests"],
        limits["rpm"],
        limits["tpm"],
        limits["budget_usd"],
        limits["allowed_models"],
    ) == (40, 30, 5000, 3.25, ["gpt-4o-mini", "gpt-4.1*"])

    # Revoke it, after the page asks.
    await page.get_by_role("link", name="Revoke token…").click()
    await page.get_by_role("button", name="Revoke token").click()
    await expect(page.get_by_role("status")).to_contain_text("Token revoked")
    assert await _status(proxy, token) == (401, "token_inactive")

    # Deactivate the project, and activate it again.
    second = await _issue(page, project_url)
    await page.goto(project_url)
    await page.get_by_role("button", name="Deactivate").click()
    await expect(page.get_by_role("button", name="Activate")).to_be_visible()
    assert await _status(proxy, second) == (403, "project_inactive")
    assert (await proxy.manage("GET", f"/projects/{project_id}"))[1]["is_active"] is False
    await page.get_by_role("button", name="Activate").click()
    await expect(page.get_by_role("button", name="Deactivate")).to_be_visible()
    assert await _status(proxy, second) == (200, None)

    # Revoke every token of the project, after the page asks.
    await page.get_by_role("link", name="Revoke all tokens…").click()
    await page.get_by_role("button", name="Revoke all tokens").click()
    await expect(page.get_by_role("status")).to_be_visible()
    assert await _status(proxy, second) == (401, "token_inactive")
    _, tokens = await proxy.manage("GET", f"/tokens?project_id={project_id}")
    assert {t["status"] for t in tokens} == {"revoked"}

    # The audit log shows each change, by the admin.
    await page.get_by_role("link", name="Audit log").click()
    await page.get_by_label("Action").fill("project.update")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("tbody tr").first).to_contain_text("admin")
    _, audit = await proxy.manage("GET", "/audit?page_size=100")
    actions = [event["action"] for event in audit["events"]]
    assert actions.count("token.create") == 2 and "token.revoke" in actions
    assert "project.create" in actions

    # Delete the project, after the page asks.
    await page.goto(project_url)
    await page.get_by_role("link", name="Delete…").click()
    await page.get_by_role("button", name="Delete project").click()
    assert (await proxy.manage("GET", f"/projects/{project_id}"))[0] == 404
    assert token not in await page.content() and second not in await page.content()


async def test_the_issued_value_is_not_kept_by_the_browser(
    open_page: OpenPage, proxy: Proxy
) -> None:
    project_id = await proxy.create_project()
    page = await open_page(javascript=False)
    answers: list[Response] = []
    page.on("response", lambda response: answers.append(response))
    token = await _issue(page, f"/admin/projects/{project_id}")
    shown = next(r for r in answers if "/admin/tokens/issued/" in r.url and r.status == 200)
    headers = await shown.all_headers()
    assert "no-store" in headers["cache-control"]
    # Away and back by history: the browser asks again, and is told the value is gone.
    await page.goto("/admin/")
    await page.go_back()
    await expect(
        page.get_by_role("heading", name="This token's value is not shown again")
    ).to_be_visible()
    assert token not in await page.content()


async def test_a_form_posted_from_another_site_is_refused_even_with_a_valid_token(
    open_page: OpenPage, proxy: Proxy, admin: AdminPages
) -> None:
    """The browser sends the admin's basic credentials to the proxy whoever's page posts the
    form; a form security token that leaked (a saved page, a screenshot) must not be enough."""
    leaked = await admin.csrf()
    target = f"{proxy.base_url}/admin/projects"
    form = (
        f'<form method="post" action="{target}">'
        f'<input type="hidden" name="csrf_token" value="{leaked}">'
        '<input type="hidden" name="name" value="planted">'
        '<input type="hidden" name="api_key" value="sk-planted-key-1234567890">'
        "<button>Win a prize</button></form>"
    )

    async def lure(request: web.Request) -> web.Response:
        return web.Response(text=form, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", lure)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        page = await open_page(javascript=False)
        # "localhost" is another site than the proxy's 127.0.0.1, as evil.example would be.
        await page.goto(f"http://localhost:{port}/")
        async with page.expect_response(target) as answer:
            await page.get_by_role("button", name="Win a prize").click()
        assert (await answer.value).status == 403
        await expect(page.get_by_role("heading", name="Request refused")).to_be_visible()
    finally:
        await runner.cleanup()
    _, projects = await proxy.manage("GET", "/projects")
    assert projects == []
    # The same token in a form of the pages' own still works: only where it came from differs.
    page = await admin.post(
        "/admin/projects",
        {"name": "mine", "api_key": "sk-mine-123456789"},
        csrf=leaked,
        follow=False,
    )
    assert page.status == 303
