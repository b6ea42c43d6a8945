"""``manage --json`` reports every error as one JSON object on stderr (exit status kept), and the
commands that destroy ask first on a terminal, refuse without one unless ``--yes``. A real server
process; the terminal is a real pseudo-terminal in front of a real ``llm-proxy`` process."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from llm_proxy.runtime.cli import main
from tests.processes import (
    ServerProcess,
    clean_env,
    cli_command,
    free_port,
    http,
)

pytestmark = pytest.mark.process


def connection(server: ServerProcess) -> dict[str, str]:
    return {"MANAGEMENT_TOKEN": server.management_token, "MANAGE_API_BASE_URL": server.base_url}


def manage(server: ServerProcess, *args: str) -> Result:
    """``manage ARGS`` with stdin not a terminal (CliRunner's is a pipe)."""
    return CliRunner().invoke(main, ["manage", *args], env=connection(server))


def api(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return http(method, server.base_url + path, token=server.management_token, body=body)


def new_project(server: ServerProcess, name: str = "confirm") -> str:
    status, project = api(server, "POST", "/manage/projects", {"name": name, "api_key": "sk-x"})
    assert status == 201, project
    return str(project["id"])


def new_token(server: ServerProcess, project_id: str) -> str:
    body = {"project_id": project_id, "duration_minutes": 60}
    status, token = api(server, "POST", "/manage/tokens", body)
    assert status == 201, token
    return str(token["id"])


def token_status(server: ServerProcess, token_id: str) -> str:
    return str(api(server, "GET", f"/manage/tokens/{token_id}")[1]["status"])


def json_error(result: Result, exit_code: int) -> dict[str, Any]:
    """The one JSON object on stderr; nothing on stdout."""
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    error: dict[str, Any] = json.loads(lines[0])["error"]
    assert error["message"]
    return error


# -- --json errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["group", "leaf"])
def test_an_api_error_under_json_is_one_json_object(server: ServerProcess, where: str) -> None:
    args = ["token", "get", "no-such-token"]
    args = ["--json", *args] if where == "group" else [*args, "--json"]
    error = json_error(manage(server, *args), 1)
    assert (error["code"], error["status"]) == ("token_not_found", 404)
    assert "no-such-token" in error["message"] and "(404" not in error["message"]


def test_a_refused_token_under_json_says_where_it_came_from(server: ServerProcess) -> None:
    result = CliRunner().invoke(
        main,
        ["manage", "project", "list", "--json", "--management-token", "mgmt-wrong"],
        env={"MANAGE_API_BASE_URL": server.base_url},
    )
    error = json_error(result, 1)
    assert (error["code"], error["status"]) == ("unauthorized", 401)
    assert "--management-token" in error["message"] and "mgmt-wrong" not in result.stderr


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("flag on the leaf", "the token came from --management-token"),
        ("flag on the group", "the token came from --management-token"),
        ("environment", "the token came from MANAGEMENT_TOKEN in the environment"),
        ("file", "the token came from the file {data_dir}/management_token"),
    ],
    ids=["leaf-flag", "group-flag", "environment", "file"],
)
@pytest.mark.parametrize("as_json", [False, True], ids=["plain", "json"])
def test_a_refused_token_names_where_it_came_from(
    server: ServerProcess, tmp_path: Path, where: str, said: str, as_json: bool
) -> None:
    env = {"MANAGE_API_BASE_URL": server.base_url}
    args = ["project", "list", *(["--json"] if as_json else [])]
    if where == "flag on the leaf":
        args += ["--management-token", "mgmt-wrong"]
    elif where == "flag on the group":
        args = ["--management-token", "mgmt-wrong", *args]
    elif where == "environment":
        env["MANAGEMENT_TOKEN"] = "mgmt-wrong"
    else:
        (tmp_path / "management_token").write_text("mgmt-wrong\n")
        env["DATA_DIR"] = str(tmp_path)
    result = CliRunner().invoke(main, ["manage", *args], env=env)
    if as_json:
        error = json_error(result, 1)
        assert (error["code"], error["status"]) == ("unauthorized", 401)
        message = error["message"]
    else:
        assert result.exit_code == 1, result.output
        (message,) = result.stderr.strip().splitlines()
        assert message.endswith(" (401 unauthorized)")
    assert said.format(data_dir=tmp_path) in message
    assert "--management-token" not in message or "--management-token" in said
    assert ".;" not in message and "mgmt-wrong" not in result.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("project", "create", "--json"), "missing_option"),
        (
            ("project", "create", "--name", "x", "--api-key", "k", "--bogus", "--json"),
            "usage_error",
        ),
        (("token", "generate", "--project-id", "p", "--rpm", "many", "--json"), "invalid_option"),
        (("token", "generate", "--project-id", "p", "--metadata", "{", "--json"), "invalid_option"),
        (("project", "update", "some-id", "--json"), "usage_error"),
        (("token", "revoke", "--json"), "usage_error"),
        (("--json", "token", "frobnicate"), "usage_error"),
        (("token", "frobnicate", "--json"), "usage_error"),
        (("project", "lsit", "--json"), "usage_error"),
        (("--json", "token", "list", "--manage-api-base-url", "ftp://x"), "invalid_option"),
    ],
)
def test_a_command_line_error_under_json_is_json_with_status_2(
    server: ServerProcess, args: tuple[str, ...], code: str
) -> None:
    error = json_error(manage(server, *args), 2)
    assert error["code"] == code
    assert "status" not in error


