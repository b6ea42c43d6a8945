"""The admin pages with the database out of reach: a page saying so (503, retry), never a 500 in
JSON that a browser shows as raw text."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.admin_ui.conftest import AdminPages
from tests.admin_ui.test_issuing import _send, _tokens
from tests.conftest import FrozenProxyStarter
from tests.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.process]

# The store gives a statement 5 s; slack for a loaded machine, well short of the 10 s before.
STORE_BOUND_SECONDS = 5.0 + 3.0


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


async def test_an_issue_form_is_refused_within_the_store_bound_when_the_database_hangs(
    proxy_on_freezing_relay: FrozenProxyStarter,
) -> None:
    # The hang starts at the form's claim (two statements on one connection): its first timed
    # out, then giving the connection back waited as long again for the hung database.
    relay, proxy = await proxy_on_freezing_relay()
    admin = AdminPages(proxy)
    project_id = await admin.create_project()
    form = await admin.issue_form(project_id)
    relay.arm(b"DELETE FROM issue_forms")
    started = time.monotonic()
    page = await admin.post(
        f"/admin/projects/{project_id}/tokens", {**form, "duration_minutes": "30"}, csrf=None
    )
    seconds = time.monotonic() - started
    assert relay.frozen.is_set()  # the claim's first statement was the one the hang began at
    assert page.status == 503 and "The database is unavailable" in page.text, page.text[:200]
    assert seconds < STORE_BOUND_SECONDS, seconds
    relay.thaw()
    # Nothing issued, nor the form claimed: sent again once the database is back, it issues.
    deadline = time.monotonic() + 20
    while (again := await _send(proxy, project_id, form))[0] == 503:
        assert time.monotonic() < deadline, "the pages never answered again"
        await asyncio.sleep(0.2)
    assert again[:2] == (303, f"/admin/tokens/issued/{form['issue_id']}"), again
    assert len(await _tokens(proxy)) == 1
