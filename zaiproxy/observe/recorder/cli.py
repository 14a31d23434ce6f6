"""``zaiproxy history``: summaries of the request history, and Parquet export.

Asks the running proxy's recorder (its endpoint URL is in
``<history_path>.endpoint``) when there is one, because DuckDB lets nobody else
open the file then; otherwise opens the file itself, read-only.
"""

from __future__ import annotations

import argparse
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


def add_parser(sub: Any) -> None:
    p = sub.add_parser("history", help="summaries of the request history (DuckDB)")
    p.add_argument("--range", default="24h", help="how far back: 15m, 1h, 24h, 7d (default 24h)")
    p.add_argument("--variant", help="only this deployment variant")
    p.add_argument("--by", action="append", choices=GROUP_NAMES, dest="group_by",
                   help="group by this (repeatable; default: key, model, status, variant)")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "FILE"),
                   help="write the raw rows of the range to FILE (FORMAT: parquet)")
    p.add_argument("--path", help="history file (default: history_path from the config)")
    p.add_argument("--demo", action="store_true",
                   help="the demo proxy's history (`zaiproxy serve --demo`, `make run` without "
                        "ZAI_API_KEY): it keeps its own file")
    p.add_argument("--url", help="a recorder endpoint to ask (default: from <path>.endpoint)")
    p.add_argument("--token", default=None,
                   help="admin token for the recorder's endpoint, like `zaiproxy tui --token` "
                        "(default: the config's admin_token, env ZAIPROXY_ADMIN_TOKEN)")
    p.add_argument("--config", help="TOML config file (also ZAIPROXY_CONFIG)")


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
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        out.write("  ".join([r[0].ljust(widths[0])]
                            + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)])
                  .rstrip() + "\n")


def run(ns: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
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
    groups = ns.group_by or list(DEFAULT_GROUPS)
    try:
        return _run(ns, source, range_s, groups, out, err)
    finally:
        source.close()


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
    render_unrecorded(missing, ns.variant, out)
    return 0


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
