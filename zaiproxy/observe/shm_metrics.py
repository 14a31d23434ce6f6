"""Prometheus series kept in the shared-memory ledger, so any worker's scrape shows every worker.

Why not prometheus-client's multiprocess mode: it costs ~1-2 µs per observation (one
mmap'd file per process and metric type, a dict lookup and a struct write behind a lock),
leaves one file per pid to wipe and mark dead, and custom collectors do not work in it
(``bench/micro/metrics_cost.py`` measures both: 0.9 µs per
``Counter.inc``, 2.0 µs per ``Histogram.observe`` there). Here an observation is one or two
atomic adds on ledger cells: ~85 ns per counter increment and ~320 ns per histogram
observation from Python on the native ledger, and a scrape walks the row table once.

Series
------
A series is one or a few ledger rows (``_native/README.md``: 8 words, word 0 = the key's
hash, words 1..7 = counters any process adds to atomically), found with
``Ledger.row(key)``. Every value is an integer: sums are stored as ``round(value * scale)``
(nanoseconds for seconds, bytes, nano-USD), so adding is atomic and nothing drifts.

* key: ``b"m\\0" + family code + (b"\\0" + label value)* + b"\\0#" + part``. The family
  code is a short fixed id (:class:`Family`), the ``variant`` label is not in the key (one
  segment serves one deployment).
* counter: one row, word 1 = the value.
* histogram with ``B`` bounds: ``B + 2`` cells. Cell ``i < B`` counts observations ``v``
  with ``bounds[i-1] < v <= bounds[i]`` (not cumulative: one add per observation), cell
  ``B`` those above the last bound, cell ``B + 1`` is the sum. Cell ``j`` is word
  ``1 + j % 7`` of part ``j // 7``: ``ceil((B + 2) / 7)`` rows. The count is the sum of the
  bucket cells, not a cell of its own, so ``+Inf`` always equals ``_count``; the sum is
  read separately and can be one observation ahead or behind the buckets in a scrape.

Nothing about a series lives in a process: a worker that dies and restarts finds its rows
again by key, and counters never go backwards while the supervisor (which creates the
segment) lives. A supervisor restart starts from zero, which Prometheus sees as a reset.

The names table
---------------
The ledger stores hashes, not keys, so a reader cannot enumerate series from it alone.
:class:`NamesFile` is a table appended to the segment file itself, past the ledger's
layout (at ``segment_size(rows, windows, workers)`` rounded up to a page; the ledger
accepts a file longer than its layout and never touches those bytes): one slot of
``SLOT_BYTES`` = 256 bytes per ledger row, a ``u16`` little-endian key length, then the
key. The first worker to open it grows the file with ``ftruncate`` (zeros; concurrent
growers agree, nobody shrinks it, and existing mappings of the ledger part are
unaffected). Living in the segment's file, the table is created, replaced and removed
with the segment (a supervisor restart starts from empty names, and nothing is left in
``/dev/shm``), with no change to the supervisor. A private segment (no supervisor: tests,
embedding) gets an anonymous mapping instead.

Every process that binds a series writes its key into the slot of each of its rows (the
same bytes whoever writes them, so concurrent writers cannot disagree). A reader takes a
slot only if ``stable_hash(key)`` equals the row's word 0 (``Ledger.row_hash``): a torn or
half-written slot, or the slot of a row that holds a limit (not a series), fails that
check and is skipped. A slot whose writer died before finishing is rewritten by the next
process that binds the series (a restarted worker does so at its first observation).

Budget
------
Rows are a finite table shared with the limits (``limits.ledger_rows``, default 4096),
and rows are never freed. Series may reserve at most ``budget`` rows (default: half the
table) through a counter in the meta row (``META_KEY``): a process that binds a series
whose rows do not exist yet adds their number first and backs off if that passes the
budget. Two processes racing to create the same series can both reserve it (the budget
then over-counts by a few rows: conservative). A series that does not fit, or whose key
does not fit a slot, is dropped: its observations are discarded, the process remembers
the refusal, and ``zai_proxy_metrics_series_dropped_total`` counts it (once per process
that refused it). A full ledger table (``LedgerFull``) is handled the same way: metrics
never crash a request.

Per-process gauge rows
----------------------
Gauges that belong to one process (requests in flight, pooled connections) are words of
that process's own row, ``gauge_row_key(scope, index)``: only that process writes them
(``counter_set`` / ``counter_add``), it zeroes them when it starts (a restarted worker
replaces the dead one's values), and a reader sums them over the indexes.
"""

from __future__ import annotations

import mmap
import os
import stat
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from zaiproxy.limits.segment import Segment

COUNTER: Final = "counter"
HISTOGRAM: Final = "histogram"
CELLS_PER_ROW: Final = 7  # words 1..7 of a row
SLOT_BYTES: Final = 256
KEY_MAX: Final = SLOT_BYTES - 2
META_KEY: Final = b"m\0#meta"
META_RESERVED: Final = 1  # word: rows reserved by series
META_DROPPED: Final = 2  # word: series refused (once per refusing process)
_SUM_MAX = 1 << 53  # one observation adds at most this to a sum cell


