"""The bench suite: the mock upstream directly, through zaiproxy and through nginx, in one run.

Run it from the repository root (``make bench`` does)::

    python -m bench.suite [--duration 5] [--repeat 3] [--warmup 1] [--scenario NAME]...
                          [--target direct|proxy|proxy-mypyc|nginx]... [--proxy-workers 2]
                          [--mock-workers 2] [--baseline DIR]
    python -m bench.suite --render bench/results/<stamp>     # rewrite results.md only

What it does:

1. starts ``zaiproxy mock-upstream --workers 2``, ``zaiproxy serve --workers 2`` with every
   feature on (token counting, a client keys file, global and per-key limits that never refuse,
   the adaptive rate, metrics, DuckDB history, the access log) and nginx (bench/nginx.py), each
   on a free port, and times each from spawn to its first 200 for the ``json`` request, polled
   every 10 ms;
2. for every scenario: fetches the expected response once from the mock directly (its bytes
   are deterministic), sends the same request once through every target with ``http.client``
   (status and bytes compared: a wrong status stops the run, different bytes are reported),
   then runs the load generator (bench/loadgen, closed loop at fixed concurrency) ``--repeat``
   times against each target, interleaved (direct, proxy, nginx, direct, ...), each run
   ``--warmup`` unrecorded seconds and ``--duration`` measured ones, verifying every response:
   status, the byte-identical body and, for streams, ``data: [DONE]`` and usage at the end;
3. over every measured window samples the target's whole process tree (CPU time, RSS; the mock's
   too, and the machine's busy and steal time from /proc/stat; bench/procs.py); in the 429
   storm a second load generator sends the ``json`` request at concurrency 1 through the same
   target, the probe of the target's responsiveness;
4. writes ``results.json`` (everything) and ``results.md`` (medians over the repeats) under
   ``<out>/<UTC timestamp>/``, next to the children's logs, prints the Markdown and stops the
   children (SIGTERM; nginx SIGQUIT then SIGTERM; SIGKILL if one hangs).

Every load run is bounded by its duration; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen, nginx
from bench.procs import (
    BenchError,
    Child,
    TreeSampler,
    WindowSampler,
    all_cpu_seconds,
    busiest_others,
    child_env,
    command_line,
    fmt_delta_ms,
    fmt_errors,
    fmt_ms,
    log,
    log_counts,
    machine_info,
)

UPSTREAM_KEY = "bench-upstream-key"  # the mock's key: zaiproxy and nginx inject it
CLIENT_KEY = "bench-client-key"  # the one key of zaiproxy's keys file
DIRECT_PATH = "/api/paas/v4/chat/completions"
PUBLIC_PATH = "/v1/chat/completions"  # zaiproxy's, which nginx maps to DIRECT_PATH
TARGETS = ("direct", "proxy", "proxy-mypyc", "baseline", "nginx")
DEFAULT_TARGETS = ("direct", "proxy", "nginx")  # proxy-mypyc: zaiproxy on h11-mypyc, opt-in
PROXY_IMPLS = {"proxy": None, "proxy-mypyc": "h11-mypyc"}  # None: $ZAIPROXY_HTTP_IMPL or h11
# "baseline": zaiproxy as built in another checkout (--baseline DIR), e.g. a worktree of the
# commit before a change: measured in the same run, interleaved, beside "proxy".
PROXY_TARGETS = (*PROXY_IMPLS, "baseline")
READY_TIMEOUT = 60.0  # seconds from spawn to the first 200
POLL_INTERVAL = 0.01  # seconds between start-up probes
# A start-up probe waits this long for its answer (a connection waits in the accept queue until
# a worker is up), then the child's exit is checked and the probe sent again.
POLL_ATTEMPT_TIMEOUT = 2.0
SAMPLE_TIMEOUT = 60.0  # seconds for one sample request (a proxied 429 is retried for seconds)
LOAD_TIMEOUT = 30.0  # the load generator's per-request timeout
MIN_PER_CONNECTION = 20  # fewer completed requests per connection: see served_rate()
PAUSE = 0.2  # seconds between load runs, so one run's closing sockets do not land in the next
# Limits that never refuse: requests and concurrency far above what 2 cores serve, tokens at
# the ledger's maximum (zaiproxy/core/limitspec.py LIMIT_MAX).
HIGH_REQUESTS = 1_000_000_000
HIGH_TOKENS = 1_000_000_000_000
HIGH_CONCURRENCY = 100_000
SHORT_PROMPT = "Say hello in one short sentence."
FILLER = "The quick brown fox jumps over the lazy dog while the bench counts its tokens. "


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    connections: int
    stream: bool = False
    chunks: int | None = None  # x-mock-chunks; None: the mock's default (10 deltas of 16 bytes)
    chunk_delay: float | None = None  # x-mock-chunk-delay, seconds between events
    prompt_bytes: int = 0  # pad the user message to this many bytes; 0: SHORT_PROMPT
    zai_code: int | None = None  # the mock answers HTTP 429 with this Z.AI business code
    probe: bool = False  # also run the json-c1 request at concurrency 1 through the target

    @property
    def expect_status(self) -> int:
        return 429 if self.zai_code is not None else 200

    def body(self) -> bytes:
        content = SHORT_PROMPT
        if self.prompt_bytes:
            content = (FILLER * (self.prompt_bytes // len(FILLER) + 1))[: self.prompt_bytes]
        payload: dict[str, Any] = {"model": "glm-4.6"}
        if self.stream:
            payload |= {"stream": True, "stream_options": {"include_usage": True}}
        payload["messages"] = [{"role": "user", "content": content}]
        return json.dumps(payload, separators=(",", ":")).encode()

    def headers(self, key: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        if self.stream:
            headers["Accept"] = "text/event-stream"
        if self.chunks is not None:
            headers["x-mock-chunks"] = str(self.chunks)
        if self.chunk_delay is not None:
            headers["x-mock-chunk-delay"] = f"{self.chunk_delay:g}"
        if self.zai_code is not None:
            headers["x-mock-status"] = "429"
            headers["x-mock-zai-code"] = str(self.zai_code)
        return headers


SCENARIOS = (
    Scenario("json-c1", "non-streaming (~650-byte response), concurrency 1", 1),
    Scenario("json-c64", "non-streaming, concurrency 64", 64),
    Scenario("sse50-c64", "stream of 50 deltas written at once, concurrency 64", 64,
             stream=True, chunks=50),
    Scenario("sse50-paced-c256", "stream of 50 deltas 20 ms apart, concurrency 256", 256,
             stream=True, chunks=50, chunk_delay=0.02),
    Scenario("prompt200k-c8", "200 KB prompt (token estimate), non-streaming, concurrency 8", 8,
             prompt_bytes=200_000),
    Scenario("zai429-c64", "Z.AI 429 code 1303 for every request, concurrency 64, with a "
             "json probe at concurrency 1", 64, zai_code=1303, probe=True),
)
PROBE = SCENARIOS[0]


@dataclass
class Target:
    """One server the load generator measures, and the process tree that serves it."""

    name: str
    port: int
    path: str
    key: str  # what the client sends as its bearer key
    child: Child
    startup_s: float  # spawn to the first 200

    def request(self, scenario: Scenario) -> bytes:
        return loadgen.http_request("POST", self.path, scenario.headers(self.key),
                                    scenario.body(), port=self.port)


def free_port() -> int:
    """A port nothing listens on right now (the child binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fetch(port: int, path: str, scenario: Scenario, key: str,
          timeout: float = SAMPLE_TIMEOUT) -> tuple[int, bytes]:
    """One request with http.client: (status, de-chunked body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=scenario.body(), headers=scenario.headers(key))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def first_200(child: Child, port: int, path: str, key: str,
              logs: Callable[[], str]) -> float:
    """Seconds from the child's spawn to its first 200 for the json request, polling every
    POLL_INTERVAL; raise with ``logs()`` if it exits or READY_TIMEOUT passes."""
    deadline = child.started + READY_TIMEOUT
    last = "no answer"
    while (now := time.monotonic()) < deadline:
        if child.proc.poll() is not None:
            raise BenchError(f"{child.name} exited with code {child.proc.returncode} before "
                             f"answering 200 ({last}):\n{logs()}")
        try:
            status, body = fetch(port, path, PROBE, key,
                                 timeout=min(POLL_ATTEMPT_TIMEOUT, deadline - now))
        except OSError as exc:  # refused until the port is bound; reset while starting
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200:
                return time.monotonic() - child.started
            last = f"HTTP {status}: {body[:200]!r}"
        time.sleep(POLL_INTERVAL)
    raise BenchError(f"{child.name} gave no 200 within {READY_TIMEOUT:g} s ({last}):\n{logs()}")


def tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return f"{path}:\n{text or '(empty)'}"


def check_expected(scenario: Scenario, status: int, body: bytes) -> dict[str, Any]:
    """Check the mock's own answer before it becomes everybody's expected body."""
    if status != scenario.expect_status:
        raise BenchError(f"{scenario.name}: the mock answered {status}, expected "
                         f"{scenario.expect_status}: {body[:300]!r}")
    events = 0
    if scenario.stream:
        events = sum(1 for line in body.split(b"\n") if line.startswith(b"data:"))
        if not body.rstrip().endswith(b"data: [DONE]") or b'"usage"' not in body:
            raise BenchError(f"{scenario.name}: the mock's stream lacks [DONE] or usage at the "
                             f"end: {body[-300:]!r}")
    else:
        json.loads(body)  # a complete document
    return {"status": status, "bytes": len(body), "data_events": events,
            "sha256": hashlib.sha256(body).hexdigest()}


# ---- the run --------------------------------------------------------------------------------


@dataclass
class Suite:
    args: argparse.Namespace
    out_dir: Path
    mock: Child
    mock_port: int
    targets: list[Target]
    expected: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def checks_body(scenario: Scenario, target: Target) -> bool:
        """Whether the load generator compares bodies (NOTES["unchecked_bodies"]: why not)."""
        return not (scenario.zai_code is not None and target.name in PROXY_TARGETS)

    def load(self, scenario: Scenario, target: Target, expected: bytes,
             connections: int | None = None) -> dict[str, Any]:
        """One load generator run: ``--warmup`` unrecorded seconds, then ``--duration``
        measured ones; ``connections`` overrides the scenario's concurrency."""
        try:
            result: dict[str, Any] = loadgen.run(
                "127.0.0.1", target.port, target.request(scenario),
                connections=connections or scenario.connections,
                duration=self.args.duration, warmup=self.args.warmup,
                expect_status=(scenario.expect_status,),
                expect_body=expected if self.checks_body(scenario, target) else None,
                sse=scenario.stream, timeout=LOAD_TIMEOUT,
            )
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"load generator, {scenario.name} via {target.name}: {exc}") from exc
        return result

    def probe(self, target: Target) -> dict[str, Any]:
        """The json request at concurrency 1, alongside a measured run."""
        return self.load(PROBE, target, self.expected[PROBE.name]["body"], 1)

    def prepare(self, scenario: Scenario) -> bytes:
        """The expected body from the mock, then one sample request per target."""
        status, body = fetch(self.mock_port, DIRECT_PATH, scenario, UPSTREAM_KEY)
        self.expected[scenario.name] = {**check_expected(scenario, status, body), "body": body}
        # Kept so a run can be repeated by hand: bench/loadgen's --request and --expect-body.
        for sub in ("requests", "expected"):
            (self.out_dir / sub).mkdir(exist_ok=True)
        (self.out_dir / "expected" / f"{scenario.name}.body").write_bytes(body)
        if scenario.probe and PROBE.name not in self.expected:
            probe_status, probe_body = fetch(self.mock_port, DIRECT_PATH, PROBE, UPSTREAM_KEY)
            self.expected[PROBE.name] = {**check_expected(PROBE, probe_status, probe_body),
                                         "body": probe_body}
        for target in self.targets:
            (self.out_dir / "requests" / f"{scenario.name}-{target.name}.http").write_bytes(
                target.request(scenario))
            started = time.monotonic()
            got_status, got = fetch(target.port, target.path, scenario, target.key)
            sample = {
                "scenario": scenario.name, "target": target.name, "status": got_status,
                "bytes": len(got), "identical": got == body,
                "seconds": round(time.monotonic() - started, 3),
            }
            self.samples.append(sample)
            if got_status != scenario.expect_status:
                raise BenchError(f"{scenario.name} via {target.name}: HTTP {got_status}, "
                                 f"expected {scenario.expect_status}: {got[:300]!r}")
            if got != body:
                log(f"   WARNING: {scenario.name} via {target.name}: the body differs from the "
                    f"mock's ({len(got)} vs {len(body)} bytes); the load runs will count "
                    "body_mismatch errors")
        return body

    def run_scenario(self, scenario: Scenario) -> None:
        log(f"== {scenario.name}: {scenario.description}")
        expected = self.prepare(scenario)
        samples = [s for s in self.samples if s["scenario"] == scenario.name]
        log("   samples: " + ", ".join(
            f"{s['target']} {s['status']} {'identical' if s['identical'] else 'DIFFERENT'}"
            for s in samples))
        for repeat in range(1, self.args.repeat + 1):
            for target in self.targets:
                run = self.measure(scenario, target, expected, repeat)
                self.runs.append(run)
                summary = f"   {target.name:6} #{repeat}: {short(run)}"
                if "probe" in run:
                    summary += f"; probe: {short(run['probe'])}"
                log(summary)
                time.sleep(PAUSE)

    def measure(self, scenario: Scenario, target: Target, expected: bytes,
                repeat: int) -> dict[str, Any]:
        """One load run, with the target's and the mock's process trees and the machine read
        over the load generator's measured window: the last ``duration_s`` seconds before it
        exited (it stops at the window's end and only closes its sockets after it)."""

        def load_then_time() -> tuple[dict[str, Any], float]:
            return self.load(scenario, target, expected), time.monotonic()

        began = time.monotonic()
        own_before = time.process_time()
        processes_before = all_cpu_seconds()
        roots = {"target": target.child.pid, "mock": self.mock.pid}
        with WindowSampler(roots) as sampler, concurrent.futures.ThreadPoolExecutor(2) as pool:
            load = pool.submit(load_then_time)
            probe = pool.submit(self.probe, target) if scenario.probe else None
            result, ended = load.result()
            probe_result = probe.result() if probe is not None else None
        processes_after = all_cpu_seconds()
        start = ended - result["duration_s"]
        if not sampler.covers(start, ended):
            raise BenchError(f"{scenario.name} via {target.name}: the measured window "
                             f"({result['duration_s']} s) is longer than the run")
        # CPU times of the whole run (warm-up included) -> their share of the window.
        share = result["duration_s"] / (ended - began)
        own = share * (time.process_time() - own_before)
        loadgen_cpu = share * (result["cpu_s"] + (probe_result["cpu_s"] if probe_result else 0.0))
        target_report = sampler.report("target", start, ended)
        mock_report = sampler.report("mock", start, ended)
        machine = sampler.machine(start, ended)
        ours = target_report["cpu_seconds"] + loadgen_cpu + own
        if target.child is not self.mock:
            ours += mock_report["cpu_seconds"]
        our_pids = {os.getpid()} | set(sampler.roles)
        run: dict[str, Any] = {
            "scenario": scenario.name,
            "target": target.name,
            "repeat": repeat,
            **result,
            "body_checked": self.checks_body(scenario, target),
            "window_s": result["duration_s"],
            "run_wall_s": round(ended - began, 3),
            "loadgen_cpu_s": round(loadgen_cpu, 3),
            "suite_cpu_s": round(own, 3),
            "machine_busy_core_s": round(machine["busy"], 3),
            "machine_steal_core_s": round(machine["steal"], 3),
            # Busy time nobody in the benchmark accounts for: other processes on this machine,
            # kernel work (softirq) not charged to a process.
            "other_core_s": round(max(0.0, machine["busy"] - ours), 3),
            # Over the whole run, warm-up included: /proc has no history to interpolate.
            "busiest_other_processes": busiest_others(processes_before, processes_after,
                                                      our_pids),
            "target_tree": target_report,
            "mock_tree": mock_report,
        }
        if probe_result is not None:
            run["probe"] = probe_result
        rate, basis = served_rate(result)
        if rate:
            per_request = 1e6 / (rate * result["duration_s"])  # CPU seconds -> µs per request
            run |= {
                "served_rps": round(rate, 1), "served_rps_basis": basis,
                "cpu_us_per_request": round(target_report["cpu_seconds"] * per_request, 1),
                "mock_cpu_us_per_request": round(mock_report["cpu_seconds"] * per_request, 1),
                "loadgen_cpu_us_per_request": round(loadgen_cpu * per_request, 1),
            }
            if scenario.stream and result["events"]:
                events_per_request = result["events"] / result["requests"]
                run["cpu_us_per_event"] = round(run["cpu_us_per_request"] / events_per_request, 2)
        return run


