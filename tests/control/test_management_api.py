"""Every endpoint of the management API, and bad input answered precisely."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from llm_proxy.control.management import MAX_JSON_BYTES, management_app
from tests.conftest import MANAGEMENT_TOKEN, TOKEN_FIELDS, UPSTREAM_KEY, Proxy

MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def _code(body: Any) -> str:
    return str(body["error"]["code"])


def _head(method: str, path: str, *fields: bytes, auth: bytes | None = None) -> bytes:
    """A request head as bytes, so a test can send what no well-behaved client library would."""
    credential = f"Bearer {MANAGEMENT_TOKEN}".encode() if auth is None else auth
    lines = [
        f"{method} /manage{path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Authorization: " + credential,
        b"Content-Type: application/json",
        *fields,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _exchange(
    proxy: Proxy, head: bytes, pieces: Iterable[bytes] = (), pause: float = 0.0
) -> tuple[int, dict[str, str], Any]:
    """Send one request over a raw connection; answer its status, headers and error-shaped body.

    The body goes out while the answer is awaited, so a server that answers before reading it all
    is seen doing so; ``pause`` lets each piece arrive on its own.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)

    async def send() -> None:
        writer.write(head)
        for piece in pieces:
            await asyncio.sleep(pause)
            writer.write(piece)
            await writer.drain()

    sending = asyncio.create_task(send())
    try:
        status_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers["content-length"]))
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert headers["content-type"].startswith("application/json"), raw
    return int(status_line.split()[1]), headers, orjson.loads(raw)


def _padded_project(size: int) -> bytes:
    """A valid project body of exactly ``size`` bytes, its bulk a metadata value."""
    shell = orjson.dumps({"name": "big", "api_key": UPSTREAM_KEY, "metadata": {"notes": ""}})
    return shell.replace(b'"notes":""', b'"notes":"' + b"n" * (size - len(shell)) + b'"')


def _chunked(body: bytes, size: int = 64 * 1024) -> list[bytes]:
    frames = [b"%x\r\n%s\r\n" % (len(part), part) for part in _parts(body, size)]
    return [*frames, b"0\r\n\r\n"]


def _parts(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def _assert_error(
    answer: tuple[int, dict[str, str], Any],
    status: int,
    code: str,
    error_type: str = "invalid_request_error",
) -> None:
    got, _, body = answer
    error = body.get("error", {})
    assert (got, error.get("code"), error.get("type")) == (status, code, error_type), body
    assert set(body["error"]) == {"message", "type", "code"} and body["error"]["message"]


async def test_requests_without_the_management_token_are_refused(proxy: Proxy) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": MANAGEMENT_TOKEN}):
        response = await proxy.client.get("/manage/projects", headers=headers)
        assert response.status == 401
        body = await response.json()
        assert _code(body) == "unauthorized"
        assert MANAGEMENT_TOKEN not in await response.text()


async def test_two_authorization_headers_are_refused_whichever_comes_first(proxy: Proxy) -> None:
    """The first alone was read: a second header added by a client or a hop passed unseen, and
    the answer depended on the order (as on the proxy path, both are read, and match nothing)."""
    right = f"Bearer {MANAGEMENT_TOKEN}"
    for pair in ((right, "Bearer nope"), ("Bearer nope", right), (right, right)):
        headers = CIMultiDict(("Authorization", value) for value in pair)
        response = await proxy.client.get("/manage/projects", headers=headers)
        assert response.status == 401, pair
        assert _code(await response.json()) == "unauthorized"


async def test_project_lifecycle_masks_the_upstream_key(proxy: Proxy) -> None:
    status, created = await proxy.manage(
        "POST",
        "/projects",
        {"name": "alpha", "api_key": UPSTREAM_KEY, "description": "d", "metadata": {"team": "x"}},
    )
    assert status == 201
    assert set(created) >= {"id", "name", "description", "metadata", "is_active", "created_at"}
    assert created["api_key"] == f"{UPSTREAM_KEY[:5]}…{UPSTREAM_KEY[-4:]}"
    assert created["metadata"] == {"team": "x"}
    project_id = created["id"]

    status, listed = await proxy.manage("GET", "/projects")
    assert status == 200 and [p["id"] for p in listed] == [project_id]
    status, fetched = await proxy.manage("GET", f"/projects/{project_id}")
    assert fetched == {**created, "usage": fetched["usage"]}
    assert fetched["usage"]["requests"] == 0 and fetched["usage"]["last_used_at"] is None

    status, updated = await proxy.manage(
        "PATCH", f"/projects/{project_id}", {"name": "beta", "api_key": "sk-new-key-0000abcd"}
    )
    assert status == 200
    assert updated["name"] == "beta" and updated["api_key"] == "sk…abcd"  # a third of it
    assert updated["updated_at"] >= created["updated_at"]

    status, _ = await proxy.manage("DELETE", f"/projects/{project_id}")
    assert status == 204
    status, body = await proxy.manage("GET", f"/projects/{project_id}")
    assert status == 404 and _code(body) == "project_not_found"
    text = str(listed) + str(fetched) + str(updated)
    assert UPSTREAM_KEY not in text


async def test_unknown_project_ids_are_404_everywhere(proxy: Proxy) -> None:
    for method, path, body in [
        ("GET", "/projects/nope", None),
        ("PATCH", "/projects/nope", {"name": "x"}),
        ("DELETE", "/projects/nope", None),
        ("POST", "/projects/nope/tokens/revoke", None),
        ("POST", "/tokens", {"project_id": "nope", "duration_minutes": 5}),
        ("GET", "/tokens?project_id=nope", None),
    ]:
        status, answer = await proxy.manage(method, path, body)
        assert (status, _code(answer)) == (404, "project_not_found"), (method, path)


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        ("/tokens?projectid={project}", "projectid"),
        ("/tokens?project_id={project}&status=active", "status"),
        ("/tokens?project={project}", "project"),
        ("/projects?name=x", "name"),
        ("/projects?page=1", "page"),
    ],
)
async def test_a_list_refuses_a_query_parameter_it_does_not_take(
    proxy: Proxy, path: str, parameter: str
) -> None:
    """A misspelt filter must not widen the answer to everything: a script revoking what it
    lists would revoke every token."""
    issued = await proxy.issue_token()
    await proxy.issue_token()
    status, body = await proxy.manage("GET", path.format(project=issued["project_id"]))
    assert (status, _code(body)) == (400, "invalid_field"), body
    assert set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["message"].startswith(f"{parameter}: unknown query parameter")


