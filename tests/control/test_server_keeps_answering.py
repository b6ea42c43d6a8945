"""Management calls that handle much data (a body near the size limit, a list of many tokens) do not
hold up the rest of the server: /health, and the proxied requests beside it, keep being answered."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest

from llm_proxy.control.management import MAX_JSON_BYTES
from llm_proxy.models import utcnow
from llm_proxy.store.sqlite import _ts
from tests.conftest import Proxy
from tests.processes import ServerProcess, http

# The longest /health may wait, as a share of the call's own time. While the event loop did the
# call's work itself, /health waited nearly all of it (0.9 and more of it in every run before the
# work moved to a thread); measured against the call, not the clock, the bound holds on a slow or
# busy machine alike.
LONGEST_SHARE_OF_THE_CALL = 0.5


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
    started = time.perf_counter()
    async with proxy.operator.post(
        f"{proxy.base_url}/manage/projects",
        data=body,
        headers={**proxy.auth(), "Content-Type": "application/json"},
    ) as response:
        assert response.status == expected, await response.text()
    call = time.perf_counter() - started
    done.set()
    waits = await asking
    assert max(waits) < LONGEST_SHARE_OF_THE_CALL * call, (
        f"/health {max(waits):.2f} s of {call:.2f}"
    )


# A month of short-lived tokens at about one a minute: tokens are kept once expired.
MANY_TOKENS = 40_000


def _store_tokens(database: Path, project_id: str, count: int) -> None:
    """``count`` expired tokens of the project, written straight into the server's SQLite file
    (issuing them one call at a time would take minutes)."""
    now = utcnow()
    with sqlite3.connect(database) as db:
        db.executemany(
            "INSERT INTO tokens (id, project_id, token_hash, expires_at, is_active,"
            " request_count, created_at, metadata) VALUES (?, ?, ?, ?, 1, 0, ?, '{}')",
            [
                (
                    str(uuid.uuid4()),
                    project_id,
                    uuid.uuid4().hex * 2,
                    _ts(now - timedelta(minutes=n)),
                    _ts(now - timedelta(minutes=n + 15)),
                )
                for n in range(count)
            ],
        )


@pytest.fixture(scope="module")
def many_tokens(server: ServerProcess) -> str:
    """The id of a project with MANY_TOKENS expired tokens, on the module's server process."""
    status, project = http(
        "POST",
        f"{server.base_url}/manage/projects",
        token=server.management_token,
        body={"name": "busy", "api_key": "sk-upstream-busy"},
    )
    assert status == 201, project
    _store_tokens(server.data_dir / "llm-proxy.db", project["id"], MANY_TOKENS)
    return str(project["id"])


def _waits_for_health_while(server: ServerProcess, ask: Callable[[], None]) -> tuple[float, float]:
    """The longest /health took to answer, asked from another thread while ``ask`` runs, and how
    long ``ask`` took."""
    done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        asking = pool.submit(_ask_health, server.base_url, done)
        time.sleep(0.1)
        started = time.perf_counter()
        try:
            ask()
        finally:
            call = time.perf_counter() - started
            done.set()
        return max(asking.result()), call


@pytest.mark.process
def test_health_answers_while_many_tokens_are_listed(
    server: ServerProcess, many_tokens: str
) -> None:
    answers = []

    def list_tokens() -> None:
        answers.append(
            http(
                "GET", f"{server.base_url}/manage/tokens", token=server.management_token, timeout=60
            )
        )

    longest, call = _waits_for_health_while(server, list_tokens)
    status, tokens = answers[0]
    assert (status, len(tokens)) == (200, MANY_TOKENS)
    assert longest < LONGEST_SHARE_OF_THE_CALL * call, f"/health {longest:.2f} s of {call:.2f}"


@pytest.mark.process
@pytest.mark.parametrize("page", ["/admin/tokens", "/admin/projects/{project_id}"])
def test_health_answers_while_a_page_of_many_tokens_is_shown(
    server: ServerProcess, many_tokens: str, page: str
) -> None:
    password = (server.data_dir / "admin_password").read_text().strip()
    credentials = base64.b64encode(f"admin:{password}".encode()).decode()
    request = urllib.request.Request(
        server.base_url + page.format(project_id=many_tokens),
        headers={"Authorization": f"Basic {credentials}"},
    )
    shown = []

    def show() -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=120) as response:
            shown.append((response.status, response.read()))

    longest, call = _waits_for_health_while(server, show)
    status, html = shown[0]
    assert status == 200
    assert html.count(b'href="/admin/tokens/') >= MANY_TOKENS
    assert longest < LONGEST_SHARE_OF_THE_CALL * call, f"/health {longest:.2f} s of {call:.2f}"
