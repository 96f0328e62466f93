"""deploy/prometheus: the configuration and the self-monitoring rules, checked and unit-tested by promtool and
loaded by a real Prometheus; every rule carries what a responder needs and is tested both ways."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from detector.metrics import Metrics
from tests.prometheus import prometheus_binary, promtool_binary, rules, running_prometheus
from tests.support import missing_tool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
CONFIG = DEPLOY / "prometheus.yml"
RULES = DEPLOY / "rules" / "mia-detector.rules.yml"
RULE_TESTS = DEPLOY / "rules" / "mia-detector.rules.test.yml"
SEVERITIES = {"warning", "critical"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = promtool_binary()
    if binary is None:
        missing_tool("promtool")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_configuration_is_valid_and_loads_the_rules() -> None:
    result = promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_the_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.fixture(scope="module")
def loaded_rules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """The rules as a real Prometheus loaded them (JSON from /api/v1/rules: no YAML parser needed)."""
    if prometheus_binary() is None:
        missing_tool("prometheus")
    with running_prometheus(tmp_path_factory.mktemp("rules"), [], rule_files=[RULES]) as url:
        yield rules(url)


def test_every_rule_is_an_alert_a_responder_can_act_on(loaded_rules: list[dict[str, Any]]) -> None:
    assert len(loaded_rules) >= 7
    for rule in loaded_rules:
        name = rule["name"]
        assert rule["type"] == "alerting", name
        assert name.startswith("MiaDetector"), name
        assert rule["labels"].get("severity") in SEVERITIES, name
        assert rule["labels"].get("service") == "mia-detector", name
        for annotation in ("summary", "description", "runbook"):
            assert len(rule["annotations"].get(annotation, "")) > 20, (name, annotation)
    names = [rule["name"] for rule in loaded_rules]
    assert len(set(names)) == len(names)


def test_every_rule_is_tested_firing_and_quiet(loaded_rules: list[dict[str, Any]]) -> None:
    text = RULE_TESTS.read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", text))
    quiet = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", text))
    names = {rule["name"] for rule in loaded_rules}
    assert names - firing == set(), "rules never tested firing"
    assert names - quiet == set(), "rules never tested quiet"
    assert (firing | quiet) - names == set(), "tests of rules that do not exist"


def test_the_rules_only_use_metrics_the_detector_exports(loaded_rules: list[dict[str, Any]]) -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}
    exported = {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    used = {name for rule in loaded_rules for name in re.findall(r"mia_detector_\w+", rule["query"])}
    assert used, "the rules query no detector metric"
    assert used - exported == set()
