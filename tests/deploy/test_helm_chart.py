"""The Helm chart under deploy/helm/llm-proxy, rendered by a real ``helm`` and checked offline.

Every rendered manifest is validated against the Kubernetes API schemas of the oldest version the
chart supports and of the newest one bundled with kubernetes-validate, strictly (an unknown field
is an error, as it is to a server applying it). Then the tests assert what an operator relies on.
``helm`` comes from ``make services`` (scripts/ensure-services.sh puts it in the virtualenv).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llm_proxy.runtime.cli import main
from llm_proxy.runtime.settings import parse_seconds
from llm_proxy.store import postgres_migrations
from tests.deploy.stopping import AFTER_GRACE_SECONDS
from tests.events.events_support import RedisServer
from tests.processes import cli_command, free_port, http, run, run_start_that_fails, spawn

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "llm-proxy"
# Chart.yaml's kubeVersion floor, and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
RELEASE = "demo"
Helm = Callable[..., subprocess.CompletedProcess[str]]

# Values distinctive enough that finding one in a manifest means it leaked there.
MANAGEMENT_TOKEN = "mgmt-chart-test-q8Zr2LwT"
ENCRYPTION_KEY = base64.b64encode(bytes(range(32))).decode()
ADMIN_PASSWORD = "admin-chart-test-Vn4kP0sY"
DATABASE_URL = "postgresql://llmproxy:pg-chart-test-J7tX@db.internal:5432/llmproxy"
REDIS_URL = "redis://:redis-chart-test-H3mQ@redis.internal:6379/0"
PRICES = "gpt-4o-mini: {input_per_1m: 0.15, output_per_1m: 0.6}\n"

# A release that changes what can be changed: its own port, replicas, images, files, secrets given
# inline, another dispatcher backend with a persistent claim.
CUSTOM_VALUES: dict[str, Any] = {
    "fullnameOverride": "gateway",
    "image": {"repository": "registry.example/llm-proxy", "tag": "1.2.3", "pullPolicy": "Always"},
    "secrets": {
        "managementToken": MANAGEMENT_TOKEN,
        "encryptionKey": ENCRYPTION_KEY,
        "adminPassword": ADMIN_PASSWORD,
        "databaseUrl": DATABASE_URL,
        "redisUrl": REDIS_URL,
    },
    "adminUser": "ops",
    "config": {
        "files": {
            "api_providers.yaml": (ROOT / "config" / "api_providers.yaml").read_text(),
            "prices.yaml": PRICES,
        }
    },
    "proxy": {
        "replicaCount": 3,
        "port": 9090,
        "workers": 4,
        "revocationMaxStaleness": "2s",
        "forwardedAllowIps": "10.0.0.0/8",
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://egress.internal:3128"}],
        "podDisruptionBudget": {"minAvailable": 2},
    },
    "service": {"port": 8000},
    "dispatcher": {
        "service": "helicone",
        "extraArgs": ["--batch-size", "50"],
        "extraEnv": [
            {
                "name": "HELICONE_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": "helicone", "key": "api-key"}},
            }
        ],
        "persistence": {"existingClaim": "llm-proxy-events"},
    },
}


def helm_binary() -> str:
    # The virtualenv's bin first: that is where `make services` installs it.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("helm", path=path)
    if found is None:
        pytest.fail("helm is not installed: run `make services` (scripts/ensure-services.sh)")
    return found


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Run ``helm ARGS…``; returns the completed process (stdout, stderr, returncode)."""
    binary = helm_binary()
    home = tmp_path_factory.mktemp("helm-home")
    # Its own cache and configuration, and no cluster: nothing of the developer's is read.
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": os.devnull,
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )

    return run


