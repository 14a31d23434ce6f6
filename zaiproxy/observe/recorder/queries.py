"""History queries: JSON-able summaries and time series over a range.

Both read the raw ``requests`` rows when the range lies within raw retention
(exact p95), else the 1-minute rollups (p95 approximated as the request-weighted
mean of the minutes' exact p95s; "source" in the answer says which). They run in
the recorder (over its HTTP endpoint, :mod:`zaiproxy.observe.recorder.endpoint`) or on a
file opened read-only by ``zaiproxy history`` when no proxy holds it.

Series points carry more than summary rows: what a dashboard plots per bucket
(responses per status class, latency and time-to-first-token quantiles, retries,
Z.AI errors, upstream errors, the proxy's own 429s, successes without upstream usage).
A rollup minute keeps only counts per status, latency sum/max/p95, tokens and cost, so
the rest are null on a rollup range; the answer lists them (``fields_null_in_rollup``).

Summaries and series are API traffic, as the proxy's live rates are: the file holds nothing
else (schema.py, v3), so a proxy's history plots what its ``/metrics`` request counts say,
a canary's 5xx share (canary-check) is not diluted by probes and scrapes, and a long
``/admin/events`` stream moves no p95. Only a file older than v3, read as it is, still has
rows of control routes; those are left out by route (:func:`_api_rows`).

A summary also carries Z.AI's own quota (``zai_quota``, :func:`latest_zai_quota`): each
upstream key's latest sample in the file, whenever it was taken, marked stale when it is
older than the range or than :data:`ZAI_QUOTA_STALE_S`.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from typing import Any, Final

from zaiproxy.observe.recorder.ranges import QueryError, parse_duration
from zaiproxy.observe.recorder.schema import LEGACY_CONTROL_SQL
from zaiproxy.observe.recorder.store import DAY, ERROR_SQL, HistoryStore

__all__ = ["FIELDS_NULL_IN_ROLLUP", "GROUPS", "QueryError", "export_parquet",
           "export_parquet_bytes", "history_series", "history_summary", "latest_zai_quota",
           "parse_duration", "unrecorded"]

# group_by name -> (raw column, rollup column)
GROUPS: Final = {
    "key": ("key_alias", "nullif(key_alias, '')"),
    "model": ("model", "nullif(model, '')"),
    "status": ("status", "status"),
    "variant": ("variant", "variant"),
    "route": ("route", "nullif(route, '')"),
}
MAX_POINTS: Final = 5000
# A Z.AI quota sample older than this is stale in a summary (the poller's default
# quota_stale_after, limits/zai_quota.py).
ZAI_QUOTA_STALE_S: Final = 900.0
EXPORT_PREFIX: Final = "zaiproxy-export-"  # an export's temporary directory


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")


def _source(store: HistoryStore, start: float, now: float) -> str:
    return "raw" if start >= now - store.raw_days * DAY else "rollup"


def _api_rows(store: HistoryStore) -> str:
    """SQL: the rows that are API traffic. Every row of a v3 file; a file older than v3 read
    as it is (read-only, not migrated) still has control routes' rows, told apart by route."""
    return "TRUE" if store.version >= 3 else f"NOT {LEGACY_CONTROL_SQL}"


def _where(store: HistoryStore, time_col: str, variant: str | None) -> str:
    sql = f"{time_col} >= to_timestamp(?) AND {time_col} < to_timestamp(?) AND {_api_rows(store)}"
    return sql + (" AND variant = ?" if variant is not None else "")


def _params(start: float, end: float, variant: str | None) -> list[Any]:
    return [start, end] + ([variant] if variant is not None else [])


