"""docs/operations/canary.md: every command in it exists and matches the code, every path
and object it names exists, and every alert has its section (the alerts' runbook_url)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_k8s import render
from zaiproxy.cli import build_parser
from zaiproxy_tui.__main__ import parse_args as tui_args

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = REPO / "docs" / "operations" / "canary.md"
TEXT = RUNBOOK.read_text()


def commands() -> list[str]:
    """Every command line of the runbook's ``sh`` blocks (continuations joined)."""
    out: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", TEXT, re.S):
        # Code blocks inside list items are indented.
        lines = [line.strip() for line in block.replace("\\\n", " ").splitlines()]
        out += [re.sub(r"\s+&$", "", line) for line in lines if line and not line.startswith("#")]
    return out


def rendered_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for overlay in ("production", "canary"):
        for obj in render(REPO / "k8s" / "overlays" / overlay):
            names.setdefault(obj["kind"], set()).add(obj["metadata"]["name"])
    return names


def test_the_runbook_has_commands_of_every_kind() -> None:
    cmds = commands()
    assert any(c.startswith("zaiproxy canary-check --prometheus") for c in cmds)
    assert any(c.startswith("zaiproxy canary-check --url") for c in cmds)
    assert any(c.startswith("zaiproxy tui") for c in cmds)
    assert any(c.startswith("kubectl -n zaiproxy scale deployment/zaiproxy-canary") for c in cmds)
    assert any(c.startswith("k8s/scripts/rollback-readiness.sh") for c in cmds)


@pytest.mark.parametrize("command", [c for c in commands() if c.startswith("zaiproxy ")])
def test_zaiproxy_commands_parse_with_the_real_cli(command: str) -> None:
    argv = shlex.split(command)[1:]
    if argv[0] == "tui":
        tui_args(argv[1:])  # SystemExit (argparse's error) fails the test
    else:
        build_parser().parse_args(argv)


@pytest.mark.parametrize("command", [c for c in commands() if c.startswith("kubectl ")])
def test_kubectl_commands_name_what_the_manifests_define(command: str) -> None:
    argv = shlex.split(command.split("|")[0])  # a pager after a pipe is not ours
    names = rendered_names()
    kinds = {"deployment": "Deployment", "svc": "Service", "service": "Service",
             "endpoints": "Service"}  # a Service's endpoints carry its name
    if "-n" in argv and argv[argv.index("-n") + 1] != "monitoring":
        assert argv[argv.index("-n") + 1] == "zaiproxy"
    for arg in argv:
        if "/" in arg and arg.split("/", 1)[0] in kinds and not arg.startswith("k8s/"):
            kind, name = arg.split("/", 1)
            if name == "prometheus-operated":
                continue  # the Prometheus operator's Service, not ours
            assert name in names[kinds[kind]], f"{arg}: not in the rendered manifests"
    if "-k" in argv or "kustomize" in argv:
        path = argv[-1] if "kustomize" in argv else argv[argv.index("-k") + 1]
        assert (REPO / path / "kustomization.yaml").is_file(), path
    if argv[1:3] == ["get", "endpoints"]:
        assert argv[3] in names["Service"]


def test_the_readiness_script_exists_and_parses() -> None:
    script_lines = [c for c in commands() if c.startswith("k8s/scripts/")]
    for line in script_lines:
        path = REPO / line.split()[0]
        assert path.is_file() and path.stat().st_mode & 0o111, path
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_every_path_named_in_the_runbook_exists() -> None:
    paths = set(re.findall(r"`((?:k8s|docs|tui|zaiproxy)/[\w./-]+)`", TEXT))
    assert paths
    for path in paths:
        assert (REPO / path).exists(), path


def test_every_alert_has_its_section_and_nothing_else_does() -> None:
    rule = yaml.safe_load((REPO / "k8s" / "base" / "prometheusrule.yaml").read_text())
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    alerts_part = TEXT.split("\n## Alerts\n", 1)[1]
    sections = set(re.findall(r"^### (\S+)$", alerts_part, re.M))
    assert sections == alerts
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                url = r["annotations"]["runbook_url"]
                assert url == f"docs/operations/canary.md#{r['alert'].lower()}"


def test_the_rollback_criteria_match_canary_check_defaults() -> None:
    """The runbook's rollback lines are canary-check's default thresholds and exit codes."""
    ns = build_parser().parse_args(["canary-check", "--prometheus", "http://prometheus:9090"])
    assert (ns.max_error_rate, ns.max_latency_ratio, ns.max_targets_down) == (0.10, 2.0, 0.5)
    assert "error rate is above\n10 %" in TEXT and "more than double production's" in TEXT
    assert "more than half the canary pods are not ready" in TEXT
    out = subprocess.run([sys.executable, "-m", "zaiproxy", "canary-check", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for code, verdict in (("0", "PROMOTE"), ("1", "ROLL BACK"), ("2", "WAIT")):
        assert re.search(rf"^\s+{code}\s+{verdict}\b", out, re.M), verdict
    assert "`PROMOTE`, `WAIT`" in TEXT and "exits 0 / 2 / 1" in TEXT
