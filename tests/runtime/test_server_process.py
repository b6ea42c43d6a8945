"""``llm-proxy server`` as an operator runs it: a real process, real secrets files, real signals."""

from __future__ import annotations

import base64
import json
import resource
import secrets
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from llm_proxy.store.opening import open_store
from tests.events.events_support import RedisServer
from tests.processes import (
    START_TIMEOUT,
    MockUpstream,
    ServerProcess,
    clean_env,
    cli_command,
    free_port,
    http,
    run,
    run_start_that_fails,
    spawn,
    start_mock_upstream,
    start_server,
    write_api_config,
)
from tests.raw_servers import silent_server

pytestmark = pytest.mark.process

# Not shaped like an OpenAI key on purpose: log redaction masks ``sk-…``, so a leak of this one
# would show verbatim instead of being hidden by the safety net.
UPSTREAM_KEY = "upstream-" + secrets.token_hex(20)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    # The mock accepts only the project's real key, so a 200 proves the proxy swapped it in.
    mock = start_mock_upstream(tmp_path_factory.mktemp("mock"), api_key=UPSTREAM_KEY)
    yield mock
    mock.process.stop()


@pytest.fixture
def api_config(tmp_path: Path, upstream: MockUpstream) -> Path:
    return write_api_config(tmp_path / "api_providers.yaml", upstream.base_url)


@pytest.fixture
def server(tmp_path: Path, api_config: Path) -> Iterator[ServerProcess]:
    started = start_server(tmp_path / "data", api_config, tmp_path / "logs")
    yield started
    started.stop()


def _start_env(data_dir: Path, api_config: Path, *, listen: str, **extra: str) -> dict[str, str]:
    """The environment of a server started by hand: its data, its upstream, JSON logs."""
    return clean_env(
        DATA_DIR=str(data_dir),
        LISTEN_ADDR=listen,
        API_CONFIG_PATH=str(api_config),
        LOG_FORMAT="json",
        **extra,
    )


def _create_project(server: ServerProcess, name: str = "demo") -> str:
    status, body = http(
        "POST",
        f"{server.base_url}/manage/projects",
        token=server.management_token,
        body={"name": name, "api_key": UPSTREAM_KEY},
    )
    assert status == 201, body
    return str(body["id"])


