"""SPEC §6 where a body is cut inside the project's key: the event shows no start of it.

An upstream quoting the key it refused has it masked in the event, whole; a body cut inside it (a
compressed answer cut short, the capture's limit, an upstream gone mid-body) ends with the part of
the key before the cut, which is masked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llm_proxy.crypto import mask_key_start
from tests.conftest import UPSTREAM_KEY
from tests.fakes import split_in_key
from tests.waiting import wait_for_lines

# Another provider's key (hex, no ``sk-``): the masking of key-shaped text does not catch it.
KEY = "f3a9c2e7b1d84a6f9e0c5b2a7d1e8f4c3b6a9d2e"
KEPT = 25  # the characters of the key before the cut
# What the upstream's 401 quotes before the key (orjson's spelling, as the fake upstream's).
QUOTE = orjson.dumps({"error": {"message": f"Invalid key: Bearer {KEY}"}})
BEFORE_KEY = QUOTE.index(KEY.encode())

SHAPES: dict[str, tuple[str, dict[str, Any], int]] = {
    # An upstream's compressed error cut short, in each coding: the client gets a 502.
    **{
        f"{coding}-cut-short": (
            f"/v1/files/key-refused-encoded?coding={coding}&cut={KEPT}",
            {},
            502,
        )
        for coding in ("gzip", "deflate", "br", "zstd")
    },
    # A whole answer, its capture cut by the capture's limit.
    "captured-plain": (
        "/v1/files/key-refused-in-pieces",
        {"capture_body_bytes": BEFORE_KEY + KEPT},
        401,
    ),
    "captured-zstd": (
        f"/v1/files/key-refused-encoded?coding=zstd&split={KEPT}",
        {"capture_body_bytes": len(split_in_key(QUOTE, "zstd", KEPT)[0]) + 2},
        401,
    ),
    # The upstream's connection closed inside the key: the client's answer is cut, as is the event's.
    "upstream-gone": (f"/v1/files/key-refused-in-pieces?cut={KEPT}&drop", {}, 401),
}


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_an_error_body_cut_inside_the_key_shows_no_start_of_it_in_the_event(
    proxy_factory: Any, tmp_path: Path, shape: str
) -> None:
    path, options, status = SHAPES[shape]
    log = tmp_path / "events.jsonl"
    proxy = await proxy_factory(file_event_log=log, **options)
    token = await proxy.token(project_id=await proxy.create_project(api_key=KEY))
    answer = await proxy.client.post(
        path, json={"x": 1}, headers={"Authorization": f"Bearer {token}"}, auto_decompress=False
    )
    assert answer.status == status
    try:
        body = await answer.read()
    except aiohttp.ClientPayloadError:
        body = b""  # cut, as the upstream cut it
    assert KEY[:20].encode() not in body
    (event,) = await wait_for_lines(log, 1)
    assert event["status"] == status
    assert KEY[:20] not in log.read_text()
    # The cut text is shown, the key's start as the project's listing shows it.
    assert event["response"].endswith(f"Invalid key: Bearer {mask_key_start(KEY, KEPT)}")


async def test_a_key_shaped_like_openais_cut_in_an_event_shows_none_of_its_middle(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """Masked as key-shaped text, its start would show the four characters before the cut."""
    log = tmp_path / "events.jsonl"
    proxy = await proxy_factory(file_event_log=log)
    token = await proxy.token()
    answer = await proxy.client.post(
        f"/v1/files/key-refused-encoded?coding=gzip&cut={KEPT}",
        json={"x": 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status == 502
    (event,) = await wait_for_lines(log, 1)
    assert UPSTREAM_KEY[KEPT - 4 : KEPT] not in log.read_text()
    assert event["response"].endswith(f"Invalid key: Bearer {mask_key_start(UPSTREAM_KEY, KEPT)}")