# What else failed for the clients, by kind (the proxy's /admin/status splits the same way:
# observe/snapshot.failures): the proxy's own 429s (no upstream answer), Z.AI's 429s relayed,
# and the other 4xx. The 1-minute rollups keep status classes only: null there.
FAILURE_SQL: Final = """
    count(*) FILTER (WHERE status = 429 AND upstream_status IS NULL) AS proxy_429,
    count(*) FILTER (WHERE status = 429 AND upstream_status IS NOT NULL) AS zai_429,
    count(*) FILTER (WHERE status BETWEEN 400 AND 499 AND status <> 429) AS other_4xx"""
_RAW_AGG: Final = f"""
    count(*) AS requests, count(*) FILTER (WHERE {ERROR_SQL}) AS errors,
    avg(latency_ms), quantile_cont(latency_ms, 0.95), max(latency_ms),
    coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),
    coalesce(sum(cache_read_tokens), 0), coalesce(sum(cache_write_tokens), 0),
    coalesce(sum(cost_usd), 0), {FAILURE_SQL}"""
_ROLLUP_AGG: Final = """
    sum(requests) AS requests, sum(errors) AS errors,
    sum(latency_ms_sum) / sum(requests), sum(latency_ms_p95 * requests) / sum(requests),
    max(latency_ms_max), sum(input_tokens), sum(output_tokens),
    sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_usd),
    NULL::BIGINT, NULL::BIGINT, NULL::BIGINT"""
FAILURE_NAMES: Final = ("proxy_429", "zai_429", "other_4xx")
_AGG_NAMES: Final = ("requests", "errors", "latency_ms_avg", "latency_ms_p95", "latency_ms_max",
                     "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                     "cost_usd", *FAILURE_NAMES)


_BASE_NAMES: Final = _AGG_NAMES[:-len(FAILURE_NAMES)]  # what a series point aggregates


def _agg(values: tuple[Any, ...] | list[Any]) -> dict[str, Any]:
    """A summary row (every name of _AGG_NAMES) or a series point's base (_BASE_NAMES)."""
    names = _AGG_NAMES if len(values) == len(_AGG_NAMES) else _BASE_NAMES
    out: dict[str, Any] = {}
    for name, value in zip(names, values, strict=True):
        if name.startswith("latency"):
            out[name] = round(float(value), 3) if value is not None else None
        elif name == "cost_usd":
            out[name] = round(float(value or 0), 6)
        elif name in FAILURE_NAMES:
            out[name] = None if value is None else int(value)
        else:
            out[name] = int(value or 0)
    requests = out["requests"]
    out["error_rate"] = round(out["errors"] / requests, 6) if requests else 0.0
    for name in FAILURE_NAMES if names is _AGG_NAMES else ():
        # Shares, as error_rate; None where the rollups cannot tell.
        count = out[name]
        out[f"{name}_rate"] = (None if count is None
                               else round(count / requests, 6) if requests else 0.0)
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
    where, params = _where(store, time_col, variant), _params(start, end, variant)
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
        "zai_quota": latest_zai_quota(store, variant=variant, start=start, now=now),
    }


def latest_zai_quota(store: HistoryStore, *, variant: str | None, start: float,
                     now: float) -> list[dict[str, Any]]:
    """Per upstream key, its latest Z.AI quota sample in the file (of ``variant`` when
    given), taken at any time: ``stale`` when older than ``start`` or than
    :data:`ZAI_QUOTA_STALE_S` at ``now``. [] when none was recorded (quota not polled, or a
    file older than schema v6, read as it is). Times in epoch seconds, as ``/admin/keys``'
    ``zai_quota``."""
    if store.version < 6:
        return []
    where = "WHERE variant = ?" if variant is not None else ""
    found = store.con.execute(f"""
        SELECT upstream, variant, epoch(ts), quota_window, limit_type, used_fraction,
               epoch(reset_at), plan_tier, local_used_fraction
        FROM zai_quota {where}
        QUALIFY rank() OVER (PARTITION BY upstream ORDER BY ts DESC, variant) = 1
        ORDER BY upstream, quota_window
    """, [variant] if variant is not None else []).fetchall()
    keys: dict[str, dict[str, Any]] = {}
    for upstream, var, ts, window, kind, used, reset, tier, local in found:
        entry = keys.get(upstream)
        if entry is None:
            age = max(0.0, now - float(ts))
            entry = keys[upstream] = {
                "upstream": upstream, "variant": var, "sampled_at": float(ts),
                "age_s": round(age, 3), "stale": float(ts) < start or age > ZAI_QUOTA_STALE_S,
                "plan_tier": tier, "windows": []}
        entry["windows"].append({
            "window": window, "limit_type": kind, "used_fraction": float(used),
            "reset_at": None if reset is None else float(reset),
            "local_used_fraction": None if local is None else float(local)})
    return list(keys.values())


