"""The shared-memory ledger, on a virtual clock, against both implementations.

Every ledger test runs against the native module and its pure-Python twin; a
hypothesis state machine drives both with the same random sequence and checks
them against a reference model made of plain dicts. Multi-process behaviour is
in tests/test_ledger_procs.py.
"""

from __future__ import annotations

import array
import copy
import os
import shutil
import struct
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from zaiproxy._native import _ledger_py

from zaiproxy.limits.ledger import LedgerUnavailable, load

IMPLEMENTATIONS = ["native", "python"]
MIN = 60_000_000_000  # one minute in ns
W = 60_000  # a 60 µs rolling window: 60 buckets of 1 µs


def test_native_module_loaded_when_expected() -> None:
    # `make test` builds the extension; the suite must fail, not fall back, if it did not load.
    if os.environ.get("ZAIPROXY_LEDGER", "native") == "native":
        assert load().IMPLEMENTATION == "native"
        assert load().__name__ == "zaiproxy._native._ledger"
        assert load().__file__.endswith(".so")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_known_vectors(impl: str) -> None:
    mod = load(impl)
    # FNV-1a 64 reference values (http://www.isthe.com/chongo/tech/comp/fnv/).
    assert mod.stable_hash(b"") == 0xCBF29CE484222325
    assert mod.stable_hash(b"a") == 0xAF63DC4C8601EC8C
    assert mod.stable_hash(b"foobar") == 0x85944171F73967E8


@given(st.binary(max_size=512))
def test_twins_agree(data: bytes) -> None:
    assert load("native").stable_hash(data) == _ledger_py.stable_hash(data)


def test_unknown_choice_is_an_error() -> None:
    with pytest.raises(LedgerUnavailable):
        load("bogus")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_module_constants(impl: str) -> None:
    mod = load(impl)
    assert impl == mod.IMPLEMENTATION
    assert mod.MAGIC.to_bytes(8, "little") == b"ZAILEDG1"
    assert (mod.VERSION, mod.SCALARS, mod.WINDOW_BUCKETS, mod.OP_WORDS) == (1, 16, 60, 8)
    assert (mod.KIND_GCRA, mod.KIND_CONCURRENCY, mod.KIND_WINDOW) == (1, 2, 3)
    assert mod.segment_size(64, 16, 8) == _ledger_py.segment_size(64, 16, 8)


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture
def shm_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="zaiproxy-test-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=IMPLEMENTATIONS)
def mod(request: pytest.FixtureRequest) -> ModuleType:
    return load(request.param)


@pytest.fixture
def ledger(mod: ModuleType, shm_dir: Path) -> Iterator[Any]:
    led = mod.Ledger(str(shm_dir / "seg"), create=True, rows=64, windows=16, workers=8)
    yield led
    led.close()


def ops_of(*records: tuple[int, ...]) -> array.array[int]:
    ops = array.array("q")
    for rec in records:
        ops.extend((*rec, 0, 0, 0, 0, 0, 0, 0, 0)[:8])
    return ops


# --- header and attach -------------------------------------------------------------------

def test_header_layout(ledger: Any) -> None:
    raw = Path(ledger.path).read_bytes()
    magic, version, rows, windows, workers, size, pid = struct.unpack_from("<8sIIIIQQ", raw)
    assert (magic, version, rows, windows, workers) == (b"ZAILEDG1", 1, 64, 16, 8)
    assert size == len(raw) == _ledger_py.segment_size(64, 16, 8)
    assert pid == os.getpid()
    assert os.stat(ledger.path).st_mode & 0o777 == 0o600


def test_attach_takes_layout_from_header(mod: ModuleType, ledger: Any) -> None:
    with mod.Ledger(ledger.path, create=False) as other:
        assert (other.rows, other.windows, other.workers) == (64, 16, 8)
        assert other.implementation == mod.IMPLEMENTATION
        other.scalar_set(3, -42)
        assert ledger.scalar_get(3) == -42
        assert other.row(b"k") == ledger.row(b"k")
    assert repr(other).endswith("closed>")


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"NOTALEDG" + raw[8:], "bad magic"),
    (lambda raw: raw[:8] + struct.pack("<I", 2) + raw[12:], "version 2"),
    (lambda raw: raw[:-64], "truncated"),
    (lambda raw: raw[:10], "truncated"),
    (lambda raw: raw[:12] + struct.pack("<I", 65) + raw[16:], "inconsistent"),
])
def test_attach_refuses_a_bad_segment(mod: ModuleType, ledger: Any, damage: Any,
                                      message: str) -> None:
    path = Path(ledger.path)
    ledger.close()
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(mod.LedgerError, match=message):
        mod.Ledger(str(path), create=False)


def test_attach_missing_file(mod: ModuleType, shm_dir: Path) -> None:
    with pytest.raises(mod.LedgerError, match="does not exist"):
        mod.Ledger(str(shm_dir / "nope"), create=False)


