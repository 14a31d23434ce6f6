"""How many admissions per second one Redis serves: ``redis-benchmark`` driving fleet.lua.

Run it from the repository root::

    .venv/bin/python -m bench.fleet_capacity [--requests 200000] [--clients 50]
        [--pipeline 1 --pipeline 16] [--repeat 3]

It starts its own ``redis-server`` on a free port (``tests/redis_server.py``: loopback TCP,
no persistence), loads ``zaiproxy/limits/fleet.lua`` with ``SCRIPT LOAD`` and runs
``redis-benchmark -c 50 -n N -P 1|16 -r 1000 --csv EVALSHA <sha> ...`` for:

- ``admit, 5 ops per client key``: requests/min and tokens/min (GCRA), concurrency (a lease
  per call, ``pod:1:0:__rand_int__``), requests/5 h and tokens/5 h (windows), 600 tokens
  reserved; every key names the client ``c__rand_int__`` (redis-benchmark draws each
  ``__rand_int__`` anew: ~1,000 client keys, each op's key from its own draw);
- ``admit, 5 global ops + adaptive``: what ``bench.fleet``'s proxy sends, the same 7 keys in
  every call (the adaptive op reads the fleet's published rate: none, so it only reads);
- ``admit, 11 ops``: both, as with a keys file that limits each client the same 5 ways
  (``bench.suite``'s configuration has this shape, plus the weekly windows);
- ``settle``: what the worker's flusher sends, one request being two entries (its lease
  released plus 150 of the 600 tokens given back to the tokens/min GCRA and the tokens/5 h
  window; and its usage added to the client's counters: requests, input and output tokens),
  with 1 or 64 requests per call (``MAX_BATCH`` is 512 entries; 64 per call runs at -P 1
  only, with ``--requests / 64`` calls);
- what a worker or a pod sends whatever its traffic: ``renew`` of 32 live leases and
  ``state`` of the 2 windows (each worker every 5 s), ``rate_tick`` (each pod every second),
  ``--requests / 10`` calls each.

Every key carries the hash tag ``{bench}``: one deployment = one slot. The admissions run
first so the settles find the windows and leases they give back to. For each run: calls/s
(redis-benchmark's), the server's CPU (``INFO cpu``) per call and per request, its share of a
core, redis-benchmark's own CPU (it shares the machine's cores), and the p50/p99 latency it
saw. Medians over ``--repeat`` interleaved runs. The server's ``cmdstat_evalsha`` must show
no failed call (a script error fails the run).
"""

from __future__ import annotations

import argparse
import csv
import io
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fleet import redis_cpu_seconds, redis_info
from tests.redis_server import RedisServer

SCRIPT_PATH = Path(__file__).resolve().parent.parent / "zaiproxy" / "limits" / "fleet.lua"
TAG = "{bench}"
CLIENT = "key:c__rand_int__"  # a client key's scope; ~KEYSPACE of them
KEYSPACE = 1000  # client keys (-r)
HIGH = 1_000_000_000
HIGH_TOKENS = 1_000_000_000_000
MINUTE_US = 60_000_000
FIVE_HOURS_US = 5 * 3600 * 1_000_000
LEASE_TTL_US = 15_000_000
RESERVED, GIVEN_BACK = 600, 150
GCRA, CONC, WINDOW, ADAPTIVE, COUNTERS = 1, 2, 3, 4, 5  # fleet.lua's op kinds
# (name, kind, limit, period µs, cost)
OPS = (
    ("requests_per_minute", GCRA, HIGH, MINUTE_US, 1),
    ("tokens_per_minute", GCRA, HIGH_TOKENS, MINUTE_US, RESERVED),
    ("concurrency", CONC, HIGH, 0, 1),
    ("requests_per_5h", WINDOW, HIGH, FIVE_HOURS_US, 1),
    ("tokens_per_5h", WINDOW, HIGH_TOKENS, FIVE_HOURS_US, RESERVED),
)


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]  # after EVALSHA <sha>
    requests_per_call: int
    calls_divisor: int = 1  # this case sends --requests / divisor calls
    pipelined: bool = True  # also run with -P > 1 (not with 64 requests per call: a few
    # thousand calls, fewer than -c x -P in flight at the end)


def admit_args(scopes: tuple[str, ...], adaptive: bool) -> list[str]:
    keys = [f"{TAG}:limit:{scope}:{name}" for scope in scopes for name, *_ in OPS]
    args = ["admit", "", "pod:1:0:__rand_int__", str(LEASE_TTL_US), str(len(keys) + adaptive)]
    for _scope in scopes:
        for _name, kind, limit, period, cost in OPS:
            args += [str(kind), str(limit), str(period), str(cost)]
    if adaptive:
        keys += [f"{TAG}:adaptive:up0:gcra", f"{TAG}:adaptive:up0"]  # the op's, KEYS[n + 1]
        args += [str(ADAPTIVE), "0", "0", "1"]
    return [str(len(keys)), *keys, *args]