# ---- series ---------------------------------------------------------------------------

# Upstream failures, as /metrics counts them (zai_proxy_upstream_errors; request/exchange.py, request/relay.py):
# a relay the upstream broke off (``result``), or the proxy's own 502/504 when no response
# head came (connect/TLS failure, timeout, closed without a response: errors.UpstreamError).
# ``upstream_status`` is set only once a response head is relayed, so NULL marks "ours"; an
# upstream's own 5xx, relayed, is an error but not an upstream failure. The pool-exhausted
# 503 (counted by /metrics) cannot be told from a draining 503 in a row and is left out.
UPSTREAM_ERROR_SQL: Final = ("(result IN ('upstream_cut', 'upstream_idle_timeout') "
                             "OR (status IN (502, 504) AND upstream_status IS NULL))")
# The proxy's own 429s (gate.RateLimited, at admission or when a Z.AI retry is readmitted):
# a Z.AI 429 that is relayed has upstream_status 429.
REJECTION_SQL: Final = "(status = 429 AND upstream_status IS NULL)"
# Z.AI's 429 answers, each attempt counted: the ones retried (``retries``) plus the one
# relayed (``upstream_status`` 429; a client that left before it is still counted). The same
# count as zai_proxy_zai_errors_total (snapshot.Counts.zai_errors), so "Z.AI errors" reads
# the same on a proxy's screen, in its history and from a collector. ``error_class`` (the
# last 429's class) says which kind, not how many.
ZAI_ERRORS_SQL: Final = ("(coalesce(sum(retries), 0) "
                         "+ count(*) FILTER (WHERE upstream_status = 429))")
# A success whose upstream sent no usage (the proxy estimated the tokens): what
# zai_proxy_usage_missing_total counts (metrics.py), so canary-check reads the same share
# from a proxy's history as from /metrics. Rollups keep no tokens_estimated: null there.
USAGE_MISSING_SQL: Final = "(status // 100 = 2 AND tokens_estimated)"
# Both inner aggregates give these columns (one pass over the table, FILTER clauses, one
# quantile state per column for all three quantiles); the outer SELECT only projects them.
_RAW_SERIES_AGG: Final = f"""
    count(*) AS requests, count(*) FILTER (WHERE {ERROR_SQL}) AS errors,
    avg(latency_ms) AS lat_avg, quantile_cont(latency_ms, [0.5, 0.95, 0.99]) AS lat_q,
    max(latency_ms) AS lat_max,
    coalesce(sum(input_tokens), 0) AS tin, coalesce(sum(output_tokens), 0) AS tout,
    coalesce(sum(cache_read_tokens), 0) AS tcr, coalesce(sum(cache_write_tokens), 0) AS tcw,
    coalesce(sum(cost_usd), 0) AS cost,
    count(*) FILTER (WHERE status // 100 = 2) AS r2, count(*) FILTER (WHERE status // 100 = 4) AS r4,
    count(*) FILTER (WHERE status // 100 = 5) AS r5, count(*) FILTER (WHERE status = 429) AS r429,
    quantile_cont(ttft_ms, [0.5, 0.95, 0.99]) AS ttft_q,  -- NULLs skipped; NULL if none
    coalesce(sum(retries), 0) AS retries,
    {ZAI_ERRORS_SQL} AS zai_errors,
    count(*) FILTER (WHERE {UPSTREAM_ERROR_SQL}) AS upstream_errors,
    count(*) FILTER (WHERE {REJECTION_SQL}) AS rejections,
    count(*) FILTER (WHERE {USAGE_MISSING_SQL}) AS usage_missing"""
