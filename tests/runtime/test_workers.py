"""``llm-proxy server --workers N``: several processes on one port keep tokens' limits and revocation exact across them,
and ``/metrics`` on any of them sums them all."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.client as http_client
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from tests.events.events_support import RedisServer
from tests.processes import (
    START_TIMEOUT,
    MockUpstream,
    Process,
    ServerProcess,
    children,
    clean_env,
    cli_command,
    free_port,
    has_exited,
    http,
    run_start_that_fails,
    spawn,
    start_mock_upstream,
    start_server,
    write_api_config,
)

pytestmark = pytest.mark.process


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path)
    yield mock
    mock.process.stop()


@pytest.fixture
def workers(tmp_path: Path, upstream: MockUpstream) -> Iterator[ServerProcess]:
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(tmp_path / "data", config, tmp_path, WORKERS="2")
    yield server
    code = server.stop(timeout=10)
    assert code == 0, server.process.stderr[-3000:]


def test_quota_and_revocation_hold_across_worker_processes(workers: ServerProcess) -> None:
    # The generated credentials are shown once, by the first worker that serves.
    assert workers.process.stdout.count("MANAGEMENT_TOKEN=") == 1
    base, management = workers.base_url, workers.management_token
    status, project = http(
        "POST", f"{base}/manage/projects", token=management, body={"name": "w", "api_key": "sk-k"}
    )
    assert status == 201
    status, limited = http(
        "POST",
        f"{base}/manage/tokens",
        token=management,
        body={"project_id": project["id"], "duration_minutes": 5, "max_requests": 20},
    )
    # New connections spread over both workers; every request opens its own.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(
                lambda _: http("GET", f"{base}/v1/models", token=limited["token"])[0], range(60)
            )
        )
    assert statuses.count(200) == 20 and statuses.count(429) == 40

    status, unlimited = http(
        "POST",
        f"{base}/manage/tokens",
        token=management,
        body={"project_id": project["id"], "duration_minutes": 5},
    )
    for _ in range(10):  # both workers have it cached now
        assert http("GET", f"{base}/v1/models", token=unlimited["token"])[0] == 200
    assert http("DELETE", f"{base}/manage/tokens/{unlimited['id']}", token=management)[0] == 204
    time.sleep(1.0)
    for _ in range(10):
        status, body = http("GET", f"{base}/v1/models", token=unlimited["token"])
        assert (status, body["error"]["code"]) == (401, "token_inactive")
    assert "server.workers_started" in workers.process.stderr


def burst(server: ServerProcess, token: str, count: int) -> list[tuple[int, str | None]]:
    """``count`` proxied requests at once, each on a new connection (so on either worker): each
    answer's status and error code."""

    def one(_: int) -> tuple[int, str | None]:
        status, body = http("GET", f"{server.base_url}/v1/models", token=token)
        return status, (body or {}).get("error", {}).get("code")

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def stop_and_burst(
    server: ServerProcess, stop: str, refusal: tuple[int, str], rounds: int = 4
) -> None:
    """The burst right after the answer reaches both workers before either polls the change
    feed again: the one that did not answer must already know (several rounds, so that a
    worker that happened to poll in between cannot pass the test by luck)."""
    wait_for_workers(server, 2)
    base, management = server.base_url, server.management_token
    for _ in range(rounds):
        issued = server.issue()
        token, project_id = issued["token"], issued["project_id"]
        assert set(burst(server, token, 16)) == {(200, None)}  # cached by both workers
        if stop == "revoke":
            status, _ = http("DELETE", f"{base}/manage/tokens/{issued['id']}", token=management)
        elif stop == "revoke_project_tokens":
            status, _ = http(
                "POST", f"{base}/manage/projects/{project_id}/tokens/revoke", token=management
            )
        else:
            status, _ = http(
                "PATCH",
                f"{base}/manage/projects/{project_id}",
                token=management,
                body={"is_active": False},
            )
        assert status in (200, 204)
        assert set(burst(server, token, 16)) == {refusal}
    # Told by the worker that answered, not found in the change feed by luck.
    assert "server.worker_change_unconfirmed" not in server.process.stderr


@pytest.mark.parametrize(
    ("stop", "refusal"),
    [
        ("revoke", (401, "token_inactive")),
        ("revoke_project_tokens", (401, "token_inactive")),
        ("deactivate_project", (403, "project_inactive")),
    ],
)
def test_a_stop_answered_by_one_worker_holds_on_every_worker_from_its_answer(
    workers: ServerProcess, stop: str, refusal: tuple[int, str]
) -> None:
    stop_and_burst(workers, stop, refusal)