def settle_args(requests: int) -> list[str]:
    """``requests`` requests' settles in one call, as ``encode_settle`` lays them out."""
    epoch = int(time.time() * 1_000_000) // (FIVE_HOURS_US // 60)  # the 5 h window's bucket
    keys: list[str] = []
    args = ["settle", "", str(2 * requests)]
    for _ in range(requests):
        client = f"{TAG}:limit:key:c__rand_int__"
        base = len(keys)
        keys += [f"{client}:concurrency", f"{client}:tokens_per_minute",
                 f"{client}:tokens_per_5h", f"{TAG}:usage:c__rand_int__"]
        args += ["pod:1:0:__rand_int__", "3",
                 str(base + 1), str(CONC), "0", "0", "0", "0",
                 str(base + 2), str(GCRA), str(HIGH_TOKENS), str(MINUTE_US), str(-GIVEN_BACK),
                 "0",
                 str(base + 3), str(WINDOW), str(HIGH_TOKENS), str(FIVE_HOURS_US),
                 str(-GIVEN_BACK), str(epoch)]
        # the usage entry: requests 1, input tokens 20, output tokens 430 (COUNTERS fields 1-3)
        args += ["", "3"]
        for field, value in ((1, 1), (2, 20), (3, 430)):
            args += [str(base + 4), str(COUNTERS), str(field), "0", str(value), "0"]
    return [str(len(keys)), *keys, *args]


def renew_args(leases: int) -> list[str]:
    """One worker's lease renewal (every ``redis_lease_ttl / 3`` = 5 s): its live leases, all
    on the global concurrency key here."""
    args = ["renew", "", str(LEASE_TTL_US)]
    for _ in range(leases):
        args += ["1", "pod:1:0:__rand_int__"]
    return ["1", f"{TAG}:limit:global:concurrency", *args]


def rate_tick_args() -> list[str]:
    """One pod's adaptive-rate tick (every second): its activity, the leader lease."""
    keys = [f"{TAG}:adaptive:up0:activity", f"{TAG}:adaptive:up0:leader", f"{TAG}:adaptive:up0"]
    return [str(len(keys)), *keys, "rate_tick", "", "pod-__rand_int__", "3000", "0",
            "25", "0", "0", "0", "0"]


def state_args() -> list[str]:
    """One worker's refresh of the fleet's windows (every 5 s, with the renewal)."""
    ops = [op for op in OPS if op[1] == WINDOW]
    args = ["state", "", str(len(ops))]
    for _name, kind, limit, period, _cost in ops:
        args += [str(kind), str(limit), str(period)]
    return [str(len(ops)), *(f"{TAG}:limit:global:{op[0]}" for op in ops), *args]


def cases() -> list[Case]:
    return [
        Case("admit, 5 ops per client key (1,000 keys)", admit_args((CLIENT,), False), 1),
        Case("admit, 5 global ops + adaptive (bench.fleet's plan)",
             admit_args(("global",), True), 1),
        Case("admit, 5 per key + 5 global + adaptive (11 ops)",
             admit_args((CLIENT, "global"), True), 1),
        Case("settle, 1 request per call (2 entries, 6 ops)", settle_args(1), 1),
        Case("settle, 64 requests per call (128 entries, 384 ops)", settle_args(64), 64, 64,
             pipelined=False),
        # Per worker or pod, not per request (requests_per_call 0): --requests / 10 calls.
        Case("renew, 32 leases (per worker every 5 s)", renew_args(32), 0, 10, pipelined=False),
        Case("state, 2 windows (per worker every 5 s)", state_args(), 0, 10, pipelined=False),
        Case("rate_tick (per pod every second)", rate_tick_args(), 0, 10, pipelined=False),
    ]