def short(result: dict[str, Any]) -> str:
    """req/s, p50, p99 and errors of one load generator result, for the progress log."""
    timed = result["requests"] > 0
    lat = result["latency_us"]
    return (f"{result['rps']:9,.0f} req/s  p50 {fmt_ms(lat['p50'] if timed else None)}  "
            f"p99 {fmt_ms(lat['p99'] if timed else None)}  errors {fmt_errors(result['errors'])}")


def served_rate(result: dict[str, Any]) -> tuple[float, str]:
    """Requests served per second, to divide CPU time by: the completions in the window, or,
    when each connection completes fewer than MIN_PER_CONNECTION requests in it (long streams
    started together finish in waves, so the count jumps by a whole wave), Little's law for a
    closed loop: connections / mean latency (every connection always has one request open)."""
    if not result["requests"]:
        return 0.0, "none"
    if result["requests"] >= MIN_PER_CONNECTION * result["connections"]:
        return float(result["rps"]), "completions"
    return result["connections"] / (result["latency_us"]["mean"] / 1e6), "connections/mean latency"


# ---- children -------------------------------------------------------------------------------


KEYS_FILE = f"""\
# The bench's one client: limits that never refuse, so every admission takes them all.
[[keys]]
alias = "bench"
key = "{CLIENT_KEY}"
[keys.limits]
requests_per_minute = {HIGH_REQUESTS}
tokens_per_minute = {HIGH_TOKENS}
concurrency = {HIGH_CONCURRENCY}
requests_per_5h = {HIGH_REQUESTS}
tokens_per_5h = {HIGH_TOKENS}
"""


