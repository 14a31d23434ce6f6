"""Pure-Python twin of ``zaiproxy._native._ledger``: the same segment, the same results, slower.

The byte layout, the algorithms and the crash-safety rules are described in
``_native/README.md`` and in ``_ledger.pyx``; this file mirrors the native code
function by function so the two can be read side by side. Every ledger test
runs against both (tests/test_ledger.py, tests/test_ledger_procs.py).

Why a lock here and none in the native module: pure Python cannot issue a
compare-and-swap on shared memory, and a read-modify-write through an mmap is
several bytecodes that another *process* can interleave with (the GIL is per
process). So every public operation holds ``fcntl.flock(fd, LOCK_EX)`` on this
object's own file descriptor for its whole duration; flock locks belong to the
open file description, so two ``Ledger`` objects in one process exclude each
other too. The native module must therefore never share a segment with the
twin (its CAS loops ignore the lock): the header records which discipline
created the segment and ``Ledger(create=False)`` refuses the other one.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any, TypeVar

IMPLEMENTATION = "python"

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = 0xFFFFFFFFFFFFFFFF


def stable_hash(data: bytes) -> int:
    """64-bit FNV-1a of ``data``; identical in every process and in the native module."""
    h = _FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * _FNV_PRIME) & _MASK
    return h


# --- layout (keep in step with _ledger.pyx and the table in README.md) ---------------------
MAGIC = int.from_bytes(b"ZAILEDG1", "little")
VERSION = 1
LINE = 64
HEADER_SIZE = 64
SCALARS = 16
ROW_WORDS = 8
WINDOW_WORDS = 64
WINDOW_BUCKETS = 60
WINDOW_FIRST_BUCKET = 4  # words 0 key, 1 total, 2 expired-through epoch, 3 reserved
OP_WORDS = 8
KIND_GCRA = 1
KIND_CONCURRENCY = 2
KIND_WINDOW = 3
DISCIPLINE_ATOMIC = 1  # native: lock-free CAS on every cell
DISCIPLINE_FLOCK = 2  # this twin: flock around every operation

_HEADER = struct.Struct("<QIIIIQQIII12x")
assert _HEADER.size == HEADER_SIZE
_SCALARS_OFF = HEADER_SIZE
_ROWS_OFF = _SCALARS_OFF + SCALARS * LINE
_U32_MAX = 0xFFFFFFFF
_I64_MAX = (1 << 63) - 1
_I64_MIN = -(1 << 63)
_EPOCH_BITS = 24
_EPOCH_MASK = (1 << _EPOCH_BITS) - 1
_COUNT_BITS = 40
_COUNT_MASK = (1 << _COUNT_BITS) - 1


class LedgerError(Exception):
    """The segment cannot be created or attached, or the ledger is closed."""


class LedgerFull(LedgerError):
    """Every row (or window row) is claimed by another key."""


def segment_size(rows: int, windows: int, workers: int) -> int:
    """Bytes of a segment with this layout (header + scalars + rows + windows + leases)."""
    return _lease_off(rows, windows) + workers * _lease_stride(rows)


def _lease_off(rows: int, windows: int) -> int:
    return _ROWS_OFF + rows * ROW_WORDS * 8 + windows * WINDOW_WORDS * 8


def _lease_stride(rows: int) -> int:
    # Each worker's lease cells start on their own cache line (only that worker writes them).
    return (rows * 8 + LINE - 1) // LINE * LINE


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def _check_i64(name: str, v: int) -> None:
    if not _I64_MIN <= v <= _I64_MAX:
        raise OverflowError(f"{name}={v} does not fit in a signed 64-bit cell")


def _check_nonneg(name: str, v: int) -> None:
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    if v > _I64_MAX:
        raise OverflowError(f"{name}={v} does not fit in a signed 64-bit cell")


def _increment(cost: int, limit: int, period_ns: int) -> int:
    # ceil(cost * period / limit), saturated like the native 128-bit version.
    return min(-(-cost * period_ns // limit), _I64_MAX)


def _age(now_epoch: int, epoch24: int) -> int:
    """Buckets between a stored 24-bit epoch and now, as a signed 24-bit difference."""
    d = (now_epoch - epoch24) & _EPOCH_MASK
    return d - (1 << _EPOCH_BITS) if d >= 1 << (_EPOCH_BITS - 1) else d


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(fn: _F) -> _F:
    """Run ``fn`` with the segment's flock held (see the module docstring for why)."""

    def wrapper(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        if self._q is None:
            raise LedgerError(f"ledger {self.path} is closed")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            return fn(self, *args, **kwargs)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


class Ledger:
    """A shared-memory segment of 64-bit cells and the limit algorithms on it.

    ``create=True`` (the supervisor) makes a fresh segment at ``path``: an existing
    file is replaced, whatever it holds, because anything in it is stale from a
    previous supervisor. ``create=False`` (a worker) attaches and takes the layout
    from the header. All times are caller-supplied nanoseconds.
    """

    def __init__(self, path: str, *, create: bool, rows: int = 4096, windows: int = 256,
                 workers: int = 64) -> None:
        self.path = path
        self.implementation = IMPLEMENTATION
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._q: memoryview | None = None
        if create:
            for name, v in (("rows", rows), ("windows", windows), ("workers", workers)):
                if not 1 <= v <= _U32_MAX:
                    raise ValueError(f"{name} must be between 1 and {_U32_MAX}, got {v}")
            self._create(rows, windows, workers)
        else:
            self._attach()

    # --- lifecycle ---------------------------------------------------------------------
    def _create(self, rows: int, windows: int, workers: int) -> None:
        size = segment_size(rows, windows, workers)
        # A new inode every time: processes of a crashed supervisor that still map the old
        # file keep writing into that one, not into ours; O_EXCL refuses a planted symlink.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise LedgerError(f"cannot create ledger segment {self.path}: {exc}") from exc
        try:
            os.ftruncate(fd, size)  # a new file reads as zeros: the zero fill
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        # The header goes in last and the magic word last of all: an attacher that races
        # the creator sees "bad magic", never a half-initialised layout.
        _HEADER.pack_into(mm, 0, 0, VERSION, rows, windows, workers, size, os.getpid(),
                          SCALARS, WINDOW_BUCKETS, DISCIPLINE_FLOCK)
        struct.pack_into("<Q", mm, 0, MAGIC)
        self._adopt(fd, mm, rows, windows, workers)

    def _attach(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            raise LedgerError(f"ledger segment {self.path} does not exist "
                              "(the supervisor creates it before starting workers)") from None
        except OSError as exc:
            raise LedgerError(f"cannot open ledger segment {self.path}: {exc}") from exc
        try:
            file_size = os.fstat(fd).st_size
            if file_size < HEADER_SIZE:
                raise LedgerError(f"ledger segment {self.path} is truncated "
                                  f"({file_size} bytes, no header)")
            raw = os.pread(fd, HEADER_SIZE, 0)
            (magic, version, rows, windows, workers, size, _pid, scalars, buckets,
             discipline) = _HEADER.unpack(raw)
            _check_header(self.path, magic, version, rows, windows, workers, size, scalars,
                          buckets, file_size)
            if discipline != DISCIPLINE_FLOCK:
                raise LedgerError(f"ledger segment {self.path} was created by the native ledger; "
                                  "every process must use the same implementation")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._adopt(fd, mm, rows, windows, workers)

    def _adopt(self, fd: int, mm: mmap.mmap, rows: int, windows: int, workers: int) -> None:
        self._fd = fd
        self._mm = mm
        self._q = memoryview(mm).cast("q")  # the segment as signed 64-bit words
        self.rows = rows
        self.windows = windows
        self.workers = workers
        self._rows_w = _ROWS_OFF // 8
        self._wins_w = self._rows_w + rows * ROW_WORDS
        self._lease_w = _lease_off(rows, windows) // 8
        self._lease_stride_w = _lease_stride(rows) // 8

    def close(self) -> None:
        """Unmap and close; further calls raise LedgerError. Idempotent."""
        if self._q is not None:
            self._q.release()
            self._q = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        """Remove the segment file (workers that attached keep their mapping)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._q is None else "open"
        return (f"<Ledger {self.implementation} {self.path} rows={getattr(self, 'rows', 0)} "
                f"windows={getattr(self, 'windows', 0)} workers={getattr(self, 'workers', 0)} "
                f"{state}>")

    # --- argument checks (the native module makes the same ones) -------------------------
    def _row_w(self, row: int) -> int:
        if not 0 <= row < self.rows:
            raise ValueError(f"row {row} out of range 0..{self.rows - 1}")
        return self._rows_w + row * ROW_WORDS

    def _win_w(self, win: int) -> int:
        if not 0 <= win < self.windows:
            raise ValueError(f"window {win} out of range 0..{self.windows - 1}")
        return self._wins_w + win * WINDOW_WORDS

    def _lease_cell(self, worker: int, row: int) -> int:
        return self._lease_w + worker * self._lease_stride_w + row

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} out of range 0..{self.workers - 1}")

    def _scalar_w(self, i: int) -> int:
        if not 0 <= i < SCALARS:
            raise ValueError(f"scalar {i} out of range 0..{SCALARS - 1}")
        return (_SCALARS_OFF + i * LINE) // 8

    # --- keys ------------------------------------------------------------------------------
    def _claim(self, key: bytes, base: int, stride: int, count: int, what: str) -> int:
        h = stable_hash(key) or 1  # 0 marks a free row
        hs = _signed(h)
        q = self._q
        assert q is not None
        start = h % count
        for probe in range(count):
            i = (start + probe) % count
            w = q[base + i * stride]
            if w == hs:
                return i
            if w == 0:
                q[base + i * stride] = hs
                return i
        raise LedgerFull(f"ledger {what} table is full ({count} {what}s); raise its size")

    @_locked
    def row(self, key: bytes) -> int:
        """The row of ``key``, claimed on first use (linear probing from its hash)."""
        return self._claim(key, self._rows_w, ROW_WORDS, self.rows, "row")

    @_locked
    def row_find(self, key: bytes) -> int:
        """The row of ``key`` if some process claimed it, else -1 (never claims a row)."""
        h = stable_hash(key) or 1
        hs = _signed(h)
        q = self._q
        assert q is not None
        base, count = self._rows_w, self.rows
        start = h % count
        for probe in range(count):
            i = (start + probe) % count
            w = q[base + i * ROW_WORDS]
            if w == hs:
                return i
            if w == 0:
                return -1  # rows are never freed: a claimed key's probe never crosses a free row
        return -1

    @_locked
    def row_hash(self, row: int) -> int:
        """Word 0 of ``row`` as an unsigned 64-bit int: its key's hash (0 = a free row)."""
        assert self._q is not None
        return int(self._q[self._row_w(row)]) & _MASK

    @_locked
    def window(self, key: bytes) -> int:
        """The window row of ``key``, claimed on first use."""
        return self._claim(key, self._wins_w, WINDOW_WORDS, self.windows, "window")

    # --- scalars and counters -----------------------------------------------------------
    @_locked
    def scalar_get(self, i: int) -> int:
        assert self._q is not None
        return int(self._q[self._scalar_w(i)])

    @_locked
    def scalar_set(self, i: int, v: int) -> None:
        _check_i64("value", v)
        assert self._q is not None
        self._q[self._scalar_w(i)] = v

    @_locked
    def scalar_add(self, i: int, delta: int) -> int:
        _check_i64("delta", delta)
        q = self._q
        assert q is not None
        w = self._scalar_w(i)
        new = _signed((q[w] + delta) & _MASK)  # wraps like the native atomic add
        q[w] = new
        return new

    @_locked
    def scalar_cas(self, i: int, expected: int, new: int) -> bool:
        _check_i64("expected", expected)
        _check_i64("new", new)
        q = self._q
        assert q is not None
        w = self._scalar_w(i)
        if q[w] != expected:
            return False
        q[w] = new
        return True

    def _counter_w(self, row: int, word: int) -> int:
        if not 1 <= word < ROW_WORDS:
            raise ValueError(f"word {word} out of range 1..{ROW_WORDS - 1}")
        return self._row_w(row) + word

    @_locked
    def counter_add(self, row: int, word: int, n: int) -> int:
        _check_i64("n", n)
        q = self._q
        assert q is not None
        w = self._counter_w(row, word)
        new = _signed((q[w] + n) & _MASK)
        q[w] = new
        return new

    @_locked
    def counter_get(self, row: int, word: int) -> int:
        assert self._q is not None
        return int(self._q[self._counter_w(row, word)])

    @_locked
    def counter_set(self, row: int, word: int, v: int) -> None:
        """Store ``v`` (for a cell with a single writer, e.g. a worker's own gauge)."""
        _check_i64("value", v)
        assert self._q is not None
        self._q[self._counter_w(row, word)] = v

    @_locked
    def row_counters(self, row: int) -> tuple[int, ...]:
        """Words 1..7 of ``row``."""
        w = self._row_w(row)
        assert self._q is not None
        return tuple(self._q[w + 1:w + ROW_WORDS])

    # --- GCRA ----------------------------------------------------------------------------
    def _gcra_args(self, cost: int, limit: int, period_ns: int) -> None:
        _check_nonneg("cost", cost)
        _check_nonneg("limit", limit)
        _check_nonneg("period_ns", period_ns)
        if limit < 1 or period_ns < 1:
            raise ValueError("limit and period_ns must be >= 1")

    def _gcra_take(self, w: int, cost: int, limit: int, period_ns: int, now: int) -> int:
        if cost > limit:
            return -1
        q = self._q
        assert q is not None
        tat0 = max(q[w], now)
        new = min(tat0 + _increment(cost, limit, period_ns), _I64_MAX)
        if new - now > period_ns:
            return new - period_ns - now
        q[w] = new
        return 0

    def _gcra_give(self, w: int, cost: int, limit: int, period_ns: int) -> None:
        q = self._q
        assert q is not None
        inc = _increment(cost, limit, period_ns)
        tat = q[w]
        q[w] = 0 if tat < inc else tat - inc

    @_locked
    def gcra_take(self, row: int, cost: int, limit: int, period_ns: int, now: int) -> int:
        """0 if ``cost`` was taken; else ns until it would be (>= 1); -1 if cost > limit."""
        self._gcra_args(cost, limit, period_ns)
        _check_nonneg("now", now)
        return self._gcra_take(self._row_w(row) + 1, cost, limit, period_ns, now)

    @_locked
    def gcra_give(self, row: int, cost: int, limit: int, period_ns: int) -> None:
        """Refund ``cost`` (TAT -= increment, not below 0)."""
        self._gcra_args(cost, limit, period_ns)
        self._gcra_give(self._row_w(row) + 1, cost, limit, period_ns)

    @_locked
    def gcra_charge(self, row: int, cost: int, limit: int, period_ns: int, now: int) -> None:
        """Take ``cost`` unconditionally (usage above the reservation)."""
        self._gcra_args(cost, limit, period_ns)
        _check_nonneg("now", now)
        q = self._q
        assert q is not None
        w = self._row_w(row) + 1
        q[w] = min(max(q[w], now) + _increment(cost, limit, period_ns), _I64_MAX)

    @_locked
    def gcra_state(self, row: int, limit: int, period_ns: int, now: int) -> tuple[int, int]:
        """(whole units of cost 1 that would be taken now, ns until the row is fully reset)."""
        self._gcra_args(0, limit, period_ns)
        _check_nonneg("now", now)
        q = self._q
        assert q is not None
        used = max(q[self._row_w(row) + 1], now) - now
        room = period_ns - used
        remaining = 0 if room <= 0 else min(room * limit // period_ns, _I64_MAX)
        return remaining, used

    # --- concurrency ---------------------------------------------------------------------
    def _lease(self, w: int, limit: int, cell: int) -> bool:
        q = self._q
        assert q is not None
        c = q[w]
        if c >= limit:
            return False
        q[w] = c + 1  # count first: a crash before the lease cell leaks a slot, never invents one
        q[cell] += 1
        return True

    def _release(self, w: int, cell: int) -> None:
        q = self._q
        assert q is not None
        held = q[cell]
        if held <= 0:
            return  # nothing leased by this worker on this row
        q[cell] = held - 1  # lease cell first (see the native module for the crash order)
        q[w] = max(q[w] - 1, 0)

    @_locked
    def lease(self, row: int, limit: int, worker: int) -> bool:
        """Take one concurrency slot for ``worker`` if fewer than ``limit`` are in use."""
        w = self._row_w(row) + 1
        self._check_worker(worker)
        _check_i64("limit", limit)
        return self._lease(w, limit, self._lease_cell(worker, row))

    @_locked
    def release(self, row: int, worker: int) -> None:
        """Give back one slot leased by ``worker`` (no-op if it holds none on this row)."""
        w = self._row_w(row) + 1
        self._check_worker(worker)
        self._release(w, self._lease_cell(worker, row))

    @_locked
    def reclaim(self, worker: int) -> int:
        """``worker`` is dead: return every slot it held. Returns how many."""
        self._check_worker(worker)
        q = self._q
        assert q is not None
        total = 0
        base = self._lease_cell(worker, 0)
        for row in range(self.rows):
            n = q[base + row]
            if n == 0:
                continue
            q[base + row] = 0
            if n > 0:
                w = self._rows_w + row * ROW_WORDS + 1
                q[w] = max(q[w] - n, 0)
                total += n
        return total

    @_locked
    def in_use(self, row: int) -> int:
        assert self._q is not None
        return int(self._q[self._row_w(row) + 1])

    # --- rolling windows -------------------------------------------------------------------
    def _window_args(self, cost: int, window_ns: int, now: int) -> int:
        _check_nonneg("cost", cost)
        _check_nonneg("now", now)
        _check_nonneg("window_ns", window_ns)
        if window_ns < WINDOW_BUCKETS:
            raise ValueError(f"window_ns must be >= {WINDOW_BUCKETS}")
        return window_ns // WINDOW_BUCKETS

    def _total_sub(self, w: int, n: int) -> None:
        q = self._q
        assert q is not None
        q[w + 1] = max(q[w + 1] - n, 0)

    def _expire(self, w: int, now_epoch: int) -> None:
        q = self._q
        assert q is not None
        if q[w + 2] >= now_epoch:
            return  # already swept at this epoch: nothing can have expired since
        for s in range(WINDOW_BUCKETS):
            u = q[w + WINDOW_FIRST_BUCKET + s] & _MASK
            c = u & _COUNT_MASK
            if c == 0:
                continue
            if -WINDOW_BUCKETS < _age(now_epoch, u >> _COUNT_BITS) < WINDOW_BUCKETS:
                continue
            q[w + WINDOW_FIRST_BUCKET + s] = 0
            self._total_sub(w, c)
        if q[w + 2] < now_epoch:
            q[w + 2] = now_epoch

    def _bucket_add(self, w: int, epoch: int, cost: int) -> None:
        q = self._q
        assert q is not None
        cell = w + WINDOW_FIRST_BUCKET + epoch % WINDOW_BUCKETS
        e24 = epoch & _EPOCH_MASK
        u = q[cell] & _MASK
        c = u & _COUNT_MASK
        slot_e24 = u >> _COUNT_BITS
        stale = 0
        d = _age(epoch, slot_e24)
        if d == 0 or (d < 0 and c > 0):  # this epoch, or a newer one (see the native module)
            nc = min(c + cost, _COUNT_MASK)
            added = nc - c
        else:  # rotation: an older epoch (normally already swept to 0)
            nc = min(cost, _COUNT_MASK)
            added = nc
            stale = c
            slot_e24 = e24
        q[cell] = _signed((slot_e24 << _COUNT_BITS) | nc)
        if stale:
            self._total_sub(w, stale)
        if added < cost:
            self._total_sub(w, cost - added)

    def _window_take(self, w: int, cost: int, quota: int, bucket_ns: int,
                     now: int) -> tuple[int, int]:
        if cost > quota:
            return -1, 0
        q = self._q
        assert q is not None
        now_epoch = now // bucket_ns
        self._expire(w, now_epoch)
        t = q[w + 1]
        if t <= quota - cost:
            q[w + 1] = t + cost  # total first: a crash before the bucket over-counts
            self._bucket_add(w, now_epoch, cost)
            return 0, now_epoch
        freed = 0
        for d in range(WINDOW_BUCKETS - 1, -1, -1):
            e = now_epoch - d
            if e < 0:
                continue
            u = q[w + WINDOW_FIRST_BUCKET + e % WINDOW_BUCKETS] & _MASK
            if u >> _COUNT_BITS == e & _EPOCH_MASK:
                freed += u & _COUNT_MASK
                if t - freed <= quota - cost:
                    return (e + WINDOW_BUCKETS) * bucket_ns - now, 0
        return (now_epoch + WINDOW_BUCKETS) * bucket_ns - now, 0

    def _window_give(self, w: int, cost: int, epoch: int, bucket_ns: int, now: int) -> None:
        q = self._q
        assert q is not None
        if epoch < 0 or epoch <= now // bucket_ns - WINDOW_BUCKETS:
            return  # that bucket expired: its count already left the total
        cell = w + WINDOW_FIRST_BUCKET + epoch % WINDOW_BUCKETS
        u = q[cell] & _MASK
        if u >> _COUNT_BITS != epoch & _EPOCH_MASK:
            return
        dec = min(u & _COUNT_MASK, cost)
        if dec == 0:
            return
        q[cell] = _signed(u - dec)  # bucket first, then the total (crash: total over-counts)
        self._total_sub(w, dec)

    @_locked
    def window_take(self, win: int, cost: int, quota: int, window_ns: int,
                    now: int) -> tuple[int, int]:
        """(0, epoch) if taken; (ns until it fits, 0) if refused; (-1, 0) if cost > quota."""
        bucket_ns = self._window_args(cost, window_ns, now)
        _check_nonneg("quota", quota)
        return self._window_take(self._win_w(win), cost, quota, bucket_ns, now)

    @_locked
    def window_give(self, win: int, cost: int, epoch: int, window_ns: int, now: int) -> None:
        """Refund ``cost`` into the bucket of ``epoch`` if it is still live."""
        bucket_ns = self._window_args(cost, window_ns, now)
        _check_i64("epoch", epoch)
        self._window_give(self._win_w(win), cost, epoch, bucket_ns, now)

    @_locked
    def window_charge(self, win: int, cost: int, window_ns: int, now: int) -> None:
        """Add ``cost`` to the current bucket and the total, unconditionally."""
        bucket_ns = self._window_args(cost, window_ns, now)
        w = self._win_w(win)
        q = self._q
        assert q is not None
        now_epoch = now // bucket_ns
        self._expire(w, now_epoch)
        q[w + 1] = _signed((q[w + 1] + cost) & _MASK)
        self._bucket_add(w, now_epoch, cost)

    @_locked
    def window_used(self, win: int, window_ns: int, now: int) -> int:
        """The live total of the window at ``now``."""
        bucket_ns = self._window_args(0, window_ns, now)
        w = self._win_w(win)
        self._expire(w, now // bucket_ns)
        assert self._q is not None
        return int(self._q[w + 1])

    @_locked
    def window_next_release(self, win: int, window_ns: int, now: int) -> tuple[int, int]:
        """(ns until ``window_used`` next drops, by how much); (0, 0) if nothing is live.

        Read-only (no sweep): the oldest live non-empty bucket and when it leaves the window.
        """
        bucket_ns = self._window_args(0, window_ns, now)
        w = self._win_w(win)
        q = self._q
        assert q is not None
        now_epoch = now // bucket_ns
        for d in range(WINDOW_BUCKETS - 1, -1, -1):
            e = now_epoch - d
            if e < 0:
                continue
            u = q[w + WINDOW_FIRST_BUCKET + e % WINDOW_BUCKETS] & _MASK
            if u >> _COUNT_BITS == e & _EPOCH_MASK and u & _COUNT_MASK:
                return (e + WINDOW_BUCKETS) * bucket_ns - now, u & _COUNT_MASK
        return 0, 0

    # --- all-or-nothing admission ------------------------------------------------------
    def _check_ops(self, ops: Any, n: int, worker: int, now: int) -> memoryview:
        _check_nonneg("now", now)
        self._check_worker(worker)
        mv = memoryview(ops)
        fmt = mv.format[1:] if mv.format[:1] in ("@", "=", "<") else mv.format
        if (mv.readonly or not mv.c_contiguous or mv.itemsize != 8
                or fmt not in ("q", "l")):
            raise ValueError("ops must be a writable buffer of signed 64-bit integers")
        mv = mv.cast("B").cast("q")
        if not 0 <= n <= len(mv) // OP_WORDS:
            raise ValueError(f"n={n} records do not fit in ops ({len(mv)} words)")
        for i in range(n):
            kind, index, cost, limit, period = mv[i * OP_WORDS:i * OP_WORDS + 5]
            if kind == KIND_GCRA:
                bad = not (0 <= index < self.rows and cost >= 0 and limit >= 1 and period >= 1)
            elif kind == KIND_CONCURRENCY:
                bad = not 0 <= index < self.rows
            elif kind == KIND_WINDOW:
                bad = not (0 <= index < self.windows and cost >= 0 and limit >= 0
                           and period >= WINDOW_BUCKETS)
            else:
                bad = True
            if bad:
                raise ValueError(f"ops record {i} is invalid: {list(mv[i * OP_WORDS:i * OP_WORDS + 5])}")
        return mv

    def _undo(self, mv: memoryview, upto: int, worker: int, now: int) -> None:
        for i in range(upto - 1, -1, -1):
            o = i * OP_WORDS
            kind, index, cost, limit, period, epoch = mv[o:o + 6]
            if kind == KIND_GCRA:
                self._gcra_give(self._rows_w + index * ROW_WORDS + 1, cost, limit, period)
            elif kind == KIND_CONCURRENCY:
                self._release(self._rows_w + index * ROW_WORDS + 1,
                              self._lease_cell(worker, index))
            else:
                self._window_give(self._wins_w + index * WINDOW_WORDS, cost, epoch,
                                  period // WINDOW_BUCKETS, now)

    @_locked
    def admit(self, ops: Any, n: int, now: int, worker: int) -> int:
        """Take all ``n`` records of ``ops`` or none; -1 if taken, else the refused position."""
        mv = self._check_ops(ops, n, worker, now)
        for i in range(n):
            o = i * OP_WORDS
            kind, index, cost, limit, period = mv[o:o + 5]
            if kind == KIND_GCRA:
                retry = self._gcra_take(self._rows_w + index * ROW_WORDS + 1, cost, limit,
                                        period, now)
            elif kind == KIND_CONCURRENCY:
                ok = self._lease(self._rows_w + index * ROW_WORDS + 1, limit,
                                 self._lease_cell(worker, index))
                retry = 0 if ok else (1 if limit > 0 else -1)
            else:
                retry, epoch = self._window_take(self._wins_w + index * WINDOW_WORDS, cost,
                                                 limit, period // WINDOW_BUCKETS, now)
                if retry == 0:
                    mv[o + 5] = epoch
            mv[o + 6] = retry
            if retry != 0:
                self._undo(mv, i, worker, now)
                return i
        return -1

    @_locked
    def release_ops(self, ops: Any, n: int, worker: int, now: int) -> None:
        """Undo a successful ``admit`` of the same records (the request was never sent)."""
        mv = self._check_ops(ops, n, worker, now)
        self._undo(mv, n, worker, now)


def _check_header(path: str, magic: int, version: int, rows: int, windows: int, workers: int,
                  size: int, scalars: int, buckets: int, file_size: int) -> None:
    if magic != MAGIC:
        raise LedgerError(f"ledger segment {path} has a bad magic {magic:#018x} "
                          f"(expected {MAGIC:#018x}: not a ledger, or not initialised yet)")
    if version != VERSION:
        raise LedgerError(f"ledger segment {path} has layout version {version}, "
                          f"this build reads version {VERSION}")
    if scalars != SCALARS or buckets != WINDOW_BUCKETS:
        raise LedgerError(f"ledger segment {path} has {scalars} scalars and {buckets} window "
                          f"buckets, this build expects {SCALARS} and {WINDOW_BUCKETS}")
    if min(rows, windows, workers) < 1 or size != segment_size(rows, windows, workers):
        raise LedgerError(f"ledger segment {path} header is inconsistent (rows={rows} "
                          f"windows={windows} workers={workers} size={size})")
    if file_size < size:
        raise LedgerError(f"ledger segment {path} is truncated ({file_size} of {size} bytes)")