def evalsha_stats(server: RedisServer) -> dict[str, int]:
    raw = redis_info(server, "commandstats").get("cmdstat_evalsha", "")
    out = {}
    for part in raw.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            if key in ("calls", "failed_calls", "rejected_calls"):
                out[key] = int(value)
    return out


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_case(server: RedisServer, sha: str, case: Case, args: argparse.Namespace,
             pipeline: int) -> dict[str, Any]:
    calls = max(1, args.requests // case.calls_divisor)
    cmd = [shutil.which("redis-benchmark") or "redis-benchmark", "-p", str(server.port),
           "-c", str(args.clients), "-n", str(calls), "-P", str(pipeline),
           "-r", str(KEYSPACE), "--csv", "EVALSHA", sha, *case.args]
    stats, cpu, own = evalsha_stats(server), redis_cpu_seconds(server), children_cpu()
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    wall = time.monotonic() - started
    cpu, own = redis_cpu_seconds(server) - cpu, children_cpu() - own
    after = evalsha_stats(server)
    if done.returncode != 0:
        raise RuntimeError(f"redis-benchmark exited {done.returncode}: {done.stderr[-2000:]}")
    failed = {k: after.get(k, 0) - stats.get(k, 0) for k in ("failed_calls", "rejected_calls")}
    served = after.get("calls", 0) - stats.get("calls", 0)
    if any(failed.values()) or served < calls:
        raise RuntimeError(f"{case.name}: {served} calls served of {calls}, {failed}; "
                           f"{done.stdout[-500:]}")
    row = next(csv.DictReader(io.StringIO(done.stdout)))
    rps = float(row["rps"])
    return {
        "case": case.name, "pipeline": pipeline, "calls": calls, "rps": rps,
        "requests_per_s": rps * case.requests_per_call,
        "redis_cpu_us_per_call": cpu * 1e6 / calls,
        "redis_cpu_us_per_request": (cpu * 1e6 / (calls * case.requests_per_call)
                                     if case.requests_per_call else None),
        "redis_core_pct": 100 * cpu / wall,
        "benchmark_core_pct": 100 * own / wall,
        "p50_ms": float(row["p50_latency_ms"]), "p99_ms": float(row["p99_latency_ms"]),
    }


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| call | -P | calls/s | requests/s | redis CPU µs/call | µs/request "
             "| redis-server core | redis-benchmark core | p50 | p99 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = list(dict.fromkeys((r["case"], r["pipeline"]) for r in runs))
    for name, pipeline in keys:
        sel = [r for r in runs if r["case"] == name and r["pipeline"] == pipeline]

        def med(key: str, sel: list[dict[str, Any]] = sel) -> float:
            return statistics.median(r[key] for r in sel)

        if sel[0]["redis_cpu_us_per_request"] is None:  # per worker or pod, not per request
            rps_req, us_req = "—", "—"
        else:
            rps_req = f"{med('requests_per_s'):,.0f}"
            us_req = f"{med('redis_cpu_us_per_request'):,.1f}"
        lines.append(
            f"| {name} | {pipeline} | {med('rps'):,.0f} | {rps_req} | "
            f"{med('redis_cpu_us_per_call'):,.1f} | {us_req} | "
            f"{med('redis_core_pct'):.0f}% | {med('benchmark_core_pct'):.0f}% | "
            f"{med('p50_ms'):.2f} ms | {med('p99_ms'):.2f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_capacity",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000,
                        help="admissions per run (-n); settles: as many requests")
    parser.add_argument("--clients", type=int, default=50, help="redis-benchmark -c")
    parser.add_argument("--pipeline", type=int, action="append",
                        help="redis-benchmark -P (repeatable; default 1 and 16)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    pipelines = args.pipeline or [1, 16]
    if shutil.which("redis-benchmark") is None:
        print("redis-benchmark not found (Debian: apt-get install redis-tools)", file=sys.stderr)
        return 1
    directory = tempfile.mkdtemp(prefix="zaiproxy-fleet-capacity-")
    server = RedisServer(Path(directory))
    runs: list[dict[str, Any]] = []
    try:
        sha = subprocess.run(["redis-cli", "-p", str(server.port), "-x", "SCRIPT", "LOAD"],
                             input=SCRIPT_PATH.read_bytes(), capture_output=True, timeout=30,
                             check=True).stdout.decode().strip()
        for repeat in range(1, args.repeat + 1):
            for case in cases():
                for pipeline in pipelines if case.pipelined else pipelines[:1]:
                    run = run_case(server, sha, case, args, pipeline)
                    runs.append(run)
                    print(f"#{repeat} {case.name:55} -P {pipeline:<2} {run['rps']:9,.0f} calls/s"
                          f"  redis {run['redis_cpu_us_per_call']:7.1f} µs/call "
                          f"({run['redis_core_pct']:.0f}% of a core)", file=sys.stderr)
        keys = int(redis_info(server, "keyspace").get("db0", "keys=0").split(",")[0][5:])
        version = redis_info(server, "server")["redis_version"]
        print(f"redis-server {version}, loopback TCP, redis-benchmark -c {args.clients} "
              f"-r {KEYSPACE}; admissions -n {args.requests:,}, settles as many requests; "
              f"medians of {args.repeat}; {keys:,} keys at the end.\n")
        print(table(runs))
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