def test_python_dash_m_llm_proxy_runs_the_cli() -> None:
    result = run(cli_command("--version"), clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("llm-proxy, version ")


def test_printed_management_token_opens_the_management_api(server: ServerProcess) -> None:
    token = server.management_token
    assert token.startswith("mgmt-")
    assert "ADMIN_USER=admin ADMIN_PASSWORD=" in server.process.stdout
    status, body = http("GET", f"{server.base_url}/manage/projects", token=token)
    assert (status, body) == (200, [])
    status, body = http("GET", f"{server.base_url}/manage/projects", token=token + "x")
    assert status == 401
    assert body["error"]["code"]


def test_generated_secrets_are_kept_in_data_dir_with_mode_0600(server: ServerProcess) -> None:
    for name in ("management_token", "admin_password", "encryption_key"):
        path = server.data_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    assert (server.data_dir / "management_token").read_text().strip() == server.management_token
    assert (server.data_dir / "llm-proxy.db").exists()


def test_health_and_ready_answer_200(server: ServerProcess) -> None:
    status, body = http("GET", f"{server.base_url}/health")
    assert status == 200
    assert body["status"] == "ok"
    status, body = http("GET", f"{server.base_url}/ready")
    assert status == 200
    assert body["checks"]["database"] == "ok"


def test_ready_is_200_from_the_first_poll_with_redis_answering(
    tmp_path: Path, api_config: Path, redis_server: RedisServer
) -> None:
    # A load balancer polls /ready as soon as the server serves: an instance whose Redis answers
    # must not be reported unready for its first second.
    server = start_server(
        tmp_path / "data",
        api_config,
        tmp_path / "logs",
        LLM_PROXY_EVENT_BUS="redis",
        REDIS_URL=redis_server.url,
    )
    try:
        status, body = http("GET", f"{server.base_url}/ready")  # start_server saw /health answer
        assert (status, body["checks"]) == (200, {"database": "ok", "redis": "ok"})
    finally:
        server.stop()


@pytest.mark.redis
def test_a_unix_socket_redis_url_serves_and_publishes(tmp_path: Path, api_config: Path) -> None:
    # REDIS_URL takes unix:// as well as redis://, as redis-py does: a Redis on the same machine
    # is often reached through its socket.
    with tempfile.TemporaryDirectory(prefix="r", dir="/tmp") as short:  # socket paths are short
        redis = RedisServer(tmp_path / "redis", unix_socket=Path(short) / "redis.sock")
        redis.start()
        bus = {"LLM_PROXY_EVENT_BUS": "redis", "REDIS_URL": f"unix://{short}/redis.sock?db=0"}
        try:
            server = start_server(tmp_path / "data", api_config, tmp_path / "logs", **bus)
            try:
                status, body = http("GET", f"{server.base_url}/ready")
                assert (status, body["checks"]) == (200, {"database": "ok", "redis": "ok"})
                token = server.issue_token(UPSTREAM_KEY)
                status, _ = http(
                    "POST", f"{server.base_url}/v1/chat/completions", token=token, body=CHAT
                )
                assert status == 200
                deadline = time.monotonic() + 20
                while _stream_length(redis.port, "llm-proxy:events") < 1:
                    assert time.monotonic() < deadline, "the event never reached the stream"
                    time.sleep(0.1)
            finally:
                server.stop()
        finally:
            redis.stop()


def _stream_length(port: int, stream: str) -> int:
    """XLEN of ``stream``, asked over TCP (the server under test used the Unix socket)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"XLEN {stream}\r\n".encode())
        return int(sock.recv(64).strip().lstrip(b":"))


@pytest.mark.redis
def test_the_server_publishes_on_the_stream_llm_proxy_event_stream_names(
    tmp_path: Path, api_config: Path, redis_server: RedisServer
) -> None:
    # The dispatcher reads LLM_PROXY_EVENT_STREAM ("the stream the proxies publish events on"):
    # set for a whole deployment, the server must publish there too, or nothing is delivered.
    stream = {"LLM_PROXY_EVENT_STREAM": "tenant-a:events"}
    bus = {"LLM_PROXY_EVENT_BUS": "redis", "REDIS_URL": redis_server.url, **stream}
    server = start_server(tmp_path / "data", api_config, tmp_path / "logs", **bus)
    events_file = tmp_path / "dispatched.jsonl"
    try:
        issued = http(
            "POST",
            f"{server.base_url}/manage/tokens",
            token=server.management_token,
            body={"project_id": _create_project(server), "duration_minutes": 60},
        )[1]
        status, _ = http(
            "POST", f"{server.base_url}/v1/chat/completions", token=issued["token"], body=CHAT
        )
        assert status == 200
        dispatch = cli_command("dispatcher", "--service", "file", "--burst", "--batch-wait", "0")
        dispatch += ["--path", str(events_file)]
        deadline = time.monotonic() + 20
        while not (events_file.exists() and events_file.read_bytes()):
            assert time.monotonic() < deadline, "the event never reached the dispatcher"
            result = run(dispatch, clean_env(DATA_DIR=str(tmp_path / "d"), **bus))
            assert result.returncode == 0, result.stderr
            time.sleep(0.2)
    finally:
        server.stop()
    (event,) = map(json.loads, events_file.read_bytes().splitlines())
    assert event["status"] == 200 and event["token_id"] == issued["id"]


def _sample(base_url: str, series: str) -> float:
    """A sample of the server's /metrics page; 0 when the series is not there."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as response:
        page = response.read().decode()
    for line in page.splitlines():
        if line.startswith(series + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


@pytest.mark.redis
def test_a_long_redis_outage_spools_up_to_events_spool_max_bytes_and_counts_the_rest(
    tmp_path: Path, api_config: Path, redis_server: RedisServer
) -> None:
    # Events carry prompts and answers: unbounded, a day without Redis filled DATA_DIR's disk,
    # which the SQLite database shares, with every event of the outage.
    cap = 16 * 1024
    bus = {"LLM_PROXY_EVENT_BUS": "redis", "REDIS_URL": redis_server.url}
    server = start_server(
        tmp_path / "data", api_config, tmp_path / "logs", EVENTS_SPOOL_MAX_BYTES="16KiB", **bus
    )
    spool = tmp_path / "data" / "events-spool.jsonl"
    try:
        token = server.issue_token(UPSTREAM_KEY)
        redis_server.stop()
        for _ in range(60):  # events of about a kilobyte each: several times the cap
            status, _ = http(
                "POST", f"{server.base_url}/v1/chat/completions", token=token, body=CHAT
            )
            assert status == 200  # requests never wait for Redis
        spooled = "llm_proxy_events_spooled_total"
        dropped = 'llm_proxy_events_dropped_total{reason="spool_full"}'
        deadline = time.monotonic() + 20
        while _sample(server.base_url, spooled) + _sample(server.base_url, dropped) < 60:
            assert time.monotonic() < deadline, "the events never reached the spool"
            time.sleep(0.1)
        assert 0 < spool.stat().st_size <= cap
        assert _sample(server.base_url, dropped) > 0
        assert "events.spool_full" in server.process.stdout + server.process.stderr

        redis_server.start()  # what was spooled is published, and the spool emptied
        deadline = time.monotonic() + 20
        while spool.stat().st_size:
            assert time.monotonic() < deadline, "the spool was never replayed"
            time.sleep(0.1)
        assert _stream_length(redis_server.port, "llm-proxy:events") > 0
    finally:
        server.stop()


def test_second_start_reuses_the_token_and_keeps_the_projects(
    tmp_path: Path, api_config: Path
) -> None:
    first = start_server(tmp_path / "data", api_config, tmp_path / "logs", name="first")
    try:
        token = first.management_token
        project_id = _create_project(first)
        issued = http(
            "POST",
            f"{first.base_url}/manage/tokens",
            token=token,
            body={"project_id": project_id, "duration_minutes": 60},
        )[1]
    finally:
        assert first.stop() == 0, first.process.stderr
    second = start_server(tmp_path / "data", api_config, tmp_path / "logs", name="second")
    try:
        # Printed only by the start that generated it; kept under DATA_DIR.
        assert "MANAGEMENT_TOKEN=" not in second.process.stdout
        assert (second.data_dir / "management_token").read_text().strip() == token
        status, projects = http("GET", f"{second.base_url}/manage/projects", token=token)
        assert status == 200
        assert [p["id"] for p in projects] == [project_id]
        # The regenerated-or-not encryption key must still open the stored upstream key.
        status, body = http(
            "POST", f"{second.base_url}/v1/chat/completions", token=issued["token"], body=CHAT
        )
        assert status == 200, body
    finally:
        second.stop()


def test_sigterm_stops_the_server_cleanly_and_quickly(server: ServerProcess) -> None:
    _create_project(server)
    popen = server.process.popen
    started = time.monotonic()
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=5) == 0
    assert time.monotonic() - started < 5
    stderr = server.process.stderr
    assert "Traceback" not in stderr
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "server.stopping" in events and events[-1] == "server.stopped"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LISTEN_ADDR", "nonsense"),
        ("ENCRYPTION_KEY", "short"),
        ("API_CONFIG_PATH", "/missing.yaml"),
        ("API_CONFIG_PATH", "{bad_yaml}"),
        ("API_CONFIG_PATH", "{latin_1}"),
        ("PRICES_PATH", "{latin_1}"),
        ("DATABASE_URL", "mysql://db/x"),
        ("DATABASE_URL", "sqlite:///{a_file}/sub/x.db"),
        ("DATABASE_URL", "sqlite:///:memory:"),
        ("DATABASE_URL", "sqlite:///./:memory:"),
        ("DATA_DIR", "{a_file}/data"),
        ("FILE_EVENT_LOG", "{a_file}/events.jsonl"),
        ("WORKERS", "many"),
        ("WORKERS", "100000000000000000000"),
        ("LOG_LEVEL", "loud"),
        ("MAX_REQUEST_BODY", "huge"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line_naming_it(
    tmp_path: Path, api_config: Path, variable: str, value: str
) -> None:
    bad_yaml, a_file = tmp_path / "bad.yaml", tmp_path / "a-file"
    bad_yaml.write_text("apis: [\n  x: {\n")  # the parser's message spans several lines
    a_file.write_text("")  # nothing can be created beneath a regular file
    # Not UTF-8, as YAML must be: a comment saved as Latin-1 by an editor.
    latin_1 = tmp_path / "latin-1.yaml"
    latin_1.write_bytes(api_config.read_bytes() + "# café\n".encode("latin-1"))
    env = _start_env(tmp_path / "data", api_config, listen=f"127.0.0.1:{free_port()}")
    env[variable] = value.format(bad_yaml=bad_yaml, a_file=a_file, latin_1=latin_1)
    result = run(cli_command("server"), env)
    assert result.returncode != 0
    # (The events process, which opens FILE_EVENT_LOG, logs its start and stop.)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"llm-proxy: {variable}: "), lines[0]


@pytest.mark.parametrize(
    ("base_url", "complaint"),
    [
        ("https://api.example/v1?api-version=2024-06-01", "a query"),
        ("https://api.example#v1", "a fragment"),
        ("https://user:pw-in-the-url@api.example", "a user name or password"),
        ("ftp://user:pw-in-the-url@api.example", "a user name or password"),
    ],
)
def test_an_upstream_url_with_parts_the_proxy_never_sends_stops_start_up(
    tmp_path: Path, base_url: str, complaint: str
) -> None:
    # They were dropped without a word: an upstream that needs its query (Azure's api-version)
    # answered every request with an error the operator could not trace to the file.
    api_config = write_api_config(tmp_path / "api.yaml", base_url)
    env = _start_env(tmp_path / "data", api_config, listen=f"127.0.0.1:{free_port()}")
    result = run_start_that_fails(env, "an upstream URL the proxy cannot follow must stop start-up")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("llm-proxy: API_CONFIG_PATH: apis.openai.base_url: "), line
    assert complaint in line and "pw-in-the-url" not in line


@pytest.mark.parametrize(
    ("listen_addr", "workers"),
    [
        ("[::1:{port}", "1"),  # a bracket missing
        ("[localhost]:{port}", "1"),  # brackets hold an IPv6 address only
        ("127.0.0.1:\u0663\u0660\u0664\u0665\u0661", "1"),  # 30451 in Arabic-Indic digits
        (" 127.0.0.1:{port}", "1"),
        ("127.0.0.1 :{port}", "1"),
        ("127.0.0.1:0", "2"),  # each worker would get a port of its own
    ],
    ids=["bracket", "bracketed-name", "non-ascii-digits", "leading-space", "inner-space", "0x2"],
)
def test_a_listen_addr_that_is_not_host_port_stops_start_up_before_anything_opens(
    tmp_path: Path, api_config: Path, listen_addr: str, workers: str
) -> None:
    env = _start_env(
        tmp_path / "data",
        api_config,
        listen=listen_addr.format(port=free_port()),
        WORKERS=workers,
    )
    result = run_start_that_fails(env, "a LISTEN_ADDR that is not host:port must stop start-up")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llm-proxy: LISTEN_ADDR: "), lines[0]
    assert not (tmp_path / "data").exists()


def test_an_ipv6_listen_addr_is_logged_as_a_url_with_brackets(
    tmp_path: Path, api_config: Path
) -> None:
    port = free_port()
    env = _start_env(tmp_path / "data", api_config, listen=f"[::1]:{port}")
    process = spawn(cli_command("server"), env, tmp_path / "logs", "server")
    try:
        process.wait_for(f"http://[::1]:{port}/health")
    finally:
        process.stop()
    urls = [
        line["url"]
        for line in map(json.loads, process.stderr.splitlines())
        if line.get("event") == "server.listening"
    ]
    assert urls == [f"http://[::1]:{port}"]


def test_port_0_logs_the_port_the_system_chose(tmp_path: Path, api_config: Path) -> None:
    # LISTEN_ADDR=…:0 is accepted (any free port); the log is the only way to learn which one.
    env = _start_env(tmp_path / "data", api_config, listen="127.0.0.1:0")
    process = spawn(cli_command("server"), env, tmp_path / "logs", "server")
    try:
        deadline = time.monotonic() + 30
        urls: list[str] = []
        while not urls and time.monotonic() < deadline and process.popen.poll() is None:
            time.sleep(0.05)
            urls = [
                line["url"]
                for line in map(json.loads, process.stderr.splitlines())
                if line.get("event") == "server.listening"
            ]
        assert len(urls) == 1, process.stderr
        assert urls[0] != "http://127.0.0.1:0"
        process.wait_for(f"{urls[0]}/health")
    finally:
        process.stop()


def test_a_corrupt_key_file_is_named_when_encryption_key_is_not_set(
    tmp_path: Path, api_config: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    corrupt = base64.b64encode(b"only sixteen byt").decode()
    (data_dir / "encryption_key").write_text(corrupt + "\n")
    (data_dir / "encryption_key").chmod(0o600)  # private, as a server writes it: no notice of that
    env = _start_env(data_dir, api_config, listen=f"127.0.0.1:{free_port()}")
    result = run_start_that_fails(env, "a corrupt encryption_key file must stop start-up")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llm-proxy: ENCRYPTION_KEY is not set, and the key file "), lines[0]
    assert str(data_dir / "encryption_key") in lines[0]
    assert corrupt not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("management_token", b"mgmt-\xff\xfe-Q7zv\n", "is not UTF-8 text"),
        ("admin_password", b"pass-\xe9t\xe9-Q7zv\n", "is not UTF-8 text"),
        ("encryption_key", b"\x00\xff-Q7zv", "is not UTF-8 text"),
        ("management_token", b"mgmt-with a-space-Q7zv\n", "must be visible ASCII"),
        ("admin_password", b"pass-\x1b[31m-Q7zv\n", "must not hold control characters"),
    ],
)
def test_a_secret_file_its_setting_would_refuse_stops_start_up_with_one_line(
    tmp_path: Path, api_config: Path, name: str, content: bytes, says: str
) -> None:
    """A secret file under DATA_DIR is read as its setting: what the setting refuses, the file's
    content too (a binary copied over it, a token no client could send), without showing it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / name).write_bytes(content)
    (data_dir / name).chmod(0o600)
    env = _start_env(data_dir, api_config, listen=f"127.0.0.1:{free_port()}")
    result = run_start_that_fails(env, f"a {name} file holding {content!r} must stop start-up")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    variable = name.upper()
    assert lines[0].startswith(f"llm-proxy: {variable} "), lines[0]
    assert str(data_dir / name) in lines[0] and says in lines[0]
    assert "Q7zv" not in result.stdout + result.stderr


def test_port_already_in_use_stops_start_up_with_one_line(
    server: ServerProcess, tmp_path: Path, api_config: Path
) -> None:
    env = _start_env(
        tmp_path / "other",
        api_config,
        listen=server.base_url.removeprefix("http://"),
        LOG_LEVEL="warning",
    )
    result = run_start_that_fails(env, "a server that cannot listen must exit, not hang")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llm-proxy: LISTEN_ADDR: ")


def test_an_ipv6_port_in_use_is_named_as_listen_addr_writes_it(
    tmp_path: Path, api_config: Path
) -> None:
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _start_env(tmp_path / "data", api_config, listen=f"[::1]:{port}")
        result = run_start_that_fails(env, "a server that cannot listen must exit, not hang")
    assert result.stderr.splitlines() == [
        f"llm-proxy: LISTEN_ADDR: cannot listen on [::1]:{port}: Address already in use"
    ]


def test_a_port_taken_while_the_server_starts_stops_it_with_one_line(
    tmp_path: Path, api_config: Path
) -> None:
    """The port is bound first, but listened on only once the server is ready: another process
    that bound it too (SO_REUSEADDR) and listens in between takes it. The start must then fail,
    not go on serving nothing."""
    with socket.socket() as rival:
        rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rival.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{rival.getsockname()[1]}"
        env = _start_env(tmp_path / "data", api_config, listen=address)
        process = spawn(cli_command("server"), env, tmp_path, "server")
        try:
            # Logged by the events process before it says it is ready: the server, which has
            # bound the port by then, is waiting for that.
            deadline = time.monotonic() + START_TIMEOUT
            while '"events.pipeline_started"' not in process.stderr:
                assert time.monotonic() < deadline, process.stderr
                time.sleep(0.001)
            process.popen.send_signal(signal.SIGSTOP)
            rival.listen()
            process.popen.send_signal(signal.SIGCONT)
            code = process.popen.wait(timeout=30)
        finally:
            process.stop()
    assert code == 1, process.stderr
    unlogged = [line for line in process.stderr.splitlines() if not line.startswith("{")]
    assert unlogged == [
        f"llm-proxy: LISTEN_ADDR: cannot listen on {address}: Address already in use"
    ]


def test_a_database_that_cannot_be_opened_stops_start_up_with_one_line_naming_it(
    tmp_path: Path, api_config: Path
) -> None:
    # A directory where the database file should be: SQLite cannot open it.
    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data_dir / "llm-proxy.db").mkdir(parents=True)
    elsewhere.mkdir()
    env = _start_env(
        data_dir,
        api_config,
        listen=f"127.0.0.1:{free_port()}",
        LOG_LEVEL="warning",
    )
    cannot_open = "cannot open the database"
    default = f"llm-proxy: DATA_DIR: {cannot_open} {data_dir / 'llm-proxy.db'}: "
    given = f"llm-proxy: DATABASE_URL: {cannot_open}: "
    why = "a server whose database cannot be opened must exit"
    runs = [
        (default, run_start_that_fails(env, why)),
        (default, run(cli_command("migrate"), env)),
        (given, run_start_that_fails({**env, "DATABASE_URL": f"sqlite:///{elsewhere}"}, why)),
        (given, run(cli_command("migrate", "--database-url", f"sqlite:///{elsewhere}"), env)),
    ]
    for expected, result in runs:
        # One line: aiosqlite's thread, left to post to a closed event loop, added a traceback.
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines() == [f"{expected}unable to open database file"]


def test_json_logs_never_contain_tokens_or_keys(tmp_path: Path, api_config: Path) -> None:
    proxy = start_server(
        tmp_path / "data", api_config, tmp_path / "logs", LOG_LEVEL="debug", LOG_FORMAT="json"
    )
    try:
        management = proxy.management_token
        project_id = _create_project(proxy)
        status, issued = http(
            "POST",
            f"{proxy.base_url}/manage/tokens",
            token=management,
            body={"project_id": project_id, "duration_minutes": 5, "max_requests": 10},
        )
        assert status == 201
        value = issued["token"]
        with openai.OpenAI(base_url=f"{proxy.base_url}/v1", api_key=value, max_retries=0) as client:
            completion = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            assert completion.choices[0].message.content
            chunks = list(
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                )
            )
            assert chunks
        # Failures are where secrets usually slip into logs.
        http("GET", f"{proxy.base_url}/manage/projects", token=management[:-1] + "X")
        http("POST", f"{proxy.base_url}/v1/chat/completions", token=value[:-1] + "X", body=CHAT)
        http("DELETE", f"{proxy.base_url}/manage/tokens", token=management, body={"token": value})
        status, body = http("POST", f"{proxy.base_url}/v1/chat/completions", token=value, body=CHAT)
        assert (status, body["error"]["code"]) == (401, "token_inactive")
    finally:
        assert proxy.stop() == 0
    stderr, stdout = proxy.process.stderr, proxy.process.stdout
    assert stderr.strip(), "expected some log lines"
    for line in stderr.splitlines():
        json.loads(line)  # every log line is a JSON object: nothing unstructured slipped out
    for secret in (value, UPSTREAM_KEY, management, issued["token"][3:]):
        assert secret not in stderr
    assert UPSTREAM_KEY not in stdout
    assert value not in stdout
    # Once, in the banner of the start that generated it.
    assert [line.strip() for line in stdout.splitlines() if management in line] == [
        f"MANAGEMENT_TOKEN={management}"
    ]


def _open_file_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


# None: this process's hard limit (raising a hard limit needs a privilege a sandbox may lack).
@pytest.mark.parametrize(("soft", "given_hard"), [(256, None), (512, 1024)])
def test_the_server_raises_its_open_file_limit_to_the_hard_one(
    tmp_path: Path, api_config: Path, soft: int, given_hard: int | None
) -> None:
    # Two descriptors per open stream: at a soft limit of 512, the 256th concurrent stream would
    # be refused while the host allows more.
    hard = given_hard or resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    warned = hard < 4096
    port = free_port()
    env = _start_env(tmp_path / "data", api_config, listen=f"127.0.0.1:{port}")
    process = spawn(
        ["prlimit", f"--nofile={soft}:{hard}", *cli_command("server")], env, tmp_path, "server"
    )
    try:
        process.wait_for(f"http://127.0.0.1:{port}/health")
        assert _open_file_limits(process.popen.pid) == (hard, hard)
        warnings = [
            json.loads(line)
            for line in process.stderr.splitlines()
            if "open_file_limit_low" in line
        ]
        assert bool(warnings) is warned
        if warned:
            assert warnings[0]["limit"] == hard
            assert warnings[0]["concurrent_streams"] == hard // 2
    finally:
        process.stop()


PASSWORD = "pw-" + secrets.token_hex(8)
UNREADABLE_URLS = [
    # Unencoded "@": urllib splits at the last one, asyncpg at the first, quoting the rest.
    ("DATABASE_URL", f"postgresql://llm:p@ss:{PASSWORD}@127.0.0.1:{{port}}/llm"),
    ("DATABASE_URL", f"postgresql://llm:{PASSWORD}@[::1/llm"),
    # Read by urllib, refused by asyncpg: a ValueError of its own, and one quoting (here) the
    # password.
    ("DATABASE_URL", f"postgresql://llm:{PASSWORD}@/llm?host=127.0.0.1&port=54x32"),
    ("DATABASE_URL", f"postgresql://llm:{PASSWORD}@/llm?host=127.0.0.1&port={PASSWORD}"),
    # The "//" left out: the scheme is PostgreSQL's, the rest no URL's.
    ("DATABASE_URL", f"postgresql:llm:{PASSWORD}@127.0.0.1:{{port}}/llm"),
    ("REDIS_URL", f"redis://:{PASSWORD}@[::1/0"),
    ("REDIS_URL", f"redis://:{PASSWORD}@127.0.0.1:x/0"),
    # Options in the query that redis-py refuses when it first connects: a value that is not
    # one, a name it does not take.
    ("REDIS_URL", f"redis://:{PASSWORD}@127.0.0.1:{{port}}/0?socket_timeout=soon"),
    ("REDIS_URL", f"redis://:{PASSWORD}@127.0.0.1:{{port}}/0?sockettimeout=1"),
]


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [("server", *case) for case in UNREADABLE_URLS]
    + [("migrate", *case) for case in UNREADABLE_URLS if case[0] == "DATABASE_URL"],
)
def test_an_unreadable_url_is_one_line_that_never_shows_its_password(
    tmp_path: Path, api_config: Path, command: str, variable: str, value: str
) -> None:
    env = _start_env(
        tmp_path / "data",
        api_config,
        listen=f"127.0.0.1:{free_port()}",
        LOG_LEVEL="warning",
        LLM_PROXY_EVENT_BUS="redis",
    )
    env[variable] = value.format(port=free_port())
    result = run(cli_command(command), env, timeout=60)
    assert result.returncode != 0
    assert PASSWORD not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"llm-proxy: {variable}: "), lines[0]


@pytest.mark.parametrize("command", ["server", "migrate"])
@pytest.mark.parametrize(
    ("database_url", "exit_code"),
    [
        ("mysql://llm@127.0.0.1/llm", 2),  # a bad setting: what start-up checks says so, exit 2
        ("sqlite:///:memory:", 2),
        ("postgresql://llm@127.0.0.1:{port}/llm", 1),  # a good one nothing answers: exit 1
    ],
)
def test_migrate_and_server_exit_alike_on_a_database_url(
    tmp_path: Path, api_config: Path, command: str, database_url: str, exit_code: int
) -> None:
    """A script (a deployment's migrate step, a supervisor) tells a setting to fix from a
    database to wait for by the exit code, the same for both commands."""
    env = _start_env(tmp_path / "data", api_config, listen=f"127.0.0.1:{free_port()}")
    env["DATABASE_URL"] = database_url.format(port=free_port())
    result = run(cli_command(command), env, timeout=60)
    assert result.returncode == exit_code, result.stderr
    assert "llm-proxy: DATABASE_URL" in result.stderr


@pytest.mark.parametrize("command", ["migrate", "server"])
def test_a_postgresql_url_naming_several_hosts_opens_the_one_that_answers(
    tmp_path: Path, api_config: Path, postgres_url: str, command: str
) -> None:
    # host1:port1,host2:port2 (libpq's and asyncpg's failover form): the first host is down.
    authority = postgres_url.split("@", 1)[1].split("/", 1)[0]
    url = postgres_url.replace(authority, f"127.0.0.1:{free_port()},{authority}", 1)
    if command == "migrate":
        env = _start_env(tmp_path / "data", api_config, listen="127.0.0.1:0", DATABASE_URL=url)
        result = run(cli_command("migrate"), env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("postgresql://127.0.0.1:"), result.stdout
        return
    server = start_server(tmp_path / "data", api_config, tmp_path / "logs", DATABASE_URL=url)
    try:
        assert _create_project(server)
    finally:
        server.stop()


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("option", "refusal"),
    [("ssl=disable", None), ("ssl=require", "rejected SSL upgrade")],  # the test server: no TLS
)
def test_a_sqlalchemy_asyncpg_url_s_ssl_option_is_its_ssl_mode(
    tmp_path: Path, api_config: Path, postgres_url: str, option: str, refusal: str | None
) -> None:
    # SQLAlchemy's asyncpg dialect takes ?ssl=<mode> (it refuses libpq's sslmode): an operator
    # copies such a URL. Before, asyncpg sent "ssl" to the server as a setting, and start-up
    # stopped on 'parameter "ssl" cannot be changed now', whatever the mode.
    url = postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1) + "?" + option
    env = _start_env(tmp_path / "data", api_config, listen="127.0.0.1:0", DATABASE_URL=url)
    result = run(cli_command("migrate"), env, timeout=60)
    if refusal is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 1
        assert result.stderr.startswith("llm-proxy: DATABASE_URL: ") and refusal in result.stderr


@pytest.mark.postgres
def test_a_libpq_connect_timeout_in_the_database_url_is_taken(
    tmp_path: Path, api_config: Path, postgres_url: str
) -> None:
    # connect_timeout is libpq's (psycopg URLs carry it); asyncpg sent it to the server as a
    # setting, and start-up stopped on 'unrecognized configuration parameter "connect_timeout"'.
    url = f"{postgres_url}?application_name=copied&connect_timeout=10"
    env = _start_env(tmp_path / "data", api_config, listen="127.0.0.1:0", DATABASE_URL=url)
    result = run(cli_command("migrate"), env, timeout=60)
    assert result.returncode == 0, result.stderr
    server = start_server(tmp_path / "data", api_config, tmp_path / "logs", DATABASE_URL=url)
    try:
        assert _create_project(server)
    finally:
        server.stop()
    assert "connect_timeout" not in server.process.stderr  # the change feed's listener too


async def test_a_libpq_connect_timeout_bounds_the_wait_for_a_database_that_never_answers() -> None:
    async with silent_server() as port:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await open_store(f"postgresql://u@127.0.0.1:{port}/llm?connect_timeout=2")
        waited = time.monotonic() - started
    assert 2 <= waited < 4.5, waited  # not the store's own 5 s


# -- a changed ENCRYPTION_KEY ---------------------------------------------------------------

MANAGEMENT = "mgmt-" + secrets.token_hex(16)


def _new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _start(root: Path, api_config: Path, key: str, name: str, **env: str) -> ServerProcess:
    return start_server(
        root / "data",
        api_config,
        root / "logs",
        name=name,
        MANAGEMENT_TOKEN=MANAGEMENT,
        ENCRYPTION_KEY=key,
        LOG_LEVEL="debug",
        **env,
    )


def _project_and_token(server: ServerProcess) -> tuple[str, str]:
    issued = server.issue(UPSTREAM_KEY)
    return str(issued["project_id"]), str(issued["token"])


def _chat(server: ServerProcess, token: str) -> tuple[int, Any]:
    return http("POST", f"{server.base_url}/v1/chat/completions", token=token, body=CHAT)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_encryption_key_that_opens_no_stored_key_stops_start_up_with_one_line(
    tmp_path: Path, api_config: Path, workers: str
) -> None:
    first, other = _new_key(), _new_key()
    server = _start(tmp_path, api_config, first, "first")
    try:
        _project_and_token(server)
    finally:
        server.stop()
    env = _start_env(
        tmp_path / "data",
        api_config,
        listen=f"127.0.0.1:{free_port()}",
        MANAGEMENT_TOKEN=MANAGEMENT,
        ENCRYPTION_KEY=other,
        LOG_LEVEL="warning",
        WORKERS=workers,
    )
    result = run_start_that_fails(env, "a wrong ENCRYPTION_KEY must stop start-up")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llm-proxy: ENCRYPTION_KEY: it opens none of the 1 upstream keys")
    assert "ENCRYPTION_KEY_CHECK=off" in lines[0]
    for secret in (first, other, UPSTREAM_KEY):
        assert secret not in result.stdout + result.stderr


def test_projects_whose_key_does_not_decrypt_get_a_clear_answer_and_one_log_line(
    tmp_path: Path, api_config: Path
) -> None:
    first, other = _new_key(), _new_key()
    server = _start(tmp_path, api_config, first, "first")
    try:
        old_project, old_token = _project_and_token(server)
    finally:
        server.stop()

    # The key was lost: started anyway, the old project's requests are refused, clearly.
    server = _start(tmp_path, api_config, other, "unchecked", ENCRYPTION_KEY_CHECK="off")
    try:
        for _ in range(3):
            status, body = _chat(server, old_token)
            assert status == 503, body
            assert body["error"]["code"] == "service_unavailable"
            assert "ENCRYPTION_KEY" in body["error"]["message"]
        _, new_token = _project_and_token(server)  # stored under the new key
        assert _chat(server, new_token)[0] == 200
    finally:
        server.stop()
    log = server.process.stderr
    assert log.count('"token_authority.project_key_undecryptable"') == 1, log
    assert old_project in log and "Traceback" not in log

    # Checked again: the new key opens one stored key, so it starts, naming the other project.
    server = _start(tmp_path, api_config, other, "checked")
    try:
        assert _chat(server, new_token)[0] == 200
        assert _chat(server, old_token)[0] == 503
        status, _ = http(
            "PATCH",
            f"{server.base_url}/manage/projects/{old_project}",
            token=MANAGEMENT,
            body={"api_key": UPSTREAM_KEY},
        )
        assert status == 200
        assert _chat(server, old_token)[0] == 200  # its key set anew
    finally:
        server.stop()
    log = server.process.stderr
    undecryptable = [
        json.loads(line)
        for line in log.splitlines()
        if '"server.upstream_keys_undecryptable"' in line
    ]
    assert [(line["count"], line["projects"]) for line in undecryptable] == [(1, [old_project])]
    assert "Traceback" not in log
    for secret in (first, other, UPSTREAM_KEY):
        assert secret not in log


def test_a_server_whose_log_reader_went_away_still_stops(tmp_path: Path, api_config: Path) -> None:
    """`llm-proxy server 2>&1 | tee log`, then Ctrl-C: tee is gone, the server's stderr is a pipe
    nobody reads, and SIGTERM must still stop it (a log line raising BrokenPipeError skipped the
    shutdown after it)."""
    port = free_port()
    env = _start_env(tmp_path / "data", api_config, listen=f"127.0.0.1:{port}")
    popen = subprocess.Popen(
        cli_command("server"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert popen.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while b'"server.listening"' not in popen.stdout.readline():
            assert time.monotonic() < deadline and popen.poll() is None
        popen.stdout.close()  # the reader is gone
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(timeout=20) == 0
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()


@pytest.mark.parametrize(
    "entry",
    ["DATABASE_URL=postgresql://app:pw-in-the-list@db/llm", "mgmt-pw-in-the-list"],
    ids=["name=value", "a value alone"],
)
def test_a_required_settings_entry_that_is_no_name_is_refused_without_showing_it(
    tmp_path: Path, api_config: Path, entry: str
) -> None:
    # An env line pasted into the list (NAME=value), or a Secret's value templated where its key's
    # name belongs, was quoted whole in the refusal: the secret went to the terminal and the logs.
    env = _start_env(
        tmp_path / "data",
        api_config,
        listen=f"127.0.0.1:{free_port()}",
        REQUIRED_SETTINGS=f"MANAGEMENT_TOKEN,{entry}",
        MANAGEMENT_TOKEN="mgmt-given",
    )
    result = run_start_that_fails(env, "a REQUIRED_SETTINGS entry that is no name must stop")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("llm-proxy: REQUIRED_SETTINGS: "), line
    assert "pw-in-the-list" not in line
    assert not (tmp_path / "data").exists()
