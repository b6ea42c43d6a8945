"""Every change made from the pages is audited as the admin; the audit page filters and pages."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from tests.admin_ui.conftest import AdminPages
from tests.conftest import Proxy


async def test_changes_from_the_pages_are_audited_with_the_admin_as_actor(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project("audited")
    await admin.post(f"/admin/projects/{project_id}/edit", {"name": "audited-2"})
    await admin.post(f"/admin/projects/{project_id}/deactivate")
    await admin.post(f"/admin/projects/{project_id}/activate")
    issued = await admin.issue_token(project_id)
    match = re.search(r'/admin/tokens/([0-9a-f-]{36})"', issued.text)
    assert match
    token_id = match.group(1)
    await admin.post(f"/admin/tokens/{token_id}/quota", {"max_requests": "9"})
    await admin.post(f"/admin/tokens/{token_id}/revoke")
    await admin.post(f"/admin/projects/{project_id}/revoke-tokens")
    await admin.post(f"/admin/projects/{project_id}/delete")

    status, body = await proxy.manage("GET", "/audit?page_size=100")
    assert status == 200
    events = list(reversed(body["events"]))
    assert [e["action"] for e in events] == [
        "project.create",
        "project.update",
        "project.update",
        "project.update",
        "token.create",
        "token.update",
        "token.revoke",
        "project.revoke_tokens",
        "project.delete",
    ]
    assert {e["actor"] for e in events} == {"admin"}
    assert {e["client_ip"] for e in events} == {"127.0.0.1"}
    assert {e["project_id"] for e in events} == {project_id}
    assert events[1]["details"]["changed"] == ["name"]
    assert events[2]["details"]["is_active"] is False
    assert events[5]["details"] == {"changed": ["max_requests"], "max_requests": 9}


async def test_audit_page_filters_by_action_actor_project_target_and_time(
    admin: AdminPages, proxy: Proxy
) -> None:
    mine = await admin.create_project("mine")
    theirs = await proxy.create_project("theirs")
    token_id = (await proxy.issue_token(theirs))["id"]

    def rows(html: str) -> list[str]:
        return re.findall(r'<span class="action-code">([a-z_.]+)</span>', html)

    everything = await admin.get("/admin/audit")
    assert rows(everything.text) == ["token.create", "project.create", "project.create"]
    assert "management-api" in everything.text and "1\u20133 of 3" in everything.text

    assert rows((await admin.get("/admin/audit?action=token.create")).text) == ["token.create"]
    assert rows((await admin.get("/admin/audit?actor=admin")).text) == ["project.create"]
    by_project = await admin.get(f"/admin/audit?project_id={theirs}")
    assert rows(by_project.text) == ["token.create", "project.create"]
    assert f'<option value="{theirs}" selected>theirs</option>' in by_project.text
    assert rows((await admin.get(f"/admin/audit?target_id={token_id}")).text) == ["token.create"]
    assert rows((await admin.get(f"/admin/audit?target_id={mine}")).text) == ["project.create"]

    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    in_an_hour = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    assert len(rows((await admin.get(f"/admin/audit?since={hour_ago}")).text)) == 3
    assert rows((await admin.get(f"/admin/audit?until={hour_ago}")).text) == []
    assert rows((await admin.get(f"/admin/audit?since={in_an_hour}")).text) == []

    bad = await admin.get("/admin/audit?since=yesterday")
    assert bad.status == 400
    assert "since: must be an RFC 3339 timestamp" in bad.text
    assert 'value="yesterday"' in bad.text


async def test_audit_filter_keeps_a_deleted_project_selectable(admin: AdminPages) -> None:
    project_id = await admin.create_project("gone")
    await admin.post(f"/admin/projects/{project_id}/delete")
    page = await admin.get(f"/admin/audit?project_id={project_id}")
    assert f'<option value="{project_id}" selected>{project_id[:8]} (deleted)</option>' in page.text
    assert re.findall(r'class="action-code">([a-z_.]+)<', page.text) == [
        "project.delete",
        "project.create",
    ]


async def test_audit_page_paginates_and_keeps_filters(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await proxy.create_project("busy")
    for _ in range(55):
        await proxy.issue_token(project_id, minutes=5)

    first = await admin.get("/admin/audit?action=token.create")
    assert "1\u201350 of 55" in first.text and "Page 1 of 2" in first.text
    assert 'rel="prev"' not in first.text
    next_link = re.search(r'rel="next" href="([^"]+)"', first.text)
    assert next_link
    assert "action=token.create" in next_link.group(1) and "page=2" in next_link.group(1)

    second = await admin.get(next_link.group(1).replace("&amp;", "&"))
    assert "51\u201355 of 55" in second.text and "Page 2 of 2" in second.text
    assert second.text.count('class="action-code">token.create<') == 5
    assert 'rel="next"' not in second.text
    previous = re.search(r'rel="prev" href="([^"]+)"', second.text)
    assert previous and previous.group(1) == "/admin/audit?action=token.create"

    assert (await admin.get("/admin/audit?page=0")).status == 400
    beyond = await admin.get("/admin/audit?action=token.create&page=9")
    assert beyond.status == 200 and "No audit entries match" in beyond.text
    # No range that does not exist ("451-450 of 55"), and "newer" leads to the last page.
    assert "none of 55 on this page" in beyond.text and "451" not in beyond.text
    previous = re.search(r'rel="prev" href="([^"]+)"', beyond.text)
    assert previous and previous.group(1) == "/admin/audit?action=token.create&amp;page=2"


async def test_audit_page_refuses_a_moment_past_the_calendar_as_a_form_error(
    admin: AdminPages,
) -> None:
    await admin.create_project("edge")
    for field, moment in (
        ("since", "9999-12-31T23:59-23:59"),
        ("until", "0001-01-01T00:00%2B14:00"),
    ):
        page = await admin.get(f"/admin/audit?{field}={moment}")
        assert page.status == 400, page.text
        assert f"{field}: must be a moment from year 1 to year 9999" in page.text
        assert "<form" in page.text  # the audit page with its filters, not a bare error