@pytest.mark.postgres
@pytest.mark.redis
def test_on_postgresql_a_revocation_holds_on_every_worker_from_its_answer(
    tmp_path: Path, upstream: MockUpstream, postgres_url: str, redis_server: RedisServer
) -> None:
    """As on SQLite: the PostgreSQL push (LISTEN/NOTIFY) is quick, yet it may arrive after the
    answer (more rounds: it often wins the race)."""
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(
        tmp_path / "data",
        config,
        tmp_path,
        WORKERS="2",
        DATABASE_URL=postgres_url,
        LLM_PROXY_EVENT_BUS="redis",
        REDIS_URL=redis_server.url,
    )
    try:
        stop_and_burst(server, "revoke", (401, "token_inactive"), rounds=16)
    finally:
        code = server.stop(timeout=10)
    assert code == 0, server.process.stderr[-3000:]


def send_requests(server: ServerProcess, token: str, count: int) -> None:
    """``count`` proxied requests, each on a new connection, so they spread over the workers."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda _: http("GET", f"{server.base_url}/v1/models", token=token)[0],
                range(count),
            )
        )
    assert statuses == [200] * count


def totals(text: str) -> dict[str, float]:
    """Each sample name summed over its label sets, plus ``workers_<state>`` from ``llm_proxy_workers``."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name == "llm_proxy_workers":
                name = f"workers_{sample.labels['state']}"
            sums[name] = sums.get(name, 0.0) + sample.value
    return sums


def scrape(server: ServerProcess) -> dict[str, float]:
    """One ``GET /metrics`` on a new connection (so on either worker)."""
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=5) as response:
        return totals(response.read().decode())


def wait_for_requests(server: ServerProcess, count: int) -> None:
    """Until a scrape sums ``count`` proxied requests (a worker counts one just after it ends)."""
    deadline = time.monotonic() + 5
    while (counted := scrape(server).get("llm_proxy_requests_total", 0.0)) < count:
        assert time.monotonic() < deadline, counted
        time.sleep(0.05)
    assert counted == count


def wait_for_workers(server: ServerProcess, count: int) -> None:
    """Until ``count`` workers take requests (``start_server`` returned when the first did)."""
    deadline = time.monotonic() + START_TIMEOUT
    while scrape(server)["workers_reporting"] < count:
        assert time.monotonic() < deadline, server.process.stderr[-3000:]
        time.sleep(0.05)


def worker_page(server: ServerProcess, index: int) -> dict[str, float]:
    """What worker ``index`` alone has counted, read from its private socket."""
    path = server.data_dir / "run" / f"metrics-worker-{index}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        chunks = iter(lambda: sock.recv(65536), b"")
        return totals(b"".join(chunks).decode())


def test_every_scrape_reports_the_sum_over_all_workers(workers: ServerProcess) -> None:
    wait_for_workers(workers, 2)
    token = workers.issue_token()
    send_requests(workers, token, 40)
    wait_for_requests(workers, 40)

    # Each worker counted some of them (SO_REUSEPORT spread the connections) ...
    own = [worker_page(workers, n).get("llm_proxy_requests_total", 0.0) for n in range(2)]
    assert all(count > 0 for count in own) and sum(own) == 40, own
    # ... and whichever answers, every scrape shows all of them.
    for _ in range(12):
        sums = scrape(workers)
        assert sums["llm_proxy_requests_total"] == 40
        assert sums["llm_proxy_upstream_latency_seconds_count"] == 40
        assert (sums["workers_reporting"], sums["workers_missing"]) == (2, 0)


def worker_pids(server: ServerProcess) -> list[int]:
    """The supervisor's children."""
    return children(server.process.popen.pid)


