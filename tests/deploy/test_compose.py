"""docker-compose.yml: valid Compose, and the several-instance layout SPEC §11 and §12 describe.

No Docker engine runs here, so the file is validated against the Compose Specification's JSON
schema (as published by the compose-spec project, Apache-2.0, shipped inside the check-jsonschema
package) and its structure is asserted: two proxies sharing one set of secrets, each with its own
DATA_DIR, behind a load balancer that relays streams unbuffered, started after the migration.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dispatcher.cli import dispatcher_command
from llm_proxy.runtime.cli import main
from llm_proxy.runtime.settings import parse_seconds
from tests.deploy.stopping import AFTER_GRACE_SECONDS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROXIES = ("proxy-1", "proxy-2")
# The variables of SPEC §4 (the server's settings).
PRODUCT_VARIABLES = {
    "LISTEN_ADDR",
    "MANAGEMENT_TOKEN",
    "ADMIN_USER",
    "ADMIN_PASSWORD",
    "DATABASE_URL",
    "ENCRYPTION_KEY",
    "API_CONFIG_PATH",
    "LLM_PROXY_EVENT_BUS",
    "REDIS_URL",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "DATA_DIR",
    "MAX_REQUEST_BODY",
    "WORKERS",
    "PRICES_PATH",
    "REVOCATION_MAX_STALENESS",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "GRACEFUL_SHUTDOWN_TIMEOUT",  # (beyond §4: how long a stopping proxy lets streams finish)
    "FORWARDED_ALLOW_IPS",
}
SHARED_SECRETS = ("MANAGEMENT_TOKEN", "ENCRYPTION_KEY", "ADMIN_PASSWORD")


def compose_schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return dict(json.loads((vendored / "compose-spec.json").read_text()))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # YAML anchors and merge keys are resolved here as Compose resolves them.
    return dict(yaml.safe_load(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def required_variable(value: str) -> str:
    """The NAME of a ``${NAME:?message}`` value: Compose refuses to start while NAME is unset."""
    match = re.fullmatch(r"\$\{([A-Z_]+):\?[^}]+\}", value)
    assert match, f"{value!r} is not a required variable"
    return match.group(1)


def volume_target(volumes: list[str], target: str) -> str:
    sources = [v.split(":")[0] for v in volumes if v.split(":")[1] == target]
    assert len(sources) == 1, volumes
    return sources[0]


# --- the file is valid Compose --------------------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert compose_errors(compose) == []


def test_the_schema_check_catches_a_misspelt_key(compose: dict[str, Any]) -> None:
    """The validation above can fail: the schema refuses what Compose would refuse."""
    broken = copy.deepcopy(compose)
    broken["services"]["proxy-1"]["depends_onn"] = broken["services"]["proxy-1"].pop("depends_on")
    assert any("depends_onn" in error for error in compose_errors(broken))


def test_every_llm_proxy_service_runs_a_real_command(services: dict[str, Any]) -> None:
    ours = {name: s for name, s in services.items() if s.get("build") == "."}
    assert set(ours) == {"migrate", *PROXIES, "dispatcher"}
    assert len({s["image"] for s in ours.values()}) == 1
    for service in ours.values():
        assert service["command"][0] in main.commands


# --- PostgreSQL, Redis and the migration ----------------------------------------------------


def test_postgres_and_redis_report_health_and_keep_their_data(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    assert services["postgres"]["image"] == "postgres:16"
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["redis"]["image"].startswith("redis:")
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # Named volumes: the data outlives the containers.
    kept = {
        volume_target(services["postgres"]["volumes"], "/var/lib/postgresql/data"),
        volume_target(services["redis"]["volumes"], "/data"),
    }
    assert kept <= set(compose["volumes"])


def test_database_url_names_the_compose_postgres_and_its_password(
    services: dict[str, Any],
) -> None:
    env = services["proxy-1"]["environment"]
    match = re.fullmatch(
        r"postgresql://llmproxy:(\$\{[^}]+\})@postgres:5432/llmproxy", env["DATABASE_URL"]
    )
    assert match, env["DATABASE_URL"]
    postgres = services["postgres"]["environment"]
    assert required_variable(match.group(1)) == required_variable(postgres["POSTGRES_PASSWORD"])
    assert (postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]) == ("llmproxy", "llmproxy")


def test_migration_runs_once_before_any_proxy(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    # The image's HTTP health check would mark a one-shot job unhealthy.
    assert migrate["healthcheck"] == {"disable": True}
    # The same settings as the server: it migrates the database the proxies use.
    assert migrate["environment"] == services["proxy-1"]["environment"]
    for name in PROXIES:
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully"


# --- two proxies, one set of secrets, a DATA_DIR each ---------------------------------------


def test_two_proxies_run_the_server_on_postgres_and_the_redis_bus(services: dict[str, Any]) -> None:
    for name in PROXIES:
        proxy = services[name]
        assert proxy["command"] == ["server"]
        assert proxy["build"] == "."
        env = proxy["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["LLM_PROXY_EVENT_BUS"] == "redis"
        assert env["DATABASE_URL"].startswith("postgresql://")
        assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
        assert set(env) <= PRODUCT_VARIABLES, set(env) - PRODUCT_VARIABLES


def test_proxies_share_the_same_secrets_from_the_operators_env_file(
    services: dict[str, Any],
) -> None:
    first, second = (services[name]["environment"] for name in PROXIES)
    for secret in SHARED_SECRETS:
        # Required, never defaulted: an instance that generated its own would refuse the tokens
        # and misread the upstream keys of the other.
        assert required_variable(first[secret]) == secret
        assert first[secret] == second[secret]
    assert first["DATABASE_URL"] == second["DATABASE_URL"]


def test_each_proxy_has_its_own_data_dir_and_the_config_read_only(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    data_volumes = []
    for name in PROXIES:
        proxy = services[name]
        data_dir = proxy["environment"]["DATA_DIR"]
        data_volumes.append(volume_target(proxy["volumes"], data_dir))
        assert "./config:/app/config:ro" in proxy["volumes"]
        assert proxy["environment"]["API_CONFIG_PATH"] == "/app/config/api_providers.yaml"
        assert proxy["environment"]["PRICES_PATH"] == "/app/config/prices.yaml"
    assert len(set(data_volumes)) == len(PROXIES), data_volumes
    assert set(data_volumes) <= set(compose["volumes"])


def test_only_the_load_balancer_publishes_a_port(services: dict[str, Any]) -> None:
    published = [name for name, service in services.items() if service.get("ports")]
    assert published == ["lb"]


def test_proxies_record_the_client_nginx_forwards(services: dict[str, Any]) -> None:
    """Reachable through nginx alone (above), the proxies take every peer for it, and read
    the client from the X-Forwarded-For it appends to, not from what a client wrote."""
    for name in PROXIES:
        assert services[name]["environment"]["FORWARDED_ALLOW_IPS"] == "${FORWARDED_ALLOW_IPS:-*}"
    forwarded = directives(nginx_config(services), "proxy_set_header")
    assert "X-Forwarded-For $proxy_add_x_forwarded_for" in forwarded


# --- the load balancer ----------------------------------------------------------------------


def nginx_config(services: dict[str, Any]) -> str:
    source = volume_target(services["lb"]["volumes"], "/etc/nginx/conf.d/default.conf")
    text = (ROOT / source).read_text()
    return re.sub(r"#[^\n]*", "", text)


def directives(config: str, name: str) -> list[str]:
    return [value.strip() for value in re.findall(rf"^\s*{name}\s+([^;]*);", config, re.M)]


def test_load_balancer_routes_to_both_proxies(services: dict[str, Any]) -> None:
    config = nginx_config(services)
    upstream = re.search(r"upstream\s+(\w+)\s*\{([^}]*)\}", config)
    assert upstream, config
    servers = {line.split()[0] for line in directives(upstream.group(2), "server")}
    port = services["proxy-1"]["environment"]["LISTEN_ADDR"].rpartition(":")[2]
    assert servers == {f"{name}:{port}" for name in PROXIES}
    assert directives(config, "proxy_pass") == [f"http://{upstream.group(1)}"]
    for name in PROXIES:
        assert services["lb"]["depends_on"][name]["condition"] == "service_healthy"


def test_load_balancer_does_not_buffer_streams(services: dict[str, Any]) -> None:
    config = nginx_config(services)
    assert directives(config, "proxy_buffering") == ["off"]
    assert directives(config, "proxy_request_buffering") == ["off"]
    # Keep-alive to the instances needs HTTP/1.1 and no "Connection: close" passed on.
    assert directives(config, "proxy_http_version") == ["1.1"]
    assert 'Connection ""' in directives(config, "proxy_set_header")
    assert directives(config, "keepalive")
    # The proxy's own limit answers oversized bodies, in OpenAI's error shape.
    assert directives(config, "client_max_body_size") == ["0"]


def seconds(value: str) -> int:
    match = re.fullmatch(r"(\d+)([smh]?)", value)
    assert match, value
    number, unit = match.groups()
    return int(number) * {"": 1, "s": 1, "m": 60, "h": 3600}[unit]


def test_load_balancer_waits_longer_than_the_proxys_own_stream_timeouts(
    services: dict[str, Any],
) -> None:
    """A quiet stream is ended by the proxy (with its own error), never cut by nginx first."""
    providers = yaml.safe_load((ROOT / "config" / "api_providers.yaml").read_text())
    timeouts = providers["apis"]["openai"]["timeouts"]
    longest = max(seconds(timeouts["idle"]), seconds(timeouts["response_header"]))
    config = nginx_config(services)
    assert seconds(directives(config, "proxy_read_timeout")[0]) > longest
    assert seconds(directives(config, "proxy_send_timeout")[0]) > longest


def test_load_balancer_never_resends_a_request_that_reached_an_instance(
    services: dict[str, Any],
) -> None:
    # "timeout" or "non_idempotent" would let nginx send a request upstream a second time.
    (policy,) = directives(nginx_config(services), "proxy_next_upstream")
    assert policy.split() == ["error"]


def nginx_binary() -> str:
    # Unpacked into the virtualenv by `make services` (Debian's package would start a daemon).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("nginx", path=path)
    if found is None:
        pytest.fail("nginx is not installed: run `make services` (scripts/ensure-services.sh)")
    return found


def nginx_test(site: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on SITE included as the nginx image includes conf.d/default.conf."""
    (directory / "site.conf").write_text(site)
    # Every path nginx would touch is under DIRECTORY, not /var/lib/nginx or /run.
    temp_paths = "".join(
        f"    {kind}_temp_path {directory / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (directory / "nginx.conf").write_text(
        f"pid {directory / 'nginx.pid'};\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n{temp_paths}    access_log off;\n    include {directory / 'site.conf'};\n}}\n"
    )
    return subprocess.run(
        [nginx_binary(), "-t", "-p", str(directory), "-c", str(directory / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.process
def test_nginx_accepts_the_load_balancer_configuration(
    services: dict[str, Any], tmp_path: Path
) -> None:
    source = volume_target(services["lb"]["volumes"], "/etc/nginx/conf.d/default.conf")
    site = (ROOT / source).read_text()
    # nginx resolves upstream names while it reads the file; the compose network's names do not
    # exist here, and that they are the right ones is asserted above.
    for name in PROXIES:
        site = site.replace(f"server {name}:", "server 127.0.0.1:")
    result = nginx_test(site, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    # The same check refuses a configuration nginx would refuse.
    broken = nginx_test(site.replace("proxy_buffering off", "proxy_buffering maybe"), tmp_path)
    assert broken.returncode != 0
    assert "proxy_buffering" in broken.stderr


# --- the dispatcher -------------------------------------------------------------------------


def test_dispatcher_drains_the_redis_bus_with_real_options(services: dict[str, Any]) -> None:
    dispatcher = services["dispatcher"]
    command = dispatcher["command"]
    assert command[:3] == ["dispatcher", "--service", "file"]
    known = {flag for param in dispatcher_command.params for flag in param.opts}
    flags = [arg for arg in command[1:] if arg.startswith("--")]
    assert set(flags) <= known, set(flags) - known
    env = dispatcher["environment"]
    assert env["LLM_PROXY_EVENT_BUS"] == "redis"
    assert env["REDIS_URL"] == services["proxy-1"]["environment"]["REDIS_URL"]
    assert dispatcher["depends_on"]["redis"]["condition"] == "service_healthy"
    assert dispatcher["healthcheck"]["test"] == [
        "CMD",
        "llm-proxy",
        "dispatcher",
        "check",
        "--service",
        "file",
    ]
    # It writes events to a volume of its own, not into an instance's DATA_DIR.
    own = volume_target(dispatcher["volumes"], env["DATA_DIR"])
    for name in PROXIES:
        assert own != volume_target(services[name]["volumes"], "/app/data")


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"{duration!r} is not a number of seconds"
    return float(match.group(1))


def test_docker_gives_a_stopping_proxy_and_dispatcher_the_time_the_helm_chart_does(
    services: dict[str, Any],
) -> None:
    """Docker sends SIGKILL 10 s after SIGTERM unless told otherwise: exactly when a stopping
    proxy cuts the streams still open and writes their events and usage, and when a stopping
    dispatcher's drain (10 s) ends. The Helm chart gives each pod longer; so must compose."""
    chart = yaml.safe_load((ROOT / "deploy/helm/llm-proxy/values.yaml").read_text())
    proxy_grace = chart["proxy"]["terminationGracePeriodSeconds"]
    dispatcher = (ROOT / "deploy/helm/llm-proxy/templates/deployment-dispatcher.yaml").read_text()
    dispatcher_grace = int(re.findall(r"terminationGracePeriodSeconds: (\d+)", dispatcher)[0])
    for name in ("proxy-1", "proxy-2"):
        assert _seconds(services[name].get("stop_grace_period", "10s")) >= proxy_grace, name
    assert _seconds(services["dispatcher"].get("stop_grace_period", "10s")) >= dispatcher_grace


def test_a_stopping_proxy_lets_streams_finish_then_writes_their_events_before_the_kill(
    services: dict[str, Any],
) -> None:
    """Docker sends SIGKILL stop_grace_period after SIGTERM: the server's grace for streams, and
    the time to write their events and usage after it, must fit in it."""
    for name in PROXIES:
        grace = parse_seconds("", services[name]["environment"]["GRACEFUL_SHUTDOWN_TIMEOUT"])
        assert grace > 10, name  # longer than the server's own default, which cut many streams
        assert _seconds(services[name]["stop_grace_period"]) >= grace + AFTER_GRACE_SECONDS, name
