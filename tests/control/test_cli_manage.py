"""``llm-proxy manage …`` against a real server process, as an operator's terminal or script uses it."""

from __future__ import annotations

import json
import os
import secrets
import select
import subprocess
import termios
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import openai
import pytest
from click.testing import CliRunner, Result

from llm_proxy.control.manage_cli import token_generate, token_update
from llm_proxy.runtime.cli import main
from tests.conftest import TOKEN_FIELDS
from tests.processes import (
    MockUpstream,
    ServerProcess,
    clean_env,
    cli_command,
    free_port,
    http,
    run,
    start_mock_upstream,
)

# Every test but one talks to the module's server process.
pytestmark = pytest.mark.process

UPSTREAM_KEY = "sk-upstream-" + secrets.token_urlsafe(24)
MASKED_KEY = f"{UPSTREAM_KEY[:5]}…{UPSTREAM_KEY[-4:]}"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path_factory.mktemp("mock"), api_key=UPSTREAM_KEY)
    yield mock
    mock.process.stop()


def manage(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["manage", *args], env=env or {}, input=stdin)


def connection(server: ServerProcess) -> dict[str, str]:
    return {"MANAGEMENT_TOKEN": server.management_token, "MANAGE_API_BASE_URL": server.base_url}


def manage_as(server: ServerProcess, *args: str, stdin: str | None = None) -> Result:
    """``manage`` with the connection given the usual way: environment variables."""
    return manage(*args, env=connection(server), stdin=stdin)


def manage_json(server: ServerProcess, *args: str) -> Any:
    result = manage_as(server, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def create_project(server: ServerProcess, name: str = "demo") -> str:
    project = manage_json(server, "project", "create", "--name", name, "--api-key", UPSTREAM_KEY)
    return str(project["id"])


# -- projects --------------------------------------------------------------------------------


def test_project_create_prints_the_project_with_a_masked_key(server: ServerProcess) -> None:
    result = manage_as(
        server,
        "project",
        "create",
        "--name",
        "billing",
        "--api-key",
        UPSTREAM_KEY,
        "--description",
        "the billing team",
        "--metadata",
        '{"team": "billing"}',
        "--json",
    )
    assert result.exit_code == 0, result.output
    project = json.loads(result.stdout)
    assert project["name"] == "billing"
    assert project["description"] == "the billing team"
    assert project["metadata"] == {"team": "billing"}
    assert project["is_active"] is True
    assert project["api_key"] == MASKED_KEY
    assert UPSTREAM_KEY not in result.output
    fetched = manage_json(server, "project", "get", project["id"])
    assert fetched == {**project, "usage": fetched["usage"]}


def test_project_create_as_a_record_shows_fields_and_values(server: ServerProcess) -> None:
    result = manage_as(server, "project", "create", "--name", "records", "--api-key", UPSTREAM_KEY)
    assert result.exit_code == 0, result.output
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines() if " " in line.strip())
    assert fields["name"] == "records"
    assert fields["api_key"] == MASKED_KEY
    assert fields["is_active"] == "True"
    assert UPSTREAM_KEY not in result.output


def test_project_create_refuses_metadata_that_is_not_json(server: ServerProcess) -> None:
    result = manage_as(
        server, "project", "create", "--name", "x", "--api-key", "k", "--metadata", "{nope"
    )
    assert result.exit_code == 2
    assert "--metadata" in result.stderr


@pytest.mark.parametrize(
    ("metadata", "why"),
    [
        ('{"cost": NaN}', "NaN is not a JSON value"),
        ('{"limit": Infinity}', "Infinity is not a JSON value"),
        ('{"n": [-Infinity]}', "-Infinity is not a JSON value"),
        ('{"limit": 1e400}', "1e400 is too large for a number"),
        ('{"n": [-2.5E+999]}', "-2.5E+999 is too large for a number"),
        ('{"team": "a", "team": "b"}', "the key 'team' is given twice"),
        ('{"x": {"k": 1, "k": 2}}', "the key 'k' is given twice"),
    ],
)
def test_metadata_that_python_reads_and_json_does_not_is_a_command_line_error(
    server: ServerProcess, metadata: str, why: str
) -> None:
    """Refused as the command line's mistake (exit 2, nothing sent), not sent on to come back as
    the server's 'Request body is not valid JSON' (exit 1), or kept with one value dropped."""
    project_id = create_project(server, "metadata checks")
    for command in (
        ("project", "create", "--name", "x", "--api-key", "k"),
        ("token", "generate", "--project-id", project_id),
    ):
        result = manage_as(server, *command, "--metadata", metadata)
        assert result.exit_code == 2, result.output
        assert "--metadata: not valid JSON" in result.stderr and why in result.stderr
    status, tokens = http(
        "GET",
        f"{server.base_url}/manage/tokens?project_id={project_id}",
        token=server.management_token,
    )
    assert (status, tokens) == (200, [])


