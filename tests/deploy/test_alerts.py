"""deploy/prometheus/alerts.yml: Prometheus alert rules that a real ``promtool`` accepts, whose unit
tests (alerts_test.yml) pass, and whose expressions name only metrics a running server exposes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_grafana_dashboard import (
    metric_names,
    names_a_running_server_exposes,
    promtool,
)

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = RULES.with_name("alerts_test.yml")


@pytest.fixture(scope="module")
def alerts() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_alert_waits_is_graded_and_tells_the_operator_what_to_look_at(
    alerts: list[dict[str, Any]],
) -> None:
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names))
    for rule in alerts:
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert set(rule["annotations"]) >= {"summary", "description"}, rule["alert"]
    assert {
        "LLMProxyErrorsOfItsOwn",
        "LLMProxyAddedLatencyHigh",
        "LLMProxyEventsDropped",
        "LLMProxyDispatcherLagHigh",
        "LLMProxyChangeFeedStale",
    } <= set(names)


@pytest.mark.process
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.process
def test_the_rules_unit_tests_pass() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert len(tested) >= 2, tested  # alerts shown to fire, not only to stay quiet

    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def served_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    return names_a_running_server_exposes(tmp_path_factory.mktemp("served"))


@pytest.mark.process
def test_every_alert_names_only_metrics_a_running_server_exposes(
    alerts: list[dict[str, Any]], served_names: set[str]
) -> None:
    for rule in alerts:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= served_names, f"{rule['alert']}: {sorted(names - served_names)}"
