"""A release started on a database a newer release migrated (a rollback, or an instance of the
release before restarted mid-upgrade): it serves when every migration it does not ship declares
that it may, and refuses naming the one that does not. Real server and CLI processes, on SQLite
and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_proxy.store.migrations import migration_scripts
from llm_proxy.store.opening import default_database_url
from tests.newer_release import record_newer_migration
from tests.processes import (
    MockUpstream,
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

LATEST = migration_scripts("sqlite")[-1][0]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path_factory.mktemp("mock"))
    yield mock
    mock.process.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return default_database_url(tmp_path / "data")
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_a_release_serves_on_a_newer_migration_that_allows_it_and_refuses_one_that_does_not(
    tmp_path: Path, upstream: MockUpstream, database_url: str
) -> None:
    data_dir, api_config = tmp_path / "data", tmp_path / "api_providers.yaml"
    write_api_config(api_config, upstream.base_url)
    env = clean_env(
        DATA_DIR=str(data_dir),
        DATABASE_URL=database_url,
        API_CONFIG_PATH=str(api_config),
        LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        LOG_FORMAT="json",
    )
    assert run(cli_command("migrate"), env).returncode == 0
    # A newer release's index, say: it declares that this release may keep serving.
    asyncio.run(record_newer_migration(database_url, LATEST + 1, serves_from=LATEST))

    again = run(cli_command("migrate"), env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith("migrations applied: none (up to date)"), again.stdout
    server = start_server(data_dir, api_config, tmp_path / "logs", DATABASE_URL=database_url)
    try:
        token = server.issue_token()
        status, answer = http(
            "POST", f"{server.base_url}/v1/chat/completions", token=token, body=CHAT
        )
        assert status == 200, answer
    finally:
        server.stop()
    warnings = [
        line
        for line in map(json.loads, _json_lines(server.process.stderr))
        if line.get("event") == "store.schema_newer_than_release"
    ]
    assert [(w["level"], w["versions"]) for w in warnings] == [("warning", f"{LATEST + 1:03d}")]

    # And one that declares nothing: this release may not serve on it.
    asyncio.run(record_newer_migration(database_url, LATEST + 2))
    refused = run(cli_command("migrate"), env)
    started = run_start_that_fails(env, "a migration that does not allow this release")
    reason = (
        f"it records migrations this release does not ship ({LATEST + 1:03d}, {LATEST + 2:03d}):"
        f" a newer release migrated it, and {LATEST + 2:03d} does not declare that this release"
        f" (schema {LATEST:03d}) may serve on it; run that release (or a later one), or restore"
        " a backup taken before it"
    )
    assert refused.returncode == 1
    assert [line.endswith(reason) for line in _plain_lines(refused.stderr)] == [True]
    assert started.returncode == 1
    assert [line.endswith(reason) for line in _plain_lines(started.stderr)] == [True]


def _json_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("{")]


def _plain_lines(text: str) -> list[str]:
    """The lines that are not JSON log lines: the one-line error a start-up stops with."""
    return [line for line in text.splitlines() if not line.startswith("{")]