def test_a_killed_worker_is_replaced_and_no_scrape_waits_for_it(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(tmp_path / "data", config, tmp_path, WORKERS="2")
    try:
        wait_for_workers(server, 2)
        token = server.issue_token()
        send_requests(server, token, 20)
        wait_for_requests(server, 20)  # and both workers served a page with them
        pids = worker_pids(server)
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)  # as the OOM killer would
        deadline = time.monotonic() + 5
        while not has_exited(pids[0]):
            assert time.monotonic() < deadline
            time.sleep(0.05)

        # Until its replacement serves, the port is the other worker's, and a scrape reports
        # the dead one missing without waiting for it.
        # The sums go on from what the dead worker last reported: they never go down, which
        # Prometheus would read as every counter starting again from zero.
        send_requests(server, token, 10)
        states, counted = set(), []
        deadline = time.monotonic() + START_TIMEOUT
        while (sums := timed_scrape(server, within=1.0))["workers_missing"]:
            states.add((sums["workers_reporting"], sums["workers_missing"]))
            counted.append(sums["llm_proxy_requests_total"])
            assert time.monotonic() < deadline, server.process.stderr[-3000:]
            time.sleep(0.05)
        assert states == {(1, 1)}
        assert counted == sorted(counted) and counted[0] >= 20, counted
        assert (sums["workers_reporting"], sums["workers_missing"]) == (2, 0)
        assert sums["llm_proxy_worker_restarts_total"] == 1
        assert (
            sums["llm_proxy_requests_total"] == 30
        )  # the replacement went on from its slot's file
        replaced = worker_pids(server)
        assert len(replaced) == 2 and pids[1] in replaced and pids[0] not in replaced
        send_requests(server, token, 20)
        wait_for_requests(server, 50)

        # The replacement dies soon after it started as well: the pause before the next doubles,
        # so a worker that cannot run does not fork in a loop.
        (replacement,) = set(replaced) - {pids[1]}
        os.kill(replacement, signal.SIGKILL)
        deadline = time.monotonic() + START_TIMEOUT
        while (
            len(died := log_events(server, "server.worker_died")) < 2
            or len(log_events(server, "server.worker_restarted")) < 2
        ):
            assert time.monotonic() < deadline, server.process.stderr[-3000:]
            time.sleep(0.1)
        assert [(e["worker"], e["exit_code"], e["restart_in_seconds"]) for e in died] == [
            (0, -9, 1.0),
            (0, -9, 2.0),
        ]
        wait_for_workers(server, 2)
        sums = scrape(server)
        assert sums["llm_proxy_worker_restarts_total"] == 2
        assert sums["llm_proxy_requests_total"] == 50
    finally:
        code = server.stop(timeout=10)
    assert code == 0, server.process.stderr[-3000:]


def test_the_start_time_stays_put_whichever_worker_answers_the_scrape(
    workers: ServerProcess,
) -> None:
    """Each scrape lands on any worker, and a replaced one started seconds after its siblings:
    the page's process_start_time_seconds must not change from scrape to scrape, or every alert
    and panel that reads a change of it as a restart (changes(), uptime) sees one each time."""
    wait_for_workers(workers, 2)
    killed = worker_pids(workers)[0]
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + START_TIMEOUT
    while not log_events(workers, "server.worker_restarted"):
        assert time.monotonic() < deadline, workers.process.stderr[-3000:]
        time.sleep(0.05)
    while (sums := scrape(workers))["workers_reporting"] < 2 or sums["workers_missing"]:
        assert time.monotonic() < deadline, workers.process.stderr[-3000:]
        time.sleep(0.05)
    assert killed not in worker_pids(workers)

    start_times = {scrape(workers)["process_start_time_seconds"] for _ in range(30)}
    assert len(start_times) == 1, start_times


def log_events(server: ServerProcess, name: str) -> list[dict[str, Any]]:
    """The server's JSON log lines (on stderr) of event ``name``."""
    lines = (line for line in server.process.stderr.splitlines() if line.startswith("{"))
    return [e for e in map(json.loads, lines) if e.get("event") == name]


def timed_scrape(server: ServerProcess, within: float) -> dict[str, float]:
    started = time.monotonic()
    sums = scrape(server)
    assert time.monotonic() - started < within
    return sums