def test_project_list_table_has_headers_and_short_ids(server: ServerProcess) -> None:
    project_id = create_project(server, "table project")
    result = manage_as(server, "project", "list")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split() == ["id", "name", "status", "api_key", "created"]
    row = next(line for line in result.stdout.splitlines() if "table project" in line)
    assert row.startswith(project_id[:8] + "  ")
    assert project_id not in result.stdout
    assert " active " in row
    assert MASKED_KEY in row
    assert UPSTREAM_KEY not in result.stdout
    wide = manage_as(server, "project", "list", "--wide")
    assert wide.exit_code == 0, wide.output
    for header in ("id", "name", "is_active", "api_key", "created_at"):
        assert header in wide.stdout.splitlines()[0]
    row = next(line for line in wide.stdout.splitlines() if project_id in line)
    assert "table project" in row


def test_json_works_on_the_group_and_on_the_leaf(server: ServerProcess) -> None:
    create_project(server, "json both ways")
    env = {"MANAGEMENT_TOKEN": server.management_token, "MANAGE_API_BASE_URL": server.base_url}
    on_group = manage("--json", "project", "list", env=env)
    on_leaf = manage("project", "list", "--json", env=env)
    assert on_group.exit_code == on_leaf.exit_code == 0
    assert json.loads(on_group.stdout) == json.loads(on_leaf.stdout)
    assert "json both ways" in [p["name"] for p in json.loads(on_leaf.stdout)]


def test_connection_flags_work_on_the_group_and_on_the_leaf(server: ServerProcess) -> None:
    flags = [
        "--manage-api-base-url",
        server.base_url,
        "--management-token",
        server.management_token,
    ]
    on_group = manage(*flags, "--json", "project", "list")
    on_leaf = manage("project", "list", "--json", *flags)
    assert on_group.exit_code == 0, on_group.output
    assert on_leaf.exit_code == 0, on_leaf.output
    assert json.loads(on_group.stdout) == json.loads(on_leaf.stdout)


def test_a_flag_on_the_group_wins_over_the_environment(server: ServerProcess) -> None:
    env = {"MANAGEMENT_TOKEN": "mgmt-stale-from-the-shell", "MANAGE_API_BASE_URL": server.base_url}
    result = manage("--management-token", server.management_token, "project", "list", env=env)
    assert result.exit_code == 0, result.output
    env = {"MANAGEMENT_TOKEN": server.management_token, "MANAGE_API_BASE_URL": "http://127.0.0.1:1"}
    result = manage("--manage-api-base-url", server.base_url, "project", "list", env=env)
    assert result.exit_code == 0, result.output


def test_a_flag_on_the_leaf_wins_over_the_group(server: ServerProcess) -> None:
    result = manage(
        "--manage-api-base-url",
        server.base_url,
        "--management-token",
        "mgmt-wrong",
        "project",
        "list",
        "--management-token",
        server.management_token,
    )
    assert result.exit_code == 0, result.output


