"""Direct-to-mock vs through-the-proxy throughput and latency, measured with ``wrk``.

Run it from the repository root::

    .venv/bin/python -m bench.wrk_compare [--duration 10] [--proxy-workers 2] [--mock-workers 2]

What it does:

1. starts ``zaiproxy mock-upstream`` (several processes, so the upstream is not the bottleneck)
   and ``zaiproxy serve`` pointed at it, as child processes; each child's port comes from the
   one line it prints once every worker is ready;
2. for every scenario (non-streaming at -c1 and -c64, a 50-event stream at -c64) checks one
   sample request with ``http.client`` on each target (200, a parseable completion, a stream
   that ends with ``data: [DONE]``), warms both targets up, then runs ``wrk --latency`` against
   the mock directly and against the proxy, interleaved (direct, proxy, direct, proxy, ...);
   ``bench/wrk/chat.lua`` builds the POST and prints the totals and percentiles from ``done()``;
3. during every run samples the proxy's and the mock's whole process trees (the process plus
   its descendants, found through ``/proc/PID/task/TID/children``, or by scanning every
   ``/proc/PID/stat`` for parent pids where the kernel lacks that file; bench/procs.py): CPU
   time from ``/proc/PID/stat`` (utime + stime, difference over the run) and VmRSS every
   200 ms; wrk's own CPU comes from ``getrusage(RUSAGE_CHILDREN)`` and the machine's from
   ``/proc/stat``, so the report shows where the cores went (this matters on a small machine,
   where wrk, the mock and the proxy share the same cores);
4. writes ``results.json`` and ``results.md`` under ``<out>/<UTC timestamp>/`` (next to the raw
   wrk output and the children's logs), prints the Markdown tables and stops the children
   (SIGTERM, wait, SIGKILL only if they hang).

Every wrk run is bounded by ``-d``; nothing here loops without an end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import http.client
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import (
    BenchError,
    Child,
    TreeSampler,
    all_cpu_seconds,
    busiest_others,
    child_env,
    command_line,
    fmt_delta_ms,
    fmt_errors,
    fmt_ms,
    log,
    log_counts,
    machine_cpu_seconds,
    machine_info,
)

BENCH_DIR = Path(__file__).resolve().parent
LUA_SCRIPT = BENCH_DIR / "wrk" / "chat.lua"
API_KEY = "bench-upstream-key"
DIRECT_PATH = "/api/paas/v4/chat/completions"
PROXY_PATH = "/v1/chat/completions"
WRK_TIMEOUT = "10s"  # wrk's per-request timeout (its default of 2 s would hide slow tails)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    threads: int
    connections: int
    stream: bool = False
    chunks: int = 0

    def body(self) -> bytes:
        """The request body; keep it identical to the one bench/wrk/chat.lua sends."""
        stream = "true" if self.stream else "false"
        return (
            '{"model":"glm-4.6","stream":' + stream
            + ',"messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
        ).encode()

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
        if self.stream:
            headers["Accept"] = "text/event-stream"
            headers["x-mock-chunks"] = str(self.chunks)
        return headers

    def wrk_env(self) -> dict[str, str]:
        return {
            "BENCH_API_KEY": API_KEY,
            "BENCH_STREAM": "1" if self.stream else "0",
            "BENCH_CHUNKS": str(self.chunks),
        }


SCENARIOS = (
    Scenario("json-c1", "non-streaming, wrk -t1 -c1", threads=1, connections=1),
    Scenario("json-c64", "non-streaming, wrk -t2 -c64", threads=2, connections=64),
    Scenario("sse50-c64", "streaming, 50 events, wrk -t2 -c64", threads=2, connections=64,
             stream=True, chunks=50),
)


# ---- requests -------------------------------------------------------------------------------


def check_sample(url: str, scenario: Scenario) -> dict[str, Any]:
    """One request with http.client: 200 and a well-formed completion or stream, else raise."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request("POST", parts.path, body=scenario.body(), headers=scenario.headers())
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise BenchError(f"{url}: HTTP {response.status}: {body[:300]!r}")
    if scenario.stream:
        events = [line for line in body.decode().splitlines() if line.startswith("data:")]
        if not events or events[-1].strip() != "data: [DONE]":
            raise BenchError(f"{url}: the stream does not end with 'data: [DONE]': {body[-300:]!r}")
        if len(events) - 1 < scenario.chunks:
            raise BenchError(f"{url}: {len(events) - 1} events, expected >= {scenario.chunks}")
        return {"status": 200, "bytes": len(body), "data_events": len(events)}
    content = json.loads(body)["choices"][0]["message"]["content"]
    if not content:
        raise BenchError(f"{url}: empty completion: {body[:300]!r}")
    return {"status": 200, "bytes": len(body)}


