"""``zaiproxy history sql`` and ``zaiproxy history --db`` (issue 16).

Users' own read-only SQL on the live history: a real ``zaiproxy serve`` (mock upstream, an
admin token) records the requests this module sends, and ``zaiproxy history sql`` runs as a
child process, answered by the recorder over its endpoint. The rows must be the requests
sent, in every output format; writes, file access and foreign table functions are refused
with the rows left as they were; a slow query is interrupted at its time limit while the
recorder goes on writing; the row cap says it cut; a wrong token is refused. Without a
recorder the same command opens the file read-only. ``--db`` reads a fleet collector's
database: a real ``zaiproxy collect`` scrapes scripted targets, and the summaries must be what
it scraped.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import io
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import h11
import orjson
import pytest
import trio

from tests.harness import REPO, ProcessServer, start_process, upstream_env
from tests.test_collector import ScriptedTarget, exposition, rates
from tests.test_recorder import T0, datagram, record
from tests.test_recorder_docs import DocRow, normalise_type, schema_tables
from zaiproxy.cli import build_parser
from zaiproxy.core import logs
from zaiproxy.core.durations import parse_duration
from zaiproxy.fleet.collector_store import Store, read_summary, row_of
from zaiproxy.http import client
from zaiproxy.observe.recorder import cli, sql, wire
from zaiproxy.observe.recorder.endpoint import answer
from zaiproxy.observe.recorder.service import Recorder
from zaiproxy.observe.recorder.store import HistoryStore, db_row

# Run once, with h11: `make test`'s second run (h11-mypyc) is for what parses HTTP.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="the history's SQL checks run in DuckDB, not in the HTTP parser")

TOKEN = "adm-sql-token-0123456789"
JSON = ("content-type", "application/json")
CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
MESSAGES = orjson.dumps({"model": "glm-4.5", "max_tokens": 16,
                         "messages": [{"role": "user", "content": "hi"}]})
README = REPO / "zaiproxy" / "observe" / "recorder" / "README.md"
# Seconds of work for DuckDB that no test waits for: only an interrupt ends it.
SLOW = "SELECT sum(a.range * b.range) FROM range(1000000000) a, range(1000000000) b"


# ---- helpers --------------------------------------------------------------------------


def zaiproxy(*args: str, history: Path | None = None, cwd: Path = REPO,
             timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``python -m zaiproxy ARGS`` in an operator's shell: no ZAIPROXY_* settings but the
    history's path (so no admin token from the environment)."""
    env = {"PATH": "/usr/bin:/bin"}
    if history is not None:
        env["ZAIPROXY_HISTORY_PATH"] = str(history)
    return subprocess.run([sys.executable, "-m", "zaiproxy", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def history_sql(history: Path, query: str, *args: str,
                token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    extra = ["--token", token] if token is not None else []
    return zaiproxy("history", "sql", query, *args, *extra, history=history)


def json_answer(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = orjson.loads(done.stdout)
    return doc


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with ``code`` and said why in one line on stderr (nothing on
    stdout)."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zaiproxy history sql: "), done.stderr
    return lines[0]


def post(proxy_url: str, path: str, body: bytes) -> str:
    """Send one API request; its request id (what the history row is keyed by)."""
    response = client.request_sync("POST", proxy_url + path, headers=[JSON], body=body,
                                   timeout=30)
    assert response.status == 200, response.body
    rid = response.header(b"x-zaiproxy-request-id")
    assert rid is not None
    return rid.decode()


def in_list(ids: list[str]) -> str:
    return ", ".join(f"'{i}'" for i in ids)


def wait_for_rows(history: Path, ids: list[str], limit: float = 20) -> None:
    """Until every one of ``ids`` is a row (the recorder writes every 0.5 s), bounded."""
    deadline = time.monotonic() + limit
    query = f"SELECT count(*) AS n FROM requests WHERE request_id IN ({in_list(ids)})"
    while True:
        doc = json_answer(history_sql(history, query, "--format", "json"))
        if doc["rows"] == [[len(ids)]]:
            return
        assert time.monotonic() < deadline, f"rows {doc['rows']} of {len(ids)} after {limit}s"
        time.sleep(0.2)


@dataclass
class Live:
    proxy: ProcessServer
    history: Path
    sent: list[tuple[str, str, str]]  # (request id, route, model) of the fixture's requests

    @property
    def ids(self) -> list[str]:
        return [rid for rid, _, _ in self.sent]

    @property
    def endpoint(self) -> str:
        url: str = orjson.loads(Path(f"{self.history}.endpoint").read_bytes())["url"]
        return url


@pytest.fixture(scope="module")
def live(mock: ProcessServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A real proxy with an admin token, and the rows of four requests in its history."""
    tmp = tmp_path_factory.mktemp("live")
    history = tmp / "proxy.history.duckdb"
    proxy = start_process(["serve", "--port", "0"],
                          env=upstream_env(mock, ZAIPROXY_WORKERS="1",
                                           ZAIPROXY_ADMIN_TOKEN=TOKEN,
                                           ZAIPROXY_HISTORY_PATH=str(history)),
                          stderr_path=tmp / "proxy.log")
    try:
        sent = [(post(proxy.url, "/v1/chat/completions", CHAT), "/v1/chat/completions", "glm-4.6")
                for _ in range(3)]
        sent.append((post(proxy.url, "/v1/messages", MESSAGES), "/v1/messages", "glm-4.5"))
        deadline = time.monotonic() + 15
        while not Path(f"{history}.endpoint").exists():
            assert time.monotonic() < deadline, "the recorder wrote no endpoint file"
            time.sleep(0.05)
        live = Live(proxy, history, sorted(sent))
        wait_for_rows(history, live.ids)
        yield live
    finally:
        assert proxy.stop() == 0, proxy.logs()[-3000:]


# ---- through the running recorder --------------------------------------------------------


def test_the_requests_sent_come_back_as_table_csv_and_json(live: Live) -> None:
    query = (f"SELECT request_id, route, model, status FROM requests "
             f"WHERE request_id IN ({in_list(live.ids)}) ORDER BY request_id")
    expected = [[rid, route, model, 200] for rid, route, model in live.sent]

    doc = json_answer(history_sql(live.history, query, "--format", "json"))
    assert doc["columns"] == ["request_id", "route", "model", "status"]
    assert doc["types"] == ["VARCHAR", "VARCHAR", "VARCHAR", "SMALLINT"]
    assert doc["rows"] == expected and doc["truncated"] is False
    assert doc["elapsed_s"] >= 0

    done = history_sql(live.history, query, "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert list(csv.reader(io.StringIO(done.stdout))) == [
        doc["columns"], *([str(v) for v in row] for row in expected)]

    done = history_sql(live.history, query)  # the default: a table
    assert done.returncode == 0, done.stderr
    header, rule, *body, footer = done.stdout.splitlines()
    assert header.split() == doc["columns"]
    assert set(rule) == {"-", " "} and len(rule.split()) == 4
    assert [line.split() for line in body] == [[str(v) for v in row] for row in expected]
    assert re.fullmatch(r"\(4 rows; \d+\.\d{3}s\)", footer), footer
    # The endpoint answered: nobody else can open the file while the recorder holds it.
    with pytest.raises(duckdb.Error, match="lock"):
        duckdb.connect(str(live.history), read_only=True)


def test_timestamps_and_aggregates_are_json_values(live: Live) -> None:
    done = history_sql(live.history, f"SELECT min(ts) AS first, sum(latency_ms) AS ms, "
                                     f"count(*)::HUGEINT AS n, avg(status)::DECIMAL(10, 2) AS s "
                                     f"FROM requests WHERE request_id IN ({in_list(live.ids)})",
                       "--format", "json")
    [[first, ms, n, s]] = json_answer(done)["rows"]
    assert first.endswith("Z")  # an instant, in UTC
    assert abs(dt.datetime.fromisoformat(first).timestamp() - time.time()) < 600
    assert isinstance(ms, float) and ms > 0
    assert (n, s) == (4, 200.0)


REFUSED = [
    ("DELETE FROM requests", "not DELETE"),
    ("INSERT INTO requests (ts, variant) VALUES (now(), 'x')", "not INSERT"),
    ("UPDATE requests SET status = 500", "not UPDATE"),
    ("CREATE TABLE stolen AS SELECT * FROM requests", "not CREATE"),
    ("DROP TABLE requests", "not DROP"),
    ("ATTACH '{tmp}/other.duckdb' AS other", "not ATTACH"),
    ("COPY requests TO '{tmp}/out.csv'", "not COPY"),
    ("INSTALL httpfs", "not LOAD"),
    ("SET threads = 1", "not SET"),
    ("PRAGMA enable_profiling", "not PRAGMA"),
    ("CHECKPOINT", "not CALL"),
    ("SELECT 1; DELETE FROM requests", "one statement at a time"),
    ("WITH gone AS (DELETE FROM requests RETURNING *) SELECT count(*) FROM gone",
     "contains a DELETE"),
    ("SELECT * FROM force_checkpoint()", "force_checkpoint() is not allowed"),
    ("SELECT * FROM query('DELETE FROM requests')", "query() is not allowed"),
    ("SELECT * FROM read_text('{tmp}/keys.json')", "read_text() is not allowed"),
    # A replacement scan reads a file by its name: DuckDB's file access is off.
    ("SELECT * FROM '{tmp}/keys.json'", "file system operations are disabled"),
]


def test_writes_and_file_access_are_refused_and_the_rows_stay(live: Live, tmp_path: Path) -> None:
    secret = "sk-zai-this-is-a-secret-key-0123456789"
    (tmp_path / "keys.json").write_text(orjson.dumps([{"key": secret}]).decode())
    auth = [("authorization", f"Bearer {TOKEN}")]
    for statement, says in REFUSED:  # the recorder's route, as the command asks it
        text = statement.format(tmp=tmp_path)
        r = client.request_sync("POST", f"{live.endpoint}/history/sql", headers=auth,
                                body=orjson.dumps({"sql": text}), timeout=30)
        doc = orjson.loads(r.body)
        assert r.status == 400 and doc["kind"] in ("refused", "invalid"), (statement, doc)
        assert says in doc["error"], (statement, doc)
        assert secret not in doc["error"]
    for statement, says in (REFUSED[0], REFUSED[12], REFUSED[-1]):  # and the command's word
        done = history_sql(live.history, statement.format(tmp=tmp_path))
        assert says in one_line_error(done, 2)
        assert secret not in done.stdout + done.stderr and TOKEN not in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["keys.json"]  # nothing written, attached, copied
    doc = json_answer(history_sql(live.history, "SELECT count(*) FROM requests WHERE "
                                                f"request_id IN ({in_list(live.ids)}) "
                                                "AND status = 200", "--format", "json"))
    assert doc["rows"] == [[4]]
    tables = json_answer(history_sql(live.history, "SELECT name FROM (SHOW TABLES) "
                                                   "ORDER BY name", "--format", "json"))
    assert "stolen" not in [t for [t] in tables["rows"]] and ["requests"] in tables["rows"]


def test_a_slow_query_is_stopped_at_its_limit_while_the_recorder_writes_on(live: Live) -> None:
    started = time.monotonic()
    slow = subprocess.Popen(
        [sys.executable, "-m", "zaiproxy", "history", "sql", SLOW, "--timeout", "6s",
         "--token", TOKEN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin", "ZAIPROXY_HISTORY_PATH": str(live.history)})
    try:
        # Meanwhile a request is recorded, and answered by a second query: the slow one
        # holds neither the writer nor the endpoint.
        new = post(live.proxy.url, "/v1/chat/completions", CHAT)
        wait_for_rows(live.history, [new], limit=5)
        assert slow.poll() is None, "the slow query ended before the write was seen"
        out, err = slow.communicate(timeout=30)
    finally:
        slow.kill()
        slow.wait()
    elapsed = time.monotonic() - started
    assert slow.returncode == 1 and out == ""
    assert err == ("zaiproxy history sql: the query ran longer than 6s and was stopped "
                   "(raise --timeout, or narrow it with WHERE ts > …)\n")
    assert elapsed < 20
    deadline = time.monotonic() + 5  # the recorder's warning, written by its log thread
    while '"event":"history_sql_timeout"' not in live.proxy.logs():
        assert time.monotonic() < deadline, "no history_sql_timeout in the proxy's log"
        time.sleep(0.05)
    # And after it: the recorder still records.
    later = post(live.proxy.url, "/v1/messages", MESSAGES)
    wait_for_rows(live.history, [later])


def test_the_row_cap_truncates_and_says_so(live: Live) -> None:
    done = history_sql(live.history, "SELECT range AS n FROM range(10)", "--max-rows", "3",
                       "--format", "json")
    doc = json_answer(done)
    assert doc["rows"] == [[0], [1], [2]] and doc["truncated"] is True
    assert done.stderr == "zaiproxy history sql: the first 3 rows; more matched (--max-rows)\n"
    done = history_sql(live.history, "FROM range(10)", "--max-rows", "3")
    assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith(
        "(the first 3 rows: more matched (--max-rows); ")
    done = history_sql(live.history, "FROM range(3)", "--max-rows", "3", "--format", "json")
    assert json_answer(done)["truncated"] is False  # exactly the cap: nothing cut
    one_line_error(history_sql(live.history, "SELECT 1", "--max-rows", "0"), 2)
    one_line_error(history_sql(live.history, "SELECT 1", "--timeout", "11m"), 2)


def test_a_wrong_or_missing_token_is_refused(live: Live) -> None:
    for token in ("wrong-token", None):
        done = history_sql(live.history, "SELECT count(*) FROM requests", token=token)
        line = one_line_error(done, 1)
        assert "401" in line and "--token" in line
        assert TOKEN not in done.stderr
    query = b'{"sql": "SELECT 42 AS answer"}'
    refused = client.request_sync("POST", f"{live.endpoint}/history/sql", body=query,
                                  headers=[("authorization", "Bearer x" + TOKEN)], timeout=30)
    assert refused.status == 401
    answered = client.request_sync("POST", f"{live.endpoint}/history/sql", body=query,
                                   headers=[("authorization", f"Bearer {TOKEN}")], timeout=30)
    assert answered.status == 200 and orjson.loads(answered.body)["rows"] == [[42]]


def test_the_endpoint_route(live: Live) -> None:
    auth = [("authorization", f"Bearer {TOKEN}")]

    def call(method: str, body: bytes | None) -> tuple[int, Any]:
        r = client.request_sync(method, f"{live.endpoint}/history/sql", headers=auth,
                                body=body, timeout=30)
        return r.status, orjson.loads(r.body)

    assert call("GET", None)[0] == 405
    status, doc = call("POST", b"SELECT 1")
    assert status == 400 and "JSON" in doc["error"]
    status, doc = call("POST", b'{"sql": "DELETE FROM requests"}')
    assert (status, doc["kind"]) == (400, "refused")
    status, doc = call("POST", b'{"sql": "SELECT nonsense FROM requests"}')
    assert (status, doc["kind"]) == (400, "invalid") and "nonsense" in doc["error"]
    status, doc = call("POST", b'{"sql": "SELECT 1", "max_rows": 1000000}')
    assert (status, doc["kind"]) == (400, "refused")
    status, doc = call("POST", orjson.dumps({"sql": SLOW, "timeout": 0.5}))
    assert (status, doc["kind"]) == (408, "timeout")


def readme_sql_commands(with_db: bool) -> list[list[str]]:
    """The README's ``zaiproxy history sql`` command lines (of its sh blocks), as argv after
    ``zaiproxy``, cut at a pipe or a redirection."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            if not line.startswith("zaiproxy history sql"):
                continue
            argv = shlex.split(line, comments=True)
            for i, word in enumerate(argv):
                if word in ("|", ">"):
                    argv = argv[:i]
                    break
            if ("--db" in argv) == with_db:
                commands.append(argv[1:])
    return commands


def test_the_readme_sql_examples_run_on_the_live_history(live: Live) -> None:
    commands = readme_sql_commands(with_db=False)
    assert len(commands) == 4
    for argv in commands:
        done = zaiproxy(*argv, "--token", TOKEN, history=live.history)
        assert done.returncode == 0, (argv, done.stderr)
        assert done.stdout.strip()


# ---- without a recorder: the file, read-only ---------------------------------------------


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A history file with 3 requests of the last minutes (no recorder holds it)."""
    p = tmp_path / "h.duckdb"
    store = HistoryStore.open(str(p))
    store.write([db_row("production", 0, list(wire.row_of(record(i, status=status),
                                                           time.time() - 60 * i)))
                 for i, status in enumerate((200, 502, 200))])
    store.close()
    return p


def test_the_file_alone_is_read_read_only(path: Path) -> None:
    done = zaiproxy("history", "sql", "SELECT request_id, status FROM requests ORDER BY 1",
                    "--path", str(path), "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("request_id,status\nreq00000000,200\nreq00000001,502\n"
                           "req00000002,200\n")
    done = zaiproxy("history", "--path", str(path), "sql", "DELETE FROM requests")
    assert "not DELETE" in one_line_error(done, 2)
    done = zaiproxy("history", "sql", "WITH d AS (DELETE FROM requests RETURNING *) FROM d",
                    "--path", str(path))
    assert "contains a DELETE" in one_line_error(done, 2)
    started = time.monotonic()
    done = zaiproxy("history", "sql", SLOW, "--timeout", "0.5", "--path", str(path))
    assert "ran longer than 0.5s" in one_line_error(done, 1)
    assert time.monotonic() - started < 15
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT count(*) FROM requests").fetchone() == (3,)
    con.close()
    done = zaiproxy("history", "sql", "SELECT 1", "--path", str(path.parent / "none.duckdb"))
    assert one_line_error(done, 1) == (f"zaiproxy history sql: no history file at "
                                       f"{path.parent / 'none.duckdb'}")


def test_a_file_held_without_an_endpoint_says_what_to_do(path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys\ncon = duckdb.connect(sys.argv[1])\n"
         "print('held', flush=True)\nsys.stdin.read()\n", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        done = zaiproxy("history", "sql", "SELECT 1", "--path", str(path))
        assert done.returncode == 1
        assert "Could not set lock" in done.stderr and "pass --url, or stop the proxy" in done.stderr
    finally:
        holder.kill()
        holder.wait()


# ---- the recorder in this process: what runs where ------------------------------------------


async def test_a_running_query_holds_neither_the_writer_nor_the_file_at_exit(
        tmp_path: Path, log_buffer: io.BytesIO) -> None:
    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production", wall=lambda: T0 + 120)
    rec.ingest(datagram([wire.row_of(record(i), T0 + i) for i in range(3)]))
    assert await rec.flush()
    assert rec.sql_ready and rec.export_dir is not None
    outcome: list[BaseException | None] = []

    async def slow_query(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await rec.sql(SLOW, limit_s=30, max_rows=10)
        except BaseException as exc:
            outcome.append(exc)
            raise

    async with trio.open_nursery() as nursery:
        await nursery.start(slow_query)
        await trio.sleep(0.3)  # the query is running in its thread now
        rec.ingest(datagram([wire.row_of(record(i), T0 + i) for i in range(3, 6)], first=3))
        with trio.fail_after(2):  # a write while the query runs: not queued behind it
            assert await rec.flush()
        assert rec.stats.rows_written == 6 and not outcome
        started = trio.current_time()
        nursery.cancel_scope.cancel()  # the recorder stopping: the query is interrupted
    assert trio.current_time() - started < 2
    # Cancelled, and nothing else (trio groups it with its own tasks' cancellations).
    assert len(outcome) == 1
    cancelled, rest = (outcome[0].split(trio.Cancelled)
                       if isinstance(outcome[0], BaseExceptionGroup) else (outcome[0], None))
    assert isinstance(cancelled, trio.Cancelled | BaseExceptionGroup) and rest is None
    ok, body = await rec.sql("SELECT count(*) FROM requests", limit_s=5, max_rows=10)
    assert ok and body is not None and orjson.loads(body)["rows"] == [[6]]
    export_dir = rec.export_dir
    await rec.finish()
    assert rec.stats.store_errors == 0
    logs.get_logger().flush()
    assert b"history_close_failed" not in log_buffer.getvalue()
    assert b'"event":"recorder_stopped"' in log_buffer.getvalue()
    assert not await trio.Path(export_dir).exists()
    con = duckdb.connect(str(tmp_path / "h.duckdb"), read_only=True)  # closed cleanly
    assert con.execute("SELECT count(*) FROM requests").fetchone() == (6,)
    con.close()


async def test_the_recorders_instance_reaches_no_file_but_its_exports(tmp_path: Path) -> None:
    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production", wall=lambda: T0 + 120)
    rec.ingest(datagram([wire.row_of(record(i), T0 + i) for i in range(2)]))
    assert await rec.flush()
    (tmp_path / "other.csv").write_text("a\n1\n")
    with pytest.raises(sql.SqlError, match="file system operations are disabled"):
        await rec.sql(f"SELECT * FROM '{tmp_path}/other.csv'", limit_s=5, max_rows=10)
    # The export still works: its temporary file is in the one allowed directory.
    status, ctype, body = await answer(rec, "GET", "/history/export?range=1h", None, None)
    assert (status, ctype) == (200, "application/vnd.apache.parquet") and body[:4] == b"PAR1"
    status, _, body = await answer(rec, "POST", "/history/sql", None, None,
                                   b'{"sql": "SELECT count(*) AS n FROM requests"}')
    assert status == 200 and orjson.loads(body)["rows"] == [[2]]
    await rec.finish()


# ---- the pure parts --------------------------------------------------------------------------


def test_json_values() -> None:
    import decimal
    import uuid

    utc_plus_2 = dt.timezone(dt.timedelta(hours=2))
    assert sql.json_value(dt.datetime(2027, 1, 15, 10, 0, tzinfo=utc_plus_2)) == \
        "2027-01-15T08:00:00Z"
    assert sql.json_value(dt.datetime(2027, 1, 15, 8, 0)) == "2027-01-15T08:00:00"
    assert sql.json_value(dt.date(2027, 1, 15)) == "2027-01-15"
    assert sql.json_value(dt.timedelta(minutes=90)) == 5400.0
    assert sql.json_value(decimal.Decimal("1.50")) == 1.5
    assert sql.json_value(decimal.Decimal("12345678901234567890.123")) == \
        "12345678901234567890.123"
    assert sql.json_value(1 << 70) == str(1 << 70) and sql.json_value(-5) == -5
    assert [sql.json_value(v) for v in (math.nan, math.inf, -math.inf)] == \
        ["NaN", "Infinity", "-Infinity"]
    assert sql.json_value(b"\x00\xff") == "00ff"
    u = uuid.uuid4()
    assert sql.json_value({"a": [u, None, True]}) == {"a": [str(u), None, True]}
    assert sql.json_value({1: "x"}) == {"1": "x"}


def test_a_deadline_passed_before_the_query_starts_runs_nothing(path: Path) -> None:
    con = sql.open_read_only(str(path))
    try:
        ticks = iter([0.0, 10.0])  # created at 0, run at 10: past its 1 s
        query = sql.Query(con, SLOW, timeout=1, clock=lambda: next(ticks))
        with pytest.raises(sql.SqlError) as info:
            query.run()
        assert info.value.kind == "timeout"
        assert sql.run(con, "SELECT 7", timeout=5)["rows"] == [[7]]  # the connection is fine
    finally:
        con.close()


def test_the_command_lines_defaults_are_the_runners() -> None:
    assert cli.SQL_MAX_ROWS == sql.DEFAULT_MAX_ROWS
    assert parse_duration(cli.SQL_TIMEOUT) == sql.DEFAULT_TIMEOUT
    ns = build_parser().parse_args(["history", "--path", "a.duckdb", "sql", "SELECT 1"])
    assert (ns.path, ns.query, ns.format, ns.history_command) == ("a.duckdb", "SELECT 1",
                                                                   "table", "sql")
    ns = build_parser().parse_args(["history", "sql", "SELECT 1", "--path", "b.duckdb"])
    assert ns.path == "b.duckdb"
    ns = build_parser().parse_args(["history", "--range", "1h"])
    assert (ns.history_command, ns.range, ns.db) == (None, "1h", None)


# ---- --db: a collector's database --------------------------------------------------------


class CountingTarget(ScriptedTarget):
    """A scripted /metrics target that remembers the exposition of every answer it sent."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.served: list[str] = []

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while type(event := conn.next_event()) is not h11.EndOfMessage:
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        if self.hang:
            await trio.sleep_forever()
        text = self.text
        body = text.encode()
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            ("content-length", str(len(body)))])) + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage()))
        self.served.append(text)
        await stream.aclose()


