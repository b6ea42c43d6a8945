"""Basic auth in front of every admin page, and the headers every page carries."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from multidict import CIMultiDict

from llm_proxy.runtime.server import with_generated_secrets
from tests.admin_ui.conftest import ADMIN, AdminPages, basic
from tests.conftest import make_settings

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
    for path in ("/admin/", "/admin/projects", "/admin/tokens/issued/x", "/admin/nowhere"):
        page = await admin.get(path, auth=authorization)
        assert page.status == 401, path
        assert page.headers["WWW-Authenticate"] == CHALLENGE
        assert "csrf_token" not in page.text
        assert "Sign-in required" in page.text


async def test_two_authorization_headers_are_refused_whichever_comes_first(
    admin: AdminPages,
) -> None:
    right, wrong = ADMIN["Authorization"], basic("admin", "wrong")["Authorization"]
    for pair in ((right, wrong), (wrong, right), (right, right)):
        headers = CIMultiDict(("Authorization", value) for value in pair)
        async with admin.proxy.client.get("/admin/", headers=headers) as page:
            assert page.status == 401, pair
            assert page.headers["WWW-Authenticate"] == CHALLENGE


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
        assert response.headers["Location"] == "/admin/"
    # Behind a TLS-terminating load balancer the server sees http and the client's Host: the
    # redirect stays on the scheme and host the browser used.
    headers = {**ADMIN, "Host": "admin.example.com", "X-Forwarded-Proto": "https"}
    async with admin.proxy.client.get("/admin", headers=headers, allow_redirects=False) as response:
        assert response.status == 308
        assert response.headers["Location"] == "/admin/"
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


async def test_the_sign_in_page_is_styled_and_says_where_the_generated_password_is(
    admin: AdminPages, tmp_path: Path
) -> None:
    page = await admin.get("/admin/", auth=None)
    assert page.status == 401
    stylesheet = re.search(
        r'<link rel="stylesheet" href="(/admin/static/admin\.css[^"]*)"', page.text
    )
    assert stylesheet, "the 401 page links no stylesheet"
    css = await admin.get(stylesheet.group(1).replace("&amp;", "&"), auth=None)
    assert css.status == 200 and css.headers["Content-Type"].startswith("text/css")
    # Styled through the stylesheet alone: nothing inline for the CSP to refuse.
    assert "<style" not in page.text and "style=" not in page.text and "<script" not in page.text
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]

    # It names the file the server really keeps a generated password in, under DATA_DIR.
    settings = make_settings(tmp_path / "fresh", admin_password="")
    generated = with_generated_secrets(settings).settings.admin_password
    (kept,) = [f for f in (tmp_path / "fresh").iterdir() if f.read_text().strip() == generated]
    text = " ".join(re.sub(r"<[^>]+>", " ", page.text).split())
    assert f"in the file {kept.name} in the server's data directory, DATA_DIR" in text
    assert f"cat ./data/{kept.name}" in text
    assert "generates a password on its first start and prints it" in text
    # Nothing secret or specific to this installation: not the password, not its data directory.
    assert (
        "admin-secret" not in page.text
        and str(admin.proxy.components.settings.data_dir) not in page.text
    )


async def test_static_files_are_served_without_credentials(admin: AdminPages) -> None:
    for name in ("admin.css", "copy.js"):
        page = await admin.get(f"/admin/static/{name}", auth=None)
        assert page.status == 200, name
        assert page.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_static_name_the_filesystem_refuses_is_not_found(
    admin: AdminPages, log_stream: io.StringIO
) -> None:
    """Anyone may ask for a static file: a name too long for the filesystem is a 404 like any
    other missing file, not a 500 with a traceback in the log for each request."""
    for name in ("a" * 300, "x/" * 3000 + "y", "admin.css" + "/" + "b" * 256):
        page = await admin.get(f"/admin/static/{name}", auth=None)
        assert page.status == 404, (name[:20], page.status, page.text[:100])
    assert "Traceback" not in log_stream.getvalue()
    assert (await admin.get("/admin/static/admin.css", auth=None)).status == 200
