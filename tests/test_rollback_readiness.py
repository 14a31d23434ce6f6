"""k8s/scripts/rollback-readiness.sh against a fake kubectl: it reports readiness and never
changes anything (only get, auth can-i and server-side dry runs reach the fake API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "k8s" / "scripts" / "rollback-readiness.sh"

# A stand-in for kubectl: answers from a JSON cluster description, logs every call, and
# refuses (exit 99) any verb that would change the cluster outside a server-side dry run.
FAKE_KUBECTL = r'''#!PYTHON
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
cluster = json.load(open(os.environ["FAKE_CLUSTER"]))
while args and args[0] in ("--context", "-n", "--namespace"):
    args = args[2:]
verb = args[0]
if verb in ("apply", "create", "delete", "patch", "edit", "replace", "set", "label",
            "annotate", "rollout", "scale") and "--dry-run=server" not in args:
    sys.stderr.write("MUTATION " + " ".join(args) + "\n")
    sys.exit(99)
if verb == "auth":
    sys.exit(0 if cluster.get("can_scale", True) else 1)
if verb == "scale":
    sys.exit(0 if cluster.get("can_scale", True) else 1)
if verb == "get":
    kind, name = args[1], args[2]
    obj = cluster.get(kind, {}).get(name)
    if obj is None:
        sys.stderr.write(f"Error from server (NotFound): {kind} {name}\n")
        sys.exit(1)
    out = [a for a in args if a.startswith("jsonpath=") or a == "name"]
    fmt = args[args.index("-o") + 1]
    if fmt == "name":
        print(f"{kind}/{name}")
    else:
        print(obj[fmt.removeprefix("jsonpath=")], end="")
    sys.exit(0)
sys.exit(2)
'''


def healthy() -> dict[str, Any]:
    deploy = "deployment"
    return {
        deploy: {
            "zaiproxy-production": {
                "{.spec.replicas} {.status.readyReplicas}": "3 3",
                "{.spec.template.spec.containers[0].image}": "registry/zaiproxy:1.4.0"},
            "zaiproxy-canary": {
                "{.spec.replicas} {.status.readyReplicas}": "1 1",
                "{.spec.template.spec.containers[0].image}": "registry/zaiproxy:1.5.0-rc1"},
        },
        "service": {"zaiproxy": {"{.spec.selector}": json.dumps(
            {"app.kubernetes.io/name": "zaiproxy"})}},
        "pdb": {"zaiproxy-production": {"{.status.disruptionsAllowed}": "1"}},
        "prometheusrule": {"zaiproxy": {}},
    }


def run(tmp_path: Path, cluster: dict[str, Any]) -> tuple[int, str, list[list[str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "kubectl"
    fake.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable, 1))
    fake.chmod(0o755)
    (tmp_path / "cluster.json").write_text(json.dumps(cluster))
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "FAKE_CLUSTER": str(tmp_path / "cluster.json"), "FAKE_LOG": str(log)}
    out = subprocess.run(["bash", str(SCRIPT), "-n", "zaiproxy"], env=env, capture_output=True,
                         text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return out.returncode, out.stdout + out.stderr, calls


def test_ready_cluster_passes_and_nothing_is_changed(tmp_path: Path) -> None:
    code, out, calls = run(tmp_path, healthy())
    assert code == 0, out
    assert "rollback readiness: READY" in out
    assert "FAIL" not in out and "MUTATION" not in out
    verbs = {c[c.index("zaiproxy") + 1] if "zaiproxy" in c[:3] else c[0] for c in calls}
    assert verbs <= {"get", "auth", "scale"}, verbs
    scales = [c for c in calls if "scale" in c]
    assert scales and all("--dry-run=server" in c for c in scales)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda c: c["deployment"]["zaiproxy-production"].update(
        {"{.spec.replicas} {.status.readyReplicas}": "3 1"}), "production not fully ready: 1/3"),
    (lambda c: c["deployment"]["zaiproxy-canary"].update(
        {"{.spec.template.spec.containers[0].image}": "registry/zaiproxy:1.4.0"}),
     "run the same image"),
    (lambda c: c["service"]["zaiproxy"].update(
        {"{.spec.selector}": '{"app.kubernetes.io/name":"zaiproxy","variant":"production"}'}),
     "selects one variant"),
    (lambda c: c.update(can_scale=False), "not allowed to scale"),
    (lambda c: c.pop("pdb"), "poddisruptionbudget/zaiproxy-production not found"),
    (lambda c: c.pop("prometheusrule"), "canary alerts are not loaded"),
])
def test_each_problem_is_reported(tmp_path: Path, change: Any, expected: str) -> None:
    cluster = healthy()
    change(cluster)
    code, out, _ = run(tmp_path, cluster)
    assert code == 1, out
    assert expected in out and "NOT READY" in out


def test_no_api_access_stops_early(tmp_path: Path) -> None:
    cluster = healthy()
    cluster["deployment"] = {}
    code, out, _ = run(tmp_path, cluster)
    assert code == 1
    assert "deployment/zaiproxy-production not found" in out
