"""The history recorder without processes: wire, sink, store, schema, queries, failures.

The channel is a real socketpair, the file a real DuckDB file in tmp_path; time
for rollups, retention and snapshots is passed in (a fake wall clock), so
counts are exact.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
import trio

from zaiproxy.core.record import RequestRecord, Usage
from zaiproxy.observe.recorder import service, wire
from zaiproxy.observe.recorder.queries import (
    QueryError,
    export_parquet,
    history_series,
    history_summary,
    parse_duration,
)
from zaiproxy.observe.recorder.schema import (
    MIGRATIONS,
    REQUESTS_COLUMNS,
    SCHEMA_VERSION,
    Migration,
    SchemaError,
    current_version,
    migrate,
)
from zaiproxy.observe.recorder.service import Recorder
from zaiproxy.observe.recorder.sink import RecordSink
from zaiproxy.observe.recorder.store import DAY, HistoryStore, db_row

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z: a minute boundary (T0 % 60 == 0)


def record(i: int = 0, **kw: Any) -> RequestRecord:
    fields: dict[str, Any] = dict(
        request_id=f"req{i:08x}", method="POST", route="/v1/chat/completions", api="openai",
        status=200, duration_s=0.1, bytes_in=100, client="127.0.0.1", model="glm-4.6", stream=False,
        upstream_status=200, upstream_ttfb_s=0.05, bytes_out=500, result="ok",
        usage=Usage(10, 20, 3, 4), key_alias="alice")
    fields.update(kw)
    return RequestRecord(**fields)


def datagram(rows: list[wire.WireRow], *, worker: int = 0, pid: int = 1,
             variant: str = "production", dropped: int = 0, nonce: int = 0,
             first: int | None = None) -> bytes:
    """A batch; by default numbered as if the worker had dropped ``dropped`` rows, then
    sent these (so nothing counts as lost)."""
    return wire.encode_batch(worker, pid, variant, dropped, rows, nonce=nonce,
                             first=dropped if first is None else first)


def rows_at(times: list[float], **kw: Any) -> list[Any]:
    """DB rows finished at these wall-clock times."""
    return [db_row("production", 0, list(wire.row_of(record(i, **kw), t)))
            for i, t in enumerate(times)]


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = HistoryStore.open(str(tmp_path / "h.duckdb"), raw_days=1.0, rollup_days=3.0)
    yield s
    s.close()


def count(store: HistoryStore, table: str) -> int:
    row = store.con.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


# ---- wire --------------------------------------------------------------------------------


def test_wire_row_round_trip() -> None:
    r = record(7, error="x" * 500, zai_retries=2, zai_class="frequency", zai_code="1302",
               tokens_estimated=True, prompt_estimate=12, retried=True)
    data = datagram([wire.row_of(r, T0 + 0.25)], worker=3, pid=99, dropped=5)
    batch = wire.decode_batch(data)
    assert (batch.worker, batch.pid, batch.variant, batch.dropped_total) == (3, 99, "production", 5)
    row = dict(zip(wire.ROW_FIELDS, batch.rows[0], strict=True))
    assert row["ts"] == T0 + 0.25 and row["request_id"] == "req00000007"
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"],
            row["cache_write_tokens"]) == (10, 20, 3, 4)
    assert len(row["error"]) == wire.MAX_ERROR_CHARS  # long messages are cut at the source
    assert (row["zai_retries"], row["zai_class"], row["zai_code"]) == (2, "frequency", "1302")
    assert row["api"] == "openai"
    assert row["model"] == "glm-4.6" and row["requested_model"] is None
    fell_back = wire.decode_batch(datagram([wire.row_of(
        record(8, model="glm-4.5", requested_model="glm-4.6"), T0)])).rows[0]
    assert dict(zip(wire.ROW_FIELDS, fell_back, strict=True))["requested_model"] == "glm-4.6"


async def test_a_datagram_of_the_previous_wire_version_is_refused_and_counted(
        tmp_path: Path) -> None:
    """Version 4 rows had no ``upstream`` (version 3 not even ``requested_model``), and
    workers and recorder are one build, so such a datagram is a stray writer's: refused
    whole."""
    row = list(wire.row_of(record(0), T0))
    del row[wire.ROW_FIELDS.index("upstream")]
    old = orjson.dumps([4, 0, 1, 0, "production", 0, 0, [row]])
    with pytest.raises(wire.WireError, match="wire version 5"):
        wire.decode_batch(old)
    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production")
    assert rec.ingest(old) == 0
    assert (rec.stats.bad_datagrams, rec.stats.rows_received, len(rec.pending)) == (1, 0, 0)


@pytest.mark.parametrize("data", [
    b"not json", b"{}", orjson.dumps([99, 0, 1, "p", 0, []]),
    orjson.dumps([1, "w", 1, "p", 0, []]), orjson.dumps([1, 0, 1, "p", 0, [[1, 2]]]),
    wire.STOP,
])
def test_wire_rejects_what_is_not_a_batch(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_batch(data)


def test_db_row_maps_every_column() -> None:
    from zaiproxy.core.pricing import DEFAULT_PRICES

    r = record(1, error="boom", zai_retries=1, zai_class="overload", zai_code="1305",
               tokens_estimated=True, prompt_estimate=9, retried=True, stream=True,
               ttft_s=0.02, upstream_s=0.08, queue_wait_s=0.005, token_count_s=0.001,
               usage=Usage(1000, 2000, 300, 0))
    row = db_row("canary", 2, list(wire.row_of(r, T0)), DEFAULT_PRICES)
    from zaiproxy.observe.recorder.schema import REQUESTS_COLUMNS

    named = dict(zip([c for c, _ in REQUESTS_COLUMNS], row, strict=True))
    assert named == {
        "ts": dt.datetime.fromtimestamp(T0, dt.UTC), "variant": "canary", "worker": 2,
        "request_id": "req00000001", "method": "POST", "route": "/v1/chat/completions",
        "model": "glm-4.6", "key_alias": "alice", "stream": True, "status": 200,
        "upstream_status": 200, "result": "ok", "error_class": "overload", "error_code": "1305",
        "error": "boom", "latency_ms": 100.0, "ttft_ms": 20.0, "upstream_ttfb_ms": 50.0,
        "upstream_ms": 80.0, "overhead_ms": pytest.approx(20.0), "queue_wait_ms": 5.0,
        "token_count_ms": 1.0, "input_tokens": 1000, "output_tokens": 2000,
        "cache_read_tokens": 300, "cache_write_tokens": 0, "tokens_estimated": True,
        "prompt_estimate": 9, "bytes_in": 100, "bytes_out": 500,
        # glm-4.6 list prices per 1M: $0.60 in, $2.20 out, $0.11 cached; an OpenAI route
        # counts the cached tokens inside the input.
        "cost_usd": pytest.approx((700 * 0.60 + 2000 * 2.20 + 300 * 0.11) / 1e6),
        "retries": 1, "stale_retry": True, "api": "openai", "requested_model": None,
        "upstream": None,
    }
    # After a 1312 fallback: the model that answered is priced, the client's is kept beside.
    fell_back = db_row("canary", 2, list(wire.row_of(
        record(5, model="glm-4.5", requested_model="glm-4.6", usage=Usage(1000, 2000, 0, 0)),
        T0)), DEFAULT_PRICES)
    named = dict(zip([c for c, _ in REQUESTS_COLUMNS], fell_back, strict=True))
    assert (named["model"], named["requested_model"]) == ("glm-4.5", "glm-4.6")
    assert named["cost_usd"] == pytest.approx((1000 * 0.60 + 2000 * 2.20) / 1e6)
    # The record's API decides which usage includes the cached tokens, not the route: an
    # Anthropic request's input excludes them (whatever its route template says).
    anthropic = db_row("canary", 2, list(wire.row_of(record(4, api="anthropic",
                                                            usage=Usage(1000, 2000, 300, 0)),
                                                     T0)), DEFAULT_PRICES)
    named = dict(zip([c for c, _ in REQUESTS_COLUMNS], anthropic, strict=True))
    assert named["api"] == "anthropic" and named["route"] == "/v1/chat/completions"
    assert named["cost_usd"] == pytest.approx((1000 * 0.60 + 2000 * 2.20 + 300 * 0.11) / 1e6)
    unpriced = db_row("canary", 2, list(wire.row_of(record(2, model="mystery"), T0)),
                      DEFAULT_PRICES)
    assert unpriced[[c for c, _ in REQUESTS_COLUMNS].index("cost_usd")] == 0.0
    no_timings = db_row("canary", 2, list(wire.row_of(record(3, route="/v1/messages",
                                                             api="anthropic"), T0)))
    assert dict(zip([c for c, _ in REQUESTS_COLUMNS], no_timings, strict=True))["overhead_ms"] is None


def test_db_row_rejects_wrong_types() -> None:
    from zaiproxy.observe.recorder.store import BadRow

    good = list(wire.row_of(record(), T0))
    for name, bad in (("ts", "yesterday"), ("status", "200"), ("duration_s", "fast"),
                      ("model", 42), ("stream", "yes"), ("api", 1), ("requested_model", 7)):
        row = list(good)
        row[wire.ROW_FIELDS.index(name)] = bad
        with pytest.raises(BadRow):
            db_row("production", 0, row)


# ---- the sink (worker side) -----------------------------------------------------------------


def test_sink_batches_and_stats() -> None:
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with recv, send:
        sink = RecordSink(send, worker=4, variant="canary", max_batch=3, clock=lambda: T0)
        sink.submit(record(0))
        sink.submit(record(1))
        assert sink.stats() == (2, 0)  # held: the batch is not full
        sink.submit(record(2))  # full: sent at once
        assert sink.stats() == (0, 0) and sink.sent == 3
        sink.submit(record(3))
        sink.flush()
        first, second = (wire.decode_batch(recv.recv(65536)) for _ in range(2))
        assert [len(first.rows), len(second.rows)] == [3, 1]
        assert (first.worker, first.variant) == (4, "canary")
        assert [r[1] for r in first.rows + second.rows] == [f"req{i:08x}" for i in range(4)]
        assert repr(sink) == "<RecordSink worker=4 queued=0 sent=4 dropped=0>"


def test_sink_hands_over_api_requests_only() -> None:
    """A control route's record (no API: a probe, a scrape, an /admin/events stream that
    lasted 11 minutes) is not history: not sent, not numbered, not dropped."""
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with recv, send:
        sink = RecordSink(send, worker=0, variant="production", clock=lambda: T0)
        sink.submit(record(0))
        sink.submit(record(1, method="GET", route="/admin/events", api=None, status=200,
                           duration_s=694.907, model=None, usage=None, result=None))
        sink.submit(record(2, api="anthropic", route="/v1/messages"))
        sink.flush()
        batch = wire.decode_batch(recv.recv(65536))
        api = wire.ROW_FIELDS.index("api")
        assert [(r[1], r[api]) for r in batch.rows] == [("req00000000", "openai"),
                                                         ("req00000002", "anthropic")]
        assert (batch.first, sink.seq, sink.sent, sink.dropped) == (0, 2, 2, 0)


def test_sink_drops_and_counts_when_nobody_reads(log_buffer: Any) -> None:
    """A recorder that does not read: the buffer fills, batches are dropped, never waited for."""
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with recv, send:
        send.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
        sink = RecordSink(send, worker=0, variant="production", max_batch=16)
        total = 5000
        for i in range(total):
            sink.submit(record(i))
        sink.flush()
        assert sink.dropped > 0 and sink.sent > 0
        assert sink.sent + sink.dropped == total
        assert sink.stats() == (0, sink.dropped)
        # Exactly the rows counted as sent are in the channel, whole batches only.
        recv.setblocking(False)
        got = 0
        dropped_seen = []
        while True:
            try:
                batch = wire.decode_batch(recv.recv(1 << 20))
            except BlockingIOError:
                break
            got += len(batch.rows)
            dropped_seen.append(batch.dropped_total)
        assert got == sink.sent
        assert dropped_seen == sorted(dropped_seen)  # the running count rides along
    from zaiproxy.core import logs

    logs.get_logger().flush()
    lines = [orjson.loads(line) for line in log_buffer.getvalue().splitlines()]
    warnings = [x for x in lines if x["event"] == "recorder_records_dropped"]
    assert len(warnings) == 1  # rate-limited, not one per batch
    assert warnings[0]["reason"] == "channel full"


def test_sink_splits_a_batch_the_kernel_calls_too_big() -> None:
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with recv, send:
        send.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        sink = RecordSink(send, worker=0, variant="production", max_batch=1000)
        for i in range(400):  # ~400 x 300 bytes: over one datagram's limit here
            sink.submit(record(i, model="m" * 128, error="e" * 150))
        sink.flush()
        assert (sink.sent, sink.dropped) == (400, 0)
        recv.setblocking(False)
        sizes = []
        while True:
            try:
                sizes.append(len(wire.decode_batch(recv.recv(1 << 20)).rows))
            except BlockingIOError:
                break
        assert sum(sizes) == 400 and len(sizes) > 1


def test_sink_counts_a_broken_channel() -> None:
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    recv.close()
    with send:
        sink = RecordSink(send, worker=0, variant="production", max_batch=2)
        for i in range(4):
            sink.submit(record(i))
        assert sink.stats() == (0, 4)


async def test_sink_run_sends_on_its_interval(autojump_clock: trio.testing.MockClock) -> None:
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with recv, send:
        sink = RecordSink(send, worker=0, variant="production", interval=0.1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.run)
            sink.submit(record(0))
            assert sink.stats().queue_depth == 1
            await trio.sleep(0.15)
            assert sink.stats() == (0, 0)
            nursery.cancel_scope.cancel()
        assert len(wire.decode_batch(recv.recv(65536)).rows) == 1


# ---- store: 10,000 records, totals, snapshots ------------------------------------------------


async def test_ten_thousand_records_become_ten_thousand_rows(tmp_path: Path) -> None:
    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production", wall=lambda: T0 + 10)
    n = 10_000
    for start in range(0, n, 256):
        rows = [wire.row_of(record(i, status=200 if i % 100 else 502), T0 + i * 0.001)
                for i in range(start, min(n, start + 256))]
        assert rec.ingest(datagram(rows, worker=start % 4, first=start)) == len(rows)
    assert await rec.flush()
    assert rec.stats.rows_written == n and not rec.pending
    store = rec.store
    assert store is not None
    assert count(store, "requests") == n
    ids = store.con.execute("SELECT count(DISTINCT request_id) FROM requests").fetchone()
    assert ids == (n,)
    totals = store.totals["production"]
    assert (totals.requests, totals.errors) == (n, 100)
    assert (totals.input_tokens, totals.output_tokens) == (10 * n, 20 * n)
    await rec.finish()
    assert rec.store is None


def test_snapshots_continue_their_totals_after_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "h.duckdb")
    store = HistoryStore.open(path, variant="production")
    assert store.snapshot(T0) == 1  # a row for the configured variant even before traffic
    store.write(rows_at([T0 + 1, T0 + 2]), dropped={"production": 7})
    store.write([db_row("canary", 1, list(wire.row_of(record(9, status=503), T0 + 3)))])
    assert store.snapshot(T0 + 5) == 2
    store.close()
    store = HistoryStore.open(path, variant="production")
    store.write(rows_at([T0 + 6]))
    store.last_snapshot = T0 + 5
    store.snapshot(T0 + 10)
    rows = store.con.execute(
        "SELECT epoch(ts), variant, requests_total, errors_total, input_tokens_total, "
        "dropped_total, in_flight FROM snapshots ORDER BY ts, variant").fetchall()
    store.close()
    assert rows == [
        (T0, "production", 0, 0, 0, 0, 0.0),
        (T0 + 5, "canary", 1, 1, 10, 0, pytest.approx(0.1 / 5)),
        (T0 + 5, "production", 2, 0, 20, 7, pytest.approx(0.2 / 5)),
        (T0 + 10, "canary", 1, 1, 10, 0, 0.0),
        (T0 + 10, "production", 3, 0, 30, 7, pytest.approx(0.1 / 5)),
    ]


# ---- rollups and retention on a fake clock ---------------------------------------------------


def rollups(store: HistoryStore) -> list[tuple[Any, ...]]:
    return store.con.execute(
        "SELECT epoch(minute) - ?, status, status_class, requests, errors, latency_ms_sum, "
        "latency_ms_max, latency_ms_p95, input_tokens FROM requests_1m ORDER BY minute, status",
        [T0]).fetchall()


def test_rollup_rolls_closed_minutes_only(store: HistoryStore) -> None:
    store.write(rows_at([T0 + 1, T0 + 2, T0 + 3]) + rows_at([T0 + 4], status=502, duration_s=0.5)
                + rows_at([T0 + 61, T0 + 62]))
    assert store.rollup(T0 + 60) == 0  # minute 0 ended, but not ROLLUP_GRACE ago
    assert store.rollup(T0 + 66) == 1
    assert rollups(store) == [
        (0.0, 200, "2xx", 3, 0, pytest.approx(300.0), 100.0, pytest.approx(100.0), 30),
        (0.0, 502, "5xx", 1, 1, 500.0, 500.0, 500.0, 10),
    ]
    assert store.rollup(T0 + 70) == 0  # nothing new
    assert store.rollup(T0 + 130) == 1
    assert [r[:4] for r in rollups(store)][-1] == (60.0, 200, "2xx", 2)


def test_a_late_row_rolls_its_minute_again(store: HistoryStore) -> None:
    store.write(rows_at([T0 + 1]))
    store.rollup(T0 + 66)
    store.write(rows_at([T0 + 30]))  # a worker's batch, late past the grace
    assert store.dirty_minutes == {T0}
    store.rollup(T0 + 67)
    assert [r[:4] for r in rollups(store)] == [(0.0, 200, "2xx", 2)]


def test_rollup_p95_and_groups(store: HistoryStore) -> None:
    # 100 requests in one minute, latencies 1..100 ms; two keys, two models.
    times = [T0 + i * 0.5 for i in range(100)]
    rows = [db_row("production", 0, list(wire.row_of(
        record(i, duration_s=(i + 1) / 1000, key_alias="a" if i % 2 else None,
               model="glm-4.6" if i < 50 else "glm-4.5"), t))) for i, t in enumerate(times)]
    store.write(rows)
    store.rollup(T0 + 120)
    got = store.con.execute(
        "SELECT model, key_alias, requests FROM requests_1m ORDER BY model, key_alias").fetchall()
    assert got == [("glm-4.5", "", 25), ("glm-4.5", "a", 25), ("glm-4.6", "", 25),
                   ("glm-4.6", "a", 25)]
    p95 = store.con.execute("SELECT quantile_cont(latency_ms, 0.95) FROM requests").fetchone()
    assert p95 is not None and p95[0] == pytest.approx(95.05)


def test_retention_on_a_fake_clock(store: HistoryStore) -> None:
    """raw_days=1, rollup_days=3: exact rows go at exact times, rollups outlive raw rows."""
    store.write(rows_at([T0 + 10, T0 + 20, T0 + 3600]))
    store.snapshot(T0 + 30)
    rolled, deleted = store.maintain(T0 + 2 * 3600)
    assert deleted == (0, 0, 0, 0) and rolled == 119  # the minute ending at +2h is in its grace
    assert count(store, "requests_1m") == 2
    # One day after the first rows: they go, the one an hour younger stays.
    assert store.maintain(T0 + DAY + 25)[1] == (2, 0, 0, 0)
    assert store.maintain(T0 + DAY + 31)[1] == (0, 1, 0, 0)  # the snapshot, at T0+30
    assert count(store, "requests") == 1
    assert count(store, "requests_1m") == 2  # the rollups stay
    assert store.maintain(T0 + 3 * DAY + 60)[1] == (1, 0, 1, 0)
    assert store.maintain(T0 + 3 * DAY + 3600)[1] == (0, 0, 0, 0)  # minute +1h: not before
    assert store.maintain(T0 + 3 * DAY + 3601)[1] == (0, 0, 1, 0)
    assert count(store, "requests_1m") == 0


def test_retention_never_deletes_a_row_before_its_minute_is_rolled(tmp_path: Path) -> None:
    """A recorder that was down for longer than raw_days rolls first, then deletes."""
    store = HistoryStore.open(str(tmp_path / "h.duckdb"), raw_days=1.0, rollup_days=30.0)
    store.write(rows_at([T0 + 5]))
    store.maintain(T0 + 10 * DAY)
    assert count(store, "requests") == 0
    assert [r[:4] for r in rollups(store)] == [(0.0, 200, "2xx", 1)]
    store.close()


def test_rollup_state_survives_a_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "h.duckdb")
    store = HistoryStore.open(path)
    store.write(rows_at([T0 + 1]))
    store.rollup(T0 + 66)
    store.close()
    store = HistoryStore.open(path)
    assert store.rolled_until == T0 + 60
    store.write(rows_at([T0 + 70]))
    store.rollup(T0 + 130)
    assert [r[:4] for r in rollups(store)] == [(0.0, 200, "2xx", 1), (60.0, 200, "2xx", 1)]
    store.close()


# ---- schema and migrations --------------------------------------------------------------------


def test_a_new_file_gets_the_current_schema(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "h.duckdb"))
    assert current_version(con) == 0
    assert migrate(con, now=lambda: T0) == [1, 2, 3, 4, 5, 6]
    assert migrate(con) == []  # once only
    assert current_version(con) == SCHEMA_VERSION == 6
    assert con.execute("SELECT version, epoch(applied_at) FROM schema_version").fetchall() == [
        (1, T0), (2, T0), (3, T0), (4, T0), (5, T0), (6, T0)]
    columns = [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'requests' "
        "ORDER BY ordinal_position").fetchall()]
    assert columns == [c for c, _ in REQUESTS_COLUMNS]  # the appender's row order
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables")
              .fetchall()}
    assert tables == {"schema_version", "requests", "snapshots", "requests_1m", "recorder_state",
                      "recorder_progress", "recorder_totals", "zai_quota"}
    con.close()


def _make_v0(path: str) -> None:
    """A fake v0 file: a prototype's ``requests`` (epoch seconds, no schema_version)."""
    con = duckdb.connect(path)
    con.execute("CREATE TABLE requests (ts DOUBLE, route VARCHAR, status INTEGER, "
                "duration_s DOUBLE)")
    con.execute("INSERT INTO requests VALUES (?, '/v1/messages', 200, 0.25), "
                "(?, '/v1/chat/completions', 502, 1.5)", [T0, T0 + 1])
    con.close()