async def test_an_empty_project_filter_is_refused_not_taken_as_every_project(
    proxy: Proxy,
) -> None:
    await proxy.issue_token()
    status, body = await proxy.manage("GET", "/tokens?project_id=")
    assert (status, _code(body)) == (400, "invalid_field"), body
    assert body["error"]["message"].startswith("project_id: ")


@pytest.mark.parametrize("page", ["1_0", "+1", "%201", "1%20", "%EF%BC%91", "0x1", "1.0", "-0"])
async def test_an_integer_query_parameter_is_plain_digits(proxy: Proxy, page: str) -> None:
    status, body = await proxy.manage("GET", f"/audit?page={page}")
    assert (status, _code(body)) == (400, "invalid_field"), (page, body)
    assert body["error"]["message"].startswith("page: must be a whole number")


async def test_token_issue_shows_the_value_once_and_never_again(proxy: Proxy) -> None:
    issued = await proxy.issue_token(max_requests=3, minutes=30)
    assert set(issued) >= {"id", "token", "project_id", "expires_at", "max_requests"}
    assert issued["token"].startswith("sk-") and len(issued["token"]) >= 3 + 22
    assert issued["max_requests"] == 3

    status, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert status == 200
    assert set(token) >= TOKEN_FIELDS
    assert token["is_active"] is True and token["request_count"] == 0
    assert token["last_used_at"] is None
    status, listed = await proxy.manage("GET", "/tokens")
    _, by_project = await proxy.manage("GET", f"/tokens?project_id={issued['project_id']}")
    assert [t["id"] for t in listed] == [t["id"] for t in by_project] == [issued["id"]]
    assert issued["token"] not in str(token) + str(listed) + str(by_project)


async def test_token_patch_revoke_and_delete(proxy: Proxy) -> None:
    issued = await proxy.issue_token()
    token_id = issued["id"]
    status, patched = await proxy.manage("PATCH", f"/tokens/{token_id}", {"max_requests": 10})
    assert status == 200 and patched["max_requests"] == 10
    status, patched = await proxy.manage("PATCH", f"/tokens/{token_id}", {"max_requests": None})
    assert status == 200 and patched["max_requests"] is None
    status, patched = await proxy.manage("PATCH", f"/tokens/{token_id}", {"is_active": False})
    assert patched["is_active"] is False and patched["revoked_at"] is not None
    status, patched = await proxy.manage("PATCH", f"/tokens/{token_id}", {"is_active": True})
    assert patched["is_active"] is True and patched["revoked_at"] is None

    assert (await proxy.manage("DELETE", f"/tokens/{token_id}"))[0] == 204
    assert (await proxy.manage("DELETE", f"/tokens/{token_id}"))[0] == 204  # already revoked
    status, token = await proxy.manage("GET", f"/tokens/{token_id}")
    assert token["is_active"] is False
    status, body = await proxy.manage("DELETE", "/tokens/unknown-id")
    assert (status, _code(body)) == (404, "token_not_found")


LIMITS = {
    "max_requests": 50,
    "rpm": 60,
    "tpm": 10_000,
    "budget_usd": 12.5,
    "allowed_models": ["gpt-4o-mini", "gpt-4.1*", "gpt-4o-mini", " o3 "],
}
METADATA = {"user": "ada", "tags": ["a", "b"], "nested": {"n": 1}}