def test_a_stopped_worker_is_reported_missing_without_holding_the_scrape(
    workers: ServerProcess,
) -> None:
    """A worker that hangs (here: SIGSTOP) is not dead, so nothing replaces it; a scrape landing
    on its sibling stops waiting for it after FETCH_SECONDS (1 s), says so, and adds what it
    last reported."""
    wait_for_workers(workers, 2)
    token = workers.issue_token()
    send_requests(workers, token, 30)
    wait_for_requests(workers, 30)
    hung = worker_pids(workers)[0]
    os.kill(hung, signal.SIGSTOP)
    try:
        answered: list[tuple[float, dict[str, float]]] = []
        deadline = time.monotonic() + 30
        while len(answered) < 3:
            assert time.monotonic() < deadline
            started = time.monotonic()
            try:
                # A new connection per scrape: one the kernel gives the stopped worker waits.
                with urllib.request.urlopen(f"{workers.base_url}/metrics", timeout=3) as response:
                    sums = totals(response.read().decode())
            except TimeoutError:
                continue
            answered.append((time.monotonic() - started, sums))
        for took, sums in answered:
            assert (sums["workers_reporting"], sums["workers_missing"]) == (1, 1)
            assert took < 2.0
            # What it counted before it stopped is still in the sum, from its last page.
            assert sums["llm_proxy_requests_total"] == 30
        assert hung in worker_pids(workers)  # not replaced
    finally:
        os.kill(hung, signal.SIGCONT)
    wait_for_workers(workers, 2)


def test_workers_that_cannot_listen_stop_start_up(tmp_path: Path, upstream: MockUpstream) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        address = f"{host}:{port}"
        env = clean_env(
            DATA_DIR=str(tmp_path / "data"),
            LISTEN_ADDR=address,
            API_CONFIG_PATH=str(write_api_config(tmp_path / "api.yaml", upstream.base_url)),
            WORKERS="2",
            LOG_FORMAT="json",
        )
        result = run_start_that_fails(
            env, "workers that cannot listen must end start-up, not be restarted forever"
        )
    assert result.returncode == 1
    assert f"llm-proxy: LISTEN_ADDR: cannot listen on {address}" in result.stderr
    assert '"server.worker_start_failed"' in result.stderr
    assert '"server.worker_restarted"' not in result.stderr
    # The port is tried first: no events process was started to be stopped again (a worker
    # stopped as its events process started left a BrokenPipeError traceback).
    assert '"events.process_started"' not in result.stderr
    assert "Traceback" not in result.stderr


def test_workers_create_a_missing_data_dir_as_one_server_does(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    # Nothing else creates it here: no secret to generate, the database elsewhere.
    data_dir = tmp_path / "missing" / "data"
    server = start_server(
        data_dir,
        write_api_config(tmp_path / "api.yaml", upstream.base_url),
        tmp_path,
        WORKERS="2",
        DATABASE_URL=f"sqlite:///{tmp_path}/llm-proxy.db",
        MANAGEMENT_TOKEN="mgmt-given-by-the-operator-" + "x" * 20,
        ADMIN_PASSWORD="given-password",
        ENCRYPTION_KEY=base64.b64encode(b"k" * 32).decode(),
    )
    try:
        wait_for_workers(server, 2)
        for made in (data_dir.parent, data_dir, data_dir / "run"):
            assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    finally:
        assert server.stop(timeout=10) == 0, server.process.stderr[-3000:]


def test_workers_and_their_events_processes_end_when_the_supervisor_is_killed(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    """A killed supervisor forwards no SIGTERM: the workers must notice by themselves, or they
    keep the port and their events processes for as long as the machine runs."""
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(tmp_path / "data", config, tmp_path, WORKERS="2")
    left_behind: list[int] = []
    try:
        wait_for_workers(server, 2)
        workers = worker_pids(server)
        events_processes = [pid for worker in workers for pid in children(worker)]
        assert len(workers) == 2 and len(events_processes) == 2
        left_behind = workers + events_processes

        server.process.popen.kill()
        server.process.popen.wait()
        deadline = time.monotonic() + 15
        while not all(has_exited(pid) for pid in left_behind):
            assert time.monotonic() < deadline, [p for p in left_behind if not has_exited(p)]
            time.sleep(0.05)

        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])), 1)
        # They stopped as on SIGTERM, each saying why (the workers log to the shared stderr).
        assert server.process.stderr.count('"server.supervisor_gone"') == 2
        assert server.process.stderr.count('"server.stopped"') == 2
    finally:
        server.stop()
        for pid in left_behind:
            if not has_exited(pid):
                os.kill(pid, signal.SIGKILL)


