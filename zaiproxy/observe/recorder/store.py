"""The history file: batched inserts, snapshots, 1-minute rollups, retention.

Synchronous and single-threaded by design: the recorder calls it from one
worker thread (DuckDB calls block), tests call it directly. Time is always
passed in (``now``, epoch seconds), never read here, so retention and rollups are
tested on a fake clock with exact counts.

Rollups: :meth:`HistoryStore.rollup` turns the raw rows of every closed minute
(ended more than :data:`ROLLUP_GRACE` seconds ago) into ``requests_1m`` rows, and
remembers how far it got (``recorder_state.rolled_until``). A row that arrives
for a minute already rolled (a worker's batch late by more than the grace)
marks that minute dirty and it is rolled again, so a rollup always equals its
raw rows. Retention runs after the rollup, so a raw row is never deleted before
its minute has been rolled.

Sequence accounting (:mod:`zaiproxy.observe.recorder.sequence`): :meth:`HistoryStore.write_chunks`
settles a run of datagrams against ``progress`` (per worker incarnation, loaded at
open) and writes the rows, the sources' new progress and the running totals in
one transaction. So what the file says it has is exactly what it has, whenever
the recorder is killed: the next one skips rows the file already holds and counts
the rows nobody wrote.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import duckdb

from zaiproxy.core.pricing import PriceTable
from zaiproxy.core.record import Usage, input_includes_cache
from zaiproxy.observe.recorder.schema import (
    PROGRESS_COLUMNS,
    REQUESTS_COLUMNS,
    SCHEMA_VERSION,
    SNAPSHOT_COLUMNS,
    TOTALS_COLUMNS,
    ZAI_QUOTA_COLUMNS,
    SchemaError,
    connect,
    current_version,
    migrate,
)
from zaiproxy.observe.recorder.sequence import Chunk, Progress, Settlement, SourceKey, settle
from zaiproxy.observe.recorder.wire import MAX_ERROR_CHARS, ROW_FIELDS

if TYPE_CHECKING:
    from zaiproxy.observe.recorder.quota import QuotaRow

DAY: Final = 86400.0
ROLLUP_GRACE: Final = 5.0  # seconds after a minute ends before it is rolled
UTC: Final = dt.UTC
# What counts as an error in rollups, snapshots and summaries: the proxy or the upstream
# failed. 4xx (including 429, limits working as intended) are the client's business and
# are visible per status.
ERROR_SQL: Final = "(status >= 500 OR result IN ('upstream_cut', 'upstream_idle_timeout'))"
_ERROR_RESULTS: Final = frozenset({"upstream_cut", "upstream_idle_timeout"})

DbRow = tuple[Any, ...]


class BadRow(ValueError):
    """A wire row whose values have the wrong types."""


def _int(v: object) -> int | None:
    if v is None or type(v) is int:
        return v
    raise BadRow(f"expected an integer, got {type(v).__name__}")


def _ms(v: object) -> float | None:
    """Seconds on the wire, milliseconds in the file."""
    if v is None:
        return None
    if type(v) is float or type(v) is int:
        return v * 1000.0
    raise BadRow(f"expected a number, got {type(v).__name__}")


def _str(v: object, limit: int = 256) -> str | None:
    if v is None:
        return None
    if type(v) is str:
        return v if len(v) <= limit else v[:limit]
    raise BadRow(f"expected a string, got {type(v).__name__}")


def _bool(v: object) -> bool | None:
    if v is None or type(v) is bool:
        return v
    raise BadRow(f"expected a boolean, got {type(v).__name__}")


# Wire row positions, in wire.ROW_FIELDS order (a count mismatch fails at import).
(W_TS, W_ID, W_METHOD, W_ROUTE, W_API, W_STATUS, W_DURATION, W_BYTES_IN, W_BYTES_OUT, W_MODEL,
 W_STREAM, W_UP_STATUS, W_UP_TTFB, W_RESULT, W_RETRIED, W_IN, W_OUT, W_CACHE_READ,
 W_CACHE_WRITE, W_ESTIMATED, W_PROMPT, W_KEY, W_RETRIES, W_ZAI_CLASS, W_ZAI_CODE, W_ERROR,
 W_TTFT, W_UPSTREAM, W_QUEUE, W_TOKEN_COUNT, W_REQUESTED_MODEL,
 W_UPSTREAM_KEY) = range(len(ROW_FIELDS))


def db_row(variant: str, worker: int, w: Sequence[Any],
           prices: PriceTable | None = None) -> DbRow:
    """A ``requests`` row (schema.REQUESTS_COLUMNS order) from a wire row (wire.ROW_FIELDS).

    Every value's type is checked (:class:`BadRow`), so nothing malformed reaches the
    appender, whose failure would take the whole batch with it. ``prices``: fill ``cost_usd``.
    """
    ts = w[W_TS]
    if (type(ts) is not float and type(ts) is not int) or not math.isfinite(ts):
        raise BadRow("bad timestamp")
    status = w[W_STATUS]
    if type(status) is not int:
        raise BadRow("bad status")
    latency, upstream = _ms(w[W_DURATION]), _ms(w[W_UPSTREAM])
    tokens = (_int(w[W_IN]), _int(w[W_OUT]), _int(w[W_CACHE_READ]), _int(w[W_CACHE_WRITE]))
    model, api = _str(w[W_MODEL]), _str(w[W_API], 16)
    cost = None
    if prices is not None and tokens[0] is not None:
        usage = Usage(*(n or 0 for n in tokens))
        cost = prices.cost(model, usage, ts, input_includes_cache=input_includes_cache(api))
    return (
        dt.datetime.fromtimestamp(ts, UTC), variant, worker,
        _str(w[W_ID]), _str(w[W_METHOD]), _str(w[W_ROUTE]), model, _str(w[W_KEY]),
        _bool(w[W_STREAM]), status, _int(w[W_UP_STATUS]), _str(w[W_RESULT]), _str(w[W_ZAI_CLASS]),
        _str(w[W_ZAI_CODE]), _str(w[W_ERROR], MAX_ERROR_CHARS),
        latency, _ms(w[W_TTFT]), _ms(w[W_UP_TTFB]), upstream,
        latency - upstream if latency is not None and upstream is not None else None,
        _ms(w[W_QUEUE]), _ms(w[W_TOKEN_COUNT]),
        *tokens, _bool(w[W_ESTIMATED]), _int(w[W_PROMPT]),
        _int(w[W_BYTES_IN]), _int(w[W_BYTES_OUT]), cost, _int(w[W_RETRIES]),
        _bool(w[W_RETRIED]), api, _str(w[W_REQUESTED_MODEL]), _str(w[W_UPSTREAM_KEY], 64),
    )


# Positions in a DbRow that the totals read.
_C: Final = {name: i for i, (name, _) in enumerate(REQUESTS_COLUMNS)}
_TS, _VARIANT, _STATUS, _RESULT, _LATENCY = (
    _C["ts"], _C["variant"], _C["status"], _C["result"], _C["latency_ms"])
_IN, _OUT, _CR, _CW = (_C["input_tokens"], _C["output_tokens"], _C["cache_read_tokens"],
                       _C["cache_write_tokens"])


@dataclass
class Totals:
    """One variant's running totals, as written to ``snapshots``."""

    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    dropped: int = 0
    lost: int = 0
    busy_ms: float = 0.0  # request time finished since the last snapshot (for in_flight)

    def copy(self) -> Totals:
        return dataclasses.replace(self)

    def persisted(self, txn: int, variant: str) -> tuple[Any, ...]:
        """A ``recorder_totals`` row (schema.TOTALS_COLUMNS order)."""
        return (txn, variant, self.requests, self.errors, self.input_tokens, self.output_tokens,
                self.cache_read_tokens, self.cache_write_tokens, self.dropped, self.lost)


