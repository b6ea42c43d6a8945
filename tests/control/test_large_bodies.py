"""A management body near the size limit is read without holding up the rest of the server."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import pytest

from llm_proxy.control.management import MAX_JSON_BYTES
from tests.conftest import Proxy

# Longer than any answer to /health takes on a busy machine, and far shorter than the time
# Python's checks of a body near MAX_JSON_BYTES take.
LONGEST_WAIT_SECONDS = 0.3


def _filled(prefix: bytes, item: bytes, suffix: bytes) -> bytes:
    """``prefix``, as many comma-separated ``item`` as fit in MAX_JSON_BYTES, then ``suffix``."""
    count = (MAX_JSON_BYTES - len(prefix) - len(suffix)) // (len(item) + 1)
    return prefix + b",".join([item] * count) + suffix


# A project whose metadata holds half a million numbers, and a body refused for an unknown field
# that holds a hundred thousand objects: each is checked number by number, object by object.
BODIES = {
    "accepted": (
        _filled(b'{"name": "big", "api_key": "sk-upstream-big", "metadata": {"n": [', b"1", b"]}}"),
        201,
    ),
    "refused": (
        _filled(b'{"name": "big", "api_key": "sk-upstream-big", "extra": [', b'{"k":1}', b"]}"),
        400,
    ),
}


def _ask_health(base_url: str, done: threading.Event) -> list[float]:
    """How long each answer to /health took, asked again and again from a client of its own
    (another thread: the server's event loop is this test's) until ``done``."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    waits = []
    while not done.is_set():
        started = time.perf_counter()
        with direct.open(f"{base_url}/health", timeout=10) as response:
            assert response.status == 200
            response.read()
        waits.append(time.perf_counter() - started)
        time.sleep(0.01)
    return waits


@pytest.mark.parametrize("case", BODIES)
async def test_health_answers_while_a_large_management_body_is_checked(
    proxy: Proxy, case: str
) -> None:
    body, expected = BODIES[case]
    assert len(body) <= MAX_JSON_BYTES
    done = threading.Event()
    asking = asyncio.create_task(asyncio.to_thread(_ask_health, proxy.base_url, done))
    await asyncio.sleep(0.1)
    async with proxy.operator.post(
        f"{proxy.base_url}/manage/projects",
        data=body,
        headers={**proxy.auth(), "Content-Type": "application/json"},
    ) as response:
        assert response.status == expected, await response.text()
    done.set()
    waits = await asking
    assert max(waits) < LONGEST_WAIT_SECONDS, f"/health waited {max(waits):.2f} s"
