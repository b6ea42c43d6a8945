"""Every status an operation answers is documented for it, and every documented one is provoked.

Each operation of the document meets the same provocations (no management token, a compressed
body, broken framing, a body too large, a head too large, a body that stops arriving, a database
gone) and those of its own (an unknown id, a bad body or query, an inactive project). The set of
statuses seen must be the set documented, each answer must fit the schema documented for its
status, and each error code must be one the document lists for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_proxy.control.openapi import openapi_document
from tests.conftest import MANAGEMENT_TOKEN, UPSTREAM_KEY, Proxy
from tests.control.test_openapi_document import (
    HTTP_METHODS,
    error_codes,
    operations,
    response_schema,
    schema_validator,
)
from tests.sqlite_writes import write_sqlite

NO_BODY: Any = object()
UNKNOWN = "00000000-0000-4000-8000-000000000000"
BODY_SECONDS = 0.3  # how long the front door waits for a stalled body, in these tests


@dataclass(frozen=True)
class Call:
    method: str
    target: str  # under /manage, with any query
    body: Any = NO_BODY

    def raw_body(self) -> bytes:
        return b"" if self.body is NO_BODY else orjson.dumps(self.body)


Make = Callable[[Proxy], Awaitable[Call]]


async def _project(proxy: Proxy) -> str:
    return await proxy.create_project()


async def _token(proxy: Proxy) -> dict[str, Any]:
    return await proxy.issue_token()


def _call(method: str, target: str, body: Any = NO_BODY) -> Make:
    async def make(proxy: Proxy) -> Call:
        return Call(method, target, body)

    return make


def _on_project(method: str, target: str, body: Any = NO_BODY) -> Make:
    async def make(proxy: Proxy) -> Call:
        return Call(method, target.format(project=await _project(proxy)), body)

    return make


def _on_token(method: str, target: str, body: Any = NO_BODY) -> Make:
    async def make(proxy: Proxy) -> Call:
        return Call(method, target.format(token=(await _token(proxy))["id"]), body)

    return make


async def _issue(proxy: Proxy) -> Call:
    return Call("POST", "/tokens", {"project_id": await _project(proxy), "duration_minutes": 5})


async def _issue_for_inactive(proxy: Proxy) -> Call:
    project_id = await _project(proxy)
    status, _ = await proxy.manage("PATCH", f"/projects/{project_id}", {"is_active": False})
    assert status == 200
    return Call("POST", "/tokens", {"project_id": project_id, "duration_minutes": 5})


async def _revoke_by_value(proxy: Proxy) -> Call:
    return Call("DELETE", "/tokens", {"token": (await _token(proxy))["token"]})


@dataclass(frozen=True)
class Spec:
    """How to call an operation well, and the calls that go wrong in its own ways."""

    ok: Make
    own: tuple[Make, ...] = ()


SPECS = {
    "create_project": Spec(
        _call("POST", "/projects", {"name": "n", "api_key": UPSTREAM_KEY}),
        (_call("POST", "/projects", [1]),),
    ),
    "list_projects": Spec(_call("GET", "/projects"), (_call("GET", "/projects?name=x"),)),
    "get_project": Spec(_on_project("GET", "/projects/{project}"), (_call("GET", "/projects/x"),)),
    "update_project": Spec(
        _on_project("PATCH", "/projects/{project}", {"name": "m"}),
        (
            _call("PATCH", f"/projects/{UNKNOWN}", {"name": "m"}),
            _on_project("PATCH", "/projects/{project}", {"name": ""}),
        ),
    ),
    "delete_project": Spec(
        _on_project("DELETE", "/projects/{project}"), (_call("DELETE", f"/projects/{UNKNOWN}"),)
    ),
    "revoke_project_tokens": Spec(
        _on_project("POST", "/projects/{project}/tokens/revoke"),
        (_call("POST", f"/projects/{UNKNOWN}/tokens/revoke"),),
    ),
    "create_token": Spec(
        _issue,
        (
            _call("POST", "/tokens", {"project_id": UNKNOWN, "duration_minutes": 5}),
            _issue_for_inactive,
            _call("POST", "/tokens", {"project_id": UNKNOWN, "duration_minutes": 286.5}),
        ),
    ),
    "list_tokens": Spec(
        _call("GET", "/tokens"),
        (_call("GET", f"/tokens?project_id={UNKNOWN}"), _call("GET", "/tokens?projectid=x")),
    ),
    "revoke_token_by_value": Spec(
        _revoke_by_value,
        (
            _call("DELETE", "/tokens", {"token": "sk-" + "x" * 43}),
            _call("DELETE", "/tokens", {"token": ""}),
        ),
    ),
    "get_token": Spec(_on_token("GET", "/tokens/{token}"), (_call("GET", f"/tokens/{UNKNOWN}"),)),
    "update_token": Spec(
        _on_token("PATCH", "/tokens/{token}", {"rpm": 5}),
        (
            _call("PATCH", f"/tokens/{UNKNOWN}", {"rpm": 5}),
            _on_token("PATCH", "/tokens/{token}", {"metadata": {}}),
        ),
    ),
    "revoke_token": Spec(
        _on_token("DELETE", "/tokens/{token}"), (_call("DELETE", f"/tokens/{UNKNOWN}"),)
    ),
    "list_audit_events": Spec(
        _call("GET", "/audit?page_size=10"), (_call("GET", "/audit?page_size=101"),)
    ),
    "get_openapi_document": Spec(_call("GET", "/openapi.json")),
}


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


async def _raw(proxy: Proxy, head: list[bytes], body: bytes = b"", *, auth: bool = True) -> Answer:
    """Send a request as bytes, as no client library would, and read the one answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    lines = [*head, b"Host: 127.0.0.1"]
    if auth:
        lines.append(f"Authorization: Bearer {MANAGEMENT_TOKEN}".encode())
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    try:
        status_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        raw = await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Answer(int(status_line.split()[1]), headers, orjson.loads(raw) if raw else None)