async def test_token_with_every_limit_reads_back_the_same(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    status, issued = await proxy.manage(
        "POST",
        "/tokens",
        {"project_id": project_id, "duration_minutes": 30, **LIMITS, "metadata": METADATA},
    )
    assert status == 201, issued
    shown = {
        "max_requests": 50,
        "rpm": 60,
        "tpm": 10_000,
        "budget_usd": 12.5,
        # Duplicates dropped, order kept, each pattern trimmed.
        "allowed_models": ["gpt-4o-mini", "gpt-4.1*", "o3"],
        "metadata": METADATA,
    }
    assert issued == {
        "id": issued["id"],
        "token": issued["token"],
        "project_id": project_id,
        "expires_at": issued["expires_at"],
        "created_at": issued["created_at"],
        **shown,
    }

    status, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert status == 200 and set(token) == TOKEN_FIELDS | {"revoked_at", "usage"}
    assert {key: token[key] for key in shown} == shown
    assert (token["status"], token["spent_usd"], token["reserved_usd"]) == ("active", 0, 0)
    _, listed = await proxy.manage("GET", f"/tokens?project_id={project_id}")
    assert listed == [{k: v for k, v in token.items() if k != "usage"}]

    _, audit = await proxy.manage("GET", f"/audit?target_id={issued['id']}")
    details = audit["events"][0]["details"]
    assert {key: details[key] for key in LIMITS} == {key: shown[key] for key in LIMITS}


async def test_a_token_without_limits_shows_them_as_null(proxy: Proxy) -> None:
    issued = await proxy.issue_token()
    assert {key: issued[key] for key in LIMITS} == dict.fromkeys(LIMITS)
    assert issued["metadata"] == {}
    _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert {key: token[key] for key in LIMITS} == dict.fromkeys(LIMITS)
    assert (token["metadata"], token["spent_usd"], token["status"]) == ({}, 0, "active")


@pytest.mark.parametrize(
    ("budget", "shown"),
    [(0.000000001, 1e-9), (1_000_000, 1_000_000), (0.1, 0.1), (3.1234567894, 3.123456789)],
)
async def test_a_budget_is_kept_to_the_nano_dollar(
    proxy: Proxy, budget: float, shown: float
) -> None:
    project_id = await proxy.create_project()
    status, issued = await proxy.manage(
        "POST", "/tokens", {"project_id": project_id, "duration_minutes": 5, "budget_usd": budget}
    )
    assert (status, issued["budget_usd"]) == (201, shown)


async def test_up_to_a_hundred_model_patterns_are_accepted_duplicates_dropped(
    proxy: Proxy,
) -> None:
    project_id = await proxy.create_project()
    patterns = [f"model-{n}" for n in range(49)] + ["x" * 200]
    status, issued = await proxy.manage(
        "POST",
        "/tokens",
        {"project_id": project_id, "duration_minutes": 5, "allowed_models": patterns * 2},
    )
    assert (status, issued["allowed_models"]) == (201, patterns)
    # Counted as sent, as the OpenAPI document's maxItems counts them.
    status, body = await proxy.manage(
        "POST",
        "/tokens",
        {"project_id": project_id, "duration_minutes": 5, "allowed_models": ["gpt-4o"] * 101},
    )
    assert (status, body["error"]["message"]) == (
        400,
        "allowed_models: must have at most 100 patterns",
    )


async def test_a_whole_number_written_with_a_fraction_part_is_that_number(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    status, issued = await proxy.manage(
        "POST",
        "/tokens",
        {"project_id": project_id, "duration_minutes": 5.0, "max_requests": 286.0, "rpm": 1e3},
    )
    assert (status, issued["max_requests"], issued["rpm"]) == (201, 286, 1000)
    assert isinstance(issued["max_requests"], int)
    status, patched = await proxy.manage("PATCH", f"/tokens/{issued['id']}", {"tpm": 60.0})
    assert (status, patched["tpm"]) == (200, 60)


@pytest.mark.parametrize(
    ("method", "path", "payload", "message"),
    [
        (
            "POST",
            "/tokens",
            {"duration_minutes": 0},
            "duration_minutes: must be a whole number of minutes from 1 to 525,600, not 0",
        ),
        (
            "POST",
            "/tokens",
            {"duration_minutes": 5, "max_requests": 0},
            "max_requests: must be a whole number from 1 to 2^62 (about 4.6 quintillion);"
            " null for no limit, not 0",
        ),
        (
            "POST",
            "/tokens",
            {"duration_minutes": 5, "rpm": 2**62 + 1},
            "rpm: must be a whole number from 1 to 2^62 (about 4.6 quintillion);"
            " null for no limit, not 4611686018427387905",
        ),
        (
            "PATCH",
            "/tokens/{token}",
            {"tpm": "60"},
            "tpm: must be a whole number from 1 to 2^62 (about 4.6 quintillion);"
            " null for no limit, not a string",
        ),
        (
            "PATCH",
            "/tokens/{token}",
            {"max_requests": 1e300},
            "max_requests: must be a whole number from 1 to 2^62 (about 4.6 quintillion);"
            " null for no limit, not a number that large",
        ),
        (
            "PATCH",
            "/tokens/{token}",
            {"budget_usd": 0},
            "budget_usd: must be an amount in US dollars from 0.000000001 (one nano-dollar)"
            " to 1 million; null for no limit, not 0",
        ),
        (
            "PATCH",
            "/tokens/{token}",
            {"is_active": None},
            "is_active: must be true or false, not null",
        ),
        (
            "PATCH",
            "/projects/{project}",
            {"description": None},
            "description: must be a string, not null",
        ),
        ("GET", "/audit?page_size=500", None, "page_size: must be a whole number from 1 to 100"),
        ("GET", "/audit?page=0", None, "page: must be a whole number from 1 to 1 billion"),
    ],
)
async def test_bound_messages_read_as_people_write_them(
    proxy: Proxy, method: str, path: str, payload: Any, message: str
) -> None:
    issued = await proxy.issue_token()
    path = path.format(token=issued["id"], project=issued["project_id"])
    if payload is not None and method == "POST":
        payload = {"project_id": issued["project_id"], **payload}
    status, body = await proxy.manage(method, path, payload)
    assert (status, _code(body), body["error"]["message"]) == (400, "invalid_field", message)


async def test_patch_sets_and_clears_each_limit_and_audits_what_changed(proxy: Proxy) -> None:
    issued = await proxy.issue_token()
    path = f"/tokens/{issued['id']}"
    status, patched = await proxy.manage("PATCH", path, LIMITS)
    assert status == 200, patched
    assert {key: patched[key] for key in LIMITS} == {
        **LIMITS,
        "allowed_models": ["gpt-4o-mini", "gpt-4.1*", "o3"],
    }
    status, patched = await proxy.manage("PATCH", path, {"rpm": 5, "budget_usd": None})
    assert (patched["rpm"], patched["budget_usd"], patched["tpm"]) == (5, None, 10_000)
    status, patched = await proxy.manage("PATCH", path, dict.fromkeys(LIMITS))
    assert status == 200 and {key: patched[key] for key in LIMITS} == dict.fromkeys(LIMITS)
    _, token = await proxy.manage("GET", path)
    assert {key: token[key] for key in LIMITS} == dict.fromkeys(LIMITS)

    _, audit = await proxy.manage("GET", f"/audit?target_id={issued['id']}&action=token.update")
    latest, middle, first = (event["details"] for event in audit["events"])
    assert first["changed"] == sorted(LIMITS)
    assert middle == {"changed": ["budget_usd", "rpm"], "rpm": 5, "budget_usd": None}
    assert latest == {"changed": sorted(LIMITS), **dict.fromkeys(LIMITS)}


async def test_metadata_cannot_be_patched(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    _, issued = await proxy.manage(
        "POST",
        "/tokens",
        {"project_id": project_id, "duration_minutes": 5, "metadata": {"user": "ada"}},
    )
    for body in ({"metadata": {"user": "eve"}}, {"rpm": 5, "metadata": None}):
        status, answer = await proxy.manage("PATCH", f"/tokens/{issued['id']}", body)
        assert (status, _code(answer)) == (400, "invalid_field")
        assert answer["error"]["message"].startswith("metadata")
    _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert (token["metadata"], token["rpm"]) == ({"user": "ada"}, None)


# Each wrong value of a limit, refused the same way on POST and PATCH.
BAD_LIMITS = [
    ({"max_requests": 0}, "max_requests"),
    ({"max_requests": 1.5}, "max_requests"),
    ({"max_requests": 286.5}, "max_requests"),
    ({"max_requests": 1e300}, "max_requests"),
    ({"max_requests": False}, "max_requests"),
    ({"max_requests": 2**62 + 1}, "max_requests"),
    ({"rpm": 0}, "rpm"),
    ({"rpm": -1}, "rpm"),
    ({"rpm": 60.5}, "rpm"),
    ({"rpm": None, "tpm": "1"}, "tpm"),
    ({"rpm": True}, "rpm"),
    ({"rpm": "60"}, "rpm"),
    ({"tpm": 0}, "tpm"),
    ({"tpm": 1000.5}, "tpm"),
    ({"tpm": True}, "tpm"),
    ({"tpm": [1000]}, "tpm"),
    ({"budget_usd": 0}, "budget_usd"),
    ({"budget_usd": -5}, "budget_usd"),
    ({"budget_usd": 1_000_000.01}, "budget_usd"),
    ({"budget_usd": 1e-10}, "budget_usd"),
    ({"budget_usd": True}, "budget_usd"),
    ({"budget_usd": "5"}, "budget_usd"),
    ({"allowed_models": []}, "allowed_models"),
    ({"allowed_models": "gpt-4o"}, "allowed_models"),
    ({"allowed_models": [""]}, "allowed_models"),
    ({"allowed_models": ["gpt-4o", "  "]}, "allowed_models"),
    ({"allowed_models": [5]}, "allowed_models"),
    ({"allowed_models": [None]}, "allowed_models"),
    ({"allowed_models": ["x" * 201]}, "allowed_models"),
    ({"allowed_models": [f"m{n}" for n in range(101)]}, "allowed_models"),
    ({"allowed_models": ["m"] * 101}, "allowed_models"),
    ({"allowed_models": [" " + "x" * 200]}, "allowed_models"),
    ({"allowed_models": {"gpt-4o": True}}, "allowed_models"),
]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"duration_minutes": 5}, "project_id"),
        ({"project_id": "p"}, "duration_minutes"),
        ({"project_id": "p", "duration_minutes": 0}, "duration_minutes"),
        ({"project_id": "p", "duration_minutes": 525601}, "duration_minutes"),
        ({"project_id": "p", "duration_minutes": "5"}, "duration_minutes"),
        ({"project_id": "p", "duration_minutes": True}, "duration_minutes"),
        ({"project_id": "p", "duration_minutes": 5.5}, "duration_minutes"),
        ({"project_id": "p", "duration_minutes": None}, "duration_minutes"),
        ({"project_id": None, "duration_minutes": 5}, "project_id"),
        ({"project_id": "p", "duration_minutes": 5, "metadata": None}, "metadata"),
        ({"project_id": 7, "duration_minutes": 5}, "project_id"),
        ({"project_id": "p", "duration_minutes": 5, "colour": "red"}, "colour"),
        ({"project_id": "p", "duration_minutes": 5, "metadata": [1]}, "metadata"),
        ({"project_id": "p", "duration_minutes": 5, "metadata": "team=a"}, "metadata"),
        (
            {"project_id": "p", "duration_minutes": 5, "metadata": {"blob": "x" * 16 * 1024}},
            "metadata",
        ),
        *(({"project_id": "p", "duration_minutes": 5, **bad}, field) for bad, field in BAD_LIMITS),
    ],
)
async def test_bad_token_fields_name_the_field(proxy: Proxy, payload: Any, field: str) -> None:
    status, body = await proxy.manage("POST", "/tokens", payload)
    assert status == 400
    assert body["error"]["message"].startswith(f"{field}:"), body
    assert body["error"]["type"] == "invalid_request_error"
    assert (await proxy.manage("GET", "/tokens"))[1] == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        *BAD_LIMITS,
        ({"is_active": 1}, "is_active"),
        ({"project_id": "other"}, "project_id"),
        ({"duration_minutes": 5}, "duration_minutes"),
        ({"spent_usd": 0}, "spent_usd"),
    ],
)
async def test_bad_token_patch_fields_name_the_field(
    proxy: Proxy, payload: Any, field: str
) -> None:
    issued = await proxy.issue_token()
    status, body = await proxy.manage("PATCH", f"/tokens/{issued['id']}", payload)
    assert (status, _code(body)) == (400, "invalid_field")
    assert body["error"]["message"].startswith(f"{field}:"), body
    _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert {key: token[key] for key in LIMITS} == dict.fromkeys(LIMITS)


