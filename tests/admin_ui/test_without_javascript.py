"""Every action of the admin pages in a real browser with JavaScript turned off, each checked
through the management API: the pages are server-rendered forms and nothing more."""

from __future__ import annotations

import re

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


async def test_saving_limits_from_a_page_opened_before_another_change_keeps_that_change(
    open_page: OpenPage, proxy: Proxy
) -> None:
    """An operator opens a token's page; meanwhile someone cuts its quota through the API. The
    operator raises its rpm and saves: the quota they never touched stays cut."""
    issued = await proxy.issue_token(
        rpm=30, budget_usd=5, allowed_models=["gpt-4o-mini", "gpt-4.1*"]
    )
    page = await open_page(javascript=False)
    await page.goto(f"/admin/tokens/{issued['id']}")
    status, _ = await proxy.manage(
        "PATCH", f"/tokens/{issued['id']}", {"max_requests": 10, "budget_usd": 1}
    )
    assert status == 200
    await page.get_by_label("Requests per minute").fill("60")
    await page.get_by_role("button", name="Save limits").click()
    await expect(page.get_by_role("status")).to_contain_text("Quota saved")
    _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (token["rpm"], token["max_requests"], token["budget_usd"]) == (60, 10, 1)
    assert token["allowed_models"] == ["gpt-4o-mini", "gpt-4.1*"]
    _, audit = await proxy.manage("GET", "/audit?action=token.update")
    # The audit entry names what the operator changed, and only that.
    assert audit["events"][0]["details"] == {"changed": ["rpm"], "rpm": 60}


async def test_a_limit_changed_by_two_operators_at_once_is_not_overwritten_unseen(
    open_page: OpenPage, proxy: Proxy
) -> None:
    issued = await proxy.issue_token(rpm=30)
    page = await open_page(javascript=False)
    await page.goto(f"/admin/tokens/{issued['id']}")
    status, _ = await proxy.manage(
        "PATCH", f"/tokens/{issued['id']}", {"rpm": 5, "max_requests": 10}
    )
    assert status == 200
    await page.get_by_label("Requests per minute").fill("60")
    await page.get_by_label("Tokens per minute").fill("9000")
    async with page.expect_response(f"**/admin/tokens/{issued['id']}/quota") as answer:
        await page.get_by_role("button", name="Save limits").click()
    assert (await answer.value).status == 409
    await expect(page.get_by_role("alert")).to_contain_text("changed since this page was opened")
    await expect(page.get_by_role("alert")).to_contain_text("now 5")
    # What was typed is kept, and nothing was changed.
    await expect(page.get_by_label("Requests per minute")).to_have_value("60")
    await expect(page.get_by_label("Tokens per minute")).to_have_value("9000")
    # A box the operator left alone shows the limit as it is now, and is kept by the next save.
    await expect(page.get_by_label("Maximum requests")).to_have_value("10")
    _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (token["rpm"], token["tpm"]) == (5, None)
    # Saved again, having seen it, it applies.
    await page.get_by_role("button", name="Save limits").click()
    await expect(page.get_by_role("status")).to_contain_text("Quota saved")
    _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (token["rpm"], token["tpm"], token["max_requests"]) == (60, 9000, 10)


async def test_saving_a_project_from_a_page_opened_before_a_rename_keeps_the_new_name(
    open_page: OpenPage, proxy: Proxy
) -> None:
    project_id = await proxy.create_project("before")
    page = await open_page(javascript=False)
    await page.goto(f"/admin/projects/{project_id}/edit")
    await proxy.manage("PATCH", f"/projects/{project_id}", {"name": "renamed-meanwhile"})
    await page.get_by_label("Description").fill("Line one\nline two")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.get_by_role("status")).to_be_visible()
    _, project = await proxy.manage("GET", f"/projects/{project_id}")
    assert (project["name"], project["description"]) == ("renamed-meanwhile", "Line one\nline two")

    # Both change the name: the second to save sees the first's before anything is saved.
    await page.goto(f"/admin/projects/{project_id}/edit")
    await proxy.manage("PATCH", f"/projects/{project_id}", {"name": "theirs"})
    await page.get_by_label("Name").fill("mine")
    async with page.expect_response(f"**/admin/projects/{project_id}/edit") as answer:
        await page.get_by_role("button", name="Save changes").click()
    assert (await answer.value).status == 409
    await expect(page.get_by_role("alert")).to_contain_text("it is now \u201ctheirs\u201d")
    await expect(page.get_by_label("Name")).to_have_value("mine")
    await expect(page.get_by_label("Description")).to_have_value("Line one\nline two")
    assert (await proxy.manage("GET", f"/projects/{project_id}"))[1]["name"] == "theirs"
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.get_by_role("status")).to_be_visible()
    assert (await proxy.manage("GET", f"/projects/{project_id}"))[1]["name"] == "mine"

    # A conflict on the name while someone else also rewrote the description: the box left
    # alone shows theirs, and the save that follows keeps it.
    await page.goto(f"/admin/projects/{project_id}/edit")
    await proxy.manage(
        "PATCH", f"/projects/{project_id}", {"name": "again", "description": "their words"}
    )
    await page.get_by_label("Name").fill("mine-again")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.get_by_role("alert")).to_contain_text("it is now \u201cagain\u201d")
    await expect(page.get_by_label("Description")).to_have_value("their words")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.get_by_role("status")).to_be_visible()
    _, project = await proxy.manage("GET", f"/projects/{project_id}")
    assert (project["name"], project["description"]) == ("mine-again", "their words")


@pytest.mark.parametrize(
    ("form", "box", "typed", "problem"),
    [
        ("token", "Requests per minute", str(2**63), "must be a whole number from 1"),
        ("token", "Allowed models", "ok, " + "x" * 201, "every pattern must be at most 200"),
        ("issue", "Metadata", "{nope", "must be a JSON object"),
        ("project", "Description", "bad \x07 bell", "control character"),
    ],
)
async def test_a_refused_box_says_why_beside_it_and_keeps_what_was_typed(
    open_page: OpenPage, proxy: Proxy, form: str, box: str, typed: str, problem: str
) -> None:
    issued = await proxy.issue_token()
    page = await open_page(javascript=False)
    path, button = {
        "token": (f"/admin/tokens/{issued['id']}", "Save limits"),
        "issue": (f"/admin/projects/{issued['project_id']}/tokens/new", "Issue token"),
        "project": (f"/admin/projects/{issued['project_id']}/edit", "Save changes"),
    }[form]
    await page.goto(path)
    field = page.get_by_label(box)
    await field.fill(typed)
    async with page.expect_response(lambda answer: answer.request.method == "POST") as answer:
        await page.get_by_role("button", name=button).click()
    assert (await answer.value).status == 400
    await expect(field).to_have_value(typed)
    await expect(field).to_have_attribute("aria-invalid", "true")
    # Read out with the box by a screen reader, and shown right under it.
    await expect(field).to_have_accessible_description(re.compile(re.escape(problem)))
    message = page.locator(".field.has-error .field-error")
    await expect(message).to_have_count(1)
    await expect(message).to_contain_text(problem)
    border = await field.evaluate("box => getComputedStyle(box).borderTopColor")
    assert border != "rgb(207, 212, 220)", "the refused box is not marked"  # the usual border
