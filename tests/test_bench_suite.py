"""bench.suite end to end (direct and zaiproxy, two short scenarios) and its accounting rules.

nginx is left out here (the suite's nginx target needs the Debian package, which `make bench`
installs); everything else is the real thing: the mock, zaiproxy with every feature on, the
C load generator verifying every response, the /proc sampling and the report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.suite import MIN_PER_CONNECTION, served_rate


def test_suite_runs_end_to_end_and_reports(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.suite", "--duration", "0.5", "--repeat", "1",
           "--warmup", "0", "--scenario", "json-c1", "--scenario", "sse50-c64",
           "--target", "direct", "--target", "proxy", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    results = json.loads((run_dir / "results.json").read_text())

    pairs = {(r["scenario"], r["target"]) for r in results["runs"]}
    assert pairs == {(s, t) for s in ("json-c1", "sse50-c64") for t in ("direct", "proxy")}
    for run in results["runs"]:
        assert run["requests"] > 0 and run["errors_total"] == 0, run["errors"]
        assert run["body_checked"] is True  # byte-identical bodies under load
        assert run["latency_us"]["p50"] >= run["ttfb_us"]["p50"] > 0
        assert run["target_tree"]["cpu_seconds"] > 0
        if run["scenario"] == "sse50-c64":
            assert run["events"] == 52 * run["requests"]
    proxy_roles = {p["role"] for r in results["runs"] if r["target"] == "proxy"
                   for p in r["target_tree"]["processes"]}
    assert {"supervisor", "worker", "recorder"} <= proxy_roles
    assert results["targets"]["proxy"]["startup_s"] > 0
    assert all(s["identical"] for s in results["samples"]), results["samples"]
    assert results["exit_codes"] == {"proxy": 0, "mock": 0}

    md = (run_dir / "results.md").read_text()
    assert "| json-c1 | proxy |" in md and "| sse50-c64 | direct |" in md
    # --render rebuilds the same report from the JSON alone.
    (run_dir / "results.md").unlink()
    subprocess.run([sys.executable, "-m", "bench.suite", "--render", str(run_dir)], check=True,
                   capture_output=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert (run_dir / "results.md").read_text() == md


def test_served_rate_uses_littles_law_for_waves_of_long_streams() -> None:
    many = {"requests": 64 * MIN_PER_CONNECTION, "connections": 64, "rps": 1234.0,
            "latency_us": {"mean": 50_000.0}}
    assert served_rate(many) == (1234.0, "completions")
    # 256 one-second streams started together: completions come in waves, so the rate is
    # connections / mean latency (each connection always has one request open).
    waves = {"requests": 512, "connections": 256, "rps": 102.4,
             "latency_us": {"mean": 1_024_000.0}}
    rate, how = served_rate(waves)
    assert how == "connections/mean latency" and abs(rate - 250.0) < 1e-9
    assert served_rate({"requests": 0, "connections": 8, "rps": 0.0,
                        "latency_us": {"mean": 0.0}}) == (0.0, "none")
