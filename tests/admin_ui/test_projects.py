"""Projects from the pages: create, edit, activate/deactivate, revoke all tokens, delete."""

from __future__ import annotations

from tests.admin_ui.conftest import AdminPages
from tests.conftest import Proxy

KEY = "sk-live-project-key-0123456789abcdef"


async def _call(proxy: Proxy, token: str) -> tuple[int, str]:
    async with proxy.client.get(
        "/v1/models", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        body = await response.text()
        return response.status, body


async def test_created_project_is_listed_with_its_key_masked(admin: AdminPages) -> None:
    page = await admin.post(
        "/admin/projects", {"name": "billing", "description": "Invoices <b>bot</b>", "api_key": KEY}
    )
    assert page.status == 200
    assert "/admin/projects/" in page.url
    assert "Project created" in page.text
    assert "sk-li…cdef" in page.text
    assert "Invoices &lt;b&gt;bot&lt;/b&gt;" in page.text  # autoescaped
    listing = await admin.get("/admin/projects")
    assert "billing" in listing.text and "sk-li…cdef" in listing.text
    assert KEY not in page.text + listing.text
    _, projects = await admin.proxy.manage("GET", "/projects")
    assert [(p["name"], p["description"], p["api_key"]) for p in projects] == [
        ("billing", "Invoices <b>bot</b>", "sk-li…cdef")
    ]


async def test_invalid_project_form_is_shown_again_without_the_key(admin: AdminPages) -> None:
    page = await admin.post(
        "/admin/projects", {"name": "  ", "description": "kept", "api_key": KEY}
    )
    assert page.status == 400
    assert "name: must not be empty" in page.text
    assert ">kept</textarea>" in page.text
    assert KEY not in page.text
    page = await admin.post("/admin/projects", {"name": "n" * 201, "api_key": KEY})
    assert page.status == 400
    assert "at most 200 characters" in page.text
    page = await admin.post("/admin/projects", {"name": "ok"})
    assert page.status == 400
    assert "api_key: is required" in page.text
    _, projects = await admin.proxy.manage("GET", "/projects")
    assert projects == []


async def test_a_key_with_a_control_character_is_refused_on_create_and_edit(
    admin: AdminPages, proxy: Proxy
) -> None:
    injecting = "sk-abc\rX-Injected: yes"
    page = await admin.post("/admin/projects", {"name": "p", "api_key": injecting})
    assert page.status == 400
    assert "api_key: must not contain control characters" in page.text
    _, projects = await admin.proxy.manage("GET", "/projects")
    assert projects == []
    project_id = await admin.create_project("p", KEY)
    page = await admin.post(
        f"/admin/projects/{project_id}/edit", {"name": "p", "api_key": "sk-abc\nX: y"}
    )
    assert page.status == 400
    assert "api_key: must not contain control characters" in page.text
    token = await proxy.token(project_id=project_id)
    assert (await _call(proxy, token))[0] == 200
    assert proxy.upstream.last.headers["Authorization"] == f"Bearer {KEY}"


async def test_editing_renames_and_replaces_the_key_and_blank_keeps_it(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project("old", KEY)
    token = await proxy.token(project_id=project_id)
    edit = await admin.get(f"/admin/projects/{project_id}/edit")
    assert 'value="old"' in edit.text and KEY not in edit.text

    page = await admin.post(
        f"/admin/projects/{project_id}/edit", {"name": "new", "description": "d", "api_key": ""}
    )
    assert "Project saved" in page.text and "<h1><bdi>new" in page.text
    assert (await _call(proxy, token))[0] == 200
    assert proxy.upstream.last.headers["Authorization"] == f"Bearer {KEY}"

    replacement = "sk-replacement-key-9876543210zyxw"
    await admin.post(f"/admin/projects/{project_id}/edit", {"name": "new", "api_key": replacement})
    assert (await _call(proxy, token))[0] == 200
    assert proxy.upstream.last.headers["Authorization"] == f"Bearer {replacement}"
    assert "sk-re…zyxw" in (await admin.get(f"/admin/projects/{project_id}")).text

    page = await admin.post(f"/admin/projects/{project_id}/edit", {"name": "", "api_key": "x"})
    assert page.status == 400
    assert "name: must not be empty" in page.text


async def test_deactivating_refuses_tokens_until_activated_again(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project()
    token = await proxy.token(project_id=project_id)

    page = await admin.post(f"/admin/projects/{project_id}/deactivate")
    assert "Project deactivated" in page.text
    assert "badge-inactive" in page.text
    status, body = await _call(proxy, token)
    assert (status, "project_inactive" in body) == (403, True)
    assert "Issue token" not in page.text.split("<main", 1)[1].split("Actions")[0]

    new = await admin.get(f"/admin/projects/{project_id}/tokens/new")
    issue = await admin.issue_token(project_id)
    assert new.status == 200
    assert issue.status == 403
    assert "inactive" in issue.text and "Activate it" in issue.text

    page = await admin.post(f"/admin/projects/{project_id}/activate", {"back": "list"})
    assert page.url.endswith("/admin/projects?notice=project_activated")
    assert "Project activated" in page.text
    assert (await _call(proxy, token))[0] == 200


async def test_revoke_all_tokens_stops_every_token_of_the_project(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project()
    tokens = [await proxy.token(project_id=project_id) for _ in range(2)]
    page = await admin.post(f"/admin/projects/{project_id}/revoke-tokens")
    assert "Revoked 2 token(s)." in page.text
    assert page.text.count("badge-revoked") == 2
    for token in tokens:
        status, body = await _call(proxy, token)
        assert (status, "token_inactive" in body) == (401, True)


async def test_delete_asks_first_then_deletes(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project("doomed")
    token = await proxy.token(project_id=project_id)

    confirm = await admin.get(f"/admin/projects/{project_id}/delete")
    assert "Delete “<bdi>doomed</bdi>”?" in confirm.text
    assert "1 token(s)" in confirm.text
    assert (await proxy.manage("GET", f"/projects/{project_id}"))[0] == 200

    page = await admin.post(f"/admin/projects/{project_id}/delete")
    assert page.url.endswith("/admin/projects?notice=project_deleted")
    assert "Project deleted" in page.text and "doomed" not in page.text
    assert (await proxy.manage("GET", f"/projects/{project_id}"))[0] == 404
    assert (await _call(proxy, token))[0] == 401
    assert (await admin.get(f"/admin/projects/{project_id}")).status == 404


async def test_unknown_notice_codes_show_nothing(admin: AdminPages) -> None:
    page = await admin.get("/admin/projects?notice=<script>alert(1)</script>")
    assert 'role="status"' not in page.text
    assert "<script>alert" not in page.text


async def test_a_notice_count_that_is_not_ascii_digits_shows_zero(admin: AdminPages) -> None:
    page = await admin.get("/admin/projects?notice=tokens_revoked&n=%C2%B2")
    assert page.status == 200 and "Revoked 0 token(s)." in page.text


async def test_project_form_refuses_control_characters_and_keeps_line_breaks(
    admin: AdminPages,
) -> None:
    page = await admin.post("/admin/projects", {"name": "ops\x1b[2J", "api_key": "sk-up-key"})
    assert page.status == 400
    assert "name: must not contain control characters" in page.text
    page = await admin.post(
        "/admin/projects", {"name": "ops", "api_key": "sk-up-key", "description": "a\x07b"}
    )
    assert page.status == 400
    assert "description: must not contain control characters" in page.text
    project_id = await admin.create_project("ops")
    page = await admin.post(
        f"/admin/projects/{project_id}/edit", {"name": "ops", "description": "one\r\ntwo"}
    )
    assert page.status == 200, page.text
    edited = await admin.get(f"/admin/projects/{project_id}/edit")
    assert "one\r\ntwo" in edited.text or "one\ntwo" in edited.text


async def test_a_description_the_text_area_accepts_is_stored_with_its_line_breaks(
    admin: AdminPages, proxy: Proxy
) -> None:
    # A text area (maxlength 2000, as the API) counts a line break as one character; the browser
    # sends it as CR LF.
    typed = "\n".join(["x" * 99] * 20) + "x"
    assert len(typed) == 2000
    page = await admin.post(
        "/admin/projects",
        {"name": "lines", "api_key": "sk-up-key", "description": typed.replace("\n", "\r\n")},
        follow=False,
    )
    assert page.status == 303, page.text
    _, projects = await proxy.manage("GET", "/projects")
    assert [p["description"] for p in projects] == [typed]