def served_requests(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("zai_proxy_requests_total"))


async def test_history_db_prints_what_a_real_collector_scraped(tmp_path: Path) -> None:
    db = tmp_path / "collector.duckdb"
    prod = CountingTarget(exposition("production", 100, 0))
    canary = CountingTarget(exposition("canary", 10, 0))
    async with trio.open_nursery() as nursery:
        await nursery.start(prod.run)
        await nursery.start(canary.run)
        collector = await trio.to_thread.run_sync(functools.partial(
            start_process, ["collect", "--target", prod.url, "--target", canary.url,
                            "--interval", "0.2s", "--db", str(db)],
            env=None, stderr_path=tmp_path / "collect.log"))
        try:
            async def scraped(more: int) -> None:
                goal = (len(prod.served) + more, len(canary.served) + more)
                with trio.fail_after(10):
                    while (len(prod.served), len(canary.served)) < goal:  # noqa: ASYNC110
                        await trio.sleep(0.02)

            await scraped(2)
            prod.text = exposition("production", 150, 5, fast=140)
            canary.text = exposition("canary", 30, 10, fast=10)
            await scraped(2)
            prod.text = exposition("production", 200, 5, fast=180)
            await scraped(2)
            # While it runs, the collector holds the file: said, with what to do instead.
            held = await trio.to_thread.run_sync(functools.partial(
                zaiproxy, "history", "--db", str(db)))
            assert held.returncode == 1
            assert "Could not set lock" in held.stderr and "zaiproxy collect" in held.stderr
            assert "/admin/history" in held.stderr
            prod.hang = canary.hang = True  # no answer after this: what was served is stored
            await trio.sleep(0.5)
        finally:
            assert await trio.to_thread.run_sync(collector.stop) == 0
        nursery.cancel_scope.cancel()

    def increase(target: CountingTarget) -> float:
        return served_requests(target.served[-1]) - served_requests(target.served[0])

    done = zaiproxy("history", "--db", str(db), "--json", "--range", "1h")
    assert done.returncode == 0, done.stderr
    doc = orjson.loads(done.stdout)
    variants = {row["variant"]: row for row in doc["variants"]}
    assert sorted(variants) == ["canary", "production"]
    p, c = variants["production"], variants["canary"]
    assert p["requests"] == increase(prod) == 100 and p["responses_5xx"] == 5
    assert c["requests"] == increase(canary) == 20 and c["responses_5xx"] == 10
    assert p["failure_shares"]["5xx"] == pytest.approx(0.05)
    assert c["failure_shares"]["5xx"] == pytest.approx(0.5)
    # 80 of the 100 new production requests took <= 0.1 s: p50 interpolates in that bucket.
    assert p["latency_ms_p50"] == pytest.approx(100 * 50 / 80, abs=1e-3)
    assert c["latency_ms_p50"] == 100.0  # none of canary's new ones: the +Inf bucket
    assert p["requests_per_s"] > 0 and p["targets"] == 1
    assert doc["total"]["requests"] == 120 and doc["total"]["targets"] == 2
    assert [(t["target"], t["variant"]) for t in doc["targets"]] == sorted(
        [(prod.url, "production"), (canary.url, "canary")])

    done = zaiproxy("history", "--db", str(db), "--range", "1h")
    assert done.returncode == 0, done.stderr
    blocks = done.stdout.split("\n\n")
    assert f"source: collector ({db}, read-only)" in blocks[0]
    by_variant = {line.split()[0]: line.split() for line in blocks[1].splitlines()}
    assert by_variant["by"][2:6] == ["targets", "requests", "req/s", "5xx%"]
    assert by_variant["production"][2] == "100" and by_variant["production"][4] == "5.00"
    assert by_variant["canary"][2] == "20" and by_variant["TOTAL"][2] == "120"
    assert f"{prod.url} (production)" in blocks[2]

    done = zaiproxy("history", "sql", "--db", str(db), "--format", "json",
                    "SELECT variant, sum(requests) AS requests FROM snapshots "
                    "GROUP BY ALL ORDER BY variant")
    assert json_answer(done)["rows"] == [["canary", 20.0], ["production", 100.0]]
    for argv in readme_sql_commands(with_db=True):
        argv = [str(db) if word.endswith("collector.duckdb") else word for word in argv]
        done = zaiproxy(*argv)
        assert done.returncode == 0, (argv, done.stderr)
        assert "production" in done.stdout