def _values(columns: Sequence[tuple[str, str]], rows: int = 1) -> str:
    one = f"({', '.join('?' * len(columns))})"
    return ", ".join([one] * rows)


def _insert_many(con: duckdb.DuckDBPyConnection, table: str,
                 columns: Sequence[tuple[str, str]], rows: Sequence[tuple[Any, ...]]) -> None:
    """One INSERT of a few rows (executemany runs one statement per row: ~2 ms each)."""
    con.execute(f"INSERT INTO {table} VALUES {_values(columns, len(rows))}",
                [v for row in rows for v in row])


_SNAPSHOT_SQL: Final = f"INSERT INTO snapshots VALUES {_values(SNAPSHOT_COLUMNS)}"


class HistoryStore:
    """One open history file (the only writer), or a read-only view of one."""

    def __init__(self, con: duckdb.DuckDBPyConnection, *, variant: str = "production",
                 raw_days: float = 7.0, rollup_days: float = 90.0,
                 read_only: bool = False, opened_at: float | None = None,
                 run: str | None = None, version: int = SCHEMA_VERSION) -> None:
        """``run``: the channel's id (recorder/supervise.py); the progress of other runs is
        deleted (their workers cannot send again). None: keep and load all (tools, tests)."""
        self.con = con
        self.run = run
        self.version = version  # the file's schema version (older only when read-only)
        self.raw_days = raw_days
        self.rollup_days = rollup_days
        self.read_only = read_only
        self.rows_written = 0
        self.dirty_minutes: set[float] = set()
        self.totals: dict[str, Totals] = {}
        # The start of the first snapshot's interval (in_flight needs one).
        self.last_snapshot: float | None = opened_at
        self.rolled_until: float | None = None
        # Per worker incarnation: how far its rows are accounted for. Replaced (never
        # mutated) on each commit, so another thread may read it between transactions.
        self.progress: dict[SourceKey, Progress] = {}
        self.txn = 0  # the last transaction's number (the progress and totals logs' order)
        if not read_only:
            self.rolled_until = self._state("rolled_until")
            self._load_totals()
            self.totals.setdefault(variant, Totals())
            self._load_progress()

    @classmethod
    def open(cls, path: str, *, read_only: bool = False, **kwargs: Any) -> HistoryStore:
        """Open (and migrate) a history file; raises duckdb.Error / OSError / SchemaError."""
        con = connect(path, read_only=read_only)
        try:
            if read_only:
                # An older file is read as it is (nothing may migrate it read-only): v2 only
                # added the recorder's own bookkeeping, v3 a column no query needs and the
                # deletion of control routes' rows, which queries.py leaves out by route there,
                # v4 and v5 columns no query needs (requested_model, upstream), v6 a table
                # (zai_quota) the summary reads only from a file that has it.
                version = current_version(con)
                if not 1 <= version <= SCHEMA_VERSION:
                    raise SchemaError(f"{path}: schema version {version}, this zaiproxy reads "
                                      f"1 to {SCHEMA_VERSION}" + (" (not a history file?)"
                                                                  if version == 0 else ""))
                kwargs.setdefault("version", version)
            else:
                migrate(con)
            return cls(con, read_only=read_only, **kwargs)
        except BaseException:
            con.close()
            raise

    def close(self) -> None:
        if not self.read_only:
            try:
                self.con.execute("CHECKPOINT")
            except duckdb.Error:
                pass  # closing still writes what the WAL holds
        self.con.close()

    # ---- writes ----------------------------------------------------------------

    def write(self, rows: Sequence[DbRow], dropped: dict[str, int] | None = None) -> None:
        """Insert rows in one transaction (all or none) and count them into the totals."""
        self._commit(rows, dropped or {}, {}, {}, {}, 0.0)

    def write_chunks(self, chunks: Sequence[Chunk], now: float, *,
                     keep_rows: bool = True) -> Settlement:
        """Settle ``chunks`` (channel order) against ``progress`` and write the result in one
        transaction: the rows not in the file yet, the sources' progress, the totals (with
        the rows the workers dropped and the rows lost in a recorder that died). Nothing is
        written when there is nothing new (heartbeats, a replay). ``keep_rows=False``: the
        rows were refused as data; account for them, write none.
        """
        s = settle(chunks, self.progress)
        if not s.empty:
            self._commit(s.rows if keep_rows else [], s.worker_dropped, s.lost, s.progress,
                         s.variants, now)
        return s

    def _commit(self, rows: Sequence[DbRow], dropped: dict[str, int], lost: dict[str, int],
                progress: dict[SourceKey, Progress], variants: dict[SourceKey, str],
                now: float) -> None:
        totals = {v: t.copy() for v, t in self.totals.items()}
        dirty: set[float] = set()
        rolled = self.rolled_until
        for row in rows:
            t = totals.get(row[_VARIANT])
            if t is None:
                t = totals[row[_VARIANT]] = Totals()
            t.requests += 1
            status = row[_STATUS]
            if status >= 500 or row[_RESULT] in _ERROR_RESULTS:
                t.errors += 1
            t.input_tokens += row[_IN] or 0
            t.output_tokens += row[_OUT] or 0
            t.cache_read_tokens += row[_CR] or 0
            t.cache_write_tokens += row[_CW] or 0
            t.busy_ms += row[_LATENCY] or 0.0
            if rolled is not None:
                ts = row[_TS].timestamp()
                if ts < rolled:
                    dirty.add(ts - ts % 60)
        for variant, count in dropped.items():
            totals.setdefault(variant, Totals()).dropped += count
        for variant, count in lost.items():
            totals.setdefault(variant, Totals()).lost += count
        touched = {row[_VARIANT] for row in rows} | dropped.keys() | lost.keys()
        if not touched and not progress:
            return
        con = self.con
        con.begin()
        try:
            if rows:
                with con.appender("requests") as app:
                    app.append_rows(rows)
            txn = self.txn + 1
            if progress:
                when = dt.datetime.fromtimestamp(now, UTC)
                _insert_many(con, "recorder_progress", PROGRESS_COLUMNS, [
                    (txn, src[0], src[1], src[2], self.run or "", variants.get(src, ""), p.next,
                     p.dropped, p.lost, when) for src, p in progress.items()])
            if touched:
                _insert_many(con, "recorder_totals", TOTALS_COLUMNS,
                             [totals[v].persisted(txn, v) for v in sorted(touched)])
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self.txn = txn
        self.rows_written += len(rows)
        self.totals = totals
        self.dirty_minutes |= dirty
        if progress:
            self.progress = {**self.progress, **progress}

    def snapshot(self, now: float) -> int:
        """One ``snapshots`` row per variant; returns how many were written."""
        interval = now - self.last_snapshot if self.last_snapshot is not None else None
        rows = []
        when = dt.datetime.fromtimestamp(now, UTC)
        for variant, t in sorted(self.totals.items()):
            in_flight = t.busy_ms / 1000.0 / interval if interval else 0.0
            rows.append((when, variant, t.requests, t.errors, t.input_tokens, t.output_tokens,
                         t.cache_read_tokens, t.cache_write_tokens, in_flight, t.dropped, t.lost))
        self.con.executemany(_SNAPSHOT_SQL, rows)
        for t in self.totals.values():
            t.busy_ms = 0.0
        self.last_snapshot = now
        return len(rows)

    def write_zai_quota(self, variant: str, rows: Sequence[QuotaRow]) -> int:
        """Insert Z.AI quota rows (recorder/quota.py) in one transaction; returns how many.

        A sample the file already has (same variant, upstream key and time) is skipped: a
        recorder started again under the same poller reads that key's last sample again.
        """
        if not rows:
            return 0
        con = self.con
        con.begin()
        try:
            known: dict[tuple[str, float], bool] = {}
            fresh = []
            for r in rows:
                when = dt.datetime.fromtimestamp(r.ts, UTC)
                if (r.upstream, r.ts) not in known:
                    found = con.execute(
                        "SELECT count(*) FROM zai_quota WHERE variant = ? AND upstream = ? "
                        "AND ts = ?", [variant, r.upstream, when]).fetchone()
                    known[(r.upstream, r.ts)] = bool(found and found[0])
                if not known[(r.upstream, r.ts)]:
                    fresh.append((when, variant, r.upstream, r.window, r.limit_type,
                                  r.used_fraction,
                                  None if r.reset_at is None
                                  else dt.datetime.fromtimestamp(r.reset_at, UTC),
                                  r.plan_tier, r.local_used_fraction))
            if fresh:
                _insert_many(con, "zai_quota", ZAI_QUOTA_COLUMNS, fresh)
            con.commit()
        except BaseException:
            con.rollback()
            raise
        return len(fresh)

    def rollup(self, now: float) -> int:
        """Roll every closed minute not rolled yet, and dirty ones; returns minutes rolled."""
        con = self.con
        target = math.floor((now - ROLLUP_GRACE) / 60) * 60.0
        start = self.rolled_until
        if start is None:
            first = con.execute("SELECT epoch(min(ts)) FROM requests").fetchone()
            start = math.floor(first[0] / 60) * 60.0 if first and first[0] is not None else target
        raw_cutoff = now - self.raw_days * DAY
        # A dirty minute whose raw rows retention already took cannot be rolled again.
        dirty = sorted(m for m in self.dirty_minutes if m < start and m >= raw_cutoff)
        spans = [(m, m + 60.0) for m in dirty]
        if target > start:
            spans.append((start, target))
        if not spans and self.rolled_until == target:
            return 0
        con.begin()
        try:
            for lo, hi in spans:
                self._roll(lo, hi)
            self._set_state("rolled_until", max(target, start))
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self.dirty_minutes.clear()
        self.rolled_until = max(target, start)
        return len(dirty) + (int((target - start) // 60) if target > start else 0)

    def _roll(self, lo: float, hi: float) -> None:
        self.con.execute(
            "DELETE FROM requests_1m WHERE minute >= to_timestamp(?) AND minute < to_timestamp(?)",
            [lo, hi])
        self.con.execute(f"""
            INSERT INTO requests_1m  -- schema.ROLLUP_COLUMNS order; GROUP BY: ROLLUP_KEY
            SELECT time_bucket(INTERVAL 1 minute, ts) AS minute, variant,
                   coalesce(route, ''), coalesce(model, ''), coalesce(key_alias, ''),
                   coalesce(status, 0) AS status,
                   (coalesce(status, 0) // 100)::VARCHAR || 'xx' AS status_class,
                   count(*), count(*) FILTER (WHERE {ERROR_SQL}),
                   coalesce(sum(latency_ms), 0), coalesce(max(latency_ms), 0),
                   coalesce(quantile_cont(latency_ms, 0.95), 0),
                   coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),
                   coalesce(sum(cache_read_tokens), 0), coalesce(sum(cache_write_tokens), 0),
                   coalesce(sum(cost_usd), 0)
            FROM requests
            WHERE ts >= to_timestamp(?) AND ts < to_timestamp(?)
            GROUP BY 1, 2, 3, 4, 5, 6, 7
            ORDER BY 1, 2, 3, 4, 5, 6
        """, [lo, hi])

    def enforce_retention(self, now: float) -> tuple[int, int, int, int]:
        """Delete raw rows, snapshots and Z.AI quota samples past ``raw_days``, rollups past
        ``rollup_days``; returns how many of each (requests, snapshots, rollups, zai_quota)."""
        con = self.con
        raw_cutoff = now - self.raw_days * DAY
        rollup_cutoff = now - self.rollup_days * DAY
        counts = []
        for sql, cutoff in (
            ("DELETE FROM requests WHERE ts < to_timestamp(?)", raw_cutoff),
            ("DELETE FROM snapshots WHERE ts < to_timestamp(?)", raw_cutoff),
            ("DELETE FROM requests_1m WHERE minute < to_timestamp(?)", rollup_cutoff),
            ("DELETE FROM zai_quota WHERE ts < to_timestamp(?)", raw_cutoff),
        ):
            row = con.execute(sql, [cutoff]).fetchone()
            counts.append(int(row[0]) if row else 0)
        return counts[0], counts[1], counts[2], counts[3]

    def maintain(self, now: float) -> tuple[int, tuple[int, int, int, int]]:
        """Rollup, then retention (never the other way round); the logs compacted."""
        rolled = self.rollup(now)
        retention = self.enforce_retention(now)
        self.compact()
        return rolled, retention

    def compact(self) -> int:
        """Delete the progress and totals rows that newer ones replace; returns how many."""
        deleted = 0
        for table, key in (("recorder_progress", "run, worker, pid, nonce"),
                           ("recorder_totals", "variant")):
            row = self.con.execute(
                f"DELETE FROM {table} WHERE rowid NOT IN "
                f"(SELECT arg_max(rowid, txn) FROM {table} GROUP BY {key})").fetchone()
            deleted += int(row[0]) if row else 0
        return deleted

    # ---- state -------------------------------------------------------------------

    def _state(self, name: str) -> float | None:
        row = self.con.execute("SELECT value FROM recorder_state WHERE name = ?", [name]).fetchone()
        return float(row[0]) if row else None

    def _set_state(self, name: str, value: float) -> None:
        self.con.execute("INSERT OR REPLACE INTO recorder_state VALUES (?, ?)", [name, value])

    def _load_totals(self) -> None:
        """Continue the running totals from the last transaction (schema v2 keeps them)."""
        for row in self.con.execute("""
            SELECT * EXCLUDE (txn) FROM recorder_totals
            QUALIFY row_number() OVER (PARTITION BY variant ORDER BY txn DESC) = 1
        """).fetchall():
            self.totals[row[0]] = Totals(*row[1:])
        found = self.con.execute(
            "SELECT greatest((SELECT max(txn) FROM recorder_totals), "
            "(SELECT max(txn) FROM recorder_progress))").fetchone()
        self.txn = int(found[0]) if found and found[0] is not None else 0

    def _load_progress(self) -> None:
        where = ""
        if self.run is not None:
            self.con.execute("DELETE FROM recorder_progress WHERE run <> ?", [self.run])
            where = "WHERE run = $run"
        found = self.con.execute(f"""
            SELECT worker, pid, nonce, next_seq, dropped, lost FROM recorder_progress {where}
            QUALIFY row_number() OVER (PARTITION BY worker, pid, nonce ORDER BY txn DESC) = 1
        """, {"run": self.run} if where else None).fetchall()
        self.progress = {(w, pid, nonce): Progress(n, d, lost)
                         for w, pid, nonce, n, d, lost in found}
