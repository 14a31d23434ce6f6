"""The fleet collector's DuckDB store: one ``snapshots`` row per scrape, target and variant.

Runs only in the collector's DuckDB thread (``trio.to_thread`` with one limiter). Rows hold
each interval's counter *increases* (plus gauges, quantiles and bucket increases), so they
add up across targets and time buckets; history sums them in DuckDB and reuses
``snapshot.combine`` so history and status share one arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import duckdb

from zaiproxy.observe import snapshot
from zaiproxy.observe.recorder.schema import connect
from zaiproxy.observe.snapshot import COUNT_NAMES, Counts, Histogram, Rates

T = TypeVar("T")


# ---- storage (runs in the DuckDB thread only) -----------------------------------

_SCALARS = (*COUNT_NAMES, "in_flight", "streams_in_flight", "adaptive_rate")
_QUANTILE_COLS = tuple(f"{h}_p{round(q * 100)}" for h in ("latency", "ttft")
                       for q in snapshot.QUANTILES)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS snapshots (ts DOUBLE NOT NULL, target VARCHAR NOT NULL, "
    "variant VARCHAR NOT NULL, seconds DOUBLE NOT NULL, reset BOOLEAN NOT NULL, "
    + "".join(f"{c} DOUBLE NOT NULL, " for c in _SCALARS)
    + "".join(f"{c} DOUBLE, " for c in _QUANTILE_COLS)
    + "latency_bounds DOUBLE[], latency_counts DOUBLE[], ttft_bounds DOUBLE[], "
    "ttft_counts DOUBLE[], versions VARCHAR)")
# Counters added after the first schema: a file written by an older collector gets the
# column on open (old rows read 0). DuckDB cannot add a NOT NULL column IF NOT EXISTS;
# every insert names the column, so no NULL is ever written.
_ADDED_COUNTS = ("usage_missing", "retries")
_MIGRATIONS = tuple(f"ALTER TABLE snapshots ADD COLUMN IF NOT EXISTS {c} DOUBLE DEFAULT 0"
                    for c in _ADDED_COUNTS)
_COLUMNS = ("ts", "target", "variant", "seconds", "reset", *_SCALARS, *_QUANTILE_COLS,
            "latency_bounds", "latency_counts", "ttft_bounds", "ttft_counts", "versions")
_INSERT = (f"INSERT INTO snapshots ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(_COLUMNS))})")


def row_of(ts: float, target: str, r: Rates) -> tuple[Any, ...]:
    """One ``snapshots`` row: a target's variant over one interval (increases, not rates)."""
    quantiles = [h.quantile(q) for h in (r.latency, r.ttft) for q in snapshot.QUANTILES]
    return (ts, target, r.variant, r.seconds, r.reset,
            *(getattr(r.increase, n) for n in COUNT_NAMES),
            r.in_flight, r.streams_in_flight, r.adaptive_rate, *quantiles,
            list(r.latency.bounds), list(r.latency.counts), list(r.ttft.bounds),
            list(r.ttft.counts), ",".join(r.versions))


class Store:
    """The collector's DuckDB file. Not thread-safe: ``Collector._db`` serialises calls."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.con: duckdb.DuckDBPyConnection | None = None

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self.con is None:
            con = connect(self.path)  # the history's storage format: the stock CLI reads it
            try:
                con.execute(_SCHEMA)
                for migration in _MIGRATIONS:
                    con.execute(migration)
            except BaseException:
                con.close()
                raise
            self.con = con
        return self.con

    def _run(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        try:
            return fn(self._connect())
        except duckdb.Error:
            self.close()  # reopened on the next call (a failed write can invalidate it)
            raise

    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read-only SQL statement (diagnostics; run it through the collector's
        ``storage_call`` so it shares the DuckDB thread)."""
        return self._run(lambda con: con.execute(sql, params).fetchall())

    def insert(self, rows: list[tuple[Any, ...]]) -> None:
        self._run(lambda con: con.executemany(_INSERT, rows))

    def prune(self, before: float) -> None:
        self._run(lambda con: con.execute("DELETE FROM snapshots WHERE ts < ?", [before]))

    def history(self, since: float, step: float, variant: str) -> dict[str, list[dict[str, Any]]]:
        """Per variant, one point per ``step`` bucket: rates summed over targets."""
        return self._run(lambda con: _history(con, since, step, variant))

    def close(self) -> None:
        con, self.con = self.con, None
        if con is not None:
            con.close()


def _history(con: duckdb.DuckDBPyConnection, since: float, step: float,
             variant: str) -> dict[str, list[dict[str, Any]]]:
    where = "ts >= ? AND (? = 'all' OR variant = ?)"
    args = [step, since, variant, variant]
    key = "CAST(floor(ts / ?) AS BIGINT) AS k, variant, target"
    sums = ", ".join(f"sum({c})" for c in COUNT_NAMES)
    gauges = "avg(in_flight), avg(streams_in_flight), avg(adaptive_rate)"
    per: dict[tuple[int, str, str], Rates] = {}
    for k, v, t, seconds, reset, *vals in con.execute(
            f"SELECT {key}, sum(seconds), bool_or(reset), {sums}, {gauges} FROM snapshots "
            f"WHERE {where} GROUP BY ALL", args).fetchall():
        n = len(COUNT_NAMES)
        per[(k, v, t)] = Rates(variant=v, seconds=seconds, reset=reset,
                               increase=Counts(*vals[:n]), in_flight=vals[n],
                               streams_in_flight=vals[n + 1], adaptive_rate=vals[n + 2])
    for hist in ("latency", "ttft"):
        # Bucket increases summed element-wise (grouped by layout; ``plus`` merges layouts).
        rows = con.execute(
            f"WITH x AS (SELECT {key}, {hist}_bounds AS b, unnest({hist}_counts) AS c, "
            f"generate_subscripts({hist}_counts, 1) AS i FROM snapshots WHERE {where}) "
            "SELECT k, variant, target, b, list(c ORDER BY i) FROM "
            "(SELECT k, variant, target, b, i, sum(c) AS c FROM x GROUP BY ALL) "
            "GROUP BY k, variant, target, b", args).fetchall()
        for k, v, t, bounds, counts in rows:
            r = per.get((k, v, t))
            if r is not None:
                h = getattr(r, hist).plus(Histogram(tuple(bounds), tuple(counts)))
                per[(k, v, t)] = replace(r, **{hist: h})
    grouped: dict[tuple[int, str], list[Rates]] = {}
    for (k, v, _), r in per.items():
        grouped.setdefault((k, v), []).append(r)
    out: dict[str, list[dict[str, Any]]] = {}
    for (k, v), items in sorted(grouped.items()):
        point = snapshot.combine(v, items).to_json()
        # ``seconds``: the time the bucket's rates were measured over (the first and the
        # current bucket are partial), so a reader's rate x seconds is the bucket's increase.
        for name in ("variant", "versions", "requests"):
            point.pop(name, None)
        out.setdefault(v, []).append({"t": k * step, "targets": len(items), **point})
    return out