def test_management_token_from_the_environment_in_a_real_process(server: ServerProcess) -> None:
    project_id = create_project(server, "from a subprocess")
    env = clean_env(MANAGEMENT_TOKEN=server.management_token, MANAGE_API_BASE_URL=server.base_url)
    result = run(cli_command("manage", "project", "get", project_id, "--json"), env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "from a subprocess"


def test_project_update_renames_and_deactivates(server: ServerProcess) -> None:
    project_id = create_project(server, "before")
    updated = manage_json(server, "project", "update", project_id, "--name", "after", "--inactive")
    assert (updated["name"], updated["is_active"]) == ("after", False)
    refused = manage_as(server, "token", "generate", "--project-id", project_id)
    assert "403 project_inactive" in one_line_error(refused)
    updated = manage_json(server, "project", "update", project_id, "--active")
    assert updated["is_active"] is True


def test_project_update_needs_something_to_change(server: ServerProcess) -> None:
    result = manage_as(server, "project", "update", "any-id")
    assert result.exit_code == 2
    assert "nothing to update" in result.stderr


def test_project_delete_removes_it(server: ServerProcess) -> None:
    project_id = create_project(server, "doomed")
    result = manage_as(server, "project", "delete", project_id, "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Deleted project {project_id}."
    assert "404 project_not_found" in one_line_error(
        manage_as(server, "project", "get", project_id)
    )
    again = create_project(server, "doomed too")
    assert manage_json(server, "project", "delete", again, "--yes") == {"deleted": again}


# -- errors ----------------------------------------------------------------------------------


def test_a_wrong_management_token_is_one_line_with_the_code(server: ServerProcess) -> None:
    result = manage(
        "--manage-api-base-url",
        server.base_url,
        "--management-token",
        "mgmt-wrong",
        "project",
        "list",
    )
    line = one_line_error(result)
    assert "401 unauthorized" in line
    assert "mgmt-wrong" not in line


def test_a_missing_management_token_is_explained(server: ServerProcess) -> None:
    result = manage(
        "--manage-api-base-url", server.base_url, "project", "list", env={"DATA_DIR": "elsewhere"}
    )
    line = one_line_error(result)
    assert "MANAGEMENT_TOKEN" in line
    assert "elsewhere/management_token" in line
    assert "DATA_DIR" in line


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("project", "get", "no-such-project"), "project_not_found"),
        (("project", "update", "no-such-project", "--name", "x"), "project_not_found"),
        (("project", "delete", "no-such-project", "--yes"), "project_not_found"),
        (("token", "list", "--project-id", "no-such-project"), "project_not_found"),
        (("token", "generate", "--project-id", "no-such-project"), "project_not_found"),
        (("token", "get", "no-such-token"), "token_not_found"),
        (("token", "revoke", "no-such-token", "--yes"), "token_not_found"),
        (("token", "revoke", "--project-id", "no-such-project", "--yes"), "project_not_found"),
    ],
)
def test_an_unknown_id_fails_with_its_code(
    server: ServerProcess, args: tuple[str, ...], code: str
) -> None:
    assert f"404 {code}" in one_line_error(manage_as(server, *args))


def test_an_id_cannot_address_another_route(server: ServerProcess) -> None:
    create_project(server, "not a token list")
    for args in (("project", "get", "../tokens"), ("project", "get", "x/../../tokens")):
        assert "project_not_found" in one_line_error(manage_as(server, *args))


def test_a_bad_duration_names_the_field(server: ServerProcess) -> None:
    project_id = create_project(server)
    result = manage_as(server, "token", "generate", "--project-id", project_id, "--duration", "0")
    line = one_line_error(result)
    assert "400" in line
    assert "duration_minutes" in line


def test_the_lifetime_is_also_taken_under_the_apis_name_duration_minutes(
    server: ServerProcess,
) -> None:
    """An operator who knows the API's `duration_minutes` types `--duration-minutes`: the same
    option as `--duration`, not a usage error."""
    project_id = create_project(server)
    issued = manage_json(
        server, "token", "generate", "--project-id", project_id, "--duration-minutes", "7"
    )
    lifetime = datetime.fromisoformat(issued["expires_at"]) - datetime.now(UTC)
    assert timedelta(minutes=6) < lifetime <= timedelta(minutes=7)


def test_a_server_that_is_down_cannot_be_reached() -> None:
    base_url = f"http://127.0.0.1:{free_port()}"
    result = manage(
        "--manage-api-base-url", base_url, "--management-token", "mgmt-x", "project", "list"
    )
    assert f"cannot reach {base_url}" in one_line_error(result)


# -- tokens ----------------------------------------------------------------------------------


