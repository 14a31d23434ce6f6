# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native shared-memory ledger: 64-bit cells in a MAP_SHARED file and the limits on them.

One segment (a file under /dev/shm made by the supervisor) is mapped by every
worker. Each limit is one or a few 64-bit cells changed only by atomic
compare-and-swap loops (``_atomic.h``): no locks, so a worker killed at any
instruction never leaves a lock held. The byte layout is the table in
``_native/README.md``; ``_ledger_py.py`` is the pure-Python twin with the same
results, and every ledger test runs against both.

Shape of the code: each operation is a ``cdef ... noexcept nogil`` function on raw
cell pointers (no Python object is touched between the first and the last atomic
step); the ``Ledger`` methods only check arguments, then call it. We keep the GIL
while calling them: an operation is tens of nanoseconds, less than releasing and
re-taking the GIL would cost.

Crash windows. A worker can be SIGKILLed between two atomic steps of one
operation. Every multi-step operation is ordered so that the half-done state
*over-counts* (refuses more, never admits more):
- lease: count += 1 before lease[worker][row] += 1 (a kill in between leaks a slot
  that ``reclaim`` cannot see; the opposite order would let reclaim subtract a slot
  that was never counted).
- release: lease cell -= 1 before count -= 1.
- window take/charge: total += cost before the bucket += cost; expiry and refund
  change the bucket before total -= n.
