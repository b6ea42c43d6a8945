"""What the README names against what the product has: every variable a command reads, every
metric family the server's ``/metrics`` and a dispatcher's ``--metrics-port`` serve, and every
refusal a client can get on the proxy path, so that an operator looking one up finds it."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_proxy import errors
from llm_proxy.proxy.api_config import PROVIDER_KEYS, TIMEOUT_KEYS, TOP_LEVEL_KEYS
from llm_proxy.runtime.cli import main
from tests.events.events_support import RedisServer
from tests.processes import clean_env, cli_command, free_port, spawn, start_server, write_api_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLE_ENV = (ROOT / "config" / "example.env").read_text()
API_PROVIDERS = (ROOT / "config" / "api_providers.yaml").read_text()

# Refusals of the management API alone (its own section and OpenAPI document list them), by
# (status, code): the README's client table is the proxy path's.
MANAGEMENT_ONLY = {
    (401, "unauthorized"),
    (404, "project_not_found"),
    (404, "token_not_found"),
    (404, "not_found"),
    (400, "invalid_request"),
    (400, "invalid_json"),
    (400, "invalid_body"),
    (400, "invalid_field"),
}


def commands(group: click.Group) -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        yield name, command
        if isinstance(command, click.Group):
            yield from ((f"{name} {sub}", c) for sub, c in commands(command))


def variables_of(param: click.Parameter) -> list[str]:
    envvar = param.envvar
    return [envvar] if isinstance(envvar, str) else list(envvar or [])


def variables(command: click.Command) -> set[str]:
    return {variable for param in command.params for variable in variables_of(param)}


def named(name: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text) is not None


def test_every_variable_a_command_reads_is_named_in_the_readme() -> None:
    missing = {
        f"{variable} ({name})"
        for name, command in commands(main)
        for variable in variables(command)
        if not named(variable, README)
    }
    assert not missing, f"README never names: {sorted(missing)}"


def test_every_server_setting_has_the_flag_example_env_promises() -> None:
    # example.env: "Each is also a command-line flag (e.g. LISTEN_ADDR → --listen-addr)".
    missing = [
        f"{variable} → {flag}"
        for param in main.commands["server"].params
        if isinstance(param, click.Option)
        for variable in variables_of(param)
        if variable.isupper()
        and (flag := "--" + variable.lower().replace("_", "-")) not in param.opts
    ]
    assert not missing, f"llm-proxy server has no flag: {missing}"


def mentioned(command: str) -> bool:
    """``llm-proxy manage token update`` is named as such, or in a list of its group's commands
    (``token generate|list|get|update|revoke``)."""
    *group, name = command.split()
    pattern = rf"{re.escape(' '.join(group))} (?:[a-z-]+\|)*{re.escape(name)}(?![a-z-])"
    return re.search(pattern, README) is not None


def test_every_command_is_named_in_the_readme() -> None:
    missing = [
        f"llm-proxy {name}" for name, _ in commands(main) if not mentioned(f"llm-proxy {name}")
    ]
    assert not missing, f"README never names: {missing}"


def test_every_server_setting_is_listed_in_example_env() -> None:
    listed = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", EXAMPLE_ENV, re.MULTILINE))
    server = main.commands["server"]
    # The lower-case proxy variables are curl's spellings of the upper-case ones listed there.
    missing = {v for v in variables(server) if v.isupper() and v not in listed}
    assert not missing, f"config/example.env does not list: {sorted(missing)}"


def test_every_key_of_api_providers_yaml_is_shown_in_the_shipped_file() -> None:
    # The README sends operators to config/api_providers.yaml for its keys.
    keys = {*TOP_LEVEL_KEYS, *PROVIDER_KEYS, *TIMEOUT_KEYS}
    missing = {key for key in keys if not re.search(rf"\b{key}:", API_PROVIDERS)}
    assert not missing, f"config/api_providers.yaml never shows: {sorted(missing)}"


def client_table() -> set[tuple[int, str]]:
    """The (status, code) rows of the README's "What a client sees" table."""
    table = README.split("| situation | status | `code` |", 1)[1].split("\n\n", 1)[0]
    return {
        (int(status), code) for status, code in re.findall(r"\| (\d{3}) \| `([a-z_]+)` \|", table)
    }


def test_every_refusal_of_the_proxy_path_is_in_the_readme_table() -> None:
    refusals = {
        (cls.status, cls.code)
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, errors.ProxyError)
        and cls not in (errors.ProxyError, errors.UpstreamError)
    }
    missing = refusals - MANAGEMENT_ONLY - client_table()
    assert not missing, f"the README's client table lacks: {sorted(missing)}"


