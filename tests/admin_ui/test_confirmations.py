"""Revoking asks first, on a page of its own: a GET that changes nothing, then a CSRF-protected post."""

from __future__ import annotations

import re

from tests.admin_ui.conftest import AdminPages, csrf_token
from tests.conftest import Proxy

_REVOKE_FORM = re.compile(r'<form[^>]*action="(/admin/[^"]*revoke[^"]*)"')


async def _status(proxy: Proxy, token: str) -> int:
    async with proxy.client.get(
        "/v1/models", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        await response.read()
        return response.status


async def test_no_list_or_detail_page_revokes_in_one_click(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project()
    token_id = (await proxy.issue_token(project_id))["id"]
    for path in ("/admin/tokens", f"/admin/projects/{project_id}", f"/admin/tokens/{token_id}"):
        page = (await admin.get(path)).text
        assert _REVOKE_FORM.findall(page) == [], path
    project_page = (await admin.get(f"/admin/projects/{project_id}")).text
    assert f'href="/admin/projects/{project_id}/revoke-tokens">Revoke all tokens…' in project_page
    assert f'href="/admin/tokens/{token_id}/revoke"' in project_page
    assert f'href="/admin/tokens/{token_id}/revoke"' in (await admin.get("/admin/tokens")).text


async def test_revoking_a_token_asks_first(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project("asked")
    issued = await proxy.issue_token(project_id)
    confirm = await admin.get(f"/admin/tokens/{issued['id']}/revoke")
    assert confirm.status == 200
    assert f"Revoke token <code>{issued['id'][:8]}</code>?" in confirm.text
    assert _REVOKE_FORM.findall(confirm.text) == [f"/admin/tokens/{issued['id']}/revoke"]
    assert 'method="post"' in confirm.text and csrf_token(confirm.text)
    assert f'href="/admin/tokens/{issued["id"]}">Keep it</a>' in confirm.text
    # Asking changed nothing.
    assert await _status(proxy, issued["token"]) == 200
    _, audit = await proxy.manage("GET", "/audit?action=token.revoke")
    assert audit["pagination"]["total"] == 0

    done = await admin.post(f"/admin/tokens/{issued['id']}/revoke", csrf=csrf_token(confirm.text))
    assert done.url.endswith(f"/admin/tokens/{issued['id']}?notice=token_revoked")
    assert await _status(proxy, issued["token"]) == 401
    # Asking again about a revoked token just shows it.
    again = await admin.get(f"/admin/tokens/{issued['id']}/revoke")
    assert again.url.endswith(f"/admin/tokens/{issued['id']}") and "badge-revoked" in again.text


async def test_revoking_every_token_of_a_project_asks_first(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project("many")
    tokens = [await proxy.token(project_id=project_id) for _ in range(3)]
    _, one = await proxy.manage("GET", f"/tokens?project_id={project_id}")
    await admin.post(f"/admin/tokens/{one[0]['id']}/revoke")
    confirm = await admin.get(f"/admin/projects/{project_id}/revoke-tokens")
    assert confirm.status == 200
    assert "Revoke every token of “<bdi>many</bdi>”?" in confirm.text
    assert "revokes the 2 token(s) of this project not revoked yet (2 active)" in confirm.text
    assert _REVOKE_FORM.findall(confirm.text) == [f"/admin/projects/{project_id}/revoke-tokens"]
    assert [await _status(proxy, token) for token in tokens].count(200) == 2

    done = await admin.post(
        f"/admin/projects/{project_id}/revoke-tokens", csrf=csrf_token(confirm.text)
    )
    assert "Revoked 2 token(s)." in done.text
    assert [await _status(proxy, token) for token in tokens] == [401, 401, 401]
    nothing_left = await admin.get(f"/admin/projects/{project_id}/revoke-tokens")
    assert "is revoked already: there is nothing to revoke" in nothing_left.text
