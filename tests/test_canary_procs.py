"""``zaiproxy canary-check`` against real processes: a real Prometheus, a real collector,
and the proxies' own admin APIs (their recorders' history).

One fleet per module: the mock upstream, a production proxy and four canary proxies, each
its own variant (``DEPLOYMENT_VARIANT``) and its own history file (``start_process``) so
every verdict has its own, independent traffic:

- ``canary``: as good as production (same traffic, same 150 ms upstream delay) -> PROMOTE;
- ``canary-bad``: half of its requests answered 500 by the mock -> ROLL BACK (error_rate);
- ``canary-slow``: every request waits 700 ms upstream (production 150 ms) -> ROLL BACK
  (latency_p95, ttft_p95);
- ``canary-idle``: a handful of requests -> WAIT;
- ``canary-gone``: scraped, then stopped -> ROLL BACK (targets); for the proxies source,
  its URL refuses connections: a down target of the variant no proxy answered for.

Prometheus (1 s scrapes, TSDB in tmp) and ``zaiproxy collect`` (1 s) scrape all of them;
the command runs as a child process against each, and against two proxy URLs
(``--url PRODUCTION --url CANARY``). Every series is warmed up (one request, one scrape)
before the counted traffic: ``increase`` ignores the first sample of a series. Without
Prometheus installed, its tests fail with a message (``make test`` installs it); the other
sources' tests still run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import REPO, ProcessServer, start_process, upstream_env

pytestmark = pytest.mark.slow

TOKEN = "canary-collector-token"
PROMETHEUS = "/usr/bin/prometheus"
VARIANTS = ("production", "canary", "canary-bad", "canary-slow", "canary-idle", "canary-gone")
GOOD = "mock-slow-150"  # every good request waits 150 ms upstream (a p95 above noise)
SLOW = "mock-slow-700"  # a canary whose upstream path is ~4.7x slower (p95 ~1 s vs ~0.24 s)
FAIL = "mock-status-500"
# What each variant gets after the warm-up.
TRAFFIC: dict[str, list[str]] = {
    "production": [GOOD] * 60, "canary": [GOOD] * 60,
    "canary-bad": [GOOD] * 29 + [FAIL] * 29, "canary-slow": [SLOW] * 60,
    "canary-idle": [GOOD] * 3, "canary-gone": [],
}
WARM_UP: dict[str, list[str]] = {v: [GOOD] for v in VARIANTS} | {"canary-bad": [GOOD, FAIL]}
MIN_REQUESTS = "40"


@dataclass
class Fleet:
    proxies: dict[str, ProcessServer]
    prometheus: str | None  # None: not installed
    collector: str


def poll(what: str, check: Callable[[], bool], limit: float = 20.0) -> None:
    """Bounded polling of another process's state (there is no event to wait on)."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:g}s waiting for {what}")
        time.sleep(0.1)


def get(url: str, token: str | None = None) -> Any:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        return httpx.get(url, headers=headers, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None


def promql(base: str, query: str) -> list[dict[str, Any]]:
    doc = get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    return list(doc["data"]["result"]) if doc and doc.get("status") == "success" else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send(proxies: dict[str, ProcessServer], plan: dict[str, list[str]]) -> None:
    """The plan's requests, interleaved across variants (production and a canary see the
    same load at the same time: their latencies differ by what they are, not by when)."""
    queues = [[(proxies[v].url, m) for m in models] for v, models in plan.items()]
    jobs = [job for row in zip_longest(*queues) for job in row if job is not None]

    def one(job: tuple[str, str]) -> int:
        url, model = job
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, jobs))
    assert statuses == [500 if model == FAIL else 200 for _, model in jobs]


def start_prometheus(tmp: Path, targets: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: zaiproxy\n"
        f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n")
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=log, cwd=tmp)
    log.close()
    return proc, f"http://127.0.0.1:{port}"


def requests_by_variant(prometheus: str) -> dict[str, float]:
    rows = promql(prometheus, 'sum by (variant) '
                              '(zai_proxy_requests_total{path="/v1/chat/completions"})')
    return {r["metric"]["variant"]: float(r["value"][1]) for r in rows}


def collector_requests(collector: str) -> dict[str, float]:
    status = get(f"{collector}/admin/status", TOKEN) or {}
    return {v: e["requests"] for v, e in status.get("variants", {}).items()}


