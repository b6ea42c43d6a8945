"""SPEC §6: tokens and the management token never appear in error messages, also where a refusal
names what the client sent (a model in the body or the path) and the client sent a secret there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import MANAGEMENT_TOKEN, Proxy

PRICES = "gpt-4o*: {input: 2.50, output: 10.00, max_output_tokens: 16384}\n"


@pytest.fixture
async def proxy(proxy_factory: Any, tmp_path: Path) -> Proxy:
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    started: Proxy = await proxy_factory(prices_path=prices)
    return started


async def test_a_secret_sent_as_the_model_is_never_quoted_in_the_refusal(proxy: Proxy) -> None:
    limited = await proxy.token(allowed_models=["gpt-4o"])
    budgeted = await proxy.token(budget_usd=1)
    other = await proxy.token()  # a withering token of another application, pasted by mistake
    for secret in (other, MANAGEMENT_TOKEN):
        body = orjson.dumps({"model": secret, "messages": [{"role": "user", "content": "hi"}]})
        for token, method, path, data, code in (
            (limited, "POST", "/v1/chat/completions", body, "model_not_allowed"),
            (limited, "DELETE", f"/v1/models/{secret}", None, "model_not_allowed"),
            (budgeted, "POST", "/v1/chat/completions", body, "model_not_priced"),
        ):
            response = await proxy.client.request(
                method,
                path,
                data=data,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            answer = await response.read()
            assert orjson.loads(answer)["error"]["code"] == code
            # Named masked, as every message names a secret (no more than its first characters).
            assert secret[:12].encode() not in answer, (code, method)
    assert proxy.upstream.requests == []
