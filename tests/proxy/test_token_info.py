"""A withering token can read its own expiry and remaining quota, and nothing secret."""

from __future__ import annotations

from typing import Any

from tests.conftest import UPSTREAM_KEY, Proxy


async def test_token_reads_its_own_expiry_and_quota(proxy: Proxy) -> None:
    issued = await proxy.issue_token(max_requests=3, minutes=10)
    headers = {"Authorization": f"Bearer {issued['token']}"}
    await proxy.client.get("/v1/models", headers=headers)
    response = await proxy.client.get("/v1/llm-proxy/token", headers=headers)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    # Answered by the proxy itself: the response's x-request-id is the proxy's.
    assert response.headers["X-Request-ID"] == response.headers["LLM-Proxy-Request-ID"]
    info = await response.json()
    assert info["token_id"] == issued["id"]
    assert info["expires_at"] == issued["expires_at"]
    assert 0 < info["expires_in_seconds"] <= 600
    assert (info["max_requests"], info["request_count"], info["remaining_requests"]) == (3, 1, 2)
    assert "/v1/chat/completions" in info["allowed_endpoints"]
    text = await response.text()
    assert issued["token"] not in text and UPSTREAM_KEY not in text
    # Asking does not use up the quota.
    again = await (await proxy.client.get("/v1/llm-proxy/token", headers=headers)).json()
    assert again["remaining_requests"] == 2


async def test_unlimited_token_and_refusals(proxy: Proxy) -> None:
    issued = await proxy.issue_token()
    headers = {"Authorization": f"Bearer {issued['token']}"}
    info = await (await proxy.client.get("/v1/llm-proxy/token", headers=headers)).json()
    assert info["max_requests"] is None and info["remaining_requests"] is None
    assert proxy.upstream.requests == []  # never forwarded
    refused = await proxy.client.get("/v1/llm-proxy/token")
    assert refused.status == 401
    assert (await refused.json())["error"]["code"] == "invalid_token"
    post = await proxy.client.post("/v1/llm-proxy/token", headers=headers)
    assert post.status == 405
    await proxy.manage("DELETE", f"/tokens/{issued['id']}")
    revoked = await proxy.client.get("/v1/llm-proxy/token", headers=headers)
    assert (await revoked.json())["error"]["code"] == "token_inactive"


async def test_a_token_reads_its_limits_as_its_answers_carry_them(proxy: Proxy) -> None:
    issued = await proxy.issue_token(
        max_requests=5, rpm=30, tpm=1000, budget_usd=2.5, allowed_models=["gpt-4o-mini*"]
    )
    headers = {"Authorization": f"Bearer {issued['token']}"}
    proxied = await proxy.client.get("/v1/models", headers=headers)
    response = await proxy.client.get("/v1/llm-proxy/token", headers=headers)
    info = await response.json()
    assert (info["rpm"], info["tpm"], info["budget_usd"], info["spent_usd"]) == (30, 1000, 2.5, 0.0)
    assert info["allowed_models"] == ["gpt-4o-mini*"]
    assert info["remaining_requests"] == 4
    for name in ("LLM-Proxy-Token-Expires-At", "LLM-Proxy-Remaining-Requests"):
        assert response.headers[name] == proxied.headers[name]


async def test_a_browser_may_preflight_the_token_info_path(proxy_factory: Any) -> None:
    """A page on an allowed origin asks with an Authorization header, so its browser sends a
    preflight first: answered without a token, as on every other path of the proxy."""
    proxy: Proxy = await proxy_factory(api={"allowed_origins": ["https://app.example"]})
    response = await proxy.client.options(
        "/v1/llm-proxy/token",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "GET" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization"
    assert proxy.upstream.requests == []
