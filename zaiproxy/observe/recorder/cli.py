"""``zaiproxy history``: summaries of the request history, Parquet export, and read-only SQL.

Asks the running proxy's recorder (its endpoint URL is in
``<history_path>.endpoint``) when there is one, because DuckDB lets nobody else
open the file then; otherwise opens the file itself, read-only.

* ``zaiproxy history [--range 24h] [--by key] [--json]``: the summaries.
* ``zaiproxy history sql "SELECT …" [--format table|csv|json]``: one read-only query of the
  user's own (recorder/sql.py says what may run and how it is bounded), answered by the
  recorder (``POST /history/sql``) while the proxy runs, else on the file opened read-only.
* ``--db FILE``: a fleet collector's database (``zaiproxy collect --db``) instead: its
  summaries per variant and per target, or ``sql`` on it. The collector's tables are read by
  its own functions (``fleet/collector_store.py``), which this wing may not import: the
  command line passes them in (``run(..., collector_summary=...)``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

# queries.GROUPS (a test checks): not imported, so that building the parser loads no DuckDB.
GROUP_NAMES = ("key", "model", "status", "variant", "route")
DEFAULT_GROUPS = ("key", "model", "status", "variant")
# An export is the whole range's rows in one answer: more time than a summary's 60 s.
EXPORT_TIMEOUT = 600.0
# recorder/sql.py's defaults and bounds (a test checks): not imported, for the same reason.
SQL_TIMEOUT = "30s"
SQL_MAX_ROWS = 1000
# Beyond the query's own time limit: the recorder's interrupt, the answer's transfer.
SQL_MARGIN = 30.0
CELL_WIDTH = 80  # a table cell longer than this is cut (csv and json have it whole)
# (database path, range in seconds, variant or None, now) -> the summary document
CollectorSummary = Callable[[str, float, str | None, float], dict[str, Any]]
# (Prometheus URL, range in seconds, variant or None, now, token=) -> the same shape
PrometheusSummary = Callable[..., dict[str, Any]]


def _source_args(p: argparse.ArgumentParser, *, sub: bool = False) -> None:
    """Where the history comes from. Declared on ``history`` and again on ``history sql``
    (so they go before or after ``sql``); the latter's default is SUPPRESS, or argparse
    would overwrite a value given before ``sql`` with the subcommand's default."""
    kw: dict[str, Any] = {"default": argparse.SUPPRESS} if sub else {}
    p.add_argument("--path", help="history file (default: history_path from the config)", **kw)
    p.add_argument("--demo", action="store_true",
                   help="the demo proxy's history (`zaiproxy serve --demo`, `make run` without "
                        "ZAI_API_KEY): it keeps its own file", **kw)
    p.add_argument("--url", help="a recorder endpoint to ask (default: from <path>.endpoint)",
                   **kw)
    p.add_argument("--token",
                   help="admin token for the recorder's endpoint, like `zaiproxy tui --token` "
                        "(default: the config's admin_token, env ZAIPROXY_ADMIN_TOKEN)",
                   **({"default": None} | kw))
    p.add_argument("--config", help="TOML config file (also ZAIPROXY_CONFIG)", **kw)
    p.add_argument("--db", metavar="FILE",
                   help="a fleet collector's database (zaiproxy collect --db) instead of a "
                        "proxy's history, read-only: the collector must be stopped", **kw)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("history", help="summaries of the request history, and read-only SQL "
                                       "over it (DuckDB)")
    p.add_argument("--range", default="24h", help="how far back: 15m, 1h, 24h, 7d (default 24h)")
    p.add_argument("--variant", help="only this deployment variant")
    p.add_argument("--by", action="append", choices=GROUP_NAMES, dest="group_by",
                   help="group by this (repeatable; default: key, model, status, variant)")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "FILE"),
                   help="write the raw rows of the range to FILE (FORMAT: parquet)")
    _source_args(p)
    p.add_argument("--prometheus", metavar="URL",
                   help="a fleet's summaries from the Prometheus that scrapes it (per variant; "
                        "counts are Prometheus' increase() estimates); --token is sent to it")
    commands = p.add_subparsers(dest="history_command", metavar="{sql}")
    q = commands.add_parser(
        "sql", help="run one read-only SQL query (live through the recorder, time-limited)",
        description="Run one read-only query (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, "
                    "SUMMARIZE) on the history: through the running proxy's recorder, else on "
                    "the file opened read-only. Exit 2 when the query is refused or DuckDB "
                    "cannot run it, 1 when it cannot be answered (time limit, recorder "
                    "unreachable, admin token refused, file locked).")
    q.add_argument("query", help='the SQL, e.g. "SELECT model, count(*) FROM requests GROUP BY '
                                 'ALL"')
    q.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="table (aligned text, default), csv (a header row), json "
                        "({columns, types, rows, truncated, elapsed_s})")
    q.add_argument("--timeout", default=SQL_TIMEOUT,
                   help=f"stop the query after this long (default {SQL_TIMEOUT}, at most 10m)")
    q.add_argument("--max-rows", type=int, default=SQL_MAX_ROWS,
                   help=f"rows to fetch at most (default {SQL_MAX_ROWS:,}, at most 100,000); "
                        "the answer says when there were more")
    _source_args(q, sub=True)