def summary(*args: str) -> tuple[int, str, str]:
    """``zaiproxy history ARGS`` in this process, with the reader the command line passes."""
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(build_parser().parse_args(["history", *args]), out, err,
                   collector_summary=read_summary)
    return code, out.getvalue(), err.getvalue()


def test_history_db_sums_increases_and_rates_of_the_stored_rows(tmp_path: Path) -> None:
    db = tmp_path / "c.duckdb"
    store = Store(str(db))
    now = time.time()
    store.insert([
        # production: two targets, a's two intervals and b's one; canary: one target.
        row_of(now - 30, "http://a:1", rates("production", 10, 100, 5, {0.1: 100, math.inf: 100})),
        row_of(now - 20, "http://a:1", rates("production", 10, 100, 0, {0.1: 0, math.inf: 100})),
        row_of(now - 20, "http://b:1", rates("production", 5, 50, 0, {0.1: 50, math.inf: 50},
                                             reset=True)),
        row_of(now - 10, "http://c:1", rates("canary", 10, 10, 10, {0.1: 0, math.inf: 10})),
        row_of(now - 7200, "http://a:1", rates("production", 10, 999, 0, {math.inf: 999})),
    ])
    store.close()
    code, out, err = summary("--db", str(db), "--json", "--range", "1h")
    assert code == 0, err
    doc = orjson.loads(out)
    p, c = doc["variants"][1], doc["variants"][0]
    assert (p["variant"], c["variant"]) == ("production", "canary")
    assert p["requests"] == 250 and p["responses_5xx"] == 5 and p["targets"] == 2
    assert p["requests_per_s"] == pytest.approx(200 / 20 + 50 / 5)  # the targets' rates summed
    assert p["reset"] is True and p["seconds"] == 20
    # 150 of 250 within 0.1 s: the median interpolates in that bucket (ms, 3 decimals).
    assert p["latency_ms_p50"] == pytest.approx(100 * 125 / 150, abs=1e-3)
    assert p["failures"]["5xx"] == 5 and p["failure_shares"]["5xx"] == pytest.approx(0.02)
    assert c["error_rate"] == 1.0 and c["latency_ms_p99"] == 100.0
    by_target = {t["target"]: t for t in doc["targets"]}
    assert by_target["http://a:1"]["requests"] == 200
    assert by_target["http://a:1"]["requests_per_s"] == pytest.approx(10.0)
    assert doc["total"]["requests"] == 260 and doc["total"]["targets"] == 3

    code, out, _ = summary("--db", str(db), "--json", "--range", "1h", "--variant", "canary")
    assert [v["variant"] for v in orjson.loads(out)["variants"]] == ["canary"]
    code, out, _ = summary("--db", str(db), "--range", "1h")
    assert code == 0 and "http://b:1 (production)" in out