async def test_metadata_up_to_the_limit_is_kept(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    metadata = {"blob": "x" * (16 * 1024 - len(b'{"blob":""}'))}
    status, issued = await proxy.manage(
        "POST", "/tokens", {"project_id": project_id, "duration_minutes": 5, "metadata": metadata}
    )
    assert (status, issued["metadata"]) == (201, metadata)


async def test_revoke_by_value(proxy: Proxy) -> None:
    issued = await proxy.issue_token()
    status, _ = await proxy.manage("DELETE", "/tokens", {"token": issued["token"]})
    assert status == 204
    status, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert token["is_active"] is False
    status, body = await proxy.manage("DELETE", "/tokens", {"token": "sk-" + "x" * 43})
    assert (status, _code(body)) == (404, "token_not_found")


async def test_revoke_all_tokens_of_a_project_counts_them(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    first = await proxy.issue_token(project_id)
    await proxy.issue_token(project_id)
    await proxy.issue_token(project_id)
    await proxy.manage("DELETE", f"/tokens/{first['id']}")
    status, counts = await proxy.manage("POST", f"/projects/{project_id}/tokens/revoke")
    assert status == 200
    assert counts == {"revoked_count": 2, "already_revoked_count": 1, "total_tokens": 3}


async def test_patch_project_with_revoke_tokens(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    issued = await proxy.issue_token(project_id)
    status, _ = await proxy.manage("PATCH", f"/projects/{project_id}", {"revoke_tokens": True})
    assert status == 200
    _, token = await proxy.manage("GET", f"/tokens/{issued['id']}")
    assert token["is_active"] is False


async def test_issuing_for_an_inactive_project_is_403(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    await proxy.manage("PATCH", f"/projects/{project_id}", {"is_active": False})
    status, body = await proxy.manage(
        "POST", "/tokens", {"project_id": project_id, "duration_minutes": 5}
    )
    assert (status, _code(body)) == (403, "project_inactive")


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"api_key": "sk-x"}, "name"),
        ({"name": "x"}, "api_key"),
        ({"name": "", "api_key": "sk-x"}, "name"),
        ({"name": "x", "api_key": "sk-x", "metadata": [1]}, "metadata"),
        ({"name": "x" * 201, "api_key": "sk-x"}, "name"),
        ({"name": "x" * 199 + "  ", "api_key": "sk-x"}, "name"),
        ({"name": "x", "api_key": "sk-x", "description": None}, "description"),
        ({"name": "x", "api_key": "sk-x", "metadata": None}, "metadata"),
    ],
)
async def test_bad_project_fields_name_the_field(proxy: Proxy, payload: Any, field: str) -> None:
    status, body = await proxy.manage("POST", "/projects", payload)
    assert status == 400 and body["error"]["message"].startswith(field)


