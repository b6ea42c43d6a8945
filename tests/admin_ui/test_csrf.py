"""Every form post must carry a valid CSRF token; without one nothing changes."""

from __future__ import annotations

import time

import pytest

from admin_ui.security import CsrfSigner
from tests.admin_ui.conftest import ADMIN, AdminPages


async def _state(admin: AdminPages) -> tuple[object, object, object]:
    _, projects = await admin.proxy.manage("GET", "/projects")
    _, tokens = await admin.proxy.manage("GET", "/tokens")
    _, audit = await admin.proxy.manage("GET", "/audit")
    return projects, tokens, audit["pagination"]["total"]


@pytest.mark.parametrize(
    "csrf",
    [
        None,
        "",
        "garbage",
        "1700000000.deadbeef",
        "not-a-number.abc",
        # A digit to str.isdigit() that int() refuses, text compare_digest() refuses, and more
        # digits than int() converts: each was a 500.
        "\u00b2.abc",
        "1.\u00e9",
        "1" * 5000 + ".abc",
    ],
    ids=[
        "missing",
        "empty",
        "garbage",
        "forged",
        "bad-time",
        "superscript-time",
        "non-ascii-signature",
        "5000-digit-time",
    ],
)
async def test_a_form_without_a_valid_csrf_token_is_refused_and_changes_nothing(
    admin: AdminPages, csrf: str | None
) -> None:
    project_id = await admin.create_project()
    token_id = (await admin.proxy.issue_token(project_id))["id"]
    before = await _state(admin)
    posts = [
        ("/admin/projects", {"name": "evil", "api_key": "sk-evil-key-123456789"}),
        (f"/admin/projects/{project_id}/edit", {"name": "renamed", "api_key": ""}),
        (f"/admin/projects/{project_id}/deactivate", {}),
        (f"/admin/projects/{project_id}/revoke-tokens", {}),
        (f"/admin/projects/{project_id}/delete", {}),
        (f"/admin/projects/{project_id}/tokens", {"duration_minutes": "5"}),
        (f"/admin/tokens/{token_id}/quota", {"max_requests": "1"}),
        (f"/admin/tokens/{token_id}/revoke", {}),
    ]
    for path, fields in posts:
        page = await admin.post(path, fields, csrf=csrf)
        assert page.status == 403, path
        assert "Request refused" in page.text
        assert "Nothing was changed" in page.text
        assert "sk-evil-key" not in page.text
    assert await _state(admin) == before


async def test_a_token_from_another_server_secret_is_refused(admin: AdminPages) -> None:
    other = CsrfSigner(b"o" * 32, "admin-secret", max_age=3600)
    page = await admin.post(
        "/admin/projects", {"name": "x", "api_key": "sk-x-123456789"}, csrf=other.issue("admin")
    )
    assert page.status == 403
    assert "does not match" in page.text


def test_csrf_tokens_are_bound_to_user_secret_and_time() -> None:
    signer = CsrfSigner(b"k" * 32, "pw", max_age=60)
    now = time.time()
    token = signer.issue("admin", now)
    assert signer.verify(token, "admin", now + 30) is None
    assert signer.verify(token, "someone-else", now) == "The form's security token does not match."
    assert signer.verify(token, "admin", now + 61) == "The form has expired."
    assert signer.verify(token, "admin", now - 3600) == "The form has expired."
    assert CsrfSigner(b"k" * 32, "new-pw", max_age=60).verify(token, "admin", now) is not None
    assert signer.verify("", "admin", now) == "The form carried no valid security token."


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
        ({"Sec-Fetch-Site": "same-origin"}, 303),
        ({"Sec-Fetch-Site": "none"}, 303),
        # A browser too old to say where the page was: the Origin it sends against the Host.
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": "SAME"}, 303),
        # No browser acting for someone else (curl, a script): the form token decides.
        ({}, 303),
    ],
    ids=["cross-site", "same-site", "same-origin", "typed-in", "origin", "null", "own", "none"],
)
async def test_a_post_a_browser_says_came_from_another_page_is_refused(
    admin: AdminPages, headers: dict[str, str], status: int
) -> None:
    if headers.get("Origin") == "SAME":
        headers = {"Origin": admin.proxy.base_url}
    data = {"name": "p", "api_key": "sk-p-123456789", "csrf_token": await admin.csrf()}
    async with admin.proxy.client.post(
        "/admin/projects", data=data, headers={**ADMIN, **headers}, allow_redirects=False
    ) as response:
        assert response.status == status
        text = await response.text()
    _, projects = await admin.proxy.manage("GET", "/projects")
    assert len(projects) == (1 if status == 303 else 0)
    if status == 403:
        assert "another site" in text and "Nothing was changed" in text