def _v0_to_v1(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("ALTER TABLE requests RENAME TO requests_v0")
    MIGRATIONS[0].apply(con)
    con.execute("INSERT INTO requests (ts, variant, route, status, latency_ms) "
                "SELECT to_timestamp(ts), 'production', route, status, duration_s * 1000 "
                "FROM requests_v0")
    con.execute("DROP TABLE requests_v0")


def test_upgrade_from_a_fake_v0_keeps_its_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "h.duckdb")
    _make_v0(path)
    con = duckdb.connect(path)
    assert migrate(con, [Migration(1, "from the v0 prototype", _v0_to_v1)]) == [1]
    con.close()
    store = HistoryStore.open(path)  # the real migrations: nothing left to do
    assert store.con.execute(
        "SELECT epoch(ts), route, status, latency_ms FROM requests ORDER BY ts").fetchall() == [
        (T0, "/v1/messages", 200, 250.0), (T0 + 1, "/v1/chat/completions", 502, 1500.0)]
    store.write(rows_at([T0 + 2]))  # and the file takes new rows
    assert count(store, "requests") == 3
    store.close()


def test_a_later_migration_applies_on_top_of_a_file_in_use(tmp_path: Path) -> None:
    path = str(tmp_path / "h.duckdb")
    store = HistoryStore.open(path)
    store.write(rows_at([T0]))
    store.close()
    later = Migration(SCHEMA_VERSION + 1, "requests.region", lambda c: c.execute(
        "ALTER TABLE requests ADD COLUMN region VARCHAR DEFAULT 'eu'"))
    con = duckdb.connect(path)
    assert migrate(con, [*MIGRATIONS, later]) == [SCHEMA_VERSION + 1]
    assert con.execute("SELECT request_id, region FROM requests").fetchall() == [
        ("req00000000", "eu")]
    con.close()
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}; this "
                                          f"zaiproxy knows up to {SCHEMA_VERSION}"):
        HistoryStore.open(path)  # a file from the future is never written