def test_an_unreachable_server_under_json_is_json(server: ServerProcess) -> None:
    base_url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(
        main,
        ["manage", "--json", "project", "list"],
        env={"MANAGEMENT_TOKEN": "mgmt-x", "MANAGE_API_BASE_URL": base_url},
    )
    error = json_error(result, 1)
    assert error["code"] == "unreachable"
    assert f"cannot reach {base_url}" in error["message"]


def test_without_json_errors_stay_plain_lines(server: ServerProcess) -> None:
    result = manage(server, "token", "get", "no-such-token")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "{" not in result.stderr
    result = manage(server, "project", "update", "some-id")
    assert result.exit_code == 2
    assert "nothing to update" in result.stderr and '"error"' not in result.stderr


# -- confirmations ---------------------------------------------------------------------------


def on_a_terminal(
    server: ServerProcess, answer: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """``llm-proxy manage ARGS`` with a pseudo-terminal as stdin, answering ``answer``."""
    controller, terminal = pty.openpty()
    try:
        # Typed ahead: the terminal holds the line until the prompt reads it.
        os.write(controller, answer.encode() + b"\n")
        return subprocess.run(
            cli_command("manage", *args),
            env=clean_env(**connection(server)),
            stdin=terminal,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        os.close(controller)
        os.close(terminal)


@pytest.mark.parametrize("answer", ["n", "", "whatever"])
def test_project_delete_asks_on_a_terminal_and_no_keeps_it(
    server: ServerProcess, answer: str
) -> None:
    project_id = new_project(server, "kept")
    result = on_a_terminal(server, answer, "project", "delete", project_id[:8])
    assert result.returncode == 1, result.stderr
    assert f"Delete project 'kept' ({project_id})? Its tokens stop working at once. [y/N]: " in (
        result.stderr
    )
    assert "cancelled; nothing was changed" in result.stderr
    assert result.stdout == ""
    assert api(server, "GET", f"/manage/projects/{project_id}")[0] == 200


@pytest.mark.parametrize("answer", ["y", "yes", "Y"])
def test_project_delete_on_a_terminal_deletes_on_yes(server: ServerProcess, answer: str) -> None:
    project_id = new_project(server, "going")
    result = on_a_terminal(server, answer, "project", "delete", project_id)
    assert result.returncode == 0, result.stderr
    assert "[y/N]" in result.stderr
    assert result.stdout.strip() == f"Deleted project {project_id}."
    assert api(server, "GET", f"/manage/projects/{project_id}")[0] == 404


def test_token_revoke_asks_on_a_terminal(server: ServerProcess) -> None:
    project_id = new_project(server)
    token_id = new_token(server, project_id)
    kept = on_a_terminal(server, "n", "token", "revoke", token_id)
    assert kept.returncode == 1
    assert f"Revoke token {token_id} (active, project {project_id})? [y/N]: " in kept.stderr
    assert token_status(server, token_id) == "active"
    revoked = on_a_terminal(server, "y", "token", "revoke", token_id, "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout) == {"revoked": token_id}  # the question is not on stdout
    assert token_status(server, token_id) == "revoked"


@pytest.mark.parametrize(
    "command",
    [("token", "revoke", "--project-id", "{id}"), ("project", "update", "{id}", "--revoke-tokens")],
)
def test_revoking_all_of_a_projects_tokens_asks_on_a_terminal(
    server: ServerProcess, command: tuple[str, ...]
) -> None:
    project_id = new_project(server, "all of them")
    token_id = new_token(server, project_id)
    args = [part.format(id=project_id) for part in command]
    kept = on_a_terminal(server, "n", *args)
    assert kept.returncode == 1
    assert f"Revoke every token of project 'all of them' ({project_id})? [y/N]: " in kept.stderr
    assert token_status(server, token_id) == "active"
    done = on_a_terminal(server, "y", *args)
    assert done.returncode == 0, done.stderr
    assert token_status(server, token_id) == "revoked"


def test_without_a_terminal_the_commands_run_as_written(server: ServerProcess) -> None:
    """SPEC §9 gives these commands with no confirmation: a script, with nobody to answer, is
    not asked (a terminal is, see above)."""
    project_id = new_project(server, "scripted")
    token_id = new_token(server, project_id)
    token_value_id = new_token(server, project_id)

    assert manage(server, "token", "revoke", token_id).exit_code == 0
    assert token_status(server, token_id) == "revoked"
    assert manage(server, "project", "update", project_id, "--revoke-tokens").exit_code == 0
    assert token_status(server, token_value_id) == "revoked"
    assert manage(server, "project", "delete", project_id, "-y").exit_code == 0  # still accepted
    assert api(server, "GET", f"/manage/projects/{project_id}")[0] == 404


def test_a_script_without_a_terminal_deletes_from_a_real_process(server: ServerProcess) -> None:
    project_id = new_project(server, "from a script")
    result = subprocess.run(
        cli_command("manage", "project", "delete", project_id),
        env=clean_env(**connection(server)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "[y/N]" not in result.stderr
    assert api(server, "GET", f"/manage/projects/{project_id}")[0] == 404