async def test_control_characters_are_refused_inside_an_upstream_key_and_trimmed_around_it(
    proxy: Proxy,
) -> None:
    # Sent upstream as a header value, a CR would inject a header and an LF fail every request.
    project_id = await proxy.create_project()
    for api_key in (
        "sk-abc\nX-Injected: yes",
        "sk-abc\rX-Injected: yes",
        "sk-abc\r\nX-Injected: yes",
        "sk-a\tb",
        "sk-a\x1bb",
        "sk-a\x7fb",
        "sk-a\x85b",
    ):
        for method, path, body in (
            ("POST", "/projects", {"name": "p", "api_key": api_key}),
            ("PATCH", f"/projects/{project_id}", {"api_key": api_key}),
        ):
            status, answer = await proxy.manage(method, path, body)
            assert (status, _code(answer)) == (400, "invalid_field"), (api_key, answer)
            message = answer["error"]["message"]
            assert message.startswith("api_key: ") and "control characters" in message
    status, projects = await proxy.manage("GET", "/projects")
    assert [p["api_key"] for p in projects] == [f"{UPSTREAM_KEY[:5]}…{UPSTREAM_KEY[-4:]}"]
    # A key pasted with its line break is the key: what surrounds it is trimmed, as ever.
    key = "sk-pasted-0000abcd"
    status, answer = await proxy.manage(
        "PATCH", f"/projects/{project_id}", {"api_key": f"\t{key}\r\n"}
    )
    assert status == 200, answer
    token = await proxy.token(project_id=project_id)
    response = await proxy.client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    assert proxy.upstream.requests[-1].headers["Authorization"] == f"Bearer {key}"


