"""The fleet collector's DuckDB store: one ``snapshots`` row per scrape, target and variant.

Runs only in the collector's DuckDB thread (``trio.to_thread`` with one limiter). Rows hold
each interval's counter *increases* (plus gauges, quantiles and bucket increases), so they
add up across targets and time buckets; history sums them in DuckDB and reuses
``snapshot.combine`` so history and status share one arithmetic.

:func:`read_summary` is the other reader: ``zaiproxy history --db`` on a collector's file
opened read-only by another process (the collector stopped: it holds the file while it runs),
summing the same rows with the same function (:func:`_rates`). The tables are documented in
``zaiproxy/observe/recorder/README.md`` ("Collector database").
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

import duckdb

from zaiproxy.observe import snapshot
from zaiproxy.observe.recorder.schema import SchemaError, connect
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


def _rates(con: duckdb.DuckDBPyConnection, since: float, step: float | None, variant: str,
           table: str = "snapshots") -> dict[tuple[int, str, str], Rates]:
    """Per (``step`` bucket, variant, target): the rows since ``since`` summed into one Rates
    (increases and bucket increases summed, gauges averaged). ``step`` None: one bucket (0)
    for the whole range. ``table``: the rows (a file read as it is may need a shim)."""
    where = "ts >= ? AND (? = 'all' OR variant = ?)"
    if step is None:
        key, args = "0 AS k, variant, target", [since, variant, variant]
    else:
        key, args = ("CAST(floor(ts / ?) AS BIGINT) AS k, variant, target",
                     [step, since, variant, variant])
    sums = ", ".join(f"sum({c})" for c in COUNT_NAMES)
    gauges = "avg(in_flight), avg(streams_in_flight), avg(adaptive_rate)"
    per: dict[tuple[int, str, str], Rates] = {}
    for k, v, t, seconds, reset, *vals in con.execute(
            f"SELECT {key}, sum(seconds), bool_or(reset), {sums}, {gauges} FROM {table} "
            f"WHERE {where} GROUP BY ALL", args).fetchall():
        n = len(COUNT_NAMES)
        per[(k, v, t)] = Rates(variant=v, seconds=seconds, reset=reset,
                               increase=Counts(*vals[:n]), in_flight=vals[n],
                               streams_in_flight=vals[n + 1], adaptive_rate=vals[n + 2])
    for hist in ("latency", "ttft"):
        # Bucket increases summed element-wise (grouped by layout; ``plus`` merges layouts).
        rows = con.execute(
            f"WITH x AS (SELECT {key}, {hist}_bounds AS b, unnest({hist}_counts) AS c, "
            f"generate_subscripts({hist}_counts, 1) AS i FROM {table} WHERE {where}) "
            "SELECT k, variant, target, b, list(c ORDER BY i) FROM "
            "(SELECT k, variant, target, b, i, sum(c) AS c FROM x GROUP BY ALL) "
            "GROUP BY k, variant, target, b", args).fetchall()
        for k, v, t, bounds, counts in rows:
            r = per.get((k, v, t))
            if r is not None:
                h = getattr(r, hist).plus(Histogram(tuple(bounds), tuple(counts)))
                per[(k, v, t)] = replace(r, **{hist: h})
    return per


def _history(con: duckdb.DuckDBPyConnection, since: float, step: float,
             variant: str) -> dict[str, list[dict[str, Any]]]:
    per = _rates(con, since, step, variant)
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


# ---- zaiproxy history --db: the file read by another process -------------------------


def read_summary(path: str, range_s: float, variant: str | None,
                 now: float) -> dict[str, Any]:
    """What the collector stored for the last ``range_s`` seconds: per variant (its targets
    together), per target, and the fleet's total. Opens ``path`` read-only (a running
    collector holds it: duckdb.Error "Could not set lock"); SchemaError when it is not a
    collector's database.

    Counts are the scraped increases summed (exact: what the proxies' counters grew by, over
    restarts too); ``requests_per_s`` is the targets' rates summed (``snapshot.combine``, as
    ``/admin/history``); quantiles come from the summed bucket increases (Prometheus'
    ``histogram_quantile``).
    """
    con = connect(path, read_only=True)
    try:
        table = _readable_table(con, path)
        per = _rates(con, now - range_s, None, variant or "all", table)
    finally:
        con.close()
    by_variant: dict[str, list[Rates]] = {}
    for (_, v, _), r in sorted(per.items()):
        by_variant.setdefault(v, []).append(r)
    return {
        "source": "collector", "db": path,
        "range": {"start": _iso(now - range_s), "end": _iso(now), "seconds": range_s},
        "variant": variant,
        "variants": [{"variant": v, **_summary_row(items, len(items))}
                     for v, items in by_variant.items()],
        "targets": [{"target": t, "variant": v, **_summary_row([r], 1)}
                    for (_, v, t), r in sorted(per.items(), key=lambda kv: (kv[0][2], kv[0][1]))],
        "total": _summary_row(list(per.values()), len({t for (_, _, t) in per})),
    }


def _readable_table(con: duckdb.DuckDBPyConnection, path: str) -> str:
    """The rows to read: ``snapshots``, with the counters an older collector did not store
    read as 0 (a file opened read-only cannot be migrated)."""
    columns = {row[0] for row in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE schema_name = 'main' "
        "AND table_name = 'snapshots'").fetchall()}
    if not {"target", "seconds", "latency_counts"} <= columns:
        raise SchemaError(f"{path} is not a collector's database (zaiproxy collect --db): "
                          "it has no snapshots table of scrapes")
    missing = [c for c in _ADDED_COUNTS if c not in columns]
    if not missing:
        return "snapshots"
    return f"(SELECT *, {', '.join(f'0::DOUBLE AS {c}' for c in missing)} FROM snapshots)"


def _summary_row(items: Iterable[Rates], targets: int) -> dict[str, Any]:
    rates = list(items)
    counts = Counts()
    latency, ttft = Histogram(), Histogram()
    for r in rates:
        counts = Counts(*(getattr(counts, n) + getattr(r.increase, n) for n in COUNT_NAMES))
        latency, ttft = latency.plus(r.latency), ttft.plus(r.ttft)
    combined = snapshot.combine("", rates)
    out: dict[str, Any] = {
        "targets": targets, "seconds": combined.seconds, "reset": combined.reset,
        **counts.to_json(),
        "requests_per_s": combined.per_second("requests"),
        "error_rate": counts.responses_5xx / counts.requests if counts.requests > 0 else 0.0,
        "failures": snapshot.failures(counts), "failure_shares": snapshot.failure_shares(counts),
        "in_flight": combined.in_flight,
    }
    for name, hist in (("latency", latency), ("ttft", ttft)):
        for q in snapshot.QUANTILES:
            value = hist.quantile(q)
            out[f"{name}_ms_p{round(q * 100)}"] = None if value is None else round(value * 1000, 3)
    return out


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")
