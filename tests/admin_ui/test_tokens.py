"""Tokens from the pages: issue (value shown once), usage, limits, revoke, list."""

from __future__ import annotations

import re
from collections.abc import Callable
from html import unescape
from typing import Any

import pytest

from llm_proxy.control import validation
from llm_proxy.control.operations import MAX_COUNT, MAX_DURATION_MINUTES
from llm_proxy.errors import InvalidField
from tests.admin_ui.conftest import ADMIN, AdminPages
from tests.conftest import Proxy

_VALUE = re.compile(r'id="token-value" value="(sk-[A-Za-z0-9_-]+)"')


def api_says(check: Callable[[dict[str, Any], str], object], key: str, value: object) -> str:
    """What the management API answers for ``value`` in ``key``: the pages say the same."""
    with pytest.raises(InvalidField) as refused:
        check({key: value}, key)
    return refused.value.message


def out_of_range(key: str, value: int, maximum: int = MAX_COUNT) -> str:
    return api_says(
        lambda body, k: validation.integer(body, k, minimum=1, maximum=maximum), key, value
    )


def bad_budget(value: float) -> str:
    return api_says(validation.dollars, "budget_usd", value)


async def _call(proxy: Proxy, token: str) -> tuple[int, str]:
    async with proxy.client.get(
        "/v1/models", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, await response.text()


async def _issue(admin: AdminPages, project_id: str, **fields: str) -> tuple[str, str]:
    page = await admin.issue_token(project_id, **fields)
    assert page.status == 200, page.text
    match = _VALUE.search(page.text)
    assert match
    token_id = re.search(r'/admin/tokens/([0-9a-f-]{36})"', page.text)
    assert token_id
    return match.group(1), token_id.group(1)


async def test_issued_token_is_shown_once_with_an_sdk_snippet(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project("sdk")
    page = await admin.issue_token(project_id, duration_minutes="45", max_requests="7")
    assert page.status == 200
    assert "/admin/tokens/issued/" in page.url
    assert page.headers["Cache-Control"] == "no-store"
    match = _VALUE.search(page.text)
    assert match
    token = match.group(1)
    assert f'OpenAI(base_url="{proxy.base_url}/v1", api_key="{token}")' in page.text.replace(
        "&#34;", '"'
    )
    assert "expires in 44 min" in page.text or "expires in 45 min" in page.text
    assert "at most 7 requests" in page.text
    assert "copy.js" in page.text
    assert (await _call(proxy, token))[0] == 200

    _, tokens = await proxy.manage("GET", f"/tokens?project_id={project_id}")
    assert [(t["max_requests"], t["request_count"]) for t in tokens] == [(7, 1)]


async def _shown_page_of_a_new_token(admin: AdminPages, project_name: str) -> str:
    """Issue a token on a new project through the form; where its value is shown, once."""
    project_id = await admin.create_project(project_name)
    form = await admin.issue_form(project_id)
    sent = await admin.post(
        f"/admin/projects/{project_id}/tokens",
        {**form, "duration_minutes": "5"},
        csrf=None,
        follow=False,
    )
    assert sent.status == 303
    return str(sent.headers["Location"])


async def test_the_sdk_snippet_keeps_the_scheme_the_browser_used_behind_a_tls_balancer(
    admin: AdminPages, proxy: Proxy
) -> None:
    # A load balancer ending TLS reaches the server over http and says so in X-Forwarded-Proto.
    shown_at = await _shown_page_of_a_new_token(admin, "behind-tls")
    headers = {**ADMIN, "Host": "llm.example.com", "X-Forwarded-Proto": "https"}
    async with proxy.client.get(shown_at, headers=headers) as response:
        assert response.status == 200
        page = unescape(await response.text())
    assert 'OpenAI(base_url="https://llm.example.com/v1", api_key="sk-' in page
    assert 'OPENAI_BASE_URL="https://llm.example.com/v1"' in page


async def test_a_host_no_url_can_hold_never_loses_the_value(
    admin: AdminPages, proxy: Proxy
) -> None:
    # Such a Host raised after the value was marked shown (a 500, the value lost for good); the
    # front door now refuses it before any page runs, and the value waits for a proper request.
    shown_at = await _shown_page_of_a_new_token(admin, "odd-host")
    async with proxy.client.get(shown_at, headers={**ADMIN, "Host": "a:b:c"}) as response:
        assert response.status == 400
    async with proxy.client.get(shown_at, headers=ADMIN) as response:
        assert response.status == 200
        assert _VALUE.search(await response.text())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"duration_minutes": ""}, "duration_minutes: is required"),
        ({"duration_minutes": "0"}, out_of_range("duration_minutes", 0, MAX_DURATION_MINUTES)),
        (
            {"duration_minutes": "525601"},
            out_of_range("duration_minutes", 525601, MAX_DURATION_MINUTES),
        ),
        ({"duration_minutes": "ten"}, "duration_minutes: must be a whole number"),
        (
            {"duration_minutes": "1" * 30},
            out_of_range("duration_minutes", int("1" * 30), MAX_DURATION_MINUTES),
        ),
        ({"duration_minutes": "10", "max_requests": "0"}, out_of_range("max_requests", 0)),
        ({"duration_minutes": "10", "max_requests": "1.5"}, "max_requests: must be a whole number"),
        ({"rpm": "0"}, out_of_range("rpm", 0)),
        ({"rpm": "60.0"}, "rpm: must be a whole number"),
        ({"tpm": "1.5"}, "tpm: must be a whole number"),
        ({"tpm": "-100"}, out_of_range("tpm", -100)),
        ({"budget_usd": "ten"}, "budget_usd: must be an amount in US dollars"),
        ({"budget_usd": "1e3"}, "budget_usd: must be an amount in US dollars"),
        ({"budget_usd": "0"}, bad_budget(0.0)),
        ({"budget_usd": "-3"}, bad_budget(-3.0)),
        ({"budget_usd": "2,000,000"}, bad_budget(2_000_000.0)),
        ({"budget_usd": "0.0000000001"}, bad_budget(1e-10)),
        ({"allowed_models": "x" * 201}, "allowed_models: every pattern must be at most 200"),
        (
            {"allowed_models": "\n".join(f"m{n}" for n in range(101))},
            "allowed_models: must have at most 100 patterns",
        ),
        ({"metadata": "{nope"}, "metadata: must be a JSON object"),
        ({"metadata": "[1, 2]"}, "metadata: must be a JSON object"),
        ({"metadata": '"text"'}, "metadata: must be a JSON object"),
        ({"metadata": '{"blob": "%s"}' % ("x" * 17_000)}, "metadata: must be at most 16384 bytes"),
        # As the API refuses them: one of the values would be dropped, or digits lost for good.
        ({"metadata": '{"team": "a", "team": "b"}'}, "metadata: the key 'team' is given twice"),
        ({"metadata": '{"n": 123456789012345678901234567890}'}, "does not fit in 64 bits"),
    ],
)
async def test_invalid_token_form_is_shown_again_and_issues_nothing(
    admin: AdminPages, proxy: Proxy, fields: dict[str, str], message: str
) -> None:
    project_id = await admin.create_project()
    form = await admin.issue_form(project_id)
    page = await admin.post(
        f"/admin/projects/{project_id}/tokens",
        {**form, "duration_minutes": "10", **fields},
        csrf=None,
    )
    assert page.status == 400
    assert message in unescape(page.text)
    (field,) = set(fields) - {"duration_minutes"} or {"duration_minutes"}
    assert re.search(rf'class="field has-error">\s*<label for="{field}"', page.text)
    assert "token-value" not in page.text
    assert (await proxy.manage("GET", "/tokens"))[1] == []