def test_token_generate_shows_the_value_once(server: ServerProcess) -> None:
    project_id = create_project(server)
    result = manage_as(
        server,
        "token",
        "generate",
        "--project-id",
        project_id,
        "--duration",
        "5",
        "--max-requests",
        "3",
    )
    assert result.exit_code == 0, result.output
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines() if " " in line.strip())
    value, token_id = fields["token"], fields["id"]
    assert value.startswith("sk-")
    assert fields["project_id"] == project_id
    assert fields["max_requests"] == "3"

    shown = manage_json(server, "token", "get", token_id)
    assert set(shown) >= TOKEN_FIELDS
    assert (shown["is_active"], shown["request_count"], shown["max_requests"]) == (True, 0, 3)
    for args in (("token", "get", token_id), ("token", "list"), ("--json", "token", "list")):
        result = manage_as(server, *args)
        assert result.exit_code == 0, result.output
        assert value not in result.output


def test_token_list_table_and_project_filter(server: ServerProcess) -> None:
    mine, other = create_project(server, "mine"), create_project(server, "other")
    token_id = manage_json(server, "token", "generate", "--project-id", mine)["id"]
    revoked_id = manage_json(server, "token", "generate", "--project-id", mine)["id"]
    other_id = manage_json(server, "token", "generate", "--project-id", other)["id"]
    assert manage_as(server, "token", "revoke", revoked_id, "--yes").exit_code == 0

    table = manage_as(server, "token", "list", "--project-id", mine)
    assert table.exit_code == 0, table.output
    header = table.stdout.splitlines()[0].split()
    assert header == ["id", "project", "status", "expires", "requests", "spent_usd"]
    row = next(line for line in table.stdout.splitlines() if line.startswith(token_id[:8]))
    assert mine[:8] in row and " active " in row
    revoked_row = next(line for line in table.stdout.splitlines() if revoked_id[:8] in line)
    assert " revoked " in revoked_row
    assert other_id[:8] not in table.stdout

    wide = manage_as(server, "token", "list", "--project-id", mine, "--wide")
    assert wide.exit_code == 0, wide.output
    header = wide.stdout.splitlines()[0]
    for column in (
        "id",
        "project_id",
        "status",
        "is_active",
        "expires_at",
        "request_count",
        "max_requests",
        "spent_usd",
        "budget_usd",
    ):
        assert column in header
    row = next(line for line in wide.stdout.splitlines() if token_id in line)
    assert mine in row and " active " in row

    listed = manage_json(server, "token", "list", "--project-id", mine)
    assert {t["id"]: t["status"] for t in listed} == {token_id: "active", revoked_id: "revoked"}
    assert all("token" not in t for t in listed)
    everything = {t["id"] for t in manage_json(server, "token", "list")}
    assert {token_id, other_id} <= everything


LIMIT_OPTIONS = (
    "--max-requests",
    "50",
    "--rpm",
    "60",
    "--tpm",
    "10000",
    "--budget-usd",
    "12.5",
    "--allowed-model",
    "gpt-4o-mini",
    "--allowed-model",
    "gpt-4.1*",
)
LIMITS_SHOWN = {
    "max_requests": 50,
    "rpm": 60,
    "tpm": 10000,
    "budget_usd": 12.5,
    "allowed_models": ["gpt-4o-mini", "gpt-4.1*"],
}
NO_LIMITS = dict.fromkeys(LIMITS_SHOWN)


def test_token_generate_with_every_limit_reads_back_the_same(server: ServerProcess) -> None:
    project_id = create_project(server, "limited")
    metadata = {"user": "ada", "tags": ["a"]}
    issued = manage_json(
        server,
        "token",
        "generate",
        "--project-id",
        project_id,
        *LIMIT_OPTIONS,
        "--metadata",
        json.dumps(metadata),
    )
    assert {key: issued[key] for key in LIMITS_SHOWN} == LIMITS_SHOWN
    assert issued["metadata"] == metadata
    shown = manage_json(server, "token", "get", issued["id"])
    assert {key: shown[key] for key in LIMITS_SHOWN} == LIMITS_SHOWN
    assert (shown["metadata"], shown["status"], shown["spent_usd"]) == (metadata, "active", 0)

    record = manage_as(server, "token", "get", issued["id"])
    assert record.exit_code == 0, record.output
    fields = dict(line.split(None, 1) for line in record.stdout.splitlines() if " " in line.strip())
    assert (fields["rpm"], fields["budget_usd"], fields["status"]) == ("60", "12.5", "active")
    assert json.loads(fields["allowed_models"]) == ["gpt-4o-mini", "gpt-4.1*"]
    assert json.loads(fields["metadata"]) == metadata


