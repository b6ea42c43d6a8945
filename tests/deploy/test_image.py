"""The Dockerfile and its .dockerignore, checked without a Docker engine.

The HEALTHCHECK command line is taken from the Dockerfile and run as Docker would run it, against a
real ``llm-proxy server``; the .dockerignore is evaluated with Docker's own matching rules.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.processes import (
    ServerProcess,
    clean_env,
    cli_command,
    free_port,
    run_start_that_fails,
    spawn,
    start_server,
    write_api_config,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def healthcheck_command() -> list[str]:
    (check,) = [rest for keyword, rest in final_stage() if keyword == "HEALTHCHECK"]
    _, _, exec_form = check.partition("CMD ")
    command = json.loads(exec_form)
    assert isinstance(command, list), "the check runs without a shell, in exec form"
    return [str(part) for part in command]


# --- the image ------------------------------------------------------------------------------


def test_image_is_built_in_stages_and_runs_as_a_non_root_user() -> None:
    steps = instructions()
    assert sum(keyword == "FROM" for keyword, _ in steps) >= 2
    final = final_stage()
    # The runtime stage takes the built environment, not the compiler that built it.
    assert any(k == "COPY" and r.startswith("--from=build ") for k, r in final)
    (user,) = [rest for keyword, rest in final if keyword == "USER"]
    uid = user.split(":")[0]
    # Numeric, so Kubernetes can enforce runAsNonRoot.
    assert uid.isdigit() and int(uid) != 0
    # An init as PID 1 reaps orphans (a dead worker's events process) and forwards SIGTERM.
    (entrypoint,) = [json.loads(rest) for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert entrypoint == ["tini", "--", "llm-proxy"]
    installs = [rest for keyword, rest in final if keyword == "RUN" and "apt-get install" in rest]
    assert any(re.search(r"\btini\b", rest) for rest in installs)


def test_the_data_volume_starts_private_to_the_user_the_image_runs_as() -> None:
    final = final_stage()
    (volume,) = [json.loads(rest) for keyword, rest in final if keyword == "VOLUME"]
    (user,) = [rest for keyword, rest in final if keyword == "USER"]
    made = " ".join(rest for keyword, rest in final if keyword == "RUN")
    # A named volume starts as a copy of the image's directory, its mode included, and only the
    # server tightens DATA_DIR at start: a dispatcher's volume (docker-compose.yml) would stay
    # listable by every user unless the image makes the directory private.
    for directory in volume:
        created = re.search(
            rf"install -d -m 0?700 -o (\d+) -g (\d+) {re.escape(directory)}\b", made
        )
        assert created is not None, directory
        assert ":".join(created.groups()) == user


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real server on a free port, never the image's default 8080."""
    base = tmp_path_factory.mktemp("healthcheck")
    api_config = write_api_config(base / "providers.yaml", "http://127.0.0.1:9")
    process = start_server(base / "data", api_config, base / "logs")
    yield process
    process.stop()