async def test_token_page_shows_usage_as_it_happens(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project()
    token, token_id = await _issue(admin, project_id)
    page = await admin.get(f"/admin/tokens/{token_id}")
    assert '<div class="value" id="request-count">0</div>' in page.text
    assert "never" in page.text
    for _ in range(3):
        assert (await _call(proxy, token))[0] == 200
    page = await admin.get(f"/admin/tokens/{token_id}")
    assert '<div class="value" id="request-count">3</div>' in page.text
    assert "just now" in page.text
    assert (
        '3 <span class="secondary">/ ∞</span>'
        in (await admin.get(f"/admin/projects/{project_id}")).text
    )


async def test_quota_can_be_set_changed_and_cleared(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project()
    token, token_id = await _issue(admin, project_id, max_requests="5")
    assert (await _call(proxy, token))[0] == 200

    page = await admin.post(f"/admin/tokens/{token_id}/quota", {"max_requests": "1"})
    assert "Quota saved" in page.text
    assert "badge-exhausted" in page.text
    status, body = await _call(proxy, token)
    assert (status, "quota_exceeded" in body) == (429, True)

    page = await admin.post(f"/admin/tokens/{token_id}/quota", {"max_requests": ""})
    assert "no quota" in page.text
    assert (await _call(proxy, token))[0] == 200

    page = await admin.post(f"/admin/tokens/{token_id}/quota", {"max_requests": "-3"})
    assert page.status == 400
    assert out_of_range("max_requests", -3) in unescape(page.text)
    assert 'value="-3"' in page.text
    assert (await proxy.manage("GET", f"/tokens/{token_id}"))[1]["max_requests"] is None

    # Digits that are not ASCII ones, and a doubled sign: a form error, never a 500.
    for odd in ("²", "--5", "5²"):
        page = await admin.post(f"/admin/tokens/{token_id}/quota", {"max_requests": odd})
        assert page.status == 400 and "whole number" in page.text
    assert (await proxy.manage("GET", f"/tokens/{token_id}"))[1]["max_requests"] is None


async def test_revoked_token_is_refused_on_the_next_request(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project()
    token, token_id = await _issue(admin, project_id)
    page = await admin.post(f"/admin/tokens/{token_id}/revoke")
    assert page.url.endswith(f"/admin/tokens/{token_id}?notice=token_revoked")
    assert "Token revoked" in page.text and "badge-revoked" in page.text
    assert "Revoke token" not in page.text
    status, body = await _call(proxy, token)
    assert (status, "token_inactive" in body) == (401, True)
    again = await admin.post(f"/admin/tokens/{token_id}/revoke")
    assert again.status == 200


async def test_token_list_filters_by_status(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project("listed")
    _, live_id = await _issue(admin, project_id)
    _, dead_id = await _issue(admin, project_id)
    await admin.post(f"/admin/tokens/{dead_id}/revoke")
    everything = await admin.get("/admin/tokens")
    assert live_id[:8] in everything.text and dead_id[:8] in everything.text
    active = await admin.get("/admin/tokens?status=active")
    assert live_id[:8] in active.text and dead_id[:8] not in active.text
    revoked = await admin.get("/admin/tokens?status=revoked")
    assert live_id[:8] not in revoked.text and dead_id[:8] in revoked.text
    assert "No expired tokens" in (await admin.get("/admin/tokens?status=expired")).text


ISSUE_LIMITS = {
    "max_requests": "50",
    "rpm": "60",
    "tpm": "10,000",
    "budget_usd": "$12.50",
    "allowed_models": "gpt-4o-mini, gpt-4.1*\ngpt-4o-mini\n\n  o3 ,",
    "metadata": '{"user": "ada", "team": "search"}',
}
LIMITS_READ_BACK = {
    "max_requests": 50,
    "rpm": 60,
    "tpm": 10_000,
    "budget_usd": 12.5,
    "allowed_models": ["gpt-4o-mini", "gpt-4.1*", "o3"],
}


def _stat(html: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}">([^<]*)<', html)
    assert match, element_id
    return unescape(match.group(1))


async def test_a_token_issued_with_every_limit_shows_them_everywhere(
    admin: AdminPages, proxy: Proxy
) -> None:
    project_id = await admin.create_project("limited")
    page = await admin.issue_token(project_id, **ISSUE_LIMITS)
    assert page.status == 200, page.text
    assert "60 rpm · 10,000 tpm" in page.text
    assert "$12.50" in page.text
    assert "<code>gpt-4o-mini</code>, <code>gpt-4.1*</code>, <code>o3</code>" in page.text
    assert '"user": "ada"' in unescape(page.text)
    token_id = re.search(r'/admin/tokens/([0-9a-f-]{36})"', page.text)
    assert token_id

    _, token = await proxy.manage("GET", f"/tokens/{token_id.group(1)}")
    assert {key: token[key] for key in LIMITS_READ_BACK} == LIMITS_READ_BACK
    assert token["metadata"] == {"user": "ada", "team": "search"}

    detail = (await admin.get(f"/admin/tokens/{token['id']}")).text
    assert _stat(detail, "spent-usd") == "$0.00"
    assert _stat(detail, "budget-usd") == "$12.50"
    assert _stat(detail, "reserved-usd") == "$0.00"
    assert (_stat(detail, "rpm-limit"), _stat(detail, "tpm-limit")) == ("60", "10,000")
    assert "<code>gpt-4.1*</code>" in detail
    assert '"team": "search"' in unescape(detail)
    # The limits form starts from the current limits.
    assert 'id="rpm" name="rpm" value="60"' in detail
    assert 'id="budget_usd" name="budget_usd" value="12.5"' in detail
    assert ">gpt-4o-mini\ngpt-4.1*\no3</textarea>" in detail

    # The token list and the project's token table give the status, spend, budget and limits.
    for path in ("/admin/tokens", f"/admin/projects/{project_id}"):
        listing = (await admin.get(path)).text
        row = next(r for r in listing.split("<tr>") if token["id"][:8] in r)
        assert "$0.00" in row and "/ $12.50" in row, path
        assert "60 rpm · 10,000 tpm" in row, path
        assert "<code>gpt-4o-mini</code>, <code>gpt-4.1*</code>, <code>o3</code>" in row, path
        assert "badge-active" in row, path


async def test_a_token_without_limits_reads_as_unlimited(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project()
    _, token_id = await _issue(admin, project_id)
    detail = (await admin.get(f"/admin/tokens/{token_id}")).text
    assert "no budget" in detail and "any model" in detail
    assert (_stat(detail, "rpm-limit"), _stat(detail, "tpm-limit")) == ("∞", "∞")
    _, token = await proxy.manage("GET", f"/tokens/{token_id}")
    assert {key: token[key] for key in LIMITS_READ_BACK} == dict.fromkeys(LIMITS_READ_BACK)
    assert token["metadata"] == {}


async def test_limits_can_be_set_changed_and_cleared(admin: AdminPages, proxy: Proxy) -> None:
    project_id = await admin.create_project()
    _, token_id = await _issue(admin, project_id)
    limits = {key: value for key, value in ISSUE_LIMITS.items() if key != "metadata"}

    page = await admin.post(f"/admin/tokens/{token_id}/quota", limits)
    assert page.status == 200 and "Quota saved" in page.text
    _, token = await proxy.manage("GET", f"/tokens/{token_id}")
    assert {key: token[key] for key in LIMITS_READ_BACK} == LIMITS_READ_BACK

    # Saving the form as shown changes nothing, so nothing is audited.
    form = {
        "max_requests": "50",
        "rpm": "60",
        "tpm": "10000",
        "budget_usd": "12.5",
        "allowed_models": "gpt-4o-mini\ngpt-4.1*\no3",
    }
    await admin.post(f"/admin/tokens/{token_id}/quota", form)
    await admin.post(f"/admin/tokens/{token_id}/quota", {**form, "rpm": "", "budget_usd": "7"})
    _, token = await proxy.manage("GET", f"/tokens/{token_id}")
    assert (token["rpm"], token["budget_usd"], token["tpm"]) == (None, 7, 10_000)
    _, audit = await proxy.manage("GET", f"/audit?target_id={token_id}&action=token.update")
    assert [event["details"]["changed"] for event in audit["events"]] == [
        ["budget_usd", "rpm"],
        sorted(LIMITS_READ_BACK),
    ]
    assert audit["events"][0]["details"]["rpm"] is None

    page = await admin.post(f"/admin/tokens/{token_id}/quota", dict.fromkeys(form, ""))
    assert "no budget" in page.text and "any model" in page.text
    _, token = await proxy.manage("GET", f"/tokens/{token_id}")
    assert {key: token[key] for key in LIMITS_READ_BACK} == dict.fromkeys(LIMITS_READ_BACK)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rpm": "0"}, out_of_range("rpm", 0)),
        ({"tpm": "lots"}, "tpm: must be a whole number"),
        ({"budget_usd": "-1"}, bad_budget(-1.0)),
        ({"allowed_models": "ok, " + "x" * 201}, "allowed_models: every pattern must be at most"),
    ],
)
async def test_invalid_limits_are_shown_again_and_change_nothing(
    admin: AdminPages, proxy: Proxy, fields: dict[str, str], message: str
) -> None:
    project_id = await admin.create_project()
    _, token_id = await _issue(admin, project_id, rpm="30")
    page = await admin.post(f"/admin/tokens/{token_id}/quota", {"tpm": "100", **fields})
    assert page.status == 400
    assert message in unescape(page.text)
    (field,) = fields
    assert re.search(rf'class="field has-error">\s*<label for="{field}"', page.text)
    assert f"{fields[field]}</textarea>" in page.text or f'value="{fields[field]}"' in page.text
    _, token = await proxy.manage("GET", f"/tokens/{token_id}")
    assert (token["rpm"], token["tpm"]) == (30, None)
