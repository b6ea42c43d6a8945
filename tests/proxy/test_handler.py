"""The proxy path: the checks in order, the key swap, header hygiene, and the byte-for-byte relay."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from llm_proxy.control.operations import Actor
from llm_proxy.stats import STATS
from tests.conftest import UPSTREAM_KEY, Proxy
from tests.sqlite_writes import write_sqlite

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def error_code(response: aiohttp.ClientResponse) -> str:
    body = await response.json()
    assert set(body["error"]) == {"message", "type", "code"}
    return str(body["error"]["code"])


@pytest.mark.parametrize(
    "path",
    [
        "/v1/unknown",
        "/v1/chat/completionsX",
        "/v1/chat",
        "/v2/chat/completions",
        "/v1/chat/completions/../../admin",
        "/v1/files/..",
        "/v1/files/%2e%2e/x",
        "/v1/files%2fsecret",
        "/v1/files%2Fsecret",
        "/v1/files%5csecret",
        "/",
    ],
)
async def test_paths_outside_the_allowlist_are_404_before_any_token_check(
    proxy: Proxy, path: str
) -> None:
    response = await proxy.client.get(path)
    assert response.status == 404
    assert await error_code(response) == "endpoint_not_found"
    assert proxy.upstream.requests == []


async def test_allowed_prefix_matches_on_segment_boundaries(proxy: Proxy) -> None:
    token = await proxy.token()
    response = await proxy.client.get("/v1/models/gpt-4o-mini", headers=bearer(token))
    assert response.status == 200
    # Matched in its normalised form, forwarded exactly as sent.
    response = await proxy.client.get("/v1//models/", headers=bearer(token))
    assert proxy.upstream.last.path_qs == "/v1//models/"


async def test_method_not_allowed_is_405_with_allow_header(proxy: Proxy) -> None:
    response = await proxy.client.put("/v1/chat/completions", json=CHAT)
    assert response.status == 405
    assert await error_code(response) == "method_not_allowed"
    assert response.headers["Allow"] == "DELETE, GET, OPTIONS, POST"


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "invalid_token"),
        ("Basic abc", "invalid_token"),
        ("Bearer ", "invalid_token"),
        ("Bearer not-a-token", "invalid_token"),
        ("Bearer sk-short", "invalid_token"),
        ("Bearer sk-" + "A" * 43, "token_not_found"),
    ],
)
async def test_bad_credentials_are_401_with_the_precise_code(
    proxy: Proxy, authorization: str | None, code: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await proxy.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status == 401
    assert await error_code(response) == code
    assert proxy.upstream.requests == []


@pytest.mark.parametrize("valid_first", [True, False], ids=["valid-first", "valid-second"])
async def test_two_authorization_headers_are_refused_before_any_lookup(
    proxy: Proxy, valid_first: bool
) -> None:
    """Which of two credentials counts is a guess (a proxy in front may have judged the other):
    neither does, and no database is asked."""
    valid, other = f"Bearer {await proxy.token()}", "Bearer sk-" + "B" * 43
    pair = [valid, other] if valid_first else [other, valid]
    misses = STATS.cache_misses
    response = await proxy.client.get(
        "/v1/models", headers=CIMultiDict([("Authorization", value) for value in pair])
    )
    assert response.status == 401 and await error_code(response) == "invalid_token"
    assert response.headers["x-should-retry"] == "false"
    assert STATS.cache_misses == misses
    assert proxy.upstream.requests == []


async def test_revoked_token_is_refused_on_next_request(proxy: Proxy) -> None:
    issued = await proxy.issue_token()
    headers = bearer(issued["token"])
    assert (
        await proxy.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    ).status == 200
    await proxy.manage("DELETE", f"/tokens/{issued['id']}")
    response = await proxy.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status == 401 and await error_code(response) == "token_inactive"


@pytest.mark.parametrize(
    ("method", "target", "body", "code"),
    [
        ("DELETE", "/tokens/{token_id}", None, "token_inactive"),
        ("PATCH", "/tokens/{token_id}", {"is_active": False}, "token_inactive"),
        ("PATCH", "/projects/{project_id}", {"is_active": False}, "project_inactive"),
        ("DELETE", "/projects/{project_id}", None, "token_not_found"),
    ],
)
async def test_a_request_whose_body_was_still_arriving_when_its_token_was_stopped_is_refused(
    proxy: Proxy, method: str, target: str, body: Any, code: str
) -> None:
    """A request checked before a revocation but still sending its body when it came (a slow
    upload) is refused once its body is in, never forwarded after the operator was told the
    token stopped."""
    issued = await proxy.issue_token(allowed_models=["gpt-4o*"])  # its bodies are read whole
    headers = {**bearer(issued["token"]), "Content-Type": "application/json"}
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200
    forwarded = len(proxy.upstream.requests)
    stopped = asyncio.Event()
    chat = orjson.dumps(CHAT)

    async def slow_upload() -> AsyncIterator[bytes]:
        yield chat[:10]
        await stopped.wait()
        yield chat[10:]

    sending = asyncio.create_task(
        proxy.client.post("/v1/chat/completions", data=slow_upload(), headers=headers)
    )
    await asyncio.sleep(0.3)  # the head is in and checked; the body waits for the change
    path = target.format(token_id=issued["id"], project_id=issued["project_id"])
    status, _ = await proxy.manage(method, path, body)
    assert status in (200, 204)
    stopped.set()
    response = await sending
    assert response.status in (401, 403) and await error_code(response) == code
    assert len(proxy.upstream.requests) == forwarded


async def test_a_request_whose_token_expired_while_its_body_was_arriving_is_refused(
    proxy: Proxy, tmp_path: Path
) -> None:
    """A token that expires during a slow upload (its bodies read whole) is not forwarded once the
    body is in: expired is expired, whenever the head was checked."""
    issued = await proxy.issue_token(allowed_models=["gpt-4o*"])
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    await write_sqlite(  # before the token is ever cached
        tmp_path / "llm-proxy.db",
        "UPDATE tokens SET expires_at = ? WHERE id = ?",
        (expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), issued["id"]),
    )
    headers = {**bearer(issued["token"]), "Content-Type": "application/json"}
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200
    forwarded = len(proxy.upstream.requests)
    chat = orjson.dumps(CHAT)

    async def slow_upload() -> AsyncIterator[bytes]:
        yield chat[:10]
        await asyncio.sleep((expires - datetime.now(UTC)).total_seconds() + 0.2)
        yield chat[10:]

    response = await proxy.client.post("/v1/chat/completions", data=slow_upload(), headers=headers)
    assert response.status == 401 and await error_code(response) == "token_expired"
    assert len(proxy.upstream.requests) == forwarded


async def test_deactivated_token_and_reactivation(proxy: Proxy) -> None:
    issued = await proxy.issue_token()
    headers = bearer(issued["token"])
    await proxy.client.get("/v1/models", headers=headers)
    await proxy.manage("PATCH", f"/tokens/{issued['id']}", {"is_active": False})
    response = await proxy.client.get("/v1/models", headers=headers)
    assert await error_code(response) == "token_inactive"
    await proxy.manage("PATCH", f"/tokens/{issued['id']}", {"is_active": True})
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200


async def test_expired_token_is_401_token_expired(proxy: Proxy, tmp_path: Path) -> None:
    issued = await proxy.issue_token()
    # Move expiry into the past in the database before the token was ever cached.
    await write_sqlite(
        tmp_path / "llm-proxy.db",
        "UPDATE tokens SET expires_at = '2000-01-01T00:00:00.000000Z' WHERE id = ?",
        (issued["id"],),
    )
    response = await proxy.client.get("/v1/models", headers=bearer(issued["token"]))
    assert response.status == 401 and await error_code(response) == "token_expired"


async def test_expired_tokens_do_not_stay_in_the_token_cache(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """Withering tokens are short-lived and many: each one a process has seen must not stay in
    its memory for as long as it runs once it has expired."""
    proxy: Proxy = await proxy_factory(token_cache_seconds=0.2)
    project_id = await proxy.create_project()
    issued = [await proxy.issue_token(project_id) for _ in range(20)]
    for token in issued:
        response = await proxy.client.get("/v1/models", headers=bearer(token["token"]))
        assert response.status == 200
    assert _cache_entries(await (await proxy.client.get("/metrics")).text()) == 20
    await write_sqlite(  # they all expire
        tmp_path / "llm-proxy.db",
        f"UPDATE tokens SET expires_at = '{PAST}' WHERE project_id = ?",
        (project_id,),
    )
    for token in issued:  # each refused once the cache reloads it, and cached expired
        while (
            response := await proxy.client.get("/v1/models", headers=bearer(token["token"]))
        ).status == 200:
            await asyncio.sleep(0.05)
        assert await error_code(response) == "token_expired"

    deadline = time.monotonic() + 5
    while _cache_entries(await (await proxy.client.get("/metrics")).text()):
        assert time.monotonic() < deadline, "expired tokens are still cached"
        await asyncio.sleep(0.05)


async def test_tokens_no_longer_used_do_not_stay_in_the_token_cache_until_they_expire(
    proxy_factory: Any,
) -> None:
    """Tokens may live a year: each one a process served once must not stay in its memory (and
    in every change's scan of the cache) until then. 120 cache periods: 2.4 s here."""
    proxy: Proxy = await proxy_factory(token_cache_seconds=0.02)
    project_id = await proxy.create_project()
    issued = [await proxy.issue_token(project_id, minutes=525600) for _ in range(20)]
    for token in issued:
        response = await proxy.client.get("/v1/models", headers=bearer(token["token"]))
        assert response.status == 200
    assert _cache_entries(await (await proxy.client.get("/metrics")).text()) > 0

    deadline = time.monotonic() + 30
    while _cache_entries(await (await proxy.client.get("/metrics")).text()):
        assert time.monotonic() < deadline, "tokens unused for an hour's worth are still cached"
        await asyncio.sleep(0.1)
    response = await proxy.client.get("/v1/models", headers=bearer(issued[0]["token"]))
    assert response.status == 200  # read again from the database, and cached again
    assert _cache_entries(await (await proxy.client.get("/metrics")).text()) == 1


PAST = "2000-01-01T00:00:00.000000Z"


def _cache_entries(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("llm_proxy_token_cache_entries "):
            return float(line.split()[1])
    raise AssertionError("llm_proxy_token_cache_entries is not on the metrics page")


async def test_a_token_is_stored_and_found_by_its_plain_sha256_digest(
    proxy: Proxy, tmp_path: Path
) -> None:
    issued = await proxy.issue_token()
    with sqlite3.connect(tmp_path / "llm-proxy.db") as db:
        (stored,) = db.execute(
            "SELECT token_hash FROM tokens WHERE id = ?", (issued["id"],)
        ).fetchone()
    # The plain SHA-256 hex digest: what tokens issued by any version are found by.
    assert stored == hashlib.sha256(issued["token"].encode()).hexdigest()
    assert issued["token"] not in stored
    response = await proxy.client.get("/v1/models", headers=bearer(issued["token"]))
    assert response.status == 200  # and looked up by it


@pytest.mark.parametrize("stored_key", ["sk-abc\nX-Injected: yes", "sk-abc\rX-Injected: yes"])
async def test_a_stored_upstream_key_that_cannot_be_sent_is_refused_and_not_counted(
    proxy: Proxy, log_stream: io.StringIO, stored_key: str
) -> None:
    # The management API refuses such a key; one an older version stored is never sent (an LF
    # failed every request with a 500, a CR injected a header), and its requests count for nothing.
    project = await proxy.components.operations.create_project(
        Actor("an older version"), name="old", api_key=stored_key
    )
    issued = await proxy.issue_token(project.id, max_requests=1)
    for _ in range(2):
        response = await proxy.client.post(
            "/v1/chat/completions", json=CHAT, headers=bearer(issued["token"])
        )
        assert response.status == 503, await response.text()
        assert await error_code(response) == "service_unavailable"
        assert response.headers["x-should-retry"] == "false"
    assert proxy.upstream.requests == []
    status, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (status, token["request_count"]) == (200, 0)
    lines = [orjson.loads(line) for line in log_stream.getvalue().splitlines()]
    assert any(
        line["event"] == "token_authority.project_key_unsendable"
        and line["project_id"] == project.id
        for line in lines
    )
    assert "sk-abc" not in log_stream.getvalue()
    # A new key set through the API works at once.
    await proxy.manage("PATCH", f"/projects/{project.id}", {"api_key": UPSTREAM_KEY})
    response = await proxy.client.post(
        "/v1/chat/completions", json=CHAT, headers=bearer(issued["token"])
    )
    assert response.status == 200
    assert proxy.upstream.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_inactive_or_deleted_project_stops_its_tokens_at_once(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    token = await proxy.token(project_id=project_id)
    assert (await proxy.client.get("/v1/models", headers=bearer(token))).status == 200
    await proxy.manage("PATCH", f"/projects/{project_id}", {"is_active": False})
    response = await proxy.client.get("/v1/models", headers=bearer(token))
    assert response.status == 403 and await error_code(response) == "project_inactive"
    await proxy.manage("PATCH", f"/projects/{project_id}", {"is_active": True})
    assert (await proxy.client.get("/v1/models", headers=bearer(token))).status == 200
    await proxy.manage("DELETE", f"/projects/{project_id}")
    response = await proxy.client.get("/v1/models", headers=bearer(token))
    assert response.status == 401 and await error_code(response) == "token_not_found"


async def test_quota_admits_exactly_max_requests(proxy: Proxy) -> None:
    issued = await proxy.issue_token(max_requests=2)
    headers = bearer(issued["token"])
    statuses = [(await proxy.client.get("/v1/models", headers=headers)).status for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    response = await proxy.client.get("/v1/models", headers=headers)
    assert await error_code(response) == "quota_exceeded"
    _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert token["request_count"] == 2 and token["last_used_at"] is not None
    # Raising the quota lets the token work again at once.
    await proxy.manage("PATCH", f"/tokens/{issued['id']}", {"max_requests": 3})
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200


async def test_param_whitelist(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(api={"param_whitelist": {"model": ["gpt-4o*", "o4-mini"]}})
    headers = bearer(await proxy.token())
    ok = await proxy.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert ok.status == 200
    bad = await proxy.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "gpt-3.5-turbo"}, headers=headers
    )
    assert bad.status == 400 and await error_code(bad) == "param_not_allowed"
    assert "model" in (await bad.text())
    odd = await proxy.client.post(
        "/v1/chat/completions", json={**CHAT, "model": ["gpt-4o"]}, headers=headers
    )
    assert odd.status == 400
    # A GET has no body to check.
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200


def _large_chat(model: str, megabytes: int, *, stream: bool = False) -> bytes:
    # As the SDKs send it: "messages" first, "model" after megabytes of prompt.
    prompt = "word " * (megabytes * 1024 * 1024 // 5)
    body = {"messages": [{"role": "user", "content": prompt}], "model": model}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


async def _chunked(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 300_000):
        yield data[start : start + 300_000]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_large_body_is_checked_whole_before_any_byte_goes_upstream(
    proxy_factory: Any, framing: str
) -> None:
    proxy: Proxy = await proxy_factory(api={"param_whitelist": {"model": ["gpt-4o*"]}})
    headers = {**bearer(await proxy.token()), "Content-Type": "application/json"}

    def send(body: bytes) -> Any:
        data = _chunked(body) if framing == "chunked" else io.BytesIO(body)
        return proxy.client.post("/v1/chat/completions", data=data, headers=headers)

    refused = await send(_large_chat("gpt-3.5-turbo", 6))
    assert refused.status == 400 and await error_code(refused) == "param_not_allowed"
    assert proxy.upstream.requests == []  # not even a head: the body was held, then refused
    duplicated = await send(b'{"model":"gpt-4o",' + _large_chat("gpt-3.5-turbo", 2)[1:])
    assert duplicated.status == 400  # every occurrence of a repeated key is checked
    escaped = await send(b'{"mod\\u0065l":"gpt-3.5-turbo","messages":[]}')
    assert escaped.status == 400  # keys compared as JSON decodes them
    allowed = _large_chat("gpt-4o-mini", 6, stream=True)
    response = await send(allowed)
    assert response.status == 200
    await response.read()
    sent = proxy.upstream.last
    assert int(sent.headers["Content-Length"]) == len(sent.body)
    forwarded = orjson.loads(sent.body)
    assert forwarded["stream_options"] == {"include_usage": True}
    assert forwarded["messages"] == orjson.loads(allowed)["messages"]


async def test_a_compressed_body_cannot_pass_a_parameter_check(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(api={"param_whitelist": {"model": ["gpt-4o*"]}})
    headers = {**bearer(await proxy.token()), "Content-Encoding": "gzip"}
    body = gzip.compress(orjson.dumps({**CHAT, "model": "gpt-3.5-turbo"}))
    refused = await proxy.client.post("/v1/chat/completions", data=body, headers=headers)
    assert refused.status == 415 and await error_code(refused) == "unsupported_content_encoding"
    assert proxy.upstream.requests == []


async def test_malformed_json_cannot_pass_a_parameter_check(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(api={"param_whitelist": {"model": ["gpt-4o*"]}})
    headers = bearer(await proxy.token())
    for body in (b'{"model": "gpt-4o", "model": ', b'{"model": "gpt-4o"} {"model": "x"}'):
        refused = await proxy.client.post("/v1/chat/completions", data=body, headers=headers)
        assert refused.status == 400 and await error_code(refused) == "bad_request"
    binary = await proxy.client.post("/v1/files/upload", data=b"--b\r\nnot json", headers=headers)
    assert binary.status == 400 and await error_code(binary) == "param_not_allowed"  # unreadable
    assert proxy.upstream.requests == []


async def test_large_and_chunked_streams_get_usage_injected(proxy: Proxy) -> None:
    headers = {**bearer(await proxy.token()), "Content-Type": "application/json"}
    for data in (
        io.BytesIO(_large_chat("gpt-4o", 3, stream=True)),
        _chunked(_large_chat("gpt-4o", 1, stream=True)),
    ):
        response = await proxy.client.post("/v1/chat/completions", data=data, headers=headers)
        text = await response.text()
        assert response.status == 200 and '"choices":[]' not in text  # usage chunk hidden
        sent = orjson.loads(proxy.upstream.last.body)
        assert sent["stream_options"] == {"include_usage": True}
        # The usage chunk is filtered from plain SSE, so the answer is asked for uncompressed.
        assert proxy.upstream.last.headers["Accept-Encoding"] == "identity"


async def test_header_hygiene_and_key_swap(proxy: Proxy) -> None:
    token = await proxy.token()
    response = await proxy.client.post(
        "/v1/chat/completions?api-version=1",
        json=CHAT,
        headers={
            **bearer(token),
            "X-Forwarded-For": "10.0.0.1",
            "X-Real-IP": "10.0.0.2",
            "CF-Connecting-IP": "10.0.0.3",
            "Forwarded": "for=10.0.0.4",
            "OpenAI-Organization": "org-kept",
            "X-Custom": "kept",
            "Proxy-Authorization": "Basic secret",
        },
    )
    assert response.status == 200
    seen = proxy.upstream.last
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    for dropped in (
        "x-forwarded-for",
        "x-real-ip",
        "cf-connecting-ip",
        "forwarded",
        "proxy-authorization",
    ):
        assert dropped not in headers
    assert headers["openai-organization"] == "org-kept" and headers["x-custom"] == "kept"
    assert seen.path_qs == "/v1/chat/completions?api-version=1"
    assert headers["x-request-id"] == response.headers["LLM-Proxy-Request-ID"]
    assert len(response.headers["LLM-Proxy-Request-ID"]) == 32
    assert "proxy;dur=" in response.headers["Server-Timing"]


async def test_client_request_id_is_kept(proxy: Proxy) -> None:
    token = await proxy.token()
    response = await proxy.client.get(
        "/v1/models", headers={**bearer(token), "X-Request-ID": "client-chosen-42"}
    )
    assert response.headers["LLM-Proxy-Request-ID"] == "client-chosen-42"
    assert proxy.upstream.last.headers["X-Request-ID"] == "client-chosen-42"
    refused = await proxy.client.get("/v1/models", headers={"X-Request-ID": "on-error-too"})
    assert refused.headers["LLM-Proxy-Request-ID"] == "on-error-too"
    assert refused.headers["X-Request-ID"] == "on-error-too"  # no upstream id to return


async def test_upstream_errors_pass_through_verbatim(proxy: Proxy) -> None:
    token = await proxy.token()
    for status in (400, 404, 429, 500, 503):
        response = await proxy.client.post(
            "/v1/moderations", json={}, headers={**bearer(token), "X-Fake-Status": str(status)}
        )
        assert response.status == status
        assert response.headers["X-Upstream-Header"] == "kept"
        assert (await response.json())["error"]["code"] == "fake"
        # The upstream's own Server-Timing passes, and the proxy's is added beside it.
        timings = response.headers.getall("Server-Timing")
        assert timings[0] == "db;dur=5" and timings[1].startswith("proxy;dur=")


@pytest.mark.parametrize("route", ["key-refused", "key-refused-in-pieces"])
async def test_an_upstream_error_quoting_the_project_key_never_shows_it_to_the_client(
    proxy: Proxy, route: str
) -> None:
    """SPEC §6: upstream keys never appear in responses. Some OpenAI-compatible servers quote
    the key they refused: the answer is relayed with the key masked in place (same length, so
    its framing holds), whether its body came with the head or after it."""
    token = await proxy.token()
    response = await proxy.client.post(f"/v1/files/{route}", json={"x": 1}, headers=bearer(token))
    assert response.status == 401
    text = await response.text()
    assert UPSTREAM_KEY not in text
    quoted = orjson.loads(text)["error"]["message"].removeprefix("Invalid key: Bearer ")
    assert len(quoted) == len(UPSTREAM_KEY) and quoted.endswith(UPSTREAM_KEY[-4:])


def masked(key: str) -> str:
    """The same-length mask the client sees in place of the project's key."""
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


@pytest.mark.parametrize("pieces", [False, True], ids=["with-head", "in-pieces"])
@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
async def test_a_compressed_upstream_error_quoting_the_key_reaches_the_client_decoded_and_masked(
    proxy: Proxy, coding: str, pieces: bool
) -> None:
    """SPEC §6: in a compressed error answer the key is not in the bytes to be masked. It is
    decoded, masked, and sent without its coding, with a length of its own."""
    token = await proxy.token()
    path = f"/v1/files/key-refused-encoded?coding={coding}" + ("&pieces" if pieces else "")
    response = await proxy.client.post(
        path, json={"x": 1}, headers=bearer(token), auto_decompress=False
    )
    assert response.status == 401
    body = await response.read()
    assert "Content-Encoding" not in response.headers
    assert response.headers["Content-Length"] == str(len(body))
    assert UPSTREAM_KEY.encode() not in body
    message = orjson.loads(body)["error"]["message"]
    assert message == f"Invalid key: Bearer {masked(UPSTREAM_KEY)}"


@pytest.mark.parametrize(
    "query",
    ["coding=compress", "pad=2000000", "garbage=2000000&pieces", "coding=gzip&garbage=100"],
    ids=["undecodable", "decodes-too-long", "too-long", "corrupt"],
)
async def test_a_compressed_upstream_error_that_cannot_be_read_is_refused_not_relayed(
    proxy: Proxy, query: str
) -> None:
    """An error answer whose key cannot be looked for is not passed on with the key possibly in
    it: the client gets the proxy's own upstream_unavailable, naming the upstream's status."""
    token = await proxy.token()
    response = await proxy.client.post(
        f"/v1/files/key-refused-encoded?{query}",
        json={"x": 1},
        headers=bearer(token),
        auto_decompress=False,
    )
    assert response.status == 502
    body = await response.read()
    assert "Content-Encoding" not in response.headers
    assert UPSTREAM_KEY.encode() not in body
    error = orjson.loads(body)["error"]
    assert error["code"] == "upstream_unavailable" and "(HTTP 401)" in error["message"]
    # The proxy still answers on the same connection, and the upstream pool recovered.
    again = await proxy.client.post(
        "/v1/files/key-refused-encoded", json={"x": 1}, headers=bearer(token)
    )
    assert again.status == 401


async def test_a_zstd_upstream_error_cut_short_inside_the_key_is_refused_not_relayed(
    proxy: Proxy,
) -> None:
    """A zstd body cut short decodes to the blocks it holds: one ending inside the key would show
    the part of the key before the cut (the whole key alone is masked). It is refused as a cut
    gzip body is."""
    token = await proxy.token()
    response = await proxy.client.post(
        "/v1/files/key-refused-encoded?coding=zstd&cut",
        json={"x": 1},
        headers=bearer(token),
        auto_decompress=False,
    )
    body = await response.read()
    assert UPSTREAM_KEY[:12].encode() not in body
    assert response.status == 502
    error = orjson.loads(body)["error"]
    assert error["code"] == "upstream_unavailable" and "(HTTP 401)" in error["message"]


async def test_a_zstd_upstream_error_of_many_tiny_frames_is_read_in_a_linear_pass(
    proxy: Proxy,
) -> None:
    """Each frame is read on its own (so that one cut short is told): 1 MiB of empty frames, some
    110,000, must not cost a copy of what is left per frame, which stalled every request of the
    process for seconds."""
    token = await proxy.token()
    started = time.monotonic()
    response = await proxy.client.post(
        "/v1/files/key-refused-encoded?coding=zstd&empty-frames",
        json={"x": 1},
        headers=bearer(token),
        auto_decompress=False,
    )
    assert response.status == 401
    assert await response.read() == b""
    assert time.monotonic() - started < 4.0


async def test_other_clients_are_answered_while_a_compressed_error_slow_to_decode_is_decoded(
    proxy: Proxy,
) -> None:
    """An error answer is decoded to mask the key in it; one within the bound but slow to decode
    (a megabyte of zstd frames) must not stall the process: another client's answer, which
    arrives while it is being decoded, goes out first."""
    token = await proxy.token()
    finished: list[str] = []

    async def ask(name: str, method: str, path: str) -> int:
        response = await proxy.client.request(
            method, path, json={"x": 1}, headers=bearer(token), auto_decompress=False
        )
        await response.read()
        finished.append(name)
        return response.status

    slow = asyncio.create_task(ask("slow to decode", "POST", "/v1/files/slow-to-decode"))
    # Answered upstream a while after the slow body was sent, as it is being decoded.
    other = await ask("other", "GET", "/v1/files/after-slow-to-decode?s=0.05")
    assert other == 200
    assert await slow == 401
    assert finished == ["other", "slow to decode"]


async def test_a_compressed_upstream_error_with_a_second_coding_field_is_decoded_and_masked(
    proxy: Proxy,
) -> None:
    """Two Content-Encoding fields are one list (gzip, identity): the body is gzip whatever the
    last field says, and a client decodes it so; the key in it is masked all the same."""
    token = await proxy.token()
    response = await proxy.client.post(
        "/v1/files/key-refused-encoded?coding=gzip&also=identity",
        json={"x": 1},
        headers=bearer(token),
        auto_decompress=False,
    )
    assert response.status == 401
    body = await response.read()
    as_read = gzip.decompress(body) if body.startswith(b"\x1f\x8b") else body
    assert UPSTREAM_KEY.encode() not in as_read
    assert "Content-Encoding" not in response.headers
    message = orjson.loads(body)["error"]["message"]
    assert message == f"Invalid key: Bearer {masked(UPSTREAM_KEY)}"


async def test_an_empty_compressed_upstream_error_goes_as_it_came(proxy: Proxy) -> None:
    """Nothing to decode or mask: not refused for want of a gzip stream to read."""
    token = await proxy.token()
    response = await proxy.client.post(
        "/v1/files/key-refused-encoded?garbage=0",
        json={"x": 1},
        headers=bearer(token),
        auto_decompress=False,
    )
    assert response.status == 401
    assert response.headers["Content-Encoding"] == "gzip"
    assert await response.read() == b""


@pytest.mark.parametrize("status", [200, 401, 500])
async def test_an_upstream_echoing_the_project_key_in_a_header_never_shows_it_to_the_client(
    proxy: Proxy, status: int
) -> None:
    """SPEC §6, of any answer: an upstream (or a gateway before it) that echoes the request's
    Authorization, or the key alone, in a header of its own has the key masked in it, its length
    kept; the rest of the field and the body pass as they came."""
    token = await proxy.token()
    response = await proxy.client.get(
        f"/v1/files/key-echoed?status={status}", headers=bearer(token)
    )
    assert response.status == status
    key = UPSTREAM_KEY.encode()
    assert not [(name, value) for name, value in response.raw_headers if key in value]
    assert response.headers["X-Debug-Authorization"] == f"Bearer {masked(UPSTREAM_KEY)}"
    assert response.headers["X-Debug-Key"] == f"key={masked(UPSTREAM_KEY)}; seen"
    assert await response.json() == {"echoed": True}


@pytest.mark.parametrize("key", ["1", "x", "-", "EMPTY"])
async def test_a_short_placeholder_project_key_leaves_every_answer_head_as_it_came(
    proxy: Proxy, key: str
) -> None:
    """A local OpenAI-compatible server (vLLM, Ollama, llama.cpp) takes any key, and a project is
    often given a placeholder. Such a key is no secret to mask in a head, where it stands inside
    the protocol's own words: masked, "1" broke the status line (HTTP/*.*), "-" every field name
    (Content*Length), "x" the stream's media type (te*t/event-stream)."""
    token = str((await proxy.issue_token(await proxy.create_project(api_key=key)))["token"])
    response = await proxy.client.get("/v1/audio/paced?n=2&gap=0", headers=bearer(token))
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert (await response.read()).startswith(b"data: 0\n\ndata: 1\n\n")
    models = await proxy.client.get("/v1/models", headers=bearer(token))
    assert models.status == 200
    assert models.headers["Content-Length"] == str(len(await models.read()))


@pytest.mark.parametrize("status", [200, 401])
async def test_a_key_of_eight_characters_echoed_in_a_header_is_masked(
    proxy: Proxy, status: int
) -> None:
    """The shortest key still looked for in a head: anything a provider issues is longer."""
    key = "k3y-8chr"
    token = str((await proxy.issue_token(await proxy.create_project(api_key=key)))["token"])
    response = await proxy.client.get(
        f"/v1/files/key-echoed?status={status}", headers=bearer(token)
    )
    assert response.status == status
    assert not [value for _name, value in response.raw_headers if key.encode() in value]
    assert response.headers["X-Debug-Authorization"] == "Bearer ******hr"  # a third shown


async def test_body_bytes_pass_through_unchanged_both_ways(proxy: Proxy) -> None:
    token = await proxy.token()
    payload = bytes(range(256)) * 4096  # 1 MiB, not JSON: never parsed
    response = await proxy.client.post(
        "/v1/files/upload", data=io.BytesIO(payload), headers=bearer(token)
    )
    assert response.status == 200 and (await response.json())["received"] == len(payload)
    assert hashlib.sha256(proxy.upstream.last.body).digest() == hashlib.sha256(payload).digest()
    big = await proxy.client.get("/v1/files/big?size=5000000", headers=bearer(token))
    assert len(await big.read()) == 5_000_000


async def test_compressed_answers_are_relayed_compressed(proxy: Proxy) -> None:
    token = await proxy.token()
    response = await proxy.client.get(
        "/v1/files/gzip", headers=bearer(token), auto_decompress=False
    )
    assert response.headers["Content-Encoding"] == "gzip"
    # Byte for byte as the upstream sent it: a successful answer is never decoded.
    sent = gzip.compress(b'{"compressed": true}', mtime=0)
    assert await response.read() == sent
    assert response.headers["Content-Length"] == str(len(sent))


async def test_oversized_request_bodies_are_413(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(max_request_body_bytes=100_000)
    token = await proxy.token()
    response = await proxy.client.post(
        "/v1/files/upload", data=io.BytesIO(b"x" * 200_000), headers=bearer(token)
    )
    assert response.status == 413 and await error_code(response) == "request_too_large"

    async def chunked() -> Any:
        for _ in range(10):
            yield b"y" * 50_000

    response = await proxy.client.post("/v1/files/upload", data=chunked(), headers=bearer(token))
    assert response.status == 413 and await error_code(response) == "request_too_large"
    assert (await proxy.client.get("/v1/models", headers=bearer(token))).status == 200


async def test_a_declared_oversized_body_is_refused_after_the_limits(proxy_factory: Any) -> None:
    """SPEC §7's order: a used-up quota is said before the body's size, and a 413 takes
    nothing from the quota."""
    proxy: Proxy = await proxy_factory(max_request_body_bytes=100_000)
    issued = await proxy.issue_token(max_requests=1)
    headers = bearer(issued["token"])
    oversized = b"x" * 200_000

    response = await proxy.client.post("/v1/files/upload", data=oversized, headers=headers)
    assert response.status == 413 and await error_code(response) == "request_too_large"
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200  # not counted
    response = await proxy.client.post("/v1/files/upload", data=oversized, headers=headers)
    assert response.status == 429 and await error_code(response) == "quota_exceeded"
    assert [seen.path_qs for seen in proxy.upstream.requests] == ["/v1/models"]  # no upload


async def test_an_oversized_body_on_a_spent_budget_is_refused_for_the_budget(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """SPEC §7's order again: budget_exceeded comes before request_too_large, whether the size
    was declared or found while reading; a budget with something left still gets the 413."""
    proxy: Proxy = await proxy_factory(max_request_body_bytes=100_000)
    issued = await proxy.issue_token(budget_usd=0.01)
    headers = bearer(issued["token"])

    async def chunked() -> Any:
        for _ in range(10):
            yield b"y" * 50_000

    response = await proxy.client.post("/v1/files/upload", data=b"x" * 200_000, headers=headers)
    assert response.status == 413 and await error_code(response) == "request_too_large"
    await write_sqlite(  # the budget is spent
        tmp_path / "llm-proxy.db",
        "UPDATE tokens SET spent_nanousd = budget_nanousd WHERE id = ?",
        (issued["id"],),
    )
    for body in (b"x" * 200_000, chunked()):
        response = await proxy.client.post("/v1/chat/completions", data=body, headers=headers)
        assert response.status == 429 and await error_code(response) == "budget_exceeded"
    assert proxy.upstream.requests == []


async def test_a_checked_chunked_oversized_body_is_refused_after_the_limits(
    proxy_factory: Any,
) -> None:
    """As a declared one: a body found over the limit while it is read for its checks (chunked,
    no length to refuse it by) is refused after the limits, so a used-up quota is said first."""
    proxy: Proxy = await proxy_factory(max_request_body_bytes=100_000)
    issued = await proxy.issue_token(max_requests=1, allowed_models=["gpt-4o"])
    headers = bearer(issued["token"])

    async def chunked() -> Any:
        yield orjson.dumps(CHAT)[:-1] + b', "pad": "'
        for _ in range(10):
            yield b"y" * 50_000
        yield b'"}'

    response = await proxy.client.post("/v1/chat/completions", data=chunked(), headers=headers)
    assert response.status == 413 and await error_code(response) == "request_too_large"
    assert (await proxy.client.get("/v1/models", headers=headers)).status == 200  # not counted
    response = await proxy.client.post("/v1/chat/completions", data=chunked(), headers=headers)
    assert response.status == 429 and await error_code(response) == "quota_exceeded"
    assert [seen.path_qs for seen in proxy.upstream.requests] == ["/v1/models"]


async def test_streams_are_relayed_chunk_by_chunk(proxy: Proxy) -> None:
    token = await proxy.token()
    response = await proxy.client.get("/v1/audio/paced?n=3&gap=0.3", headers=bearer(token))
    assert response.headers["Content-Type"] == "text/event-stream"
    first = await response.content.readuntil(b"\n\n")
    assert first == b"data: 0\n\n"
    # The first event arrived while upstream was still producing the rest.
    assert not response.content.at_eof()
    rest = await response.read()
    assert rest == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


async def test_client_disconnect_cancels_the_upstream_request(proxy: Proxy) -> None:
    token = await proxy.token()
    response = await proxy.client.get("/v1/audio/hang", headers=bearer(token))
    assert await response.content.readuntil(b"\n\n") == b"data: first\n\n"
    response.close()
    await asyncio.wait_for(proxy.upstream.cancelled.wait(), timeout=5)


async def test_upstream_drop_mid_body_truncates_the_client_response(proxy: Proxy) -> None:
    token = await proxy.token()
    response = await proxy.client.get("/v1/audio/drop", headers=bearer(token))
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert (await proxy.client.get("/v1/models", headers=bearer(token))).status == 200


async def test_upstream_timeout_is_504(proxy: Proxy) -> None:
    token = await proxy.token()
    response = await proxy.client.get("/v1/audio/slow-head?s=3", headers=bearer(token))
    assert response.status == 504 and await error_code(response) == "upstream_timeout"


async def test_unreachable_upstream_is_502(proxy_factory: Any, unused_tcp_port: int) -> None:
    proxy: Proxy = await proxy_factory(api={"base_url": f"http://127.0.0.1:{unused_tcp_port}"})
    token = await proxy.token()
    response = await proxy.client.get("/v1/models", headers=bearer(token))
    assert response.status == 502 and await error_code(response) == "upstream_unavailable"
    assert response.headers["X-Request-ID"]


async def test_cors_preflight_without_a_token(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(api={"allowed_origins": ["https://app.example"]})
    response = await proxy.client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    other = await proxy.client.options(
        "/v1/chat/completions", headers={"Origin": "https://evil.example"}
    )
    assert other.status == 204 and "Access-Control-Allow-Origin" not in other.headers
    token = await proxy.token()
    actual = await proxy.client.get(
        "/v1/models", headers={**bearer(token), "Origin": "https://app.example"}
    )
    assert actual.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert proxy.upstream.requests[-1].method == "GET"  # the preflight never went upstream


async def test_allowed_origins_match_as_browsers_write_an_origin(proxy_factory: Any) -> None:
    # A browser sends its origin lower-case, without a default port or a trailing slash.
    allowed = ["HTTPS://App.Example:443/", "http://localhost:3000"]
    proxy: Proxy = await proxy_factory(api={"allowed_origins": allowed})
    for origin in ("https://app.example", "http://localhost:3000"):
        response = await proxy.client.options(
            "/v1/chat/completions",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert response.headers.get("Access-Control-Allow-Origin") == origin


async def test_a_page_on_an_allowed_origin_can_read_the_fields_the_sdks_act_on(
    proxy_factory: Any,
) -> None:
    """A browser shows a page's script only the CORS-safelisted fields of an answer unless the
    answer exposes more: x-should-retry, Retry-After and the request ids, which the OpenAI SDKs
    read, must be exposed, on refusals as on relayed answers."""
    proxy: Proxy = await proxy_factory(api={"allowed_origins": ["https://app.example"]})
    origin = {"Origin": "https://app.example"}
    token = await proxy.token(rpm=1)
    answered = await proxy.client.get("/v1/models", headers={**origin, **bearer(token)})
    refused = await proxy.client.get("/v1/models", headers={**origin, **bearer(token)})
    assert (answered.status, refused.status) == (200, 429)
    for response in (answered, refused, await proxy.client.get("/v1/models", headers=origin)):
        assert response.headers["Access-Control-Expose-Headers"] == "*"
    other = await proxy.client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Expose-Headers" not in other.headers


async def test_a_preflight_answer_carries_the_proxys_request_id(proxy_factory: Any) -> None:
    """No upstream answers a preflight: its x-request-id is the proxy's, as on a refusal."""
    proxy: Proxy = await proxy_factory(api={"allowed_origins": ["https://app.example"]})
    for origin in ("https://app.example", "https://evil.example"):
        response = await proxy.client.options(
            "/v1/chat/completions",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert response.status == 204
        assert response.headers["X-Request-ID"] == response.headers["LLM-Proxy-Request-ID"]
    chosen = await proxy.client.options(
        "/v1/chat/completions", headers={"X-Request-ID": "client-chosen-7"}
    )
    assert chosen.headers["X-Request-ID"] == "client-chosen-7"


async def test_a_compressed_chat_body_is_forwarded_untouched(proxy: Proxy) -> None:
    body = gzip.compress(orjson.dumps({**CHAT, "stream": True}))
    headers = {**bearer(await proxy.token()), "Content-Encoding": "gzip"}
    response = await proxy.client.post("/v1/chat/completions", data=body, headers=headers)
    assert response.status == 200
    await response.read()
    # The fake upstream inflates what it received: the JSON the client compressed, unchanged.
    assert orjson.loads(proxy.upstream.last.body) == {**CHAT, "stream": True}


async def test_a_compressed_stream_the_proxy_asked_usage_for_is_relayed_as_it_comes(
    proxy_factory: Any,
) -> None:
    """An upstream that compresses a stream although asked for identity: the usage filter cannot
    read its events, so it must not hold its bytes back waiting for an event's end either."""
    stream = b"".join(
        b'data: {"choices":[{"index":0,"delta":{"content":"w%d "}}]}\n\n' % i for i in range(50)
    )
    packed = gzip.compress(stream)
    first, rest = packed[:40], packed[40:]
    assert b"\n\n" not in first and b"\r\r" not in first and b"\r\n\r\n" not in first
    client_has_first = asyncio.Event()

    async def compressing(request: web.Request) -> web.StreamResponse:
        assert request.headers["Accept-Encoding"] == "identity"
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
        )
        await response.prepare(request)
        await response.write(first)
        await asyncio.wait_for(client_has_first.wait(), 10)
        await response.write(rest)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", compressing)
    upstream = TestServer(app)
    await upstream.start_server()
    try:
        proxy: Proxy = await proxy_factory(api={"base_url": str(upstream.make_url("")).rstrip("/")})
        token = await proxy.token()
        body = orjson.dumps({**CHAT, "stream": True})
        response = await proxy.client.post(
            "/v1/chat/completions",
            data=body,
            headers={**bearer(token), "Accept-Encoding": "gzip"},
            auto_decompress=False,
        )
        assert response.status == 200
        received = b""
        while len(received) < len(first):
            received += await asyncio.wait_for(response.content.readany(), 5)
        client_has_first.set()
        received += await response.read()
        assert received == packed  # byte for byte
    finally:
        await upstream.close()


async def test_remaining_requests_follow_a_quota_changed_while_the_body_was_arriving(
    proxy: Proxy,
) -> None:
    """LLM-Proxy-Remaining-Requests says what is left of the quota the request was counted
    against, not of the one in force when its head was checked (a slow upload)."""
    issued = await proxy.issue_token(max_requests=5, allowed_models=["gpt-4o*"])
    headers = {**bearer(issued["token"]), "Content-Type": "application/json"}
    first = await proxy.client.get("/v1/models", headers=headers)
    assert first.headers["LLM-Proxy-Remaining-Requests"] == "4"
    raised = asyncio.Event()
    chat = orjson.dumps(CHAT)

    async def slow_upload() -> AsyncIterator[bytes]:
        yield chat[:10]
        await raised.wait()
        yield chat[10:]

    sending = asyncio.create_task(
        proxy.client.post("/v1/chat/completions", data=slow_upload(), headers=headers)
    )
    await asyncio.sleep(0.3)  # the head is in and checked; the body waits for the change
    status, _ = await proxy.manage("PATCH", f"/tokens/{issued['id']}", {"max_requests": 10})
    assert status == 200
    raised.set()
    response = await sending
    assert response.status == 200
    assert response.headers["LLM-Proxy-Remaining-Requests"] == "8"