def _request_line(call: Call) -> bytes:
    return f"{call.method} /manage{call.target} HTTP/1.1".encode()


async def _plain(proxy: Proxy, call: Call, *, auth: bool = True, gzipped: bool = False) -> Answer:
    body = call.raw_body()
    head = [_request_line(call)]
    if gzipped:
        body = gzip.compress(body or b"{}")
        head.append(b"Content-Encoding: gzip")
    if body:
        head += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    return await _raw(proxy, head, body, auth=auth)


async def _framing_broken(proxy: Proxy, call: Call) -> Answer:
    return await _raw(proxy, [_request_line(call), b"Content-Length: 1, 2"])


async def _body_too_large(proxy: Proxy, call: Call) -> Answer:
    return await _raw(proxy, [_request_line(call), b"Content-Length: %d" % (2 * 1024 * 1024)])


async def _head_too_large(proxy: Proxy, call: Call) -> Answer:
    return await _raw(proxy, [_request_line(call), b"X-Padding: " + b"p" * 70_000])


async def _target_too_long(proxy: Proxy, call: Call) -> Answer:
    padded = f"{call.method} /manage{call.target}?pad={'p' * 70_000} HTTP/1.1".encode()
    return await _raw(proxy, [padded])


async def _body_stalled(proxy: Proxy, call: Call) -> Answer:
    return await _raw(proxy, [_request_line(call), b"Content-Length: 100"], b'{"name"')


async def _without_token(proxy: Proxy, call: Call) -> Answer:
    return await _plain(proxy, call, auth=False)


async def _compressed(proxy: Proxy, call: Call) -> Answer:
    return await _plain(proxy, call, gzipped=True)