class _Source:
    """Where the answers come from: the recorder's endpoint or the file, read-only."""

    def __init__(self, path: str, url: str | None, token: str | None, raw_days: float) -> None:
        self.path = path
        self.url = url
        self.token = token
        self.raw_days = raw_days
        self.store: Any = None

    def describe(self) -> str:
        return f"recorder at {self.url}" if self.url else f"{self.path} (read-only)"

    def summary(self, range_s: float, variant: str | None, group_by: str) -> dict[str, Any]:
        if self.url is not None:
            from zaiproxy.observe.recorder.endpoint import fetch

            body = fetch(self.url, "/history/summary",
                         {"range": str(range_s), "variant": variant, "group_by": group_by},
                         token=self.token)
            doc: dict[str, Any] = orjson.loads(body)
            return doc
        from zaiproxy.observe.recorder.queries import history_summary

        return history_summary(self._store(), range_s, variant=variant, group_by=group_by,
                               now=time.time())

    def unrecorded(self) -> dict[str, dict[str, int]]:
        """Per variant: requests dropped by the workers / lost with a recorder, never rows."""
        if self.url is not None:
            from zaiproxy.observe.recorder.endpoint import fetch

            status = orjson.loads(fetch(self.url, "/history/status", {}, token=self.token))
            found: dict[str, dict[str, int]] = status.get("unrecorded") or {}
            return found
        from zaiproxy.observe.recorder.queries import unrecorded

        return unrecorded(self._store())

    def export(self, range_s: float, variant: str | None, out: str) -> int:
        if self.url is not None:
            from zaiproxy.observe.recorder.endpoint import fetch

            data = fetch(self.url, "/history/export",
                         {"range": str(range_s), "variant": variant, "format": "parquet"},
                         token=self.token, timeout=EXPORT_TIMEOUT)
            with open(out, "wb") as fh:
                fh.write(data)
            return len(data)
        from zaiproxy.observe.recorder.queries import export_parquet

        export_parquet(self._store(), range_s, out, variant=variant, now=time.time())
        return os.path.getsize(out)

    def sql(self, query: str, timeout: float, max_rows: int) -> dict[str, Any]:
        """One read-only query: recorder/sql.py's answer document (SqlError, EndpointError)."""
        if self.url is not None:
            from zaiproxy.observe.recorder.endpoint import fetch

            body = fetch(self.url, "/history/sql", {}, token=self.token,
                         timeout=timeout + SQL_MARGIN,
                         body={"sql": query, "timeout": timeout, "max_rows": max_rows})
            doc: dict[str, Any] = orjson.loads(body)
            return doc
        from zaiproxy.observe.recorder import sql

        con = sql.open_read_only(self.path)
        try:
            return sql.run(con, query, timeout=timeout, max_rows=max_rows)
        finally:
            con.close()

    def _store(self) -> Any:
        if self.store is None:
            from zaiproxy.observe.recorder.store import HistoryStore

            self.store = HistoryStore.open(self.path, read_only=True, raw_days=self.raw_days)
        return self.store

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _endpoint_url(path: str) -> str | None:
    from zaiproxy.observe.recorder.process import endpoint_file

    try:
        with open(endpoint_file(path), "rb") as fh:
            doc = orjson.loads(fh.read())
        url = doc.get("url")
        return url if isinstance(url, str) else None
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return None


