"""Issuing from the pages: post/redirect/get, one token per form, the value shown exactly once."""

from __future__ import annotations

import asyncio
import io
import re
import time
from http.cookies import SimpleCookie
from typing import Any

from admin_ui.handover import COOKIE, HANDOVER_SECONDS, RESEND_SECONDS, Handed, Handovers
from tests.admin_ui.conftest import ADMIN, AdminPages
from tests.conftest import Proxy

_VALUE = re.compile(r'id="token-value" value="(sk-[A-Za-z0-9_-]+)"')


async def _send(
    proxy: Proxy, project_id: str, form: dict[str, str], **fields: str
) -> tuple[int, str, SimpleCookie]:
    """Post the issue form without following the redirect: status, Location, cookies set."""
    data = {"duration_minutes": "30", **form, **fields}
    async with proxy.client.post(
        f"/admin/projects/{project_id}/tokens", data=data, headers=ADMIN, allow_redirects=False
    ) as response:
        await response.read()
        cookies: SimpleCookie = SimpleCookie()
        for header in response.headers.getall("Set-Cookie", []):
            cookies.load(header)
        return response.status, response.headers.get("Location", ""), cookies


async def _open(proxy: Proxy, location: str, sealed: str | None = None) -> tuple[int, str, str]:
    """Open the value's page with (or without) the cookie: status, page, its Set-Cookie."""
    headers = {**ADMIN, "Cookie": f"{COOKIE}={sealed}"} if sealed else ADMIN
    proxy.client.session.cookie_jar.clear()
    async with proxy.client.get(location, headers=headers, allow_redirects=False) as response:
        return response.status, await response.text(), response.headers.get("Set-Cookie", "")


async def _tokens(proxy: Proxy) -> list[dict[str, Any]]:
    _, tokens = await proxy.manage("GET", "/tokens")
    return list(tokens)


async def test_issuing_redirects_to_a_page_that_shows_the_value_once(
    admin: AdminPages, proxy: Proxy, log_stream: io.StringIO
) -> None:
    project_id = await admin.create_project("prg")
    form = await admin.issue_form(project_id)
    status, location, cookies = await _send(proxy, project_id, form, max_requests="3")
    assert status == 303
    assert location == f"/admin/tokens/issued/{form['issue_id']}"
    sealed = cookies[COOKIE]
    assert sealed["path"] == location and sealed["httponly"] and sealed["samesite"] == "Strict"
    assert sealed["max-age"] == str(HANDOVER_SECONDS)
    (token,) = await _tokens(proxy)

    status, page, cleared = await _open(proxy, location, sealed.value)
    assert status == 200
    shown = _VALUE.search(page)
    assert shown
    value = shown.group(1)
    assert f'href="/admin/tokens/{token["id"]}"' in page
    assert "at most 3 requests" in page
    assert f"{COOKIE}=" in cleared and "Max-Age=0" in cleared  # the browser forgets it
    async with proxy.client.get(
        "/v1/models", headers={"Authorization": f"Bearer {value}"}
    ) as response:
        assert response.status == 200

    # A reload shows it no more, here or with the cookie sent again.
    for again in (None, sealed.value):
        status, page, _ = await _open(proxy, location, again)
        assert status == 410
        assert value not in page and "is not shown again" in page
        assert f'href="/admin/tokens/{token["id"]}"' in page
    assert len(await _tokens(proxy)) == 1
    # Never in a URL, a cookie in the clear, or the log.
    assert value not in location and value not in sealed.value
    assert value not in log_stream.getvalue()