GENERIC: list[Callable[[Proxy, Call], Awaitable[Answer]]] = [
    _plain,
    _without_token,
    _compressed,
    _framing_broken,
    _body_too_large,
    _head_too_large,
    _target_too_long,
    _body_stalled,
]


async def _break_database(database_url: str) -> None:
    """Take the tables away from under the running server, as a lost database would."""
    for table in ("projects", "tokens", "audit_events"):
        await write_sqlite(
            Path(database_url.removeprefix("sqlite:///")),
            f"ALTER TABLE {table} RENAME TO {table}_gone",
        )


def _check(
    document: dict[str, Any], operation: dict[str, Any], answer: Answer, context: str
) -> None:
    """The answer fits what the document says of its status."""
    try:
        schema = response_schema(document, operation, answer.status)
    except KeyError:
        return  # undocumented: reported by the caller with every other status seen
    if schema is None:
        assert answer.body is None, context
        return
    errors = list(schema_validator(document, schema).iter_errors(answer.body))
    assert not errors, (context, answer, errors[0].message)
    if answer.status >= 400:
        assert answer.body["error"]["code"] in error_codes(document, operation, answer.status), (
            context,
            answer,
        )


OPERATION_IDS = [operation["operationId"] for _, _, operation in operations(openapi_document())]


def test_every_operation_has_its_provocations() -> None:
    assert set(SPECS) == set(OPERATION_IDS)


@pytest.mark.parametrize("operation_id", OPERATION_IDS)
async def test_each_status_seen_is_documented_and_each_documented_one_is_seen(
    proxy_factory: Any, proxy_database_url: str, operation_id: str
) -> None:
    proxy: Proxy = await proxy_factory(site={"body_seconds": BODY_SECONDS})
    document = openapi_document()
    ((method, path, operation),) = [
        found for found in operations(document) if found[2]["operationId"] == operation_id
    ]
    spec = SPECS[operation_id]
    seen: dict[int, str] = {}

    async def provoke(make: Make, send: Callable[[Proxy, Call], Awaitable[Answer]]) -> None:
        call = await make(proxy)
        assert call.method == method, (call, method)
        answer = await send(proxy, call)
        context = f"{call.method} {call.target} via {send.__name__}"
        _check(document, operation, answer, context)
        seen.setdefault(answer.status, context)

    for send in GENERIC:
        await provoke(spec.ok, send)
    for make in spec.own:
        await provoke(make, _plain)
    call = await spec.ok(proxy)
    await _break_database(proxy_database_url)
    answer = await _plain(proxy, call)
    _check(document, operation, answer, "database gone")
    seen.setdefault(answer.status, "database gone")

    documented = {int(status) for status in operation["responses"]}
    assert set(seen) == documented, {
        "seen, not documented": {s: seen[s] for s in set(seen) - documented},
        "documented, never seen": documented - set(seen),
        "path": path,
    }


@pytest.mark.parametrize("path", list(openapi_document()["paths"]))
async def test_a_method_a_path_does_not_serve_is_405_with_the_methods_it_does(
    proxy: Proxy, path: str
) -> None:
    document = openapi_document()
    item = document["paths"][path]
    served = {method.upper() for method in HTTP_METHODS if method in item}
    if "GET" in served:
        served.add("HEAD")
    assert item["description"] == (
        f"Serves {', '.join(sorted(served))}; any other method is answered 405."
    )
    target = path.removeprefix("/manage").format(project_id=UNKNOWN, token_id=UNKNOWN)
    others = {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - served
    assert others
    for method in sorted(others):
        answer = await _plain(proxy, Call(method, target))
        assert answer.status == 405, (method, path, answer)
        assert set(answer.headers["allow"].split(", ")) == served
        response = document["components"]["responses"]["MethodNotAllowed"]
        schema = response["content"]["application/json"]["schema"]
        schema_validator(document, schema).validate(answer.body)
        assert answer.body["error"]["code"] in response["x-error-codes"]