def test_a_failing_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = str(tmp_path / "h.duckdb")
    HistoryStore.open(path).close()

    def broken(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("CREATE TABLE half_done (x INTEGER)")
        con.execute("SELECT * FROM no_such_table")

    con = duckdb.connect(path)
    with pytest.raises(duckdb.CatalogException):
        migrate(con, [*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "broken", broken)])
    assert current_version(con) == SCHEMA_VERSION
    assert con.execute("SELECT count(*) FROM information_schema.tables "
                       "WHERE table_name = 'half_done'").fetchone() == (0,)
    con.close()


def test_v3_takes_control_routes_out_of_an_older_file(tmp_path: Path) -> None:
    """A v2 file holds rows of control routes (v2 recorded every request), among them an
    /admin/events stream of 694,907 ms that was the p95 of its range. Read as it is, they
    are left out by route; migrated, they are gone, raw and rolled up, and new rows carry
    their API."""
    path = str(tmp_path / "h.duckdb")
    con = duckdb.connect(path)
    assert migrate(con, MIGRATIONS[:2]) == [1, 2]
    api_rows = rows_at([T0 + i for i in range(1, 20)])
    control = rows_at([T0 + 20, T0 + 21, T0 + 22, T0 + 23], method="GET", model=None,
                      usage=None, upstream_status=None, result=None)
    control = [(*row[:5], route, *row[6:]) for row, route in zip(
        control, ("/admin/events", "/metrics", "/health", "/ready"), strict=True)]
    control[0] = (*control[0][:15], 694_907.0, *control[0][16:])  # latency_ms
    with con.appender("requests") as app:  # v2's columns: no api, requested_model, upstream
        app.append_rows([row[:-3] for row in api_rows + control])
    con.close()
    v2 = HistoryStore(duckdb.connect(path), version=2)  # what the store does for an old file
    v2.rollup(T0 + 120)
    assert count(v2, "requests_1m") == 5  # the API rows' minute and four control routes'
    v2.con.close()

    old = HistoryStore.open(path, read_only=True)
    assert old.version == 2
    summary = history_summary(old, 300, group_by="route", now=T0 + 120)
    assert [(r["route"], r["requests"]) for r in summary["rows"]] == [("/v1/chat/completions", 19)]
    assert summary["total"]["latency_ms_max"] == 100.0
    series = history_series(old, 300, resolution_s=60, now=T0 + 120)["series"]["production"]
    assert [p["requests"] for p in series] == [19]
    old.close()

    store = HistoryStore.open(path)  # the recorder opens it: migrated to v3 (and v4)
    routes = store.con.execute("SELECT DISTINCT route, api FROM requests").fetchall()
    assert routes == [("/v1/chat/completions", None)]  # written before v3: API unknown
    assert store.con.execute("SELECT DISTINCT route FROM requests_1m").fetchall() == [
        ("/v1/chat/completions",)]
    store.write(rows_at([T0 + 30], api="anthropic", route="/v1/messages"))
    assert store.con.execute("SELECT api FROM requests WHERE route = '/v1/messages'"
                             ).fetchall() == [("anthropic",)]
    summary = history_summary(store, 300, group_by="route", now=T0 + 120)
    assert summary["total"]["requests"] == 20 and summary["total"]["latency_ms_p95"] == 100.0
    store.close()