- GCRA is a single CAS on one cell: nothing to leak.
A leaked unit stays until the supervisor restarts, which recreates the segment.
"""

cimport cython
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport INT64_MAX, int64_t, uint64_t
from libc.string cimport strcmp
from posix.unistd cimport close as c_close

import mmap
import os
import struct

IMPLEMENTATION = "native"

cdef extern from "_atomic.h" nogil:
    int64_t zl_load(const int64_t *p)
    void zl_store(int64_t *p, int64_t v)
    bint zl_cas(int64_t *p, int64_t *expected, int64_t desired)
    int64_t zl_add(int64_t *p, int64_t delta)
    int64_t zl_exchange(int64_t *p, int64_t v)
    int64_t zl_ceil_muldiv(int64_t a, int64_t b, int64_t c)
    int64_t zl_floor_muldiv(int64_t a, int64_t b, int64_t c)

cdef uint64_t FNV_OFFSET = 0xcbf29ce484222325ULL
cdef uint64_t FNV_PRIME = 0x100000001b3ULL


cdef inline uint64_t _fnv1a(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = FNV_OFFSET
    cdef Py_ssize_t i
    for i in range(n):
        h ^= p[i]
        h *= FNV_PRIME
    return h


cpdef unsigned long long stable_hash(const unsigned char[:] data):
    """64-bit FNV-1a of ``data``; identical in every process and in the twin.

    (Python's ``hash()`` is salted per process, so workers would disagree on rows.)
    """
    cdef uint64_t h = FNV_OFFSET
    cdef Py_ssize_t i
    with nogil:
        for i in range(data.shape[0]):
            h ^= data[i]
            h *= FNV_PRIME
    return h


# --- layout (keep in step with _ledger_py.py and the table in README.md) -----------------
MAGIC = int.from_bytes(b"ZAILEDG1", "little")
VERSION = 1
SCALARS = 16
WINDOW_BUCKETS = 60
OP_WORDS = 8
KIND_GCRA = 1
KIND_CONCURRENCY = 2
KIND_WINDOW = 3
DISCIPLINE_ATOMIC = 1
DISCIPLINE_FLOCK = 2

cdef enum:
    LINE = 64
    HEADER_SIZE = 64
    NSCALARS = 16
    ROW_WORDS = 8
    WINDOW_WORDS = 64
    BUCKETS = 60
    FIRST_BUCKET = 4          # window words: 0 key, 1 total, 2 swept-through epoch, 3 reserved
    NOP_WORDS = 8
    GCRA = 1
    CONCURRENCY = 2
    WINDOW = 3
    EPOCH_BITS = 24           # bucket word: epoch (mod 2**24) in the high 24 bits,
    COUNT_BITS = 40           # count in the low 40 bits
    EPOCH_MASK = 0xFFFFFF

cdef extern from *:
    const uint64_t COUNT_MASK "((uint64_t)0xFFFFFFFFFFULL)"

_U32_MAX = 0xFFFFFFFF

_HEADER = struct.Struct("<QIIIIQQIII12x")
_ROWS_OFF = HEADER_SIZE + NSCALARS * LINE


class LedgerError(Exception):
    """The segment cannot be created or attached, or the ledger is closed."""


class LedgerFull(LedgerError):
    """Every row (or window row) is claimed by another key."""


def segment_size(rows, windows, workers):
    """Bytes of a segment with this layout (header + scalars + rows + windows + leases)."""
    return _lease_off(rows, windows) + workers * _lease_stride(rows)


def _lease_off(rows, windows):
    return _ROWS_OFF + rows * ROW_WORDS * 8 + windows * WINDOW_WORDS * 8


def _lease_stride(rows):
    # Each worker's lease cells start on their own cache line (only that worker writes them).
    return (rows * 8 + LINE - 1) // LINE * LINE


ctypedef struct Seg:
    int64_t *scalars      # scalar i is scalars[i * 8] (one per cache line)
    int64_t *rows         # row r is rows[r * 8 .. r * 8 + 7]
    int64_t *wins         # window w is wins[w * 64 .. w * 64 + 63]
    int64_t *leases       # lease[worker][row] is leases[worker * lease_stride + row]
    Py_ssize_t lease_stride
    Py_ssize_t nrows
    Py_ssize_t nwins
    Py_ssize_t nworkers


# --- the algorithms: raw cells only, no Python objects ------------------------------------

cdef inline void _sub_floor0(int64_t *p, int64_t n) noexcept nogil:
    """*p -= n, but never below 0."""
    cdef int64_t c = zl_load(p)
    while not zl_cas(p, &c, 0 if c <= n else c - n):
        pass


cdef inline int64_t _claim(int64_t *base, Py_ssize_t stride, Py_ssize_t count,
                           uint64_t h) noexcept nogil:
    """Index of the row whose word 0 is ``h``, claiming a free one; -1 if the table is full."""
    cdef int64_t key = <int64_t>h
    cdef int64_t w
    cdef Py_ssize_t probe, i
    cdef Py_ssize_t start = <Py_ssize_t>(h % <uint64_t>count)
    for probe in range(count):
        i = start + probe
        if i >= count:
            i -= count
        w = zl_load(base + i * stride)
        if w == key:
            return i
        if w == 0:
            # Two processes claiming the same key race on this CAS: the loser sees the
            # winner's hash in w and uses the same row.
            if zl_cas(base + i * stride, &w, key) or w == key:
                return i
    return -1


cdef inline int64_t _find(int64_t *base, Py_ssize_t stride, Py_ssize_t count,
                          uint64_t h) noexcept nogil:
    """Index of the row whose word 0 is ``h``; -1 if none (claims nothing).

    Rows are never freed, so the probe sequence of a claimed key never crosses a free
    row: the first free row ends the search.
    """
    cdef int64_t key = <int64_t>h
    cdef int64_t w
    cdef Py_ssize_t probe, i
    cdef Py_ssize_t start = <Py_ssize_t>(h % <uint64_t>count)
    for probe in range(count):
        i = start + probe
        if i >= count:
            i -= count
        w = zl_load(base + i * stride)
        if w == key:
            return i
        if w == 0:
            return -1
    return -1


cdef inline int64_t _gcra_take(int64_t *tat_p, int64_t cost, int64_t limit, int64_t period,
                               int64_t now) noexcept nogil:
    if cost > limit:
        return -1
    cdef int64_t inc = zl_ceil_muldiv(cost, period, limit)
    cdef int64_t tat = zl_load(tat_p)
    cdef int64_t tat0, new
    while True:
        tat0 = tat if tat > now else now
        new = INT64_MAX if inc > INT64_MAX - tat0 else tat0 + inc
        if new - now > period:
            return new - period - now
        if zl_cas(tat_p, &tat, new):
            return 0


cdef inline void _gcra_give(int64_t *tat_p, int64_t cost, int64_t limit,
                            int64_t period) noexcept nogil:
    cdef int64_t inc = zl_ceil_muldiv(cost, period, limit)
    cdef int64_t tat = zl_load(tat_p)
    while not zl_cas(tat_p, &tat, 0 if tat < inc else tat - inc):
        pass


cdef inline void _gcra_charge(int64_t *tat_p, int64_t cost, int64_t limit, int64_t period,
                              int64_t now) noexcept nogil:
    cdef int64_t inc = zl_ceil_muldiv(cost, period, limit)
    cdef int64_t tat = zl_load(tat_p)
    cdef int64_t tat0
    while True:
        tat0 = tat if tat > now else now
        if zl_cas(tat_p, &tat, INT64_MAX if inc > INT64_MAX - tat0 else tat0 + inc):
            return


cdef inline bint _lease(int64_t *count_p, int64_t limit, int64_t *cell) noexcept nogil:
    cdef int64_t c = zl_load(count_p)
    while True:
        if c >= limit:
            return False
        if zl_cas(count_p, &c, c + 1):
            break
    zl_add(cell, 1)  # after the count: a kill in between leaks a slot, never invents one
    return True


cdef inline void _release(int64_t *count_p, int64_t *cell) noexcept nogil:
    cdef int64_t held = zl_load(cell)
    while True:
        if held <= 0:
            return  # this worker holds nothing on this row: releasing would steal a slot
        if zl_cas(cell, &held, held - 1):
            break
    _sub_floor0(count_p, 1)  # after the cell: a kill in between leaks a slot


cdef inline int64_t _age(int64_t now_epoch, uint64_t epoch24) noexcept nogil:
    """Buckets between a stored 24-bit epoch and now, as a signed 24-bit difference."""
    cdef int64_t d = (now_epoch - <int64_t>epoch24) & EPOCH_MASK
    if d >= (1 << (EPOCH_BITS - 1)):
        d -= (1 << EPOCH_BITS)
    return d


cdef inline void _expire(int64_t *win, int64_t now_epoch) noexcept nogil:
    """Empty every bucket that left the window and take its count out of the total.

    Word 2 remembers the epoch of the last complete sweep: until the epoch changes no
    bucket can expire, so most calls skip the 60 loads. It is raised only after the
    sweep, so a process that sees it has nothing left to subtract.
    """
    cdef int64_t swept = zl_load(win + 2)
    if swept >= now_epoch:
        return
    cdef int64_t w, d
    cdef uint64_t c
    cdef int s
    for s in range(BUCKETS):
        w = zl_load(win + FIRST_BUCKET + s)
        while True:
            c = (<uint64_t>w) & COUNT_MASK
            if c == 0:
                break
            d = _age(now_epoch, (<uint64_t>w) >> COUNT_BITS)
            if -BUCKETS < d < BUCKETS:
                break
            if zl_cas(win + FIRST_BUCKET + s, &w, 0):
                _sub_floor0(win + 1, <int64_t>c)  # after the bucket: a kill over-counts
                break
    while swept < now_epoch and not zl_cas(win + 2, &swept, now_epoch):
        pass


cdef inline void _bucket_add(int64_t *win, int64_t epoch, int64_t cost) noexcept nogil:
    """Add ``cost`` to the bucket of ``epoch`` (the total already holds it)."""
    cdef int64_t *cell = win + FIRST_BUCKET + epoch % BUCKETS
    cdef uint64_t e24 = (<uint64_t>epoch) & EPOCH_MASK
    cdef int64_t w = zl_load(cell)
    cdef uint64_t c, nc, stale, added, slot_e24
    cdef int64_t d
    while True:
        c = (<uint64_t>w) & COUNT_MASK
        slot_e24 = (<uint64_t>w) >> COUNT_BITS
        d = _age(epoch, slot_e24)
        if d == 0 or (d < 0 and c > 0):
            # The same epoch; or a newer one (same slot, so a window or more ahead), written
            # by a process whose clock is ahead of our ``now`` (we were stopped between
            # reading the clock and here): add into it, as rotating it away would drop
            # live counts.
            nc = c + <uint64_t>cost
            if nc > COUNT_MASK:
                nc = COUNT_MASK
            added = nc - c
            stale = 0
        else:
            # Rotation: the slot holds an older epoch (normally already swept to 0).
            nc = <uint64_t>cost if <uint64_t>cost < COUNT_MASK else COUNT_MASK
            added = nc
            stale = c
            slot_e24 = e24
        if zl_cas(cell, &w, <int64_t>((slot_e24 << COUNT_BITS) | nc)):
            break
    if stale:
        _sub_floor0(win + 1, <int64_t>stale)
    if added < <uint64_t>cost:  # the bucket saturated (2**40 - 1): keep the total exact
        _sub_floor0(win + 1, cost - <int64_t>added)


cdef inline int64_t _live_count(const int64_t *win, int64_t e) noexcept nogil:
    """The count of epoch ``e``'s bucket if that bucket still holds epoch ``e``, else 0."""
    cdef int64_t w = zl_load(win + FIRST_BUCKET + e % BUCKETS)
    if (<uint64_t>w) >> COUNT_BITS == ((<uint64_t>e) & EPOCH_MASK):
        return <int64_t>((<uint64_t>w) & COUNT_MASK)
    return 0


cdef inline int64_t _window_take(int64_t *win, int64_t cost, int64_t quota,
                                 int64_t bucket_ns, int64_t now,
                                 int64_t *epoch_out) noexcept nogil:
    if cost > quota:
        return -1
    cdef int64_t now_epoch = now // bucket_ns
    _expire(win, now_epoch)
    cdef int64_t t = zl_load(win + 1)
    while t <= quota - cost:
        if zl_cas(win + 1, &t, t + cost):
            _bucket_add(win, now_epoch, cost)  # after the total: a kill over-counts
            epoch_out[0] = now_epoch
            return 0
    # Refused: the exact time at which enough of the oldest buckets will have expired.
    cdef int64_t freed = 0
    cdef int64_t d, e
    for d in range(BUCKETS - 1, -1, -1):
        e = now_epoch - d
        if e >= 0:
            freed += _live_count(win, e)
            if t - freed <= quota - cost:
                return (e + BUCKETS) * bucket_ns - now
    # Only if the total holds a unit leaked by a crash: the whole window is a safe answer.
    return (now_epoch + BUCKETS) * bucket_ns - now


cdef inline void _window_give(int64_t *win, int64_t cost, int64_t epoch, int64_t bucket_ns,
                              int64_t now) noexcept nogil:
    if epoch < 0 or epoch <= now // bucket_ns - BUCKETS:
        return  # that bucket expired: its count already left the total
    cdef int64_t *cell = win + FIRST_BUCKET + epoch % BUCKETS
    cdef uint64_t e24 = (<uint64_t>epoch) & EPOCH_MASK
    cdef int64_t w = zl_load(cell)
    cdef uint64_t dec
    while True:
        if (<uint64_t>w) >> COUNT_BITS != e24:
            return
        dec = (<uint64_t>w) & COUNT_MASK
        if dec > <uint64_t>cost:
            dec = <uint64_t>cost
        if dec == 0:
            return
        if zl_cas(cell, &w, <int64_t>(<uint64_t>w - dec)):
            break
    _sub_floor0(win + 1, <int64_t>dec)  # after the bucket: a kill over-counts


cdef inline int64_t _window_next_release(const int64_t *win, int64_t bucket_ns, int64_t now,
                                         int64_t *amount_out) noexcept nogil:
    """ns until the oldest live non-empty bucket leaves the window (its count in amount_out).

    Loads only: a reader (the admin API) must not sweep, and an expired bucket that was not
    swept yet is simply not live here. 0 and amount 0 when no live bucket holds anything
    (a total that holds only units leaked by a crash has no bucket to release them).
    """
    cdef int64_t now_epoch = now // bucket_ns
    cdef int64_t d, e, count
    for d in range(BUCKETS - 1, -1, -1):
        e = now_epoch - d
        if e < 0:
            continue
        count = _live_count(win, e)
        if count:
            amount_out[0] = count
            return (e + BUCKETS) * bucket_ns - now
    amount_out[0] = 0
    return 0


cdef inline void _window_charge(int64_t *win, int64_t cost, int64_t bucket_ns,
                                int64_t now) noexcept nogil:
    cdef int64_t now_epoch = now // bucket_ns
    _expire(win, now_epoch)
    zl_add(win + 1, cost)
    _bucket_add(win, now_epoch, cost)


cdef inline Py_ssize_t _check_ops(const Seg *s, const int64_t *ops, Py_ssize_t n) noexcept nogil:
    """Position of the first malformed record, or -1."""
    cdef Py_ssize_t i
    cdef const int64_t *op
    for i in range(n):
        op = ops + i * NOP_WORDS
        if op[0] == GCRA:
            if not (0 <= op[1] < s.nrows and op[2] >= 0 and op[3] >= 1 and op[4] >= 1):
                return i
        elif op[0] == CONCURRENCY:
            if not (0 <= op[1] < s.nrows):
                return i
        elif op[0] == WINDOW:
            if not (0 <= op[1] < s.nwins and op[2] >= 0 and op[3] >= 0 and op[4] >= BUCKETS):
                return i
        else:
            return i
    return -1


cdef inline void _undo(const Seg *s, int64_t *ops, Py_ssize_t upto, Py_ssize_t worker,
                       int64_t now) noexcept nogil:
    """Give back records [0, upto) in reverse order."""
    cdef Py_ssize_t i
    cdef int64_t *op
    for i in range(upto - 1, -1, -1):
        op = ops + i * NOP_WORDS
        if op[0] == GCRA:
            _gcra_give(s.rows + op[1] * ROW_WORDS + 1, op[2], op[3], op[4])
        elif op[0] == CONCURRENCY:
            _release(s.rows + op[1] * ROW_WORDS + 1, s.leases + worker * s.lease_stride + op[1])
        else:
            _window_give(s.wins + op[1] * WINDOW_WORDS, op[2], op[5], op[4] // BUCKETS, now)


cdef inline Py_ssize_t _admit(const Seg *s, int64_t *ops, Py_ssize_t n, int64_t now,
                              Py_ssize_t worker) noexcept nogil:
    """All-or-nothing: take records in order; on the first refusal undo the taken ones.

    Never over-admits: every record is a real reservation the moment it is taken, so a
    concurrent admission may see one that is rolled back a moment later and be refused
    (conservative); it can never see a limit as freer than it is.
    """
    cdef Py_ssize_t i
    cdef int64_t *op
    cdef int64_t retry
    for i in range(n):
        op = ops + i * NOP_WORDS
        if op[0] == GCRA:
            retry = _gcra_take(s.rows + op[1] * ROW_WORDS + 1, op[2], op[3], op[4], now)
        elif op[0] == CONCURRENCY:
            if _lease(s.rows + op[1] * ROW_WORDS + 1, op[3],
                      s.leases + worker * s.lease_stride + op[1]):
                retry = 0
            else:
                # A slot frees when some request ends; when is not ours to know.
                retry = 1 if op[3] > 0 else -1
        else:
            retry = _window_take(s.wins + op[1] * WINDOW_WORDS, op[2], op[3],
                                 op[4] // BUCKETS, now, op + 5)
        op[6] = retry
        if retry != 0:
            _undo(s, ops, i, worker, now)
            return i
    return -1


# --- the Python face ------------------------------------------------------------------

@cython.final
cdef class Ledger:
    """A shared-memory segment of 64-bit cells and the limit algorithms on it.

    ``create=True`` (the supervisor) makes a fresh segment at ``path``: an existing
    file is replaced, whatever it holds, because anything in it is stale from a
    previous supervisor. ``create=False`` (a worker) attaches and takes the layout
    from the header. All times are caller-supplied nanoseconds (>= 0).
    """

    cdef Seg s
    cdef char *base
    cdef Py_buffer view
    cdef bint have_view
    cdef int fd
    cdef object mm
    cdef readonly str path
    cdef readonly Py_ssize_t rows
    cdef readonly Py_ssize_t windows
    cdef readonly Py_ssize_t workers
    cdef readonly str implementation

    def __cinit__(self):
        self.base = NULL
        self.have_view = False
        self.fd = -1

    def __init__(self, str path, *, bint create, Py_ssize_t rows=4096, Py_ssize_t windows=256,
                 Py_ssize_t workers=64):
        if self.have_view:
            raise LedgerError("Ledger.__init__ called twice")
        self.path = path
        self.implementation = IMPLEMENTATION
        if create:
            for name, v in (("rows", rows), ("windows", windows), ("workers", workers)):
                if not 1 <= v <= _U32_MAX:
                    raise ValueError(f"{name} must be between 1 and {_U32_MAX}, got {v}")
            self._create(rows, windows, workers)
        else:
            self._attach()

    cdef int _create(self, Py_ssize_t rows, Py_ssize_t windows, Py_ssize_t workers) except -1:
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
        # The header goes in last and the magic word last of all (a release store): an
        # attacher racing the creator sees "bad magic", never a half-initialised layout.
        _HEADER.pack_into(mm, 0, 0, VERSION, rows, windows, workers, size, os.getpid(),
                          SCALARS, WINDOW_BUCKETS, DISCIPLINE_ATOMIC)
        self._adopt(fd, mm, rows, windows, workers)
        zl_store(<int64_t *>self.base, <int64_t>MAGIC)
        return 0

    cdef int _attach(self) except -1:
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
            (magic, version, rows, windows, workers, size, _pid, scalars, buckets,
             discipline) = _HEADER.unpack(os.pread(fd, HEADER_SIZE, 0))
            _check_header(self.path, magic, version, rows, windows, workers, size, scalars,
                          buckets, file_size)
            if discipline != DISCIPLINE_ATOMIC:
                raise LedgerError(f"ledger segment {self.path} was created by the pure-Python "
                                  "ledger; every process must use the same implementation")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._adopt(fd, mm, rows, windows, workers)
        return 0

    cdef int _adopt(self, int fd, object mm, Py_ssize_t rows, Py_ssize_t windows,
                    Py_ssize_t workers) except -1:
        PyObject_GetBuffer(mm, &self.view, PyBUF_WRITABLE)
        self.have_view = True
        self.fd = fd
        self.mm = mm
        self.rows = rows
        self.windows = windows
        self.workers = workers
        cdef char *base = <char *>self.view.buf
        self.s.scalars = <int64_t *>(base + HEADER_SIZE)
        self.s.rows = <int64_t *>(base + HEADER_SIZE + NSCALARS * LINE)
        self.s.wins = self.s.rows + rows * ROW_WORDS
        cdef Py_ssize_t lease_off = _lease_off(rows, windows)
        self.s.leases = <int64_t *>(base + lease_off)
        self.s.lease_stride = _lease_stride(rows) // 8
        self.s.nrows = rows
        self.s.nwins = windows
        self.s.nworkers = workers
        self.base = base
        return 0

    def close(self):
        """Unmap and close; further calls raise LedgerError. Idempotent."""
        self.base = NULL
        if self.have_view:
            PyBuffer_Release(&self.view)
            self.have_view = False
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __dealloc__(self):
        if self.have_view:
            PyBuffer_Release(&self.view)
        if self.fd >= 0:
            c_close(self.fd)

    def unlink(self):
        """Remove the segment file (workers that attached keep their mapping)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.base == NULL else "open"
        return (f"<Ledger {self.implementation} {self.path} rows={self.rows} "
                f"windows={self.windows} workers={self.workers} {state}>")

    # --- argument checks (the twin makes the same ones) --------------------------------
    cdef int _open(self) except -1:
        if self.base == NULL:
            raise LedgerError(f"ledger {self.path} is closed")
        return 0

    cdef int64_t *_row(self, Py_ssize_t row) except NULL:
        self._open()
        if not 0 <= row < self.rows:
            raise ValueError(f"row {row} out of range 0..{self.rows - 1}")
        return self.s.rows + row * ROW_WORDS

    cdef int64_t *_win(self, Py_ssize_t win) except NULL:
        self._open()
        if not 0 <= win < self.windows:
            raise ValueError(f"window {win} out of range 0..{self.windows - 1}")
        return self.s.wins + win * WINDOW_WORDS

    cdef int _worker(self, Py_ssize_t worker) except -1:
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} out of range 0..{self.workers - 1}")
        return 0

    cdef int64_t *_scalar(self, Py_ssize_t i) except NULL:
        self._open()
        if not 0 <= i < NSCALARS:
            raise ValueError(f"scalar {i} out of range 0..{NSCALARS - 1}")
        return self.s.scalars + i * (LINE // 8)

    # --- keys ---------------------------------------------------------------------------
    def row(self, bytes key):
        """The row of ``key``, claimed on first use (linear probing from its hash)."""
        self._open()
        cdef uint64_t h = _fnv1a(<const unsigned char *>PyBytes_AS_STRING(key),
                                 PyBytes_GET_SIZE(key))
        cdef int64_t i = _claim(self.s.rows, ROW_WORDS, self.rows, h if h else 1)
        if i < 0:
            raise LedgerFull(f"ledger row table is full ({self.rows} rows); raise its size")
        return i

    def row_find(self, bytes key):
        """The row of ``key`` if some process claimed it, else -1 (never claims a row)."""
        self._open()
        cdef uint64_t h = _fnv1a(<const unsigned char *>PyBytes_AS_STRING(key),
                                 PyBytes_GET_SIZE(key))
        return _find(self.s.rows, ROW_WORDS, self.rows, h if h else 1)

    def row_hash(self, Py_ssize_t row):
        """Word 0 of ``row`` as an unsigned 64-bit int: its key's hash (0 = a free row).

        A key whose ``stable_hash`` is 0 is stored as 1. With a side table of the keys a
        reader can enumerate the claimed rows and check each key against its row.
        """
        return <uint64_t>zl_load(self._row(row))

    def window(self, bytes key):
        """The window row of ``key``, claimed on first use."""
        self._open()
        cdef uint64_t h = _fnv1a(<const unsigned char *>PyBytes_AS_STRING(key),
                                 PyBytes_GET_SIZE(key))
        cdef int64_t i = _claim(self.s.wins, WINDOW_WORDS, self.windows, h if h else 1)
        if i < 0:
            raise LedgerFull(f"ledger window table is full ({self.windows} windows); "
                             "raise its size")
        return i

    # --- scalars and counters -------------------------------------------------------
    def scalar_get(self, Py_ssize_t i):
        return zl_load(self._scalar(i))

    def scalar_set(self, Py_ssize_t i, int64_t v):
        zl_store(self._scalar(i), v)

    def scalar_add(self, Py_ssize_t i, int64_t delta):
        return zl_add(self._scalar(i), delta)

    def scalar_cas(self, Py_ssize_t i, int64_t expected, int64_t new):
        return zl_cas(self._scalar(i), &expected, new)

    cdef int64_t *_counter(self, Py_ssize_t row, Py_ssize_t word) except NULL:
        cdef int64_t *r = self._row(row)
        if not 1 <= word < ROW_WORDS:
            raise ValueError(f"word {word} out of range 1..{ROW_WORDS - 1}")
        return r + word

    def counter_add(self, Py_ssize_t row, Py_ssize_t word, int64_t n):
        return zl_add(self._counter(row, word), n)

    def counter_get(self, Py_ssize_t row, Py_ssize_t word):
        return zl_load(self._counter(row, word))

    def counter_set(self, Py_ssize_t row, Py_ssize_t word, int64_t v):
        """Store ``v`` (for a cell with a single writer, e.g. a worker's own gauge)."""
        zl_store(self._counter(row, word), v)

    def row_counters(self, Py_ssize_t row):
        """Words 1..7 of ``row`` (seven atomic loads, not one snapshot)."""
        cdef int64_t *r = self._row(row)
        return (zl_load(r + 1), zl_load(r + 2), zl_load(r + 3), zl_load(r + 4),
                zl_load(r + 5), zl_load(r + 6), zl_load(r + 7))

    # --- GCRA -------------------------------------------------------------------------
    def gcra_take(self, Py_ssize_t row, int64_t cost, int64_t limit, int64_t period_ns,
                  int64_t now):
        """0 if ``cost`` was taken; else ns until it would be (>= 1); -1 if cost > limit."""
        cdef int64_t *r = self._row(row)
        _gcra_args(cost, limit, period_ns)
        _nonneg("now", now)
        return _gcra_take(r + 1, cost, limit, period_ns, now)

    def gcra_give(self, Py_ssize_t row, int64_t cost, int64_t limit, int64_t period_ns):
        """Refund ``cost`` (TAT -= increment, not below 0)."""
        cdef int64_t *r = self._row(row)
        _gcra_args(cost, limit, period_ns)
        _gcra_give(r + 1, cost, limit, period_ns)

    def gcra_charge(self, Py_ssize_t row, int64_t cost, int64_t limit, int64_t period_ns,
                    int64_t now):
        """Take ``cost`` unconditionally (usage above the reservation)."""
        cdef int64_t *r = self._row(row)
        _gcra_args(cost, limit, period_ns)
        _nonneg("now", now)
        _gcra_charge(r + 1, cost, limit, period_ns, now)

    def gcra_state(self, Py_ssize_t row, int64_t limit, int64_t period_ns, int64_t now):
        """(whole units of cost 1 that would be taken now, ns until the row is fully reset)."""
        cdef int64_t *r = self._row(row)
        _gcra_args(0, limit, period_ns)
        _nonneg("now", now)
        cdef int64_t tat = zl_load(r + 1)
        cdef int64_t used = (tat if tat > now else now) - now
        cdef int64_t room = period_ns - used
        return (0 if room <= 0 else zl_floor_muldiv(room, limit, period_ns)), used

    # --- concurrency ------------------------------------------------------------------
    def lease(self, Py_ssize_t row, int64_t limit, Py_ssize_t worker):
        """Take one concurrency slot for ``worker`` if fewer than ``limit`` are in use."""
        cdef int64_t *r = self._row(row)
        self._worker(worker)
        return _lease(r + 1, limit, self.s.leases + worker * self.s.lease_stride + row)

    def release(self, Py_ssize_t row, Py_ssize_t worker):
        """Give back one slot leased by ``worker`` (no-op if it holds none on this row)."""
        cdef int64_t *r = self._row(row)
        self._worker(worker)
        _release(r + 1, self.s.leases + worker * self.s.lease_stride + row)

    def reclaim(self, Py_ssize_t worker):
        """``worker`` is dead: return every slot it held. Returns how many."""
        self._open()
        self._worker(worker)
        cdef int64_t *cells = self.s.leases + worker * self.s.lease_stride
        cdef int64_t total = 0
        cdef int64_t n
        cdef Py_ssize_t row
        for row in range(self.rows):
            if zl_load(cells + row) == 0:
                continue
            n = zl_exchange(cells + row, 0)  # the cell first: a kill here leaks, conservatively
            if n > 0:
                _sub_floor0(self.s.rows + row * ROW_WORDS + 1, n)
                total += n
        return total

    def in_use(self, Py_ssize_t row):
        return zl_load(self._row(row) + 1)

    # --- rolling windows --------------------------------------------------------------
    def window_take(self, Py_ssize_t win, int64_t cost, int64_t quota, int64_t window_ns,
                    int64_t now):
        """(0, epoch) if taken; (ns until it fits, 0) if refused; (-1, 0) if cost > quota."""
        cdef int64_t *w = self._win(win)
        cdef int64_t bucket_ns = _window_args(cost, window_ns, now)
        _nonneg("quota", quota)
        cdef int64_t epoch = 0
        cdef int64_t retry = _window_take(w, cost, quota, bucket_ns, now, &epoch)
        return retry, epoch

    def window_give(self, Py_ssize_t win, int64_t cost, int64_t epoch, int64_t window_ns,
                    int64_t now):
        """Refund ``cost`` into the bucket of ``epoch`` if it is still live."""
        cdef int64_t *w = self._win(win)
        cdef int64_t bucket_ns = _window_args(cost, window_ns, now)
        _window_give(w, cost, epoch, bucket_ns, now)

    def window_charge(self, Py_ssize_t win, int64_t cost, int64_t window_ns, int64_t now):
        """Add ``cost`` to the current bucket and the total, unconditionally."""
        cdef int64_t *w = self._win(win)
        cdef int64_t bucket_ns = _window_args(cost, window_ns, now)
        _window_charge(w, cost, bucket_ns, now)

    def window_used(self, Py_ssize_t win, int64_t window_ns, int64_t now):
        """The live total of the window at ``now``."""
        cdef int64_t *w = self._win(win)
        cdef int64_t bucket_ns = _window_args(0, window_ns, now)
        _expire(w, now // bucket_ns)
        return zl_load(w + 1)

    def window_next_release(self, Py_ssize_t win, int64_t window_ns, int64_t now):
        """(ns until ``window_used`` next drops, by how much); (0, 0) if nothing is live.

        Read-only: the oldest live non-empty bucket and when it leaves the window.
        """
        cdef int64_t *w = self._win(win)
        cdef int64_t bucket_ns = _window_args(0, window_ns, now)
        cdef int64_t amount = 0
        cdef int64_t ns = _window_next_release(w, bucket_ns, now, &amount)
        return ns, amount

    # --- all-or-nothing admission -----------------------------------------------------
    # ``ops`` arrives through the buffer protocol into a Py_buffer on the C stack rather
    # than as a typed memoryview (``long long[::1]``): Cython allocates a memoryview object
    # for every such conversion, which measured 362 ns per admit+release_ops pair against
    # 128 ns this way (a call that does nothing: 116 ns). The checks are the same: a
    # writable, C-contiguous buffer of signed 64-bit items (array('q'), memoryview.cast('q')).
    def admit(self, ops, Py_ssize_t n, int64_t now, Py_ssize_t worker):
        """Take all ``n`` records of ``ops`` or none; -1 if taken, else the refused position."""
        cdef Py_buffer view
        cdef int64_t *p = self._acquire(ops, &view, n, now, worker)
        cdef Py_ssize_t pos = _admit(&self.s, p, n, now, worker)
        PyBuffer_Release(&view)
        return pos

    def release_ops(self, ops, Py_ssize_t n, Py_ssize_t worker, int64_t now):
        """Undo a successful ``admit`` of the same records (the request was never sent)."""
        cdef Py_buffer view
        cdef int64_t *p = self._acquire(ops, &view, n, now, worker)
        _undo(&self.s, p, n, worker, now)
        PyBuffer_Release(&view)

    cdef int64_t *_acquire(self, object ops, Py_buffer *view, Py_ssize_t n, int64_t now,
                           Py_ssize_t worker) except? NULL:
        """Checked pointer to the records in ``ops``; on success ``view`` must be released."""
        self._open()
        _nonneg("now", now)
        self._worker(worker)
        PyObject_GetBuffer(ops, view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS)
        cdef const char *fmt = view.format
        if fmt[0] == b'@' or fmt[0] == b'=' or fmt[0] == b'<':
            fmt += 1
        if view.itemsize != 8 or not (strcmp(fmt, b"q") == 0 or strcmp(fmt, b"l") == 0):
            PyBuffer_Release(view)
            raise ValueError("ops must be a writable buffer of signed 64-bit integers")
        cdef Py_ssize_t words = view.len // 8
        if not 0 <= n <= words // NOP_WORDS:
            PyBuffer_Release(view)
            raise ValueError(f"n={n} records do not fit in ops ({words} words)")
        cdef int64_t *p = <int64_t *>view.buf
        cdef Py_ssize_t bad = _check_ops(&self.s, p, n)
        if bad >= 0:
            PyBuffer_Release(view)
            raise ValueError(f"ops record {bad} is invalid: "
                             f"{[p[bad * NOP_WORDS + k] for k in range(5)]}")
        return p


cdef inline int _nonneg(str name, int64_t v) except -1:
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return 0


cdef inline int _gcra_args(int64_t cost, int64_t limit, int64_t period_ns) except -1:
    _nonneg("cost", cost)
    if limit < 1 or period_ns < 1:
        raise ValueError("limit and period_ns must be >= 1")
    return 0


cdef inline int64_t _window_args(int64_t cost, int64_t window_ns, int64_t now) except -1:
    _nonneg("cost", cost)
    _nonneg("now", now)
    if window_ns < BUCKETS:
        raise ValueError(f"window_ns must be >= {BUCKETS}")
    return window_ns // BUCKETS


def _check_header(path, magic, version, rows, windows, workers, size, scalars, buckets,
                  file_size):
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
