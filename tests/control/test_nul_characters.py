"""A NUL character anywhere in a management body is a 400 naming its field, on every backend:
PostgreSQL stores none in text or JSON, and a 500 from it is not an answer."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Proxy


@pytest.fixture
def proxy_database_url(database_url: str) -> str:
    return database_url


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/projects", {"name": "a\x00b", "api_key": "sk-up"}, "name"),
        ("/projects", {"name": "p", "api_key": "sk-\x00"}, "api_key"),
        ("/projects", {"name": "p", "api_key": "sk-up", "description": "\x00"}, "description"),
        ("/projects", {"name": "p", "api_key": "sk-up", "metadata": {"k\x00": 1}}, "metadata"),
        (
            "/projects",
            {"name": "p", "api_key": "sk-up", "metadata": {"k": [[["\x00"]]]}},
            "metadata",
        ),
    ],
)
async def test_a_nul_in_a_project_is_refused_by_name(
    proxy: Proxy, path: str, body: dict[str, Any], field: str
) -> None:
    status, answer = await proxy.manage("POST", path, body)
    assert status == 400, answer
    assert field in answer["error"]["message"] and "NUL" in answer["error"]["message"]
    status, projects = await proxy.manage("GET", "/projects")
    assert (status, projects) == (200, [])


async def test_a_nul_in_a_token_is_refused_and_the_text_of_one_is_not(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    base = {"project_id": project_id, "duration_minutes": 5}
    for extra in ({"allowed_models": ["gpt-4o\x00"]}, {"metadata": {"run": "a\x00"}}):
        status, answer = await proxy.manage("POST", "/tokens", {**base, **extra})
        assert status == 400 and "NUL" in answer["error"]["message"], answer
    # The six characters "\u0000" are ordinary text.
    status, issued = await proxy.manage("POST", "/tokens", {**base, "metadata": {"run": "\\u0000"}})
    assert status == 201, issued
    assert issued["metadata"] == {"run": "\\u0000"}
    for depth in (300, 1010, 5000):
        raw = (
            f'{{"project_id": "{project_id}", "duration_minutes": 5, "metadata": {{"n": '
            + "[" * depth
            + '"deep"'
            + "]" * depth
            + "}}"
        )
        response = await proxy.operator.post(
            f"{proxy.base_url}/manage/tokens",
            data=raw,
            headers={**proxy.auth(), "Content-Type": "application/json"},
        )
        answer = await response.json()
        assert response.status == 400, answer  # too deep to keep, and never a 500
        assert answer["error"]["code"] in ("invalid_field", "invalid_json"), answer