def test_attach_refuses_the_other_implementation(mod: ModuleType, ledger: Any) -> None:
    other = load("python" if mod.IMPLEMENTATION == "native" else "native")
    with pytest.raises(other.LedgerError, match="same implementation"):
        other.Ledger(ledger.path, create=False)


@pytest.mark.parametrize("stale", [b"", b"garbage" * 1000, None])
def test_create_replaces_a_stale_file(mod: ModuleType, shm_dir: Path, stale: bytes | None) -> None:
    path = shm_dir / "seg"
    if stale is None:  # a valid segment of the same layout, full of old state
        with mod.Ledger(str(path), create=True, rows=64, windows=16, workers=8) as old:
            old.scalar_set(0, 7)
            assert old.lease(old.row(b"c"), 5, 1)
    else:
        path.write_bytes(stale)
    with mod.Ledger(str(path), create=True, rows=64, windows=16, workers=8) as led:
        assert led.scalar_get(0) == 0
        assert led.in_use(led.row(b"c")) == 0
        assert led.reclaim(1) == 0
        assert path.stat().st_size == led_size(led)


def led_size(led: Any) -> int:
    return int(_ledger_py.segment_size(led.rows, led.windows, led.workers))


def test_close_and_unlink(mod: ModuleType, ledger: Any) -> None:
    assert repr(ledger) == (f"<Ledger {mod.IMPLEMENTATION} {ledger.path} rows=64 windows=16 "
                            "workers=8 open>")
    ledger.close()
    ledger.close()
    with pytest.raises(mod.LedgerError, match="closed"):
        ledger.row(b"k")
    ledger.unlink()
    assert not os.path.exists(ledger.path)
    ledger.unlink()


