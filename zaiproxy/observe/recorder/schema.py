"""The history file's schema, versioned and migrated on open.

``schema_version`` holds one row per migration applied (version, when, what).
A file without it is version 0: empty, as a fresh ``duckdb.connect`` makes it.
:func:`migrate` applies every :class:`Migration` above the file's version, in
order, each in its own transaction together with its ``schema_version`` row, so
a migration that fails leaves the file at the version before it. A file from a
newer zaiproxy (version above :data:`SCHEMA_VERSION`) is refused, never written:
an old binary must not "repair" a table it does not know.

A new schema version is one more :class:`Migration` appended to
:data:`MIGRATIONS` (``ALTER TABLE``, backfills); never edit a released one.

Timings the proxy does not measure for a request (``ttft_ms`` of a request that was
never relayed, say) are NULL.

The history is API traffic (v3): ``requests`` and ``requests_1m`` hold the requests whose
record carried an API (recorder/sink.py hands over nothing else), never the proxy's own
routes (``/health``, ``/ready``, ``/metrics``, ``/admin/*``), so every query, summary,
p95 and in-flight estimate over them is about what the proxy served.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import duckdb

from zaiproxy.observe.snapshot import LEGACY_CONTROL_PATHS, LEGACY_CONTROL_PREFIX

# The DuckDB storage format files are created in: the newest that the current stable DuckDB
# command-line tool reads (duckdb-cli 1.5.x reads storage versions 64 to 68; the Python
# package 2.x writes 69 by default, which that CLI refuses). DuckDB keeps a file in the format
# it was created with, so this decides only at creation. `make test` opens a history file
# the recorder wrote with the stock CLI (tests/test_history_cli.py).
STORAGE_COMPATIBILITY: Final = "v1.5.0"


def connect(path: str, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection to a DuckDB file of this project (history or collector): a file created
    here is in :data:`STORAGE_COMPATIBILITY`'s format."""
    if read_only:
        return duckdb.connect(path, read_only=True)
    return duckdb.connect(path, config={"storage_compatibility_version": STORAGE_COMPATIBILITY})


