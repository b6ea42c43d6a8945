"""``llm-proxy manage`` on the server's machine finds the server (its ``LISTEN_ADDR``) and the
management token (the one generated under its ``DATA_DIR``) with no option; flags and
``MANAGE_API_BASE_URL`` / ``MANAGEMENT_TOKEN`` override both. Real processes throughout."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import (
    MockUpstream,
    Process,
    clean_env,
    cli_command,
    free_port,
    start_mock_upstream,
    write_api_config,
)

pytestmark = pytest.mark.process


@dataclass
class Site:
    """A server started as ``make run`` starts it: in ``root``, with ``./data`` as its DATA_DIR."""

    root: Path
    port: int
    process: Process

    @property
    def listen_addr(self) -> str:
        return f"0.0.0.0:{self.port}"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path_factory.mktemp("mock"))
    yield mock
    mock.process.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, upstream: MockUpstream) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("site")
    api_config = write_api_config(root / "api_providers.yaml", upstream.base_url)
    port = free_port()
    out, err = (root / "server.stdout").open("wb"), (root / "server.stderr").open("wb")
    popen = subprocess.Popen(
        cli_command("server"),
        cwd=root,
        env=clean_env(
            LISTEN_ADDR=f"0.0.0.0:{port}", API_CONFIG_PATH=str(api_config), LOG_FORMAT="json"
        ),
        stdout=out,
        stderr=err,
        stdin=subprocess.DEVNULL,
    )
    process = Process(popen, root / "server.stdout", root / "server.stderr", [out, err])
    try:
        process.wait_for(f"http://127.0.0.1:{port}/health")
    except BaseException:
        process.stop()
        raise
    yield Site(root, port, process)
    process.stop()


def manage(cwd: Path, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """``llm-proxy manage ARGS`` in ``cwd``, with only the product variables given and ``stdin``
    (never a terminal) as its input."""
    return subprocess.run(
        cli_command("manage", *args),
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        input=stdin,
    )


def one_line(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    assert result.returncode == exit_code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_on_the_servers_machine_manage_needs_no_option(site: Site) -> None:
    created = manage(
        site.root,
        "project",
        "create",
        "--name",
        "found by itself",
        "--api-key",
        "sk-real",
        "--json",
        LISTEN_ADDR=site.listen_addr,
    )
    assert created.returncode == 0, created.stderr
    project_id = json.loads(created.stdout)["id"]
    listed = manage(site.root, "project", "list", "--json", LISTEN_ADDR=site.listen_addr)
    assert listed.returncode == 0, listed.stderr
    assert project_id in [p["id"] for p in json.loads(listed.stdout)]


def test_data_dir_points_manage_at_the_generated_token(site: Site, tmp_path: Path) -> None:
    data_dir = str(site.root / "data")
    by_env = manage(tmp_path, "project", "list", LISTEN_ADDR=site.listen_addr, DATA_DIR=data_dir)
    assert by_env.returncode == 0, by_env.stderr
    by_flag = manage(
        tmp_path, "--data-dir", data_dir, "--listen-addr", site.listen_addr, "project", "list"
    )
    assert by_flag.returncode == 0, by_flag.stderr
    on_leaf = manage(
        tmp_path, "project", "list", "--data-dir", data_dir, "--listen-addr", site.listen_addr
    )
    assert on_leaf.returncode == 0, on_leaf.stderr


def test_without_a_token_anywhere_the_error_says_where_it_looked(
    site: Site, tmp_path: Path
) -> None:
    line = one_line(manage(tmp_path, "project", "list", LISTEN_ADDR=site.listen_addr), 1)
    assert "--management-token" in line and "MANAGEMENT_TOKEN" in line
    assert "data/management_token" in line
    assert "DATA_DIR" in line
    # The README's advice: the variable, not the option, which every user of the machine sees.
    assert line.index("set MANAGEMENT_TOKEN") < line.index("--management-token")
    assert "see it in ps" in line


def test_a_base_url_with_credentials_points_at_the_variable_for_the_token(site: Site) -> None:
    line = one_line(
        manage(
            site.root,
            "--manage-api-base-url",
            f"http://admin:secret@127.0.0.1:{site.port}",
            "project",
            "list",
        ),
        2,
    )
    assert "MANAGEMENT_TOKEN" in line and "--management-token" not in line
    assert "secret" not in line


def test_the_base_url_and_token_given_win_over_what_manage_finds(site: Site) -> None:
    dead = f"127.0.0.1:{free_port()}"
    base_url = f"http://127.0.0.1:{site.port}"
    by_env = manage(site.root, "project", "list", LISTEN_ADDR=dead, MANAGE_API_BASE_URL=base_url)
    assert by_env.returncode == 0, by_env.stderr
    by_flag = manage(
        site.root, "project", "list", "--manage-api-base-url", base_url, LISTEN_ADDR=dead
    )
    assert by_flag.returncode == 0, by_flag.stderr

    # ./data/management_token would open the API: a token given instead must be the one used.
    wrong = "mgmt-not-the-generated-one"
    line = one_line(
        manage(site.root, "project", "list", LISTEN_ADDR=site.listen_addr, MANAGEMENT_TOKEN=wrong),
        1,
    )
    assert "401" in line and "MANAGEMENT_TOKEN in the environment" in line and wrong not in line
    line = one_line(
        manage(
            site.root,
            "project",
            "list",
            "--management-token",
            wrong,
            LISTEN_ADDR=site.listen_addr,
        ),
        1,
    )
    assert "401" in line and "the token came from --management-token" in line


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_base_url_without_a_scheme_is_taken_as_http(site: Site, host: str) -> None:
    result = manage(
        site.root, "project", "list", "--json", MANAGE_API_BASE_URL=f"{host}:{site.port}"
    )
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


@pytest.mark.parametrize(
    "base_url", ["ftp://127.0.0.1:8080", "http://127.0.0.1:port", "http://", "http:///manage"]
)
def test_a_base_url_that_is_not_the_servers_is_one_line(site: Site, base_url: str) -> None:
    line = one_line(manage(site.root, "project", "list", MANAGE_API_BASE_URL=base_url), 2)
    assert "--manage-api-base-url" in line and "MANAGE_API_BASE_URL" in line
    assert "http://127.0.0.1:8080" in line  # an example of what is expected
    assert "unknown url type" not in line


def test_cannot_reach_says_what_to_check(site: Site) -> None:
    port = free_port()
    line = one_line(manage(site.root, "project", "list", LISTEN_ADDR=f"127.0.0.1:{port}"), 1)
    assert line.startswith(f"Error: cannot reach http://127.0.0.1:{port} (")
    assert f"LISTEN_ADDR=127.0.0.1:{port}" in line and "--manage-api-base-url" in line

    line = one_line(manage(site.root, "project", "list", LISTEN_ADDR=f"[::]:{port}"), 1)
    assert f"cannot reach http://[::1]:{port}" in line

    given = f"http://127.0.0.1:{port}"
    line = one_line(manage(site.root, "project", "list", MANAGE_API_BASE_URL=given), 1)
    assert f"cannot reach {given}" in line
    assert "check --manage-api-base-url / MANAGE_API_BASE_URL" in line


@pytest.mark.parametrize(
    "listen_addr",
    # (The last three the server refuses too: manage reads LISTEN_ADDR as the server does.)
    ["nonsense", "127.0.0.1", "127.0.0.1:0", "host:99999", "[nothost]:8080", "a b:8080", "h:٨٠٨٠"],
)
def test_a_listen_addr_manage_cannot_use_is_one_line(site: Site, listen_addr: str) -> None:
    line = one_line(manage(site.root, "project", "list", LISTEN_ADDR=listen_addr), 2)
    assert f"LISTEN_ADDR: expected host:port such as 127.0.0.1:8080, got {listen_addr!r}" in line
    assert "--manage-api-base-url" in line


@pytest.mark.parametrize("path", ["/manage", "/manage/", "/manage//"])
def test_a_base_url_naming_the_management_api_itself_reaches_it(site: Site, path: str) -> None:
    # The option is the management API's base URL: its /manage given too must not be doubled.
    base_url = f"http://127.0.0.1:{site.port}{path}"
    for given in (("--manage-api-base-url", base_url), ()):
        result = manage(
            site.root,
            "project",
            "list",
            "--json",
            *given,
            LISTEN_ADDR=site.listen_addr,
            MANAGE_API_BASE_URL=base_url,
        )
        assert result.returncode == 0, result.stderr
        assert isinstance(json.loads(result.stdout), list)


@pytest.mark.parametrize("suffix", ["/?tenant=a", "?", "/#top", "/manage?x=1"])
def test_a_base_url_with_a_query_or_fragment_is_refused_in_one_line(
    site: Site, suffix: str
) -> None:
    # Each call's path would go after the query or fragment, and the server would be asked for
    # something else than what the command names.
    base_url = f"http://127.0.0.1:{site.port}{suffix}"
    line = one_line(manage(site.root, "project", "list", MANAGE_API_BASE_URL=base_url), 2)
    assert "--manage-api-base-url" in line and "MANAGE_API_BASE_URL" in line
    assert "query" in line and "fragment" in line