def _admin_call(
    server: ServerProcess, method: str, path: str, body: bytes | None = None, cookie: str = ""
) -> tuple[int, dict[str, str], str]:
    """One admin page request on a new connection (so on either worker), redirects not followed:
    status, headers, page."""
    connection = http_client.HTTPConnection(server.base_url.removeprefix("http://"), timeout=15)
    headers = {"Authorization": "Basic " + base64.b64encode(b"admin:admin-secret").decode()}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if cookie:
        headers["Cookie"] = cookie
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def _issue_form(server: ServerProcess) -> tuple[str, bytes]:
    """A new project, and one rendering of its issue form, filled in: where to post, and what."""
    status, project = http(
        "POST",
        f"{server.base_url}/manage/projects",
        token=server.management_token,
        body={"name": "forms", "api_key": "sk-forms"},
    )
    assert status == 201
    _, _, page = _admin_call(server, "GET", f"/admin/projects/{project['id']}/tokens/new")
    fields = {"duration_minutes": "5"}
    for name in ("csrf_token", "issue_id"):
        found = re.search(rf'name="{name}" value="([^"]+)"', page)
        assert found, page
        fields[name] = found.group(1)
    body = urllib.parse.urlencode(fields).encode()
    return f"/admin/projects/{project['id']}/tokens", body


def _token_count(server: ServerProcess) -> int:
    _, tokens = http("GET", f"{server.base_url}/manage/tokens", token=server.management_token)
    return len(tokens)


@pytest.fixture
def admin_workers(tmp_path: Path, upstream: MockUpstream) -> Iterator[ServerProcess]:
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(
        tmp_path / "data", config, tmp_path, WORKERS="2", ADMIN_PASSWORD="admin-secret"
    )
    wait_for_workers(server, 2)
    yield server
    code = server.stop(timeout=10)
    assert code == 0, server.process.stderr[-3000:]


def test_one_issue_form_sent_to_every_worker_issues_one_token(
    admin_workers: ServerProcess,
) -> None:
    """A double click, a retry, the back button and "resend": each post opens a new connection,
    which may reach either worker; the form still issues one token, and each post is sent to the
    page of that token."""
    path, body = _issue_form(admin_workers)
    answers = [_admin_call(admin_workers, "POST", path, body) for _ in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers += pool.map(lambda _: _admin_call(admin_workers, "POST", path, body), range(8))
    assert {(status, headers["Location"]) for status, headers, _ in answers} == {
        (303, answers[0][1]["Location"])
    }
    assert _token_count(admin_workers) == 1

    path, body = _issue_form(admin_workers)  # a new rendering, all its posts at once
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(lambda _: _admin_call(admin_workers, "POST", path, body)[0], range(8))
        )
    assert statuses == [303] * 8
    assert _token_count(admin_workers) == 2