def run_wrk(url: str, scenario: Scenario, duration: float, raw_path: Path | None) -> dict[str, Any]:
    """One bounded wrk run; return the totals from chat.lua's done() line and wrk's CPU time."""
    cmd = [
        "wrk", f"-t{scenario.threads}", f"-c{scenario.connections}", f"-d{duration:g}s",
        "--timeout", WRK_TIMEOUT, "--latency", "-s", str(LUA_SCRIPT), url,
    ]
    env = {**os.environ, **scenario.wrk_env()}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the servers are not reaped yet
    if raw_path is not None:
        raw_path.write_text(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    match = re.search(r"^BENCH_RESULT (\{.*\})$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    result: dict[str, Any] = json.loads(match.group(1))
    seconds = result["duration_us"] / 1e6
    result["rps"] = result["requests"] / seconds if seconds else 0.0
    result["errors_total"] = sum(result["errors"].values())
    result["wrk_cpu_seconds"] = round(
        (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3
    )
    result["wall_seconds"] = round(wall, 3)
    result["command"] = shlex.join(cmd)
    return result


@dataclass
class Targets:
    direct: str
    proxy: str

    def items(self) -> list[tuple[str, str]]:
        return [("direct", self.direct), ("proxy", self.proxy)]


@dataclass
class Bench:
    args: argparse.Namespace
    out_dir: Path
    mock: Child
    proxy: Child
    targets: Targets
    runs: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def measured_run(self, scenario: Scenario, target: str, repeat: int) -> dict[str, Any]:
        url = getattr(self.targets, target)
        raw = self.out_dir / f"wrk-{scenario.name}-{target}-{repeat}.txt"
        load_before = os.getloadavg()[0]
        machine_before, processes_before = machine_cpu_seconds(), all_cpu_seconds()
        started = time.monotonic()
        with TreeSampler(self.proxy.pid) as proxy_tree, TreeSampler(self.mock.pid) as mock_tree:
            result = run_wrk(url, scenario, self.args.duration, raw)
        window = time.monotonic() - started
        machine_after, processes_after = machine_cpu_seconds(), all_cpu_seconds()
        busy = machine_after["busy"] - machine_before["busy"]
        proxy_report = proxy_tree.report()
        mock_report = mock_tree.report()
        ours = proxy_report["cpu_seconds"] + mock_report["cpu_seconds"] + result["wrk_cpu_seconds"]
        our_pids = {os.getpid()} | set(proxy_tree.cpu_end) | set(mock_tree.cpu_end)
        run = {
            "scenario": scenario.name,
            "target": target,
            "repeat": repeat,
            "url": url,
            **result,
            "window_seconds": round(window, 3),
            "loadavg_1m_before": load_before,
            "machine_busy_core_seconds": round(busy, 3),
            "machine_steal_core_seconds": round(machine_after["steal"] - machine_before["steal"], 3),
            # Busy time nobody in the benchmark accounts for: other people's processes, short-lived
            # ones, kernel work (softirq) not charged to a process.
            "other_core_seconds": round(max(0.0, busy - ours), 3),
            "busiest_other_processes": busiest_others(
                processes_before, processes_after, our_pids
            ),
            "proxy": proxy_report,
            "mock": mock_report,
        }
        if result["requests"]:
            per_request = 1e6 / result["requests"]
            run["mock_cpu_us_per_request"] = round(mock_report["cpu_seconds"] * per_request, 1)
            run["wrk_cpu_us_per_request"] = round(result["wrk_cpu_seconds"] * per_request, 1)
            if target == "proxy":
                run["proxy_cpu_us_per_request"] = round(
                    proxy_report["cpu_seconds"] * per_request, 1
                )
        return run

    def run_scenario(self, scenario: Scenario) -> None:
        log(f"== {scenario.name}: {scenario.description}")
        for target, url in self.targets.items():
            check = check_sample(url, scenario)
            self.checks.append({"scenario": scenario.name, "target": target, **check})
            log(f"   sample via {target}: {check}")
        if self.args.warmup > 0:
            for _target, url in self.targets.items():
                run_wrk(url, scenario, self.args.warmup, None)
        for repeat in range(1, self.args.repeat + 1):
            for target in ("direct", "proxy"):
                run = self.measured_run(scenario, target, repeat)
                self.runs.append(run)
                log(f"   {target:6} run {repeat}: {run['rps']:9.0f} req/s  "
                    f"p50 {fmt_ms(run['latency_us']['p50'])}  "
                    f"p99 {fmt_ms(run['latency_us']['p99'])}  errors {run['errors_total']}")


# ---- report ---------------------------------------------------------------------------------


def pair_runs(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    direct = {(r["scenario"], r["repeat"]): r for r in runs if r["target"] == "direct"}
    return [
        (direct[(r["scenario"], r["repeat"])], r)
        for r in runs
        if r["target"] == "proxy" and (r["scenario"], r["repeat"]) in direct
    ]


def comparisons(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for direct, proxy in pair_runs(runs):
        out.append({
            "scenario": proxy["scenario"],
            "repeat": proxy["repeat"],
            "rps_ratio_proxy_direct": round(proxy["rps"] / direct["rps"], 3) if direct["rps"] else None,
            "added_p50_us": round(proxy["latency_us"]["p50"] - direct["latency_us"]["p50"], 1),
            "added_p99_us": round(proxy["latency_us"]["p99"] - direct["latency_us"]["p99"], 1),
            "proxy_cpu_us_per_request": proxy.get("proxy_cpu_us_per_request"),
            "proxy_peak_rss_mb": proxy["proxy"]["peak_rss_mb"],
            "proxy_worker_max_rss_mb": [
                p["max_rss_mb"] for p in proxy["proxy"]["processes"] if p["role"] == "worker"
            ],
        })
    return out


def markdown(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    by_key = {(c["scenario"], c["repeat"]): c for c in comparisons(runs)}
    lines = [
        "| scenario | target | req/s | p50 | p99 | errors | rps proxy/direct "
        "| added p50 | added p99 | proxy CPU µs/req | proxy peak RSS MB |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    several = meta["options"]["repeat"] > 1
    for run in runs:
        name = run["scenario"] + (f" #{run['repeat']}" if several else "")
        cells = [name, run["target"], f"{run['rps']:,.0f}", fmt_ms(run["latency_us"]["p50"]),
                 fmt_ms(run["latency_us"]["p99"]), fmt_errors(run["errors"])]
        comparison = by_key.get((run["scenario"], run["repeat"]))
        if run["target"] == "proxy" and comparison is not None:
            ratio = comparison["rps_ratio_proxy_direct"]
            cpu = comparison["proxy_cpu_us_per_request"]
            cells += [
                f"{ratio:.2f}" if ratio is not None else "n/a",
                fmt_delta_ms(comparison["added_p50_us"]),
                fmt_delta_ms(comparison["added_p99_us"]),
                f"{cpu:,.0f}" if cpu is not None else "n/a",
                f"{comparison['proxy_peak_rss_mb']:.1f} (workers max "
                + " / ".join(f"{mb:.1f}" for mb in comparison["proxy_worker_max_rss_mb"]) + ")",
            ]
        else:
            cells += ["—"] * 5
        lines.append("| " + " | ".join(cells) + " |")

    lines += [
        "",
        "Where the CPU went during each run (core-seconds / window, 100% = one core; "
        f"the machine has {meta['machine']['nproc']} cores). \"other\" is busy time outside "
        "wrk, the mock and the proxy (other processes on this shared machine, kernel work not "
        "charged to a process); \"steal\" is time the hypervisor took.",
        "",
        "| scenario | target | wrk | mock | proxy | proxy per process | other | steal "
        "| busiest other processes | mock µs/req |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for run in runs:
        window = run["window_seconds"] or 1.0

        def pct(seconds: float, window: float = window) -> str:
            return f"{100 * seconds / window:.0f}%"

        per_process = ", ".join(
            f"{p['role']} {pct(p['cpu_seconds'])}" for p in run["proxy"]["processes"]
        )
        others = ", ".join(
            f"{p['comm']} {pct(p['cpu_seconds'])}"
            for p in run["busiest_other_processes"] if p["cpu_seconds"] >= 0.05 * window
        )
        name = run["scenario"] + (f" #{run['repeat']}" if several else "")
        lines.append(
            f"| {name} | {run['target']} | {pct(run['wrk_cpu_seconds'])} "
            f"| {pct(run['mock']['cpu_seconds'])} | {pct(run['proxy']['cpu_seconds'])} "
            f"| {per_process} | {pct(run['other_core_seconds'])} "
            f"| {pct(run['machine_steal_core_seconds'])} | {others or '—'} "
            f"| {run.get('mock_cpu_us_per_request', 0):,.0f} |"
        )
    return "\n".join(lines) + "\n"


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.wrk_compare",
        description="wrk against the mock upstream: direct vs through zaiproxy.",
    )
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per measured wrk run (default 10)")
    parser.add_argument("--proxy-workers", type=int, default=2,
                        help="zaiproxy serve --workers (default 2)")
    parser.add_argument("--mock-workers", type=int, default=2,
                        help="mock-upstream --workers (default 2)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of unrecorded wrk load on each target before each "
                             "scenario (default 2; 0 to skip)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measured direct/proxy pairs per scenario, interleaved (default 1)")
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS],
                        help="run only this scenario (repeatable; default: all)")
    parser.add_argument("--render", type=Path, metavar="RESULTS_DIR",
                        help="run nothing: rewrite RESULTS_DIR/results.md from its results.json")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="turn the proxy's per-request log line off (on by default, "
                             "as in production)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="results directory; each run writes <out>/<UTC timestamp>/ "
                             "(default bench/results)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.repeat < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --repeat >= 1")
    if args.proxy_workers < 1 or args.mock_workers < 1:
        parser.error("worker counts must be >= 1")
    return args


def start_children(args: argparse.Namespace, out_dir: Path) -> tuple[Child, Child]:
    python = sys.executable
    mock = Child("mock", [
        python, "-m", "zaiproxy", "mock-upstream", "--host", "127.0.0.1", "--port", "0",
        "--workers", str(args.mock_workers), "--api-key", API_KEY,
    ], child_env({}), out_dir)
    try:
        mock_url = mock.wait_listening()
    except BenchError:
        mock.stop()
        raise
    log(mock.line)
    proxy = Child("proxy", [
        python, "-m", "zaiproxy", "serve", "--host", "127.0.0.1", "--port", "0",
        "--workers", str(args.proxy_workers),
    ], child_env({
        "ZAI_API_KEY": API_KEY,
        "ZAIPROXY_OPENAI_BASE_URL": f"{mock_url}/api/paas/v4",
        "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock_url}/api/anthropic",
        "ZAIPROXY_NATIVE_BASE_URL": mock_url,
        # The product's defaults: one JSON access-log line per request (to a file here).
        "ZAIPROXY_ACCESS_LOG": "true" if args.access_log else "false",
        "ZAIPROXY_DRAIN_TIMEOUT": "5",
        "LOG_LEVEL": "info" if args.access_log else "warning",
        # `ZAIPROXY_HTTP_IMPL=h11-mypyc make bench` measures the compiled h11.
        "ZAIPROXY_HTTP_IMPL": os.environ.get("ZAIPROXY_HTTP_IMPL", "h11"),
    }), out_dir)
    return mock, proxy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        return render_again(args.render)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out / stamp
    out_dir.mkdir(parents=True)
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    meta: dict[str, Any] = {
        "timestamp_utc": stamp,
        "command": command_line("bench.wrk_compare"),
        "machine": machine_info(wrk=wrk_version()),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "scenarios": [dataclasses.asdict(s) for s in scenarios],
        "notes": NOTES,
    }
    mock, proxy = start_children(args, out_dir)
    exit_codes: dict[str, int | None] = {}
    try:
        proxy.wait_listening()
        log(proxy.line)
        meta["mock_line"], meta["proxy_line"] = mock.line, proxy.line
        with TreeSampler(proxy.pid) as idle:
            pass
        meta["proxy_idle"] = idle.report()
        targets = Targets(direct=mock.url + DIRECT_PATH, proxy=proxy.url + PROXY_PATH)
        bench = Bench(args, out_dir, mock, proxy, targets)
        for scenario in scenarios:
            bench.run_scenario(scenario)
    finally:
        exit_codes["proxy"] = proxy.stop()
        exit_codes["mock"] = mock.stop()
        log(f"children stopped: exit codes {exit_codes}")
    meta["exit_codes"] = exit_codes
    meta["proxy_log_counts"] = log_counts(proxy.stderr_path)
    results = {**meta, "checks": bench.checks, "runs": bench.runs,
               "comparisons": comparisons(bench.runs)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out_dir, results)
    return 0


def wrk_version() -> str:
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return " ".join((wrk.stdout + wrk.stderr).split()[:2])  # "wrk debian/4.1.0-3+b2"


def render_again(out_dir: Path) -> int:
    """Rewrite results.md (and print it) from an earlier run's results.json."""
    results = json.loads((out_dir / "results.json").read_text())
    write_report(out_dir, results)
    return 0


def write_report(out_dir: Path, results: dict[str, Any]) -> None:
    table = markdown(results, results["runs"])
    (out_dir / "results.md").write_text(render_md(results, table))
    print(table)
    print(f"results: {out_dir}/results.md, results.json")


NOTES = [
    "wrk, the mock and the proxy share the machine's cores: the proxy's req/s is bounded by "
    "the cores left to it, not only by its own cost",
    "errors: wrk's socket errors (connect, read, write, timeout) and `status`, its count of "
    "responses with a status > 399",
    "streaming latency is wrk's time to the end of the whole response (wrk cannot time the "
    "first byte)",
    "proxy CPU µs/req = CPU time (utime + stime) of the proxy's supervisor and workers during "
    "the run / requests completed; peak RSS = the largest sum of VmRSS over the proxy's "
    "processes, sampled every 200 ms",
]


def render_md(meta: dict[str, Any], table: str) -> str:
    machine = meta["machine"]
    options = meta["options"]
    header = [
        f"# wrk: direct to the mock vs through zaiproxy ({meta['timestamp_utc']})",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {machine['nproc']} cores, {machine['cpu_model']}, Linux "
        f"{machine['kernel']}, Python {machine['python']}, {machine['wrk']}; "
        f"load average at start {machine['loadavg_at_start'][0]:.2f}",
        f"- `{meta['proxy_line']}`",
        f"- `{meta['mock_line']}`",
        f"- {options['duration']:g} s per run, {options['warmup']:g} s warm-up per target "
        f"and scenario, {options['repeat']} run(s) per target, interleaved direct/proxy",
        f"- proxy idle before load: {meta['proxy_idle']['peak_rss_mb']:.1f} MB RSS "
        "(supervisor + resource tracker + workers)",
        f"- children's exit codes: {meta['exit_codes']}",
        "",
        "",
    ]
    logged = meta.get("proxy_log_counts") or {}
    notes = [
        "",
        *(f"- {note}" for note in meta["notes"]),
        "- proxy log lines during the whole run (proxy.stderr.log): "
        + (", ".join(f"{key}: {count}" for key, count in sorted(logged.items())) or "none"),
        "",
    ]
    return "\n".join(header) + table + "\n".join(notes)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f"bench.wrk_compare: {exc}")
