"""A token's value pasted where an id goes (``token get sk-…``, ``GET /manage/tokens/sk-…``): the
value is never echoed in an error, and the CLI never sends it in a URL (SPEC §6: a token value
appears in no error message or response but the one that issued it)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result

from llm_proxy.runtime.cli import main
from tests.conftest import MANAGEMENT_TOKEN, Proxy
from tests.processes import ServerProcess, free_port, http


async def test_the_api_never_echoes_a_token_value_given_as_an_id(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    issued = await proxy.issue_token(project_id)
    value = issued["token"]
    calls = [
        ("GET", f"/tokens/{value}", None),
        ("PATCH", f"/tokens/{value}", {"max_requests": 5}),
        ("DELETE", f"/tokens/{value}", None),
        ("GET", f"/projects/{value}", None),
        ("DELETE", f"/projects/{value}", None),
        ("POST", f"/projects/{value}/tokens/revoke", None),
        ("GET", f"/tokens?project_id={value}", None),
        ("POST", "/tokens", {"project_id": value, "duration_minutes": 5}),
    ]
    for method, path, body in calls:
        status, answer = await proxy.manage(method, path, body)
        assert status == 404, (method, path, answer)
        message = answer["error"]["message"]
        assert value not in message and value[3:13] not in message, (method, path, message)
        assert "a token's value, not an id" in message
    # Nor in a path that names no route, or a method a route does not take.
    for method, path in [("GET", f"/token/{value}"), ("PUT", f"/tokens/{value}")]:
        status, answer = await proxy.manage(method, path)
        assert status in (404, 405), (method, path, answer)
        assert value not in answer["error"]["message"] and value[3:13] not in str(answer)
    # The management token pasted as an id is not echoed either.
    status, answer = await proxy.manage("GET", f"/projects/{MANAGEMENT_TOKEN}")
    assert status == 404 and MANAGEMENT_TOKEN not in answer["error"]["message"]
    # An ordinary id is still named in full.
    status, answer = await proxy.manage("GET", "/tokens/no-such-id")
    assert (status, answer["error"]["message"]) == (404, "No token with id 'no-such-id'.")


async def test_a_token_value_given_as_a_field_name_is_not_echoed(proxy: Proxy) -> None:
    project_id = await proxy.create_project()
    value = (await proxy.issue_token(project_id))["token"]
    calls = [
        ("POST", "/tokens", {"project_id": project_id, "duration_minutes": 5, value: 1}),
        ("PATCH", f"/projects/{project_id}", {value: True}),
        ("DELETE", "/tokens", {value: value}),  # {"token": …} mistyped as the value alone
    ]
    for method, path, body in calls:
        status, answer = await proxy.manage(method, path, body)
        assert status == 400, (method, path, answer)
        message = answer["error"]["message"]
        assert value not in message and value[3:13] not in message, (method, path, message)
        assert "unknown field" in message
    # An ordinary unknown field is still named in full.
    status, answer = await proxy.manage(
        "POST", "/tokens", {"project_id": project_id, "duration_minutes": 5, "max_request": 1}
    )
    assert status == 400 and answer["error"]["message"].startswith("max_request: unknown field")


async def test_a_token_value_given_as_a_query_parameter_name_is_not_echoed(proxy: Proxy) -> None:
    value = await proxy.token()
    for path in (f"/tokens?{value}=1", f"/audit?{value}", f"/projects?{value}=x"):
        status, answer = await proxy.manage("GET", path)
        assert status == 400, (path, answer)
        message = answer["error"]["message"]
        assert value not in message and value[3:13] not in message, (path, message)
        assert "unknown query parameter" in message


def _manage(base_url: str, token: str, *args: str) -> Result:
    return CliRunner().invoke(
        main,
        ["manage", *args],
        env={"MANAGEMENT_TOKEN": token, "MANAGE_API_BASE_URL": base_url},
    )


def _issue(server: ServerProcess) -> dict[str, str]:
    token = server.management_token
    _, project = http(
        "POST",
        f"{server.base_url}/manage/projects",
        token=token,
        body={"name": "p", "api_key": "k"},
    )
    _, issued = http(
        "POST",
        f"{server.base_url}/manage/tokens",
        token=token,
        body={"project_id": project["id"], "duration_minutes": 5},
    )
    return {"value": issued["token"], "id": issued["id"], "project_id": project["id"]}


COMMANDS = [
    ("token", "get", "{value}"),
    ("token", "get", "Bearer {value}"),
    ("token", "revoke", "{value}", "--yes"),
    ("token", "update", "{value}", "--max-requests", "3"),
    ("token", "list", "--project-id", "{value}"),
    ("project", "get", "{value}"),
]


@pytest.mark.process
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2] + c[3:4]))
def test_manage_never_sends_a_token_value_as_an_id(
    server: ServerProcess, command: tuple[str, ...]
) -> None:
    issued = _issue(server)
    args = [part.format(value=issued["value"]) for part in command]
    # A port nobody listens on: anything sent would be "cannot reach", exit 1.
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = _manage(nowhere, server.management_token, *args)
    assert result.exit_code == 2, result.output
    assert "a token's value, not a" in result.output and "nothing was sent" in result.output
    assert issued["value"] not in result.output
    as_json = _manage(nowhere, server.management_token, *args, "--json")
    assert as_json.exit_code == 2, as_json.output
    assert json.loads(as_json.stderr)["error"]["code"] == "token_value_as_id"
    # Against the real server too: the token was not touched.
    real = _manage(server.base_url, server.management_token, *args)
    assert real.exit_code == 2 and issued["value"] not in real.output
    status, token = http(
        "GET", f"{server.base_url}/manage/tokens/{issued['id']}", token=server.management_token
    )
    assert (status, token["status"], token["max_requests"]) == (200, "active", None)


async def test_the_proxy_path_never_echoes_a_token_value_in_its_path(proxy: Proxy) -> None:
    """A path or method the proxy refuses names the path in its message: masked when a token's
    value was pasted into it."""
    value = (await proxy.issue_token(await proxy.create_project()))["token"]
    for method, path, status in [
        ("GET", f"/v2/{value}", 404),
        ("GET", f"/v1/models%2F{value}", 404),
        ("PUT", f"/v1/models/{value}", 405),
        ("GET", f"/health/{value}", 404),
        ("POST", f"/metrics/{value}", 404),
    ]:
        response = await proxy.client.request(method, path, headers={"Authorization": "Bearer x"})
        text = await response.text()
        assert response.status == status, (method, path, text)
        assert value not in text and value[3:13] not in text, (method, path, text)