def test_an_issued_value_is_shown_once_whichever_worker_is_asked(
    admin_workers: ServerProcess,
) -> None:
    path, body = _issue_form(admin_workers)
    status, headers, _ = _admin_call(admin_workers, "POST", path, body)
    assert status == 303
    location, cookie = headers["Location"], headers["Set-Cookie"].split(";")[0]
    # A client that keeps sending the cookie (the page's answer clearing it was lost), each time
    # on a new connection: at most one of the pages, on whichever worker, has the value.
    pages = [_admin_call(admin_workers, "GET", location, cookie=cookie) for _ in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        pages += pool.map(
            lambda _: _admin_call(admin_workers, "GET", location, cookie=cookie), range(6)
        )
    shown = [status for status, _, page in pages if 'id="token-value"' in page]
    assert shown == [200]
    assert sorted(status for status, _, _ in pages) == [200] + [410] * 11


def test_spend_of_tokens_without_a_budget_is_kept_by_every_worker_and_written_at_a_stop(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    """Each worker's events process adds what its requests cost to the token's spend in batches:
    it shows within a second, and what is pending when SIGTERM stops the server is written."""
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    prices = tmp_path / "prices.yaml"
    prices.write_text("gpt-*: {input: 1.00, output: 4.00}\n")
    server = start_server(tmp_path / "data", config, tmp_path, WORKERS="2", PRICES_PATH=str(prices))
    base, management = server.base_url, server.management_token
    try:
        issued = server.issue("k")
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

        def spend(count: int) -> int:
            """``count`` requests, each on a new connection; what they cost, in nano-dollars."""
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers = list(
                    pool.map(
                        lambda _: http(
                            "POST",
                            f"{base}/v1/chat/completions",
                            token=issued["token"],
                            body=body,
                        ),
                        range(count),
                    )
                )
            assert [status for status, _ in answers] == [200] * count
            return sum(
                a["usage"]["prompt_tokens"] * 1000 + a["usage"]["completion_tokens"] * 4000
                for _, a in answers
            )

        cost = spend(20)
        deadline = time.monotonic() + 5.0  # within a second on a quiet machine; CI is not one
        while True:
            _, token = http("GET", f"{base}/manage/tokens/{issued['id']}", token=management)
            if round(token["spent_usd"] * 1e9) == cost or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert round(token["spent_usd"] * 1e9) == cost, token
        cost += spend(20)
    finally:
        code = server.stop(timeout=10)
    assert code == 0, server.process.stderr[-3000:]
    (database,) = (tmp_path / "data").glob("*.db")
    with contextlib.closing(sqlite3.connect(database)) as db:
        (spent,) = db.execute(
            "SELECT spent_nanousd FROM tokens WHERE id = ?", (issued["id"],)
        ).fetchone()
    assert spent == cost


def test_on_redis_each_workers_spool_is_replayed_whole_after_an_outage(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    redis = RedisServer(tmp_path / "redis", durable=True)  # the stream survives its restart
    redis.start()
    # A dispatcher service that reads nothing yet: the stream keeps every event for it (what
    # every group has acknowledged is trimmed), so the stream shows what was published.
    Redis.from_url(redis.url).xgroup_create("llm-proxy:events", "later", id="0", mkstream=True)
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(
        tmp_path / "data",
        config,
        tmp_path,
        WORKERS="2",
        LLM_PROXY_EVENT_BUS="redis",
        REDIS_URL=redis.url,
    )
    try:
        wait_for_workers(server, 2)
        token = server.issue_token()
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            senders = [pool.submit(_send_until, server, token, stop) for _ in range(4)]
            time.sleep(1)
            redis.stop()
            time.sleep(4)  # both workers' events processes spool
            redis.start()
            time.sleep(4)  # and replay, under traffic
            stop.set()
            sent = sum(sender.result() for sender in senders)
        client = Redis.from_url(redis.url)
        deadline = time.monotonic() + 30
        while (count := len(_stream_requests(client))) < sent:
            assert time.monotonic() < deadline, (count, sent)
            time.sleep(0.2)
        assert count == sent
        # The events processes report their counters every second.
        while not (sums := scrape(server)).get("llm_proxy_events_spooled_total"):
            assert time.monotonic() < deadline, "no events spooled"
            time.sleep(0.2)
        assert sums.get("llm_proxy_events_dropped_total", 0) == 0
        assert "spool_malformed" not in server.process.stderr
    finally:
        code = server.stop(timeout=15)
        redis.stop()
    assert code == 0, server.process.stderr[-3000:]
    spools = sorted(p.name for p in (tmp_path / "data").glob("events-spool*.jsonl"))
    assert spools == ["events-spool-1.jsonl", "events-spool.jsonl"]


def _send_until(server: ServerProcess, token: str, stop: threading.Event) -> int:
    """Proxied requests, each on a new connection, until ``stop``; how many were answered."""
    sent = 0
    while not stop.is_set():
        assert http("GET", f"{server.base_url}/v1/models", token=token)[0] == 200
        sent += 1
    return sent


def _stream_requests(client: Redis) -> set[str]:
    entries = client.xrange("llm-proxy:events")
    return {json.loads(fields[b"e"])["request_id"] for _, fields in entries}


def test_workers_writing_one_event_log_never_cut_each_others_lines(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    # Both workers' file dispatchers append to one log; the file size limit makes their writes
    # fail part-way, as a full disk does, and each cuts its part-written batch.
    log = tmp_path / "events.jsonl"
    limit = 4 * 1024 * 1024
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    port = free_port()
    variables = {
        "DATA_DIR": str(tmp_path / "data"),
        "LISTEN_ADDR": f"127.0.0.1:{port}",
        "API_CONFIG_PATH": str(config),
        "LOG_FORMAT": "json",
        "WORKERS": "2",
        "FILE_EVENT_LOG": str(log),
    }
    process = spawn(
        ["prlimit", f"--fsize={limit}", *cli_command("server")],
        clean_env(**variables),
        tmp_path,
        "server",
    )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", tmp_path / "data")
    try:
        process.wait_for(f"{server.base_url}/health")
        wait_for_workers(server, 2)
        token = server.issue_token()
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 16384}]}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(
                pool.map(
                    lambda _: http(
                        "POST", f"{server.base_url}/v1/chat/completions", token=token, body=body
                    )[0],
                    range(400),
                )
            )
        assert statuses == [200] * 400
        # Until the log is full and holds still.
        deadline = time.monotonic() + 30
        size, steady = -1, 0
        while steady < 3:
            assert time.monotonic() < deadline, size
            time.sleep(1)
            now = log.stat().st_size
            steady = steady + 1 if now == size and now > limit // 2 else 0
            size = now
    finally:
        server.stop(timeout=15)
    # What each dispatcher wrote, by its own count, is still there.
    stopped = log_events(server, "dispatcher.stopped")
    delivered = sum(line["delivered"] for line in stopped if line["service"] == "file")
    written = [json.loads(line)["request_id"] for line in log.read_bytes().splitlines()]
    assert len(set(written)) == len(written) == delivered > 0


def test_workers_end_when_the_supervisor_is_killed_and_their_stderr_is_gone(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    """Whatever read the shared stderr (a terminal, a log shipper) may go with the supervisor: a
    log line into that closed pipe must not keep the workers from stopping."""
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    port = free_port()
    stdout_path = tmp_path / "server.stdout"
    out = stdout_path.open("wb")
    popen = subprocess.Popen(
        cli_command("server"),
        env=clean_env(
            DATA_DIR=str(tmp_path / "data"),
            LISTEN_ADDR=f"127.0.0.1:{port}",
            API_CONFIG_PATH=str(config),
            LOG_FORMAT="json",
            WORKERS="2",
        ),
        stdout=out,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert popen.stderr is not None
    # The log lines go to the pipe; the file only stands in for Process's own.
    server = ServerProcess(
        Process(popen, stdout_path, tmp_path / "no-stderr", [out]),
        f"http://127.0.0.1:{port}",
        tmp_path / "data",
    )
    (tmp_path / "no-stderr").write_text("")
    left_behind: list[int] = []
    try:
        server.process.wait_for(f"{server.base_url}/health")
        wait_for_workers(server, 2)
        workers = worker_pids(server)
        events_processes = [pid for worker in workers for pid in children(worker)]
        assert len(workers) == 2 and len(events_processes) == 2
        left_behind = workers + events_processes

        popen.stderr.close()
        popen.kill()
        popen.wait()
        deadline = time.monotonic() + 15
        while not all(has_exited(pid) for pid in left_behind):
            assert time.monotonic() < deadline, [p for p in left_behind if not has_exited(p)]
            time.sleep(0.05)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), 1)
    finally:
        server.stop()
        for pid in left_behind:
            if not has_exited(pid):
                os.kill(pid, signal.SIGKILL)


def counter_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of every counter and histogram on the page, by name and label set."""
    samples = {}
    for family in text_string_to_metric_families(text):
        if family.type not in {"counter", "histogram"}:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_no_counter_goes_back_between_scrapes_while_workers_serve_die_and_come_back(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    """50 scrapes on new connections (so on any worker) while requests keep coming, one worker
    killed after the 15th: every counter and histogram series only ever grows, none vanishes."""
    config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
    server = start_server(tmp_path / "data", config, tmp_path, WORKERS="3")
    stop = threading.Event()
    try:
        wait_for_workers(server, 3)
        token = server.issue_token()

        def traffic() -> None:
            while not stop.is_set():
                # A request the killed worker had taken is reset: what SIGKILL does, not a fault.
                with contextlib.suppress(ConnectionError):
                    http("GET", f"{server.base_url}/v1/models", token=token)
                    http("GET", f"{server.base_url}/v1/models", token="sk-" + "x" * 43)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = [pool.submit(traffic) for _ in range(2)]
            previous: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for n in range(50):
                if n == 15:
                    killed = worker_pids(server)[0]
                    os.kill(killed, signal.SIGKILL)
                    while not has_exited(killed):  # its queued connections are reset, not served
                        time.sleep(0.01)
                with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=5) as response:
                    current = counter_samples(response.read().decode())
                gone = set(previous) - set(current)
                assert not gone, f"scrape {n}: series vanished: {sorted(gone)[:5]}"
                back = {
                    key: (previous[key], value)
                    for key, value in current.items()
                    if key in previous and value < previous[key]
                }
                assert not back, f"scrape {n}: counters went back: {back}"
                previous = current
                time.sleep(0.05)
            stop.set()
            for result in running:
                result.result()
        assert previous[("llm_proxy_worker_restarts_total", ())] == 1
    finally:
        stop.set()
        code = server.stop(timeout=10)
    assert code == 0, server.process.stderr[-3000:]