def test_token_list_shows_a_budget_to_the_nano_dollar_it_is_kept_to(server: ServerProcess) -> None:
    """A budget under half a micro-dollar (the API keeps nano-dollars) read 0 in the table, and
    "0/0" reads as a budget spent."""
    project_id = create_project(server, "tiny budget")
    token_id = manage_json(
        server, "token", "generate", "--project-id", project_id, "--budget-usd", "0.000000402"
    )["id"]
    table = manage_as(server, "token", "list", "--project-id", project_id)
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if line.startswith(token_id[:8]))
    assert row.split()[-1] == "0/0.000000402", row


def test_token_update_sets_and_clears_limits(server: ServerProcess) -> None:
    project_id = create_project(server, "updated")
    token_id = manage_json(server, "token", "generate", "--project-id", project_id)["id"]
    updated = manage_json(server, "token", "update", token_id, *LIMIT_OPTIONS)
    assert {key: updated[key] for key in LIMITS_SHOWN} == LIMITS_SHOWN

    updated = manage_json(server, "token", "update", token_id, "--no-rpm", "--any-model")
    assert {key: updated[key] for key in LIMITS_SHOWN} == {
        **LIMITS_SHOWN,
        "rpm": None,
        "allowed_models": None,
    }
    updated = manage_json(
        server,
        "token",
        "update",
        token_id,
        "--no-max-requests",
        "--no-tpm",
        "--no-budget",
        "--inactive",
    )
    assert {key: updated[key] for key in LIMITS_SHOWN} == NO_LIMITS
    assert (updated["is_active"], updated["status"]) == (False, "revoked")
    updated = manage_json(server, "token", "update", token_id, "--active", "--rpm", "5")
    assert (updated["is_active"], updated["status"], updated["rpm"]) == (True, "active", 5)
    assert manage_json(server, "token", "get", token_id)["rpm"] == 5


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("--rpm", "5", "--no-rpm"),
        ("--budget-usd", "1", "--no-budget"),
        ("--allowed-model", "gpt-4o", "--any-model"),
    ],
)
def test_token_update_needs_one_clear_change_per_limit(
    server: ServerProcess, args: tuple[str, ...]
) -> None:
    result = manage_as(server, "token", "update", "any-id", *args)
    assert result.exit_code == 2, result.output
    assert "nothing to update" in result.stderr or "give one or the other" in result.stderr


