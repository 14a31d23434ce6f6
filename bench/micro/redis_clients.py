"""What one Redis round trip costs this process under trio: coredis and the alternatives.

Run it from the repository root::

    .venv/bin/python -m bench.micro.redis_clients [--calls 4000] [--repeat 3]
        [--concurrency 1 8 64] [--command ping|get|admit|limiter]...

It starts its own ``redis-server`` on a free port (``tests/redis_server.py``; loopback TCP,
no persistence) and measures, for each command, client and concurrency (that many tasks
sharing one client), ``--calls`` calls after a warm-up at the same concurrency:

- **CPU µs/call**: ``time.process_time()`` of this whole process (every thread: redis-py's
  thread hops included) ÷ calls;
- **wall µs/call**: elapsed ÷ calls (the inverse of the throughput; at concurrency 1 it is
  the round trip);
- **redis-server CPU µs/call**: the server's ``used_cpu_sys + used_cpu_user`` (``INFO cpu``)
  ÷ calls.

Commands:

- ``PING``; ``GET`` of a 16-byte value;
- ``admit``: ``EVALSHA`` of ``zaiproxy/limits/fleet.lua`` with the arguments the proxy
  builds (``FleetLimiter.plan``) for global requests/min and tokens/min (GCRA), concurrency,
  requests and tokens per 5 h (windows) plus the adaptive rate: 6 ops, 7 keys, 600 tokens
  reserved; each task holds its own lease id (as many leases as calls in flight);
- ``limiter`` (coredis only): the product's own code, ``FleetLimiter.admit`` then
  ``settle(admission, 450)`` per request with the worker's flusher running (settles are
  sent batched); its row also shows how many Redis calls one request cost.

Clients:

- ``coredis (trio)``: ``coredis.Redis``, one client shared by all tasks: the proxy's;
- ``redis-py sync, trio thread``: ``redis.Redis`` (its pool gives each thread its own
  connection) called through ``trio.to_thread.run_sync`` with a ``CapacityLimiter`` of the
  concurrency (trio's default limiter would stop at 40 threads);
- reference, not usable in the proxy: ``redis-py asyncio`` under asyncio (one client, N
  tasks) and ``redis-py sync, blocking`` (a plain loop, concurrency 1 only).

The runs are interleaved (every combination once, then again ``--repeat`` times) and the
table shows medians; this machine is shared, so read differences below ~15 % as noise.
redis-py rows are skipped, with a message, when ``import redis`` fails (it is not a
dependency of zaiproxy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coredis
import trio

from tests.redis_server import RedisServer
from zaiproxy.core.limitspec import Limits
from zaiproxy.limits.admission import Admission, Admitter
from zaiproxy.limits.fleet import SCRIPT, FleetKeys, FleetLimiter, FleetPlan
from zaiproxy.limits.ledger import load

try:
    import redis
    import redis.asyncio
except ImportError:  # pragma: no cover - redis-py is optional here
    redis = None  # type: ignore[assignment]

HIGH = 1_000_000_000  # limits that never refuse
HIGH_TOKENS = 1_000_000_000_000
PREFIX = "bench"
RESERVED, USED = 600, 450  # tokens reserved at admission, used at settle
WARMUP = 200  # calls before the timed ones, at the same concurrency
LIMITS = Limits(requests_per_minute=HIGH, tokens_per_minute=HIGH_TOKENS, concurrency=HIGH,
                requests_per_5h=HIGH, tokens_per_5h=HIGH_TOKENS)
COMMANDS = ("ping", "get", "admit", "limiter")
CORO = "coredis (trio)"
THREAD = "redis-py sync, trio thread"
ASYNCIO = "redis-py asyncio (asyncio; ref.)"
BLOCKING = "redis-py sync, blocking (ref.)"
CLIENTS = (CORO, THREAD, ASYNCIO, BLOCKING)


# ---- the admit call the proxy makes --------------------------------------------------------


def open_segment(directory: str) -> Any:
    """A private ledger segment (the fail policy's), as the fleet tests make one."""
    impl = load()
    segment = impl.Ledger(os.path.join(directory, "ledger"), create=True, rows=512, windows=64,
                          workers=1)
    segment.unlink()
    return impl, segment


def make_limiter(client: Any, directory: str) -> FleetLimiter:
    """The worker's FleetLimiter over ``client`` (None: only to build plans). The command
    timeout is 1 s, not the product's 0.05 s: this measures cost, not a noisy machine's
    hiccups (a switch to the fail policy would fail the run: ``fail = closed``)."""
    impl, segment = open_segment(directory)
    local = Admitter(segment, impl, worker=0, global_limits=LIMITS, upstream_limits=Limits(),
                     upstream_id=b"upstream", adaptive=True)
    return FleetLimiter(client=client, local=local, keys=FleetKeys(PREFIX, "up0"),
                        segment=segment, global_limits=LIMITS, upstream_limits=Limits(),
                        adaptive=True, worker=0, lease_ttl_s=15.0, command_timeout_s=1.0,
                        fail="closed", share=1.0)


@dataclass(frozen=True)
class AdmitCall:
    """EVALSHA arguments of one admission: keys, and the argument list for a lease id."""

    sha: str
    keys: list[str]
    template: list[Any]
    ops: int

    def args(self, lease: str) -> list[Any]:
        args = self.template.copy()
        args[2] = lease
        return args


def admit_call(sha: str, directory: str) -> AdmitCall:
    plan = make_limiter(None, directory).plan(None, None)
    fp: FleetPlan = plan.backend
    template = list(fp.args)
    for pos in fp.weighted_args:
        template[pos] = RESERVED
    return AdmitCall(sha, list(fp.keys), template, len(plan.ops))


# ---- one timed run -------------------------------------------------------------------------


@dataclass
class Env:
    server: RedisServer
    admit: AdmitCall
    directory: str


@dataclass
class Timing:
    cpu_s: float
    wall_s: float
    redis_s: float
    calls: int
    redis_calls: int = 0  # EVALSHA calls seen by the server (the limiter row)


def redis_cpu(env: Env) -> float:
    """The server's own CPU seconds (``INFO cpu``: getrusage, µs resolution; /proc has 10 ms
    ticks)."""
    info = dict(line.split(":", 1) for line in env.server.cli("INFO", "cpu").split()
                if ":" in line)
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def evalsha_calls(env: Env) -> int:
    for line in env.server.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0


class Clock:
    """CPU, wall and redis-server CPU between ``start`` and ``stop``."""

    def __init__(self, env: Env) -> None:
        self.env = env

    def start(self) -> None:
        self.cpu = time.process_time()
        self.redis = redis_cpu(self.env)
        self.wall = time.perf_counter()

    def stop(self, calls: int) -> Timing:
        wall = time.perf_counter() - self.wall
        return Timing(time.process_time() - self.cpu, wall, redis_cpu(self.env) - self.redis,
                      calls)


def per_task(calls: int, concurrency: int) -> int:
    return max(1, calls // concurrency)


async def trio_tasks(call: Callable[[int], Awaitable[Any]], concurrency: int, each: int) -> None:
    async def task(i: int) -> None:
        for _ in range(each):
            await call(i)

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(task, i)


async def asyncio_tasks(call: Callable[[int], Awaitable[Any]], concurrency: int,
                        each: int) -> None:
    async def task(i: int) -> None:
        for _ in range(each):
            await call(i)

    await asyncio.gather(*(task(i) for i in range(concurrency)))


def leases(concurrency: int) -> list[str]:
    return [f"bench-host:1:0:{i}" for i in range(concurrency)]


def run_coredis(env: Env, command: str, concurrency: int, calls: int) -> Timing:
    each = per_task(calls, concurrency)
    admit = env.admit
    ids = leases(concurrency)

    async def main() -> Timing:
        client = coredis.Redis(host="127.0.0.1", port=env.server.port, decode_responses=False)
        async with client:
            calls_by_command: dict[str, Callable[[int], Awaitable[Any]]] = {
                "ping": lambda _i: client.ping(),
                "get": lambda _i: client.get("bench:value"),
                "admit": lambda i: client.evalsha(admit.sha, keys=admit.keys,
                                                  args=admit.args(ids[i])),
            }
            call = calls_by_command[command]
            await trio_tasks(call, concurrency, per_task(WARMUP, concurrency))
            clock = Clock(env)
            clock.start()
            await trio_tasks(call, concurrency, each)
            return clock.stop(each * concurrency)

    return trio.run(main)


def run_limiter(env: Env, concurrency: int, calls: int) -> Timing:
    """FleetLimiter.admit + settle per request, the worker's flusher and maintenance running."""
    each = per_task(calls, concurrency)

    async def main() -> Timing:
        client = coredis.Redis(host="127.0.0.1", port=env.server.port, decode_responses=False)
        limiter = make_limiter(client, env.directory)
        plan = limiter.plan(None, None)

        async def request(_i: int) -> None:
            admission = await limiter.admit(plan, RESERVED)
            assert isinstance(admission, Admission), admission
            limiter.settle(admission, USED)

        async with trio.open_nursery() as nursery:
            await nursery.start(limiter.run)
            await trio_tasks(request, concurrency, per_task(WARMUP, concurrency))
            await limiter.flush()
            before = await trio.to_thread.run_sync(evalsha_calls, env)
            clock = Clock(env)
            clock.start()
            await trio_tasks(request, concurrency, each)
            await limiter.flush()  # the settles' calls belong to these requests
            timing = clock.stop(each * concurrency)
            timing.redis_calls = await trio.to_thread.run_sync(evalsha_calls, env) - before
            if not limiter.up:
                raise RuntimeError("the limiter lost Redis during the run")
            nursery.cancel_scope.cancel()
        return timing

    return trio.run(main)


def sync_call(client: Any, env: Env, command: str) -> Callable[[int], Any]:
    admit = env.admit
    ids = leases(256)
    calls: dict[str, Callable[[int], Any]] = {
        "ping": lambda _i: client.ping(),
        "get": lambda _i: client.get("bench:value"),
        "admit": lambda i: client.evalsha(admit.sha, len(admit.keys), *admit.keys,
                                          *admit.args(ids[i])),
    }
    return calls[command]


def run_thread(env: Env, command: str, concurrency: int, calls: int) -> Timing:
    each = per_task(calls, concurrency)
    client = redis.Redis(host="127.0.0.1", port=env.server.port, max_connections=concurrency + 4)
    call = sync_call(client, env, command)
    limiter = trio.CapacityLimiter(concurrency)

    async def main() -> Timing:
        async def hop(i: int) -> Any:
            return await trio.to_thread.run_sync(call, i, limiter=limiter)

        await trio_tasks(hop, concurrency, per_task(WARMUP, concurrency))
        clock = Clock(env)
        clock.start()
        await trio_tasks(hop, concurrency, each)
        return clock.stop(each * concurrency)

    try:
        return trio.run(main)
    finally:
        client.close()


def run_asyncio(env: Env, command: str, concurrency: int, calls: int) -> Timing:
    each = per_task(calls, concurrency)
    admit = env.admit
    ids = leases(concurrency)

    async def main() -> Timing:
        client = redis.asyncio.Redis(host="127.0.0.1", port=env.server.port)
        try:
            calls_by_command: dict[str, Callable[[int], Awaitable[Any]]] = {
                "ping": lambda _i: client.ping(),
                "get": lambda _i: client.get("bench:value"),
                "admit": lambda i: client.evalsha(admit.sha, len(admit.keys), *admit.keys,
                                                  *admit.args(ids[i])),
            }
            call = calls_by_command[command]
            await asyncio_tasks(call, concurrency, per_task(WARMUP, concurrency))
            clock = Clock(env)
            clock.start()
            await asyncio_tasks(call, concurrency, each)
            return clock.stop(each * concurrency)
        finally:
            await client.aclose()

    return asyncio.run(main())


def run_blocking(env: Env, command: str, calls: int) -> Timing:
    client = redis.Redis(host="127.0.0.1", port=env.server.port)
    call = sync_call(client, env, command)
    try:
        for _ in range(WARMUP):
            call(0)
        clock = Clock(env)
        clock.start()
        for _ in range(calls):
            call(0)
        return clock.stop(calls)
    finally:
        client.close()


def run_one(env: Env, command: str, client: str, concurrency: int, calls: int) -> Timing:
    if command == "limiter":
        return run_limiter(env, concurrency, calls)
    if client == CORO:
        return run_coredis(env, command, concurrency, calls)
    if client == THREAD:
        return run_thread(env, command, concurrency, calls)
    if client == ASYNCIO:
        return run_asyncio(env, command, concurrency, calls)
    return run_blocking(env, command, calls)


# ---- the whole run -------------------------------------------------------------------------


def combinations(commands: list[str], concurrencies: list[int]) -> list[tuple[str, str, int]]:
    out = []
    for command in commands:
        clients = [CORO] if command == "limiter" else list(CLIENTS)
        if redis is None:
            clients = [c for c in clients if c == CORO]
        for client in clients:
            for c in ([1] if client == BLOCKING else concurrencies):
                out.append((command, client, c))
    return out


def label(command: str, admit: AdmitCall) -> str:
    if command == "admit":
        return f"admit (EVALSHA, {admit.ops} ops, {len(admit.keys)} keys)"
    if command == "limiter":
        return "FleetLimiter.admit + settle"
    return command.upper()


def table(results: dict[tuple[str, str, int], list[Timing]], admit: AdmitCall) -> str:
    lines = ["| command | client | concurrency | CPU µs/call | wall µs/call | calls/s "
             "| redis-server CPU µs/call | Redis calls/request |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (command, client, c), runs in results.items():
        cpu = statistics.median(t.cpu_s / t.calls for t in runs) * 1e6
        wall = statistics.median(t.wall_s / t.calls for t in runs) * 1e6
        server = statistics.median(t.redis_s / t.calls for t in runs) * 1e6
        per = ("—" if command != "limiter"
               else f"{statistics.median(t.redis_calls / t.calls for t in runs):.2f}")
        lines.append(f"| {label(command, admit)} | {client} | {c} | {cpu:,.0f} | {wall:,.0f} | "
                     f"{1e6 / wall:,.0f} | {server:,.1f} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000, help="timed calls per run")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs; medians shown")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--command", action="append", choices=COMMANDS,
                        help="only these commands (repeatable); default all")
    args = parser.parse_args(argv)
    if redis is None:
        print("redis-py is not installed (`import redis` failed): its rows are skipped",
              file=sys.stderr)
    directory = tempfile.mkdtemp(prefix="zaiproxy-redis-clients-")
    server = RedisServer(Path(directory) / "redis")
    try:
        server.cli("SET", "bench:value", "x" * 16)
        sha = server.cli("SCRIPT", "LOAD", SCRIPT).strip()
        env = Env(server, admit_call(sha, directory), directory)
        combos = combinations(args.command or list(COMMANDS), args.concurrency)
        results: dict[tuple[str, str, int], list[Timing]] = {combo: [] for combo in combos}
        for repeat in range(args.repeat):
            for combo in combos:
                timing = run_one(env, *combo, args.calls)
                results[combo].append(timing)
                print(f"#{repeat + 1} {combo[0]:7} {combo[1]:34} c={combo[2]:<3} "
                      f"{timing.cpu_s / timing.calls * 1e6:7.1f} µs CPU/call  "
                      f"{timing.wall_s / timing.calls * 1e6:7.1f} µs wall/call", file=sys.stderr)
        print(f"Medians of {args.repeat} interleaved runs of {args.calls} calls; redis-server "
              f"{server.cli('INFO', 'server').split('redis_version:')[1].split()[0]} on "
              "loopback TCP.\n")
        print(table(results, env.admit))
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
