"""Secrets configured with whitespace around them (a file mounted from a Kubernetes Secret ends in
a newline) work as the value without it, on the server and in ``llm-proxy manage`` alike; one no
client could send is refused at start, on one line that does not show it. Real processes."""

from __future__ import annotations

import base64
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.control.conftest import MockUpstream
from tests.processes import (
    clean_env,
    cli_command,
    free_port,
    http,
    run_start_that_fails,
    start_server,
    write_api_config,
)

pytestmark = pytest.mark.process

TOKEN = "mgmt-from-a-mounted-secret"
PASSWORD = "admin password from a file"


def start_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """Everything a server needs to start, and ``env``."""
    # Never reached: these servers must stop before serving.
    api_config = write_api_config(tmp_path / "api_providers.yaml", "http://127.0.0.1:9")
    return clean_env(
        DATA_DIR=str(tmp_path / "data"),
        LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        API_CONFIG_PATH=str(api_config),
        **env,
    )


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command("manage", *args),
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_a_token_and_password_ending_in_a_newline_are_taken_without_it(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    api_config = write_api_config(tmp_path / "api_providers.yaml", upstream.base_url)
    server = start_server(
        tmp_path / "data",
        api_config,
        tmp_path / "logs",
        MANAGEMENT_TOKEN=f"{TOKEN}\n",
        ADMIN_PASSWORD=f" {PASSWORD}\r\n",
    )
    try:
        status, _ = http("GET", f"{server.base_url}/manage/projects", token=TOKEN)
        assert status == 200
        listed = manage(
            "project",
            "list",
            "--json",
            MANAGE_API_BASE_URL=server.base_url,
            MANAGEMENT_TOKEN=f"{TOKEN}\n",
        )
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.strip() == "[]"
        basic = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(
            f"{server.base_url}/admin/", headers={"Authorization": f"Basic {basic}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
    finally:
        server.stop()


def test_an_encryption_key_ending_in_a_newline_is_taken_without_it(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    # `openssl rand -base64 32 > key` ends in a newline, and so does the Secret made from it.
    key = base64.b64encode(bytes(range(32))).decode()
    api_config = write_api_config(tmp_path / "api_providers.yaml", upstream.base_url)
    common = {"MANAGEMENT_TOKEN": TOKEN, "LOG_LEVEL": "warning"}
    server = start_server(
        tmp_path / "data", api_config, tmp_path / "logs", ENCRYPTION_KEY=f"{key}\n", **common
    )
    try:
        status, _ = http(
            "POST",
            f"{server.base_url}/manage/projects",
            token=TOKEN,
            body={"name": "p", "api_key": "sk-x"},
        )
        assert status == 201
    finally:
        server.stop()
    # The same key without the newline opens what was stored under it (start-up checks that).
    server = start_server(
        tmp_path / "data", api_config, tmp_path / "logs", ENCRYPTION_KEY=key, **common
    )
    server.stop()


UNSENDABLE = ["mgmt-two words", "mgmt-tab\there", "mgmt-bell\x07", "mgmt-tökén", "mgmt-日本"]


@pytest.mark.parametrize("token", UNSENDABLE)
def test_a_token_no_client_can_send_stops_start_up_without_showing_it(
    tmp_path: Path, token: str
) -> None:
    env = start_env(tmp_path, MANAGEMENT_TOKEN=token)
    result = run_start_that_fails(env, "a token no client can send must stop start-up")
    assert result.returncode == 2
    assert result.stderr.startswith("llm-proxy: MANAGEMENT_TOKEN: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "mgmt-" not in result.stderr


@pytest.mark.parametrize("token", [*UNSENDABLE, "mgmt-nul-less\x1b[31m"])
def test_manage_refuses_such_a_token_on_one_line_without_showing_it(token: str) -> None:
    result = manage(
        "project",
        "list",
        MANAGE_API_BASE_URL=f"http://127.0.0.1:{free_port()}",
        MANAGEMENT_TOKEN=token,
    )
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "MANAGEMENT_TOKEN" in lines[0]
    assert "mgmt-" not in result.stderr


def test_manage_refuses_a_token_file_that_is_not_text_on_one_line(tmp_path: Path) -> None:
    """A management_token file holding bytes that are not UTF-8 (a binary copied over it, a file
    written in another encoding) is refused like any token no header can carry."""
    (tmp_path / "management_token").write_bytes(b"mgmt-\xff\xfe-latin1-\xe9\n")
    result = manage(
        "project",
        "list",
        MANAGE_API_BASE_URL=f"http://127.0.0.1:{free_port()}",
        DATA_DIR=str(tmp_path),
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"the management token in {tmp_path / 'management_token'}" in lines[0]
    assert "visible ASCII" in lines[0] and "mgmt-" not in result.stderr


def test_an_admin_password_holding_a_control_character_stops_start_up(tmp_path: Path) -> None:
    env = start_env(tmp_path, ADMIN_PASSWORD="secret\x07password")
    result = run_start_that_fails(env, "an admin password nobody can type must stop start-up")
    assert result.returncode == 2
    assert result.stderr.startswith("llm-proxy: ADMIN_PASSWORD: ")
    assert "secret" not in result.stderr


def test_an_admin_user_holding_a_colon_stops_start_up(tmp_path: Path) -> None:
    """Basic auth sends ``user:password`` and is split at the first colon: no sign-in could
    name such a user."""
    env = start_env(tmp_path, ADMIN_USER="ops:team")
    result = run_start_that_fails(env, "an ADMIN_USER no sign-in can give must stop start-up")
    assert result.returncode == 2
    assert result.stderr.startswith("llm-proxy: ADMIN_USER: ")
    assert len(result.stderr.strip().splitlines()) == 1
