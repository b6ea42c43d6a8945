"""PRICES_PATH in a real ``llm-proxy server``: checked at start, reloaded on SIGHUP by the server
and its events process, and the events' cost and the metrics follow."""

from __future__ import annotations

import json
import secrets
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import (
    MockUpstream,
    ServerProcess,
    clean_env,
    cli_command,
    free_port,
    http,
    run,
    spawn,
    start_mock_upstream,
    start_server,
    write_api_config,
)

pytestmark = pytest.mark.process

UPSTREAM_KEY = "upstream-" + secrets.token_hex(20)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}]}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path_factory.mktemp("mock"), api_key=UPSTREAM_KEY)
    yield mock
    mock.process.stop()


@pytest.fixture
def api_config(tmp_path: Path, upstream: MockUpstream) -> Path:
    return write_api_config(tmp_path / "api_providers.yaml", upstream.base_url)


def _wait(condition: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _logged(server: ServerProcess, event: str) -> int:
    text = server.process.stderr
    lines = text[: text.rfind("\n") + 1].splitlines()  # whole lines: the server is still writing
    return sum(1 for line in lines if line.startswith("{") and json.loads(line)["event"] == event)


def _events(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    # Whole lines only: polled while the events process appends, the last may still be arriving.
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def _cost_metric(server: ServerProcess, model: str) -> float:
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_proxy_cost_usd_total" and sample.labels == {"model": model}:
                return float(sample.value)
    return 0.0


def _chat(server: ServerProcess, token: str, log: Path) -> dict[str, Any]:
    """One chat completion; its event, once written."""
    count = len(_events(log))
    status, body = http("POST", f"{server.base_url}/v1/chat/completions", token=token, body=CHAT)
    assert status == 200, body
    return _wait(lambda: _events(log)[count:], "the event")[0]  # type: ignore[no-any-return]


def _reload(server: ServerProcess, *logged: str) -> None:
    """SIGHUP, then wait until each of ``logged`` was logged once more."""
    before = {name: _logged(server, name) for name in logged}
    server.process.popen.send_signal(signal.SIGHUP)
    for name, count in before.items():
        _wait(lambda name=name, count=count: _logged(server, name) > count, name)


def test_sighup_reloads_the_prices_of_the_next_events_and_keeps_them_on_a_bad_file(
    tmp_path: Path, api_config: Path
) -> None:
    prices, log = tmp_path / "prices.yaml", tmp_path / "events.jsonl"
    prices.write_text("gpt-4o-mini*: {input: 1, output: 2}\n")
    server = start_server(
        tmp_path / "data",
        api_config,
        tmp_path / "logs",
        PRICES_PATH=str(prices),
        FILE_EVENT_LOG=str(log),
    )
    try:
        management = server.management_token
        issued = server.issue(UPSTREAM_KEY)
        token = issued["token"]

        first = _chat(server, token, log)
        prompt, completion = first["usage"]["prompt_tokens"], first["usage"]["completion_tokens"]
        # $1 / $2 per 1M tokens: 1,000 / 2,000 nano-dollars a token.
        assert first["cost_usd"] == (prompt * 1000 + completion * 2000) / 1e9

        prices.write_text("gpt-4o-mini*: {input: 10, output: 20}\n")
        _reload(server, "server.prices_reloaded", "events.prices_reloaded")
        second = _chat(server, token, log)
        assert second["usage"] == first["usage"]
        assert second["cost_usd"] == (prompt * 10_000 + completion * 20_000) / 1e9

        prices.write_text("gpt-4o-mini*: {input: ten}\n")
        # The server refuses it and keeps its prices; its events process is not asked to reload.
        _reload(server, "server.prices_reload_failed")
        third = _chat(server, token, log)
        assert third["cost_usd"] == second["cost_usd"]  # the prices in force stayed

        # The events process's metrics reach the server's page, labelled by the priced glob.
        spent = first["cost_usd"] + second["cost_usd"] + third["cost_usd"]
        _wait(
            lambda: abs(_cost_metric(server, "gpt-4o-mini*") - spent) < 1e-12,
            "llm_proxy_cost_usd_total on /metrics",
        )

        def token_cost() -> float:
            status, shown = http(
                "GET", f"{server.base_url}/manage/tokens/{issued['id']}", token=management
            )
            assert status == 200, shown
            return float(shown["usage"]["cost_usd"])

        # The usage aggregates are written by the events process after it publishes, in batches.
        _wait(lambda: token_cost() == round(spent, 9), "the token's usage cost_usd")
    finally:
        assert server.stop() == 0, server.process.stderr
    assert "Traceback" not in server.process.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "PRICES_PATH: cannot read {path}: no such file"),
        ("gpt-4o*: {inptu: 2.5}\n", "PRICES_PATH: {path}: gpt-4o*: unknown key 'inptu'"),
        ("gpt-4o*: {input: -2.5}\n", "PRICES_PATH: {path}: gpt-4o*: input: must be a finite"),
        (
            "gpt-4o*: {input: 1.0e+300, output: 2}\n",
            "PRICES_PATH: {path}: gpt-4o*: input: at most 1,000,000 USD per 1M tokens; got 1e+300",
        ),
        ("gpt-4o*: [\n  x: {\n", "PRICES_PATH: {path} is not valid YAML: "),
    ],
)
def test_a_bad_prices_file_stops_start_up_with_one_line_naming_prices_path(
    tmp_path: Path, api_config: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "prices.yaml"
    if content is not None:
        path.write_text(content)
    env = clean_env(
        DATA_DIR=str(tmp_path / "data"),
        LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        API_CONFIG_PATH=str(api_config),
        PRICES_PATH=str(path),
        LOG_FORMAT="json",
    )
    result = run(cli_command("server"), env)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llm-proxy: " + message.format(path=path)), lines[0]


def test_a_server_started_where_no_prices_file_is_says_so_at_start(
    tmp_path: Path, api_config: Path
) -> None:
    """PRICES_PATH left unset means config/prices.yaml under the working directory, which may
    hold none (a server started from elsewhere, a config directory mounted over the image's):
    every cost_usd is then null and every budgeted token refused as model_not_priced, which the
    operator learns at start, not from the first refusal."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    port = free_port()
    env = clean_env(
        DATA_DIR=str(tmp_path / "data"),
        LISTEN_ADDR=f"127.0.0.1:{port}",
        API_CONFIG_PATH=str(api_config),
        LOG_FORMAT="json",
    )
    server = spawn(cli_command("server"), env, tmp_path / "logs", "server", cwd=workdir)
    try:
        server.wait_for(f"http://127.0.0.1:{port}/health")
        warned = [json.loads(line) for line in server.stderr.splitlines() if "no_prices" in line]
    finally:
        assert server.stop() == 0, server.stderr
    assert [(w["event"], w["level"], w["path"]) for w in warned] == [
        ("server.no_prices", "warning", str(workdir / "config" / "prices.yaml"))
    ], server.stderr


def test_a_server_with_prices_does_not_warn_of_none(tmp_path: Path, api_config: Path) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("gpt-4o-mini*: {input: 1, output: 2}\n")
    server = start_server(tmp_path / "data", api_config, tmp_path / "logs", PRICES_PATH=str(prices))
    assert server.stop() == 0, server.process.stderr
    assert "no_prices" not in server.process.stderr


def test_under_workers_sighup_to_the_parent_reloads_every_worker(
    tmp_path: Path, api_config: Path
) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("gpt-4o-mini*: {input: 1, output: 2}\n")
    server = start_server(
        tmp_path / "data", api_config, tmp_path / "logs", PRICES_PATH=str(prices), WORKERS="2"
    )
    try:
        _wait(lambda: _logged(server, "server.listening") == 2, "both workers")
        _reload(server, "server.prices_reloaded", "events.prices_reloaded")
        _wait(lambda: _logged(server, "server.prices_reloaded") == 2, "a reload in each worker")
        _wait(lambda: _logged(server, "events.prices_reloaded") == 2, "each events process")
    finally:
        assert server.stop() == 0, server.process.stderr