def _fmt_int(v: int) -> str:
    return f"{v:,}"


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


_COLUMNS: tuple[tuple[str, str, Callable[[dict[str, Any]], str]], ...] = (
    ("requests", "requests", lambda r: _fmt_int(r["requests"])),
    ("errors", "errors", lambda r: _fmt_int(r["errors"])),
    ("err%", "error_rate", lambda r: f"{100 * r['error_rate']:.2f}"),
    # What else failed for the clients: the proxy's refusals, Z.AI's 429s, other 4xx.
    ("refused%", "proxy_429_rate", lambda r: _fmt_pct(r.get("proxy_429_rate"))),
    ("zai429%", "zai_429_rate", lambda r: _fmt_pct(r.get("zai_429_rate"))),
    ("4xx%", "other_4xx_rate", lambda r: _fmt_pct(r.get("other_4xx_rate"))),
    ("avg ms", "latency_ms_avg", lambda r: _fmt_ms(r["latency_ms_avg"])),
    ("p95 ms", "latency_ms_p95", lambda r: _fmt_ms(r["latency_ms_p95"])),
    ("max ms", "latency_ms_max", lambda r: _fmt_ms(r["latency_ms_max"])),
    ("in tok", "input_tokens", lambda r: _fmt_int(r["input_tokens"])),
    ("out tok", "output_tokens", lambda r: _fmt_int(r["output_tokens"])),
    ("cache rd", "cache_read_tokens", lambda r: _fmt_int(r["cache_read_tokens"])),
    ("cost $", "cost_usd", lambda r: f"{r['cost_usd']:,.4f}"),
)


def render_summary(doc: dict[str, Any], out: TextIO) -> None:
    """One summary as an aligned text table."""
    group = doc["group_by"]
    table = [[f"by {group}", *(title for title, _, _ in _COLUMNS)]]
    for row in doc["rows"]:
        label = row[group]
        table.append(["(none)" if label is None else str(label),
                      *(fmt(row) for _, _, fmt in _COLUMNS)])
    table.append(["TOTAL", *(fmt(doc["total"]) for _, _, fmt in _COLUMNS)])
    _aligned(table, out)


def _aligned(table: list[list[str]], out: TextIO, right: list[bool] | None = None, *,
             rule: bool = False) -> None:
    """Rows of cells in columns: the first (labels) left-aligned, the others right-aligned
    (numbers), unless ``right`` says per column; ``rule``: dashes under the header."""
    sides = right or [False] + [True] * (len(table[0]) - 1)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    if rule:
        table = [table[0], ["-" * w for w in widths], *table[1:]]
    for r in table:
        out.write("  ".join(c.rjust(w) if side else c.ljust(w)
                            for c, w, side in zip(r, widths, sides, strict=True)).rstrip() + "\n")


# ---- zaiproxy history --db: a collector's database ---------------------------------------

def _share(kind: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: _fmt_pct(r["failure_shares"][kind])


def _num(name: str, spec: str = ",.0f") -> Callable[[dict[str, Any]], str]:
    return lambda r: format(r[name], spec)


# The fleet's counters are what /metrics counts: errors are 5xx answers there (the history's
# err% also counts streams the upstream cut), beside the other kinds of failure.
_FLEET_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("targets", _num("targets", "d")),
    ("requests", _num("requests")),
    ("req/s", _num("requests_per_s", ",.2f")),
    ("5xx%", _share("5xx")),
    ("refused%", _share("proxy_429")),
    ("zai429%", _share("zai_429")),
    ("4xx%", _share("other_4xx")),
    ("p50 ms", lambda r: _fmt_ms(r["latency_ms_p50"])),
    ("p95 ms", lambda r: _fmt_ms(r["latency_ms_p95"])),
    ("p99 ms", lambda r: _fmt_ms(r["latency_ms_p99"])),
    ("ttft p95", lambda r: _fmt_ms(r["ttft_ms_p95"])),
    ("in tok", _num("tokens_in")),
    ("out tok", _num("tokens_out")),
    ("cache tok", _num("tokens_cache")),
    ("cost $", _num("cost_usd", ",.4f")),
)