def proxy_env(out_dir: Path, port: int, mock_port: int, workers: int,
              impl: str | None = None) -> dict[str, str]:
    """zaiproxy with every feature on; the queue and adaptive-rate settings keep their
    defaults. Paths are absolute: the run folder holds the keys file, history and state."""
    keys = out_dir / "keys.toml"
    keys.write_text(KEYS_FILE)
    mock = f"http://127.0.0.1:{mock_port}"
    limits = {
        "REQUESTS_PER_MINUTE": HIGH_REQUESTS, "TOKENS_PER_MINUTE": HIGH_TOKENS,
        "CONCURRENCY": HIGH_CONCURRENCY,
        "REQUESTS_PER_5H": HIGH_REQUESTS, "TOKENS_PER_5H": HIGH_TOKENS,
        "REQUESTS_PER_WEEK": HIGH_REQUESTS, "TOKENS_PER_WEEK": HIGH_TOKENS,
    }
    return child_env({
        "ZAIPROXY_HOST": "127.0.0.1",
        "ZAIPROXY_PORT": str(port),
        "ZAIPROXY_WORKERS": str(workers),
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAIPROXY_OPENAI_BASE_URL": f"{mock}/api/paas/v4",
        "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock}/api/anthropic",
        "ZAIPROXY_NATIVE_BASE_URL": mock,
        "ZAIPROXY_KEYS_FILE": str(keys.resolve()),
        "ZAIPROXY_TOKEN_COUNTING": "true",
        "ZAIPROXY_ADAPTIVE_RATE": "true",
        **{f"ZAIPROXY_{name}": str(value) for name, value in limits.items()},
        "ZAIPROXY_HISTORY": "true",
        "ZAIPROXY_HISTORY_PATH": str((out_dir / "history.duckdb").resolve()),
        # A fresh adaptive rate: the default file is per port and outlives a run by hours.
        "ZAIPROXY_STATE_FILE": str((out_dir / "adaptive-state.json").resolve()),
        "ZAIPROXY_ACCESS_LOG": "true",
        "LOG_LEVEL": "info",
        "ZAIPROXY_DRAIN_TIMEOUT": "5",
        # `ZAIPROXY_HTTP_IMPL=h11-mypyc make bench` measures the compiled h11 (or the
        # proxy-mypyc target, next to the default one).
        "ZAIPROXY_HTTP_IMPL": impl or os.environ.get("ZAIPROXY_HTTP_IMPL", "h11"),
    })


