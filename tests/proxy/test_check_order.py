"""SPEC §7's table, row against row: when a request fails several checks, the client is told the
one listed first, and a refused request never reaches the upstream.

Each case sets up a token that fails two (or three) checks at once, the way an operator and a
client would get there (revocation, expiry, a project switched off, a used-up quota, rpm window or
budget), and sends one request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Proxy
from tests.sqlite_writes import write_sqlite

PRICES = "gpt-4o*: {input: 2.50, output: 10.00, max_output_tokens: 16384}\n"
UNKNOWN_TOKEN = "sk-" + "Q" * 43
MAX_BODY = 100_000
# SPEC §7: the refusals retrying cannot fix, which carry x-should-retry: false; no other does.
HOPELESS = frozenset(
    {
        "invalid_token",
        "token_not_found",
        "token_inactive",
        "token_expired",
        "project_inactive",
        "quota_exceeded",
        "budget_exceeded",
        "model_not_allowed",
        "endpoint_not_found",
    }
)


def chat(model: str = "gpt-4o", **fields: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **fields})


@dataclass(frozen=True)
class Case:
    expected: tuple[int, str]
    limits: dict[str, Any] = field(default_factory=dict)  # the token's, at issue
    # What happens to the token before the request, in this order: "expired" (its expires_at
    # passed), "quota_used" (request_count at max_requests), "rpm_full" (one request of an
    # rpm=1 token), "revoked", "project_inactive", "budget_spent".
    states: tuple[str, ...] = ()
    method: str = "POST"
    path: str = "/v1/chat/completions"
    body: bytes | None = chat()
    token: str = "issued"  # or "none", "malformed", "unknown"
    whitelist: bool = False  # param_whitelist {model: [gpt-4o*]}
    oversized: bool = False  # a body declared over MAX_REQUEST_BODY, with its Content-Length


CASES = {
    "disallowed path and method, no token": Case(
        (404, "endpoint_not_found"), method="PUT", path="/v1/unknown", token="none"
    ),
    "disallowed path, malformed token": Case(
        (404, "endpoint_not_found"), path="/v1/unknown", token="malformed"
    ),
    "disallowed method, unknown token": Case(
        (405, "method_not_allowed"), method="PUT", token="unknown"
    ),
    "disallowed method, malformed token": Case(
        (405, "method_not_allowed"), method="PATCH", token="malformed"
    ),
    "disallowed method, expired token": Case(
        (405, "method_not_allowed"), method="PUT", states=("expired",)
    ),
    "revoked and expired": Case((401, "token_inactive"), states=("expired", "revoked")),
    "revoked, project inactive": Case(
        (401, "token_inactive"), states=("revoked", "project_inactive")
    ),
    "expired, project inactive": Case(
        (401, "token_expired"), states=("expired", "project_inactive")
    ),
    "expired, quota used up": Case(
        (401, "token_expired"), {"max_requests": 1}, ("expired", "quota_used")
    ),
    "project inactive, model not allowed": Case(
        (403, "project_inactive"),
        {"allowed_models": ["gpt-4o-mini"]},
        ("project_inactive",),
    ),
    "project inactive, parameter not allowed": Case(
        (403, "project_inactive"),
        states=("project_inactive",),
        body=chat("gpt-3.5-turbo"),
        whitelist=True,
    ),
    "project inactive, quota used up": Case(
        (403, "project_inactive"), {"max_requests": 1}, ("quota_used", "project_inactive")
    ),
    "parameter and model not allowed": Case(
        (400, "param_not_allowed"),
        {"allowed_models": ["gpt-4o"]},
        body=chat("gpt-3.5-turbo"),
        whitelist=True,
    ),
    "parameter not allowed, quota used up": Case(
        (400, "param_not_allowed"),
        {"max_requests": 1},
        ("quota_used",),
        body=chat("gpt-3.5-turbo"),
        whitelist=True,
    ),
    "model not allowed and not priced on a budget": Case(
        (403, "model_not_allowed"),
        {"allowed_models": ["gpt-4o"], "budget_usd": 1},
        body=chat("unpriced-model"),
    ),
    "model not allowed, rpm window full": Case(
        (403, "model_not_allowed"),
        {"allowed_models": ["gpt-4o"], "rpm": 1},
        ("rpm_full",),
        body=chat("gpt-3.5-turbo"),
    ),
    "model not priced, rpm window full": Case(
        (400, "model_not_priced"),
        {"budget_usd": 1, "rpm": 1},
        ("rpm_full",),
        body=chat("unpriced-model"),
    ),
    "model not priced, quota used up": Case(
        (400, "model_not_priced"),
        {"budget_usd": 1, "max_requests": 1},
        ("quota_used",),
        body=chat("unpriced-model"),
    ),
    "model not priced, budget spent": Case(
        (400, "model_not_priced"),
        {"budget_usd": 1},
        ("budget_spent",),
        body=chat("unpriced-model"),
    ),
    "rpm window full, budget spent": Case(
        (429, "rate_limited"), {"budget_usd": 1, "rpm": 1}, ("rpm_full", "budget_spent")
    ),
    "quota used up, budget spent": Case(
        (429, "quota_exceeded"),
        {"budget_usd": 1, "max_requests": 1},
        ("quota_used", "budget_spent"),
    ),
    "rpm window full, quota used up, budget spent": Case(
        (429, "rate_limited"),
        {"budget_usd": 1, "rpm": 1, "max_requests": 1},
        ("rpm_full", "quota_used", "budget_spent"),
    ),
    # A body declared too large is refused unread (SPEC §4: never buffered whole), so after the
    # checks that need no body, the limits included, and before those that would need it.
    "oversized body, no token": Case((401, "invalid_token"), token="none", oversized=True),
    "oversized body, unknown token": Case(
        (401, "token_not_found"), token="unknown", oversized=True
    ),
    "oversized body, project inactive": Case(
        (403, "project_inactive"), states=("project_inactive",), oversized=True
    ),
    "oversized body, rpm window full": Case(
        (429, "rate_limited"), {"rpm": 1}, ("rpm_full",), oversized=True
    ),
    "oversized body, quota used up": Case(
        (429, "quota_exceeded"), {"max_requests": 1}, ("quota_used",), oversized=True
    ),
    "oversized body of a token limited to models": Case(
        (413, "request_too_large"), {"allowed_models": ["gpt-4o"]}, oversized=True
    ),
}


async def _prepare(
    proxy: Proxy, tmp_path: Path, issued: dict[str, Any], states: tuple[str, ...]
) -> None:
    token_id, project_id = issued["id"], issued["project_id"]
    database = tmp_path / "llm-proxy.db"
    for state in states:
        if state == "expired":  # before the token is ever cached
            await write_sqlite(
                database,
                "UPDATE tokens SET expires_at = '2000-01-01T00:00:00.000000Z' WHERE id = ?",
                (token_id,),
            )
        elif state == "quota_used":
            await write_sqlite(
                database, "UPDATE tokens SET request_count = max_requests WHERE id = ?", (token_id,)
            )
        elif state == "rpm_full":
            response = await proxy.client.get(
                "/v1/models", headers={"Authorization": f"Bearer {issued['token']}"}
            )
            assert response.status == 200, await response.text()
        elif state == "revoked":
            assert (await proxy.manage("DELETE", f"/tokens/{token_id}"))[0] == 204
        elif state == "project_inactive":
            status, _ = await proxy.manage("PATCH", f"/projects/{project_id}", {"is_active": False})
            assert status == 200
        elif state == "budget_spent":
            await write_sqlite(
                database,
                "UPDATE tokens SET spent_nanousd = budget_nanousd WHERE id = ?",
                (token_id,),
            )
        else:
            raise AssertionError(state)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_the_earlier_row_of_the_table_is_the_refusal(
    proxy_factory: Any, tmp_path: Path, case: Case
) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    api = {"param_whitelist": {"model": ["gpt-4o*"]}} if case.whitelist else {}
    proxy: Proxy = await proxy_factory(prices_path=prices, api=api, max_request_body_bytes=MAX_BODY)
    issued = await proxy.issue_token(**case.limits)
    await _prepare(proxy, tmp_path, issued, case.states)
    forwarded = len(proxy.upstream.requests)
    credential = {
        "issued": f"Bearer {issued['token']}",
        "unknown": f"Bearer {UNKNOWN_TOKEN}",
        "malformed": "Bearer sk-short",
        "none": None,
    }[case.token]
    headers = {"Content-Type": "application/json"}
    if credential is not None:
        headers["Authorization"] = credential
    body = chat(padding="x" * MAX_BODY) if case.oversized else case.body
    response = await proxy.client.request(case.method, case.path, data=body, headers=headers)
    answer = await response.json()
    assert set(answer["error"]) == {"message", "type", "code"}
    assert (response.status, answer["error"]["code"]) == case.expected, answer
    assert len(proxy.upstream.requests) == forwarded
    code = case.expected[1]
    assert (response.headers.get("x-should-retry") == "false") == (code in HOPELESS)
    if code == "rate_limited":
        assert 1 <= int(response.headers["Retry-After"]) <= 60