def render_fleet_summary(doc: dict[str, Any], out: TextIO) -> None:
    """A collector's summary (fleet/collector_store.py's ``read_summary``): per variant with
    the fleet's total, then per target."""
    rng = doc["range"]
    where = (f"prometheus ({doc['prometheus']}; counts are increase() estimates)"
             if doc["source"] == "prometheus" else f"collector ({doc['db']}, read-only)")
    out.write(f"{rng['start']} .. {rng['end']}  variant: {doc['variant'] or 'all'}  "
              f"source: {where}\n\n")
    titles = [title for title, _ in _FLEET_COLUMNS]
    table = [["by variant", *titles]]
    table += [[row["variant"], *(fmt(row) for _, fmt in _FLEET_COLUMNS)]
              for row in doc["variants"]]
    table.append(["TOTAL", *(fmt(doc["total"]) for _, fmt in _FLEET_COLUMNS)])
    _aligned(table, out)
    if "targets" not in doc:  # Prometheus: the targets it scrapes now, down ones named
        down = doc["total"].get("targets_down") or []
        if down:
            out.write(f"\ntargets down now: {', '.join(down)}\n")
        if not doc["variants"]:
            out.write("\nno series of the proxy's in this Prometheus for the range\n")
        return
    table = [["by target", *titles[1:]]]  # one target a row: no "targets" column
    table += [[f"{row['target']} ({row['variant']})",
               *(fmt(row) for _, fmt in _FLEET_COLUMNS[1:])] for row in doc["targets"]]
    out.write("\n")
    _aligned(table, out)
    if not doc["variants"]:
        out.write("\nno scrapes in the range (the collector stores a target's rates from its "
                  "second scrape on)\n")


# ---- zaiproxy history sql: the answer as a table, CSV or JSON ------------------------------

def _text(v: Any) -> str:
    """A JSON-safe value (recorder/sql.py's ``json_value``) as text: NULL, true/false,
    nested values as JSON."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict | list):
        return orjson.dumps(v).decode()
    return str(v)


def render_rows(doc: dict[str, Any], out: TextIO) -> None:
    """An answer of ``history sql`` as an aligned table (numbers right-aligned), and a line
    that says how many rows, whether there were more, and how long it took."""
    rows = doc["rows"]
    columns = doc["columns"]
    cells = []
    for row in rows:
        line = []
        for v in row:
            text = _text(v).replace("\n", "\\n")
            line.append(text if len(text) <= CELL_WIDTH else text[:CELL_WIDTH - 1] + "…")
        cells.append(line)
    if columns:
        right = [all((isinstance(row[i], int | float) and not isinstance(row[i], bool))
                     or row[i] is None for row in rows) and bool(rows)
                 for i in range(len(columns))]
        _aligned([list(columns), *cells], out, right, rule=True)
    count = len(rows)
    shown = f"{count:,} row{'' if count == 1 else 's'}"
    if doc["truncated"]:
        shown = f"the first {shown}: more matched (--max-rows)"
    out.write(f"({shown}; {doc['elapsed_s']:.3f}s)\n")


def write_csv(doc: dict[str, Any], out: TextIO) -> None:
    """The answer as CSV: a header row, then the rows (NULL as an empty field)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(doc["columns"])
    for row in doc["rows"]:
        writer.writerow(["" if v is None else _text(v) for v in row])