async def test_the_same_form_sent_again_issues_nothing_more(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project()
    form = {**await admin.issue_form(project_id), "duration_minutes": "10"}
    first = await admin.post(f"/admin/projects/{project_id}/tokens", form, csrf=None)
    assert first.status == 200 and _VALUE.search(first.text)

    # Sent again (the back button and "resend", or a script): the same page, no new token, and
    # the value, shown already, is not sent again.
    status, location, cookies = await _send(proxy, project_id, form)
    assert (status, location) == (303, f"/admin/tokens/issued/{form['issue_id']}")
    assert COOKIE not in cookies
    again = await admin.post(f"/admin/projects/{project_id}/tokens", form, csrf=None)
    assert again.status == 410 and not _VALUE.search(again.text)
    assert len(await _tokens(proxy)) == 1
    _, audit = await proxy.manage("GET", "/audit?action=token.create")
    assert audit["pagination"]["total"] == 1

    # A new rendering of the form is a new form.
    assert (await admin.issue_token(project_id)).status == 200
    assert len(await _tokens(proxy)) == 2


async def test_a_double_click_issues_one_token_and_its_value_still_arrives(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project()
    form = await admin.issue_form(project_id)
    answers = await asyncio.gather(*(_send(proxy, project_id, form) for _ in range(2)))
    assert len(await _tokens(proxy)) == 1
    assert {(status, location) for status, location, _ in answers} == {
        (303, f"/admin/tokens/issued/{form['issue_id']}")
    }
    # The browser follows the answer to the second click; it carries the value too.
    status, page, _ = await _open(proxy, answers[1][1], answers[1][2][COOKIE].value)
    assert status == 200 and _VALUE.search(page)


async def test_the_value_page_may_be_served_by_another_instance(proxy_factory: Any) -> None:
    """Behind a load balancer the redirect may reach another instance (nginx takes turns)."""
    first: Proxy = await proxy_factory()
    second: Proxy = await proxy_factory()
    admin = AdminPages(first)
    project_id = await admin.create_project()
    form = await admin.issue_form(project_id)
    status, location, cookies = await _send(first, project_id, form)
    assert status == 303

    status, page, _ = await _open(second, location, cookies[COOKIE].value)
    assert status == 200
    shown = _VALUE.search(page)
    assert shown and shown.group(1).startswith("sk-")
    # Without the cookie, which that page cleared, neither instance shows it again; nor does the
    # instance that showed it, given the cookie again.
    for instance, sealed in ((second, None), (first, None), (second, cookies[COOKIE].value)):
        status, page, _ = await _open(instance, location, sealed)
        assert status == 410 and shown.group(1) not in page


async def test_a_form_without_its_one_time_id_issues_nothing(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project()
    for issue_id in (None, "", "short", "x" * 22 + "!"):
        fields = {"duration_minutes": "10"}
        if issue_id is not None:
            fields["issue_id"] = issue_id
        page = await admin.post(f"/admin/projects/{project_id}/tokens", fields)
        assert page.status == 400
        assert "This form is out of date, so nothing was issued" in page.text
        assert re.search(r'name="issue_id" value="[A-Za-z0-9_-]{22}"', page.text)
        assert 'value="10"' in page.text  # what was typed is kept
    assert await _tokens(proxy) == []
    assert (await admin.get("/admin/tokens/issued/not-an-id")).status == 404


async def test_the_value_page_answers_get_only(admin: AdminPages, proxy: Proxy) -> None:
    """A HEAD (a link checker, a prefetch) must not use up the one showing of the value."""
    project_id = await admin.create_project()
    form = await admin.issue_form(project_id)
    _, location, cookies = await _send(proxy, project_id, form)
    headers = {**ADMIN, "Cookie": f"{COOKIE}={cookies[COOKIE].value}"}
    async with proxy.client.head(location, headers=headers) as response:
        assert response.status == 405
    status, page, _ = await _open(proxy, location, cookies[COOKIE].value)
    assert status == 200 and _VALUE.search(page)


async def test_a_form_whose_post_failed_may_be_sent_again(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project()
    form = await admin.issue_form(project_id)
    url = f"/admin/projects/{project_id}/tokens"
    typo = await admin.post(url, {**form, "duration_minutes": "ten"}, csrf=None)
    assert typo.status == 400
    assert f'name="issue_id" value="{form["issue_id"]}"' in typo.text  # the same form, shown again
    await admin.post(f"/admin/projects/{project_id}/deactivate")
    refused = await admin.post(url, {**form, "duration_minutes": "10"}, csrf=None)
    assert refused.status == 403
    assert await _tokens(proxy) == []
    await admin.post(f"/admin/projects/{project_id}/activate")
    fixed = await admin.post(url, {**form, "duration_minutes": "10"}, csrf=None)
    assert fixed.status == 200 and _VALUE.search(fixed.text)
    assert len(await _tokens(proxy)) == 1


def test_a_sealed_value_opens_only_for_its_page_and_user_and_in_time() -> None:
    handovers = Handovers(b"k" * 32, "admin-secret")
    handed = Handed("token-id", "project-id", "sk-" + "v" * 43)
    form_id = "a" * 22
    sealed = handovers.seal(form_id, handed, "admin")
    assert handovers.open(sealed, form_id, "admin") == handed
    assert "v" * 20 not in sealed
    assert handovers.open(sealed, "b" * 22, "admin") is None
    assert handovers.open(sealed, form_id, "someone") is None
    later = time.time() + HANDOVER_SECONDS + 1
    assert handovers.open(sealed, form_id, "admin", now=later) is None
    assert handovers.open(sealed[:-4] + "AAAA", form_id, "admin") is None
    assert handovers.open("not base64!", form_id, "admin") is None
    assert handovers.open("", form_id, "admin") is None
    # Another server secret, or a changed admin password, opens nothing.
    assert Handovers(b"o" * 32, "admin-secret").open(sealed, form_id, "admin") is None
    assert Handovers(b"k" * 32, "new-password").open(sealed, form_id, "admin") is None


def test_a_sealed_value_is_kept_for_a_repeated_post_only_just_after() -> None:
    handovers = Handovers(b"k" * 32, "pw")
    form_id = "f" * 22
    assert handovers.resendable(form_id, now=0.0) is None
    sealed = handovers.finish(form_id, Handed("t", "p", "sk-x"), "admin", now=1.0)
    assert handovers.open(sealed, form_id, "admin") == Handed("t", "p", "sk-x")
    assert handovers.resendable(form_id, now=2.0) == sealed
    assert handovers.resendable(form_id, now=1.0 + RESEND_SECONDS + 1) is None  # long after
    # Kept no longer than that: a later value forgets the earlier ones.
    handovers.finish("n" * 22, Handed("u", "p", "sk-y"), "admin", now=100.0)
    assert handovers.resendable(form_id, now=2.0) is None
