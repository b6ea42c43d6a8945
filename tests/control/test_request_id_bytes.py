"""An X-Request-ID whose bytes are not UTF-8 (HTTP lets a field value carry any octet): the
change it came with is made and audited, on every backend, instead of failing to be stored."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.conftest import MANAGEMENT_TOKEN, Proxy


@pytest.fixture
def proxy_database_url(database_url: str) -> str:
    return database_url


async def test_a_change_whose_request_id_is_not_utf8_is_made_and_audited(proxy: Proxy) -> None:
    body = orjson.dumps({"name": "latin", "api_key": "sk-upstream"})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(
        b"POST /manage/projects HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %b\r\n"
        b"X-Request-ID: caf\xe9-\xff-r\xc3\xa9q\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%b"
        % (MANAGEMENT_TOKEN.encode(), len(body), body)
    )
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
    status, page = await proxy.manage("GET", "/audit?action=project.create")
    assert status == 200
    # The bytes that are UTF-8 are kept, each other one is the replacement character.
    assert [event["request_id"] for event in page["events"]] == ["caf\ufffd-\ufffd-réq"]