def check_proxy_config(env: dict[str, str], out_dir: Path, cwd: Path | None = None) -> None:
    """``zaiproxy config check`` with the bench's environment; its output is kept."""
    check = subprocess.run([sys.executable, "-m", "zaiproxy", "config", "check"], env=env,
                           capture_output=True, text=True, timeout=60, cwd=cwd)
    (out_dir / "proxy-config.txt").write_text(check.stdout + check.stderr)
    if check.returncode != 0:
        raise BenchError(f"zaiproxy config check rejected the bench's config:\n"
                         f"{check.stdout}{check.stderr}")


@dataclass
class Children:
    """The started children, stopped in reverse order whatever happens."""

    started: list[tuple[Child, Callable[[Child], int | None]]] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    def add(self, child: Child, stop: Callable[[Child], int | None] = Child.stop) -> Child:
        self.started.append((child, stop))
        return child

    def stop_all(self) -> None:
        for child, stop in reversed(self.started):
            self.exit_codes[child.name] = stop(child)
        self.started.clear()
        log(f"children stopped: exit codes {self.exit_codes}")


def start_targets(args: argparse.Namespace, out_dir: Path, children: Children,
                  proxy_extra_env: dict[str, str] | None = None,
                  ) -> tuple[Child, int, list[Target], dict[str, str]]:
    """Start the mock and the selected targets; each is timed from spawn to its first 200.
    ``proxy_extra_env`` is added to every zaiproxy target's environment."""
    python = sys.executable
    lines: dict[str, str] = {}
    mock_port = free_port()
    mock = children.add(Child("mock", [
        python, "-m", "zaiproxy", "mock-upstream", "--host", "127.0.0.1", "--port",
        str(mock_port), "--workers", str(args.mock_workers), "--api-key", UPSTREAM_KEY,
    ], child_env({}), out_dir))
    mock_startup = first_200(mock, mock_port, DIRECT_PATH, UPSTREAM_KEY,
                             lambda: tail(mock.stderr_path))
    mock.wait_listening()
    lines["mock"] = mock.line
    log(f"{mock.line}: first 200 after {mock_startup:.3f} s")
    targets = []
    if "direct" in args.targets:
        targets.append(Target("direct", mock_port, DIRECT_PATH, UPSTREAM_KEY, mock, mock_startup))
    builds: dict[str, tuple[str | None, Path | None]] = {
        name: (impl, None) for name, impl in PROXY_IMPLS.items()}
    builds["baseline"] = (None, args.baseline)
    for name, (impl, checkout) in builds.items():
        if name not in args.targets:
            continue
        port = free_port()
        home = out_dir if name == "proxy" else out_dir / name  # its own history and state
        home.mkdir(exist_ok=True)
        env = proxy_env(home, port, mock_port, args.proxy_workers, impl) | (proxy_extra_env or {})
        if checkout is not None:
            # That checkout's package first on the path (it is also the working directory,
            # which `python -m` puts first).
            env["PYTHONPATH"] = str(checkout)
        check_proxy_config(env, home, checkout)
        proxy = children.add(Child(name, [python, "-m", "zaiproxy", "serve"], env, out_dir,
                                   cwd=checkout))
        startup = first_200(proxy, port, PUBLIC_PATH, CLIENT_KEY,
                            lambda proxy=proxy: tail(proxy.stderr_path))
        proxy.wait_listening()
        lines[name] = proxy.line
        log(f"{proxy.line}: first 200 after {startup:.3f} s")
        targets.append(Target(name, port, PUBLIC_PATH, CLIENT_KEY, proxy, startup))
    if "nginx" in args.targets:
        port = free_port()
        root = out_dir / "nginx"
        server = children.add(nginx.start(root, port, mock_port, UPSTREAM_KEY, args.nginx_workers),
                              nginx.stop)
        startup = first_200(server, port, PUBLIC_PATH, UPSTREAM_KEY,
                            lambda: nginx.error_log_tail(root) + "\n" + tail(server.stderr_path))
        lines["nginx"] = f"nginx on http://127.0.0.1:{port} ({args.nginx_workers} workers)"
        log(f"{lines['nginx']}: first 200 after {startup:.3f} s")
        targets.append(Target("nginx", port, PUBLIC_PATH, UPSTREAM_KEY, server, startup))
    return mock, mock_port, targets, lines


