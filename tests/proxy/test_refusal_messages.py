"""SPEC §6: tokens and the management token never appear in error messages, also where a refusal
names what the client sent (a model in the body or the path) and the client sent a secret there."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from yarl import URL

from tests.conftest import MANAGEMENT_TOKEN, Proxy
from tests.waiting import wait_for_lines

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


def _encodings(secret: str) -> list[str]:
    """``secret`` as a path may carry it: its first letter or its dash percent-encoded, every
    character encoded, and encoded twice."""
    every = "".join(f"%{byte:02X}" for byte in secret.encode())
    first = f"%{ord(secret[0]):02X}{secret[1:]}"
    return [
        first,
        secret.replace("-", "%2D", 1),
        every,
        first.replace("%", "%25"),
        every.replace("%", "%25"),
    ]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _decoded(text: str) -> str:
    """``text`` as a reader decoding it as often as it can would see it."""
    for _ in range(5):
        text = unquote(text)
    return text


async def test_a_secret_percent_encoded_in_a_path_is_never_quoted_in_the_refusal(
    proxy: Proxy,
) -> None:
    other = await proxy.token()  # a withering token of another application, pasted by mistake
    limited = await proxy.token(allowed_models=["gpt-4o"])
    for secret in (other, MANAGEMENT_TOKEN):
        hidden = secret[3:15]  # past its prefix: what a mask never shows
        for encoded in _encodings(secret):
            for method, path, code, bearer in (
                ("GET", f"/v1/unknown/{encoded}", "endpoint_not_found", _bearer(other)),
                ("PUT", f"/v1/models/{encoded}", "method_not_allowed", _bearer(other)),
                ("DELETE", f"/v1/models/{encoded}", "model_not_allowed", _bearer(limited)),
                ("GET", f"/manage/nothing/{encoded}", "not_found", proxy.auth()),
            ):
                # Sent as written: a client's URL would decode the unreserved escapes.
                url = URL(proxy.base_url + path, encoded=True)
                response = await proxy.operator.request(method, url, headers=bearer)
                answer = (await response.read()).decode()
                assert orjson.loads(answer)["error"]["code"] == code, (path, answer)
                assert hidden not in _decoded(answer), (method, path, answer)
    assert proxy.upstream.requests == []


async def test_a_secret_encoded_twice_in_a_path_let_through_is_masked_in_the_event(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """Decoded once, as the allowlist reads it, such a path still holds an escape: the event
    shows it masked all the same (the request itself is forwarded as sent)."""
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(file_event_log=log)
    token = await proxy.token()
    for secret in (token, MANAGEMENT_TOKEN):
        path = f"/v1/files/%25{ord(secret[0]):02X}{secret[1:]}"
        response = await proxy.operator.get(
            URL(proxy.base_url + path, encoded=True), headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status < 500
    events = await wait_for_lines(log, 2)
    assert [event["path"][:12] for event in events] == ["/v1/files/sk", "/v1/files/mg"]
    for event, secret in zip(events, (token, MANAGEMENT_TOKEN), strict=True):
        assert secret[3:15] not in _decoded(event["path"]), event["path"]