def run_healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK's command line, with this interpreter standing in for the image's."""
    command = healthcheck_command()
    assert command[0] == "python", "the image's interpreter, the one llm-proxy is installed in"
    return subprocess.run(
        [sys.executable, *command[1:]],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=15,
        stdin=subprocess.DEVNULL,
    )


def port_of(server: ServerProcess) -> str:
    return server.base_url.rpartition(":")[2]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def server_listening_on(listen_addr: str, reached_at: str, base: Path) -> Iterator[None]:
    """``llm-proxy server`` with LISTEN_ADDR as given, once it answers at ``reached_at``."""
    api_config = write_api_config(base / "providers.yaml", "http://127.0.0.1:9")
    env = clean_env(
        LISTEN_ADDR=listen_addr,
        DATA_DIR=str(base / "data"),
        API_CONFIG_PATH=str(api_config),
        LOG_FORMAT="json",
    )
    process = spawn(cli_command("server"), env, base / "logs", "server")
    try:
        process.wait_for(f"http://{reached_at}/health")
        yield
    finally:
        process.stop()


@pytest.mark.process
@pytest.mark.parametrize(
    ("listen_addr", "reached_at"),
    [
        ("127.0.0.1:{port}", "127.0.0.1:{port}"),
        ("0.0.0.0:{port}", "127.0.0.1:{port}"),  # what the image sets
        (":{port}", "127.0.0.1:{port}"),  # every interface, as 0.0.0.0
        ("localhost:{port}", "127.0.0.1:{port}"),
        ("[::1]:{port}", "[::1]:{port}"),
        ("[::]:{port}", "[::1]:{port}"),
    ],
)
def test_healthcheck_passes_on_every_address_the_server_accepts(
    tmp_path: Path, listen_addr: str, reached_at: str
) -> None:
    port = free_port()
    listen_addr, reached_at = listen_addr.format(port=port), reached_at.format(port=port)
    with server_listening_on(listen_addr, reached_at, tmp_path):
        result = run_healthcheck(LISTEN_ADDR=listen_addr)
    assert result.returncode == 0, result.stderr


@pytest.mark.process
def test_healthcheck_with_an_empty_listen_addr_asks_the_servers_default(tmp_path: Path) -> None:
    # An empty variable is no variable to the server (it listens on its default, 127.0.0.1:8080):
    # the check once made port 80 of it and reported a healthy server unhealthy.
    if not port_is_free(8080):
        pytest.skip("port 8080, the server's default, is in use on this machine")
    with server_listening_on("", "127.0.0.1:8080", tmp_path):
        result = run_healthcheck(LISTEN_ADDR="")
    assert result.returncode == 0, result.stderr


@pytest.mark.process
@pytest.mark.parametrize(
    "listen_addr",
    ["[127.0.0.1]:{port}", "127.0.0.1:{port} ", "127.0.0.1", "127.0.0.1:0{port}0"],
)
def test_healthcheck_fails_on_an_address_the_server_refuses(
    server: ServerProcess, listen_addr: str
) -> None:
    # Each names the port a healthy server listens on, but no server could start with it: the
    # image's check must not call such a container healthy.
    listen_addr = listen_addr.format(port=port_of(server))
    refused = run_start_that_fails(
        clean_env(LISTEN_ADDR=listen_addr, DATA_DIR=str(server.data_dir)),
        f"the server started with LISTEN_ADDR={listen_addr!r}",
    )
    assert refused.returncode != 0
    assert "LISTEN_ADDR" in refused.stderr
    result = run_healthcheck(LISTEN_ADDR=listen_addr)
    assert result.returncode == 1
    assert "LISTEN_ADDR" in result.stderr


@pytest.mark.process
def test_healthcheck_fails_when_nothing_listens_on_listen_addr(server: ServerProcess) -> None:
    result = run_healthcheck(LISTEN_ADDR=f"0.0.0.0:{free_port()}")
    assert result.returncode == 1
    assert "Connection refused" in result.stderr


def test_healthcheck_gives_up_on_a_server_that_drips_its_answer() -> None:
    # Each byte comes well within a socket timeout, the answer never: the check must still end
    # within its own time, saying why, before Docker's 5 s timeout kills it without a word.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        stop = threading.Event()

        def drip() -> None:
            connection, _ = listener.accept()
            with connection:
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 100:
                    if stop.wait(0.2):
                        return
                    connection.sendall(bytes([byte]))

        dripping = threading.Thread(target=drip, daemon=True)
        dripping.start()
        try:
            result = run_healthcheck(LISTEN_ADDR=f"127.0.0.1:{listener.getsockname()[1]}")
        finally:
            stop.set()
            dripping.join(5)
    assert result.returncode == 1
    assert "no answer within 3 s" in result.stderr


@pytest.mark.process
def test_healthcheck_ignores_the_upstream_http_proxy(server: ServerProcess) -> None:
    # HTTP_PROXY is the egress for upstream calls; the check must not be sent through it.
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_healthcheck(
        LISTEN_ADDR=f"0.0.0.0:{port_of(server)}", HTTP_PROXY=dead, http_proxy=dead
    )
    assert result.returncode == 0, result.stderr


# --- the build context ----------------------------------------------------------------------


def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """``(is_exception, regex)`` per line of .dockerignore, compiled as Docker compiles them."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line[1:].strip() if exception else line
        pattern = str(Path(pattern)).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                regex += ".*" if i == len(pattern) else "(.*/)?"
                continue
            char = pattern[i]
            regex += {"*": "[^/]*", "?": "[^/]"}.get(
                char, char if char in "[]-^" else re.escape(char)
            )
            i += 1
        patterns.append((exception, re.compile(regex)))
    return patterns


def excluded(path: str) -> bool:
    """Docker's rule: the last matching line wins, and a line matching a parent matches too."""
    parents = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/"))]
    result = False
    for exception, regex in ignore_patterns():
        if exception != result:
            continue
        if any(regex.fullmatch(candidate) for candidate in [path, *parents]):
            result = not exception
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        "data/llm-proxy.db",
        "data/management_token",
        "data/encryption_key",
        "data/events.jsonl",
        # A DATA_DIR by another name keeps the same files: the generated secrets, the database.
        "state/management_token",
        "state/admin_password",
        "state/encryption_key",
        "state/credentials_unshown",
        "state/llm-proxy.db-shm",
        ".env",
        # direnv's file, where a checkout's OPENAI_API_KEY is often exported.
        ".envrc",
        ".netrc",
        "config/production.env",
        "deploy/compose/.env",
        "certs/server.key",
        "tls/client.pem",
        ".git/HEAD",
        "tests/node/node_modules/openai/package.json",
        "llm_proxy/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/README.md",
        ".mypy_cache/3.11/cache.db",
        "htmlcov/index.html",
        "llm_proxy.egg-info/PKG-INFO",
    ],
)
def test_secrets_state_and_caches_stay_out_of_the_build_context(path: str) -> None:
    assert excluded(path)


def copied_sources() -> list[str]:
    """What the Dockerfile copies from the build context (not from another stage)."""
    sources = []
    for keyword, rest in instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            sources.extend(rest.split()[:-1])
    return sources


@pytest.mark.process  # runs git
def test_everything_the_dockerfile_copies_reaches_the_builder() -> None:
    sources = copied_sources()
    assert {"pyproject.toml", "README.md", "llm_proxy", "config"} <= set(sources)
    tracked = subprocess.run(
        ["git", "ls-files", "--", *sources],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "config/example.env" in tracked
    assert "config/api_providers.yaml" in tracked
    dropped = [path for path in tracked if excluded(path)]
    assert dropped == []


def test_the_matcher_follows_dockers_rules() -> None:
    """The rules excluded() implements, on patterns whose answer Docker documents."""
    assert excluded("data")  # the directory itself
    assert not excluded("database.py")  # "data" is a whole name, not a prefix
    assert not excluded("llm_proxy/store/sqlite.py")
    assert not excluded("config/example.env")  # re-included by "!config/example.env"