# ---- summary and report ---------------------------------------------------------------------


def run_metrics(run: dict[str, Any]) -> dict[str, float | None]:
    """The per-run numbers the report takes medians of."""
    window = run["window_s"] or 1.0

    def share(seconds: float) -> float:
        return 100 * seconds / window

    def timing(kind: str, pct: str) -> float | None:
        return float(run[kind][pct]) if run["requests"] else None  # no response, no latency

    target_cpu = run["target_tree"]["cpu_seconds"]
    probe = run.get("probe")
    return {
        "rps": run["rps"],
        "p50": timing("latency_us", "p50"),
        "p90": timing("latency_us", "p90"),
        "p99": timing("latency_us", "p99"),
        "ttfb_p50": timing("ttfb_us", "p50"),
        "ttfb_p99": timing("ttfb_us", "p99"),
        "cpu_us_per_request": run.get("cpu_us_per_request"),
        "cpu_us_per_event": run.get("cpu_us_per_event"),
        "mock_cpu_us_per_request": run.get("mock_cpu_us_per_request"),
        "peak_rss_mb": run["target_tree"]["peak_rss_mb"],
        "max_process_rss_mb": max((p["max_rss_mb"] for p in run["target_tree"]["processes"]),
                                  default=0.0),
        "events_per_request": run["events"] / run["requests"] if run["requests"] else None,
        "coalesced_events": run["coalesced_events"],
        "coalesced_share": 100 * run["coalesced_events"] / run["events"] if run["events"] else None,
        "loadgen_pct": share(run["loadgen_cpu_s"]),
        "loadgen_us_per_request": run.get("loadgen_cpu_us_per_request"),
        "mock_pct": share(run["mock_tree"]["cpu_seconds"]),
        "target_pct": None if run["target"] == "direct" else share(target_cpu),
        "other_pct": share(run["other_core_s"]),
        "steal_pct": share(run["machine_steal_core_s"]),
        "busy_pct": share(run["machine_busy_core_s"]),
        "probe_rps": probe["rps"] if probe else None,
        "probe_p50": probe["latency_us"]["p50"] if probe and probe["requests"] else None,
        "probe_p99": probe["latency_us"]["p99"] if probe and probe["requests"] else None,
        # Concurrency 1, closed loop: the window / answers is the mean time of every answer,
        # refusals included (the load generator times only the answers that pass).
        "probe_us_per_answer": (1e6 * probe["duration_s"] / answers
                                if probe and (answers := probe["requests"] + probe["errors_total"])
                                else None),
    }


