"""The admin pages with the database out of reach: a page saying so (503, retry), never a 500 in
JSON that a browser shows as raw text."""

from __future__ import annotations

from typing import Any

import pytest

from tests.admin_ui.conftest import AdminPages
from tests.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.process]


async def test_pages_say_the_database_is_unavailable_and_come_back(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    admin = AdminPages(await proxy_factory(database_url=own_database))
    project_id = await admin.create_project("kept")

    own_postgres.stop()
    try:
        for path in ("/admin/", "/admin/projects", f"/admin/projects/{project_id}", "/admin/audit"):
            page = await admin.get(path)
            assert page.status == 503, (path, page.status, page.text[:200])
            assert page.headers["Content-Type"].startswith("text/html"), path
            assert page.headers["Retry-After"] == "1"
            assert "The database is unavailable" in page.text, path
            assert page.headers["Cache-Control"] == "no-store"
        posted = await admin.post("/admin/projects", {"name": "new", "api_key": "sk-up-key"})
        assert posted.status == 503 and "The database is unavailable" in posted.text
    finally:
        own_postgres.start()
    assert (await admin.get(f"/admin/projects/{project_id}")).status == 200