async def test_patch_validation(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    status, body = await proxy.manage("PATCH", f"/projects/{project_id}", {})
    assert (status, _code(body)) == (400, "invalid_request")
    status, body = await proxy.manage("PATCH", f"/projects/{project_id}", {"is_active": "no"})
    assert status == 400 and body["error"]["message"].startswith("is_active")
    token = await proxy.issue_token(project_id)
    status, body = await proxy.manage("PATCH", f"/tokens/{token['id']}", {})
    assert (status, _code(body)) == (400, "invalid_request")
    status, body = await proxy.manage("PATCH", "/tokens/nope", {"is_active": False})
    assert (status, _code(body)) == (404, "token_not_found")


async def test_malformed_json_is_a_400_not_a_500(proxy: Proxy) -> None:
    for raw in (b"{not json", b"[1, 2]", b"", b'"text"'):
        response = await proxy.client.post(
            "/manage/projects",
            data=raw,
            headers={**proxy.auth(), "Content-Type": "application/json"},
        )
        assert response.status == 400
        assert _code(await response.json()) == "invalid_json"


async def test_oversized_management_body_is_413(proxy: Proxy) -> None:
    response = await proxy.client.post(
        "/manage/projects",
        data=io.BytesIO(b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}'),
        headers={**proxy.auth(), "Content-Type": "application/json"},
    )
    assert response.status == 413
    assert _code(await response.json()) == "request_too_large"


@pytest.mark.parametrize("size", [900_000, MAX_JSON_BYTES])
async def test_a_large_valid_body_is_read_whole_before_parsing(proxy: Proxy, size: int) -> None:
    body = _padded_project(size)
    assert len(body) == size
    head = _head("POST", "/projects", b"Content-Length: %d" % size)
    # The first bytes arrive alone: a reader that stops at what has arrived so far sees half a body.
    status, _, project = await _exchange(proxy, head, _parts(body, 64 * 1024), pause=0.01)
    assert status == 201, project
    assert project["metadata"] == orjson.loads(body)["metadata"]
    _, listed = await proxy.manage("GET", "/projects")
    assert [p["id"] for p in listed] == [project["id"]]


async def test_a_chunked_body_is_read_whole_up_to_the_limit(proxy: Proxy) -> None:
    head = _head("POST", "/projects", b"Transfer-Encoding: chunked")
    status, _, project = await _exchange(proxy, head, _chunked(_padded_project(MAX_JSON_BYTES)))
    assert status == 201, project


async def test_a_chunked_body_over_the_limit_is_413(proxy: Proxy) -> None:
    head = _head("POST", "/projects", b"Transfer-Encoding: chunked")
    answer = await _exchange(proxy, head, _chunked(_padded_project(11 * 1024 * 1024)))
    _assert_error(answer, 413, "request_too_large")
    assert (await proxy.manage("GET", "/projects")) == (200, [])


async def test_a_content_length_over_the_limit_is_413_before_the_body_is_sent(
    proxy: Proxy,
) -> None:
    head = _head("POST", "/projects", b"Content-Length: %d" % (MAX_JSON_BYTES + 1))
    _assert_error(await _exchange(proxy, head), 413, "request_too_large")


async def test_the_body_is_asked_for_only_once_the_management_token_is_right(
    proxy: Proxy,
) -> None:
    """As the proxy path sends 100 Continue only after admission: a client without the management
    token was asked for its body (and had up to a megabyte of it held) before being refused."""
    body = orjson.dumps({"name": "p", "api_key": UPSTREAM_KEY})
    expecting = (b"Content-Length: %d" % len(body), b"Expect: 100-continue")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(_head("POST", "/projects", *expecting, auth=b"Bearer wrong"))
    first = await reader.readline()
    assert first.startswith(b"HTTP/1.1 401 "), first
    rest = await reader.read()  # the whole answer, then the server closes the connection
    writer.close()
    assert b"\r\nConnection: close\r\n" in rest and b'"code":"unauthorized"' in rest

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(_head("POST", "/projects", *expecting))
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    assert (await reader.readline()).startswith(b"HTTP/1.1 201 ")
    writer.close()
    assert len((await proxy.manage("GET", "/projects"))[1]) == 1


@pytest.mark.parametrize(
    "credential",
    [
        "Bearer tökén".encode(),
        "Bearer tökén".encode("latin-1"),
        f"Bearer {MANAGEMENT_TOKEN}é".encode("latin-1"),
        b"Bearer \xff\xfe",
    ],
)
async def test_a_non_ascii_management_token_is_401(proxy: Proxy, credential: bytes) -> None:
    answer = await _exchange(proxy, _head("GET", "/projects", auth=credential))
    _assert_error(answer, 401, "unauthorized", "authentication_error")
    assert answer[1]["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        (b"gzip", b'{"name": "x", "api_key": "sk-x"}'),
        (b"gzip", gzip.compress(b'{"name": "x", "api_key": "sk-x"}')),
        (b"deflate", b"\x00\x01not deflate"),
        (b"br", b"\x00"),
        (b"identity, gzip", gzip.compress(b'{"name": "x", "api_key": "sk-x"}')),
    ],
)
async def test_a_compressed_body_is_415(proxy: Proxy, encoding: bytes, body: bytes) -> None:
    head = _head(
        "POST", "/projects", b"Content-Encoding: " + encoding, b"Content-Length: %d" % len(body)
    )
    _assert_error(await _exchange(proxy, head, [body]), 415, "unsupported_content_encoding")
    assert (await proxy.manage("GET", "/projects")) == (200, [])


async def test_an_identity_content_encoding_is_plain_json(proxy: Proxy) -> None:
    body = orjson.dumps({"name": "x", "api_key": "sk-x"})
    head = _head(
        "POST", "/projects", b"Content-Encoding: identity", b"Content-Length: %d" % len(body)
    )
    status, _, project = await _exchange(proxy, head, [body])
    assert status == 201 and project["name"] == "x"


@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [
        (web.HTTPBadRequest, 400, "bad_request"),
        (web.HTTPUnsupportedMediaType, 415, "unsupported_media_type"),
        (lambda: web.RequestPayloadError("truncated"), 400, "invalid_body"),
        (lambda: ContentEncodingError("gzip"), 400, "invalid_body"),
        (lambda: RuntimeError("a bug"), 500, "internal_error"),
    ],
)
async def test_whatever_a_management_handler_raises_is_answered_in_the_error_shape(
    proxy: Proxy,
    aiohttp_client: MakeClient,
    raised: Callable[[], Exception],
    status: int,
    code: str,
) -> None:
    async def failing(request: web.Request) -> web.Response:
        raise raised()

    management = management_app(proxy.components.operations, MANAGEMENT_TOKEN)
    management.router.add_post("/failing", failing)
    root = web.Application()
    root.add_subapp("/manage/", management)
    client = await aiohttp_client(root)
    response = await client.post("/manage/failing", headers=proxy.auth())
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert _code(body) == code and set(body["error"]) == {"message", "type", "code"}


async def test_unsupported_methods_and_unknown_routes(proxy: Proxy) -> None:
    response = await proxy.client.put("/manage/projects", headers=proxy.auth())
    assert response.status == 405
    assert _code(await response.json()) == "method_not_allowed"
    assert "GET" in response.headers["Allow"]
    response = await proxy.client.get("/manage/nothing-here", headers=proxy.auth())
    assert response.status == 404 and _code(await response.json()) == "not_found"