_ROLLUP_SERIES_AGG: Final = """
    sum(requests) AS requests, sum(errors) AS errors,
    sum(latency_ms_sum) / sum(requests) AS lat_avg,
    [NULL, sum(latency_ms_p95 * requests) / sum(requests), NULL]::DOUBLE[] AS lat_q,
    max(latency_ms_max) AS lat_max,
    sum(input_tokens) AS tin, sum(output_tokens) AS tout,
    sum(cache_read_tokens) AS tcr, sum(cache_write_tokens) AS tcw, sum(cost_usd) AS cost,
    coalesce(sum(requests) FILTER (WHERE status // 100 = 2), 0) AS r2,
    coalesce(sum(requests) FILTER (WHERE status // 100 = 4), 0) AS r4,
    coalesce(sum(requests) FILTER (WHERE status // 100 = 5), 0) AS r5,
    coalesce(sum(requests) FILTER (WHERE status = 429), 0) AS r429,
    NULL::DOUBLE[] AS ttft_q, NULL::BIGINT AS retries, NULL::BIGINT AS zai_errors,
    NULL::BIGINT AS upstream_errors, NULL::BIGINT AS rejections,
    NULL::BIGINT AS usage_missing"""
# _AGG_NAMES order first (the summary's fields, converted by _agg), then _EXTRA_NAMES.
_SERIES_COLUMNS: Final = """
    requests, errors, lat_avg, lat_q[2], lat_max, tin, tout, tcr, tcw, cost,
    r2, r4, r5, r429, lat_q[1], lat_q[3], ttft_q[1], ttft_q[2], ttft_q[3],
    retries, zai_errors, upstream_errors, rejections, usage_missing"""
_EXTRA_NAMES: Final = ("responses_2xx", "responses_4xx", "responses_5xx", "responses_429",
                       "latency_ms_p50", "latency_ms_p99", "ttft_ms_p50", "ttft_ms_p95",
                       "ttft_ms_p99", "retries", "zai_errors", "upstream_errors", "rejections",
                       "usage_missing")
FIELDS_NULL_IN_ROLLUP: Final = ("latency_ms_p50", "latency_ms_p99", "ttft_ms_p50", "ttft_ms_p95",
                                "ttft_ms_p99", "retries", "zai_errors", "upstream_errors",
                                "rejections", "usage_missing")


def _point(values: tuple[Any, ...]) -> dict[str, Any]:
    n = len(_BASE_NAMES)
    out = _agg(values[:n])
    for name, value in zip(_EXTRA_NAMES, values[n:], strict=True):
        if value is None:
            out[name] = None  # not kept in rollups, or no row had it (ttft)
        elif name.endswith(("_p50", "_p95", "_p99")):
            out[name] = round(float(value), 3)
        else:
            out[name] = int(value)
    return out