def test_bad_arguments(mod: ModuleType, ledger: Any) -> None:
    for call in (lambda: ledger.in_use(64), lambda: ledger.scalar_get(16),
                 lambda: ledger.counter_add(0, 0, 1), lambda: ledger.counter_get(0, 8),
                 lambda: ledger.lease(0, 1, 8), lambda: ledger.gcra_take(0, -1, 1, 1, 0),
                 lambda: ledger.gcra_take(0, 1, 0, 1, 0), lambda: ledger.gcra_take(0, 1, 1, 1, -1),
                 lambda: ledger.window_take(16, 1, 1, W, 0),
                 lambda: ledger.window_take(0, 1, 1, 59, 0)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(OverflowError):
        ledger.scalar_set(0, 1 << 63)


# --- rows ---------------------------------------------------------------------------------

def keys_hashing_to(n: int, slot: int, count: int) -> list[bytes]:
    keys = (b"key-%d" % i for i in range(10_000))
    return [k for k in keys if _ledger_py.stable_hash(k) % n == slot][:count]


def test_rows_claim_probe_and_fill(mod: ModuleType, shm_dir: Path) -> None:
    with mod.Ledger(str(shm_dir / "seg"), create=True, rows=4, windows=4, workers=1) as led:
        a, b, c = keys_hashing_to(4, 3, 3)
        assert led.row(a) == 3
        assert led.row(b) == 0  # collides with a: the next free row, wrapping around
        assert led.row(c) == 1
        assert (led.row(a), led.row(b), led.row(c)) == (3, 0, 1)
        d = keys_hashing_to(4, 1, 1)[0]
        assert led.row(d) == 2
        with pytest.raises(mod.LedgerFull, match="row table is full"):
            led.row(b"one too many")
        assert issubclass(mod.LedgerFull, mod.LedgerError)
        assert led.row(d) == 2  # known keys are still found
        # The window table is separate and behaves the same.
        assert [led.window(k) for k in (a, b, c, d)] == [3, 0, 1, 2]
        with pytest.raises(mod.LedgerFull, match="window table is full"):
            led.window(b"one too many")


def test_row_find_and_row_hash_enumerate_claimed_rows(mod: ModuleType, shm_dir: Path) -> None:
    with mod.Ledger(str(shm_dir / "seg"), create=True, rows=4, windows=4, workers=1) as led:
        a, b, c = keys_hashing_to(4, 3, 3)
        assert led.row_find(a) == -1
        assert [led.row_hash(i) for i in range(4)] == [0, 0, 0, 0]
        assert led.row(a) == 3
        assert led.row_find(a) == 3
        assert led.row_find(b) == -1  # probes past a's row to the free row 0: absent
        assert led.row(b) == 0
        assert (led.row_find(a), led.row_find(b)) == (3, 0)
        assert led.row_hash(3) == mod.stable_hash(a) and led.row_hash(0) == mod.stable_hash(b)
        assert (led.row_hash(1), led.row_hash(2)) == (0, 0)
        assert led.row_find(c) == -1  # finding claims nothing
        assert (led.row_hash(1), led.row_hash(2)) == (0, 0)
        # Word 0 comes back as an unsigned hash, also with the top bit set.
        high = next(k for k in (b"top-bit-%d" % i for i in range(1000)) if mod.stable_hash(k) >> 63)
        assert led.row_hash(led.row(high)) == mod.stable_hash(high)
        led.row(c)
        assert sorted(led.row_hash(i) for i in range(4)) == sorted(
            mod.stable_hash(k) for k in (a, b, c, high))
        assert led.row_find(b"absent from a full table") == -1
        with pytest.raises(ValueError):
            led.row_hash(4)
        led.close()
        with pytest.raises(mod.LedgerError, match="closed"):
            led.row_find(a)


def test_counter_set_and_row_counters(ledger: Any) -> None:
    r = ledger.row(b"gauges")
    ledger.counter_set(r, 2, -7)
    ledger.counter_add(r, 7, 3)
    assert ledger.row_counters(r) == (0, -7, 0, 0, 0, 0, 3)
    ledger.counter_set(r, 2, 0)
    assert ledger.counter_add(r, 2, 5) == 5
    for call in (lambda: ledger.counter_set(r, 0, 1), lambda: ledger.counter_set(r, 8, 1),
                 lambda: ledger.row_counters(64), lambda: ledger.counter_set(64, 1, 1)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(OverflowError):
        ledger.counter_set(r, 1, 1 << 63)


def test_scalars_and_counters(ledger: Any) -> None:
    assert ledger.scalar_add(5, 10) == 10
    assert ledger.scalar_add(5, -25) == -15
    assert not ledger.scalar_cas(5, 0, 1)
    assert ledger.scalar_cas(5, -15, 99)
    assert ledger.scalar_get(5) == 99
    ledger.scalar_set(15, (1 << 63) - 1)
    assert ledger.scalar_add(15, 1) == -(1 << 63)  # signed 64-bit, wraps
    assert [ledger.scalar_get(i) for i in (0, 4, 6)] == [0, 0, 0]
    r = ledger.row(b"tokens")
    assert ledger.counter_add(r, 1, 5) == 5
    assert ledger.counter_add(r, 7, 3) == 3
    assert (ledger.counter_get(r, 1), ledger.counter_get(r, 7)) == (5, 3)


# --- GCRA ---------------------------------------------------------------------------------

def test_gcra_exact_counts(ledger: Any) -> None:
    r = ledger.row(b"rpm")
    assert [ledger.gcra_take(r, 1, 100, MIN, 0) for _ in range(100)] == [0] * 100
    assert ledger.gcra_take(r, 1, 100, MIN, 0) == 600_000_000  # the 101st: exactly 600 ms
    assert ledger.gcra_take(r, 1, 100, MIN, 599_999_999) == 1
    assert ledger.gcra_take(r, 1, 100, MIN, 600_000_000) == 0
    assert ledger.gcra_take(r, 1, 100, MIN, 600_000_000) == 600_000_000
    assert ledger.gcra_state(r, 100, MIN, 600_000_000) == (0, MIN)
    assert ledger.gcra_state(r, 100, MIN, MIN + 600_000_000) == (100, 0)


def test_gcra_weighted_refund_charge(ledger: Any) -> None:
    r = ledger.row(b"tpm")
    # 1000 tokens/min: 300 tokens cost 18 s of the minute.
    assert [ledger.gcra_take(r, 300, 1000, MIN, 0) for _ in range(3)] == [0, 0, 0]
    assert ledger.gcra_take(r, 300, 1000, MIN, 0) == 12_000_000_000
    assert ledger.gcra_state(r, 1000, MIN, 0) == (100, 54_000_000_000)
    ledger.gcra_give(r, 300, 1000, MIN)
    assert ledger.gcra_take(r, 300, 1000, MIN, 0) == 0
    ledger.gcra_charge(r, 1000, 1000, MIN, 0)  # usage above the reservation: may go over
    assert ledger.gcra_state(r, 1000, MIN, 0) == (0, 114_000_000_000)
    assert ledger.gcra_take(r, 1, 1000, MIN, 0) == 54_000_000_000 + 60_000_000
    assert ledger.gcra_take(r, 1001, 1000, MIN, 0) == -1  # can never be allowed
    ledger.gcra_give(r, 10**12, 1000, MIN)  # a refund never drives the state below zero
    assert ledger.gcra_state(r, 1000, MIN, 5) == (1000, 0)


def test_gcra_rounds_increments_up(ledger: Any) -> None:
    r = ledger.row(b"odd")
    # 3 per 1000 ns: increment ceil(1000/3) = 334, so 3 fit only after 2 ns of slack.
    assert [ledger.gcra_take(r, 1, 3, 1000, 0) for _ in range(3)] == [0, 0, 2]
    assert ledger.gcra_state(r, 3, 1000, 0) == (0, 668)  # remaining: floor(332 * 3 / 1000)
    assert ledger.gcra_state(r, 3, 1000, 2) == (1, 666)


# --- concurrency ------------------------------------------------------------------------

def test_concurrency_leases(ledger: Any) -> None:
    r, other = ledger.row(b"conc"), ledger.row(b"conc2")
    assert [ledger.lease(r, 3, w) for w in (0, 1, 1, 2)] == [True, True, True, False]
    assert ledger.in_use(r) == 3
    ledger.release(r, 1)
    assert ledger.in_use(r) == 2
    ledger.release(r, 2)  # worker 2 holds nothing here: no-op, it must not free 0's or 1's
    assert ledger.in_use(r) == 2
    assert ledger.lease(r, 3, 2)
    assert ledger.lease(other, 5, 1)
    assert ledger.reclaim(1) == 2  # one on r, one on other
    assert (ledger.in_use(r), ledger.in_use(other)) == (2, 0)
    assert ledger.reclaim(1) == 0
    ledger.release(r, 1)
    assert ledger.in_use(r) == 2
    assert ledger.reclaim(0) + ledger.reclaim(2) == 2
    assert ledger.in_use(r) == 0
    assert not ledger.lease(r, 0, 0)


# --- rolling windows --------------------------------------------------------------------

def test_window_counts_and_retry(ledger: Any) -> None:
    w = ledger.window(b"5h")
    assert ledger.window_take(w, 4, 10, W, 0) == (0, 0)
    assert ledger.window_take(w, 6, 10, W, 1_500) == (0, 1)
    assert ledger.window_used(w, W, 2_000) == 10
    # Refused: exact ns until enough of the oldest buckets leave the window.
    assert ledger.window_take(w, 1, 10, W, 2_000) == (58_000, 0)  # bucket 0 expires at 60 µs
    assert ledger.window_take(w, 5, 10, W, 2_000) == (59_000, 0)  # bucket 1 too, at 61 µs
    assert ledger.window_take(w, 11, 10, W, 2_000) == (-1, 0)
    assert ledger.window_take(w, 4, 10, W, 59_999) == (1, 0)
    assert ledger.window_used(w, W, 60_000) == 6
    assert ledger.window_take(w, 4, 10, W, 60_000) == (0, 60)  # rotates slot 0
    assert ledger.window_used(w, W, 60_999) == 10
    assert ledger.window_used(w, W, 61_000) == 4
    assert ledger.window_used(w, W, 120_000) == 0  # everything expired after the window


def test_window_refund_and_charge(ledger: Any) -> None:
    w = ledger.window(b"week")
    _, e0 = ledger.window_take(w, 5, 10, W, 0)
    _, e1 = ledger.window_take(w, 3, 10, W, 1_000)
    ledger.window_give(w, 2, e0, W, 1_000)  # live bucket: refunded
    assert ledger.window_used(w, W, 1_000) == 6
    ledger.window_give(w, 99, e1, W, 1_000)  # never below zero: only its 3
    assert ledger.window_used(w, W, 1_000) == 3
    ledger.window_charge(w, 20, W, 2_000)  # unconditional, may exceed the quota
    assert ledger.window_used(w, W, 2_000) == 23
    assert ledger.window_take(w, 0, 10, W, 2_000) == (60_000, 0)
    ledger.window_give(w, 3, e0, W, 60_000)  # bucket 0 expired: nothing to give back
    assert ledger.window_used(w, W, 60_000) == 20
    assert ledger.window_used(w, W + 59, 62_000) == 0  # window_ns // 60 is the bucket width


def test_window_next_release_of_an_empty_window(ledger: Any) -> None:
    w = ledger.window(b"empty")
    assert ledger.window_next_release(w, W, 0) == (0, 0)
    assert ledger.window_next_release(w, W, 5 * W + 123) == (0, 0)
    ledger.window_charge(w, 0, W, 1_000)  # a zero-cost charge leaves nothing to release
    assert ledger.window_next_release(w, W, 1_000) == (0, 0)


def test_window_next_release_of_one_charge(ledger: Any) -> None:
    w = ledger.window(b"one")
    assert ledger.window_take(w, 4, 10, W, 2_500) == (0, 2)
    # Bucket 2 leaves the window at (2 + 60) µs, whatever the position inside bucket 2.
    assert ledger.window_next_release(w, W, 2_500) == (59_500, 4)
    assert ledger.window_next_release(w, W, 61_999) == (1, 4)
    assert ledger.window_used(w, W, 61_999) == 4


def test_window_next_release_oldest_bucket_first_and_expiry(ledger: Any) -> None:
    w = ledger.window(b"several")
    ledger.window_charge(w, 3, W, 0)
    ledger.window_charge(w, 5, W, 10_000)
    ledger.window_charge(w, 7, W, 10_500)  # the same bucket as the 5
    ledger.window_charge(w, 2, W, 30_000)
    assert ledger.window_next_release(w, W, 30_000) == (30_000, 3)
    # Each release happens exactly when window_used drops by that amount.
    assert ledger.window_used(w, W, 59_999) == 17
    assert ledger.window_next_release(w, W, 59_999) == (1, 3)
    assert ledger.window_used(w, W, 60_000) == 14
    assert ledger.window_next_release(w, W, 60_000) == (10_000, 12)
    assert ledger.window_used(w, W, 70_000) == 2
    assert ledger.window_next_release(w, W, 70_000) == (20_000, 2)
    assert ledger.window_used(w, W, 90_000) == 0
    assert ledger.window_next_release(w, W, 90_000) == (0, 0)


def test_window_next_release_reads_without_sweeping(ledger: Any) -> None:
    w = ledger.window(b"unswept")
    ledger.window_charge(w, 3, W, 0)
    ledger.window_charge(w, 4, W, 1_000)
    # Bucket 0 expired at 60 µs but nobody swept it: it is not live, so it is not reported,
    # and the read leaves it for the next writer or window_used to sweep.
    assert ledger.window_next_release(w, W, 60_000) == (1_000, 4)
    assert ledger.window_next_release(w, W, 60_000) == (1_000, 4)
    total_at = 1088 + 64 * ledger.rows + 512 * w + 8  # window word 1 (README.md, the segment)
    assert struct.unpack_from("<q", Path(ledger.path).read_bytes(), total_at)[0] == 7
    assert ledger.window_used(w, W, 60_000) == 4
    assert struct.unpack_from("<q", Path(ledger.path).read_bytes(), total_at)[0] == 4


def test_window_next_release_after_a_refund(ledger: Any) -> None:
    w = ledger.window(b"refund")
    _, e0 = ledger.window_take(w, 5, 10, W, 0)
    _, e1 = ledger.window_take(w, 2, 10, W, 3_000)
    ledger.window_give(w, 2, e0, W, 4_000)
    assert ledger.window_next_release(w, W, 4_000) == (56_000, 3)
    ledger.window_give(w, 3, e0, W, 4_000)  # bucket 0 emptied: the next one is the oldest
    assert ledger.window_next_release(w, W, 4_000) == (59_000, 2)
    ledger.window_give(w, 9, e1, W, 4_000)
    assert ledger.window_next_release(w, W, 4_000) == (0, 0)
    assert ledger.window_used(w, W, 4_000) == 0


def test_window_next_release_checks_its_arguments(mod: ModuleType, ledger: Any) -> None:
    for call in (lambda: ledger.window_next_release(16, W, 0),
                 lambda: ledger.window_next_release(0, 59, 0),
                 lambda: ledger.window_next_release(0, W, -1)):
        with pytest.raises(ValueError):
            call()
    ledger.close()
    with pytest.raises(mod.LedgerError):
        ledger.window_next_release(0, W, 0)


def test_window_caller_with_a_stale_clock_never_drops_counts(ledger: Any) -> None:
    w = ledger.window(b"lagging")
    assert ledger.window_take(w, 3, 10, W, 2 * W) == (0, 120)
    # A process that read its clock a whole window earlier lands on the same slot: it adds
    # into the newer bucket instead of rotating it away (which would forget the 3).
    assert ledger.window_take(w, 2, 10, W, W) == (0, 60)
    assert ledger.window_used(w, W, 2 * W) == 5
    assert ledger.window_used(w, W, 3 * W) == 0


# --- admit --------------------------------------------------------------------------------

def snapshot(led: Any, g: int, c: int, w: int, now: int) -> tuple[object, ...]:
    return (led.gcra_state(g, 10, MIN, now), led.in_use(c), led.window_used(w, W, now))


def test_admit_takes_all(mod: ModuleType, ledger: Any) -> None:
    g, c, w = ledger.row(b"g"), ledger.row(b"c"), ledger.window(b"w")
    ops = ops_of((mod.KIND_GCRA, g, 1, 10, MIN), (mod.KIND_CONCURRENCY, c, 99, 2, 0),
                 (mod.KIND_WINDOW, w, 3, 10, W))
    before = snapshot(ledger, g, c, w, 1_000)
    assert ledger.admit(ops, 3, 1_000, 4) == -1
    assert ops[5 + 16] == 1  # the window op's epoch
    assert [ops[6 + 8 * i] for i in range(3)] == [0, 0, 0]
    assert snapshot(ledger, g, c, w, 1_000) == ((9, 6_000_000_000), 1, 3)
    ledger.release_ops(ops, 3, 4, 1_000)
    assert snapshot(ledger, g, c, w, 1_000) == before
    assert ledger.reclaim(4) == 0


def test_admit_refusal_leaves_nothing(mod: ModuleType, ledger: Any) -> None:
    g, c, w = ledger.row(b"g"), ledger.row(b"c"), ledger.window(b"w")
    ledger.window_charge(w, 9, W, 0)
    ops = ops_of((mod.KIND_GCRA, g, 2, 10, MIN), (mod.KIND_CONCURRENCY, c, 0, 2, 0),
                 (mod.KIND_WINDOW, w, 3, 10, W))
    before = snapshot(ledger, g, c, w, 5_000)
    assert ledger.admit(ops, 3, 5_000, 4) == 2  # the 3rd op is refused
    assert ops[6 + 16] == 55_000  # its retry: bucket 0 leaves the window at 60 µs
    assert snapshot(ledger, g, c, w, 5_000) == before
    assert ledger.reclaim(4) == 0
    # A refusal in the 2nd op (concurrency: retry 1 = "when a slot frees").
    assert ledger.lease(c, 2, 0) and ledger.lease(c, 2, 0)
    assert ledger.admit(ops, 3, 5_000, 4) == 1
    assert ops[6 + 8] == 1
    assert snapshot(ledger, g, c, w, 5_000) == (before[0], 2, before[2])
    # A GCRA cost over its limit can never pass: -1.
    too_big = ops_of((mod.KIND_GCRA, g, 11, 10, MIN))
    assert ledger.admit(too_big, 1, 5_000, 4) == 0 and too_big[6] == -1
    assert ledger.admit(too_big, 0, 5_000, 4) == -1  # nothing to take


def test_admit_seven_ops_and_rejects_bad_records(mod: ModuleType, ledger: Any) -> None:
    rows = [ledger.row(b"r%d" % i) for i in range(4)]
    wins = [ledger.window(b"w%d" % i) for i in range(3)]
    recs = [(mod.KIND_GCRA, r, 1, 5, MIN) for r in rows[:3]]
    recs.append((mod.KIND_CONCURRENCY, rows[3], 0, 1, 0))
    recs += [(mod.KIND_WINDOW, w, 2, 100, W) for w in wins]
    ops = ops_of(*recs)
    assert ledger.admit(ops, 7, 0, 0) == -1
    assert ledger.admit(ops, 7, 0, 1) == 3  # concurrency limit 1
    assert [ledger.window_used(w, W, 0) for w in wins] == [2, 2, 2]
    ledger.release_ops(ops, 7, 0, 0)
    assert [ledger.window_used(w, W, 0) for w in wins] == [0, 0, 0]
    assert [ledger.gcra_state(r, 5, MIN, 0)[0] for r in rows[:3]] == [5, 5, 5]
    for bad in (ops_of((9, 0, 1, 1, 1)), ops_of((mod.KIND_GCRA, 64, 1, 1, 1)),
                ops_of((mod.KIND_WINDOW, 16, 1, 1, W)), ops_of((mod.KIND_GCRA, 0, 1, 0, 1)),
                ops_of((mod.KIND_WINDOW, 0, 1, 1, 59))):
        with pytest.raises(ValueError, match="record 0"):
            ledger.admit(bad, 1, 0, 0)
    with pytest.raises(ValueError, match="do not fit"):
        ledger.admit(ops, 8, 0, 0)
    with pytest.raises(ValueError, match="64-bit"):
        ledger.admit(array.array("i", [0] * 16), 1, 0, 0)
    with pytest.raises((ValueError, TypeError, BufferError)):
        ledger.admit(bytes(64), 1, 0, 0)
    assert ledger.admit(memoryview(bytearray(64)).cast("q"), 0, 0, 0) == -1


# --- random sequences: native == twin == reference model ---------------------------------

class Model:
    """The ledger's semantics with plain dicts: no shared memory, no atomics, no packing."""

    def __init__(self) -> None:
        self.tat: dict[int, int] = defaultdict(int)
        self.count: dict[int, int] = defaultdict(int)
        self.leases: dict[tuple[int, int], int] = defaultdict(int)
        self.buckets: dict[int, dict[int, int]] = defaultdict(dict)

    def gcra_take(self, row: int, cost: int, limit: int, period: int, now: int) -> int:
        if cost > limit:
            return -1
        new = max(self.tat[row], now) + -(-cost * period // limit)
        if new - now > period:
            return new - period - now
        self.tat[row] = new
        return 0

    def gcra_give(self, row: int, cost: int, limit: int, period: int) -> None:
        self.tat[row] = max(self.tat[row] - -(-cost * period // limit), 0)

    def gcra_charge(self, row: int, cost: int, limit: int, period: int, now: int) -> None:
        self.tat[row] = max(self.tat[row], now) + -(-cost * period // limit)

    def gcra_state(self, row: int, limit: int, period: int, now: int) -> tuple[int, int]:
        used = max(self.tat[row], now) - now
        return max(period - used, 0) * limit // period, used

    def lease(self, row: int, limit: int, worker: int) -> bool:
        if self.count[row] >= limit:
            return False
        self.count[row] += 1
        self.leases[worker, row] += 1
        return True

    def release(self, row: int, worker: int) -> None:
        if self.leases[worker, row] > 0:
            self.leases[worker, row] -= 1
            self.count[row] -= 1

    def reclaim(self, worker: int) -> int:
        total = 0
        for (w, row), n in self.leases.items():
            if w == worker and n:
                self.count[row] -= n
                self.leases[w, row] = 0
                total += n
        return total

    def _live(self, win: int, now: int) -> tuple[dict[int, int], int]:
        epoch = now // (W // 60)
        live = {e: c for e, c in self.buckets[win].items() if e > epoch - 60}
        self.buckets[win] = live
        return live, epoch

    def window_take(self, win: int, cost: int, quota: int, now: int) -> tuple[int, int]:
        if cost > quota:
            return -1, 0
        live, epoch = self._live(win, now)
        total = sum(live.values())
        if total + cost <= quota:
            live[epoch] = live.get(epoch, 0) + cost
            return 0, epoch
        for e in sorted(live):
            total -= live[e]
            if total + cost <= quota:
                return (e + 60) * (W // 60) - now, 0
        raise AssertionError("unreachable: cost <= quota")

    def window_give(self, win: int, cost: int, epoch: int, now: int) -> None:
        live, _ = self._live(win, now)
        if epoch in live:
            live[epoch] -= min(live[epoch], cost)

    def window_charge(self, win: int, cost: int, now: int) -> None:
        live, epoch = self._live(win, now)
        live[epoch] = live.get(epoch, 0) + cost

    def window_used(self, win: int, now: int) -> int:
        return sum(self._live(win, now)[0].values())

    def window_next_release(self, win: int, now: int) -> tuple[int, int]:
        live, _ = self._live(win, now)
        for e in sorted(live):
            if live[e]:
                return (e + 60) * (W // 60) - now, live[e]
        return 0, 0

    def admit(self, recs: list[tuple[int, int, int, int, int]], now: int,
              worker: int) -> tuple[int, list[int]]:
        saved = copy.deepcopy(self.__dict__)
        epochs = []
        for i, (kind, index, cost, limit, period) in enumerate(recs):
            if kind == 1:
                retry, epoch = self.gcra_take(index, cost, limit, period, now), 0
            elif kind == 2:
                retry, epoch = (0 if self.lease(index, limit, worker) else 1), 0
            else:
                retry, epoch = self.window_take(index, cost, limit, now)
            if retry:
                self.__dict__ = saved  # all or nothing
                return i, [retry]
            epochs.append(epoch)
        return -1, epochs

    def release_ops(self, recs: list[tuple[int, int, int, int, int]], epochs: list[int],
                    now: int, worker: int) -> None:
        for (kind, index, cost, limit, period), epoch in reversed(list(zip(recs, epochs,
                                                                           strict=True))):
            if kind == 1:
                self.gcra_give(index, cost, limit, period)
            elif kind == 2:
                self.release(index, worker)
            else:
                self.window_give(index, cost, epoch, now)


GCRA_ROWS = [(b"g0", 3, 1_000), (b"g1", 7, 10_000), (b"g2", 10, 999)]  # key, limit, period
CONC_ROWS = [(b"c0", 2), (b"c1", 3)]
WINDOWS = [(b"w0", 10), (b"w1", 25)]
rec_st = st.one_of(
    st.tuples(st.just(1), st.integers(0, 2), st.integers(0, 11)),
    st.tuples(st.just(2), st.integers(0, 1), st.just(0)),
    st.tuples(st.just(3), st.integers(0, 1), st.integers(0, 26)),
)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="zaiproxy-test-", dir="/dev/shm")
        self.leds = [load(impl).Ledger(f"{self.dir}/{impl}", create=True, rows=16, windows=4,
                                       workers=3) for impl in IMPLEMENTATIONS]
        self.model = Model()
        self.now = 0
        self.g = [self.leds[0].row(k) for k, _, _ in GCRA_ROWS]
        self.c = [self.leds[0].row(k) for k, _ in CONC_ROWS]
        self.w = [self.leds[0].window(k) for k, _ in WINDOWS]
        assert [led.row(b"g0") for led in self.leds] == [self.g[0]] * 2
        self.taken: list[tuple[int, int]] = []  # (window, epoch) of successful takes
        self.admitted: list[tuple[int, array.array[int], int, list[Any], list[int]]] = []

    def teardown(self) -> None:
        for led in self.leds:
            led.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def both(self, name: str, *args: Any) -> Any:
        results = [getattr(led, name)(*args) for led in self.leds]
        assert results[0] == results[1], (name, args, results)
        return results[0]

    # Small steps, whole windows, and jumps that land on a bucket edge one window later.
    @rule(dt=st.one_of(st.integers(0, 2_000), st.integers(0, 3 * W),
                       st.sampled_from([1_000, W - 1_000, W])))
    def advance(self, dt: int) -> None:
        self.now += dt

    @rule(i=st.integers(0, 2), cost=st.integers(0, 11), how=st.sampled_from(["take", "give",
                                                                              "charge"]))
    def gcra(self, i: int, cost: int, how: str) -> None:
        _, limit, period = GCRA_ROWS[i]
        if how == "take":
            got = self.both("gcra_take", self.g[i], cost, limit, period, self.now)
            assert got == self.model.gcra_take(i, cost, limit, period, self.now)
        elif how == "give":
            self.both("gcra_give", self.g[i], cost, limit, period)
            self.model.gcra_give(i, cost, limit, period)
        else:
            self.both("gcra_charge", self.g[i], cost, limit, period, self.now)
            self.model.gcra_charge(i, cost, limit, period, self.now)

    @rule(i=st.integers(0, 1), worker=st.integers(0, 2), how=st.sampled_from(["lease",
                                                                               "release"]))
    def concurrency(self, i: int, worker: int, how: str) -> None:
        if how == "lease":
            limit = CONC_ROWS[i][1]
            got = self.both("lease", self.c[i], limit, worker)
            assert got == self.model.lease(i, limit, worker)
        else:
            self.both("release", self.c[i], worker)
            self.model.release(i, worker)

    @rule(worker=st.integers(0, 2))
    def reclaim(self, worker: int) -> None:
        assert self.both("reclaim", worker) == self.model.reclaim(worker)

    @rule(i=st.integers(0, 1), cost=st.integers(0, 26), charge=st.booleans())
    def window(self, i: int, cost: int, charge: bool) -> None:
        quota = WINDOWS[i][1]
        if charge:
            self.both("window_charge", self.w[i], cost, W, self.now)
            self.model.window_charge(i, cost, self.now)
            return
        got = self.both("window_take", self.w[i], cost, quota, W, self.now)
        assert got == self.model.window_take(i, cost, quota, self.now)
        if got[0] == 0:
            self.taken.append((i, got[1]))

    @precondition(lambda self: self.taken)
    @rule(pick=st.integers(0, 1000), cost=st.integers(0, 26))
    def window_give(self, pick: int, cost: int) -> None:
        i, epoch = self.taken.pop(pick % len(self.taken))
        self.both("window_give", self.w[i], cost, epoch, W, self.now)
        self.model.window_give(i, cost, epoch, self.now)

    @rule(recs=st.lists(rec_st, min_size=1, max_size=5), worker=st.integers(0, 2))
    def admit(self, recs: list[tuple[int, int, int]], worker: int) -> None:
        full = []
        for kind, i, cost in recs:
            if kind == 1:
                full.append((1, i, cost, GCRA_ROWS[i][1], GCRA_ROWS[i][2]))
            elif kind == 2:
                full.append((2, i, 0, CONC_ROWS[i][1], 0))
            else:
                full.append((3, i, cost, WINDOWS[i][1], W))
        real = [(k, (self.g, self.c, self.w)[k - 1][i], *rest) for k, i, *rest in full]
        bufs = [ops_of(*real) for _ in self.leds]
        got = [led.admit(buf, len(real), self.now, worker) for led, buf in zip(self.leds, bufs,
                                                                               strict=True)]
        assert got[0] == got[1] and bufs[0] == bufs[1], (real, got, bufs)
        want, extra = self.model.admit(full, self.now, worker)
        assert got[0] == want
        if want >= 0:
            assert bufs[0][want * 8 + 6] == extra[0]
        else:
            assert [bufs[0][i * 8 + 5] for i in range(len(real)) if real[i][0] == 3] == [
                e for rec, e in zip(full, extra, strict=True) if rec[0] == 3]
            self.admitted.append((worker, bufs[0], len(real), full, extra))

    @precondition(lambda self: self.admitted)
    @rule(pick=st.integers(0, 1000))
    def release_ops(self, pick: int) -> None:
        worker, buf, n, full, epochs = self.admitted.pop(pick % len(self.admitted))
        for led in self.leds:
            led.release_ops(array.array("q", buf), n, worker, self.now)
        self.model.release_ops(full, epochs, self.now, worker)

    @invariant()
    def states_agree(self) -> None:
        for i, (_, limit, period) in enumerate(GCRA_ROWS):
            got = self.both("gcra_state", self.g[i], limit, period, self.now)
            assert got == self.model.gcra_state(i, limit, period, self.now)
        for i in range(len(CONC_ROWS)):
            assert self.both("in_use", self.c[i]) == self.model.count[i]
        for i in range(len(WINDOWS)):
            # Read before window_used: it must not need that call's sweep to be right.
            assert self.both("window_next_release", self.w[i], W, self.now) == \
                self.model.window_next_release(i, self.now)
            assert self.both("window_used", self.w[i], W, self.now) == self.model.window_used(
                i, self.now)


LedgerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                           deadline=None)
TestLedgerModel = LedgerMachine.TestCase