def test_v4_adds_requested_model_to_a_v3_file(tmp_path: Path) -> None:
    """A v3 file's rows keep their values and read NULL as requested_model (no request fell
    back before v4); rows written after the migration carry it."""
    path = str(tmp_path / "h.duckdb")
    con = duckdb.connect(path)
    assert migrate(con, MIGRATIONS[:3]) == [1, 2, 3]
    with con.appender("requests") as app:  # v3's columns: no requested_model yet
        app.append_rows([row[:-2] for row in rows_at([T0 + 1, T0 + 2])])
    con.close()
    old = HistoryStore.open(path, read_only=True)  # read as it is, not migrated
    assert old.version == 3
    assert history_summary(old, 300, now=T0 + 120)["total"]["requests"] == 2
    old.close()

    store = HistoryStore.open(path)
    assert store.version == SCHEMA_VERSION == 6
    store.write(rows_at([T0 + 3], model="glm-4.5", requested_model="glm-4.6"))
    assert store.con.execute(
        "SELECT model, requested_model, api FROM requests ORDER BY ts").fetchall() == [
        ("glm-4.6", None, "openai"), ("glm-4.6", None, "openai"), ("glm-4.5", "glm-4.6", "openai")]
    store.close()


def test_v5_adds_upstream_to_a_v4_file(tmp_path: Path) -> None:
    """A v4 file's rows read NULL as upstream (no pool of keys before v5); rows written
    after the migration carry the alias."""
    path = str(tmp_path / "h.duckdb")
    con = duckdb.connect(path)
    assert migrate(con, MIGRATIONS[:4]) == [1, 2, 3, 4]
    with con.appender("requests") as app:  # v4's columns: no upstream yet
        app.append_rows([row[:-1] for row in rows_at([T0 + 1])])
    con.close()
    store = HistoryStore.open(path)
    assert store.version == SCHEMA_VERSION == 6
    store.write(rows_at([T0 + 2], upstream="backup"))
    assert store.con.execute("SELECT upstream FROM requests ORDER BY ts").fetchall() == [
        (None,), ("backup",)]
    store.close()