def run(ns: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None, *,
        collector_summary: CollectorSummary | None = None,
        prometheus_summary: PrometheusSummary | None = None) -> int:
    """``zaiproxy history``; ``collector_summary``: how ``--db`` reads a collector's database
    (``fleet.collector_store.read_summary``), ``prometheus_summary``: how ``--prometheus``
    reads a fleet's (``fleet.prom_summary.read_summary``); both passed in by the command
    line: the fleet wing is above this one."""
    # Looked up per call, not bound at import: a caller that redirected them is obeyed.
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if getattr(ns, "prometheus", None) is not None:
        return _run_prometheus(ns, out, err, prometheus_summary)
    if getattr(ns, "db", None) is not None:
        return _run_db(ns, out, err, collector_summary)
    from zaiproxy.core.config import ConfigError, load_config
    from zaiproxy.core.durations import DurationError, parse_duration

    try:
        config, _ = load_config({"demo": True} if ns.demo else {}, path=ns.config,
                                require_api_key=False)
    except ConfigError as exc:
        err.write(f"zaiproxy: invalid configuration:\n{exc}\n")
        return 2
    try:
        range_s = parse_duration(ns.range)
    except DurationError as exc:
        err.write(f"zaiproxy history: {exc}\n")
        return 2
    path = os.path.abspath(ns.path or config.history_path)
    url = ns.url or _endpoint_url(path)
    source = _Source(path, url, ns.token or config.admin_token, config.history_raw_days)
    if getattr(ns, "history_command", None) == "sql":
        return _run_sql(ns, source, out, err, explicit_url=bool(ns.url))
    groups = ns.group_by or list(DEFAULT_GROUPS)
    try:
        return _run(ns, source, range_s, groups, out, err)
    finally:
        source.close()


def _run_sql(ns: argparse.Namespace, source: _Source, out: TextIO, err: TextIO, *,
             explicit_url: bool, holder: str = "recorder") -> int:
    import duckdb

    from zaiproxy.core.durations import DurationError, parse_duration
    from zaiproxy.http.client import ClientError, ConnectFailed
    from zaiproxy.observe.recorder.endpoint import EndpointError
    from zaiproxy.observe.recorder.sql import SqlError, limits

    try:
        timeout, max_rows = limits(parse_duration(ns.timeout), ns.max_rows)
    except (DurationError, SqlError) as exc:
        err.write(f"zaiproxy history sql: {exc}\n")
        return 2
    while True:
        try:
            doc = source.sql(ns.query, timeout, max_rows)
            break
        except SqlError as exc:
            return _sql_failed(err, exc.kind, exc.message)
        except EndpointError as exc:
            kind = exc.kind or ("invalid" if exc.status == 400 else "unavailable")
            if exc.status == 401:
                return _sql_failed(err, "unauthorized",
                                   f"the recorder answered 401: {exc.message} (--token)")
            return _sql_failed(err, kind, exc.message)
        except ConnectFailed as exc:
            if source.url is not None and not explicit_url:
                source.url = None  # a stale endpoint file (the proxy is gone): the file itself
                continue
            err.write(f"zaiproxy history sql: the recorder did not answer: {exc}\n")
            return 1
        except (OSError, ClientError) as exc:
            err.write(f"zaiproxy history sql: the recorder did not answer: {exc}\n")
            return 1
        except duckdb.Error as exc:
            err.write(f"zaiproxy history sql: {_file_error(exc, source.path, holder)}\n")
            return 1
    if ns.format == "json":
        out.write(orjson.dumps(doc).decode() + "\n")
    elif ns.format == "csv":
        write_csv(doc, out)
    else:
        render_rows(doc, out)
    if doc["truncated"] and ns.format != "table":
        err.write(f"zaiproxy history sql: the first {len(doc['rows']):,} rows; more matched "
                  "(--max-rows)\n")
    return 0


def _sql_failed(err: TextIO, kind: str, message: str) -> int:
    """One line on stderr; exit 2 when the query itself is at fault (refused, or DuckDB
    could not run it), 1 when it could not be answered (time limit, access, availability)."""
    first = message.strip().splitlines()[0] if message.strip() else kind
    err.write(f"zaiproxy history sql: {first}\n")
    return 2 if kind in ("refused", "invalid") else 1


# What to do when a file is locked, by who holds it.
_LOCK_HINTS = {
    "recorder": "a running proxy's recorder holds the file; its endpoint did not answer: "
                "pass --url, or stop the proxy",
    "collector": "a running `zaiproxy collect` holds the file: ask its admin API instead "
                 "(GET <its URL>/admin/history?range=1h, or `zaiproxy tui --url <its URL>`; "
                 "the URL is the first line it prints), or stop it",
}


