"""What one ledger call costs, from Python, in each implementation.

Run it from the repository root::

    .venv/bin/python -m bench.micro.ledger_cost [--iterations 200000] [--twin-iterations 20000]

It prints nanoseconds per call (the best of ``--repeat`` timed loops, each of
``time.perf_counter_ns`` around a plain ``for`` loop, so the loop's own overhead
is included; an empty method call is printed as a baseline) for:

- ``admit + release_ops``, 3 ops: one GCRA, one concurrency lease, one rolling window
  (the shape of a request with requests/min, concurrency and a 5 h quota);
- ``admit + release_ops``, 7 ops: requests/min, tokens/min, concurrency, and the four
  5 h / week windows of requests and tokens;
- ``gcra_take`` alone.

One process, no contention: this is the floor. The segment is a fresh file in
/dev/shm, removed at the end.
"""

from __future__ import annotations

import argparse
import array
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from zaiproxy.core.limitspec import Limits
from zaiproxy.limits.admission import Admitter
from zaiproxy.limits.ledger import load

MINUTE = 60_000_000_000
FIVE_HOURS = 5 * 3600 * 1_000_000_000
WEEK = 7 * 24 * 3600 * 1_000_000_000
BIG = 1_000_000_000_000  # limits that never refuse: we time the path that takes


def best_ns(fn: Callable[[int], None], iterations: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn(iterations)
        best = min(best, (time.perf_counter_ns() - t0) / iterations)
    return best


HUGE = 10**12


def measure(impl: str, iterations: int, repeat: int, directory: str) -> dict[str, float]:
    mod = load(impl)
    led: Any = mod.Ledger(os.path.join(directory, impl), create=True)
    try:
        g, t, c = led.row(b"rpm"), led.row(b"tpm"), led.row(b"conc")
        wins = [led.window(k) for k in (b"req-5h", b"tok-5h", b"req-week", b"tok-week")]
        three = array.array("q", [mod.KIND_GCRA, g, 1, BIG, MINUTE, 0, 0, 0,
                                  mod.KIND_CONCURRENCY, c, 0, BIG, 0, 0, 0, 0,
                                  mod.KIND_WINDOW, wins[0], 1, BIG, FIVE_HOURS, 0, 0, 0])
        seven = array.array("q", [mod.KIND_GCRA, g, 1, BIG, MINUTE, 0, 0, 0,
                                  mod.KIND_GCRA, t, 500, BIG, MINUTE, 0, 0, 0,
                                  mod.KIND_CONCURRENCY, c, 0, BIG, 0, 0, 0, 0])
        for w, (cost, span) in zip(wins, ((1, FIVE_HOURS), (500, FIVE_HOURS), (1, WEEK),
                                          (500, WEEK)), strict=True):
            seven.extend([mod.KIND_WINDOW, w, cost, BIG, span, 0, 0, 0])
        admit, release_ops, gcra_take, in_use = (led.admit, led.release_ops, led.gcra_take,
                                                 led.in_use)

        def admit_release(ops: array.array[int], n: int) -> Callable[[int], None]:
            def run(iterations: int) -> None:
                now = 1_000_000
                for _ in range(iterations):
                    now += 1_000  # a request every µs: the windows rotate now and then
                    if admit(ops, n, now, 0) != -1:
                        raise AssertionError("refused")
                    release_ops(ops, n, 0, now)
            return run

        def gcra(iterations: int) -> None:
            for i in range(iterations):
                gcra_take(g, 1, BIG, MINUTE, i)

        def baseline(iterations: int) -> None:
            for _ in range(iterations):
                in_use(c)

        # What the request path really pays: zaiproxy.limits.admission.Admitter over a plan of every
        # limit kind at the global scope (7 ops) plus the adaptive rate, reserving 600 tokens
        # and settling 450 (refunds on the 3 token-weighted ops).
        everything = Limits(requests_per_minute=HUGE, tokens_per_minute=HUGE, concurrency=HUGE,
                            requests_per_5h=HUGE, tokens_per_5h=HUGE, requests_per_week=HUGE,
                            tokens_per_week=HUGE)
        admitter = Admitter(led, mod, worker=0, global_limits=everything,
                            upstream_limits=Limits(), upstream_id=b"upstream", adaptive=True)
        plan = admitter.plan(None, None)

        def admit_settle(iterations: int) -> None:
            for _ in range(iterations):
                admission = admitter.admit(plan, 600)
                admitter.settle(admission, 450)  # type: ignore[arg-type]

        return {
            "Admitter.admit+settle, 8 limits": best_ns(admit_settle, iterations, repeat),
            "admit+release_ops, 3 ops": best_ns(admit_release(three, 3), iterations, repeat),
            "admit+release_ops, 7 ops": best_ns(admit_release(seven, 7), iterations, repeat),
            "gcra_take": best_ns(gcra, iterations, repeat),
            "in_use (one atomic load; baseline)": best_ns(baseline, iterations, repeat),
        }
    finally:
        led.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200_000, help="per loop, native")
    parser.add_argument("--twin-iterations", type=int, default=20_000,
                        help="per loop, pure-Python twin")
    parser.add_argument("--repeat", type=int, default=5, help="timed loops; the best is shown")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="zaiproxy-bench-", dir="/dev/shm")
    try:
        results = {
            "native": measure("native", args.iterations, args.repeat, directory),
            "python": measure("python", args.twin_iterations, args.repeat, directory),
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    names = list(results["native"])
    width = max(map(len, names))
    print(f"{'ns per call (best of ' + str(args.repeat) + ')':<{width}}  {'native':>9}  "
          f"{'python':>9}  {'ratio':>6}")
    for name in names:
        nat, py = results["native"][name], results["python"][name]
        print(f"{name:<{width}}  {nat:>9.0f}  {py:>9.0f}  {py / nat:>5.0f}x")


if __name__ == "__main__":
    main()