def add_errors(total: dict[str, int], errors: dict[str, int]) -> None:
    for kind, count in errors.items():
        if count:
            total[kind] = total.get(kind, 0) + count


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario and target: median, min and max over the repeats, errors summed,
    and the differences of the medians to direct's."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["scenario"], run["target"]), []).append(run)
    rows: list[dict[str, Any]] = []
    for (scenario, target), group in groups.items():
        metrics = [run_metrics(run) for run in group]
        median: dict[str, float | None] = {}
        low: dict[str, float | None] = {}
        high: dict[str, float | None] = {}
        for name in metrics[0]:
            values = [v for m in metrics if (v := m[name]) is not None]
            median[name] = statistics.median(values) if values else None
            low[name] = min(values) if values else None
            high[name] = max(values) if values else None
        errors: dict[str, int] = {}
        probe_errors: dict[str, int] = {}
        for run in group:
            add_errors(errors, run["errors"])
            if "probe" in run:
                add_errors(probe_errors, run["probe"]["errors"])
        rows.append({
            "scenario": scenario, "target": target, "runs": len(group),
            "requests": sum(run["requests"] for run in group),
            "median": median, "min": low, "max": high, "errors": errors,
            "probe_requests": sum(run["probe"]["requests"] for run in group if "probe" in run),
            "probe_errors": probe_errors,
            "body_checked": all(run["body_checked"] for run in group),
            "little": any(run.get("served_rps_basis") == "connections/mean latency"
                          for run in group),
        })
    direct = {row["scenario"]: row["median"] for row in rows if row["target"] == "direct"}
    for row in rows:
        base = direct.get(row["scenario"])
        if base is None or row["target"] == "direct":
            continue
        med = row["median"]

        def added(name: str, med: dict[str, Any] = med, base: dict[str, Any] = base) -> float | None:
            return None if med[name] is None or base[name] is None else med[name] - base[name]

        row["vs_direct"] = {
            "rps_ratio": med["rps"] / base["rps"] if med["rps"] and base["rps"] else None,
            "added_p50_us": added("p50"),
            "added_p99_us": added("p99"),
            "added_ttfb_p50_us": added("ttfb_p50"),
        }
    return rows