def test_v6_adds_the_zai_quota_table_to_a_v5_file(tmp_path: Path) -> None:
    """A v5 file keeps its rows as they were (requests, rollups, snapshots, totals) and gets
    an empty ``zai_quota``; read as it is, its summaries say no quota was recorded."""
    from zaiproxy.observe.recorder.quota import QuotaRow

    path = str(tmp_path / "h.duckdb")
    con = duckdb.connect(path)
    assert migrate(con, MIGRATIONS[:5]) == [1, 2, 3, 4, 5]
    con.close()
    v5 = HistoryStore(duckdb.connect(path), version=5)
    v5.write(rows_at([T0 + 1, T0 + 2], upstream="backup"))
    v5.snapshot(T0 + 5)
    v5.rollup(T0 + 120)
    tables = ("requests", "requests_1m", "snapshots", "recorder_totals")
    before = {t: v5.con.execute(f"FROM {t} ORDER BY ALL").fetchall() for t in tables}
    v5.con.close()
    old = HistoryStore.open(path, read_only=True)
    assert old.version == 5
    doc = history_summary(old, 300, now=T0 + 120)
    assert doc["total"]["requests"] == 2 and doc["zai_quota"] == []
    old.close()

    store = HistoryStore.open(path)
    assert store.version == SCHEMA_VERSION == 6
    assert {t: store.con.execute(f"FROM {t} ORDER BY ALL").fetchall() for t in tables} == before
    assert count(store, "zai_quota") == 0
    assert store.write_zai_quota("production", [QuotaRow(
        T0 + 60, "backup", "five_hour", "TOKENS_LIMIT", 0.42, T0 + 3600, "pro", None)]) == 1
    assert store.con.execute(
        'SELECT epoch(ts), variant, upstream, quota_window, used_fraction, epoch(reset_at) '
        "FROM zai_quota").fetchall() == [
        (T0 + 60, "production", "backup", "five_hour", 0.42, T0 + 3600)]
    store.close()


# ---- queries ------------------------------------------------------------------------------------


@pytest.fixture
def filled(store: HistoryStore) -> HistoryStore:
    rows = (rows_at([T0 + 1, T0 + 2, T0 + 61]) + rows_at([T0 + 3], status=429, key_alias=None)
            + rows_at([T0 + 62], status=502, model="glm-4.5", duration_s=2.0))
    rows.append(db_row("canary", 1, list(wire.row_of(record(99), T0 + 4))))
    store.write(rows)
    return store


def test_summary_by_key_and_status(filled: HistoryStore) -> None:
    doc = history_summary(filled, 300, group_by="key", now=T0 + 120)
    assert doc["source"] == "raw" and doc["p95"] == "exact"
    assert [(r["key"], r["requests"], r["errors"]) for r in doc["rows"]] == [
        ("alice", 5, 1), (None, 1, 0)]
    assert doc["total"]["requests"] == 6 and doc["total"]["error_rate"] == pytest.approx(1 / 6, abs=1e-6)
    by_status = history_summary(filled, 300, group_by="status", variant="production",
                                now=T0 + 120)
    assert [(r["status"], r["requests"]) for r in by_status["rows"]] == [
        (200, 3), (429, 1), (502, 1)]
    assert by_status["total"]["latency_ms_max"] == 2000.0
    assert orjson.loads(orjson.dumps(doc)) == doc  # JSON-able as it is
    with pytest.raises(QueryError):
        history_summary(filled, 300, group_by="client", now=T0)


def test_summary_from_rollups_beyond_raw_retention(filled: HistoryStore) -> None:
    filled.rollup(T0 + 200)
    now = T0 + 1.5 * DAY
    doc = history_summary(filled, 2 * DAY, group_by="model", now=now)
    assert doc["source"] == "rollup" and doc["p95"].startswith("approximate")
    assert [(r["model"], r["requests"], r["errors"]) for r in doc["rows"]] == [
        ("glm-4.6", 5, 0), ("glm-4.5", 1, 1)]


def test_series_per_variant(filled: HistoryStore) -> None:
    doc = history_series(filled, 300, resolution_s=60, now=T0 + 120)
    prod = doc["series"]["production"]
    assert [(p["t"] - T0, p["requests"], p["errors"]) for p in prod] == [(0, 3, 0), (60, 2, 1)]
    assert [p["requests"] for p in doc["series"]["canary"]] == [1]
    only = history_series(filled, 300, resolution_s=60, variant="canary", now=T0 + 120)
    assert list(only["series"]) == ["canary"]
    with pytest.raises(QueryError):
        history_series(filled, 10 * DAY, resolution_s=1, now=T0)