@pytest.fixture
def metrics_page(tmp_path: Path) -> Iterator[str]:
    api_config = write_api_config(tmp_path / "api.yaml", "http://127.0.0.1:9")
    server = start_server(tmp_path / "data", api_config, tmp_path)
    try:
        with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as response:
            yield response.read().decode()
    finally:
        server.stop()


def served_families(page: str) -> set[str]:
    """The ``llm_proxy_`` families of a ``/metrics`` page, a counter by its ``_total`` name."""
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(page)
        if family.name.startswith("llm_proxy_")
    }


@pytest.mark.process
def test_every_family_on_the_metrics_page_is_named_in_the_readme(metrics_page: str) -> None:
    served = served_families(metrics_page)
    assert "llm_proxy_requests_total" in served
    missing = {name for name in served if not named(name, README)}
    assert not missing, f"README never names: {sorted(missing)}"


@pytest.mark.process
def test_every_family_on_a_dispatchers_metrics_page_is_named_in_the_readme(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # The README: the page of `llm-proxy dispatcher --metrics-port` has "the same families the
    # server shows". It also served each counter's and histogram's creation time as a gauge of
    # its own (llm_proxy_dispatcher_delivered_created, …), which the server's page leaves off.
    port = free_port()
    env = clean_env(
        REDIS_URL=redis_server.url,
        DATA_DIR=str(tmp_path),
        LLM_PROXY_DISPATCHER_METRICS_PORT=str(port),
    )
    dispatcher = spawn(cli_command("dispatcher", "--service", "file"), env, tmp_path, "dispatcher")
    try:
        dispatcher.wait_for(f"http://127.0.0.1:{port}/health")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            page = response.read().decode()
    finally:
        dispatcher.stop()
    served = served_families(page)
    assert "llm_proxy_dispatcher_delivered_total" in served
    missing = {name for name in served if not named(name, README)}
    assert not missing, f"README never names: {sorted(missing)}"


def example_env() -> dict[str, str]:
    """config/example.env as ``docker run --env-file`` or ``set -a; . config/example.env`` reads it."""
    pairs = (line.split("=", 1) for line in EXAMPLE_ENV.splitlines() if re.match(r"[A-Z]", line))
    return {name: value for name, value in pairs}


@pytest.mark.process
def test_example_env_as_the_environment_keeps_the_database_under_data_dir(tmp_path: Path) -> None:
    # It set DATABASE_URL=sqlite:///./data/llm-proxy.db: with a DATA_DIR of one's own, the
    # database still went to ./data, beside the secrets of no instance.
    api_config = write_api_config(tmp_path / "api.yaml", "http://127.0.0.1:9")
    data_dir = tmp_path / "instance"
    env = {
        **example_env(),
        "DATA_DIR": str(data_dir),
        "LISTEN_ADDR": f"127.0.0.1:{free_port()}",
        "API_CONFIG_PATH": str(api_config),
        "PRICES_PATH": str(ROOT / "config" / "prices.yaml"),
        "LOG_FORMAT": "json",
    }
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    server = spawn(cli_command("server"), clean_env(**env), tmp_path, "server", cwd=workdir)
    try:
        server.wait_for(f"http://{env['LISTEN_ADDR']}/health")
    finally:
        server.stop()
    assert (data_dir / "llm-proxy.db").exists()
    assert not (workdir / "data").exists()


def readme_banner() -> list[str]:
    """The first-start banner as the README's Set-up shows it."""
    after = README.split("printed **once**", 1)[1].split("```\n", 1)[1]
    return after.split("```", 1)[0].strip("\n").splitlines()


@pytest.mark.process
def test_the_first_start_prints_the_banner_the_readme_shows(tmp_path: Path) -> None:
    api_config = write_api_config(tmp_path / "api.yaml", "http://127.0.0.1:9")
    data_dir = tmp_path / "data"
    server = start_server(data_dir, api_config, tmp_path)
    server.stop()
    printed = server.process.stdout.strip("\n").replace(str(data_dir.absolute()), "/srv/llm-proxy")
    printed = re.sub(r"MANAGEMENT_TOKEN=\S+", "MANAGEMENT_TOKEN=mgmt-…", printed)
    printed = re.sub(r"ADMIN_PASSWORD=\S+", "ADMIN_PASSWORD=…", printed)
    assert printed.splitlines() == readme_banner()
