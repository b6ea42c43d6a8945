"""Issuing from the pages of several instances sharing one database (behind a load balancer each
request may reach another), on each backend: one token per form, its value shown once."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from tests.admin_ui.conftest import AdminPages
from tests.admin_ui.test_issuing import _open, _send, _tokens
from tests.conftest import Proxy

_VALUE = re.compile(r'id="token-value" value="(sk-[A-Za-z0-9_-]+)"')


@pytest.fixture
def proxy_database_url(database_url: str) -> str:
    return database_url


async def test_one_form_sent_to_every_instance_issues_one_token(proxy_factory: Any) -> None:
    instances: list[Proxy] = [await proxy_factory(), await proxy_factory()]
    admin = AdminPages(instances[0])
    project_id = await admin.create_project()
    form = await admin.issue_form(project_id)
    page = f"/admin/tokens/issued/{form['issue_id']}"

    # Sent again and again, to each instance in turn, then to both at once.
    answers = [await _send(instances[n % 2], project_id, form) for n in range(4)]
    answers += await asyncio.gather(*(_send(instances[n % 2], project_id, form) for n in range(6)))
    assert {(status, location) for status, location, _ in answers} == {(303, page)}
    assert len(await _tokens(instances[1])) == 1
    _, audit = await instances[1].manage("GET", "/audit?action=token.create")
    assert audit["pagination"]["total"] == 1

    # All at once on a new rendering: one post issues, the others wait for it and follow it.
    form = await admin.issue_form(project_id)
    answers = await asyncio.gather(*(_send(instances[n % 2], project_id, form) for n in range(6)))
    assert {(status, location) for status, location, _ in answers} == {
        (303, f"/admin/tokens/issued/{form['issue_id']}")
    }
    assert len(await _tokens(instances[0])) == 2


async def test_an_issued_value_is_shown_once_whichever_instance_is_asked(
    proxy_factory: Any,
) -> None:
    instances: list[Proxy] = [await proxy_factory(), await proxy_factory()]
    admin = AdminPages(instances[0])
    project_id = await admin.create_project()
    form = await admin.issue_form(project_id)
    status, location, cookies = await _send(instances[0], project_id, form)
    assert status == 303
    sealed = cookies["llm_proxy_issued_token"].value

    # A client that keeps sending the cookie: one page shows the value, whichever instance.
    pages = [await _open(instances[1 - n % 2], location, sealed) for n in range(4)]
    pages += await asyncio.gather(*(_open(instances[n % 2], location, sealed) for n in range(4)))
    shown = [status for status, page, _ in pages if _VALUE.search(page)]
    assert shown == [200]
    assert [status for status, _, _ in pages[1:]] == [410] * 7
    (token,) = await _tokens(instances[0])
    for _, page, _ in pages[1:]:  # each refusal links the token the form issued
        assert f'href="/admin/tokens/{token["id"]}"' in page

    # Sent again now, the form leads to the same page, without the value shown there already.
    status, again, cookies = await _send(instances[1], project_id, form)
    assert (status, again) == (303, location) and not cookies