def history_series(store: HistoryStore, range_s: float, *, variant: str | None = None,
                   resolution_s: float = 60.0, now: float) -> dict[str, Any]:
    """Points every ``resolution_s`` seconds over the last ``range_s``, one series per variant.

    Each point: the summary's fields (requests, errors, latency avg/p95/max, tokens, cost)
    and :data:`_EXTRA_NAMES`; those in :data:`FIELDS_NULL_IN_ROLLUP` are null when the
    range is answered from rollups.
    """
    start, end = now - range_s, now
    source = _source(store, start, now)
    raw = source == "raw"
    if not raw:
        resolution_s = max(60.0, round(resolution_s / 60) * 60.0)
    if resolution_s < 1 or range_s / resolution_s > MAX_POINTS:
        raise QueryError(f"resolution must be >= 1 s and give at most {MAX_POINTS} points")
    table, time_col = ("requests", "ts") if raw else ("requests_1m", "minute")
    agg = _RAW_SERIES_AGG if raw else _ROLLUP_SERIES_AGG
    rows = store.con.execute(
        f"SELECT t, variant, {_SERIES_COLUMNS} FROM ("
        f"SELECT epoch(time_bucket(to_seconds(?), {time_col})) AS t, variant, {agg} "
        f"FROM {table} WHERE {_where(store, time_col, variant)} "
        "GROUP BY t, variant"
        ") ORDER BY t, variant",
        [resolution_s, *_params(start, end, variant)]).fetchall()
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        point = {"t": float(row[0]), "time": _iso(float(row[0])), **_point(row[2:])}
        series.setdefault(row[1], []).append(point)
    return {
        "range": {"start": _iso(start), "end": _iso(end), "seconds": range_s},
        "variant": variant, "resolution_s": resolution_s, "source": source,
        "p95": "exact" if raw else "approximate (request-weighted mean of 1-minute p95s)",
        "p50_p99": "exact" if raw else "not kept in rollups (null)",
        "fields_null_in_rollup": list(FIELDS_NULL_IN_ROLLUP),
        "series": series,
    }


def export_parquet(store: HistoryStore, range_s: float, path: str, *,
                   variant: str | None = None, now: float) -> int:
    """Write the raw rows of the range to a Parquet file; returns the row count."""
    start, end = now - range_s, now
    quoted = path.replace("'", "''")
    where, params = _where(store, "ts", variant), _params(start, end, variant)
    store.con.execute(f"COPY (SELECT * FROM requests WHERE {where} ORDER BY ts) "
                      f"TO '{quoted}' (FORMAT parquet)", params)
    row = store.con.execute(f"SELECT count(*) FROM requests WHERE {where}", params).fetchone()
    return int(row[0]) if row else 0


def export_parquet_bytes(store: HistoryStore, range_s: float, *, variant: str | None = None,
                         now: float, directory: str | None = None) -> tuple[bytes, int]:
    """The Parquet file as bytes (the endpoint sends it; the client writes the file).

    ``directory``: where the temporary file goes (the recorder's instance may write only in
    its export directory, recorder/sql.py's ``lock_down``); None: the system's.
    """
    with tempfile.TemporaryDirectory(prefix=EXPORT_PREFIX, dir=directory) as tmp:
        path = os.path.join(tmp, "export.parquet")
        count = export_parquet(store, range_s, path, variant=variant, now=now)
        with open(path, "rb") as fh:
            return fh.read(), count


def unrecorded(store: HistoryStore) -> dict[str, dict[str, int]]:
    """Per variant, the finished requests that never became rows, since the file began:
    ``dropped`` by the workers (the channel was full) and ``lost`` (sent, and the recorder
    holding them died; counted by the next one from the sequence numbers)."""
    if not store.read_only:
        return {v: {"dropped": t.dropped, "lost": t.lost} for v, t in sorted(store.totals.items())}
    if store.version < 2:  # a file no v2 recorder has opened yet: only the snapshots count
        found = store.con.execute("""
            SELECT variant, dropped_total, 0 FROM snapshots
            QUALIFY row_number() OVER (PARTITION BY variant ORDER BY ts DESC) = 1
            ORDER BY variant
        """).fetchall()
        return {v: {"dropped": int(d), "lost": 0} for v, d, _ in found}
    found = store.con.execute("""
        SELECT variant, dropped_total, lost_total FROM recorder_totals
        QUALIFY row_number() OVER (PARTITION BY variant ORDER BY txn DESC) = 1
        ORDER BY variant
    """).fetchall()
    return {v: {"dropped": int(d), "lost": int(lost)} for v, d, lost in found}
