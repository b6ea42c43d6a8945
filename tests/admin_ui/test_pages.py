"""Every page renders; unknown ids and routes get friendly HTML error pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlencode

import pytest

from tests.admin_ui.conftest import ADMIN, AdminPages, crawl


async def test_every_page_renders(admin: AdminPages) -> None:
    project_id = await admin.create_project("alpha")
    token_id = (await admin.proxy.issue_token(project_id, max_requests=5))["id"]
    await admin.proxy.issue_token(project_id, minutes=1)
    _, limited = await admin.proxy.manage(
        "POST",
        "/tokens",
        {
            "project_id": project_id,
            "duration_minutes": 5,
            "rpm": 10,
            "tpm": 1000,
            "budget_usd": 0.000042,
            "allowed_models": [f"model-{n}-*" for n in range(100)],
            "metadata": {"<b>owner</b>": "<script>x</script>"},
        },
    )
    paths = [
        "/admin/",
        "/admin/projects",
        "/admin/projects/new",
        f"/admin/projects/{project_id}",
        f"/admin/projects/{project_id}/edit",
        f"/admin/projects/{project_id}/delete",
        f"/admin/projects/{project_id}/tokens/new",
        f"/admin/projects/{project_id}/revoke-tokens",
        "/admin/tokens",
        "/admin/tokens?status=active",
        "/admin/tokens?status=revoked",
        f"/admin/tokens/{token_id}",
        f"/admin/tokens/{limited['id']}",
        f"/admin/tokens/{token_id}/revoke",
        "/admin/audit",
        f"/admin/audit?project_id={project_id}&action=token.create",
    ]
    for path in paths:
        page = await admin.get(path)
        assert page.status == 200, (path, page.text)
        assert page.headers["Content-Type"].startswith("text/html")
        assert "<title>" in page.text and "llm-proxy admin" in page.text
        assert "<script>x" not in page.text and "<b>owner" not in page.text, path


async def test_every_linked_page_renders(admin: AdminPages) -> None:
    project_id = await admin.create_project("alpha")
    await admin.proxy.issue_token(project_id)
    pages = await crawl(admin)
    assert len(pages) >= 8
    assert {path: page.status for path, page in pages.items() if page.status != 200} == {}


async def test_empty_installation_pages_invite_the_first_step(admin: AdminPages) -> None:
    assert "Create the first one" in (await admin.get("/admin/projects")).text
    assert "Nothing has happened yet" in (await admin.get("/admin/")).text
    assert "No tokens" in (await admin.get("/admin/tokens")).text
    assert "No audit entries match" in (await admin.get("/admin/audit")).text


@pytest.mark.parametrize(
    "path",
    [
        "/admin/projects/no-such-project",
        "/admin/projects/no-such-project/edit",
        "/admin/projects/no-such-project/delete",
        "/admin/projects/no-such-project/tokens/new",
        "/admin/projects/no-such-project/revoke-tokens",
        "/admin/tokens/no-such-token",
        "/admin/tokens/no-such-token/revoke",
    ],
)
async def test_unknown_ids_get_a_404_page(admin: AdminPages, path: str) -> None:
    page = await admin.get(path)
    assert page.status == 404
    assert page.headers["Content-Type"].startswith("text/html")
    assert "Not found" in page.text
    assert "no-such-" in page.text  # the message names what was looked for
    assert "Back to the dashboard" in page.text


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/admin/projects/no-such-project/edit", {"name": "x"}),
        ("/admin/projects/no-such-project/activate", {}),
        ("/admin/projects/no-such-project/deactivate", {}),
        ("/admin/projects/no-such-project/revoke-tokens", {}),
        ("/admin/projects/no-such-project/delete", {}),
        ("/admin/projects/no-such-project/tokens", {"duration_minutes": "5"}),
        ("/admin/tokens/no-such-token/quota", {"max_requests": "5"}),
        ("/admin/tokens/no-such-token/revoke", {}),
    ],
)
async def test_changes_to_unknown_ids_get_a_404_page(
    admin: AdminPages, path: str, fields: dict[str, str]
) -> None:
    page = await admin.post(path, fields)
    assert page.status == 404
    assert "Not found" in page.text


async def test_unknown_routes_and_methods_get_html_error_pages(admin: AdminPages) -> None:
    page = await admin.get("/admin/no/such/page")
    assert page.status == 404
    assert "There is no such page here." in page.text
    async with admin.proxy.client.put("/admin/projects", headers=ADMIN) as response:
        assert response.status == 405
        assert "POST" in response.headers["Allow"]
        assert "Method Not Allowed" in await response.text()


async def test_an_oversized_form_is_refused(admin: AdminPages) -> None:
    page = await admin.post("/admin/projects", {"name": "x" * 70_000, "api_key": "sk-1"})
    assert page.status == 413
    _, projects = await admin.proxy.manage("GET", "/projects")
    assert projects == []


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"name=\xff\xfe&api_key=sk-1"),
        ("application/x-www-form-urlencoded; charset=no-such-charset", b"name=x&api_key=sk-1"),
        ("multipart/form-data", b"name=x&api_key=sk-1"),
        (
            "multipart/form-data; boundary=zz",
            b'--zz\r\nContent-Disposition: form-data; name="name"\r\n\r\n\xff\r\n--zz--\r\n',
        ),
        (
            "multipart/form-data; boundary=zz",
            b'--zz\r\nContent-Disposition: form-data; name="name"\r\n'
            b"Content-Transfer-Encoding: no-such-encoding\r\n\r\nx\r\n--zz--\r\n",
        ),
    ],
    ids=["not-utf8", "unknown-charset", "no-boundary", "multipart-not-utf8", "unknown-cte"],
)
async def test_a_form_body_that_cannot_be_read_is_a_400_page(
    admin: AdminPages, content_type: str, body: bytes
) -> None:
    async with admin.proxy.client.post(
        "/admin/projects", data=body, headers={**ADMIN, "Content-Type": content_type}
    ) as response:
        assert response.status == 400
        assert response.headers["Content-Type"].startswith("text/html")
        assert "The form could not be read" in await response.text()
    _, projects = await admin.proxy.manage("GET", "/projects")
    assert projects == []


async def test_an_oversized_form_sent_chunked_is_refused(admin: AdminPages) -> None:
    # No Content-Length to refuse up front: the form is bounded while it is read.
    form = urlencode(
        {"csrf_token": await admin.csrf(), "api_key": "sk-1", "name": "ok", "x": "x" * 200_000}
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield form.encode()

    headers = {**ADMIN, "Content-Type": "application/x-www-form-urlencoded"}
    async with admin.proxy.client.post(
        "/admin/projects", data=chunks(), headers=headers, allow_redirects=False
    ) as response:
        assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert response.status == 413
        assert response.headers["Content-Type"].startswith("text/html")
    _, projects = await admin.proxy.manage("GET", "/projects")
    assert projects == []