# What each row is: (status, upstream_status, latency ms, ttft ms, result, zai class, zai code,
# zai retries). Ten rows in minute 0, latencies 100..1000 ms, as the proxy records them
# (request/pipeline.py): its own 429/502/504 have no upstream_status and result "ok".
PLOT_ROWS: list[tuple[Any, ...]] = [
    (200, 200, 100, 10, "ok", None, None, 0),
    (200, 200, 200, 20, "ok", None, None, 0),
    (200, 200, 300, 40, "ok", None, None, 0),
    (200, 200, 400, None, "ok", None, None, 0),  # not relayed: no ttft
    (429, None, 500, None, "ok", None, None, 0),  # refused by the proxy's own limits
    (429, 429, 600, None, "ok", "frequency", "1302", 2),  # Z.AI 429 relayed after 2 retries
    (502, None, 700, None, "ok", None, None, 0),  # connect failed: the proxy's 502
    (502, 502, 800, None, "ok", None, None, 0),  # the upstream's own 502, relayed
    (200, 200, 900, 30, "upstream_cut", "unknown", None, 1),  # non-JSON 429 retried, then cut
    (504, None, 1000, None, "ok", None, None, 0),  # upstream timed out: the proxy's 504
]


@pytest.fixture
def plotted(store: HistoryStore) -> HistoryStore:
    rows = [db_row("production", 0, list(wire.row_of(record(
        i, status=status, upstream_status=up, duration_s=latency / 1000,
        ttft_s=ttft / 1000 if ttft is not None else None, result=result, zai_class=cls,
        zai_code=code, zai_retries=retries), T0 + 1 + i)))
        for i, (status, up, latency, ttft, result, cls, code, retries) in enumerate(PLOT_ROWS)]
    rows += rows_at([T0 + 61, T0 + 62])  # minute 1: no ttft anywhere
    rows.append(db_row("canary", 1, list(wire.row_of(record(
        99, status=429, upstream_status=None, ttft_s=0.005), T0 + 5))))
    store.write(rows)
    return store


def test_raw_series_points_carry_what_a_dashboard_plots(plotted: HistoryStore) -> None:
    doc = history_series(plotted, 300, resolution_s=60, now=T0 + 120)
    assert doc["source"] == "raw" and doc["p95"] == "exact" and doc["p50_p99"] == "exact"
    first, second = doc["series"]["production"]
    assert first["t"] == T0 and first["requests"] == 10
    assert {k: first[k] for k in ("responses_2xx", "responses_4xx", "responses_5xx",
                                  "responses_429", "errors")} == {
        "responses_2xx": 5, "responses_4xx": 2, "responses_5xx": 3, "responses_429": 2,
        "errors": 4}  # errors: 502, 502, 504, the cut stream
    # quantile_cont over 100..1000: p50 at position 4.5, p95 at 8.55, p99 at 8.91.
    assert (first["latency_ms_p50"], first["latency_ms_p95"], first["latency_ms_p99"]) == (
        550.0, 955.0, 991.0)
    # ttft over the four rows that have one (10, 20, 30, 40): positions 1.5, 2.85, 2.97.
    assert (first["ttft_ms_p50"], first["ttft_ms_p95"], first["ttft_ms_p99"]) == (
        25.0, 38.5, 39.7)
    assert first["retries"] == 3
    # Z.AI's 429 answers: 2 retried + 1 relayed, and 1 retried (a body without a code counts
    # too), as zai_proxy_zai_errors_total counts them.
    assert first["zai_errors"] == 4
    assert first["upstream_errors"] == 3  # cut, the proxy's 502 and 504; not a relayed 502
    assert first["rejections"] == 1  # the relayed Z.AI 429 is not the proxy's
    assert (second["requests"], second["responses_2xx"], second["rejections"]) == (2, 2, 0)
    assert (second["ttft_ms_p50"], second["ttft_ms_p95"], second["ttft_ms_p99"]) == (
        None, None, None)  # no row in the bucket has a ttft
    assert second["latency_ms_p50"] == 100.0 and second["retries"] == 0
    # One quantile state gives the three: its p95 is the summary's (a scalar quantile).
    summary = history_summary(plotted, 60, variant="production", group_by="variant",
                              now=T0 + 60)
    assert summary["total"]["latency_ms_p95"] == first["latency_ms_p95"]
    assert "responses_2xx" not in summary["total"]  # the summary's answer is unchanged
    assert orjson.loads(orjson.dumps(doc)) == doc


def test_series_variant_filter_keeps_the_new_fields_apart(plotted: HistoryStore) -> None:
    doc = history_series(plotted, 300, resolution_s=60, variant="canary", now=T0 + 120)
    assert list(doc["series"]) == ["canary"]
    (point,) = doc["series"]["canary"]
    assert (point["requests"], point["responses_429"], point["rejections"],
            point["ttft_ms_p50"]) == (1, 1, 1, 5.0)
    prod = history_series(plotted, 300, resolution_s=60, variant="production", now=T0 + 120)
    assert list(prod["series"]) == ["production"]
    assert prod["series"]["production"][0]["rejections"] == 1  # not the canary's


def test_rollup_series_points_leave_what_rollups_lack_null(plotted: HistoryStore) -> None:
    plotted.rollup(T0 + 200)
    doc = history_series(plotted, 2 * DAY, resolution_s=60, variant="production",
                         now=T0 + 1.5 * DAY)
    assert doc["source"] == "rollup" and doc["p50_p99"].startswith("not kept")
    nulls = doc["fields_null_in_rollup"]
    assert nulls == ["latency_ms_p50", "latency_ms_p99", "ttft_ms_p50", "ttft_ms_p95",
                     "ttft_ms_p99", "retries", "zai_errors", "upstream_errors", "rejections",
                     "usage_missing"]
    first, second = doc["series"]["production"]
    assert [k for k, v in first.items() if v is None] == nulls  # exactly those, nothing else
    assert {k: first[k] for k in ("requests", "errors", "responses_2xx", "responses_4xx",
                                  "responses_5xx", "responses_429")} == {
        "requests": 10, "errors": 4, "responses_2xx": 5, "responses_4xx": 2,
        "responses_5xx": 3, "responses_429": 2}
    # Per-status minute p95s: 200 (100..400, 900) 800, 429 595, 502 795, 504 1000;
    # weighted by requests: (800*5 + 595*2 + 795*2 + 1000) / 10.
    assert first["latency_ms_p95"] == 778.0
    assert (second["requests"], second["responses_2xx"], second["responses_4xx"]) == (2, 2, 0)
    raw = history_series(plotted, 300, resolution_s=60, now=T0 + 120)
    assert raw["fields_null_in_rollup"] == nulls  # listed on raw ranges too


