"""Basic auth in front of every admin page, and the headers every page carries."""

from __future__ import annotations

import base64

import pytest

from tests.admin_ui.conftest import ADMIN, AdminPages, basic

CHALLENGE = 'Basic realm="llm-proxy admin"'


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        basic("admin", "wrong-password"),
        basic("someone", "admin-secret"),
        basic("admin", "admin-secret-and-more"),
        basic("", ""),
        {"Authorization": "Basic " + base64.b64encode(b"admin").decode()},
        {"Authorization": "Basic not*base64"},
        {"Authorization": "Bearer admin-secret"},
    ],
    ids=[
        "missing",
        "wrong-password",
        "wrong-user",
        "password-prefix",
        "empty",
        "no-colon",
        "malformed",
        "bearer",
    ],
)
async def test_wrong_or_missing_credentials_get_401_with_a_basic_challenge(
    admin: AdminPages, authorization: dict[str, str] | None
) -> None:
    for path in ("/admin/", "/admin/projects", "/admin/static/admin.css", "/admin/nowhere"):
        page = await admin.get(path, auth=authorization)
        assert page.status == 401, path
        assert page.headers["WWW-Authenticate"] == CHALLENGE
        assert "csrf_token" not in page.text
        assert "Sign-in required" in page.text


async def test_a_post_without_credentials_changes_nothing(admin: AdminPages) -> None:
    csrf = await admin.csrf()
    async with admin.proxy.client.post(
        "/admin/projects", data={"name": "x", "api_key": "sk-x", "csrf_token": csrf}
    ) as response:
        assert response.status == 401
    status, projects = await admin.proxy.manage("GET", "/projects")
    assert (status, projects) == (200, [])


async def test_admin_without_slash_redirects_to_the_dashboard(admin: AdminPages) -> None:
    async with admin.proxy.client.get("/admin", headers=ADMIN, allow_redirects=False) as response:
        assert response.status == 308
        assert response.headers["Location"].endswith("/admin/")
    page = await admin.get("/admin")
    assert page.status == 200
    assert page.url.endswith("/admin/")


async def test_pages_are_never_cached_or_framed(admin: AdminPages) -> None:
    page = await admin.get("/admin/")
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["Content-Type"].startswith("text/html")


async def test_the_stylesheet_is_served_and_cacheable(admin: AdminPages) -> None:
    page = await admin.get("/admin/")
    href = next(link for link in page.text.split('"') if "/admin/static/admin.css" in link)
    css = await admin.get(href)
    assert css.status == 200
    assert css.headers["Content-Type"].startswith("text/css")
    assert "Cache-Control" not in css.headers
    assert "font-family" in css.text
