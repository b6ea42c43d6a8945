"""SPEC §6: a token value is ``sk-`` and at least 128 random bits in base64url, and a value of
any other shape is refused before any database access: with the database gone, a malformed
bearer still gets its 401 ``invalid_token``, never the 503 a database access gives."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.conftest import Proxy
from tests.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.process]

MALFORMED = [
    "sk-short",
    "sk-" + "A" * 21,  # 126 bits: fewer than 128
    "sk-" + "A" * 42 + "+",  # base64, not base64url
    "sk-" + "A" * 42 + "/",
    "sk-" + "A" * 42 + "=",
    "sk-" + "A" * 42 + ".",
    "SK-" + "A" * 43,
    "pk-" + "A" * 43,
    "A" * 46,
    "sk-" + "A" * 20 + " " + "A" * 22,
    "sk-" + "A" * 20 + "é" + "A" * 22,
]


async def test_a_malformed_token_is_refused_without_the_database(
    own_postgres: PostgresServer, own_database: str, proxy_factory: Any
) -> None:
    proxy: Proxy = await proxy_factory(database_url=own_database)
    issued = await proxy.issue_token()
    # Every value issued has the shape: sk- and 256 random bits in base64url.
    value = issued["token"]
    assert value.startswith("sk-")
    assert len(base64.urlsafe_b64decode(value[3:] + "=" * (-len(value[3:]) % 4))) * 8 >= 128
    own_postgres.stop()
    for malformed in MALFORMED:
        response = await proxy.client.get(
            "/v1/models", headers={"Authorization": f"Bearer {malformed}"}
        )
        answer = await response.json()
        assert (response.status, answer["error"]["code"]) == (401, "invalid_token"), malformed
        assert response.headers["x-should-retry"] == "false"
    # A value of the right shape, unknown to this process, does need the database.
    response = await proxy.client.get(
        "/v1/models", headers={"Authorization": "Bearer sk-" + "A" * 43}
    )
    assert response.status == 503
    assert proxy.upstream.requests == []
