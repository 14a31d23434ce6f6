"""The ledger with real processes writing one segment at once (both implementations).

Four spawned processes hammer the same GCRA row, concurrency row, rolling window
and all-or-nothing admissions on a fixed virtual time, so the exact number of
admissions is known: any lost update or over-admission changes a count. A child
killed with SIGKILL while holding leases shows that ``reclaim`` gives them back.
"""

from __future__ import annotations

import array
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zaiproxy.limits.ledger import load

CTX = multiprocessing.get_context("spawn")  # never fork: spawn, as the supervisor does
PROCS = 4
PERIOD = 60_000_000_000
W = 60_000
# Attempts per child and per phase; the twin takes a flock per call, so it gets fewer.
ATTEMPTS = {"native": 200_000, "python": 4_000}


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="zaiproxy-test-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def hammer(impl: str, path: str, worker: int, attempts: int, barrier: Any, out: Any) -> None:
    """One child: attach, then run each phase in step with the other children."""
    mod = load(impl)
    led = mod.Ledger(path, create=False)
    limit = attempts * PROCS // 2  # half of all attempts can succeed
    res: dict[str, int] = {}
    barrier.wait()
    # Every child claims the same new key at the same moment: one row for all of them.
    res["row"] = led.row(b"claimed-concurrently")
    g, c, w, n = led.row(b"gcra"), led.row(b"conc"), led.window(b"win"), led.row(b"counter")

    barrier.wait()
    res["gcra"] = sum(led.gcra_take(g, 1, limit, PERIOD, 0) == 0 for _ in range(attempts))
    for _ in range(attempts):
        led.counter_add(n, 3, 1)
        led.scalar_add(1, 1)

    barrier.wait()
    res["window"] = sum(led.window_take(w, 1, limit, W, 0)[0] == 0 for _ in range(attempts))

    barrier.wait()  # leases without releasing: exactly `limit` in total
    res["lease"] = sum(led.lease(c, limit, worker) for _ in range(attempts))

    barrier.wait()  # churn: lease and release, never more than `limit` in use
    churn = led.row(b"churn")
    held = max_seen = 0
    for i in range(attempts):
        if led.lease(churn, 3, worker):
            held += 1
            max_seen = max(max_seen, led.in_use(churn))
        if held and i % 2:
            led.release(churn, worker)
            held -= 1
    res["held"], res["max_seen"] = held, max_seen

    barrier.wait()  # all-or-nothing admissions: the window (smallest limit) decides
    ag, ac, aw = led.row(b"a-gcra"), led.row(b"a-conc"), led.window(b"a-win")
    ops = array.array("q", [mod.KIND_GCRA, ag, 1, limit, PERIOD, 0, 0, 0,
                            mod.KIND_CONCURRENCY, ac, 0, limit, 0, 0, 0, 0,
                            mod.KIND_WINDOW, aw, 1, limit // 2, W, 0, 0, 0])
    res["admit"] = sum(led.admit(ops, 3, 0, worker) == -1 for _ in range(attempts))
    led.close()
    out.put((worker, res))


@pytest.mark.parametrize("impl", ["native", "python"])
def test_processes_share_one_segment_exactly(impl: str, shm_dir: Path) -> None:
    mod = load(impl)
    path = str(shm_dir / "seg")
    attempts = ATTEMPTS[impl]
    limit = attempts * PROCS // 2
    led = mod.Ledger(path, create=True, rows=64, windows=8, workers=PROCS)
    barrier, out = CTX.Barrier(PROCS, timeout=60), CTX.Queue()
    procs = [CTX.Process(target=hammer, args=(impl, path, w, attempts, barrier, out))
             for w in range(PROCS)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    res = list(results.values())

    assert len({r["row"] for r in res}) == 1
    assert led.row(b"claimed-concurrently") == res[0]["row"]
    # GCRA at one instant: exactly `limit` taken, and no increment of a plain counter lost.
    assert sum(r["gcra"] for r in res) == limit
    assert led.gcra_state(led.row(b"gcra"), limit, PERIOD, 0) == (0, PERIOD)
    assert led.counter_get(led.row(b"counter"), 3) == PROCS * attempts
    assert led.scalar_get(1) == PROCS * attempts
    assert sum(r["window"] for r in res) == limit
    assert led.window_used(led.window(b"win"), W, 0) == limit
    assert sum(r["lease"] for r in res) == limit
    assert led.in_use(led.row(b"conc")) == limit
    churn = led.row(b"churn")
    assert max(r["max_seen"] for r in res) <= 3
    assert led.in_use(churn) == sum(r["held"] for r in res)
    # Admissions: the window allows limit // 2; refused ones left nothing behind.
    admitted = sum(r["admit"] for r in res)
    assert admitted == limit // 2
    assert led.gcra_state(led.row(b"a-gcra"), limit, PERIOD, 0)[0] == limit - admitted
    assert led.in_use(led.row(b"a-conc")) == admitted
    assert led.window_used(led.window(b"a-win"), W, 0) == admitted
    # Every worker's leases, given back: nothing is in use anywhere.
    held = sum(r["held"] for r in res)
    assert sum(led.reclaim(w) for w in range(PROCS)) == limit + held + admitted
    assert [led.in_use(led.row(k)) for k in (b"conc", b"churn", b"a-conc")] == [0, 0, 0]
    led.close()


def lease_and_wait(impl: str, path: str, worker: int, ready: Any, never: Any) -> None:
    """A child that takes leases, says so, and waits to be killed."""
    mod = load(impl)
    led = mod.Ledger(path, create=False)
    a, b = led.row(b"a"), led.row(b"b")
    for _ in range(5):
        assert led.lease(a, 10, worker)
    ops = array.array("q", [mod.KIND_CONCURRENCY, b, 0, 10, 0, 0, 0, 0] * 2)
    assert led.admit(ops, 2, 0, worker) == -1
    ready.set()
    never.wait(60)  # SIGKILL arrives first


@pytest.mark.parametrize("impl", ["native", "python"])
def test_reclaim_after_sigkill(impl: str, shm_dir: Path) -> None:
    mod = load(impl)
    path = str(shm_dir / "seg")
    led = mod.Ledger(path, create=True, rows=16, windows=1, workers=4)
    a, b = led.row(b"a"), led.row(b"b")
    assert led.lease(a, 10, 0) and led.lease(a, 10, 0)  # the parent's own, as worker 0
    ready, never = CTX.Event(), CTX.Event()
    child = CTX.Process(target=lease_and_wait, args=(impl, path, 3, ready, never))
    child.start()
    assert ready.wait(60)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    assert (led.in_use(a), led.in_use(b)) == (7, 2)
    assert led.reclaim(3) == 7
    assert (led.in_use(a), led.in_use(b)) == (2, 0)  # worker 0's leases are untouched
    assert led.reclaim(3) == 0
    # A killed child never leaves the segment locked (native: no locks; twin: the kernel
    # drops a dead process's flock).
    assert led.lease(b, 1, 1)
    led.close()