async def test_audit_log_records_every_mutation_with_filters_and_pages(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    token = await proxy.issue_token(project_id)
    await proxy.manage("PATCH", f"/projects/{project_id}", {"name": "renamed"})
    await proxy.manage("DELETE", f"/tokens/{token['id']}")
    status, page = await proxy.manage("GET", "/audit")
    assert status == 200
    actions = [e["action"] for e in page["events"]]
    assert actions == ["token.revoke", "project.update", "token.create", "project.create"]
    assert page["pagination"] == {"page": 1, "page_size": 50, "total": 4, "total_pages": 1}
    assert all(e["actor"] == "management-api" for e in page["events"])

    _, filtered = await proxy.manage("GET", f"/audit?target_id={token['id']}")
    assert [e["action"] for e in filtered["events"]] == ["token.revoke", "token.create"]
    _, by_action = await proxy.manage("GET", "/audit?action=project.update")
    assert by_action["events"][0]["details"]["changed"] == ["name"]
    _, second = await proxy.manage("GET", "/audit?page=2&page_size=3")
    assert [e["action"] for e in second["events"]] == ["project.create"]
    assert second["pagination"]["total_pages"] == 2
    _, since = await proxy.manage("GET", "/audit?since=2999-01-01T00:00:00Z")
    assert since["events"] == []

    for query, field in [
        ("page_size=101", "page_size"),
        ("page=0", "page"),
        ("since=yesterday", "since"),
        ("colour=red", "colour"),
    ]:
        status, body = await proxy.manage("GET", f"/audit?{query}")
        assert status == 400 and body["error"]["message"].startswith(field), query
    assert token["token"] not in str(page)


async def test_a_secret_sent_as_the_request_id_is_audited_masked(proxy: Proxy) -> None:
    """SPEC §6: a token's value or the management token never appears in a response. A client
    that fills X-Request-ID with one by mistake would have it back whole from /manage/audit."""
    project_id = await proxy.create_project()
    token = await proxy.issue_token(project_id)
    for request_id in (token["token"], MANAGEMENT_TOKEN, "req-42"):
        response = await proxy.client.post(
            f"/manage/projects/{project_id}/tokens/revoke",
            headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}", "X-Request-ID": request_id},
        )
        assert response.status == 200
    _, page = await proxy.manage("GET", "/audit?action=project.revoke_tokens")
    shown = [event["request_id"] for event in page["events"]]
    assert shown[0] == "req-42"
    assert shown[1].startswith("mgmt-") and "…" in shown[1]
    assert shown[2].startswith("sk-") and "…" in shown[2]
    assert token["token"] not in str(page) and MANAGEMENT_TOKEN not in str(page)


async def test_health_and_ready(proxy: Proxy) -> None:
    response = await proxy.client.get("/health")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok" and body["version"]
    response = await proxy.client.get("/ready")
    assert response.status == 200
    assert (await response.json())["checks"]["database"] == "ok"


async def test_revoke_tokens_alone_is_one_audited_change(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    await proxy.issue_token(project_id)
    status, project = await proxy.manage(
        "PATCH", f"/projects/{project_id}", {"revoke_tokens": True}
    )
    assert status == 200 and project["id"] == project_id
    _, page = await proxy.manage("GET", f"/audit?project_id={project_id}")
    actions = [e["action"] for e in page["events"]]
    assert actions == ["project.revoke_tokens", "token.create", "project.create"]
    assert page["events"][0]["details"]["revoked_count"] == 1


async def test_revoke_tokens_false_alone_changes_nothing_and_is_audited_once(
    proxy: Proxy,
) -> None:
    # Accepted, as a PATCH giving a project's current values is: the project as it was, its
    # tokens untouched, and one audit event like every other call (it once wrote none).
    project_id = await proxy.create_project()
    token = await proxy.issue_token(project_id)
    _, before = await proxy.manage("GET", f"/projects/{project_id}")
    status, project = await proxy.manage(
        "PATCH", f"/projects/{project_id}", {"revoke_tokens": False}
    )
    assert status == 200
    kept = ("id", "name", "description", "metadata", "is_active", "api_key", "created_at")
    assert {key: project[key] for key in kept} == {key: before[key] for key in kept}
    _, token_now = await proxy.manage("GET", f"/tokens/{token['id']}")
    assert token_now["status"] == "active"
    _, page = await proxy.manage("GET", f"/audit?project_id={project_id}")
    assert [e["action"] for e in page["events"]] == [
        "project.update",
        "token.create",
        "project.create",
    ]
    assert page["events"][0]["details"]["changed"] == []
    assert "revoked_count" not in page["events"][0]["details"]


async def test_each_mutating_call_writes_exactly_one_audit_event(proxy: Proxy) -> None:
    """SPEC §5: a change and a revocation asked in one PATCH are one event, and revoking a
    token already revoked (204 all the same) is audited too."""
    project_id = await proxy.create_project()
    token = await proxy.issue_token(project_id)
    _, before = await proxy.manage("GET", f"/audit?project_id={project_id}")

    await proxy.manage(
        "PATCH", f"/projects/{project_id}", {"is_active": True, "revoke_tokens": True}
    )
    assert (await proxy.manage("DELETE", f"/tokens/{token['id']}"))[0] == 204
    assert (await proxy.manage("DELETE", "/tokens", {"token": token["token"]}))[0] == 204

    _, after = await proxy.manage("GET", f"/audit?project_id={project_id}")
    new = after["events"][: after["pagination"]["total"] - before["pagination"]["total"]]
    assert [e["action"] for e in new] == ["token.revoke", "token.revoke", "project.update"]
    update = new[-1]["details"]
    assert (update["changed"], update["revoked_count"], update["total_tokens"]) == (
        ["is_active"],
        1,
        1,
    )
    assert all(e["details"]["already_revoked"] for e in new[:2])


async def test_wrong_credentials_are_counted_and_logged_without_filling_the_log(
    proxy: Proxy,
) -> None:
    """Someone guessing the management token or the admin password shows on /metrics and in
    the log; the log says so once per few seconds, with how many, not once a request."""
    before = _auth_failures(await (await proxy.client.get("/metrics")).text())
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            assert (await proxy.client.get("/manage/projects", headers=BAD_TOKEN)).status == 401
            assert (await proxy.client.get("/admin/", headers=BAD_PASSWORD)).status == 401
        # Asking without credentials is how a browser starts: not a failure.
        assert (await proxy.client.get("/admin/")).status == 401
        assert (await proxy.client.get("/manage/projects")).status == 401
    after = _auth_failures(await (await proxy.client.get("/metrics")).text())
    assert {s: after.get(s, 0) - before.get(s, 0) for s in after} == {"management": 5, "admin": 5}
    lines = [e for e in logs if e["event"] == "auth.credentials_refused"]
    # At most one line per surface in these few seconds (one each unless one was said just
    # before, by another test of this process).
    assert len(lines) <= 2 and {e["surface"] for e in lines} <= {"management", "admin"}
    assert all("wrong" not in str(e) for e in lines)  # the credential itself is never logged


BAD_TOKEN = {"Authorization": "Bearer wrong-token-guess"}
BAD_PASSWORD = {"Authorization": "Basic " + base64.b64encode(b"admin:wrong-guess").decode()}


def _auth_failures(page: str) -> dict[str, float]:
    return {
        sample.labels["surface"]: sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "llm_proxy_auth_failures_total"
    }


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"name": "first", "name": "second", "api_key": "sk-x"}', "'name' is given twice"),
        (b'{"name": "p", "api_key": "sk-x", "metadata": {"a": 1, "a": 2}}', "'a' is given twice"),
    ],
)
async def test_a_body_read_one_way_of_several_is_refused(
    proxy: Proxy, body: bytes, said: str
) -> None:
    response = await proxy.client.post(
        "/manage/projects",
        data=body,
        headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "invalid_json" and said in error["message"]
    assert (await proxy.manage("GET", "/projects"))[1] == []


async def test_a_repeated_key_that_is_a_secret_is_named_masked(proxy: Proxy) -> None:
    """SPEC §6: no error message carries a token's value, which an unknown field's name already
    respects; a key given twice was named whole."""
    token = await proxy.issue_token()
    for body in (
        {"metadata": {token["token"]: 1}},
        {"name": "p", "api_key": "sk-x", token["token"]: 1},
    ):
        key = orjson.dumps(token["token"])
        raw = orjson.dumps(body).replace(key + b":1", key + b":1," + key + b":2")
        response = await proxy.client.post(
            "/manage/projects",
            data=raw.replace(b'{"metadata"', b'{"name":"p","api_key":"sk-x","metadata"'),
            headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}"},
        )
        error = (await response.json())["error"]
        assert (response.status, error["code"]) == (400, "invalid_json"), error
        assert "is given twice" in error["message"], error
        assert token["token"] not in error["message"] and "sk-" in error["message"], error