def test_token_update_of_an_unknown_token_is_404(server: ServerProcess) -> None:
    result = manage_as(server, "token", "update", "no-such-token", "--rpm", "5")
    assert "404 token_not_found" in one_line_error(result)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("--rpm", "0"), "rpm"),
        (("--tpm", "-5"), "tpm"),
        (("--budget-usd", "0"), "budget_usd"),
        (("--budget-usd", "2000000"), "budget_usd"),
        (("--allowed-model", " "), "allowed_models"),
        (("--allowed-model", "x" * 201), "allowed_models"),
        (("--max-requests", "0"), "max_requests"),
    ],
)
def test_a_bad_limit_names_the_field(
    server: ServerProcess, args: tuple[str, ...], field: str
) -> None:
    project_id = create_project(server, "bad limits")
    generated = one_line_error(
        manage_as(server, "token", "generate", "--project-id", project_id, *args)
    )
    assert "400 invalid_field" in generated and generated.startswith(f"Error: {field}:")
    token_id = manage_json(server, "token", "generate", "--project-id", project_id)["id"]
    updated = one_line_error(manage_as(server, "token", "update", token_id, *args))
    assert "400 invalid_field" in updated and updated.startswith(f"Error: {field}:")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--metadata", "{nope"), "--metadata: not valid JSON"),
        (("--metadata", "[1, 2]"), "--metadata: must be a JSON object"),
        (("--budget-usd", "nan"), "--budget-usd: must be a number"),
        (("--budget-usd", "inf"), "--budget-usd: must be a number"),
    ],
)
def test_a_bad_option_value_is_one_line_before_anything_is_sent(
    server: ServerProcess, args: tuple[str, ...], problem: str
) -> None:
    project_id = create_project(server, "bad options")
    result = manage_as(server, "token", "generate", "--project-id", project_id, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert problem in result.stderr
    assert manage_json(server, "token", "list", "--project-id", project_id) == []


@pytest.mark.parametrize("command", [token_generate, token_update])
def test_every_limit_option_says_what_it_does(command: click.Command) -> None:
    options = {
        name: param
        for param in command.params
        if isinstance(param, click.Option)
        for name in param.opts
    }
    new = ["--rpm", "--tpm", "--budget-usd", "--allowed-model", "--max-requests"]
    if command is token_generate:
        new.append("--metadata")
    else:
        new += ["--no-rpm", "--no-tpm", "--no-budget", "--any-model", "--no-max-requests"]
    for name in new:
        assert options[name].help, name
    shown = CliRunner().invoke(main, ["manage", "token", command.name or "", "--help"])
    assert shown.exit_code == 0
    for name in new:
        assert name in shown.stdout


def test_token_list_of_a_project_without_tokens_says_so(server: ServerProcess) -> None:
    project_id = create_project(server, "empty")
    result = manage_as(server, "token", "list", "--project-id", project_id)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "No tokens."
    assert manage_json(server, "token", "list", "--project-id", project_id) == []


def test_token_revoke_by_id_value_and_project(server: ServerProcess) -> None:
    project_id = create_project(server)
    by_id, by_value, rest = (
        manage_json(server, "token", "generate", "--project-id", project_id) for _ in range(3)
    )
    result = manage_as(server, "token", "revoke", by_id["id"], "--yes")
    assert (result.exit_code, result.stdout.strip()) == (0, f"Revoked token {by_id['id']}.")
    result = manage_as(server, "token", "revoke", "--value", by_value["token"], "-y")
    assert (result.exit_code, result.stdout.strip()) == (0, "Revoked the token.")
    assert by_value["token"] not in result.output
    counts = manage_json(server, "token", "revoke", "--project-id", project_id, "--yes")
    assert counts == {"revoked_count": 1, "already_revoked_count": 2, "total_tokens": 3}
    states = {
        t["id"]: t["is_active"]
        for t in manage_json(server, "token", "list", "--project-id", project_id)
    }
    assert states == {by_id["id"]: False, by_value["id"]: False, rest["id"]: False}
    # Revoking again is not an error (DELETE is 204 also when already revoked).
    assert manage_json(server, "token", "revoke", by_id["id"], "--yes") == {"revoked": by_id["id"]}


@pytest.mark.parametrize(
    "args", [(), ("tok-1", "--value", "sk-x"), ("--value", "v", "--project-id", "p")]
)
def test_token_revoke_needs_exactly_one_target(
    server: ServerProcess, args: tuple[str, ...]
) -> None:
    result = manage_as(server, "token", "revoke", *args)
    assert result.exit_code == 2
    assert "exactly one" in result.stderr


# -- the whole flow, with the application's own SDK ------------------------------------------


def test_issued_token_works_with_the_openai_sdk_until_revoked(server: ServerProcess) -> None:
    project_id = create_project(server, "sdk flow")
    issued = manage_json(
        server, "token", "generate", "--project-id", project_id, "--duration", "10"
    )
    with openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=issued["token"], max_retries=0
    ) as client:
        completion = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
        )
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.content

        result = manage_as(server, "token", "revoke", issued["id"], "--yes")
        assert result.exit_code == 0, result.output
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "again"}]
            )
    assert caught.value.code == "token_inactive"
    assert manage_json(server, "token", "get", issued["id"])["is_active"] is False


def test_a_request_quota_set_from_the_cli_is_enforced(server: ServerProcess) -> None:
    project_id = create_project(server, "quota")
    issued = manage_json(
        server, "token", "generate", "--project-id", project_id, "--max-requests", "1"
    )
    with openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=issued["token"], max_retries=0
    ) as client:
        assert client.models.list().data
        with pytest.raises(openai.RateLimitError) as caught:
            client.models.list()
    assert caught.value.code == "quota_exceeded"


