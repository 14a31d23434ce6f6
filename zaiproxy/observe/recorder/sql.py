"""Read-only SQL over a DuckDB file of this project: ``zaiproxy history sql`` and the
recorder's ``POST /history/sql``.

Users ask their own questions of the live history, inside the process that writes it, so
nothing a query does may reach the writer or anything outside the file:

* **One plain query.** DuckDB's own parser decides (:func:`check`): one statement, of type
  SELECT (``WITH``, ``FROM``-first, ``VALUES``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE`` are
  SELECTs to it). DuckDB 2 also calls a ``WITH d AS (DELETE ... RETURNING *) SELECT ...``
  a SELECT, so the statement's syntax tree (``json_serialize_sql``) is walked as well:
  every query node in it must be a query, and every table function one of
  :data:`TABLE_FUNCTIONS` (no ``read_text``, ``query``, ``force_checkpoint``, logging or
  profiling switches).
* **A read-only transaction.** The query runs in ``BEGIN TRANSACTION READ ONLY`` on a
  connection of its own (the recorder: a cursor of the writer's connection), rolled back
  after: DuckDB itself refuses any write that got past the checks, and the writer's
  transactions never conflict with it (MVCC: the query reads a snapshot).
* **No file, network or extension access.** A file opened directly is opened read-only
  with external access off (:func:`open_read_only`); the recorder turns it off on its
  instance when it opens the file (:func:`lock_down`), keeping one private directory for
  its Parquet exports. So ``FROM '/path/keys.json'`` or ``read_text('/proc/self/environ')``
  (the upstream key is in the environment) cannot leak a key.
* **A time limit and a row cap.** A watchdog thread interrupts the connection at the
  deadline (``interrupt()``, again every :data:`INTERRUPT_EVERY` until the query has
  stopped, since an interrupt that lands before the query starts is forgotten); at most
  ``max_rows`` rows are fetched from DuckDB's streaming result, and the answer says whether
  there were more.

The answer is one JSON document: ``{columns, types, rows, truncated, elapsed_s}``, values
made JSON-safe by :func:`json_value`.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import duckdb
import orjson

DEFAULT_TIMEOUT: Final = 30.0
MAX_TIMEOUT: Final = 600.0
DEFAULT_MAX_ROWS: Final = 1000
MAX_ROWS: Final = 100_000
MAX_SQL: Final = 32 << 10  # characters of SQL (the endpoint reads bodies up to 64 KiB)
INTERRUPT_EVERY: Final = 0.05

# Table functions a query may call: generators and the catalog's own views. Everything else
# reads files (read_*, glob, parquet_*), runs SQL given as text (query, query_table,
# json_execute_serialized_sql) or changes the instance (checkpoints, logging, profiling).
TABLE_FUNCTIONS: Final = frozenset({
    "range", "generate_series", "unnest", "repeat", "json_each", "json_tree",
    "duckdb_columns", "duckdb_constraints", "duckdb_databases", "duckdb_functions",
    "duckdb_indexes", "duckdb_keywords", "duckdb_schemas", "duckdb_tables", "duckdb_types",
    "duckdb_views", "pragma_table_info", "pragma_database_size", "pragma_storage_info",
    "pragma_version", "pg_timezone_names",
})
_ALLOWED_SHORT: Final = ("range, generate_series, unnest, repeat, json_each, json_tree, "
                         "pragma_table_info, the duckdb_* catalog functions")
# The query nodes of a query; a data-modifying WITH clause has a DELETE/INSERT/UPDATE node.
QUERY_NODES: Final = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE",
                                "CTE_NODE"})
# A file opened by the command itself: read-only, and nothing outside it.
LOCKED_CONFIG: Final = {"enable_external_access": False, "autoload_known_extensions": False,
                        "autoinstall_known_extensions": False, "lock_configuration": True}
_KINDS_OF_QUERY: Final = "SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE"


class SqlError(Exception):
    """A query that was not run or did not finish. ``kind``: ``refused`` (not one plain
    query), ``invalid`` (DuckDB could not run it: syntax, names, types, a runtime error),
    ``timeout`` (stopped at the time limit), ``cancelled`` (its caller went away),
    ``unavailable`` (no connection to run it on)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


_parser: duckdb.DuckDBPyConnection | None = None
_parser_lock = threading.Lock()


