"""The first start of ``llm-proxy server`` on a fresh DATA_DIR: the credentials it generates are
printed once, with the files that keep them, and never again; everything it keeps there is its
owner's only. Real server processes, started and started again."""

from __future__ import annotations

import base64
import json
import os
import socket
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_proxy.store.migrations import migration_scripts
from tests.processes import (
    MockUpstream,
    ServerProcess,
    clean_env,
    cli_command,
    free_port,
    http,
    run,
    run_start_that_fails,
    start_mock_upstream,
    start_server,
    write_api_config,
)

pytestmark = pytest.mark.process

SECRET_FILES = ("management_token", "admin_password", "encryption_key")
LATEST = migration_scripts("sqlite")[-1][0]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path_factory.mktemp("mock"))
    yield mock
    mock.process.stop()


@pytest.fixture
def api_config(tmp_path: Path, upstream: MockUpstream) -> Path:
    return write_api_config(tmp_path / "api_providers.yaml", upstream.base_url)


def logged(server: ServerProcess, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``server`` that are ``event``."""
    lines = [
        json.loads(line) for line in server.process.stderr.splitlines() if line.startswith("{")
    ]
    return [line for line in lines if line.get("event") == event]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_credentials_are_printed_once_with_their_files(
    tmp_path: Path, api_config: Path
) -> None:
    data_dir = tmp_path / "data"
    first = start_server(data_dir, api_config, tmp_path / "logs", name="first")
    try:
        printed = first.process.stdout
        token = first.management_token
    finally:
        assert first.stop() == 0, first.process.stderr
    secrets = {name: (data_dir / name).read_text().strip() for name in SECRET_FILES}
    assert secrets["management_token"] == token
    assert f"MANAGEMENT_TOKEN={token}\n" in printed
    assert f"ADMIN_USER=admin ADMIN_PASSWORD={secrets['admin_password']}\n" in printed
    for name in SECRET_FILES:
        assert str((data_dir / name).absolute()) in printed, name
    assert "shown only" in printed
    # The encryption key is announced by its file, never by its value.
    assert secrets["encryption_key"] not in printed
    assert len(base64.b64decode(secrets["encryption_key"])) == 32

    second = start_server(data_dir, api_config, tmp_path / "logs", name="second")
    try:
        status, _ = http("GET", f"{second.base_url}/manage/projects", token=token)
        assert status == 200  # the same token still opens the API
    finally:
        assert second.stop() == 0, second.process.stderr
    output = second.process.stdout + second.process.stderr
    for name, value in secrets.items():
        assert value not in output, f"the second start showed the {name}"
    assert "MANAGEMENT_TOKEN=" not in output and "ADMIN_PASSWORD=" not in output
    # Where they are is still told, through the log, without the values.
    assert "server.generated_credentials_reused" in second.process.stderr
    assert str((data_dir / "management_token").absolute()) in second.process.stderr


def test_credentials_are_printed_by_the_first_start_that_serves(
    tmp_path: Path, api_config: Path
) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = clean_env(
            DATA_DIR=str(data_dir),
            LISTEN_ADDR=f"127.0.0.1:{taken.getsockname()[1]}",
            API_CONFIG_PATH=str(api_config),
            LOG_FORMAT="json",
        )
        failed = run(cli_command("server"), env)
    assert failed.returncode == 1, failed.stderr
    assert "LISTEN_ADDR" in failed.stderr
    # Generated, but not shown by a start the operator sees fail.
    assert failed.stdout == ""
    secrets = {name: (data_dir / name).read_text().strip() for name in SECRET_FILES}

    served = start_server(data_dir, api_config, tmp_path / "logs", name="served")
    try:
        assert served.management_token == secrets["management_token"]
        assert f"ADMIN_PASSWORD={secrets['admin_password']}\n" in served.process.stdout
        status, _ = http(
            "GET", f"{served.base_url}/manage/projects", token=secrets["management_token"]
        )
        assert status == 200
    finally:
        assert served.stop() == 0, served.process.stderr

    later = start_server(data_dir, api_config, tmp_path / "logs", name="later")
    assert later.stop() == 0, later.process.stderr
    assert later.process.stdout == ""


def test_data_dir_is_0700_and_the_database_and_secrets_0600(
    tmp_path: Path, api_config: Path
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, api_config, tmp_path / "logs")
    try:
        # A write, so the database has its write-ahead log and shared memory files.
        status, body = http(
            "POST",
            f"{server.base_url}/manage/projects",
            token=server.management_token,
            body={"name": "modes", "api_key": "sk-x"},
        )
        assert status == 201, body
        files = ["llm-proxy.db", "llm-proxy.db-wal", "llm-proxy.db-shm", *SECRET_FILES]
        assert {name: mode(data_dir / name) for name in files} == dict.fromkeys(files, 0o600)
        assert mode(data_dir) == 0o700
    finally:
        server.stop()


def test_a_data_dir_and_a_secret_left_open_to_others_are_made_private_at_start(
    tmp_path: Path, api_config: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o755)  # made by hand, before the first start
    password = data_dir / "admin_password"
    password.write_text("written-by-the-operator\n")
    password.chmod(0o644)
    server = start_server(data_dir, api_config, tmp_path / "logs")
    try:
        assert mode(data_dir) == 0o700
        assert mode(password) == 0o600
        assert "ADMIN_PASSWORD=" not in server.process.stdout  # the operator's is kept
        assert password.read_text() == "written-by-the-operator\n"
    finally:
        server.stop()
    made_private = logged(server, "server.made_private")
    assert {(line["path"], line["mode"], line["now"]) for line in made_private} == {
        (str(data_dir), "0755", "0700"),
        (str(password), "0644", "0600"),
    }


def test_a_database_an_earlier_release_left_open_to_others_is_made_private_at_start(
    tmp_path: Path, api_config: Path
) -> None:
    """Releases before 7c1f0b1 created the database with the process umask (0644 under 022), and
    SQLite its -wal and -shm with the database's mode: an upgrade keeps them."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    with sqlite3.connect(data_dir / "llm-proxy.db") as old:
        old.execute("CREATE TABLE written_by_an_earlier_release (x)")
    old.close()
    files = ["llm-proxy.db", "llm-proxy.db-wal", "llm-proxy.db-shm"]
    for name in files:
        (data_dir / name).touch()
        (data_dir / name).chmod(0o644)
    server = start_server(data_dir, api_config, tmp_path / "logs")
    try:  # (a clean stop removes the -wal and -shm)
        assert {name: mode(data_dir / name) for name in files} == dict.fromkeys(files, 0o600)
    finally:
        server.stop()
    made_private = logged(server, "server.made_private")
    assert {(line["path"], line["mode"]) for line in made_private} == {
        (str(data_dir / name), "0644") for name in files
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_secret_file_of_another_user_left_open_to_others_is_a_warning(
    tmp_path: Path, api_config: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    password = data_dir / "admin_password"
    password.write_text("written-by-the-operator\n")
    password.chmod(0o644)
    os.chown(password, 4242, 4242)
    server = start_server(data_dir, api_config, tmp_path / "logs")
    server.stop()
    assert mode(password) == 0o644  # not ours to change
    warnings = logged(server, "server.not_private")
    assert [(w["path"], w["mode"], w["reason"], w["level"]) for w in warnings] == [
        (str(password), "0644", "owned by another user", "warning")
    ]


def test_without_generated_secrets_the_database_is_private_too(
    tmp_path: Path, api_config: Path
) -> None:
    data_dir = tmp_path / "nested" / "data"
    given = {
        "MANAGEMENT_TOKEN": "mgmt-given-by-the-operator-" + "x" * 20,
        "ADMIN_PASSWORD": "given-password",
        "ENCRYPTION_KEY": base64.b64encode(b"k" * 32).decode(),
    }
    server = start_server(data_dir, api_config, tmp_path / "logs", **given)
    try:
        assert server.process.stdout.strip() == ""  # nothing was generated, nothing printed
        assert mode(data_dir) == 0o700
        assert mode(data_dir / "llm-proxy.db") == 0o600
        assert not any((data_dir / name).exists() for name in SECRET_FILES)
    finally:
        server.stop()


def test_migrate_creates_a_private_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = run(cli_command("migrate"), clean_env(DATA_DIR=str(data_dir)))
    assert result.returncode == 0, result.stderr
    assert mode(data_dir) == 0o700
    assert mode(data_dir / "llm-proxy.db") == 0o600


def test_a_database_a_newer_release_migrated_is_refused_by_migrate_and_at_start(
    tmp_path: Path, api_config: Path
) -> None:
    """A rollback, or an old instance restarted during an upgrade: the database records
    migrations this release does not ship. Both `migrate` and the server stop with one line
    naming them and what to do, and leave the database as the newer release left it."""
    data_dir = tmp_path / "data"
    env = clean_env(
        DATA_DIR=str(data_dir),
        API_CONFIG_PATH=str(api_config),
        LISTEN_ADDR=f"127.0.0.1:{free_port()}",
    )
    first = run(cli_command("migrate"), env)
    assert first.returncode == 0, first.stderr
    assert "migrations applied: 001, " in first.stdout
    again = run(cli_command("migrate"), env)
    assert again.stdout.strip().endswith("migrations applied: none (up to date)"), again.stdout
    database = data_dir / "llm-proxy.db"
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO schema_migrations VALUES (998, 'later'), (999, 'later')")
    recorded = _recorded_migrations(database)

    newer = run(cli_command("migrate"), env)
    started = run_start_that_fails(env, "a database a newer release migrated must stop start-up")

    refusal = (
        f"llm-proxy: DATA_DIR: cannot migrate the database {database}: it records migrations"
        " this release does not ship (998, 999): a newer release migrated it, and 998, 999 do"
        f" not declare that this release (schema {LATEST:03d}) may serve on it; run that release"
        " (or a later one), or restore a backup taken before it"
    )
    assert (newer.returncode, newer.stdout, newer.stderr.splitlines()) == (1, "", [refusal])
    assert started.returncode != 0
    assert started.stderr.splitlines() == [refusal.replace("cannot migrate", "cannot open")]
    assert _recorded_migrations(database) == recorded


def _recorded_migrations(database: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(database) as db:
        return sorted(db.execute("SELECT version, applied_at FROM schema_migrations").fetchall())