class SchemaError(Exception):
    """The file's schema cannot be used by this version (it is newer)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int  # the version the file has after this step
    description: str
    apply: Callable[[duckdb.DuckDBPyConnection], None]


# The column order of ``requests`` is the appender's row order (store.db_row).
REQUESTS_COLUMNS: Final = (
    ("ts", "TIMESTAMPTZ NOT NULL"),  # when the request finished (the worker's wall clock)
    ("variant", "VARCHAR NOT NULL"),
    ("worker", "SMALLINT"),
    ("request_id", "VARCHAR"),
    ("method", "VARCHAR"),
    ("route", "VARCHAR"),  # the route template, never the raw path
    ("model", "VARCHAR"),
    ("key_alias", "VARCHAR"),
    ("stream", "BOOLEAN"),
    ("status", "SMALLINT"),  # what the client got; 499 = it left first
    ("upstream_status", "SMALLINT"),
    ("result", "VARCHAR"),  # ok | client_disconnected | upstream_cut | ...; NULL: not proxied
    ("error_class", "VARCHAR"),  # Z.AI 429 class (concurrency, frequency, overload, quota, ...)
    ("error_code", "VARCHAR"),  # Z.AI business code (1302, 1308, ...)
    ("error", "VARCHAR"),  # the proxy's own error message (truncated)
    ("latency_ms", "DOUBLE"),  # whole request, as the client saw it
    ("ttft_ms", "DOUBLE"),  # request start -> first response body byte relayed
    ("upstream_ttfb_ms", "DOUBLE"),  # upstream response headers
    ("upstream_ms", "DOUBLE"),  # request sent upstream -> its response ended
    ("overhead_ms", "DOUBLE"),  # latency - upstream: the proxy's own time (as in /metrics)
    ("queue_wait_ms", "DOUBLE"),  # waited in the admission queue for a limit
    ("token_count_ms", "DOUBLE"),  # spent estimating the prompt's tokens
    ("input_tokens", "BIGINT"),
    ("output_tokens", "BIGINT"),
    ("cache_read_tokens", "BIGINT"),
    ("cache_write_tokens", "BIGINT"),
    ("tokens_estimated", "BOOLEAN"),  # counted by the proxy, upstream sent no usage
    ("prompt_estimate", "BIGINT"),  # the proxy's tiktoken estimate of the prompt
    ("bytes_in", "BIGINT"),
    ("bytes_out", "BIGINT"),
    ("cost_usd", "DOUBLE"),  # estimated from the price table (zaiproxy.core.pricing)
    ("retries", "INTEGER"),  # Z.AI 429s retried by the proxy
    ("stale_retry", "BOOLEAN"),  # a stale pooled connection was replaced once
    # openai | anthropic (v3, the record's API: which usage counts cached tokens inside the
    # input); NULL in rows written before v3.
    ("api", "VARCHAR"),
    # v4: the model the client asked for when a 1312 fallback (upstream.model_fallback) sent
    # the request to ``model`` instead; NULL otherwise.
    ("requested_model", "VARCHAR"),
    ("upstream", "VARCHAR"),  # the pool's upstream key alias (v5)
)

SNAPSHOT_COLUMNS: Final = (
    ("ts", "TIMESTAMPTZ NOT NULL"),
    ("variant", "VARCHAR NOT NULL"),
    # Running totals of the records this recorder wrote for the variant; they continue
    # across recorder restarts (start from the file's last snapshot), like counters.
    ("requests_total", "BIGINT NOT NULL"),
    ("errors_total", "BIGINT NOT NULL"),  # status >= 500 or a broken relay (store.ERROR_SQL)
    ("input_tokens_total", "BIGINT NOT NULL"),
    ("output_tokens_total", "BIGINT NOT NULL"),
    ("cache_read_tokens_total", "BIGINT NOT NULL"),
    ("cache_write_tokens_total", "BIGINT NOT NULL"),
    # Mean requests in flight over the interval (Little's law from the finished requests'
    # durations); requests still running at the snapshot are not in it.
    ("in_flight", "DOUBLE NOT NULL"),
    ("dropped_total", "BIGINT NOT NULL"),  # records the workers dropped (channel full)
    # Records sent and never written: a recorder died holding them (schema v2; counted from
    # the sequence numbers by the recorder after it, see recorder/sequence.py).
    ("lost_total", "BIGINT DEFAULT 0"),
)

# Schema v2 (recorder/sequence.py). Both tables are logs: each transaction that writes
# rows appends a row per worker incarnation whose progress moved, and one per variant
# whose totals did (a plain INSERT: an upsert costs ~10 ms per transaction here, this
# ~1.5 ms); the newest row per key (``txn``) counts, HistoryStore.compact() deletes the
# others once a minute. Written in the same transaction as the rows, so after a kill the
# recorder knows exactly what the file has.
PROGRESS_COLUMNS: Final = (
    ("txn", "BIGINT NOT NULL"),  # the transaction's number in this file (newest wins)
    ("worker", "SMALLINT NOT NULL"),
    ("pid", "INTEGER NOT NULL"),
    ("nonce", "BIGINT NOT NULL"),
    # The channel's id (one per `zaiproxy serve`): rows of other runs are deleted when the
    # recorder opens the file, their workers cannot send again.
    ("run", "VARCHAR NOT NULL"),
    ("variant", "VARCHAR NOT NULL"),
    ("next_seq", "BIGINT NOT NULL"),  # rows 0 .. next_seq - 1 are in the file or counted
    ("dropped", "BIGINT NOT NULL"),  # of which the worker dropped (channel full)
    ("lost", "BIGINT NOT NULL"),  # of which were lost in a recorder that died
    ("updated_at", "TIMESTAMPTZ NOT NULL"),
)
# The snapshots' running totals as of each transaction (the snapshot every 5 s copies
# them): a recorder killed between two snapshots used to lose up to 5 s of counts.
TOTALS_COLUMNS: Final = (
    ("txn", "BIGINT NOT NULL"),
    ("variant", "VARCHAR NOT NULL"),
    ("requests_total", "BIGINT NOT NULL"),
    ("errors_total", "BIGINT NOT NULL"),
    ("input_tokens_total", "BIGINT NOT NULL"),
    ("output_tokens_total", "BIGINT NOT NULL"),
    ("cache_read_tokens_total", "BIGINT NOT NULL"),
    ("cache_write_tokens_total", "BIGINT NOT NULL"),
    ("dropped_total", "BIGINT NOT NULL"),
    ("lost_total", "BIGINT NOT NULL"),
)

# Schema v6: Z.AI's own quota (limits/zai_quota.py), one row per upstream key and window each
# time the poller's sample for that key is new (recorder/quota.py), beside the proxy's own
# count of the same window. The window is ``quota_window`` (``window`` is a reserved word in SQL).
ZAI_QUOTA_COLUMNS: Final = (
    ("ts", "TIMESTAMPTZ NOT NULL"),  # the sample's time (when the poll succeeded)
    ("variant", "VARCHAR NOT NULL"),
    ("upstream", "VARCHAR NOT NULL"),  # the upstream key's alias ("default" without a pool)
    ("quota_window", "VARCHAR NOT NULL"),  # five_hour | weekly
    ("limit_type", "VARCHAR NOT NULL"),  # TOKENS_LIMIT | CREDIT_LIMIT
    ("used_fraction", "DOUBLE NOT NULL"),  # Z.AI's used share, 0..1
    ("reset_at", "TIMESTAMPTZ"),
    ("plan_tier", "VARCHAR"),
    # The proxy's own rolling window of that key (upstream_*_per_5h / _per_week), the higher
    # share of requests and tokens; NULL when no such limit is configured.
    ("local_used_fraction", "DOUBLE"),
)

ROLLUP_KEY: Final = ("minute", "variant", "route", "model", "key_alias", "status")
ROLLUP_COLUMNS: Final = (
    ("minute", "TIMESTAMPTZ NOT NULL"),
    ("variant", "VARCHAR NOT NULL"),
    ("route", "VARCHAR NOT NULL"),
    ("model", "VARCHAR NOT NULL"),  # '' when the request named none
    ("key_alias", "VARCHAR NOT NULL"),  # '' in open mode
    ("status", "SMALLINT NOT NULL"),
    ("status_class", "VARCHAR NOT NULL"),  # '2xx', '4xx', ...
    ("requests", "BIGINT NOT NULL"),
    ("errors", "BIGINT NOT NULL"),
    ("latency_ms_sum", "DOUBLE NOT NULL"),
    ("latency_ms_max", "DOUBLE NOT NULL"),
    ("latency_ms_p95", "DOUBLE NOT NULL"),  # exact within the minute (from the raw rows)
    ("input_tokens", "BIGINT NOT NULL"),
    ("output_tokens", "BIGINT NOT NULL"),
    ("cache_read_tokens", "BIGINT NOT NULL"),
    ("cache_write_tokens", "BIGINT NOT NULL"),
    ("cost_usd", "DOUBLE NOT NULL"),
)


def _table(name: str, columns: Sequence[tuple[str, str]], extra: str = "",
           *, quoted: bool = False) -> str:
    """``quoted``: every column name in double quotes (a name that is a reserved word)."""
    body = ",\n  ".join(f'"{col}" {kind}' if quoted else f"{col} {kind}"
                        for col, kind in columns)
    return f"CREATE TABLE {name} (\n  {body}{extra}\n)"


def _v1(con: duckdb.DuckDBPyConnection) -> None:
    # v1's columns; v3 adds api, v4 requested_model, v5 upstream
    con.execute(_table("requests", REQUESTS_COLUMNS[:-3]))
    con.execute(_table("snapshots", SNAPSHOT_COLUMNS[:-1]))  # v1's columns; v2 adds lost_total
    con.execute(_table("requests_1m", ROLLUP_COLUMNS,
                       f",\n  PRIMARY KEY ({', '.join(ROLLUP_KEY)})"))
    # What the rollup has covered: minutes before ``rolled_until`` are final unless a late
    # row arrives for them (store.HistoryStore re-rolls those minutes).
    con.execute("CREATE TABLE recorder_state (name VARCHAR PRIMARY KEY, value DOUBLE NOT NULL)")


def _v2(con: duckdb.DuckDBPyConnection) -> None:
    # DuckDB adds no NOT NULL column to a table with rows; the default fills the old ones
    # and the writer always sets it.
    con.execute("ALTER TABLE snapshots ADD COLUMN lost_total BIGINT DEFAULT 0")
    con.execute(_table("recorder_progress", PROGRESS_COLUMNS))
    con.execute(_table("recorder_totals", TOTALS_COLUMNS))
    # Continue the totals from each variant's last snapshot.
    con.execute("""
        INSERT INTO recorder_totals
        SELECT 0, variant, requests_total, errors_total, input_tokens_total, output_tokens_total,
               cache_read_tokens_total, cache_write_tokens_total, dropped_total, 0
        FROM snapshots
        QUALIFY row_number() OVER (PARTITION BY variant ORDER BY ts DESC) = 1
    """)


# Rows of the proxy's own routes, as files before v3 have them: the record did not carry its
# API yet, so the route template (the only trace left) tells them apart. For those files only:
# v3 deletes these rows, and a file read as it is (read-only, not migrated) is filtered by it.
_ROUTE = "coalesce(route, '')"
LEGACY_CONTROL_SQL: Final = (
    f"({_ROUTE} IN ({', '.join(repr(p) for p in sorted(LEGACY_CONTROL_PATHS))})"
    f" OR starts_with({_ROUTE}, '{LEGACY_CONTROL_PREFIX}'))")


def _v3(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("ALTER TABLE requests ADD COLUMN api VARCHAR")
    # The history is API traffic from now on. Control routes' rows are deleted, not kept
    # aside: one /admin/events stream open for 11 minutes was a row that moved the p95 of
    # every range holding it, and its minute's rollup carried it on for 90 days. Their
    # running totals in snapshots stay (counters never go back).
    con.execute(f"DELETE FROM requests WHERE {LEGACY_CONTROL_SQL}")
    con.execute(f"DELETE FROM requests_1m WHERE {LEGACY_CONTROL_SQL}")


def _v4(con: duckdb.DuckDBPyConnection) -> None:
    # NULL in the rows before: no request fell back to another model before v4.
    con.execute("ALTER TABLE requests ADD COLUMN requested_model VARCHAR")


def _v5(con: duckdb.DuckDBPyConnection) -> None:
    # NULL in the rows before: no pool of upstream keys before v5.
    con.execute("ALTER TABLE requests ADD COLUMN upstream VARCHAR")


def _v6(con: duckdb.DuckDBPyConnection) -> None:
    # A new table: the rows before v6 are untouched (Z.AI's quota was not recorded then).
    con.execute(_table("zai_quota", ZAI_QUOTA_COLUMNS, quoted=True))


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "requests, snapshots, requests_1m, recorder_state", _v1),
    Migration(2, "sequence accounting: recorder_progress, recorder_totals, snapshots.lost_total",
              _v2),
    Migration(3, "requests.api; API traffic only: rows of /health, /ready, /metrics, /admin/* "
                 "deleted", _v3),
    Migration(4, "requests.requested_model (model fallback on 1312)", _v4),
    Migration(5, "requests.upstream (a pool of upstream keys)", _v5),
    Migration(6, "zai_quota: Z.AI's quota samples per upstream key and window, beside the "
                 "proxy's own count", _v6),
)
SCHEMA_VERSION: Final = MIGRATIONS[-1].version


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    found = con.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_name = 'schema_version' AND table_schema = 'main'").fetchone()
    if not found or not found[0]:
        return 0
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def migrate(con: duckdb.DuckDBPyConnection,
            migrations: Sequence[Migration] = MIGRATIONS,
            now: Callable[[], float] = time.time) -> list[int]:
    """Bring the file to the newest version; returns the versions applied (maybe none)."""
    newest = migrations[-1].version
    version = current_version(con)
    if version > newest:
        raise SchemaError(f"history file has schema version {version}; this zaiproxy "
                          f"knows up to {newest} (a newer zaiproxy wrote it)")
    applied: list[int] = []
    for step in migrations:
        if step.version <= version:
            continue
        con.begin()
        try:
            con.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                        "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL, "
                        "description VARCHAR NOT NULL)")
            step.apply(con)
            con.execute("INSERT INTO schema_version VALUES (?, to_timestamp(?), ?)",
                        [step.version, now(), step.description])
            con.commit()
        except BaseException:
            con.rollback()
            raise
        applied.append(step.version)
        version = step.version
    return applied