def test_deleting_the_project_stops_its_tokens(server: ServerProcess) -> None:
    project_id = create_project(server, "deleted with tokens")
    issued = manage_json(server, "token", "generate", "--project-id", project_id)
    assert manage_as(server, "project", "delete", project_id, "--yes").exit_code == 0
    with (
        openai.OpenAI(
            base_url=f"{server.base_url}/v1", api_key=issued["token"], max_retries=0
        ) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.models.list()


# -- secrets kept off the command line (where `ps` shows them to every user) ------------------


def sdk_answers(server: ServerProcess, project_id: str) -> bool:
    """Whether a token of the project is served: the mock upstream takes UPSTREAM_KEY only."""
    issued = manage_json(server, "token", "generate", "--project-id", project_id)
    with openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=issued["token"], max_retries=0
    ) as client:
        try:
            client.models.list()
        except openai.AuthenticationError:
            return False
    return True


def test_an_upstream_key_given_as_dash_is_read_from_stdin(server: ServerProcess) -> None:
    result = manage_as(
        server, "project", "create", "--name", "stdin", "--api-key", "-", "--json",
        stdin=f"  {UPSTREAM_KEY}  \nnext line\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    project = json.loads(result.stdout)
    assert project["api_key"] == MASKED_KEY
    assert sdk_answers(server, project["id"])

    other = "sk-other-" + secrets.token_urlsafe(24)
    result = manage_as(
        server, "project", "update", project["id"], "--api-key", "-", "--json", stdin=other + "\n"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["api_key"] == f"{other[:5]}…{other[-4:]}"
    assert not sdk_answers(server, project["id"])  # the upstream refuses that one


def test_a_dash_with_nothing_on_stdin_is_a_usage_error(server: ServerProcess) -> None:
    result = manage_as(server, "project", "create", "--name", "empty", "--api-key", "-", stdin="")
    assert result.exit_code == 2
    assert "--api-key" in result.stderr and "stdin" in result.stderr


def test_a_missing_key_off_a_terminal_is_a_usage_error_that_says_how(
    server: ServerProcess,
) -> None:
    result = manage_as(server, "project", "create", "--name", "no key", stdin="")
    assert result.exit_code == 2
    assert "Missing option '--api-key'" in result.stderr and "stdin" in result.stderr
    assert [p["name"] for p in manage_json(server, "project", "list")].count("no key") == 0


def test_a_token_value_given_as_dash_is_read_from_stdin(server: ServerProcess) -> None:
    project_id = create_project(server)
    issued = manage_json(server, "token", "generate", "--project-id", project_id)
    result = manage_as(server, "token", "revoke", "--value", "-", "--yes", stdin=issued["token"])
    assert (result.exit_code, result.stdout.strip()) == (0, "Revoked the token.")
    assert manage_json(server, "token", "get", issued["id"])["status"] == "revoked"


def test_on_a_terminal_a_missing_key_is_asked_for_and_not_echoed(server: ServerProcess) -> None:
    """A real process whose stdin is a terminal (a pty, with no other controlling terminal)."""
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        cli_command("manage", "project", "create", "--name", "asked", "--json"),
        env=clean_env(**connection(server)),
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    os.close(terminal)
    try:
        echoed = b""
        # Type once the terminal's echo is off: the prompt is being read.
        deadline = time.monotonic() + 20
        while termios.tcgetattr(controller)[3] & termios.ECHO:
            assert process.poll() is None and time.monotonic() < deadline, "never asked"
            time.sleep(0.05)
        os.write(controller, UPSTREAM_KEY.encode() + b"\n")
        stdout, stderr = process.communicate(timeout=30)
        while select.select([controller], [], [], 0.2)[0]:
            try:
                echoed += os.read(controller, 4096)
            except OSError:  # the process closed its end
                break
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    assert process.returncode == 0, stderr
    assert b"Upstream API key" in stderr
    assert UPSTREAM_KEY.encode() not in echoed + stdout + stderr
    project = json.loads(stdout)
    assert project["api_key"] == MASKED_KEY
    assert sdk_answers(server, project["id"])