def check(sql: str) -> None:
    """Raise :class:`SqlError` unless ``sql`` is one plain query (see the module docstring).

    Parses only, on an empty in-memory database of its own: the syntax tree of the file's
    instance would refuse to serialize what its storage format cannot hold (a
    data-modifying WITH in a v1.5.0 file) instead of showing it.
    """
    if len(sql) > MAX_SQL:
        raise SqlError("refused", f"the query is longer than {MAX_SQL:,} characters")
    global _parser
    with _parser_lock:
        if _parser is None:
            _parser = duckdb.connect(":memory:", config=dict(LOCKED_CONFIG))
        _check(_parser, sql)


def _check(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlError("invalid", _message(exc)) from None
    if not statements:
        raise SqlError("refused", "no SQL statement given")
    if len(statements) > 1:
        raise SqlError("refused", f"one statement at a time ({len(statements)} given)")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise SqlError("refused", f"only queries run here ({_KINDS_OF_QUERY}), not "
                                  f"{kind.name}: the history is read-only")
    try:
        row = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    except duckdb.Error as exc:
        raise SqlError("refused", f"the query could not be checked: {_message(exc)}") from None
    tree = _loads(row[0] if row else None)
    if not isinstance(tree, dict) or tree.get("error") is not False:
        reason = tree.get("error_message") if isinstance(tree, dict) else None
        raise SqlError("refused", f"the query could not be checked: {reason or 'no syntax tree'}")
    for node in _walk(tree.get("statements")):
        kind_name = node.get("type")
        if isinstance(kind_name, str) and kind_name.endswith("_NODE") \
                and kind_name not in QUERY_NODES:
            what = kind_name.removesuffix("_NODE").removesuffix("_QUERY")
            raise SqlError("refused", f"only queries run here: this one contains a {what} "
                                      "(a data-modifying WITH clause); the history is read-only")
        if kind_name == "TABLE_FUNCTION":
            function = node.get("function") or {}
            name = str(function.get("function_name", "")).lower()
            if name not in TABLE_FUNCTIONS or function.get("schema") or function.get("catalog"):
                raise SqlError("refused", f"table function {name}() is not allowed here: "
                                          "queries read the file's own tables (table "
                                          f"functions allowed: {_ALLOWED_SHORT})")


def _loads(text: Any) -> Any:
    try:
        return orjson.loads(text) if isinstance(text, str | bytes) else None
    except orjson.JSONDecodeError:
        return None


def _walk(tree: Any) -> Iterator[Mapping[str, Any]]:
    """Every JSON object in ``tree`` (iterative: a deep syntax tree is no recursion limit)."""
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _message(exc: BaseException) -> str:
    """DuckDB's message (its first line names the error; the lines after point into the
    query, which is the user's own)."""
    return str(exc).strip() or type(exc).__name__


def open_read_only(path: str) -> duckdb.DuckDBPyConnection:
    """A read-only connection to ``path`` that can reach nothing but the file (no other
    file, no network, no extension, settings locked). Raises duckdb.Error (a file another
    process holds: "Could not set lock on file")."""
    return duckdb.connect(path, read_only=True, config=dict(LOCKED_CONFIG))


def lock_down(con: duckdb.DuckDBPyConnection, directories: Sequence[str] = ()) -> bool:
    """Turn off file, network and extension access for ``con``'s whole DuckDB instance,
    except for ``directories`` (the recorder's Parquet exports go through one). True when
    it is off (also when an earlier call turned it off: the instance outlives a connection).

    For the instance of a file opened read-write: the writer needs nothing outside the
    file, and what users' queries read must be the file alone.
    """
    try:
        if _external_access(con):
            quoted = ", ".join("'" + d.rstrip("/").replace("'", "''") + "/'" for d in directories)
            con.execute(f"SET allowed_directories = [{quoted}]")
            con.execute("SET autoinstall_known_extensions = false")
            con.execute("SET autoload_known_extensions = false")
            con.execute("SET enable_external_access = false")
        return not _external_access(con)
    except duckdb.Error:
        return False


def _external_access(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute("SELECT current_setting('enable_external_access')").fetchone()
    return bool(row and row[0])


class Query:
    """One user query on one connection, bounded in time and rows; :meth:`run` blocks (call
    it in a thread of its own), :meth:`cancel` may be called from any thread."""

    def __init__(self, con: duckdb.DuckDBPyConnection, sql: str, *,
                 timeout: float = DEFAULT_TIMEOUT, max_rows: int = DEFAULT_MAX_ROWS,
                 clock: Any = time.monotonic) -> None:
        """The time limit counts from here: time spent waiting for a thread counts too."""
        self.con = con
        self.sql = sql
        self.timeout = timeout
        self.max_rows = max_rows
        self.clock = clock
        self.deadline = clock() + timeout
        self.timed_out = False
        self.cancelled = False
        self._stop = threading.Event()  # cancel(), or the query has ended
        self._done = threading.Event()  # the query has ended: stop interrupting

    def cancel(self) -> None:
        self.cancelled = True
        self._stop.set()

    def run(self) -> dict[str, Any]:
        """The answer document; :class:`SqlError` when refused, invalid, too slow or
        cancelled. Leaves ``con`` outside any transaction."""
        check(self.sql)
        if self.cancelled:
            raise SqlError("cancelled", "the query was cancelled")
        if self.clock() >= self.deadline:
            raise self._timeout()
        try:
            self.con.execute("BEGIN TRANSACTION READ ONLY")
        except duckdb.Error as exc:
            raise SqlError("unavailable", _message(exc)) from None
        try:
            watchdog = threading.Thread(target=self._watch, name="sql-watchdog", daemon=True)
            watchdog.start()
            try:
                return self._fetch()
            except duckdb.InterruptException:
                if self.timed_out:
                    raise self._timeout() from None
                raise SqlError("cancelled", "the query was cancelled") from None
            except duckdb.Error as exc:
                raise SqlError("invalid", _message(exc)) from None
            finally:
                self._done.set()
                self._stop.set()
                watchdog.join()
        finally:
            try:
                self.con.execute("ROLLBACK")
            except duckdb.Error:
                pass  # the query's error ended the transaction already

    def _timeout(self) -> SqlError:
        return SqlError("timeout", f"the query ran longer than {self.timeout:g}s and was "
                                   "stopped (raise --timeout, or narrow it with WHERE ts > …)")

    def _fetch(self) -> dict[str, Any]:
        started = time.perf_counter()
        cur = self.con.execute(self.sql)
        description = cur.description or []
        rows = cur.fetchmany(self.max_rows + 1)
        truncated = len(rows) > self.max_rows
        del rows[self.max_rows:]
        return {
            "columns": [d[0] for d in description],
            "types": [str(d[1]) for d in description],
            "rows": [[json_value(v) for v in row] for row in rows],
            "truncated": truncated,
            "elapsed_s": round(time.perf_counter() - started, 6),
        }

    def _watch(self) -> None:
        if not self._stop.wait(max(0.0, self.deadline - self.clock())):
            self.timed_out = True
        while not self._done.is_set():
            self.con.interrupt()
            self._done.wait(INTERRUPT_EVERY)


def run(con: duckdb.DuckDBPyConnection, sql: str, *, timeout: float = DEFAULT_TIMEOUT,
        max_rows: int = DEFAULT_MAX_ROWS) -> dict[str, Any]:
    """:class:`Query` run at once on ``con`` (a file opened by :func:`open_read_only`)."""
    return Query(con, sql, timeout=timeout, max_rows=max_rows).run()


def limits(timeout: Any, max_rows: Any) -> tuple[float, int]:
    """Validated (timeout, max_rows); :class:`SqlError` ``refused`` naming the bad one."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
            or not 0 < timeout <= MAX_TIMEOUT or not math.isfinite(timeout):
        raise SqlError("refused", f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}]")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) \
            or not 1 <= max_rows <= MAX_ROWS:
        raise SqlError("refused", f"max_rows must be an integer from 1 to {MAX_ROWS:,}")
    return float(timeout), max_rows


_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


def json_value(v: Any) -> Any:
    """A DuckDB value as JSON has it: timestamps as ISO 8601 (instants in UTC, ``Z``),
    intervals as seconds, decimals as numbers when a double holds them exactly (else
    strings), NaN and infinities and integers beyond 64 bits as strings, UUIDs as
    strings, blobs as hex, lists, structs and maps as arrays and objects."""
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int):
        return v if _INT64_MIN <= v <= _UINT64_MAX else str(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else ("NaN" if math.isnan(v) else
                                          "Infinity" if v > 0 else "-Infinity")
    if isinstance(v, decimal.Decimal):
        if not v.is_finite():
            return str(v)
        digits = len(v.as_tuple().digits)
        return float(v) if digits <= 15 else str(v)
    if isinstance(v, dt.datetime):
        if v.tzinfo is not None:
            return v.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        return v.isoformat()
    if isinstance(v, dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(json_value(k)): json_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_value(x) for x in v]
    return str(v)