def history_requests(proxy: str, variant: str) -> float:
    """API requests in a proxy's history (its recorder's) over the last 5 minutes."""
    doc = get(f"{proxy}/admin/history?range=5m&variant={variant}") or {}
    points = doc.get("series", {}).get("series", {}).get(variant, [])
    return float(sum(p["requests"] for p in points))


def collector_scrapes(collector: str) -> int:
    status = get(f"{collector}/admin/status", TOKEN) or {}
    return min((t["scrapes"] for t in status.get("targets", [])), default=0)


@pytest.fixture(scope="module")
def fleet(mock: ProcessServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("canary")
    proxies: dict[str, ProcessServer] = {}
    children: list[ProcessServer] = []
    prometheus: subprocess.Popen[bytes] | None = None
    prom_url: str | None = None

    def serve(variant: str) -> ProcessServer:
        return start_process(["serve", "--port", "0", "--workers", "1"],
                             env=upstream_env(mock, DEPLOYMENT_VARIANT=variant),
                             stderr_path=tmp / f"{variant}.log")

    try:
        with ThreadPoolExecutor(len(VARIANTS)) as pool:
            started = dict(zip(VARIANTS, pool.map(serve, VARIANTS), strict=True))
        proxies.update(started)
        children += started.values()
        targets = [p.url.removeprefix("http://") for p in proxies.values()]
        if os.access(PROMETHEUS, os.X_OK):
            prometheus, prom_url = start_prometheus(tmp, targets)
        collector = start_process(
            ["collect", *(a for p in proxies.values() for a in ("--target", p.url)),
             "--interval", "1s", "--db", str(tmp / "collector.duckdb"), "--port", "0",
             "--admin-token", TOKEN], env=None, stderr_path=tmp / "collector.log")
        children.append(collector)

        def all_up() -> bool:
            doc = get(f"{prom_url}/api/v1/targets") or {}
            active = doc.get("data", {}).get("activeTargets", [])
            return len(active) == len(VARIANTS) and all(t["health"] == "up" for t in active)

        if prom_url is not None:
            poll("Prometheus to scrape every proxy", all_up)
        poll("the collector to scrape every proxy twice", lambda: collector_scrapes(
            collector.url) >= 2)

        # Warm up every series, wait until Prometheus has sampled it, then count.
        send(proxies, WARM_UP)
        warm = {v: float(len(m)) for v, m in WARM_UP.items()}
        if prom_url is not None:
            poll("Prometheus to see the warm-up",
                 lambda: requests_by_variant(prom_url) == warm)
        send(proxies, TRAFFIC)
        total = {v: warm[v] + len(TRAFFIC[v]) for v in VARIANTS}
        if prom_url is not None:
            poll("Prometheus to see the traffic",
                 lambda: requests_by_variant(prom_url) == total)
        poll("the collector to see the traffic", lambda: collector_requests(
            collector.url) == total)
        # Each recorder batches rows (<= 100 ms) and then writes them: wait until every
        # proxy's own history has the traffic (the series count API routes only).
        poll("every proxy's history to have the traffic", lambda: all(
            history_requests(proxies[v].url, v) == total[v] for v in VARIANTS))
        seen = collector_scrapes(collector.url)  # that round's rows are being written:
        poll("one more collector round", lambda: collector_scrapes(collector.url) > seen)

        # A canary whose only pod went away after it was scraped.
        gone = proxies["canary-gone"]
        assert gone.stop() == 0
        instance = gone.url.removeprefix("http://")
        if prom_url is not None:
            poll("Prometheus to see canary-gone down", lambda: [
                r["value"][1] for r in promql(prom_url, f'up{{instance="{instance}"}}')]
                == ["0"])
        poll("the collector to see canary-gone stale", lambda: (get(
            f"{collector.url}/admin/status", TOKEN) or {}).get("variants", {}).get(
            "canary-gone", {}).get("stale_targets") == 1)
        yield Fleet(proxies, prom_url, collector.url)
    finally:
        if prometheus is not None:
            prometheus.send_signal(signal.SIGTERM)
            try:
                prometheus.wait(15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        for child in children:
            child.stop(timeout=15)


def check(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZAIPROXY_")}
    return subprocess.run([sys.executable, "-m", "zaiproxy", "canary-check", "--window", "1m",
                           "--min-requests", MIN_REQUESTS, *argv],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def source_args(fleet: Fleet, source: str, canary: str = "canary") -> list[str]:
    if source == "prometheus":
        if fleet.prometheus is None:
            pytest.fail("Prometheus is not installed at /usr/bin/prometheus: `make test` "
                        "installs Debian's prometheus package")
        return ["--prometheus", fleet.prometheus, "--canary", canary]
    if source == "proxies":  # each proxy's own admin API; no admin token configured
        return ["--url", fleet.proxies["production"].url, "--url", fleet.proxies[canary].url,
                "--canary", canary]
    return ["--url", fleet.collector, "--token", TOKEN, "--canary", canary]


def lines_by_signal(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines()[3:]}


SOURCES = ["prometheus", "collector", "proxies"]


@pytest.mark.parametrize("source", SOURCES)
def test_a_bad_canary_is_rolled_back(fleet: Fleet, source: str) -> None:
    done = check(*source_args(fleet, source, "canary-bad"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("ROLL BACK: bad: error_rate\n"), done.stdout
    line = lines_by_signal(done.stdout)["error_rate"]
    assert " bad " in line and "with 5xx, above 10.0% (production 0.0%)" in line
    assert done.stderr == ""


@pytest.mark.parametrize("source", SOURCES)
def test_a_slow_canary_is_rolled_back(fleet: Fleet, source: str) -> None:
    done = check(*source_args(fleet, source, "canary-slow"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("ROLL BACK: bad: "), done.stdout
    signals = lines_by_signal(done.stdout)
    assert " bad " in signals["latency_p95"] and "above 2x" in signals["latency_p95"]
    assert " ok " in signals["error_rate"], signals["error_rate"]  # slow, not failing


@pytest.mark.parametrize("source", SOURCES)
def test_a_good_canary_is_promoted(fleet: Fleet, source: str) -> None:
    done = check(*source_args(fleet, source), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["verdict"] == "PROMOTE", doc
    assert {s["name"]: s["status"] for s in doc["signals"]} == {
        "targets": "ok", "requests": "ok", "error_rate": "ok", "latency_p95": "ok",
        "ttft_p95": "ok", "rate_limited": "ok", "usage_missing": "ok"}
    canary, production = doc["variants"]["canary"], doc["variants"]["production"]
    for w in (canary, production):
        assert 55 <= w["requests"] <= 75 and w["server_errors"] == 0
        assert w["targets"] == 1 and w["targets_down"] == 0
        assert 0.15 < w["latency_p95"] < 1 and w["usage_missing"] == 0  # the delay
        if source == "proxies":  # the recorders' counts are exact: warm-up + traffic
            assert (w["requests"], w["ok"]) == (61, 61) and 0.15 < w["ttft_p95"] < 1
    if source == "proxies":
        assert doc["source"] == {"kind": "proxies", "proxies": [
            {"url": fleet.proxies[v].url, "variant": v, "answered": True}
            for v in ("production", "canary")]}


@pytest.mark.parametrize("source", SOURCES)
def test_too_little_traffic_waits(fleet: Fleet, source: str) -> None:
    done = check(*source_args(fleet, source, "canary-idle"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.startswith("WAIT: not enough traffic: canary has "), done.stdout
    assert "no-data" in lines_by_signal(done.stdout)["error_rate"]


@pytest.mark.parametrize("source", SOURCES)
def test_a_canary_whose_targets_are_down_is_rolled_back(fleet: Fleet, source: str) -> None:
    done = check(*source_args(fleet, source, "canary-gone"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("ROLL BACK: bad: targets\n"), done.stdout
    assert "1 of 1 canary targets down (100.0%)" in lines_by_signal(done.stdout)["targets"]
    if source == "proxies":  # its URL refuses connections: the variant no proxy answered for
        assert done.stdout.splitlines()[1].endswith(
            f"{fleet.proxies['canary-gone'].url} (canary-gone: did not answer)")


def test_one_proxy_alone_is_inconclusive(fleet: Fleet) -> None:
    done = check("--url", fleet.proxies["canary"].url)
    assert (done.returncode, done.stdout) == (2, "")
    assert "is a proxy, and a proxy serves one variant (this one 'canary'): give both " \
        "proxies" in done.stderr, done.stderr


def test_a_wrong_token_is_inconclusive(fleet: Fleet) -> None:
    done = check("--url", fleet.collector, "--token", "wrong")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("zaiproxy canary-check: inconclusive: ")
    assert "HTTP 401" in done.stderr and "Traceback" not in done.stderr