def _file_error(exc: BaseException, path: str, holder: str) -> str:
    """One line (and a hint) for a file that could not be opened read-only."""
    reason = str(exc).splitlines()[0]
    if not os.path.exists(path):
        return (f"no collector database at {path}" if holder == "collector"
                else f"no history file at {path}")
    if "lock" in reason.lower():
        reason += f"\n  ({_LOCK_HINTS[holder]})"
    return reason


def _run_db(ns: argparse.Namespace, out: TextIO, err: TextIO,
            collector_summary: CollectorSummary | None) -> int:
    """``--db FILE``: a collector's database, read-only (summaries, or ``sql``)."""
    path = os.path.abspath(ns.db)
    given = [flag for flag, value in (("--path", getattr(ns, "path", None)),
                                      ("--url", getattr(ns, "url", None)),
                                      ("--demo", getattr(ns, "demo", False))) if value]
    if given:
        err.write(f"zaiproxy history: --db reads a collector's database; {', '.join(given)} "
                  "name a proxy's history\n")
        return 2
    if getattr(ns, "history_command", None) == "sql":
        return _run_sql(ns, _Source(path, None, None, 0.0), out, err, explicit_url=False,
                        holder="collector")
    if ns.export is not None or ns.group_by:
        err.write("zaiproxy history: --db summarises per variant and per target; --by and "
                  "--export are for a proxy's history (or use `zaiproxy history sql --db`)\n")
        return 2
    if collector_summary is None:
        err.write("zaiproxy history: --db needs the collector's reader (the `zaiproxy` "
                  "command passes it)\n")
        return 2
    range_s = _range_s(ns, err)
    if range_s is None:
        return 2
    import duckdb

    from zaiproxy.observe.recorder.schema import SchemaError

    try:
        doc = collector_summary(path, range_s, ns.variant, time.time())
    except duckdb.Error as exc:
        err.write(f"zaiproxy history: {_file_error(exc, path, 'collector')}\n")
        return 1
    except SchemaError as exc:
        err.write(f"zaiproxy history: {exc}\n")
        return 1
    return _print_fleet(ns, doc, out)


def _range_s(ns: argparse.Namespace, err: TextIO) -> float | None:
    """``--range`` in seconds, or None after saying why it is not one."""
    from zaiproxy.core.durations import DurationError, parse_duration

    try:
        return parse_duration(ns.range)
    except DurationError as exc:
        err.write(f"zaiproxy history: {exc}\n")
        return None


def _print_fleet(ns: argparse.Namespace, doc: dict[str, Any], out: TextIO) -> int:
    if ns.json:
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render_fleet_summary(doc, out)
    return 0


def _run_prometheus(ns: argparse.Namespace, out: TextIO, err: TextIO,
                    prometheus_summary: PrometheusSummary | None) -> int:
    """``--prometheus URL``: a fleet's summaries per variant from its Prometheus."""
    given = [flag for flag, value in (("--path", getattr(ns, "path", None)),
                                      ("--url", getattr(ns, "url", None)),
                                      ("--db", getattr(ns, "db", None)),
                                      ("--demo", getattr(ns, "demo", False))) if value]
    if given or getattr(ns, "history_command", None) == "sql" or ns.export or ns.group_by:
        what = ", ".join(given) or "sql, --by and --export"
        err.write(f"zaiproxy history: --prometheus summarises a fleet per variant; {what} "
                  "are for a proxy's history or a collector's database\n")
        return 2
    if prometheus_summary is None:
        err.write("zaiproxy history: --prometheus needs the fleet's reader (the `zaiproxy` "
                  "command passes it)\n")
        return 2
    range_s = _range_s(ns, err)
    if range_s is None:
        return 2
    try:
        doc = prometheus_summary(ns.prometheus, range_s, ns.variant, time.time(),
                                 token=ns.token)
    except Exception as exc:  # the reader's SourceError: one line, exit 1 (as canary-check)
        err.write(f"zaiproxy history: {exc}\n")
        return 1
    return _print_fleet(ns, doc, out)


