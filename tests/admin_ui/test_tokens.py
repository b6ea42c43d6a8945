"""Tokens from the pages: issue (value shown once), usage, quota, revoke, list."""

from __future__ import annotations

import re

import pytest

from tests.admin_ui.conftest import AdminPages
from tests.conftest import Proxy

_VALUE = re.compile(r'id="token-value" value="(sk-[A-Za-z0-9_-]+)"')


async def _call(proxy: Proxy, token: str) -> tuple[int, str]:
    async with proxy.client.get(
        "/v1/models", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, await response.text()


async def _issue(admin: AdminPages, project_id: str, **fields: str) -> tuple[str, str]:
    page = await admin.issue_token(project_id, **fields)
    assert page.status == 201, page.text
    match = _VALUE.search(page.text)
    assert match
    token_id = re.search(r'/admin/tokens/([0-9a-f-]{36})"', page.text)
    assert token_id
    return match.group(1), token_id.group(1)


async def test_issued_token_is_shown_once_with_an_sdk_snippet(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project("sdk")
    page = await admin.issue_token(project_id, duration_minutes="45", max_requests="7")
    assert page.status == 201
    assert page.headers["Cache-Control"] == "no-store"
    match = _VALUE.search(page.text)
    assert match
    token = match.group(1)
    assert f'OpenAI(base_url="{proxy.base_url}/v1", api_key="{token}")' in page.text.replace(
        "&#34;", '"'
    )
    assert "expires in 44 min" in page.text or "expires in 45 min" in page.text
    assert "at most 7 requests" in page.text
    assert "copy.js" in page.text
    assert (await _call(proxy, token))[0] == 200

    _, tokens = await proxy.manage("GET", f"/tokens?project_id={project_id}")
    assert [(t["max_requests"], t["request_count"]) for t in tokens] == [(7, 1)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"duration_minutes": ""}, "duration_minutes: is required"),
        ({"duration_minutes": "0"}, "duration_minutes: must be between 1 and 525600"),
        ({"duration_minutes": "525601"}, "duration_minutes: must be between 1 and 525600"),
        ({"duration_minutes": "ten"}, "duration_minutes: must be a whole number"),
        ({"duration_minutes": "1" * 30}, "duration_minutes: must be between 1 and 525600"),
        ({"duration_minutes": "10", "max_requests": "0"}, "max_requests: must be between 1"),
        ({"duration_minutes": "10", "max_requests": "1.5"}, "max_requests: must be a whole number"),
    ],
)
async def test_invalid_token_form_is_shown_again_and_issues_nothing(
    admin: AdminPages, proxy: Proxy, fields: dict[str, str], message: str
) -> None:
    project_id = await admin.create_project()
    page = await admin.post(f"/admin/projects/{project_id}/tokens", fields)
    assert page.status == 400
    assert message in page.text
    assert "has-error" in page.text
    assert "token-value" not in page.text
    assert (await proxy.manage("GET", "/tokens"))[1] == []


async def test_token_page_shows_usage_as_it_happens(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project()
    token, token_id = await _issue(admin, project_id)
    page = await admin.get(f"/admin/tokens/{token_id}")
    assert '<div class="value" id="request-count">0</div>' in page.text
    assert "never" in page.text
    for _ in range(3):
        assert (await _call(proxy, token))[0] == 200
    page = await admin.get(f"/admin/tokens/{token_id}")
    assert '<div class="value" id="request-count">3</div>' in page.text
    assert "just now" in page.text
    assert (
        '3 <span class="secondary">/ ∞</span>'
        in (await admin.get(f"/admin/projects/{project_id}")).text
    )


async def test_quota_can_be_set_changed_and_cleared(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project()
    token, token_id = await _issue(admin, project_id, max_requests="5")
    assert (await _call(proxy, token))[0] == 200

    page = await admin.post(f"/admin/tokens/{token_id}/quota", {"max_requests": "1"})
    assert "Quota saved" in page.text
    assert "badge-exhausted" in page.text
    status, body = await _call(proxy, token)
    assert (status, "quota_exceeded" in body) == (429, True)

    page = await admin.post(f"/admin/tokens/{token_id}/quota", {"max_requests": ""})
    assert "no quota" in page.text
    assert (await _call(proxy, token))[0] == 200

    page = await admin.post(f"/admin/tokens/{token_id}/quota", {"max_requests": "-3"})
    assert page.status == 400
    assert "max_requests: must be between 1" in page.text
    assert 'value="-3"' in page.text
    assert (await proxy.manage("GET", f"/tokens/{token_id}"))[1]["max_requests"] is None


async def test_revoked_token_is_refused_on_the_next_request(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project()
    token, token_id = await _issue(admin, project_id)
    page = await admin.post(f"/admin/tokens/{token_id}/revoke")
    assert page.url.endswith(f"/admin/tokens/{token_id}?notice=token_revoked")
    assert "Token revoked" in page.text and "badge-revoked" in page.text
    assert "Revoke token" not in page.text
    status, body = await _call(proxy, token)
    assert (status, "token_inactive" in body) == (401, True)
    again = await admin.post(f"/admin/tokens/{token_id}/revoke")
    assert again.status == 200


async def test_token_list_filters_by_status(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project("listed")
    _, live_id = await _issue(admin, project_id)
    _, dead_id = await _issue(admin, project_id)
    await admin.post(f"/admin/tokens/{dead_id}/revoke")
    everything = await admin.get("/admin/tokens")
    assert live_id[:8] in everything.text and dead_id[:8] in everything.text
    active = await admin.get("/admin/tokens?status=active")
    assert live_id[:8] in active.text and dead_id[:8] not in active.text
    revoked = await admin.get("/admin/tokens?status=revoked")
    assert live_id[:8] not in revoked.text and dead_id[:8] in revoked.text
    assert "No expired tokens" in (await admin.get("/admin/tokens?status=expired")).text