def test_history_db_reads_an_older_collectors_file_as_it_is(tmp_path: Path) -> None:
    db = tmp_path / "old.duckdb"
    store = Store(str(db))
    store.insert([row_of(time.time() - 5, "http://a:1",
                         rates("production", 5, 7, 0, {math.inf: 7}))])
    store.close()
    con = duckdb.connect(str(db))  # as written before the newer counters existed
    con.execute("ALTER TABLE snapshots DROP COLUMN usage_missing")
    con.execute("ALTER TABLE snapshots DROP COLUMN retries")
    con.close()
    code, out, err = summary("--db", str(db), "--json")
    assert code == 0, err
    row = orjson.loads(out)["variants"][0]
    assert (row["requests"], row["usage_missing"], row["retries"]) == (7, 0, 0)
    con = duckdb.connect(str(db), read_only=True)
    assert "retries" not in [r[0] for r in con.execute("DESCRIBE snapshots").fetchall()]
    con.close()


def test_history_db_errors(tmp_path: Path, path: Path) -> None:
    code, _, err = summary("--db", str(tmp_path / "none.duckdb"))
    assert (code, err) == (1, f"zaiproxy history: no collector database at "
                              f"{tmp_path / 'none.duckdb'}\n")
    code, _, err = summary("--db", str(path))  # a proxy's history, not a collector's
    assert code == 1 and "is not a collector's database" in err
    code, _, err = summary("--db", str(path), "--by", "model")
    assert code == 2 and "--by and --export are for a proxy's history" in err
    code, _, err = summary("--db", str(path), "--url", "http://127.0.0.1:9")
    assert code == 2 and "--url name a proxy's history" in err
    ns = build_parser().parse_args(["history", "--db", str(path)])
    code = cli.run(ns, io.StringIO(), err_out := io.StringIO())  # no reader passed in
    assert code == 2 and "needs the collector's reader" in err_out.getvalue()


