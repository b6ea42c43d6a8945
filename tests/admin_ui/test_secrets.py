"""No page ever shows a full upstream key, and a token value only on the page that issued it."""

from __future__ import annotations

import re

from tests.admin_ui.conftest import AdminPages, crawl
from tests.conftest import Proxy

KEYS = ["sk-first-upstream-key-AAAAAAAAAAAAAAAA", "sk-second-upstream-key-BBBBBBBBBBBBBBBB"]


async def test_no_page_shows_a_full_upstream_key_or_an_issued_token(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_ids = [await admin.create_project(f"p{n}", key) for n, key in enumerate(KEYS)]
    # The second key replaced through the edit form, the first kept.
    replaced = "sk-replaced-upstream-key-CCCCCCCCCCCCCCCC"
    await admin.post(f"/admin/projects/{project_ids[1]}/edit", {"name": "p1", "api_key": replaced})

    values: list[str] = []
    for project_id in project_ids:
        for quota in ("", "3"):
            issued = await admin.issue_token(project_id, max_requests=quota)
            shown = re.search(r'id="token-value" value="(sk-[^"]+)"', issued.text)
            assert shown
            values.append(shown.group(1))
            for secret in (*KEYS, replaced):
                assert secret not in issued.text
    # A token from the management API, used once, is never shown by the pages either.
    values.append(await proxy.token(project_id=project_ids[0]))
    for value in values:
        async with proxy.client.get(
            "/v1/models", headers={"Authorization": f"Bearer {value}"}
        ) as response:
            assert response.status == 200

    pages = await crawl(admin)
    # Forms re-rendered after errors, and the pages reached by filters, too.
    pages["edit-error"] = await admin.post(
        f"/admin/projects/{project_ids[0]}/edit", {"name": "", "api_key": replaced}
    )
    pages["create-error"] = await admin.post("/admin/projects", {"name": "", "api_key": KEYS[0]})
    for status in ("active", "expired", "revoked", "exhausted"):
        pages[status] = await admin.get(f"/admin/tokens?status={status}")
    assert len(pages) > 15
    for path, page in pages.items():
        for secret in (*KEYS, replaced, *values):
            assert secret not in page.text, f"{path} shows a secret"
    assert sum("sk-fi…AAAA" in page.text for page in pages.values()) >= 2


async def test_a_token_value_in_the_address_of_a_page_is_not_shown_back(
    admin: AdminPages, proxy: Proxy
) -> None:
    """An operator who pastes a token's value where its id goes gets a 404 page that does not
    show the value (the page is not the one that issued it)."""
    value = await proxy.token(project_id=await admin.create_project("pasted"))
    for path in (
        f"/admin/tokens/{value}",
        f"/admin/tokens/{value}/revoke",
        f"/admin/projects/{value}",
        f"/admin/projects/{value}/tokens/new",
    ):
        page = await admin.get(path)
        assert page.status == 404, (path, page.text)
        assert value not in page.text and value[3:13] not in page.text, path
        assert "a token&#39;s value, not an id" in page.text, path