@pytest.mark.parametrize(
    ("path", "fields", "field", "said"),
    [
        ("/tokens", b'"max_requests": 18446744073709551616', "max_requests", "64 bits"),
        ("/tokens", b'"rpm": -9223372036854775809', "rpm", "64 bits"),
        ("/tokens", b'"tpm": 1' + b"0" * 5000, "tpm", "64 bits"),
        ("/tokens", b'"budget_usd": 1e400', "budget_usd", "too large for a double"),
        ("/tokens", b'"metadata": {"n": [18446744073709551616]}', "metadata", "64 bits"),
        ("/projects", b'"metadata": {"n": 1e400}', "metadata", "too large for a double"),
    ],
)
async def test_a_number_out_of_range_is_a_bad_value_of_its_field(
    proxy: Proxy, path: str, fields: bytes, field: str, said: str
) -> None:
    """Valid JSON, out of every range: answered as any bad field is (SPEC §5, "bad fields 400 with
    the field named"), not as a body that is no JSON or has no field to name."""
    project_id = await proxy.create_project()
    given = {"/tokens": b'"project_id": "%s", "duration_minutes": 5, ' % project_id.encode()}
    body = b"{" + given.get(path, b'"name": "p", "api_key": "sk-x", ') + fields + b"}"
    response = await proxy.client.post(
        f"/manage{path}",
        data=body,
        headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}", "Content-Type": "application/json"},
    )
    error = (await response.json())["error"]
    assert (response.status, error["code"]) == (400, "invalid_field"), error
    assert error["message"].startswith(f"{field}: ") and said in error["message"], error
    assert (await proxy.manage("GET", "/tokens"))[1] == []
    assert len((await proxy.manage("GET", "/projects"))[1]) == 1


async def test_a_query_parameter_given_twice_is_refused_by_name(proxy: Proxy) -> None:
    """Of a repeated parameter the first was taken and the rest ignored: asked for two projects'
    tokens, the list answered one project's as if that were all."""
    first, second = await proxy.create_project("a"), await proxy.create_project("b")
    await proxy.issue_token(second)
    for query, field in [
        (f"/tokens?project_id={first}&project_id={second}", "project_id"),
        ("/audit?page_size=1&page_size=100", "page_size"),
        ("/audit?action=project.create&action=token.create", "action"),
        ("/audit?since=2020-01-01&until=2030-01-01&since=2029-01-01", "since"),
    ]:
        status, body = await proxy.manage("GET", query)
        assert status == 400, (query, body)
        assert body["error"]["message"] == f"{field}: is given more than once; give it once"
    status, tokens = await proxy.manage("GET", f"/tokens?project_id={second}")
    assert status == 200 and len(tokens) == 1


async def test_no_answer_of_the_management_api_may_be_cached(proxy: Proxy) -> None:
    """The answer that carries an issued token's value above all: a cache between operator and
    server (a corporate proxy, a browser) must not keep it."""
    project_id = await proxy.create_project()
    for method, path, body in [
        ("POST", "/tokens", {"project_id": project_id, "duration_minutes": 5}),
        ("GET", "/tokens", None),
        ("GET", f"/projects/{project_id}", None),
        ("GET", "/projects/nope", None),
        ("GET", "/audit", None),
    ]:
        response = await proxy.operator.request(
            method, f"{proxy.base_url}/manage{path}", json=body, headers=proxy.auth()
        )
        assert response.headers.get("Cache-Control") == "no-store", (method, path)
    response = await proxy.operator.get(f"{proxy.base_url}/manage/projects")
    assert response.status == 401 and response.headers.get("Cache-Control") == "no-store"