def test_export_parquet(filled: HistoryStore, tmp_path: Path) -> None:
    out = str(tmp_path / "it's.parquet")
    assert export_parquet(filled, 300, out, variant="production", now=T0 + 120) == 5
    quoted = out.replace("'", "''")
    got = duckdb.sql(f"SELECT count(*), min(variant), max(variant) FROM '{quoted}'").fetchall()
    assert got == [(5, "production", "production")]


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("1h", 3600.0), ("7d", 7 * DAY), ("2w", 14 * DAY),
    ("1.5h", 5400.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "0", "1y", "1 hour"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(QueryError):
        parse_duration(text)


def test_cli_group_names_match_the_queries() -> None:
    from zaiproxy.observe.recorder.cli import GROUP_NAMES
    from zaiproxy.observe.recorder.queries import GROUPS

    assert tuple(GROUPS) == GROUP_NAMES


# ---- DuckDB failing: the recorder degrades, counts, retries ---------------------------------


def events(log_buffer: Any, name: str) -> list[dict[str, Any]]:
    from zaiproxy.core import logs

    logs.get_logger().flush()
    return [x for x in (orjson.loads(line) for line in log_buffer.getvalue().splitlines())
            if x["event"] == name]


async def test_an_unwritable_path_is_logged_counted_and_retried(
        tmp_path: Path, log_buffer: Any) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    rec = Recorder(str(blocker / "h.duckdb"), variant="production")
    rec.ingest(datagram([wire.row_of(record(0), T0)]))
    assert not await rec.flush()
    assert len(rec.pending) == 1 and rec.stats.store_errors == 1
    assert not await rec.flush()  # within the backoff: not even tried
    assert rec.stats.store_errors == 1
    errors = events(log_buffer, "history_error")
    assert errors[0]["op"] == "open" and "IOException" in errors[0]["error"]
    assert errors[0]["pending"] == 1
    assert "unavailable" in repr(rec)


async def test_a_corrupt_file_is_reported_not_overwritten(tmp_path: Path, log_buffer: Any) -> None:
    path = tmp_path / "h.duckdb"
    junk = os.urandom(8192)
    path.write_bytes(junk)
    rec = Recorder(str(path), variant="production")
    ok, _ = await rec.with_store("open", lambda s: None)
    assert not ok
    assert "not a valid DuckDB database file" in events(log_buffer, "history_error")[0]["error"]
    assert path.read_bytes() == junk


async def test_a_file_locked_by_another_process_then_released(
        tmp_path: Path, log_buffer: Any) -> None:
    path = str(tmp_path / "h.duckdb")
    holder = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import duckdb, sys\ncon = duckdb.connect(sys.argv[1])\n"
         "print('held', flush=True)\nsys.stdin.read()\n", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        with trio.fail_after(10):
            assert (await holder.stdout.receive_some()).startswith(b"held")
        rec = Recorder(path, variant="production")
        rec.ingest(datagram([wire.row_of(record(i), T0) for i in range(50)]))
        assert not await rec.flush()
        assert "Could not set lock" in events(log_buffer, "history_error")[0]["error"]
        await holder.stdin.aclose()
        with trio.fail_after(10):
            await holder.wait()

        async def written() -> bool:
            await rec.flush()
            return rec.stats.rows_written == 50

        with trio.fail_after(10):
            while not await written():  # noqa: ASYNC110  (bounded: retried on the backoff)
                await trio.sleep(0.05)
        assert events(log_buffer, "history_recovered")
        await rec.finish()
    finally:
        holder.kill()
        await holder.wait()
    store = HistoryStore.open(path)
    assert count(store, "requests") == 50
    store.close()


async def test_a_write_error_keeps_the_rows_for_the_next_try(tmp_path: Path,
                                                            autojump_clock: Any) -> None:
    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production")
    ok, _ = await rec.with_store("open", lambda s: None)
    assert ok and rec.store is not None

    def disk_full(store: HistoryStore) -> None:
        raise duckdb.IOException("No space left on device")

    rec.ingest(datagram([wire.row_of(record(i), T0) for i in range(10)]))
    ok, _ = await rec.with_store("write", disk_full)
    assert not ok and rec.store is None and rec.last_error == (
        "IOException: No space left on device")
    assert not await rec.flush()  # within the backoff: not tried again yet
    await trio.sleep(service.BACKOFF_MAX)  # virtual time: past any backoff
    assert await rec.flush()
    assert rec.stats.rows_written == 10
    await rec.finish()


async def test_pending_rows_are_bounded_while_duckdb_is_down(tmp_path: Path) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("")
    rec = Recorder(str(blocker / "h.duckdb"), variant="production", max_pending=100)
    for start in range(0, 250, 50):
        rec.ingest(datagram([wire.row_of(record(i), T0) for i in range(start, start + 50)],
                            first=start))
    assert rec.pending_rows == 100 and rec.stats.dropped_pending == 150
    assert rec.pending[0].rows[0][3] == "req00000096"  # the oldest went first


async def test_bad_datagrams_and_rows_are_counted_not_written(tmp_path: Path) -> None:
    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production")
    bad_row = list(wire.row_of(record(1), T0))
    bad_row[wire.ROW_FIELDS.index("status")] = "200"
    assert rec.ingest(b"garbage") == 0
    assert rec.ingest(datagram([wire.row_of(record(0), T0), bad_row])) == 1  # type: ignore[list-item]
    assert (rec.stats.bad_datagrams, rec.stats.bad_rows, len(rec.pending)) == (1, 1, 1)


async def test_worker_drop_counts_reach_the_snapshots(tmp_path: Path) -> None:
    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production", wall=lambda: T0)
    rec.ingest(datagram([wire.row_of(record(0), T0)], worker=0, pid=10, dropped=5))  # row 5
    # Rows 6-8 dropped too: the next batch starts at 9 and says 8 were dropped before it.
    rec.ingest(datagram([wire.row_of(record(1), T0)], worker=0, pid=10, dropped=8, first=9))
    rec.ingest(datagram([wire.row_of(record(2), T0)], worker=1, pid=11, dropped=2))
    rec.ingest(datagram([wire.row_of(record(3), T0)], worker=0, pid=12, dropped=1))  # restarted
    assert await rec.flush()
    assert rec.stats.worker_dropped == 11 and rec.stats.lost == 0
    await rec.snapshot()
    assert rec.store is not None
    assert rec.store.con.execute("SELECT dropped_total FROM snapshots").fetchall() == [(11,)]
    await rec.finish()


async def test_the_channel_is_read_until_the_stop_marker(tmp_path: Path) -> None:
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with recv, send:
        rec = Recorder(str(tmp_path / "h.duckdb"), variant="production",
                       channel=recv)
        sink = RecordSink(send, worker=0, variant="production", max_batch=100)
        async with trio.open_nursery() as nursery:
            await nursery.start(rec.run)
            for i in range(1000):
                sink.submit(record(i))
                if i % 200 == 199:  # the channel holds ~10 datagrams: let the recorder read
                    await trio.sleep(0.01)
            sink.flush()
            # Never a blocking send on the loop the recorder runs on: with the channel full
            # (10 datagrams here) it would wait for a reader that cannot run.
            send.setblocking(False)
            while True:
                try:
                    send.send(wire.STOP)
                    break
                except BlockingIOError:
                    await trio.sleep(0.01)
        assert rec.stop_seen.is_set()
    store = HistoryStore.open(str(tmp_path / "h.duckdb"))
    assert count(store, "requests") == 1000
    assert count(store, "snapshots") == 1  # the final one
    store.close()


# ---- the query endpoint -----------------------------------------------------------------------


async def test_endpoint_routes_auth_and_errors(tmp_path: Path) -> None:
    from zaiproxy.observe.recorder.endpoint import PARQUET, answer, serve_endpoint

    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production", wall=lambda: T0 + 120)
    rec.ingest(datagram([wire.row_of(record(i), T0 + i) for i in range(3)]))
    assert await rec.flush()

    async def get(target: str, auth: bytes | None = b"Bearer s3cret") -> tuple[int, Any]:
        status, ctype, body = await answer(rec, "GET", target, auth, "s3cret")
        return status, (orjson.loads(body) if ctype == "application/json" else (ctype, body))

    assert (await get("/history/status", None))[0] == 401
    assert (await get("/history/status", b"Bearer wrong"))[0] == 401
    status, doc = await get("/history/status")
    assert status == 200 and doc["rows_written"] == 3 and doc["available"] is True
    status, doc = await get("/history/summary?range=1h&group_by=key")
    assert status == 200 and doc["rows"][0] == {**doc["rows"][0], "key": "alice", "requests": 3}
    status, doc = await get("/history/series?range=10m&resolution=1m&variant=production")
    assert status == 200 and [p["requests"] for p in doc["series"]["production"]] == [3]
    status, (ctype, body) = await get("/history/export?range=1h")
    assert status == 200 and ctype == PARQUET and body.startswith(b"PAR1")
    assert (await get("/history/summary?range=soon"))[1] == {
        "error": "bad duration 'soon' (examples: 15m, 1h, 24h, 7d)"}
    assert (await get("/history/summary?group_by=client"))[0] == 400
    assert (await get("/history/nothing"))[0] == 404
    assert (await answer(rec, "POST", "/history/status", b"Bearer s3cret", "s3cret"))[0] == 405
    await rec.finish()
    # The file is gone from under it (closed, path now unusable): 503, not a crash.
    rec.path = str(tmp_path / "missing-dir" / "h.duckdb")
    status, doc = await get("/history/status")
    assert status == 200 and doc["available"] is False
    status, doc = await get("/history/summary")
    assert status == 503 and doc["error"].startswith("history unavailable: IOException")

    # And over a real socket, with the blocking client the CLI uses.
    from zaiproxy.observe.recorder.endpoint import EndpointError, fetch

    rec2 = Recorder(str(tmp_path / "h.duckdb"), variant="production", wall=lambda: T0 + 120)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_endpoint, rec2, None)
        body = await trio.to_thread.run_sync(
            fetch, url, "/history/summary", {"range": "1h", "group_by": "status"})
        assert orjson.loads(body)["total"]["requests"] == 3
        with pytest.raises(EndpointError) as info:
            await trio.to_thread.run_sync(fetch, url, "/history/x", {})
        assert info.value.status == 404
        nursery.cancel_scope.cancel()
    await rec2.finish()