def _run(ns: argparse.Namespace, source: _Source, range_s: float, groups: list[str],
         out: TextIO, err: TextIO) -> int:
    import duckdb

    from zaiproxy.http.client import ClientError
    from zaiproxy.observe.recorder.endpoint import EndpointError
    from zaiproxy.observe.recorder.schema import SchemaError

    for attempt in (1, 2):
        try:
            if ns.export is not None:
                fmt, target = ns.export
                if fmt != "parquet":
                    err.write("zaiproxy history: --export supports parquet only\n")
                    return 2
                size = source.export(range_s, ns.variant, target)
                err.write(f"wrote {target} ({size:,} bytes) from {source.describe()}\n")
                return 0
            docs = [source.summary(range_s, ns.variant, g) for g in groups]
            missing = {} if ns.json else source.unrecorded()
            break
        except EndpointError as exc:
            err.write(f"zaiproxy history: the recorder answered {exc}\n")
            return 1
        except (OSError, ClientError) as exc:
            if source.url is not None and attempt == 1 and not ns.url:
                # A stale endpoint file (the proxy is gone): read the file itself.
                source.url = None
                continue
            err.write(f"zaiproxy history: {exc}\n")
            return 1
        except (duckdb.Error, SchemaError) as exc:
            reason = str(exc).splitlines()[0]
            if "lock" in reason.lower():
                reason += ("\n  (a running proxy's recorder holds the file; its endpoint "
                           "did not answer: pass --url, or stop the proxy)")
            if not os.path.exists(source.path):
                reason = f"no history file at {source.path}"
            err.write(f"zaiproxy history: {reason}\n")
            return 1
    if ns.json:
        out.write(orjson.dumps(docs, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    first = docs[0]
    rng = first["range"]
    out.write(f"{rng['start']} .. {rng['end']}  variant: {first['variant'] or 'all'}  "
              f"source: {first['source']} ({source.describe()})\n")
    for doc in docs:
        out.write("\n")
        render_summary(doc, out)
    # Each summary carries it (a recorder older than schema v6 answers none).
    render_zai_quota(first.get("zai_quota") or [], time.time(), out)
    render_unrecorded(missing, ns.variant, out)
    return 0


_WINDOW_LABELS = {"five_hour": "5h", "weekly": "weekly"}


def _utc(t: float, now: float, spec: str) -> str:
    """A UTC time of day (the range line above is in UTC), dated when not within a day."""
    return time.strftime(spec if abs(t - now) < 86400 else f"%Y-%m-%d {spec}", time.gmtime(t))


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f} %"  # Z.AI reports token windows in whole percent


def _ago(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def render_zai_quota(entries: list[dict[str, Any]], now: float, out: TextIO) -> None:
    """A line per upstream key: its latest Z.AI quota sample (a summary's ``zai_quota``),
    each window's used share, the proxy's own count of it when it keeps one (``local``) and
    when it resets; a sample older than the range or than 15 minutes says it is stale."""
    if not entries:
        return
    out.write("\n")
    for entry in entries:
        windows = []
        for w in entry["windows"]:
            text = f"{_WINDOW_LABELS.get(w['window'], w['window'])} {_percent(w['used_fraction'])}"
            if w.get("local_used_fraction") is not None:
                text += f" (local {_percent(w['local_used_fraction'])})"
            if w.get("reset_at") is not None:
                text += f", resets {_utc(w['reset_at'], now, '%H:%M')}"
            windows.append(text)
        sampled = _utc(entry["sampled_at"], now, "%H:%M:%S") + " UTC"
        if entry.get("stale"):
            sampled += f", stale: {_ago(entry['age_s'])} old"
        out.write(f"Z.AI quota (sampled {sampled}): {entry['upstream']} "
                  f"{'; '.join(windows) or 'no windows'}\n")


def render_unrecorded(missing: dict[str, dict[str, int]], variant: str | None,
                      out: TextIO) -> None:
    """A line per variant whose requests did not all become rows (nothing when all did)."""
    lines = []
    for name, counts in sorted(missing.items()):
        if (variant is None or name == variant) and (counts["dropped"] or counts["lost"]):
            lines.append(f"  {name}: {counts['dropped']:,} dropped (channel full), "
                         f"{counts['lost']:,} lost (a recorder died holding them)\n")
    if lines:
        out.write("\nnot in the history (since the file began):\n" + "".join(lines))