def fmt_num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown_tables(results: dict[str, Any]) -> str:
    rows = summarize(results["runs"])
    lines = [
        f"Medians of {results['options']['repeat']} run(s) of {results['options']['duration']:g} s "
        "per scenario and target; req/s also as min-max. \"+\" columns: the target's median minus "
        "direct's. Latency: first request byte to last response byte; TTFB: to the first body "
        "byte.",
        "",
        "| scenario | target | req/s | min-max | rps/direct | p50 | p90 | p99 | TTFB p50 | TTFB p99 "
        "| +p50 | +p99 | +TTFB p50 | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        med, vs = row["median"], row.get("vs_direct")
        ratio = vs["rps_ratio"] if vs else None
        lines.append("| " + " | ".join([
            row["scenario"], row["target"], fmt_num(med["rps"]),
            f"{fmt_num(row['min']['rps'])}-{fmt_num(row['max']['rps'])}",
            f"{ratio:.2f}" if ratio is not None else "—",
            fmt_ms(med["p50"]), fmt_ms(med["p90"]), fmt_ms(med["p99"]),
            fmt_ms(med["ttfb_p50"]), fmt_ms(med["ttfb_p99"]),
            *(fmt_delta_ms(vs[key]) if vs else "—"
              for key in ("added_p50_us", "added_p99_us", "added_ttfb_p50_us")),
            fmt_errors(row["errors"]),
        ]) + " |")
    lines += [
        "",
        "Cost of the target's whole process tree (direct: the mock's) over the measured window: "
        "CPU (utime + stime) per request served and per SSE event, peak of the summed RSS and "
        "the largest single process; the mock's CPU per request; SSE events per response and "
        "how many arrived in the same read as an earlier one (coalesced: their count per run "
        "and share of all events). Requests served = completions, except where marked *: "
        "connections / mean latency (see the notes).",
        "",
        "| scenario | target | CPU µs/req | CPU µs/event | peak RSS MB | max process MB "
        "| mock CPU µs/req | events/resp | coalesced |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        med = row["median"]
        coalesced = (f"{fmt_num(med['coalesced_events'])} ({med['coalesced_share']:.0f}%)"
                     if med["coalesced_share"] is not None else "—")
        mark = "*" if row["little"] else ""
        lines.append("| " + " | ".join([
            row["scenario"], row["target"], fmt_num(med["cpu_us_per_request"]) + mark,
            fmt_num(med["cpu_us_per_event"], 1), fmt_num(med["peak_rss_mb"], 1),
            fmt_num(med["max_process_rss_mb"], 1), fmt_num(med["mock_cpu_us_per_request"]),
            fmt_num(med["events_per_request"], 1) if med["coalesced_share"] is not None else "—",
            coalesced,
        ]) + " |")
    nproc = results["machine"]["nproc"]
    lines += [
        "",
        f"Where the cores went (median share of one core over the window; {nproc} cores = "
        f"{100 * nproc}%): the load generator, the mock, the target (direct: it is the mock), "
        "busy time outside all of them (other processes, the suite's sampling, kernel work "
        "not charged to a process), the hypervisor's steal, and the machine's busy total.",
        "",
        "| scenario | target | loadgen | mock | target | other | steal | machine busy "
        "| loadgen µs/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        med = row["median"]
        lines.append("| " + " | ".join([
            row["scenario"], row["target"],
            *(f"{med[key]:.0f}%" if med[key] is not None else "—"
              for key in ("loadgen_pct", "mock_pct", "target_pct", "other_pct", "steal_pct",
                          "busy_pct")),
            fmt_num(med["loadgen_us_per_request"], 1),
        ]) + " |")
    probed = [row for row in rows if row["probe_requests"] or row["median"]["probe_rps"]]
    if probed:
        lines += [
            "",
            "During the 429 storm: the storm's own req/s and errors, and the probe (the json "
            "request, concurrency 1, expected 200 with the mock's bytes) through the same target: "
            "its answers that passed (all runs), its req/s and the p50 and p99 of those answers "
            "(medians over the runs that had any), the mean time of all its answers, refusals "
            "included (window / answers), and its errors.",
            "",
            "| scenario | target | storm req/s | storm errors | probe ok | probe req/s "
            "| probe p50 | probe p99 | probe mean, all answers | probe errors |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in probed:
            med = row["median"]
            lines.append("| " + " | ".join([
                row["scenario"], row["target"], fmt_num(med["rps"]), fmt_errors(row["errors"]),
                fmt_num(row["probe_requests"]), fmt_num(med["probe_rps"]),
                fmt_ms(med["probe_p50"]), fmt_ms(med["probe_p99"]),
                fmt_ms(med["probe_us_per_answer"]), fmt_errors(row["probe_errors"]),
            ]) + " |")
    lines += [
        "",
        "Start-up (spawn to the first 200 of the json request, polled every 10 ms) and the "
        "tree at rest before the first scenario.",
        "",
        "| target | spawn → first 200 | processes | idle RSS MB |",
        "|---|---:|---:|---:|",
    ]
    for name, target in results["targets"].items():
        idle = target["idle"]
        lines.append(f"| {name} | {target['startup_s'] * 1000:,.0f} ms "
                     f"| {len(idle['processes'])} | {idle['peak_rss_mb']:.1f} |")
    return "\n".join(lines) + "\n"


def render(results: dict[str, Any]) -> str:
    """results.md: what ran where, the tables, and what the checks found."""
    machine, options = results["machine"], results["options"]
    lines = [
        f"# Bench suite: direct to the mock, zaiproxy, nginx ({results['timestamp_utc']})",
        "",
        f"- command: `{results['command']}` ({results['wall_s'] / 60:.1f} min)",
        f"- machine: {machine['nproc']} cores, {machine['cpu_model']}, Linux {machine['kernel']}, "
        f"Python {machine['python']}, {machine['nginx']}; load average at start "
        f"{machine['loadavg_at_start'][0]:.2f}",
        *(f"- `{line}`" for line in results["lines"].values()),
        f"- {options['duration']:g} s per measured run, {options['repeat']} per target, "
        f"interleaved {'/'.join(results['targets'])}, each after {options['warmup']:g} s of "
        "unrecorded warm-up load",
        f"- children's exit codes: {results['exit_codes']}",
    ]
    if results.get("error"):
        lines.append(f"- **the run stopped early**: {results['error']}")
    lines += ["", markdown_tables(results)]
    differing = [s for s in results["samples"] if not s["identical"]]
    lines.append("- sample requests (one per scenario and target, http.client): "
                 + ("every body byte-identical to the mock's" if not differing else
                    "bodies different from the mock's: " + ", ".join(
                        f"{s['scenario']} via {s['target']} ({s['bytes']} bytes)"
                        for s in differing)))
    if any(r.get("served_rps_basis") == "connections/mean latency" for r in results["runs"]):
        lines.append(f"- {results['notes']['little']}")
    unchecked = sorted({(r["scenario"], r["target"]) for r in results["runs"]
                        if not r["body_checked"]})
    if unchecked:
        lines.append("- bodies not compared under load (status and stream checks only): "
                     + ", ".join(f"{s} via {t}" for s, t in unchecked)
                     + f" — {results['notes']['unchecked_bodies']}")
    counts = results.get("proxy_log_counts") or {}
    if counts:
        lines.append("- zaiproxy's log lines over the whole run: "
                     + ", ".join(f"{key} {count:,}" for key, count in sorted(counts.items())))
    return "\n".join(lines) + "\n"


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description="The mock upstream directly, through zaiproxy and through nginx, "
                    "under one closed-loop load generator.",
    )
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per measured run (default 5)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measured runs per scenario and target, interleaved (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unrecorded load at the start of every run "
                             "(default 1; 0 skips it)")
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS],
                        help="run only this scenario (repeatable; default: all)")
    parser.add_argument("--target", dest="targets", action="append", choices=TARGETS,
                        help="measure only this target (repeatable; default: all)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also measure zaiproxy as built in the checkout DIR (target "
                             "'baseline', e.g. `git worktree add DIR <commit>`), interleaved "
                             "with the others")
    parser.add_argument("--proxy-workers", type=int, default=2,
                        help="zaiproxy serve --workers (default 2)")
    parser.add_argument("--mock-workers", type=int, default=2,
                        help="mock-upstream --workers (default 2)")
    parser.add_argument("--nginx-workers", type=int, default=2,
                        help="nginx worker_processes (default 2)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="each run writes <out>/<UTC timestamp>/ (default bench/results)")
    parser.add_argument("--render", type=Path, metavar="RESULTS_DIR",
                        help="run nothing: rewrite RESULTS_DIR/results.md from its results.json")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.repeat < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --repeat >= 1")
    if min(args.proxy_workers, args.mock_workers, args.nginx_workers) < 1:
        parser.error("worker counts must be >= 1")
    wanted = set(args.targets or DEFAULT_TARGETS)
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "zaiproxy" / "__main__.py").is_file():
            parser.error(f"--baseline {args.baseline}: not a zaiproxy checkout")
        wanted.add("baseline")
    elif "baseline" in wanted:
        parser.error("--target baseline needs --baseline DIR")
    args.targets = [t for t in TARGETS if t in wanted]
    return args


NOTES = {
    "little": (
        "*: each connection completed fewer than 20 requests in the window, so the count of "
        "completions moves in whole waves (streams started together end together) and CPU per "
        "request uses connections / mean latency instead (Little's law for a closed loop: every "
        "connection always has one request open); req/s in the first table is still the count"
    ),
    "unchecked_bodies": (
        "zaiproxy relays the mock's 429 body byte for byte (the sample request shows it), but "
        "once the 1303s have lowered its adaptive rate it refuses requests itself, with its own "
        "429 body naming the limit; the load generator takes one expected body, so these runs "
        "check the status only"
    ),
}


def nginx_version(used: bool) -> str:
    if not used:
        return "nginx not used"
    probe = subprocess.run([nginx.binary(), "-v"], capture_output=True, text=True, timeout=30)
    return (probe.stdout + probe.stderr).strip().removeprefix("nginx version: ")


def write_report(out_dir: Path, results: dict[str, Any]) -> None:
    text = render(results)
    (out_dir / "results.md").write_text(text)
    print(text)
    print(f"results: {out_dir}/results.md, results.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        write_report(args.render, json.loads((args.render / "results.json").read_text()))
        return 0
    begun = time.monotonic()
    log(f"load generator: {loadgen.build()}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out / stamp
    out_dir.mkdir(parents=True)
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    results: dict[str, Any] = {
        "timestamp_utc": stamp,
        "command": command_line("bench.suite"),
        "machine": machine_info(nginx=nginx_version("nginx" in args.targets)),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "scenarios": [{**dataclasses.asdict(s), "expect_status": s.expect_status}
                      for s in scenarios],
        "notes": NOTES,
        "samples": [], "runs": [], "targets": {}, "lines": {},
    }
    children = Children()
    suite: Suite | None = None
    try:
        mock, mock_port, targets, results["lines"] = start_targets(args, out_dir, children)
        for target in targets:
            with TreeSampler(target.child.pid) as idle:
                pass
            results["targets"][target.name] = {
                "port": target.port, "pid": target.child.pid,
                "startup_s": round(target.startup_s, 4), "idle": idle.report(),
            }
        suite = Suite(args, out_dir, mock, mock_port, targets)
        for scenario in scenarios:
            suite.run_scenario(scenario)
    except BenchError as exc:
        results["error"] = str(exc).splitlines()[0]
        raise
    finally:
        children.stop_all()
        results["exit_codes"] = children.exit_codes
        results["proxy_log_counts"] = log_counts(out_dir / "proxy.stderr.log")
        results["wall_s"] = round(time.monotonic() - begun, 1)
        if suite is not None:
            results |= {"samples": suite.samples, "runs": suite.runs,
                        "expected": {name: {k: v for k, v in e.items() if k != "body"}
                                     for name, e in suite.expected.items()}}
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if results["runs"]:
            write_report(out_dir, results)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f"bench.suite: {exc}")