async def test_the_recorder_publishes_its_backlog_and_losses_to_the_metric_cells(
        tmp_path: Path) -> None:
    from zaiproxy.limits.ledger import load
    from zaiproxy.observe.metrics import REC_DROPPED, REC_QUEUE, RECORDER_KEY, RecorderCells

    impl = load("python")
    segment = impl.Ledger(f"/dev/shm/zaiproxy-test-rec-{os.getpid()}", create=True, rows=64,
                          workers=1)
    segment.unlink()
    try:
        blocker = tmp_path / "f"
        blocker.write_text("")
        rec = Recorder(str(blocker / "h.duckdb"), variant="production", max_pending=30,
                       cells=RecorderCells(segment))
        row = segment.row(RECORDER_KEY)
        rec.ingest(datagram([wire.row_of(record(i), T0) for i in range(50)]))
        rec.publish()
        assert (segment.counter_get(row, REC_QUEUE), segment.counter_get(row, REC_DROPPED)) == (
            30, 20)
        await rec.finish()  # DuckDB never opened: the 30 pending rows are lost too
        assert (segment.counter_get(row, REC_QUEUE), segment.counter_get(row, REC_DROPPED)) == (
            0, 50)
        assert rec.stats.lost_at_exit == 30
    finally:
        segment.close()


async def test_a_worker_hands_each_finished_request_to_its_sink(nursery: trio.Nursery) -> None:
    from tests.harness import make_config, request, start_mock, start_proxy

    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream))
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with recv, send:
        sink = RecordSink(send, worker=0, variant="production")
        proxy.worker.ctx.record_sink = sink
        resp = await request(proxy.port, "POST", "/v1/chat/completions",
                             [("content-type", "application/json")],
                             orjson.dumps({"model": "glm-4.6",
                                           "messages": [{"role": "user", "content": "hi"}]}))
        assert resp.status == 200
        await request(proxy.port, "GET", "/nope")
        sink.flush()
        rows = wire.decode_batch(recv.recv(65536)).rows
    got = [dict(zip(wire.ROW_FIELDS, r, strict=True)) for r in rows]
    assert [(r["route"], r["status"]) for r in got] == [("/v1/chat/completions", 200),
                                                         ("other", 404)]
    assert got[0]["request_id"] == resp.header(b"x-zaiproxy-request-id").decode()  # type: ignore[union-attr]
    assert got[0]["model"] == "glm-4.6" and got[0]["input_tokens"] > 0


# ---- series: usage_missing (what canary-check reads from a proxy) ------------------------------


@pytest.fixture
def estimated(store: HistoryStore) -> HistoryStore:
    """Minute 0 of production: three 2xx whose tokens were estimated (one a 201), one 2xx
    with upstream usage, an estimated 502 (not a success); one estimated 2xx in minute 1."""
    rows = rows_at([T0 + 1, T0 + 2], tokens_estimated=True)
    rows += rows_at([T0 + 3], tokens_estimated=True, status=201)
    rows += rows_at([T0 + 4])
    rows += rows_at([T0 + 5], tokens_estimated=True, status=502, upstream_status=502)
    rows += rows_at([T0 + 61], tokens_estimated=True)
    store.write(rows)
    return store


def test_raw_series_points_count_successes_without_upstream_usage(
        estimated: HistoryStore) -> None:
    doc = history_series(estimated, 300, resolution_s=60, now=T0 + 120)
    first, second = doc["series"]["production"]
    assert (first["requests"], first["responses_2xx"], first["responses_5xx"]) == (5, 4, 1)
    assert first["usage_missing"] == 3  # the 200s and the 201; not the 502
    assert (second["requests"], second["usage_missing"]) == (1, 1)
    assert "usage_missing" in doc["fields_null_in_rollup"]
    summary = history_summary(estimated, 300, group_by="route", now=T0 + 120)
    assert summary["total"]["requests"] == 6
    assert sum(p["requests"] for p in doc["series"]["production"]) == 6


def test_rollup_series_points_leave_usage_missing_null(estimated: HistoryStore) -> None:
    estimated.rollup(T0 + 200)
    doc = history_series(estimated, 2 * DAY, resolution_s=60, variant="production",
                         now=T0 + 1.5 * DAY)
    assert doc["source"] == "rollup"
    first, second = doc["series"]["production"]
    assert first["usage_missing"] is None and second["usage_missing"] is None
    assert (first["requests"], first["responses_2xx"], second["requests"]) == (5, 4, 1)
