"""The PrometheusRule in k8s/base/prometheusrule.yaml: valid, unit-tested, on real metric names.

Its ``spec.groups`` are extracted into a plain rules file, which ``promtool check rules``
validates and ``promtool test rules`` runs the unit tests of ``tests/alerts/*.yaml`` against
(their ``rule_files`` is pointed at the extracted file here). promtool's exit code decides and
its output is the failure message. promtool must be installed (``make test`` installs the
``prometheus`` package): without it these tests fail, they never skip.

promtool cannot know which series exist, so a typo in a metric name would only give an alert
that never fires: every name the rules read is checked against what ``/metrics`` exposes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from zaiproxy.limits.ledger import load
from zaiproxy.observe.metrics import QuotaUse, WorkerMetrics

REPO = Path(__file__).resolve().parent.parent
RULE = REPO / "k8s" / "base" / "prometheusrule.yaml"
UNIT_TESTS = sorted((REPO / "tests" / "alerts").glob("*.yaml"))
RUNBOOK = "docs/operations/canary.md"
SEVERITIES = {"critical", "warning"}
# Series from kube-state-metrics and Prometheus itself (the rest must be the proxy's own).
EXTERNAL = {"kube_deployment_status_replicas_ready", "kube_deployment_spec_replicas",
            "kube_pod_container_status_restarts_total", "up"}


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: the alert rules cannot be checked. `make test` "
                    "installs it (apt-get install prometheus); install it and run again.")
    return path


def run_promtool(promtool: str, *args: str) -> str:
    """promtool's output; a non-zero exit fails the caller with that output."""
    proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`promtool {' '.join(args)}` exited {proc.returncode}:\n{output}"
    return output


def resource() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULE.read_text())
    return doc


def groups() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = resource()["spec"]["groups"]
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for group in groups() for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    """The PrometheusRule's spec.groups as a plain Prometheus rules file."""
    path = tmp_path / "zaiproxy.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups()}, sort_keys=False))
    return path


def with_rule_file(unit_test: Path, rules_file: Path, out_dir: Path) -> Path:
    """A copy of a tests/alerts file whose rule_files is the extracted rules file."""
    doc = yaml.safe_load(unit_test.read_text())
    doc["rule_files"] = [str(rules_file)]
    out = out_dir / f"test-{unit_test.name}"
    out.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return out


def test_the_resource_is_for_the_prometheus_operator() -> None:
    doc = resource()
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert doc["metadata"]["name"] == "zaiproxy"  # k8s/scripts/rollback-readiness.sh looks for it
    assert doc["metadata"]["labels"]["release"] == "prometheus"  # the operator's ruleSelector
    assert set(doc["spec"]) == {"groups"}


def test_promtool_accepts_the_rules(promtool: str, rules_file: Path) -> None:
    output = run_promtool(promtool, "check", "rules", str(rules_file))
    assert f"SUCCESS: {len(rules())} rules found" in output


@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=[p.stem for p in UNIT_TESTS])
def test_promtool_unit_tests(promtool: str, rules_file: Path, unit_test: Path,
                             tmp_path: Path) -> None:
    output = run_promtool(promtool, "test", "rules",
                          str(with_rule_file(unit_test, rules_file, tmp_path)))
    assert "SUCCESS" in output


def test_a_wrong_expectation_fails_with_promtools_output(promtool: str, rules_file: Path,
                                                         tmp_path: Path) -> None:
    """The harness itself: a unit test promtool rejects is a failure that shows why."""
    healthy = tmp_path / "healthy.yaml"
    healthy.write_text(yaml.safe_dump({"rule_files": ["placeholder"], "tests": [{
        "interval": "1m",
        "input_series": [{
            "series": 'zai_proxy_requests_total{namespace="zaiproxy",method="POST",'
                      'path="/v1/chat/completions",status="200",variant="canary"}',
            "values": "0+60x30"}],
        # Wrong on purpose: a healthy canary does not page.
        "alert_rule_test": [{"eval_time": "20m", "alertname": "ZaiProxyCanaryHighErrorRate",
                             "exp_alerts": [{"exp_labels": {"severity": "critical"}}]}],
    }]}))
    with pytest.raises(AssertionError, match="exited 1") as failure:
        run_promtool(promtool, "test", "rules",
                     str(with_rule_file(healthy, rules_file, tmp_path)))
    assert "FAILED" in str(failure.value)
    assert "alertname: ZaiProxyCanaryHighErrorRate, time: 20m" in str(failure.value)
    # And a broken expression fails `check rules` the same way.
    broken = tmp_path / "broken.rules.yaml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [
        {"alert": "Broken", "expr": "rate(zai_proxy_requests_total[5m] > 0"}]}]}))
    with pytest.raises(AssertionError, match="exited 1"):
        run_promtool(promtool, "check", "rules", str(broken))


def test_every_alert_fires_in_one_case_and_stays_quiet_in_another() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                expected = case.get("exp_alerts") or []
                if not expected:
                    quiet.add(case["alertname"])
                elif all("runbook_url" in alert.get("exp_annotations", {})
                         for alert in expected):
                    firing.add(case["alertname"])  # with its labels and annotations
    names = {alert["alert"] for alert in alerts()}
    assert names - firing == set(), "alerts without a case where they fire"
    assert names - quiet == set(), "alerts without a case where they must not fire"
    assert (firing | quiet) - names == set(), "unit tests of alerts that do not exist"


def test_every_alert_has_a_severity_a_value_and_its_runbook_section() -> None:
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert "$value" in annotations["description"], name
        # GitHub's anchor of the runbook section "## <alert name>".
        assert annotations["runbook_url"] == f"{RUNBOOK}#{name.lower()}", name


def exposed_names(tmp_path: Path) -> set[str]:
    """Every sample name the proxy's /metrics can show (a scrape with a quota configured)."""
    mod = load()
    segment = mod.Ledger(str(tmp_path / "segment"), create=True, rows=128, windows=4, workers=1)
    try:
        metrics = WorkerMetrics(variant="canary", ledger=mod.IMPLEMENTATION, workers=1,
                                segment=segment, shared=False,
                                quota=lambda: [QuotaUse("global", "requests_per_5h", 1, 10)])
        text = metrics.render()[0].decode()
    finally:
        segment.close()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        # The text format's TYPE line names a counter with its _total already.
        suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
        names.update(name + suffix for suffix in suffixes)
    return names


def test_the_rules_read_only_series_that_exist(tmp_path: Path) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    exposed = exposed_names(tmp_path)
    assert "zai_proxy_quota_used_ratio" in exposed
    used = set()
    for rule in rules():
        where = rule.get("alert") or rule["record"]
        expr = re.sub(r'"[^"]*"', '""', rule["expr"])  # label values are not names
        for name in set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)):
            if ":" in name:
                assert name in recorded, f"{where} reads {name}, which no rule records"
            elif name.startswith("zai_proxy_"):
                assert name in exposed, f"{where} reads {name}, which /metrics never shows"
            elif name.startswith("kube_") or name == "up":
                assert name in EXTERNAL, f"{where} reads {name}"
            used.add(name)
    assert used >= EXTERNAL, "kube-state-metrics or up series no rule reads"
