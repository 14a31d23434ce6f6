"""What one admin snapshot costs a worker: ``GET /admin/status`` (= one ``/admin/events`` tick).

Run it from the repository root::

    .venv/bin/python -m bench.micro.admin_cost [--requests 300] [--calls 50]

It starts ``zaiproxy serve --demo --workers 1`` on a free port (history in a temp dir),
sends ``--requests`` chat completions (a mix of 200, 400, 429-by-key and 500 answers so
the series look like a working proxy's), then times ``--calls`` keep-alive
``GET /admin/status`` calls and prints, as milliseconds:

- the client's round trip (median, p90);
- the worker's own ``duration_ms`` from its access log (median, p90): what the snapshot
  held the worker's trio loop;
- ``snapshot.parse`` of that proxy's ``/metrics`` text, in this process (best of 20): what
  each snapshot cost before the proxy built it from the metric families
  (``snapshot.parse_families``), for comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from zaiproxy.observe import snapshot

REPO = Path(__file__).resolve().parents[2]
MODELS = ["glm-4.6"] * 7 + ["mock-status-500", "mock-status-400", "mock-zai-1302"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--calls", type=int, default=50)
    ns = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("ZAIPROXY_")},
               "ZAIPROXY_HISTORY_PATH": f"{tmp}/history.duckdb", "MAX_RETRIES": "0"}
        log = Path(tmp) / "proxy.log"
        with log.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "zaiproxy", "serve", "--demo",
                                     "--port", "0", "--workers", "1"], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=err)
        try:
            assert proc.stdout is not None
            url = ""
            deadline = time.monotonic() + 30
            while not url and time.monotonic() < deadline:
                line = proc.stdout.readline().decode()
                if "listening on" in line:
                    url = line.split("listening on ", 1)[1].split()[0]
            if not url:
                raise SystemExit(f"the proxy did not start:\n{log.read_text()}")
            with httpx.Client(base_url=url, timeout=30) as client:
                for i in range(ns.requests):
                    client.post("/v1/chat/completions", json={
                        "model": MODELS[i % len(MODELS)],
                        "messages": [{"role": "user", "content": f"hello {i}"}]})
                round_trips = []
                for _ in range(ns.calls):
                    start = time.perf_counter()
                    client.get("/admin/status").raise_for_status()
                    round_trips.append((time.perf_counter() - start) * 1e3)
                text = client.get("/metrics").text
            parse_ms = min(_timed(lambda: snapshot.parse(text)) for _ in range(20))
            time.sleep(0.3)  # the access log's writer thread flushes every 50 ms
            worker = [rec["duration_ms"] for rec in _records(log)
                      if rec.get("route") == "/admin/status"]
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"GET /admin/status, {ns.calls} calls after {ns.requests} requests "
          f"({len(text):,} bytes of /metrics)")
    print(f"  round trip        median {statistics.median(round_trips):6.2f} ms   "
          f"p90 {_p90(round_trips):6.2f} ms")
    print(f"  worker (access)   median {statistics.median(worker):6.2f} ms   "
          f"p90 {_p90(worker):6.2f} ms")
    print(f"  snapshot.parse(text), the old way: {parse_ms:.2f} ms (best of 20)")
    return 0


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - start) * 1e3


def _p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9)]


def _records(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_bytes().splitlines():
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


if __name__ == "__main__":
    sys.exit(main())
