"""The document's request schemas are exactly as strict as the API: for every body tried, the
schema's verdict (valid or not) is the server's (2xx or 400).

Each field is tried with values either side of every rule the API applies (types, bounds, blank
strings, null, unknown keys, lengths counted as sent), one field at a time on a valid body, then in
random combinations from a fixed seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from llm_proxy.control.operations import MAX_COUNT, MAX_TOKEN_METADATA_BYTES
from tests.conftest import UPSTREAM_KEY, Proxy
from tests.control.test_openapi_document import component, served_document

DROP: Any = object()  # the field left out
WHOLE_BODIES = [None, [], ["name"], "text", 5, True, {}]
TEXT = ["x", "  padded  ", "", " ", "\u00a0\t", "\u3000x", "\u200b", None, 5, True, [], {}, DROP]
# Control characters inside a name, and around it (trimmed); a description keeps tabs and line
# breaks inside.
NAMES = ["a\nb", "a\tb", "a\x1b[2J", "\tname\r\n", "a\x85b", "a\u2028b", "\x1f"]
DESCRIPTIONS = ["a\r\nb", "a\tb", "a\x0bb", "a\x1b[2J", "bell\x07", "\x85", "\r\n x \r\n"]
# Control characters inside an upstream key, and around it (trimmed).
KEYS = ["sk-a\nb", "sk-a\rX: y", "sk-a\tb", "sk-\x7f", "sk-\x85x", "\tsk-a\r\n", "sk-a\x85", "\x1f"]
COUNTS = [
    1,
    286,
    MAX_COUNT,
    MAX_COUNT + 1,
    0,
    -1,
    286.0,
    1e3,
    286.5,
    float(MAX_COUNT),
    1e19,
    2**64,
    1e300,
    "60",
    True,
    False,
    None,
    [1],
    {},
    DROP,
]
BUDGETS = [
    1e-9,
    9.9e-10,
    1e-10,
    0,
    -5,
    0.1,
    12.5,
    5,
    1_000_000,
    1_000_000.01,
    1_000_001,
    1e300,
    True,
    "5",
    None,
    [],
    DROP,
]
MODELS = [
    ["gpt-4o"],
    [" o3 ", "o3"],
    [],
    [""],
    ["  "],
    ["\u00a0"],
    ["\u200b"],
    [5],
    [None],
    None,
    "gpt-4o",
    {"gpt-4o": True},
    ["x" * 200],
    ["x" * 201],
    [" " + "x" * 199],
    [" " + "x" * 200],
    [f"m{n}" for n in range(100)],
    ["m"] * 100,
    ["m"] * 101,
    DROP,
]
BOOLEANS = [True, False, None, 0, 1, "true", DROP]


def _sized(size: int, text: str = "x") -> dict[str, Any]:
    """Token metadata of exactly ``size`` bytes as compact JSON."""
    shell = len(orjson.dumps({"blob": ""}))
    unit = len(text.encode())
    return {"blob": text * ((size - shell) // unit) + "x" * ((size - shell) % unit)}


METADATA = [
    {},
    {"team": "search", "tags": ["a"], "nested": {"n": 1.5}},
    None,
    [1],
    "team=a",
    5,
    _sized(MAX_TOKEN_METADATA_BYTES),
    _sized(MAX_TOKEN_METADATA_BYTES + 1),
    _sized(MAX_TOKEN_METADATA_BYTES, "é"),
    _sized(MAX_TOKEN_METADATA_BYTES + 1, "é"),
    DROP,
]
TOKEN_LIMITS = {
    "max_requests": COUNTS,
    "rpm": COUNTS,
    "tpm": COUNTS,
    "budget_usd": BUDGETS,
    "allowed_models": MODELS,
}
UNKNOWN = [{"colour": "red"}, {"id": "x"}, {"spent_usd": 0}, {"": 1}]


def _fields(name: str, project_id: str, token: str) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """A valid body of the schema ``name``, and the values to try in each of its fields."""
    if name == "ProjectCreate":
        return {"name": "demo", "api_key": UPSTREAM_KEY}, {
            "name": [*TEXT, *NAMES, "x" * 200, "x" * 201, " " + "x" * 199, "x" * 199 + "  "],
            "api_key": [*TEXT, *KEYS, "k" * 1000, "k" * 1001],
            "description": [*TEXT, *DESCRIPTIONS, "d" * 2000, "d" * 2001],
            "metadata": METADATA,
            "is_active": BOOLEANS,
        }
    if name == "ProjectUpdate":
        return {"name": "renamed"}, {
            "name": [*TEXT, *NAMES, "x" * 200, "x" * 201],
            "api_key": [*TEXT, *KEYS, "k" * 1001],
            "description": [*TEXT, *DESCRIPTIONS, "d" * 2000, "d" * 2001],
            "metadata": METADATA,
            "is_active": BOOLEANS,
            "revoke_tokens": BOOLEANS,
            "project_id": [project_id, DROP],
        }
    if name == "TokenCreate":
        return {"project_id": project_id, "duration_minutes": 5}, {
            "project_id": [f" {project_id} ", "", "  ", None, 5, "p" * 101, DROP],
            "duration_minutes": [
                *(value for value in COUNTS if value != float(MAX_COUNT)),
                525_600,
                525_601,
                5.0,
            ],
            **TOKEN_LIMITS,
            "metadata": METADATA,
            "is_active": [True, DROP],
        }
    if name == "TokenUpdate":
        return {"rpm": 5}, {
            "is_active": BOOLEANS,
            **TOKEN_LIMITS,
            "metadata": [{}, None, DROP],
            "duration_minutes": [5, DROP],
        }
    assert name == "TokenRevoke"
    return {"token": token}, {
        "token": [f"  {token}\n", "", "   ", None, 5, [token], "x" * 301, DROP],
        "project_id": [project_id, DROP],
    }


def _with(body: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    changed = {**body, **changes}
    return {key: value for key, value in changed.items() if value is not DROP}


def _corpus(base: dict[str, Any], fields: dict[str, list[Any]]) -> Iterator[Any]:
    yield base
    yield from WHOLE_BODIES
    for extra in UNKNOWN:
        yield {**base, **extra}
    for key, values in fields.items():
        for value in values:
            yield _with(base, {key: value})
    # Combinations: several fields wrong (or right) at once.
    rng = random.Random(f"{sorted(fields)}")
    for _ in range(40):
        chosen = rng.sample(sorted(fields), k=min(3, len(fields)))
        yield _with(base, {key: rng.choice(fields[key]) for key in chosen})


async def _send(proxy: Proxy, method: str, path: str, body: Any) -> tuple[int, Any]:
    """``body`` as JSON, whatever it is (null, a bare string, an integer past 64 bits)."""
    response = await proxy.operator.request(
        method,
        f"{proxy.base_url}/manage{path}",
        data=json.dumps(body).encode(),
        headers={**proxy.auth(), "Content-Type": "application/json"},
    )
    return response.status, await response.json() if response.status != 204 else None


@pytest.mark.parametrize(
    ("schema", "method", "path"),
    [
        ("ProjectCreate", "POST", "/projects"),
        ("ProjectUpdate", "PATCH", "/projects/{project_id}"),
        ("TokenCreate", "POST", "/tokens"),
        ("TokenUpdate", "PATCH", "/tokens/{token_id}"),
        ("TokenRevoke", "DELETE", "/tokens"),
    ],
)
async def test_the_schema_and_the_api_agree_on_every_body(
    proxy: Proxy, schema: str, method: str, path: str
) -> None:
    document = await served_document(proxy)
    body_schema = document["paths"]["/manage" + path][method.lower()]["requestBody"]
    assert body_schema["content"]["application/json"]["schema"] == {
        "$ref": f"#/components/schemas/{schema}"
    }
    validator = component(document, schema)
    issued = await proxy.issue_token()
    project_id, token_id = issued["project_id"], issued["id"]
    url = path.format(project_id=project_id, token_id=token_id)
    base, fields = _fields(schema, project_id, issued["token"])

    disagreements = []
    tried = 0
    for body in _corpus(base, fields):
        valid = validator.is_valid(body)
        status, answer = await _send(proxy, method, url, body)
        tried += 1
        assert status == 400 or 200 <= status < 300, (body, status, answer)
        if valid != (status != 400):
            disagreements.append((str(body)[:200], valid, status, answer))
    assert not disagreements, disagreements
    assert tried > 50