def test_the_collector_database_section_is_the_columns_of_a_fresh_file(tmp_path: Path) -> None:
    section = re.search(r"^### Collector database\n(.*?)(?=^#{1,3} |\Z)", README.read_text(),
                        re.M | re.S)
    assert section is not None, "the README has no '### Collector database' section"
    tables = schema_tables(section[1])
    assert list(tables) == ["snapshots"]
    store = Store(str(tmp_path / "c.duckdb"))
    real = [(name, normalise_type(kind), null == "YES")
            for name, kind, null, *_ in store.query("DESCRIBE snapshots")]
    store.close()
    rows: list[DocRow] = tables["snapshots"]
    assert [(r.column.name, r.column.type, r.column.nullable) for r in rows] == real
    for row in rows:
        assert row.unit and len(row.meaning) >= 10, row.column.name


def test_history_db_with_no_rows_in_range_says_so(tmp_path: Path) -> None:
    db = tmp_path / "c.duckdb"
    Store(str(db)).query("SELECT 1")
    code, out, err = summary("--db", str(db), "--range", "5m")
    assert code == 0, err
    assert out.rstrip().endswith("no scrapes in the range (the collector stores a target's "
                                 "rates from its second scrape on)")


def test_a_namespace_without_the_subcommand_field_gets_the_summaries() -> None:
    """An older caller's namespace (no ``history_command``) still gets the summaries path."""
    ns = argparse.Namespace(**vars(build_parser().parse_args(["history", "--db", "x.duckdb"])))
    del ns.history_command
    code = cli.run(ns, io.StringIO(), err := io.StringIO(), collector_summary=read_summary)
    assert code == 1 and "no collector database" in err.getvalue()