@dataclass(frozen=True, eq=False)  # identity hash: a cheap dict key on the hot path
class Family:
    """One metric family stored in the ledger.

    ``code`` is the family's id inside keys: short, fixed, never reused for another family
    (a renamed family keeps its code). ``name`` is the exposition name; counters are named
    without ``_total`` (prometheus-client adds it). Values and sums are exposed as the
    stored integer divided by ``scale``.
    """

    code: str
    name: str
    kind: str
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    scale: int = 1

    @property
    def rows(self) -> int:
        if self.kind == COUNTER:
            return 1
        return -(-(len(self.buckets) + 2) // CELLS_PER_ROW)

    def key(self, labels: tuple[str, ...], part: int) -> bytes:
        return b"\0".join((b"m", self.code.encode(), *(v.encode() for v in labels),
                           b"#%d" % part))


def names_offset(layout_size: int) -> int:
    """Where the names table starts in a segment file whose ledger layout is this long."""
    page = mmap.ALLOCATIONGRANULARITY
    return -(-layout_size // page) * page


class NamesFile:
    """The key of each series row, one ``SLOT_BYTES`` slot per ledger row (module docstring).

    ``path``: the segment file, whose ledger layout is ``layout_size`` bytes; None = an
    anonymous mapping (a private segment that only this process uses).
    """

    def __init__(self, path: str | None, rows: int, layout_size: int = 0) -> None:
        self.path = path
        self.rows = rows
        size = rows * SLOT_BYTES
        if path is None:
            self._mm = mmap.mmap(-1, size)
            return
        offset = names_offset(layout_size)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < layout_size:
                raise OSError(f"{path} is not a ledger segment of {layout_size} bytes")
            if st.st_size < offset + size:
                os.ftruncate(fd, offset + size)  # grown with zeros; never shrunk
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                 offset=offset)
        finally:
            os.close(fd)  # the mapping keeps the file

    def write(self, row: int, key: bytes) -> None:
        if len(key) > KEY_MAX or not 0 <= row < self.rows:
            raise ValueError("key or row out of range")
        off = row * SLOT_BYTES
        self._mm[off:off + 2 + len(key)] = len(key).to_bytes(2, "little") + key

    def read(self, row: int) -> bytes:
        off = row * SLOT_BYTES
        n = int.from_bytes(self._mm[off:off + 2], "little")
        if n == 0 or n > KEY_MAX:
            return b""
        return self._mm[off + 2:off + 2 + n]

    def close(self) -> None:
        self._mm.close()


# ---- writing --------------------------------------------------------------------------


class CounterCell:
    __slots__ = ("_add", "_row")

    def __init__(self, ledger: Segment, row: int) -> None:
        self._add = ledger.counter_add
        self._row = row

    def inc(self, n: int = 1) -> None:
        self._add(self._row, 1, n)

    def observe(self, value: float) -> None:
        raise TypeError("a counter has no observe()")


class HistogramCell:
    __slots__ = ("_add", "_bounds", "_cells", "_scale", "_sum")

    def __init__(self, ledger: Segment, rows: tuple[int, ...], family: Family) -> None:
        self._add = ledger.counter_add
        self._bounds = family.buckets
        cells = [(rows[j // CELLS_PER_ROW], 1 + j % CELLS_PER_ROW)
                 for j in range(len(family.buckets) + 2)]
        self._sum = cells.pop()
        self._cells = tuple(cells)
        self._scale = family.scale

    def observe(self, value: float) -> None:
        if not value > 0:  # 0, negative, NaN: the first bucket, nothing to the sum
            value = 0.0
        elif value > 1e15:  # and inf: the last bucket, a bounded addition to the sum
            value = 1e15
        row, word = self._cells[bisect_left(self._bounds, value)]
        add = self._add
        add(row, word, 1)
        n = round(value * self._scale)
        if n:
            add(self._sum[0], self._sum[1], n if n < _SUM_MAX else _SUM_MAX)

    def inc(self, n: int = 1) -> None:
        raise TypeError("a histogram has no inc()")


class DroppedCell:
    """What a series that did not fit is bound to: observations are discarded."""

    __slots__ = ()

    def inc(self, n: int = 1) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


DROPPED: Final = DroppedCell()
Cell = CounterCell | HistogramCell | DroppedCell


class SeriesStore:
    """Binds series to ledger rows for one process (the writer side)."""

    def __init__(self, ledger: Segment, names: NamesFile, budget: int,
                 ledger_full: type[Exception]) -> None:
        self.ledger = ledger
        self.names = names
        self.budget = budget
        self._full = ledger_full
        self.meta = ledger.row(META_KEY)

    def bind(self, family: Family, labels: tuple[str, ...]) -> Cell:
        """The cell of one series, claiming its rows on first use; DROPPED if it does not fit."""
        led = self.ledger
        if any("\0" in v for v in labels):
            return self._drop()
        keys = [family.key(labels, p) for p in range(family.rows)]
        if len(keys[-1]) > KEY_MAX:
            return self._drop()
        missing = sum(1 for k in keys if led.row_find(k) < 0)
        if missing and led.counter_add(self.meta, META_RESERVED, missing) > self.budget:
            led.counter_add(self.meta, META_RESERVED, -missing)
            return self._drop()
        try:
            rows = tuple(led.row(k) for k in keys)
        except self._full:  # the limits filled the table: their rows come first
            if missing:
                led.counter_add(self.meta, META_RESERVED, -missing)
            return self._drop()
        for row, key in zip(rows, keys, strict=True):
            self.names.write(row, key)
        if family.kind == COUNTER:
            return CounterCell(led, rows[0])
        return HistogramCell(led, rows, family)

    def _drop(self) -> DroppedCell:
        self.ledger.counter_add(self.meta, META_DROPPED, 1)
        return DROPPED

    def dropped(self) -> int:
        return int(self.ledger.counter_get(self.meta, META_DROPPED))

    def reserved(self) -> int:
        return int(self.ledger.counter_get(self.meta, META_RESERVED))


def gauge_row_key(scope: str, index: int) -> bytes:
    """The key of process ``index``'s own gauge row in ``scope`` (e.g. "w" for workers)."""
    return b"m\0#g\0%s\0%d" % (scope.encode(), index)


def claim_gauge_row(ledger: Segment, scope: str, index: int) -> int:
    """This process's gauge row, zeroed (it replaces whatever a dead predecessor left)."""
    row = int(ledger.row(gauge_row_key(scope, index)))
    for word in range(1, CELLS_PER_ROW + 1):
        ledger.counter_set(row, word, 0)
    return row


# ---- reading --------------------------------------------------------------------------

Series = dict[tuple[str, ...], tuple[int, ...]]  # label values -> the cells of its rows


class SeriesReader:
    """Enumerates every series in the segment (all processes') from the rows and the names."""

    def __init__(self, ledger: Segment, names: NamesFile, families: Iterable[Family],
                 stable_hash: Callable[[bytes], int]) -> None:
        self.ledger = ledger
        self.names = names
        self._by_code = {f.code.encode(): f for f in families}
        self._hash = stable_hash
        # row -> (its hash, its slot's bytes, what they parse to): rows never change keys.
        self._cache: dict[int, tuple[int, bytes, tuple[Family, tuple[str, ...], int] | None]] = {}
        self._gauge_rows: dict[bytes, int] = {}

    def _parse(self, key: bytes) -> tuple[Family, tuple[str, ...], int] | None:
        parts = key.split(b"\0")
        if len(parts) < 3 or parts[0] != b"m" or not parts[-1].startswith(b"#"):
            return None
        family = self._by_code.get(parts[1])
        labels = parts[2:-1]
        try:
            part = int(parts[-1][1:])
        except ValueError:
            return None
        if family is None or len(labels) != len(family.labels) or not 0 <= part < family.rows:
            return None
        return family, tuple(v.decode("utf-8", "replace") for v in labels), part

    def read(self) -> dict[Family, Series]:
        """Every complete series by family: ``CELLS_PER_ROW * rows`` cells each."""
        led = self.ledger
        names = self.names
        cache = self._cache
        found: dict[tuple[Family, tuple[str, ...]], list[tuple[int, ...] | None]] = {}
        for i in range(led.rows):
            h = led.row_hash(i)
            if not h:
                continue
            raw = names.read(i)
            if not raw:
                continue
            hit = cache.get(i)
            if hit is not None and hit[0] == h and hit[1] == raw:
                parsed = hit[2]
            else:
                parsed = self._parse(raw) if (self._hash(raw) or 1) == h else None
                cache[i] = (h, raw, parsed)
            if parsed is None:
                continue
            family, labels, part = parsed
            slots = found.get((family, labels))
            if slots is None:
                slots = found[(family, labels)] = [None] * family.rows
            slots[part] = led.row_counters(i)
        out: dict[Family, Series] = {}
        for (family, labels), slots in found.items():
            cells: list[int] = []
            for words in slots:
                if words is None:
                    break  # a part not named yet (being created right now): next scrape
                cells.extend(words)
            else:
                out.setdefault(family, {})[labels] = tuple(cells)
        return out

    def gauge_rows(self, scope: str, count: int) -> list[tuple[int, ...]]:
        """The words of the gauge rows of processes 0..count-1 that exist."""
        led = self.ledger
        out = []
        for index in range(count):
            key = gauge_row_key(scope, index)
            row = self._gauge_rows.get(key)
            if row is None:
                row = led.row_find(key)
                if row < 0:
                    continue
                self._gauge_rows[key] = row
            out.append(led.row_counters(row))
        return out


def histogram_values(family: Family, cells: tuple[int, ...]
                     ) -> tuple[list[int], int, float]:
    """(cumulative counts for each bound then +Inf, count, sum) from a histogram's cells."""
    b = len(family.buckets)
    cumulative = []
    total = 0
    for j in range(b + 1):
        total += cells[j]
        cumulative.append(total)
    return cumulative, total, cells[b + 1] / family.scale
