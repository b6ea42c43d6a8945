"""Control characters in a project's name or description: refused by the API and the admin form
(a line break in a name forged a row of ``manage project list``, an escape sequence repainted the
operator's terminal), and a name stored before that is shown by ``manage`` as its escapes."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from click.testing import CliRunner, Result

from llm_proxy.runtime.cli import main
from tests.conftest import Proxy
from tests.processes import ServerProcess, http

FORGED = "ops\r\nffffffff  payroll  active  sk-ab…wxyz  2026-01-01 00:00Z"
ESCAPES = "ops\x1b]0;pwned\x07\x1b[2J"


@pytest.fixture
def proxy_database_url(database_url: str) -> str:
    return database_url


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": FORGED}, "name"),
        ({"name": ESCAPES}, "name"),
        ({"name": "a\tb"}, "name"),
        ({"name": "a\x85b"}, "name"),
        ({"name": "a\x7fb"}, "name"),
        ({"description": "first\x1b[2Jsecond"}, "description"),
        ({"description": "bell\x07"}, "description"),
        ({"description": "a\x0cb"}, "description"),
    ],
)
async def test_control_characters_in_a_project_are_refused_by_name(
    proxy: Proxy, body: dict[str, Any], field: str
) -> None:
    status, answer = await proxy.manage("POST", "/projects", {"name": "p", "api_key": "k", **body})
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_field"
    assert answer["error"]["message"].startswith(f"{field}: must not contain control characters")
    project_id = await proxy.create_project("kept")
    status, answer = await proxy.manage("PATCH", f"/projects/{project_id}", body)
    assert status == 400 and answer["error"]["message"].startswith(field), answer
    _, project = await proxy.manage("GET", f"/projects/{project_id}")
    assert (project["name"], project["description"]) == ("kept", "")


async def test_what_a_project_may_hold_is_kept(proxy: Proxy) -> None:
    body = {
        "name": "\t Équipe 検索 \u2028\r\n",  # trimmed; other scripts and separators are text
        "api_key": "k",
        "description": "First line.\r\nSecond,\tindented.\n",
    }
    status, project = await proxy.manage("POST", "/projects", body)
    assert status == 201, project
    assert project["name"] == "Équipe 検索"
    assert project["description"] == "First line.\r\nSecond,\tindented."


def _manage(server: ServerProcess, *args: str) -> Result:
    # color=True: what a terminal gets (off one, click strips escape sequences itself).
    return CliRunner().invoke(
        main,
        ["manage", *args],
        env={"MANAGEMENT_TOKEN": server.management_token, "MANAGE_API_BASE_URL": server.base_url},
        color=True,
    )


@pytest.mark.process
def test_manage_shows_control_characters_stored_earlier_as_escapes(server: ServerProcess) -> None:
    token = server.management_token
    _, project = http(
        "POST",
        f"{server.base_url}/manage/projects",
        token=token,
        body={"name": "x", "api_key": "k"},
    )
    # As an earlier version stored them, when the API took any character but NUL.
    with sqlite3.connect(server.data_dir / "llm-proxy.db") as db:
        db.execute(
            "UPDATE projects SET name = ?, description = ? WHERE id = ?",
            (FORGED + ESCAPES, "line\x1b[2J", project["id"]),
        )

    listed = _manage(server, "project", "list")
    assert listed.exit_code == 0, listed.output
    assert "\x1b" not in listed.output and "\r" not in listed.output and "\x07" not in listed.output
    rows = [line for line in listed.output.splitlines() if line.strip()]
    assert [row.split()[0] for row in rows[1:]].count(project["id"][:8]) == 1
    assert not any(row.startswith("ffffffff") for row in rows)  # no forged row
    assert "ops\\r\\nffffffff" in listed.output

    # A right-to-left override is text to the API (right-to-left names need their marks), but
    # on a terminal it reversed the rest of the row: the status and key columns with it.
    _, reversing = http(
        "POST",
        f"{server.base_url}/manage/projects",
        token=token,
        body={"name": "prod\u202e", "api_key": "k"},
    )
    listed = _manage(server, "project", "list")
    assert "\u202e" not in listed.output and "prod\\u202e" in listed.output
    assert reversing["name"] == "prod\u202e"

    shown = _manage(server, "project", "get", project["id"])
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.output and "\r" not in shown.output
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in shown.output and "line\\x1b[2J" in shown.output
