"""``manage token list`` / ``project list`` as an operator reads them: short ids, each token's
status, 80 columns; whole ids with ``--wide`` and ``--json``; ids given back whole or as a unique
prefix, an ambiguous one refused. A real server process throughout."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner, Result

from llm_proxy.runtime.cli import main
from tests.processes import (
    ServerProcess,
    http,
)

pytestmark = pytest.mark.process

UUID_LENGTH = 36


def manage(server: ServerProcess, *args: str) -> Result:
    return CliRunner().invoke(
        main,
        ["manage", *args],
        env={"MANAGEMENT_TOKEN": server.management_token, "MANAGE_API_BASE_URL": server.base_url},
    )


def manage_json(server: ServerProcess, *args: str) -> Any:
    result = manage(server, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def api(server: ServerProcess, method: str, path: str, body: Any = None) -> Any:
    status, answer = http(method, server.base_url + path, token=server.management_token, body=body)
    assert status < 300, answer
    return answer


def new_project(server: ServerProcess, name: str) -> str:
    return str(api(server, "POST", "/manage/projects", {"name": name, "api_key": "sk-x"})["id"])


def new_token(server: ServerProcess, project_id: str, **limits: Any) -> dict[str, Any]:
    body = {"project_id": project_id, "duration_minutes": 60, **limits}
    token: dict[str, Any] = api(server, "POST", "/manage/tokens", body)
    return token


def rows(result: Result) -> list[list[str]]:
    assert result.exit_code == 0, result.output
    return [line.split() for line in result.stdout.splitlines()]


def test_token_list_shows_short_ids_and_each_tokens_status(server: ServerProcess) -> None:
    project_id = new_project(server, "statuses")
    active = new_token(server, project_id)
    revoked = new_token(server, project_id)
    exhausted = new_token(server, project_id, max_requests=1)
    api(server, "DELETE", f"/manage/tokens/{revoked['id']}")
    status, _ = http("GET", f"{server.base_url}/v1/models", token=exhausted["token"])
    assert status == 200

    table = rows(manage(server, "token", "list", "--project-id", project_id))
    assert table[0] == ["id", "project", "status", "expires", "requests", "spent_usd"]
    by_id = {row[0]: row for row in table[1:]}
    assert set(by_id) == {t["id"][:8] for t in (active, revoked, exhausted)}
    assert by_id[active["id"][:8]][1:3] == [project_id[:8], "active"]
    assert by_id[revoked["id"][:8]][2] == "revoked"
    assert by_id[exhausted["id"][:8]][2] == "exhausted"
    assert by_id[exhausted["id"][:8]][-2] == "1/1"  # requests used of the limit
    assert by_id[active["id"][:8]][-2] == "0"  # no limit

    # --wide and --json carry the whole ids.
    wide = manage(server, "token", "list", "--project-id", project_id, "--wide")
    assert wide.exit_code == 0, wide.output
    for token in (active, revoked, exhausted):
        assert token["id"] in wide.stdout
    listed = manage_json(server, "token", "list", "--project-id", project_id)
    assert {t["id"]: t["status"] for t in listed} == {
        active["id"]: "active",
        revoked["id"]: "revoked",
        exhausted["id"]: "exhausted",
    }


def test_lists_fit_80_columns(server: ServerProcess) -> None:
    project_id = new_project(server, "a project whose name goes on " + "and on " * 20)
    new_token(server, project_id, max_requests=1_000_000, budget_usd=250.5)
    for args in (("project", "list"), ("token", "list")):
        result = manage(server, *args)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, result.stdout
    project_row = next(
        line
        for line in manage(server, "project", "list").stdout.splitlines()
        if line.startswith(project_id[:8])
    )
    assert "a project whose name goes on" in project_row and "…" in project_row
    full = manage(server, "project", "list", "--wide")
    assert "a project whose name goes on " + "and on " * 20 in full.stdout


def test_project_list_shows_short_ids_and_whole_ones_when_wide(server: ServerProcess) -> None:
    project_id = new_project(server, "short and wide")
    api(server, "PATCH", f"/manage/projects/{project_id}", {"is_active": False})
    table = rows(manage(server, "project", "list"))
    assert table[0] == ["id", "name", "status", "api_key", "created"]
    row = next(r for r in table if r[0] == project_id[:8])
    assert row[1:5] == ["short", "and", "wide", "inactive"]
    assert project_id not in manage(server, "project", "list").stdout
    assert project_id in manage(server, "project", "list", "--wide").stdout
    assert project_id in [p["id"] for p in manage_json(server, "project", "list")]


def test_get_update_and_revoke_take_a_short_id(server: ServerProcess) -> None:
    project_id = new_project(server, "by short id")
    token_id = new_token(server, project_id)["id"]
    assert manage_json(server, "project", "get", project_id[:8])["id"] == project_id
    assert manage_json(server, "token", "get", token_id[:8])["id"] == token_id
    assert manage_json(server, "token", "get", token_id[:4])["id"] == token_id
    updated = manage_json(server, "token", "update", token_id[:8], "--rpm", "7")
    assert (updated["id"], updated["rpm"]) == (token_id, 7)
    issued = manage_json(server, "token", "generate", "--project-id", project_id[:8])
    assert issued["project_id"] == project_id
    listed = manage_json(server, "token", "list", "--project-id", project_id[:8])
    assert {t["id"] for t in listed} == {token_id, issued["id"]}
    renamed = manage_json(server, "project", "update", project_id[:8], "--name", "renamed")
    assert (renamed["id"], renamed["name"]) == (project_id, "renamed")

    result = manage(server, "token", "revoke", token_id[:8], "--yes")
    assert (result.exit_code, result.stdout.strip()) == (0, f"Revoked token {token_id}.")
    assert api(server, "GET", f"/manage/tokens/{token_id}")["status"] == "revoked"
    result = manage(server, "project", "delete", project_id[:8], "--yes")
    assert (result.exit_code, result.stdout.strip()) == (0, f"Deleted project {project_id}.")


def test_a_prefix_shorter_than_four_characters_names_nothing(server: ServerProcess) -> None:
    token_id = new_token(server, new_project(server, "three"))["id"]
    result = manage(server, "token", "get", token_id[:3])
    assert result.exit_code == 1
    assert "404 token_not_found" in result.stderr


def test_an_ambiguous_prefix_is_refused_and_changes_nothing(server: ServerProcess) -> None:
    project_id = new_project(server, "ambiguous")
    # Issue tokens until two ids share their first four characters (a few hundred, typically).
    seen: dict[str, str] = {}
    for _ in range(3000):
        token_id = new_token(server, project_id)["id"]
        if token_id[:4] in seen:
            pair = sorted([seen[token_id[:4]], token_id])
            break
        seen[token_id[:4]] = token_id
    else:
        pytest.fail("no two ids shared a prefix")
    shared = next(n for n, (a, b) in enumerate(zip(*pair, strict=True)) if a != b)
    prefix = pair[0][:shared]

    for args in (("token", "get", prefix), ("token", "revoke", prefix, "--yes")):
        result = manage(server, *args)
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert line.startswith(f"Error: token id {prefix!r} is ambiguous: 2 tokens' ids begin")
        assert pair[0] in line and pair[1] in line and "give more of it" in line
    assert {api(server, "GET", f"/manage/tokens/{i}")["status"] for i in pair} == {"active"}

    # One more character tells them apart.
    first = pair[0][: shared + 1]
    assert manage_json(server, "token", "get", first)["id"] == pair[0]
    ambiguous = manage(server, "token", "get", prefix, "--json")
    assert ambiguous.exit_code == 2
    assert json.loads(ambiguous.stderr)["error"]["code"] == "ambiguous_id"
    # A whole id never goes through the prefix search.
    assert len(pair[1]) == UUID_LENGTH
    assert manage_json(server, "token", "get", pair[1])["id"] == pair[1]
