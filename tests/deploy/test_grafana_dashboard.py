"""deploy/grafana/llm-proxy.json: a Grafana dashboard whose every query is valid PromQL (checked by
a real ``promtool``) and names only metrics that a real running ``llm-proxy server`` exposes.

``promtool`` comes from ``make services`` (scripts/ensure-services.sh puts it in the virtualenv);
tests/deploy/test_alerts.py uses the helpers here too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import http, start_mock_upstream, start_server, write_api_config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "llm-proxy.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# Grafana's own variables, as a query would have them substituted.
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "6h"}

# -- PromQL ----------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      | (?P<number>[0-9.][0-9a-zA-Z_.]*)
      | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
      | (?P<other>\S)""",
    re.VERBOSE,
)
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _AGGREGATIONS | _GROUPING | {"and", "or", "unless", "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: the names outside label matchers, ranges,
    strings and grouping lists that are neither a function, an operator nor a keyword."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    names: set[str] = set()
    depth = {"{": 0, "[": 0}
    closing = {"}": "{", "]": "["}
    skip_group = 0  # inside a grouping list: ``by (le)``
    for index, (kind, text) in enumerate(tokens):
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "other":
            if text in depth:
                depth[text] += 1
            elif text in closing:
                depth[closing[text]] -= 1
            elif text == "(" and skip_group:
                skip_group += 1
            elif text == ")" and skip_group:
                skip_group = 0 if skip_group == 2 else skip_group - 1
            continue
        if kind != "name" or any(depth.values()) or skip_group:
            continue
        if text in _GROUPING and following == "(":
            skip_group = 1
        elif following != "(" and text.lower() not in _KEYWORDS:
            names.add(text)
    return names


def exposed_names(page: str) -> set[str]:
    """Every series name a page's families can have, as PromQL names them."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names: set[str] = set()
    for family in text_string_to_metric_families(page):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def promtool_binary() -> str:
    # The virtualenv's bin first: that is where `make services` installs it.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("promtool", path=path)
    if found is None:
        pytest.fail("promtool is not installed: run `make services` (scripts/ensure-services.sh)")
    return found


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool_binary(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def names_a_running_server_exposes(tmp: Path) -> set[str]:
    """The metric names on ``/metrics`` of a real server (events process included) that proxied a
    chat completion and refused a request."""
    mock = start_mock_upstream(tmp)
    server = start_server(tmp / "data", write_api_config(tmp / "api.yaml", mock.base_url), tmp)
    try:
        base, management = server.base_url, server.management_token
        _, project = http(
            "POST", f"{base}/manage/projects", token=management, body={"name": "d", "api_key": "k"}
        )
        _, token = http(
            "POST",
            f"{base}/manage/tokens",
            token=management,
            body={"project_id": project["id"], "duration_minutes": 5},
        )
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        status, _ = http("POST", f"{base}/v1/chat/completions", token=token["token"], body=chat)
        assert status == 200
        status, _ = http("GET", f"{base}/v1/models", token="sk-" + "N" * 43)
        assert status == 401
        deadline = time.monotonic() + 15
        while True:  # until the events process has reported the request's tokens
            with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
                page = response.read().decode()
            if "llm_proxy_tokens_total{" in page:
                return exposed_names(page)
            assert time.monotonic() < deadline, page
            time.sleep(0.1)
    finally:
        server.stop(timeout=10)
        mock.process.stop()


@pytest.fixture(scope="module")
def served_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    return names_a_running_server_exposes(tmp_path_factory.mktemp("served"))


# -- the dashboard ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included; rows themselves left out."""
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []))
        if panel["type"] != "row":
            found.append(panel)
    return found


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, expression)`` of every panel target."""
    return [
        (f"panel {panel['id']} {target['refId']} ({panel['title']})", target["expr"])
        for panel in panels(dashboard)
        for target in panel["targets"]
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(variable, selector)`` of the ``label_values(selector, label)`` query variables."""
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
            assert match, variable
            found.append((variable["name"], match.group(1)))
    return found


def substituted(expr: str, defined: set[str]) -> str:
    """The expression as Grafana sends it: its variables replaced (a multi-value regex: ``.*``)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in GRAFANA_VARIABLES:
            return GRAFANA_VARIABLES[name]
        assert name in defined, f"${name} is not a variable of the dashboard"
        return ".*"

    return re.sub(r"\$\{?(\w+)\}?", value, expr)


def test_the_dashboard_is_for_a_current_grafana_on_a_prometheus_chosen_at_import(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["schemaVersion"] >= 39  # Grafana 11 and later
    assert dashboard["uid"] == "llm-proxy" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    for name, variable in variables.items():
        if name != "DS_PROMETHEUS":
            assert variable["datasource"] == DATASOURCE, name
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    # Panels sit on Grafana's 24-column grid without overlapping.
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_the_panels_cover_traffic_latency_spend_events_revocation_and_budgets(
    dashboard: dict[str, Any],
) -> None:
    used = set().union(*(metric_names(expr) for _, expr in queries(dashboard)))

    assert {
        "llm_proxy_requests_total",
        "llm_proxy_requests_refused_total",
        "llm_proxy_added_latency_seconds_bucket",
        "llm_proxy_upstream_latency_seconds_bucket",
        "llm_proxy_tokens_total",
        "llm_proxy_cost_usd_total",
        "llm_proxy_events_queue_depth",
        "llm_proxy_events_dropped_total",
        "llm_proxy_dispatcher_lag_seconds_bucket",
        "llm_proxy_change_feed_lag_seconds",
        "llm_proxy_budget_holds_open",
    } <= used


@pytest.mark.process
def test_every_query_names_only_metrics_a_running_server_exposes(
    dashboard: dict[str, Any], served_names: set[str]
) -> None:
    for where, expr in [*queries(dashboard), *variable_queries(dashboard)]:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        assert names <= served_names, f"{where}: {sorted(names - served_names)} not on /metrics"


@pytest.mark.process
def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    rules = [
        {
            "record": f"dashboard:{re.sub(r'[^a-z0-9]+', '_', where.lower())}",
            "expr": substituted(expr, defined),
        }
        for where, expr in [
            *((where.partition(" (")[0], expr) for where, expr in queries(dashboard)),
            *((f"variable {name}", selector) for name, selector in variable_queries(dashboard)),
        ]
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = promtool("check", "rules", str(path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_metric_names_are_read_from_promql_as_prometheus_selects_them() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, job) (rate(a_bucket{le!="+Inf", model=~"x|y"}[5m])))'
        " > on (job) group_left (instance) sum without (kind) (b_total offset 1h30m) * 1e-3"
        ' or label_replace(c:rate5m @ start(), "dst", "$1", "src", "(.*)") unless vector(0)'
    )

    assert metric_names(expr) == {"a_bucket", "b_total", "c:rate5m"}
