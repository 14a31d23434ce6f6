"""Admission and settle through the proxy: the Redis limits backend against shared memory.

Run it from the repository root::

    .venv/bin/python -m bench.fleet [--duration 5] [--repeat 3] [--warmup 2]
        [--concurrency 1 --concurrency 64] [--proxy-workers 2] [--redis-timeout S]

What it does:

1. starts the mock upstream (``zaiproxy mock-upstream --workers 1``), a ``redis-server`` on a
   free port (``tests/redis_server.py``: loopback TCP, no persistence) and two proxies
   (``zaiproxy serve --port 0 --workers 2``), both with the same limits, set high enough
   never to refuse: global requests/min, tokens/min, concurrency, requests/5 h and
   tokens/5 h, and the adaptive upstream rate; the product's defaults otherwise (token
   counting, DuckDB history, the JSON access log at ``info``; no keys file):

   - ``shm``: the limits in the host's shared-memory ledger (the default backend);
   - ``redis``: ``ZAIPROXY_LIMITS_BACKEND=redis`` on that server, prefix ``bench-fleet``,
     ``redis_command_timeout`` the product's default (0.05 s) unless ``--redis-timeout``;

   so an admission is 6 ops (5 limits + the adaptive rate) in one ``EVALSHA`` for ``redis``;
2. sends the non-streaming ``json`` request of ``bench.suite`` once through each proxy (the
   status and the bytes must be the mock's), warms each up, then runs the load generator
   (``bench/loadgen``: closed loop, keep-alive, every response's status and bytes checked) at
   each concurrency ``--repeat`` times, interleaved shm, redis, shm, redis...;
3. per run: req/s, p50/p99, errors; the CPU (utime + stime, ``/proc``) of the proxy's whole
   tree (supervisor, workers, recorder) per request; redis-server's own CPU per request
   (``INFO cpu``) and the ``EVALSHA`` calls it served per request (``INFO commandstats``:
   admissions, batched settles, lease renewals, the adaptive rate's ticks);
4. checks that the redis proxy's requests went through Redis: ``/health`` shows ``"limits":
   {"backend": "redis", "state": "ok", "switches": 0, ...}`` with no request decided by the
   fail policy (``local``, ``open``, ``closed`` all 0), ``SCAN`` finds the prefix's keys, and
   the access logs count only 200s (and 499s: the load generator drops its open connections
   at the end of a run);
5. prints Markdown (medians over the repeats, and what redis adds to shm's p50/p99) and
   writes ``results.json`` and the children's logs under ``bench/results/fleet-<UTC stamp>/``.

Like the other HTTP benches it imports nothing from ``zaiproxy``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.procs import (
    BenchError,
    Child,
    TreeSampler,
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
from bench.suite import (
    DIRECT_PATH,
    HIGH_CONCURRENCY,
    HIGH_REQUESTS,
    HIGH_TOKENS,
    PUBLIC_PATH,
    SCENARIOS,
    UPSTREAM_KEY,
    check_expected,
    check_proxy_config,
    fetch,
)
from tests.redis_server import RedisServer

BACKENDS = ("shm", "redis")
PREFIX = "bench-fleet"
CLIENT_KEY = "bench-client"  # no keys file: the proxy is open and ignores it
JSON = SCENARIOS[0]  # json-c1's request: non-streaming, short prompt
LOAD_TIMEOUT = 30.0
PAUSE = 0.3  # seconds between runs: one run's closing sockets stay out of the next


def redis_info(server: RedisServer, section: str) -> dict[str, str]:
    """``INFO <section>`` as a dict."""
    return dict(line.split(":", 1) for line in server.cli("INFO", section).split()
                if ":" in line)


def redis_cpu_seconds(server: RedisServer) -> float:
    info = redis_info(server, "cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_calls(server: RedisServer, command: str = "evalsha") -> int:
    stats = redis_info(server, "commandstats").get(f"cmdstat_{command}", "")
    return int(stats.split("calls=", 1)[1].split(",", 1)[0]) if "calls=" in stats else 0


def proxy_env(name: str, home: Path, mock_url: str, workers: int, redis_url: str,
              redis_timeout: float | None) -> dict[str, str]:
    """The product's defaults plus the same never-refusing limits; ``redis``: the fleet
    backend. Paths are absolute and per proxy (history, adaptive-rate state)."""
    env = {
        "ZAIPROXY_HOST": "127.0.0.1",
        "ZAIPROXY_WORKERS": str(workers),
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAIPROXY_OPENAI_BASE_URL": f"{mock_url}/api/paas/v4",
        "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock_url}/api/anthropic",
        "ZAIPROXY_NATIVE_BASE_URL": mock_url,
        "ZAIPROXY_REQUESTS_PER_MINUTE": str(HIGH_REQUESTS),
        "ZAIPROXY_TOKENS_PER_MINUTE": str(HIGH_TOKENS),
        "ZAIPROXY_CONCURRENCY": str(HIGH_CONCURRENCY),
        "ZAIPROXY_REQUESTS_PER_5H": str(HIGH_REQUESTS),
        "ZAIPROXY_TOKENS_PER_5H": str(HIGH_TOKENS),
        "ZAIPROXY_ADAPTIVE_RATE": "true",
        "ZAIPROXY_TOKEN_COUNTING": "true",
        "ZAIPROXY_HISTORY": "true",
        "ZAIPROXY_HISTORY_PATH": str((home / "history.duckdb").resolve()),
        "ZAIPROXY_STATE_FILE": str((home / "adaptive-state.json").resolve()),
        "ZAIPROXY_ACCESS_LOG": "true",
        "LOG_LEVEL": "info",
        "ZAIPROXY_DRAIN_TIMEOUT": "5",
    }
    if name == "redis":
        env |= {"ZAIPROXY_LIMITS_BACKEND": "redis", "ZAIPROXY_REDIS_URL": redis_url,
                "ZAIPROXY_REDIS_KEY_PREFIX": PREFIX}
        if redis_timeout is not None:
            env["ZAIPROXY_REDIS_COMMAND_TIMEOUT"] = f"{redis_timeout:g}"
    return child_env(env)


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


class Bench:
    def __init__(self, args: argparse.Namespace, out_dir: Path) -> None:
        self.args = args
        self.out_dir = out_dir
        self.children: list[Child] = []
        self.proxies: dict[str, Child] = {}
        self.redis: RedisServer | None = None
        self.runs: list[dict[str, Any]] = []
        self.checks: dict[str, Any] = {}

    # ---- children ---------------------------------------------------------------------

    def start(self) -> None:
        python = sys.executable
        mock = Child("mock", [python, "-m", "zaiproxy", "mock-upstream", "--host", "127.0.0.1",
                              "--port", "0", "--workers", "1", "--api-key", UPSTREAM_KEY],
                     child_env({}), self.out_dir)
        self.children.append(mock)
        mock_url = mock.wait_listening()
        log(f"mock: {mock.line}")
        self.mock_port = port_of(mock_url)
        try:  # absolute: redis-server changes to --dir before it binds its unix socket
            self.redis = RedisServer((self.out_dir / "redis-server").resolve())
        except RuntimeError as exc:
            raise BenchError(str(exc)) from exc
        log(f"redis-server: {self.redis.url} (pid {self.redis.proc.pid if self.redis.proc else 0})")
        for name in BACKENDS:
            home = self.out_dir / f"proxy-{name}"
            home.mkdir()
            env = proxy_env(name, home, mock_url, self.args.proxy_workers, self.redis.url,
                            self.args.redis_timeout)
            check_proxy_config(env, home)
            proxy = Child(f"proxy-{name}", [python, "-m", "zaiproxy", "serve", "--port", "0"],
                          env, self.out_dir)
            self.children.append(proxy)
            proxy.wait_listening()
            self.proxies[name] = proxy
            log(f"{name}: {proxy.line}")

    def stop(self) -> dict[str, int | None]:
        codes = {child.name: child.stop() for child in reversed(self.children)}
        if self.redis is not None:
            self.redis.stop()
        return codes

    # ---- checks -----------------------------------------------------------------------

    def sample(self) -> bytes:
        """The mock's body for the json request; each proxy must answer it byte for byte."""
        status, body = fetch(self.mock_port, DIRECT_PATH, JSON, UPSTREAM_KEY)
        check_expected(JSON, status, body)
        for name, proxy in self.proxies.items():
            got_status, got = fetch(port_of(proxy.url), PUBLIC_PATH, JSON, CLIENT_KEY)
            if got_status != 200 or got != body:
                raise BenchError(f"{name}: HTTP {got_status}, {len(got)} bytes (the mock's: "
                                 f"{len(body)}): {got[:300]!r}")
        return body

    def health(self, name: str) -> dict[str, Any]:
        limits: dict[str, Any] = get_json(self.proxies[name].url + "/health").get("limits", {})
        return limits

    def check_health(self, when: str) -> None:
        for name in BACKENDS:
            limits = self.health(name)
            self.checks.setdefault("health", []).append({"when": when, "backend": name,
                                                         "limits": limits})
            problems = []
            if limits.get("backend") != name or limits.get("state") != "ok":
                problems.append(f"backend/state {limits.get('backend')}/{limits.get('state')}")
            if name == "redis":
                problems += [f"{k} {limits.get(k)}" for k in
                             ("switches", "local", "open", "closed", "dropped")
                             if limits.get(k) != 0]
            if problems:
                log(f"   WARNING {when}: {name} /health limits: {', '.join(problems)}: {limits}")
                self.checks.setdefault("warnings", []).append(
                    f"{when}: {name}: {', '.join(problems)}")

    def scan_keys(self) -> list[str]:
        assert self.redis is not None
        keys = self.redis.cli("--scan", "--pattern", "{" + PREFIX + "}*").split()
        return sorted(keys)

    # ---- runs -------------------------------------------------------------------------

    def load(self, name: str, connections: int, duration: float, expected: bytes,
             warmup: float = 0.0) -> dict[str, Any]:
        proxy = self.proxies[name]
        port = port_of(proxy.url)
        request = loadgen.http_request("POST", PUBLIC_PATH, JSON.headers(CLIENT_KEY), JSON.body(),
                                       port=port)
        try:
            return loadgen.run("127.0.0.1", port, request, connections=connections,
                               duration=duration, warmup=warmup, expect_status=(200,),
                               expect_body=expected, timeout=LOAD_TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise BenchError(f"load generator via {name}: {exc}") from exc

    def measure(self, name: str, connections: int, expected: bytes, repeat: int) -> None:
        assert self.redis is not None
        proxy = self.proxies[name]
        redis_cpu, calls = redis_cpu_seconds(self.redis), redis_calls(self.redis)
        health = self.health(name)
        machine = machine_cpu_seconds()
        started = time.monotonic()
        with TreeSampler(proxy.pid) as tree:
            result = self.load(name, connections, self.args.duration, expected)
        wall = time.monotonic() - started
        machine_after = machine_cpu_seconds()
        redis_cpu = redis_cpu_seconds(self.redis) - redis_cpu
        calls = redis_calls(self.redis) - calls
        after = self.health(name)
        served = max(1, result["requests"])
        run = {
            "backend": name, "concurrency": connections, "repeat": repeat,
            "requests": result["requests"], "rps": result["rps"],
            "errors": result["errors"], "errors_total": result["errors_total"],
            "latency_us": result["latency_us"], "duration_s": result["duration_s"],
            "wall_s": round(wall, 3),
            "proxy_cpu_s": round(tree.cpu_seconds(), 3),
            "proxy_cpu_us_per_request": round(tree.cpu_seconds() * 1e6 / served, 1),
            "redis_cpu_s": round(redis_cpu, 4),
            "redis_cpu_us_per_request": round(redis_cpu * 1e6 / served, 2),
            "evalsha_calls": calls,
            "evalsha_per_request": round(calls / served, 3),
            # Requests the fail policy decided (Redis too slow or away) and workers' switches.
            "fail_policy": sum(after.get(k, 0) - health.get(k, 0)
                               for k in ("local", "open", "closed")),
            "switches": after.get("switches", 0) - health.get("switches", 0),
            "machine_busy_pct": round(100 * (machine_after["busy"] - machine["busy"]) / wall, 1),
            "proxy_tree": tree.report(),
        }
        self.runs.append(run)
        lat = result["latency_us"]
        redis_part = (f"  redis {run['redis_cpu_us_per_request']:5.1f} us/req "
                      f"{run['evalsha_per_request']:.2f} evalsha/req, fail policy "
                      f"{run['fail_policy']:,}" if name == "redis" else "")
        log(f"   c={connections:<3} {name:5} #{repeat}: {result['rps']:7,.0f} req/s  "
            f"p50 {fmt_ms(lat['p50'])}  p99 {fmt_ms(lat['p99'])}  "
            f"proxy {run['proxy_cpu_us_per_request']:5.0f} us/req{redis_part}  "
            f"errors {fmt_errors(result['errors'])}")

    def run(self) -> None:
        expected = self.sample()
        log("samples: both proxies answered 200 with the mock's bytes")
        for connections in self.args.concurrency:
            for name in BACKENDS:  # unrecorded: pools, caches, first Redis connections
                self.load(name, connections, self.args.warmup, expected)
            self.check_health(f"after the warm-up at c={connections}")
            for repeat in range(1, self.args.repeat + 1):
                for name in BACKENDS:
                    self.measure(name, connections, expected, repeat)
                    time.sleep(PAUSE)
            self.check_health(f"after c={connections}")
        keys = self.scan_keys()
        self.checks["redis_keys"] = keys
        log(f"redis keys under {{{PREFIX}}}: {len(keys)}: {', '.join(keys)}")
        if not keys:
            self.checks.setdefault("warnings", []).append("no key under the prefix in Redis")


# ---- report -------------------------------------------------------------------------------


def median(runs: list[dict[str, Any]], key: str, sub: str | None = None) -> float:
    return statistics.median(r[key][sub] if sub else r[key] for r in runs)


def report(results: dict[str, Any]) -> str:
    runs = results["runs"]
    lines = [
        f"Medians of {results['options']['repeat']} interleaved runs of "
        f"{results['options']['duration']:g} s per backend and concurrency; proxy "
        f"{results['options']['proxy_workers']} workers, mock 1 worker, redis_command_timeout "
        f"{results['options']['redis_timeout'] or '0.05 (default)'} s. Proxy CPU: the whole "
        "tree (supervisor, workers, recorder) per request; redis CPU: redis-server's own "
        "(INFO cpu); EVALSHA/req: every script call the server served during the run "
        "(admissions, batched settles, renewals, adaptive-rate ticks) per request; by fail "
        "policy: requests of all repeats that the fail policy decided instead of Redis "
        "(Redis slower than redis_command_timeout: the worker switched).",
        "",
        "| c | backend | req/s | min-max | proxy CPU µs/req | redis CPU µs/req | EVALSHA/req "
        "| by fail policy | p50 | p99 | +p50 vs shm | +p99 vs shm | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in results["options"]["concurrency"]:
        base: dict[str, float] = {}
        for name in BACKENDS:
            sel = [r for r in runs if r["concurrency"] == c and r["backend"] == name]
            if not sel:
                continue
            p50, p99 = median(sel, "latency_us", "p50"), median(sel, "latency_us", "p99")
            if name == "shm":
                base = {"p50": p50, "p99": p99}
            errors: dict[str, int] = {}
            for r in sel:
                for kind, count in r["errors"].items():
                    errors[kind] = errors.get(kind, 0) + count
            rps = [r["rps"] for r in sel]
            redis_cols = (f"{median(sel, 'redis_cpu_us_per_request'):,.1f} | "
                          f"{median(sel, 'evalsha_per_request'):.2f} | "
                          f"{sum(r['fail_policy'] for r in sel):,}"
                          if name == "redis" else "— | — | —")
            added = (f"{fmt_delta_ms(p50 - base['p50'])} | {fmt_delta_ms(p99 - base['p99'])}"
                     if name == "redis" and base else "— | —")
            lines.append(
                f"| {c} | {name} | {statistics.median(rps):,.0f} | {min(rps):,.0f}-"
                f"{max(rps):,.0f} | {median(sel, 'proxy_cpu_us_per_request'):,.0f} | "
                f"{redis_cols} | {fmt_ms(p50)} | {fmt_ms(p99)} | {added} | "
                f"{fmt_errors(errors)} |")
    checks = results.get("checks", {})
    health = [h for h in checks.get("health", []) if h["backend"] == "redis"]
    if health:
        last = health[-1]["limits"]
        lines += ["", f"- redis proxy `/health` at the end: `\"limits\": {json.dumps(last)}`"]
    if "redis_keys" in checks:
        lines.append(f"- keys under `{{{PREFIX}}}` in Redis: {len(checks['redis_keys'])} "
                     f"({', '.join(k.split(':', 1)[1] for k in checks['redis_keys'])})")
    for name in BACKENDS:
        counts = results.get("log_counts", {}).get(name, {})
        requests = {k: v for k, v in counts.items() if " request " in f" {k} "}
        lines.append(f"- {name} access log: " + ", ".join(
            f"{k.split(' ', 2)[2]} {v:,}" for k, v in sorted(requests.items())))
    for warning in checks.get("warnings", []):
        lines.append(f"- WARNING: {warning}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per backend, interleaved")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of unrecorded load per backend before each concurrency")
    parser.add_argument("--concurrency", type=int, action="append",
                        help="connections (repeatable; default 1 and 64)")
    parser.add_argument("--proxy-workers", type=int, default=2)
    parser.add_argument("--redis-timeout", type=float, default=None,
                        help="ZAIPROXY_REDIS_COMMAND_TIMEOUT for the redis proxy (default: "
                             "the product's, 0.05 s)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or [1, 64]
    log(f"load generator: {loadgen.build()}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out / f"fleet-{stamp}"
    out_dir.mkdir(parents=True)
    results: dict[str, Any] = {
        "timestamp_utc": stamp, "command": command_line("bench.fleet"),
        "machine": machine_info(), "options": {k: str(v) if isinstance(v, Path) else v
                                               for k, v in vars(args).items()},
    }
    bench = Bench(args, out_dir)
    failed: str | None = None
    try:
        bench.start()
        bench.run()
    except BenchError as exc:
        failed = str(exc)
    finally:
        results["exit_codes"] = bench.stop()
        results["runs"] = bench.runs
        results["checks"] = bench.checks
        results["log_counts"] = {name: log_counts(out_dir / f"proxy-{name}.stderr.log")
                                 for name in BACKENDS}
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if bench.runs:
        text = report(results)
        (out_dir / "results.md").write_text(text + "\n")
        print(text)
    log(f"results: {out_dir}")
    if failed:
        print(f"bench.fleet: {failed}", file=sys.stderr)
        return 1
    return 1 if bench.checks.get("warnings") else 0


if __name__ == "__main__":
    raise SystemExit(main())