def values_file(directory: Path, values: dict[str, Any]) -> Path:
    path = directory / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(helm: Helm, *args: str) -> list[dict[str, Any]]:
    result = helm("template", RELEASE, str(CHART), "--namespace", "llm", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def default_release(helm: Helm) -> list[dict[str, Any]]:
    """The chart's defaults, with the one thing they cannot hold: where the secrets are."""
    return render(helm, "--set", "secrets.existingSecret=llm-proxy-secrets")


@pytest.fixture(scope="module")
def custom_release(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(helm, "-f", str(values_file(tmp_path_factory.mktemp("custom"), CUSTOM_VALUES)))


def only(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for doc in docs
        if doc["kind"] == kind
        and (
            component is None
            or doc["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
    ]
    assert len(found) == 1, f"{len(found)} {kind} ({component}) rendered"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(doc["kind"] for doc in docs)


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(workload: dict[str, Any]) -> dict[str, Any]:
    """Each variable's value, or its ``valueFrom`` source."""
    return {
        item["name"]: item.get("value", item.get("valueFrom"))
        for item in container(workload).get("env", [])
    }


def secret_ref(source: Any) -> tuple[str, str]:
    ref = source["secretKeyRef"]
    return ref["name"], ref["key"]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- every manifest is valid Kubernetes -----------------------------------------------------


@pytest.mark.parametrize("release", ["default_release", "custom_release"])
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_rendered_manifest_is_valid_for_kubernetes(
    release: str, kube_version: str, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(release)
    assert docs
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} is not valid for Kubernetes {kube_version}: {exc.message}")


def test_the_release_is_a_proxy_deployment_with_service_migration_dispatcher_and_pdb(
    default_release: list[dict[str, Any]], custom_release: list[dict[str, Any]]
) -> None:
    # With existingSecret the operator's Secret is used, and the chart renders none of its own.
    assert kinds(default_release) == [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "Service",
    ]
    assert kinds(custom_release) == sorted([*kinds(default_release), "Secret"])


@pytest.mark.parametrize("release", ["default_release", "custom_release"])
def test_every_container_runs_a_real_llm_proxy_command(
    release: str, request: pytest.FixtureRequest
) -> None:
    workloads = [d for d in request.getfixturevalue(release) if d["kind"] in ("Deployment", "Job")]
    commands = sorted(container(workload)["args"][0] for workload in workloads)
    assert commands == ["dispatcher", "migrate", "server"]
    assert set(commands) <= set(main.commands)


def test_helm_lint_passes_strictly(helm: Helm, tmp_path: Path) -> None:
    result = helm("lint", "--strict", str(CHART), "-f", str(values_file(tmp_path, CUSTOM_VALUES)))
    assert result.returncode == 0, result.stdout + result.stderr


# --- the proxy: port, probes, environment ---------------------------------------------------


@pytest.mark.parametrize(
    ("release", "port", "service_port"),
    [("default_release", 8080, 80), ("custom_release", 9090, 8000)],
)
def test_probes_and_service_follow_the_configured_port(
    release: str, port: int, service_port: int, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(release)
    proxy = container(only(docs, "Deployment", "proxy"))
    assert proxy["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert env_of(only(docs, "Deployment", "proxy"))["LISTEN_ADDR"] == f"0.0.0.0:{port}"
    # Liveness asks whether the process answers; readiness whether it can admit requests.
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    service = only(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": service_port, "targetPort": "http", "protocol": "TCP"}
    ]


def test_a_pod_that_migrates_at_start_is_not_killed_before_its_migration_may_end(
    helm: Helm,
) -> None:
    """With migration.enabled false each new pod migrates at start, before it listens (and the
    others wait for it): liveness killed one after its 3 failures (35 s), rolling back a longer
    migration to start it over in the next pod, a rollout that never ended. Liveness now waits for
    a startup probe allowing as long as an instance waits for a migration."""
    docs = render(helm, "--set", "secrets.existingSecret=s", "--set", "migration.enabled=false")
    proxy = container(only(docs, "Deployment", "proxy"))
    startup = proxy["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    allowed = startup["periodSeconds"] * startup["failureThreshold"]
    assert allowed >= postgres_migrations.MIGRATION_TIMEOUT


def test_probe_paths_are_values(helm: Helm) -> None:
    docs = render(
        helm,
        "--set",
        "secrets.existingSecret=s",
        "--set",
        "proxy.livenessProbe.path=/health?deep=0",
        "--set",
        "proxy.readinessProbe.path=/ready?from=lb",
    )
    proxy = container(only(docs, "Deployment", "proxy"))
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/health?deep=0"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/ready?from=lb"


def test_proxy_environment_uses_the_products_variables(
    custom_release: list[dict[str, Any]],
) -> None:
    env = env_of(only(custom_release, "Deployment", "proxy"))
    assert env["DATA_DIR"] == "/app/data"
    assert env["API_CONFIG_PATH"] == "/app/config/api_providers.yaml"
    assert env["PRICES_PATH"] == "/app/config/prices.yaml"
    assert env["LLM_PROXY_EVENT_BUS"] == "redis"
    assert env["WORKERS"] == "4"
    assert env["REVOCATION_MAX_STALENESS"] == "2s"
    assert env["FORWARDED_ALLOW_IPS"] == "10.0.0.0/8"
    assert env["ADMIN_USER"] == "ops"
    assert env["HTTPS_PROXY"] == "http://egress.internal:3128"
    for name in ("DATABASE_URL", "REDIS_URL", "MANAGEMENT_TOKEN", "ENCRYPTION_KEY"):
        assert secret_ref(env[name]) == ("gateway", name)
    assert secret_ref(env["ADMIN_PASSWORD"]) == ("gateway", "ADMIN_PASSWORD")


def config_seen_by_the_proxy(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The files the proxy container finds under /app/config, path to content: the image's (the
    Dockerfile copies the repository's config/ there), with the ConfigMap's mounts over them."""
    deployment = only(docs, "Deployment", "proxy")
    config_map = only(docs, "ConfigMap")
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("configMap"))
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    seen = {f"/app/config/{path.name}": path.read_text() for path in (ROOT / "config").iterdir()}
    for mount in container(deployment)["volumeMounts"]:
        if mount["name"] != volume["name"]:
            continue
        assert mount.get("readOnly") is True
        if "subPath" in mount:
            seen[mount["mountPath"]] = config_map["data"][mount["subPath"]]
        else:
            # A whole-volume mount hides everything the image had in that directory.
            directory = mount["mountPath"].rstrip("/")
            seen = {path: text for path, text in seen.items() if not path.startswith(directory)}
            seen.update({f"{directory}/{key}": text for key, text in config_map["data"].items()})
    return seen


def test_default_release_prices_with_the_images_prices_file(
    default_release: list[dict[str, Any]],
) -> None:
    # Without prices every budgeted token is refused (model_not_priced) and cost_usd is null.
    env = env_of(only(default_release, "Deployment", "proxy"))
    seen = config_seen_by_the_proxy(default_release)
    assert env["PRICES_PATH"] in seen
    assert seen[env["PRICES_PATH"]] == (ROOT / "config" / "prices.yaml").read_text()
    # From the ConfigMap (SPEC §12), where an operator sees and edits it, not only from the image.
    shipped = only(default_release, "ConfigMap")["data"]
    assert shipped["prices.yaml"] == (ROOT / "config" / "prices.yaml").read_text()
    assert yaml.safe_load(seen[env["API_CONFIG_PATH"]]) == yaml.safe_load(
        (ROOT / "config" / "api_providers.yaml").read_text()
    )


def test_the_charts_prices_are_the_repositorys() -> None:
    chart_copy = ROOT / "deploy" / "helm" / "llm-proxy" / "files" / "prices.yaml"
    assert chart_copy.read_text() == (ROOT / "config" / "prices.yaml").read_text(), (
        "copy config/prices.yaml to deploy/helm/llm-proxy/files/prices.yaml"
    )


def test_config_files_given_in_the_values_are_the_ones_the_variables_point_to(
    custom_release: list[dict[str, Any]],
) -> None:
    env = env_of(only(custom_release, "Deployment", "proxy"))
    seen = config_seen_by_the_proxy(custom_release)
    assert seen[env["PRICES_PATH"]] == PRICES
    assert seen[env["API_CONFIG_PATH"]] == CUSTOM_VALUES["config"]["files"]["api_providers.yaml"]
    assert only(custom_release, "ConfigMap")["data"] == CUSTOM_VALUES["config"]["files"]


def test_default_api_config_is_the_repositorys(default_release: list[dict[str, Any]]) -> None:
    """The chart's default allowlist is config/api_providers.yaml's, not a copy drifting apart."""
    shipped = yaml.safe_load((ROOT / "config" / "api_providers.yaml").read_text())
    rendered = only(default_release, "ConfigMap")["data"]["api_providers.yaml"]
    assert yaml.safe_load(rendered) == shipped


def test_changed_config_rolls_the_proxy_pods(helm: Helm, tmp_path: Path) -> None:
    def checksum(providers: str) -> str:
        values = {"secrets": {"existingSecret": "s"}, "config": {"files": {}}}
        values["config"]["files"]["api_providers.yaml"] = providers
        docs = render(helm, "-f", str(values_file(tmp_path, values)))
        template = only(docs, "Deployment", "proxy")["spec"]["template"]
        return str(template["metadata"]["annotations"]["checksum/config"])

    assert checksum("default_api: a\n") != checksum("default_api: b\n")


# --- secrets --------------------------------------------------------------------------------


def test_secret_holds_every_shared_secret(custom_release: list[dict[str, Any]]) -> None:
    secret = only(custom_release, "Secret")
    decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert decoded == {
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "ENCRYPTION_KEY": ENCRYPTION_KEY,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": REDIS_URL,
    }


def test_no_secret_is_written_anywhere_but_the_secret(custom_release: list[dict[str, Any]]) -> None:
    secret_values = (MANAGEMENT_TOKEN, ENCRYPTION_KEY, ADMIN_PASSWORD, DATABASE_URL, REDIS_URL)
    for doc in custom_release:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        leaked = [value for value in secret_values if value in text]
        assert not leaked, f"{doc['kind']}/{doc['metadata']['name']} holds a secret"


def test_existing_secret_is_used_by_every_pod(default_release: list[dict[str, Any]]) -> None:
    for workload in (d for d in default_release if d["kind"] in ("Deployment", "Job")):
        refs = [secret_ref(v) for v in env_of(workload).values() if isinstance(v, dict)]
        assert refs, workload["metadata"]["name"]
        assert {name for name, _ in refs} == {"llm-proxy-secrets"}


SECRET_KEYS = ("DATABASE_URL", "REDIS_URL", "MANAGEMENT_TOKEN", "ENCRYPTION_KEY", "ADMIN_PASSWORD")


def proxy_pod_env(
    docs: list[dict[str, Any]], secret: dict[str, str], directory: Path, port: int
) -> dict[str, str]:
    """The proxy container's environment as Kubernetes fills it from ``secret`` (the operator's
    Secret, key to value), with the image's paths moved under ``directory`` and the port free."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for name, source in env_of(only(docs, "Deployment", "proxy")).items():
        if isinstance(source, dict):
            secret_name, key = secret_ref(source)
            assert secret_name == "llm-proxy-secrets"
            env[name] = secret[key]  # a key missing altogether keeps the pod from starting
        else:
            env[name] = str(source)
    config = directory / "config"
    config.mkdir()
    for name, text in only(docs, "ConfigMap")["data"].items():
        (config / name).write_text(text)
    env.update(
        LISTEN_ADDR=f"127.0.0.1:{port}",
        DATA_DIR=str(directory / "data"),
        API_CONFIG_PATH=str(config / "api_providers.yaml"),
        PRICES_PATH=str(config / "prices.yaml"),
    )
    return env


def full_secret(database_url: str, redis_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "ENCRYPTION_KEY": ENCRYPTION_KEY,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
    }


@pytest.mark.parametrize("empty", SECRET_KEYS)
def test_a_proxy_pod_refuses_to_start_on_an_existing_secret_with_an_empty_key(
    default_release: list[dict[str, Any]], tmp_path: Path, empty: str
) -> None:
    # The chart cannot read the operator's Secret; a key present but empty sets its variable to
    # nothing, which the server took as unset: each pod then generated a management token and an
    # encryption key of its own (or a SQLite database), unreadable by the others.
    secret = full_secret("postgresql://llmproxy:pw@127.0.0.1:9/llmproxy", "redis://127.0.0.1:9/0")
    secret[empty] = ""
    env = proxy_pod_env(default_release, secret, tmp_path, free_port())
    result = run_start_that_fails(env, f"the pod started with {empty} empty")
    assert result.returncode == 2
    assert f"{empty}: unset or empty, and REQUIRED_SETTINGS requires it" in result.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_a_proxy_pod_starts_on_an_existing_secret_with_every_key(
    default_release: list[dict[str, Any]],
    tmp_path: Path,
    postgres_url: str,
    redis_server: RedisServer,
) -> None:
    port = free_port()
    env = proxy_pod_env(
        default_release, full_secret(postgres_url, redis_server.url), tmp_path, port
    )
    assert run(cli_command("migrate"), env, timeout=60).returncode == 0
    pod = spawn(cli_command("server"), env, tmp_path / "logs", "proxy")
    try:
        pod.wait_for(f"http://127.0.0.1:{port}/ready", timeout=30)
        status, _ = http("GET", f"http://127.0.0.1:{port}/manage/projects", token=MANAGEMENT_TOKEN)
        assert status == 200
    finally:
        pod.stop()


def test_the_migration_job_fails_on_an_existing_secret_with_an_empty_database_url(
    default_release: list[dict[str, Any]], tmp_path: Path
) -> None:
    # Else it migrated a SQLite file in its own pod, and the release went on to the proxy pods.
    job = only(default_release, "Job", "migrate")
    secret = full_secret("", "redis://127.0.0.1:9/0")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for name, source in env_of(job).items():
        env[name] = secret[secret_ref(source)[1]] if isinstance(source, dict) else str(source)
    env["DATA_DIR"] = str(tmp_path / "data")
    result = run(cli_command("migrate"), env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "DATABASE_URL: unset or empty, and REQUIRED_SETTINGS requires it" in result.stderr
    assert not (tmp_path / "data").exists()


def test_without_secrets_rendering_fails_naming_what_to_set(helm: Helm) -> None:
    # Rather than pods that crash-loop, or that each generate secrets of their own.
    result = helm("template", RELEASE, str(CHART), "--set", "secrets.managementToken=t")
    assert result.returncode != 0
    for missing in ("encryptionKey", "adminPassword", "databaseUrl", "redisUrl"):
        assert f"secrets.{missing}" in result.stderr
    assert "secrets.managementToken" not in result.stderr


def test_an_encryption_key_of_the_wrong_size_is_refused(helm: Helm, tmp_path: Path) -> None:
    values = dict(CUSTOM_VALUES)
    values["secrets"] = {**CUSTOM_VALUES["secrets"], "encryptionKey": "c2hvcnQ="}
    result = helm("template", RELEASE, str(CHART), "-f", str(values_file(tmp_path, values)))
    assert result.returncode != 0
    assert "secrets.encryptionKey must be the base64 of 32 bytes" in result.stderr


def test_a_misspelt_value_is_refused(helm: Helm) -> None:
    result = helm(
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "secrets.existingSecret=s",
        "--set",
        "proxy.prot=1",
    )
    assert result.returncode != 0
    assert "'prot' not allowed" in result.stderr


def test_a_stopping_pod_lets_streams_finish_then_writes_their_events_before_the_kill(
    default_release: list[dict[str, Any]],
) -> None:
    """The kubelet sends SIGTERM after the preStop sleep and SIGKILL at the end of the pod's
    termination grace: the server's grace for streams, and the time to write their events and
    usage after it, must fit between the two."""
    deployment = only(default_release, "Deployment", "proxy")
    grace = parse_seconds("", env_of(deployment)["GRACEFUL_SHUTDOWN_TIMEOUT"])
    pre_stop = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert grace > 10  # longer than the server's own default, which cut many LLM streams
    termination = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert termination >= int(pre_stop[1]) + grace + AFTER_GRACE_SECONDS


def test_a_termination_grace_that_cannot_hold_the_servers_grace_is_refused(helm: Helm) -> None:
    def rendered(termination: float) -> subprocess.CompletedProcess[str]:
        return helm(
            "template",
            RELEASE,
            str(CHART),
            *("--set", "secrets.existingSecret=s"),
            *("--set", "proxy.preStopSleepSeconds=3"),
            *("--set", "proxy.gracefulShutdownSeconds=300"),
            *("--set", f"proxy.terminationGracePeriodSeconds={termination:.0f}"),
        )

    needed = 3 + 300 + AFTER_GRACE_SECONDS
    assert rendered(needed).returncode == 0
    result = rendered(needed - 1)
    assert result.returncode != 0
    assert (
        f"proxy.terminationGracePeriodSeconds ({needed - 1:.0f}) must be at least {needed:.0f}"
        in result.stderr
    )


# --- the migration hook ---------------------------------------------------------------------


def hook_weight(doc: dict[str, Any]) -> int:
    return int(doc["metadata"]["annotations"]["helm.sh/hook-weight"])


def test_migration_job_runs_migrate_before_install_and_upgrade(
    custom_release: list[dict[str, Any]],
) -> None:
    job = only(custom_release, "Job")
    hooks = set(job["metadata"]["annotations"]["helm.sh/hook"].split(","))
    assert hooks == {"pre-install", "pre-upgrade"}
    migrate = container(job)
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == container(only(custom_release, "Deployment", "proxy"))["image"]
    assert migrate["image"] == "registry.example/llm-proxy:1.2.3"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    # The database it migrates is the one the proxies use.
    job_env = env_of(job)
    proxy_env = env_of(only(custom_release, "Deployment", "proxy"))
    assert job_env["DATABASE_URL"] == proxy_env["DATABASE_URL"]


def test_the_secret_exists_before_the_migration_job_needs_it(
    custom_release: list[dict[str, Any]],
) -> None:
    # Pre-install hooks run before the release's ordinary resources are created, so a Secret that
    # were not itself an earlier hook would not exist yet when the job starts.
    secret = only(custom_release, "Secret")
    job = only(custom_release, "Job")
    assert "pre-install" in secret["metadata"]["annotations"]["helm.sh/hook"]
    assert "pre-upgrade" in secret["metadata"]["annotations"]["helm.sh/hook"]
    assert hook_weight(secret) < hook_weight(job)


def test_migration_can_be_left_to_the_operator(helm: Helm) -> None:
    docs = render(helm, "--set", "secrets.existingSecret=s", "--set", "migration.enabled=false")
    assert "Job" not in kinds(docs)


# --- the disruption budget ------------------------------------------------------------------


def test_pdb_selects_the_proxy_pods_and_only_them(custom_release: list[dict[str, Any]]) -> None:
    pdb = only(custom_release, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] == 2
    proxy_labels = only(custom_release, "Deployment", "proxy")["spec"]["template"]["metadata"]
    assert labels_match(selector, proxy_labels["labels"])
    for other in (only(custom_release, "Deployment", "dispatcher"), only(custom_release, "Job")):
        assert not labels_match(selector, other["spec"]["template"]["metadata"]["labels"])
    # The Service routes to the same pods the budget protects.
    assert only(custom_release, "Service")["spec"]["selector"] == selector


def test_no_pdb_for_a_single_replica(helm: Helm) -> None:
    # minAvailable 1 of 1 would block every node drain.
    docs = render(helm, "--set", "secrets.existingSecret=s", "--set", "proxy.replicaCount=1")
    assert "PodDisruptionBudget" not in kinds(docs)
    assert only(docs, "Deployment", "proxy")["spec"]["replicas"] == 1


# --- pods run unprivileged on a read-only root ----------------------------------------------


@pytest.mark.parametrize("release", ["default_release", "custom_release"])
def test_every_pod_runs_as_non_root_on_a_read_only_root(
    release: str, request: pytest.FixtureRequest
) -> None:
    workloads = [d for d in request.getfixturevalue(release) if d["kind"] in ("Deployment", "Job")]
    assert len(workloads) == 3
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        box = container(workload)
        assert box["securityContext"]["readOnlyRootFilesystem"] is True
        assert box["securityContext"]["allowPrivilegeEscalation"] is False
        assert box["securityContext"]["capabilities"]["drop"] == ["ALL"]
        # What the process writes lands on volumes: DATA_DIR and the temporary directory.
        writable = {
            mount["mountPath"]: mount["name"]
            for mount in box["volumeMounts"]
            if not mount.get("readOnly")
        }
        assert set(writable) == {env_of(workload)["DATA_DIR"], "/tmp"}
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for name in writable.values():
            assert "emptyDir" in volumes[name] or "persistentVolumeClaim" in volumes[name]


def test_proxy_data_dir_is_a_per_pod_empty_dir(default_release: list[dict[str, Any]]) -> None:
    deployment = only(default_release, "Deployment", "proxy")
    data_dir = env_of(deployment)["DATA_DIR"]
    mount = next(m for m in container(deployment)["volumeMounts"] if m["mountPath"] == data_dir)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mount["name"]] == {"name": mount["name"], "emptyDir": {"sizeLimit": "1Gi"}}


# --- the dispatcher -------------------------------------------------------------------------


def test_dispatcher_drains_the_redis_bus_into_the_chosen_backend(
    custom_release: list[dict[str, Any]],
) -> None:
    dispatcher = only(custom_release, "Deployment", "dispatcher")
    box = container(dispatcher)
    assert box["args"] == ["dispatcher", "--service", "helicone", "--batch-size", "50"]
    assert box["livenessProbe"]["exec"]["command"] == [
        "llm-proxy",
        "dispatcher",
        "check",
        "--service",
        "helicone",
    ]
    env = env_of(dispatcher)
    assert env["LLM_PROXY_EVENT_BUS"] == "redis"
    assert secret_ref(env["REDIS_URL"]) == ("gateway", "REDIS_URL")
    assert secret_ref(env["HELICONE_API_KEY"]) == ("helicone", "api-key")
    # It never needs the proxies' secrets.
    assert not {"MANAGEMENT_TOKEN", "ENCRYPTION_KEY", "DATABASE_URL"} & set(env)
    # Its events survive the pod on the claim; one pod at a time mounts it.
    pod = dispatcher["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"] == {"claimName": "llm-proxy-events"}
    assert dispatcher["spec"]["strategy"] == {"type": "Recreate"}


def test_default_dispatcher_writes_a_file(default_release: list[dict[str, Any]]) -> None:
    box = container(only(default_release, "Deployment", "dispatcher"))
    assert box["args"] == ["dispatcher", "--service", "file"]


def test_dispatcher_metrics_are_served_on_the_pod_address_for_prometheus_to_scrape(
    helm: Helm, default_release: list[dict[str, Any]]
) -> None:
    dispatcher = only(default_release, "Deployment", "dispatcher")
    env = env_of(dispatcher)
    assert env["LLM_PROXY_DISPATCHER_METRICS_HOST"] == "0.0.0.0"
    port = int(env["LLM_PROXY_DISPATCHER_METRICS_PORT"])
    assert container(dispatcher)["ports"] == [
        {"name": "metrics", "containerPort": port, "protocol": "TCP"}
    ]
    assert dispatcher["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }

    off = only(
        render(helm, "--set", "secrets.existingSecret=s", "--set", "dispatcher.metricsPort=0"),
        "Deployment",
        "dispatcher",
    )
    assert (
        "ports" not in container(off) and "annotations" not in off["spec"]["template"]["metadata"]
    )
    assert not {"LLM_PROXY_DISPATCHER_METRICS_PORT", "LLM_PROXY_DISPATCHER_METRICS_HOST"} & set(
        env_of(off)
    )


def test_an_unknown_dispatcher_backend_is_refused(helm: Helm) -> None:
    result = helm(
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "secrets.existingSecret=s",
        "--set",
        "dispatcher.service=kafka",
    )
    assert result.returncode != 0
    assert "/dispatcher/service" in result.stderr


# --- what the operator reads after installing -----------------------------------------------


def test_install_notes_say_how_to_reach_it_and_where_the_token_is(helm: Helm) -> None:
    result = helm(
        "install",
        RELEASE,
        str(CHART),
        "--dry-run=client",
        "--namespace",
        "llm",
        "--set",
        "secrets.existingSecret=llm-proxy-secrets",
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "http://demo-llm-proxy.llm.svc:80" in notes
    assert "port-forward service/demo-llm-proxy 8080:80" in notes
    assert "get secret llm-proxy-secrets" in notes
