"""History queries: JSON-able summaries and time series over a range.

Both read the raw ``requests`` rows when the range lies within raw retention
(exact p95), else the 1-minute rollups (p95 approximated as the request-weighted
mean of the minutes' exact p95s; "source" in the answer says which). They run in
the recorder (over its HTTP endpoint, :mod:`zaiproxy.recorder.endpoint`) or on a
file opened read-only by ``zaiproxy history`` when no proxy holds it.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from typing import Any, Final

from zaiproxy.recorder.ranges import QueryError, parse_duration
from zaiproxy.recorder.store import DAY, ERROR_SQL, HistoryStore

__all__ = ["GROUPS", "QueryError", "export_parquet", "export_parquet_bytes", "history_series",
           "history_summary", "parse_duration"]

# group_by name -> (raw column, rollup column)
GROUPS: Final = {
    "key": ("key_alias", "nullif(key_alias, '')"),
    "model": ("model", "nullif(model, '')"),
    "status": ("status", "status"),
    "variant": ("variant", "variant"),
    "route": ("route", "nullif(route, '')"),
}
MAX_POINTS: Final = 5000


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")


def _source(store: HistoryStore, start: float, now: float) -> str:
    return "raw" if start >= now - store.raw_days * DAY else "rollup"


def _where(time_col: str, variant: str | None) -> str:
    sql = f"{time_col} >= to_timestamp(?) AND {time_col} < to_timestamp(?)"
    return sql + (" AND variant = ?" if variant is not None else "")


def _params(start: float, end: float, variant: str | None) -> list[Any]:
    return [start, end] + ([variant] if variant is not None else [])


_RAW_AGG: Final = f"""
    count(*) AS requests, count(*) FILTER (WHERE {ERROR_SQL}) AS errors,
    avg(latency_ms), quantile_cont(latency_ms, 0.95), max(latency_ms),
    coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),
    coalesce(sum(cache_read_tokens), 0), coalesce(sum(cache_write_tokens), 0),
    coalesce(sum(cost_usd), 0)"""
_ROLLUP_AGG: Final = """
    sum(requests) AS requests, sum(errors) AS errors,
    sum(latency_ms_sum) / sum(requests), sum(latency_ms_p95 * requests) / sum(requests),
    max(latency_ms_max), sum(input_tokens), sum(output_tokens),
    sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_usd)"""
_AGG_NAMES: Final = ("requests", "errors", "latency_ms_avg", "latency_ms_p95", "latency_ms_max",
                     "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                     "cost_usd")


def _agg(values: tuple[Any, ...] | list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in zip(_AGG_NAMES, values, strict=True):
        if name.startswith("latency"):
            out[name] = round(float(value), 3) if value is not None else None
        elif name == "cost_usd":
            out[name] = round(float(value or 0), 6)
        else:
            out[name] = int(value or 0)
    out["error_rate"] = round(out["errors"] / out["requests"], 6) if out["requests"] else 0.0
    return out


def history_summary(store: HistoryStore, range_s: float, *, variant: str | None = None,
                    group_by: str = "model", now: float) -> dict[str, Any]:
    """Totals over the last ``range_s`` seconds, one row per ``group_by`` value."""
    if group_by not in GROUPS:
        raise QueryError(f"group_by must be one of {', '.join(GROUPS)}")
    start, end = now - range_s, now
    source = _source(store, start, now)
    raw = source == "raw"
    table, time_col = ("requests", "ts") if raw else ("requests_1m", "minute")
    agg = _RAW_AGG if raw else _ROLLUP_AGG
    col = GROUPS[group_by][0 if raw else 1]
    where, params = _where(time_col, variant), _params(start, end, variant)
    rows = store.con.execute(
        f"SELECT {col} AS k, {agg} FROM {table} WHERE {where} GROUP BY k "
        "ORDER BY requests DESC, k NULLS LAST", params).fetchall()
    total = store.con.execute(f"SELECT {agg} FROM {table} WHERE {where}", params).fetchone()
    return {
        "range": {"start": _iso(start), "end": _iso(end), "seconds": range_s},
        "variant": variant, "group_by": group_by, "source": source,
        "p95": "exact" if raw else "approximate (request-weighted mean of 1-minute p95s)",
        "rows": [{group_by: row[0], **_agg(row[1:])} for row in rows],
        "total": _agg(total if total is not None else (0,) * len(_AGG_NAMES)),
    }


def history_series(store: HistoryStore, range_s: float, *, variant: str | None = None,
                   resolution_s: float = 60.0, now: float) -> dict[str, Any]:
    """Points every ``resolution_s`` seconds over the last ``range_s``, one series per variant."""
    start, end = now - range_s, now
    source = _source(store, start, now)
    raw = source == "raw"
    if not raw:
        resolution_s = max(60.0, round(resolution_s / 60) * 60.0)
    if resolution_s < 1 or range_s / resolution_s > MAX_POINTS:
        raise QueryError(f"resolution must be >= 1 s and give at most {MAX_POINTS} points")
    table, time_col = ("requests", "ts") if raw else ("requests_1m", "minute")
    agg = _RAW_AGG if raw else _ROLLUP_AGG
    rows = store.con.execute(
        f"SELECT epoch(time_bucket(to_seconds(?), {time_col})) AS t, variant, {agg} "
        f"FROM {table} WHERE {_where(time_col, variant)} GROUP BY t, variant ORDER BY t, variant",
        [resolution_s, *_params(start, end, variant)]).fetchall()
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        point = {"t": float(row[0]), "time": _iso(float(row[0])), **_agg(row[2:])}
        series.setdefault(row[1], []).append(point)
    return {
        "range": {"start": _iso(start), "end": _iso(end), "seconds": range_s},
        "variant": variant, "resolution_s": resolution_s, "source": source, "series": series,
    }


def export_parquet(store: HistoryStore, range_s: float, path: str, *,
                   variant: str | None = None, now: float) -> int:
    """Write the raw rows of the range to a Parquet file; returns the row count."""
    start, end = now - range_s, now
    quoted = path.replace("'", "''")
    where, params = _where("ts", variant), _params(start, end, variant)
    store.con.execute(f"COPY (SELECT * FROM requests WHERE {where} ORDER BY ts) "
                      f"TO '{quoted}' (FORMAT parquet)", params)
    row = store.con.execute(f"SELECT count(*) FROM requests WHERE {where}", params).fetchone()
    return int(row[0]) if row else 0


def export_parquet_bytes(store: HistoryStore, range_s: float, *, variant: str | None = None,
                         now: float) -> tuple[bytes, int]:
    """The Parquet file as bytes (the endpoint sends it; the client writes the file)."""
    with tempfile.TemporaryDirectory(prefix="zaiproxy-export-") as tmp:
        path = os.path.join(tmp, "export.parquet")
        count = export_parquet(store, range_s, path, variant=variant, now=now)
        with open(path, "rb") as fh:
            return fh.read(), count
