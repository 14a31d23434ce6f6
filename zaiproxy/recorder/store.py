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
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import duckdb

from zaiproxy.pricing import PriceTable
from zaiproxy.recorder.schema import (
    REQUESTS_COLUMNS,
    SCHEMA_VERSION,
    SchemaError,
    current_version,
    migrate,
)
from zaiproxy.recorder.wire import MAX_ERROR_CHARS, ROW_FIELDS
from zaiproxy.usage import Usage

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
(W_TS, W_ID, W_METHOD, W_ROUTE, W_STATUS, W_DURATION, W_BYTES_IN, W_BYTES_OUT, W_MODEL,
 W_STREAM, W_UP_STATUS, W_UP_TTFB, W_RESULT, W_RETRIED, W_IN, W_OUT, W_CACHE_READ,
 W_CACHE_WRITE, W_ESTIMATED, W_PROMPT, W_KEY, W_RETRIES, W_ZAI_CLASS, W_ZAI_CODE, W_ERROR,
 W_TTFT, W_UPSTREAM, W_QUEUE, W_TOKEN_COUNT) = range(len(ROW_FIELDS))
# OpenAI-style usage counts cached tokens inside the input (metrics.py does the same split).
_ANTHROPIC_ROUTES: Final = ("/v1/messages", "/api/anthropic")


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
    model, route = _str(w[W_MODEL]), _str(w[W_ROUTE])
    cost = None
    if prices is not None and tokens[0] is not None:
        usage = Usage(*(n or 0 for n in tokens))
        cost = prices.cost(model, usage, ts, input_includes_cache=not (route or "").startswith(
            _ANTHROPIC_ROUTES))
    return (
        dt.datetime.fromtimestamp(ts, UTC), variant, worker,
        _str(w[W_ID]), _str(w[W_METHOD]), route, model, _str(w[W_KEY]), _bool(w[W_STREAM]),
        status, _int(w[W_UP_STATUS]), _str(w[W_RESULT]), _str(w[W_ZAI_CLASS]),
        _str(w[W_ZAI_CODE]), _str(w[W_ERROR], MAX_ERROR_CHARS),
        latency, _ms(w[W_TTFT]), _ms(w[W_UP_TTFB]), upstream,
        latency - upstream if latency is not None and upstream is not None else None,
        _ms(w[W_QUEUE]), _ms(w[W_TOKEN_COUNT]),
        *tokens, _bool(w[W_ESTIMATED]), _int(w[W_PROMPT]),
        _int(w[W_BYTES_IN]), _int(w[W_BYTES_OUT]), cost, _int(w[W_RETRIES]),
        _bool(w[W_RETRIED]),
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
    busy_ms: float = 0.0  # request time finished since the last snapshot (for in_flight)


class HistoryStore:
    """One open history file (the only writer), or a read-only view of one."""

    def __init__(self, con: duckdb.DuckDBPyConnection, *, variant: str = "production",
                 raw_days: float = 7.0, rollup_days: float = 90.0,
                 read_only: bool = False, opened_at: float | None = None) -> None:
        self.con = con
        self.raw_days = raw_days
        self.rollup_days = rollup_days
        self.read_only = read_only
        self.rows_written = 0
        self.dirty_minutes: set[float] = set()
        self.totals: dict[str, Totals] = {}
        # The start of the first snapshot's interval (in_flight needs one).
        self.last_snapshot: float | None = opened_at
        self.rolled_until: float | None = None
        if not read_only:
            self.rolled_until = self._state("rolled_until")
            self._load_totals()
            self.totals.setdefault(variant, Totals())

    @classmethod
    def open(cls, path: str, *, read_only: bool = False, **kwargs: Any) -> HistoryStore:
        """Open (and migrate) a history file; raises duckdb.Error / OSError / SchemaError."""
        con = duckdb.connect(path, read_only=read_only)
        try:
            if read_only:
                version = current_version(con)
                if version != SCHEMA_VERSION:
                    raise SchemaError(f"{path}: schema version {version}, this zaiproxy reads "
                                      f"{SCHEMA_VERSION}" + (" (not a history file?)"
                                                             if version == 0 else ""))
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
        con = self.con
        if rows:
            con.begin()
            try:
                with con.appender("requests") as app:
                    app.append_rows(rows)
                con.commit()
            except BaseException:
                con.rollback()
                raise
        self.rows_written += len(rows)
        totals = self.totals
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
                    self.dirty_minutes.add(ts - ts % 60)
        for variant, count in (dropped or {}).items():
            totals.setdefault(variant, Totals()).dropped += count

    def snapshot(self, now: float) -> int:
        """One ``snapshots`` row per variant; returns how many were written."""
        interval = now - self.last_snapshot if self.last_snapshot is not None else None
        rows = []
        when = dt.datetime.fromtimestamp(now, UTC)
        for variant, t in sorted(self.totals.items()):
            in_flight = t.busy_ms / 1000.0 / interval if interval else 0.0
            rows.append((when, variant, t.requests, t.errors, t.input_tokens, t.output_tokens,
                         t.cache_read_tokens, t.cache_write_tokens, in_flight, t.dropped))
        self.con.executemany("INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        for t in self.totals.values():
            t.busy_ms = 0.0
        self.last_snapshot = now
        return len(rows)

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

    def enforce_retention(self, now: float) -> tuple[int, int, int]:
        """Delete raw rows and snapshots past ``raw_days``, rollups past ``rollup_days``."""
        con = self.con
        raw_cutoff = now - self.raw_days * DAY
        rollup_cutoff = now - self.rollup_days * DAY
        counts = []
        for sql, cutoff in (
            ("DELETE FROM requests WHERE ts < to_timestamp(?)", raw_cutoff),
            ("DELETE FROM snapshots WHERE ts < to_timestamp(?)", raw_cutoff),
            ("DELETE FROM requests_1m WHERE minute < to_timestamp(?)", rollup_cutoff),
        ):
            row = con.execute(sql, [cutoff]).fetchone()
            counts.append(int(row[0]) if row else 0)
        return counts[0], counts[1], counts[2]

    def maintain(self, now: float) -> tuple[int, tuple[int, int, int]]:
        """Rollup, then retention (never the other way round)."""
        return self.rollup(now), self.enforce_retention(now)

    # ---- state -------------------------------------------------------------------

    def _state(self, name: str) -> float | None:
        row = self.con.execute("SELECT value FROM recorder_state WHERE name = ?", [name]).fetchone()
        return float(row[0]) if row else None

    def _set_state(self, name: str, value: float) -> None:
        self.con.execute("INSERT OR REPLACE INTO recorder_state VALUES (?, ?)", [name, value])

    def _load_totals(self) -> None:
        """Continue the running totals from the file's last snapshot of each variant."""
        for row in self.con.execute("""
            SELECT variant, requests_total, errors_total, input_tokens_total,
                   output_tokens_total, cache_read_tokens_total, cache_write_tokens_total,
                   dropped_total
            FROM snapshots
            QUALIFY row_number() OVER (PARTITION BY variant ORDER BY ts DESC) = 1
        """).fetchall():
            self.totals[row[0]] = Totals(
                requests=row[1], errors=row[2], input_tokens=row[3], output_tokens=row[4],
                cache_read_tokens=row[5], cache_write_tokens=row[6], dropped=row[7])
