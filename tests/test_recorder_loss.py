"""History rows and a recorder that dies: nothing lost where it can be helped, the rest counted.

Issue 13 (part 4): SIGKILL of the recorder under load lost rows silently. Now every
worker incarnation numbers its rows, the file keeps each one's progress in the same
transaction as the rows, and the recorder consumes a datagram only once its rows
are committed (docs/decisions/recorder-loss.md). Here: the arithmetic (pure), the
wire bytes, the sink's numbering and heartbeats, recorders "killed" in-process at
each step (what SIGKILL leaves: the file as committed, the channel as the kernel
holds it), and the real thing: ``zaiproxy serve`` under load with its recorder
SIGKILLed three times, where rows in the file + counted losses + the workers' own
drops must equal the requests the clients saw complete, exactly.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
import trio
import trio.testing

from tests.harness import ProcessServer, RawClient, request, wait_until
from tests.test_recorder import T0, events, record
from tests.test_recorder_procs import (
    BODY,
    endpoint_doc,
    launch,
    log_events,
    recorder_status,
    recorder_url,
    stop,
)
from zaiproxy.observe.recorder import wire
from zaiproxy.observe.recorder.sequence import Chunk, Progress, account, settle
from zaiproxy.observe.recorder.service import Recorder
from zaiproxy.observe.recorder.sink import RecordSink
from zaiproxy.observe.recorder.store import HistoryStore, db_row

CHAT = "/v1/chat/completions"

# ---- the wire: sequence numbers in the header ------------------------------------------------


def test_wire_header_byte_for_byte() -> None:
    row = wire.row_of(record(1), T0)
    data = wire.encode_batch(3, 4242, "canary", 2, [row], nonce=77, first=5)
    assert data.startswith(
        b'[5,3,4242,77,"canary",2,5,[[1800000000.0,"req00000001","POST",'
        b'"/v1/chat/completions","openai",')
    heartbeat = wire.encode_batch(3, 4242, "canary", 2, [], nonce=77, first=6)
    assert heartbeat == b'[5,3,4242,77,"canary",2,6,[]]'
    batch = wire.decode_batch(data)
    assert (batch.source, batch.variant, batch.dropped_total, batch.first, len(batch.rows)) == (
        (3, 4242, 77), "canary", 2, 5, 1)


@pytest.mark.parametrize("doc", [
    [1, 0, 1, "p", 0, []],  # wire version 1: no sequence numbers
    [2, 0, 1, 7, "p", 0, 0, []],  # wire version 2: rows without their API
    [3, 0, 1, 7, "p", 0, 0, []],  # wire version 3: rows without requested_model
    [4, 0, 1, 7, "p", 0, -1, []],  # a negative row number
    [4, 0, 1, 7, "p", 3, 2, []],  # more rows dropped before row 2 than there are
    [4, 0, 1, "7", "p", 0, 0, []],  # a nonce that is not a number
    [4, 0, 1, 7, "p", 0, 0.5, []],
])
def test_wire_rejects_bad_sequence_headers(doc: list[Any]) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_batch(orjson.dumps(doc))


# ---- the arithmetic ------------------------------------------------------------------------------


@pytest.mark.parametrize(("prev", "first", "count", "dropped", "expect"), [
    # A new source from its first row: nothing missing.
    (None, 0, 10, 0, (0, 0, 0, Progress(10, 0, 0))),
    # The next batch, contiguous.
    (Progress(10, 0, 0), 10, 5, 0, (0, 0, 0, Progress(15, 0, 0))),
    # Rows 10-14 missing, the worker says it dropped 2 of them: 3 lost.
    (Progress(10, 0, 0), 15, 5, 2, (0, 3, 2, Progress(20, 2, 3))),
    # A batch read again after a restart (its rows are in the file): skipped, nothing else.
    (Progress(20, 2, 3), 10, 10, 0, (10, 0, 0, Progress(20, 2, 3))),
    # A heartbeat that finds the worker's last batch gone: 5 lost.
    (Progress(10, 0, 0), 15, 0, 0, (0, 5, 0, Progress(15, 0, 5))),
    # A heartbeat that says nothing new; an old one (read again).
    (Progress(15, 1, 0), 15, 0, 1, (0, 0, 0, Progress(15, 1, 0))),
    (Progress(15, 1, 0), 12, 0, 1, (0, 0, 0, Progress(15, 1, 0))),
    # A worker whose first 30 rows all went to a full channel: dropped, not lost.
    (None, 30, 1, 30, (0, 0, 30, Progress(31, 30, 0))),
    # Lost earlier, counted earlier: the total carries on.
    (Progress(40, 5, 7), 42, 1, 6, (0, 1, 1, Progress(43, 6, 8))),
])
def test_account(prev: Progress | None, first: int, count: int, dropped: int,
                 expect: tuple[int, int, int, Progress]) -> None:
    v = account(prev, first, count, dropped)
    assert (v.skip, v.lost, v.worker_dropped, v.progress) == expect


def rows_of(first: int, n: int, variant: str = "production") -> list[Any]:
    return [db_row(variant, 0, list(wire.row_of(record(i), T0))) for i in
            range(first, first + n)]


def test_settle_skips_what_the_file_has_and_counts_the_gaps() -> None:
    a, b = (0, 10, 1), (1, 11, 1)
    bad = rows_of(8, 4)
    bad[1] = None  # a row that failed the type checks: numbered, never written
    chunks = [
        Chunk(a, "production", 0, 4, 0, rows_of(0, 4)),  # in the file already
        Chunk(a, "production", 4, 4, 0, rows_of(4, 4)),  # half in the file? never: all or none
        Chunk(a, "production", 8, 4, 0, bad),
        Chunk(None, "", 0, 0, 0, [], held=1),  # a bad datagram: nothing to settle
        Chunk(a, "production", 15, 2, 1, rows_of(15, 2)),  # 12-14: 1 dropped, 2 lost
        Chunk(b, "canary", 0, 0, 0, []),  # a heartbeat of a source with nothing yet
        Chunk(b, "canary", 6, 0, 0, []),  # ... and one that finds 6 rows missing
    ]
    s = settle(chunks, {a: Progress(8, 0, 0)})
    assert [r[3] for r in s.rows] == ["req00000008", "req0000000a", "req0000000b",
                                      "req0000000f", "req00000010"]
    assert s.duplicates == 8 and s.shed_duplicates == 0
    assert s.progress == {a: Progress(17, 1, 2), b: Progress(6, 0, 6)}
    assert s.variants == {a: "production", b: "canary"}
    assert (s.worker_dropped, s.lost) == ({"production": 1}, {"production": 2, "canary": 6})
    assert s.losses == ((a, "production", 2), (b, "canary", 6))
    assert not s.empty
    # Nothing new at all: no transaction.
    assert settle([Chunk(a, "production", 17, 0, 1, [])], s.progress).empty


def test_settle_shed_rows_are_not_losses() -> None:
    src = (0, 10, 1)
    chunk = Chunk(src, "production", 0, 4, 0, rows_of(0, 4))
    assert chunk.trim(3) == 3 and (chunk.trimmed, chunk.shed, len(chunk.rows)) == (3, 3, 1)
    s = settle([chunk, Chunk(src, "production", 4, 1, 0, rows_of(4, 1))], {})
    assert [r[3] for r in s.rows] == ["req00000003", "req00000004"]
    assert s.lost == {} and s.progress == {src: Progress(5, 0, 0)}
    # The same shed chunk read again after a restart (the file had it): not a drop either.
    again = settle([chunk], {src: Progress(5, 0, 0)})
    assert again.shed_duplicates == 3 and again.duplicates == 1 and again.empty


# ---- the sink numbers its rows and sends heartbeats ----------------------------------------------


def read_all(sock: socket.socket) -> list[wire.Batch]:
    out = []
    while True:
        try:
            out.append(wire.decode_batch(sock.recv(1 << 20, socket.MSG_DONTWAIT)))
        except BlockingIOError:
            return out


def test_sink_numbers_rows_across_sends_and_drops() -> None:
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with recv, send:
        sink = RecordSink(send, worker=2, variant="production", max_batch=4)
        for i in range(6):
            sink.submit(record(i))
        sink.flush()
        first, second = read_all(recv)
        assert (first.first, len(first.rows), second.first, len(second.rows)) == (0, 4, 4, 2)
        assert first.source == second.source == (2, os.getpid(), sink.nonce)
        assert RecordSink(send, worker=2, variant="production").nonce != sink.nonce
        # A full channel: the batch is dropped and its numbers used; the next one says so.
        send.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while sink.dropped == 0:
            for i in range(4):
                sink.submit(record(i, error="e" * 150))
        dropped = sink.dropped
        assert sink.seq == sink.sent + sink.dropped
        read_all(recv)
        sink.submit(record(99))
        sink.flush()
        (last,) = read_all(recv)
        assert last.first == sink.seq - 1 and last.dropped_total == dropped


async def test_a_quiet_sink_sends_its_counts(autojump_clock: trio.testing.MockClock) -> None:
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with recv, send:
        sink = RecordSink(send, worker=0, variant="production", interval=0.1, heartbeat=1.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.run)
            await trio.sleep(5)
            assert read_all(recv) == []  # nothing sent ever: nothing to tell
            sink.submit(record(0))
            await trio.sleep(0.15)
            assert [len(b.rows) for b in read_all(recv)] == [1]
            await trio.sleep(0.8)
            assert read_all(recv) == []  # not quiet long enough yet
            await trio.sleep(0.3)
            (beat,) = read_all(recv)
            assert (beat.first, beat.rows, beat.dropped_total) == (1, [], 0)
            await trio.sleep(1.0)
            assert len(read_all(recv)) == 1  # and again while quiet
            nursery.cancel_scope.cancel()
        sink.submit(record(1))
        sink.close()  # the last batch, then the final counts
        batch, final = read_all(recv)
        assert (batch.first, len(batch.rows), final.first, final.rows) == (1, 1, 2, [])
        assert sink.heartbeats == 3


# ---- recorders "killed" in-process -------------------------------------------------------------


def die(rec: Recorder) -> None:
    """What SIGKILL leaves: the file as committed (the WAL included), the channel as the
    kernel holds it; nothing flushed, nothing consumed."""
    if rec.store is not None:
        rec.store.con.close()
        rec.store = None
    if rec.reader is not None:
        rec.reader.close()


def send_rows(sink: RecordSink, start: int, stop: int) -> None:
    for i in range(start, stop):
        sink.submit(record(i))
    sink.flush()


def file_ids(path: Path) -> list[str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return [r[0] for r in con.execute("SELECT request_id FROM requests").fetchall()]
    finally:
        con.close()


def file_progress(path: Path) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT next_seq, dropped, lost FROM recorder_progress").fetchall()
    finally:
        con.close()


async def opened(path: Path, recv: socket.socket, **kw: Any) -> Recorder:
    rec = Recorder(str(path), variant="production", channel=recv, run="run-1", **kw)
    ok, _ = await rec.with_store("open", lambda s: None)
    assert ok
    return rec


@pytest.fixture
def channel() -> Any:
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    send.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    yield recv, send, RecordSink(send, worker=0, variant="production", max_batch=10)
    recv.close()
    send.close()


async def test_killed_after_its_commit_before_it_consumed(tmp_path: Path,
                                                          channel: Any) -> None:
    recv, _send, sink = channel
    path = tmp_path / "h.duckdb"
    a = await opened(path, recv)
    assert a.reader is not None and a.reader.holding
    send_rows(sink, 0, 30)
    assert a.drain_channel_nowait() == 30 and a.reader.held == 3
    assert await a.flush()
    assert a.reader.held == 0 and a.stats.released == 3 and a.stats.rows_written == 30
    send_rows(sink, 30, 50)
    a.drain_channel_nowait()
    a.reader.release = lambda count: 0  # type: ignore[method-assign]  # killed right here
    assert await a.flush() and a.stats.rows_written == 50
    die(a)
    send_rows(sink, 50, 60)
    b = await opened(path, recv)
    assert b.reader is not None and b.reader.replayed_bytes > 0  # a held what b reads again
    assert b.drain_channel_nowait() == 30
    assert await b.flush()
    assert (b.stats.duplicates, b.stats.rows_written, b.stats.lost) == (20, 10, 0)
    await b.finish()
    ids = file_ids(path)
    assert sorted(ids) == [f"req{i:08x}" for i in range(60)]  # each exactly once
    assert file_progress(path) == [(60, 0, 0)]


async def test_killed_holding_unwritten_datagrams_loses_nothing(tmp_path: Path,
                                                                channel: Any) -> None:
    recv, _send, sink = channel
    path = tmp_path / "h.duckdb"
    a = await opened(path, recv)
    send_rows(sink, 0, 35)
    assert a.drain_channel_nowait() == 35 and a.pending_rows == 35
    die(a)  # read, never written
    b = await opened(path, recv)
    assert b.drain_channel_nowait() == 35
    await b.finish()
    assert (b.stats.rows_written, b.stats.duplicates, b.stats.lost) == (35, 0, 0)
    assert len(file_ids(path)) == 35


async def test_killed_holding_rows_in_memory_counts_them_exactly_once(
        tmp_path: Path, channel: Any, log_buffer: Any) -> None:
    from zaiproxy.limits.ledger import load
    from zaiproxy.observe.metrics import REC_LOST, RECORDER_KEY, RecorderCells

    recv, _send, sink = channel
    path = tmp_path / "h.duckdb"
    segment = load("python").Ledger(f"/dev/shm/zaiproxy-test-loss-{os.getpid()}", create=True,
                                    rows=64, workers=1)
    segment.unlink()
    try:
        a = await opened(path, recv, hold=False)  # e.g. a kernel without SO_PEEK_OFF
        send_rows(sink, 0, 20)
        a.drain_channel_nowait()
        assert await a.flush()
        send_rows(sink, 20, 40)
        assert a.drain_channel_nowait() == 20  # consumed: only in a's memory now
        die(a)
        send_rows(sink, 40, 45)
        b = await opened(path, recv, cells=RecorderCells(segment))
        b.drain_channel_nowait()
        assert await b.flush()
        assert (b.stats.rows_written, b.stats.lost) == (5, 20)
        assert b.status()["lost"] == 20
        b.publish()
        assert segment.counter_get(segment.row(RECORDER_KEY), REC_LOST) == 20
        lost = events(log_buffer, "recorder_records_lost")
        assert [(e["records"], e["worker"], e["lost_total"]) for e in lost] == [(20, 0, 20)]
        sink.close()  # the worker exits: its final counts say nothing new
        b.drain_channel_nowait()
        assert await b.flush()
        await b.snapshot()
        die(b)
        c = await opened(path, recv)  # the progress is in the file: nothing counted twice
        send_rows(sink, 45, 46)
        c.drain_channel_nowait()
        await c.finish()
        assert c.stats.lost == 0 and c.stats.rows_written == 1
    finally:
        segment.close()
    assert len(file_ids(path)) == 26
    assert file_progress(path) == [(46, 0, 20)]
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT max(lost_total), max(requests_total) FROM snapshots"
                           ).fetchone() == (20, 26)
    finally:
        con.close()


async def test_a_quiet_worker_cannot_hide_a_loss(tmp_path: Path, channel: Any) -> None:
    recv, _send, sink = channel
    path = tmp_path / "h.duckdb"
    a = await opened(path, recv, hold=False)
    send_rows(sink, 0, 7)
    a.drain_channel_nowait()
    die(a)  # the worker's last batch, lost: nothing more of it will ever arrive ...
    assert sink.send_heartbeat()  # ... but its counts do
    b = await opened(path, recv)
    b.drain_channel_nowait()
    await b.finish()
    assert (b.stats.lost, b.stats.heartbeats, b.stats.rows_written) == (7, 1, 0)


async def test_worker_drops_are_not_losses(tmp_path: Path) -> None:
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with recv, send:
        send.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
        sink = RecordSink(send, worker=1, variant="production", max_batch=16)
        rec = await opened(tmp_path / "h.duckdb", recv)
        for i in range(2000):  # nobody reads meanwhile: most are dropped
            sink.submit(record(i))
        sink.flush()
        rec.drain_channel_nowait()
        assert await rec.flush()
        sink.close()  # drops after the last batch are in the final counts
        rec.drain_channel_nowait()
        await rec.finish()
    assert sink.dropped > 0
    assert rec.stats.worker_dropped == sink.dropped and rec.stats.lost == 0
    assert rec.stats.rows_written + rec.stats.worker_dropped == 2000


async def test_holding_is_bounded_by_the_channel(tmp_path: Path, channel: Any) -> None:
    recv, _send, sink = channel
    capacity = 64 << 10  # as if the senders' buffer were that small
    rec = await opened(tmp_path / "h.duckdb", recv, channel_bytes=capacity)
    assert rec.reader is not None and rec.reader.capacity == capacity
    send_rows(sink, 0, 1000)
    rec.drain_channel_nowait()
    # Past half the capacity it consumed instead of holding: the senders never see a
    # channel full of rows that are only waiting for a commit.
    assert rec.stats.released > 0 and 0 < rec.reader.held < 100
    assert rec.reader.held_charge <= capacity // 2 + 8192  # at most one datagram past it
    await rec.finish()
    assert rec.stats.rows_written == 1000


async def test_duckdb_failing_stops_holding(tmp_path: Path, channel: Any) -> None:
    recv, _send, sink = channel
    blocker = tmp_path / "f"
    blocker.write_text("")
    rec = Recorder(str(blocker / "h.duckdb"), variant="production", channel=recv)
    send_rows(sink, 0, 20)
    rec.drain_channel_nowait()
    assert rec.reader is not None and rec.reader.held == 2
    assert not await rec.flush()
    # Rows held in memory (bounded, counted if lost): the channel is free for the workers.
    assert rec.reader.held == 0 and rec.pending_rows == 20
    send_rows(sink, 20, 30)
    rec.drain_channel_nowait()
    assert rec.reader.held == 0 and rec.pending_rows == 30


def test_totals_survive_a_kill_between_snapshots(tmp_path: Path) -> None:
    path = str(tmp_path / "h.duckdb")
    store = HistoryStore.open(path, run="r1")
    store.snapshot(T0)
    store.write(rows_of(0, 3), dropped={"production": 2})
    store.con.close()  # killed before the next snapshot
    store = HistoryStore.open(path, run="r1")
    t = store.totals["production"]
    assert (t.requests, t.dropped) == (3, 2)
    store.close()


def test_a_new_run_forgets_the_old_runs_progress(tmp_path: Path) -> None:
    path = str(tmp_path / "h.duckdb")
    store = HistoryStore.open(path, run="r1")
    store.write_chunks([Chunk((0, 10, 1), "production", 0, 2, 0, rows_of(0, 2))], T0)
    store.close()
    store = HistoryStore.open(path, run="r1")
    assert store.progress == {(0, 10, 1): Progress(2, 0, 0)}
    store.close()
    # A new `serve`: a new channel, so no datagram of run r1 can arrive any more.
    store = HistoryStore.open(path, run="r2")
    assert store.progress == {}
    assert store.con.execute("SELECT count(*) FROM recorder_progress").fetchone() == (0,)
    store.close()


def test_the_lost_counter_is_exposed(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from zaiproxy.limits.ledger import load
    from zaiproxy.observe.metrics import RecorderCells, WorkerMetrics

    impl = load("python")
    segment = impl.Ledger(f"/dev/shm/zaiproxy-test-lost-{os.getpid()}", create=True, rows=64,
                          windows=4, workers=1)
    try:
        metrics = WorkerMetrics(variant="canary", ledger=impl.IMPLEMENTATION, workers=1,
                                segment=segment)
        RecorderCells(segment).lost(7)
        body, _ = metrics.render()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert samples[("zai_proxy_recorder_records_lost_total", (("variant", "canary"),))] == 7
        assert samples[("zai_proxy_recorder_dropped_records_total",
                        (("variant", "canary"),))] == 0
    finally:
        segment.unlink()
        segment.close()


# ---- the real thing: `zaiproxy serve`, its recorder SIGKILLed under load ----------------------

KILLS = 3


def file_accounting(history: Path) -> dict[str, int]:
    con = duckdb.connect(str(history), read_only=True)
    try:
        rows, distinct = con.execute(
            "SELECT count(*), count(DISTINCT request_id) FROM requests WHERE route = ?",
            [CHAT]).fetchone() or (0, 0)
        dropped, lost = con.execute(
            "SELECT coalesce(sum(dropped), 0), coalesce(sum(lost), 0) FROM recorder_progress"
        ).fetchone() or (0, 0)
    finally:
        con.close()
    return {"rows": rows, "distinct": distinct, "dropped": int(dropped), "lost": int(lost)}


class Load:
    """Client tasks sending chat completions until told to stop (bounded: ``limit``)."""

    def __init__(self, port: int, limit: int) -> None:
        self.port = port
        self.limit = limit
        self.sent = 0
        self.completed: list[str] = []
        self.failed = 0
        self.stop = trio.Event()

    async def client(self) -> None:
        c = await RawClient.connect("127.0.0.1", self.port)
        try:
            while not self.stop.is_set() and self.sent < self.limit:
                self.sent += 1
                resp = await c.request("POST", CHAT, [("content-type", "application/json")],
                                       BODY)
                if resp.status == 200 and resp.complete:
                    self.completed.append(resp.header(b"x-zaiproxy-request-id").decode())  # type: ignore[union-attr]
                else:
                    self.failed += 1
        finally:
            await c.aclose()


async def kill_recorder(history: Path, proxy: ProcessServer) -> int:
    """SIGKILL the running recorder; once its replacement serves, returns how many bytes
    of datagrams the replacement found held (read, not written) by the one killed."""
    doc = endpoint_doc(history)
    assert doc is not None
    pid = int(doc["pid"])
    os.kill(pid, signal.SIGKILL)
    with trio.fail_after(20):
        while (endpoint_doc(history) or {}).get("pid") in (None, pid):
            assert proxy.proc.poll() is None, proxy.logs()[-3000:]
            await trio.sleep(0.02)
    replayed: int = (await recorder_status(history))["channel"]["replayed_bytes"]
    return replayed


async def wait_status(history: Path, ready: Callable[[dict[str, Any]], bool]) -> None:
    """Poll the running recorder's /history/status until ``ready`` (another process)."""
    with trio.fail_after(20):
        while not ready(await recorder_status(history)):  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_sigkill_under_load_loses_no_row_that_was_read(
        mock: ProcessServer, tmp_path: Path) -> None:
    """DuckDB healthy: the kills land anywhere, mostly while the recorder holds datagrams
    it has not written yet (~100-500 KB here), and nothing is lost: the next recorder
    reads them again and skips what the file already had."""
    history = tmp_path / "h.duckdb"
    proxy = await launch(mock, tmp_path, history)
    load = Load(proxy.port, limit=20_000)
    replayed: list[int] = []
    try:
        await wait_until(lambda: recorder_url(history) is not None, 10)

        async def killer() -> None:
            for k in range(KILLS):
                await wait_until(lambda k=k: len(load.completed) >= 600 * (k + 1), 20)
                # While it holds datagrams it has read and not written: what used to be lost.
                await wait_status(history, lambda s: s["channel"]["held"] > 0)
                replayed.append(await kill_recorder(history, proxy))
            await wait_until(lambda: len(load.completed) >= 600 * (KILLS + 1), 20)
            load.stop.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            for _ in range(6):
                nursery.start_soon(load.client)
        metrics = (await request(proxy.port, "GET", "/metrics")).body.decode()
        assert 'zai_proxy_recorder_records_lost_total{variant="production"}' in metrics
    finally:
        assert await stop(proxy) == 0, proxy.logs()[-3000:]
    assert len(replayed) == KILLS and load.failed == 0  # the clients never noticed
    assert any(replayed), replayed  # the kills did land on held datagrams
    got = file_accounting(history)
    assert got["rows"] == got["distinct"]  # nothing written twice
    assert got["rows"] + got["lost"] + got["dropped"] == len(load.completed), got
    assert got["lost"] == 0, got  # held in the channel until written: nothing to lose
    assert set(load.completed) <= set(file_ids(history))
    died = log_events(proxy, "recorder_died")
    assert len(died) == KILLS and all(e["signal"] == signal.SIGKILL for e in died)
    (last,) = [e for e in log_events(proxy, "recorder_stopped") if e["proc"] == "recorder"]
    assert (last["lost"], last["lost_at_exit"], last["dropped_pending"]) == (0, 0, 0)


async def test_sigkill_with_duckdb_down_counts_every_lost_row(
        mock: ProcessServer, tmp_path: Path) -> None:
    """DuckDB unavailable (the file locked by this test): the recorder holds the rows in its
    memory, so a kill loses them; the recorder that finally writes counts exactly those."""
    history = tmp_path / "h.duckdb"
    holder: duckdb.DuckDBPyConnection | None = duckdb.connect(str(history))
    proxy = await launch(mock, tmp_path, history)
    load = Load(proxy.port, limit=20_000)
    try:
        await wait_until(lambda: recorder_url(history) is not None, 10)

        async def killer() -> None:
            nonlocal holder
            for _ in range(KILLS):
                # Rows read into its memory (DuckDB is down: nothing held in the channel).
                await wait_status(history, lambda s: s["pending"] > 50
                                  and s["channel"]["held"] == 0)
                await kill_recorder(history, proxy)
            assert holder is not None
            holder.close()  # DuckDB back: the last recorder writes, and counts the losses
            holder = None
            await wait_until(lambda: log_events(proxy, "history_recovered"), 20)
            load.stop.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            for _ in range(6):
                nursery.start_soon(load.client)

        async def settled() -> dict[str, Any]:
            status = await recorder_status(history)
            return status if status["pending"] == 0 else {}

        # Every worker's counts reach the recorder (heartbeats after 1 s of quiet).
        with trio.fail_after(20):
            while True:
                status = await settled()
                summary = orjson.loads(await trio.to_thread.run_sync(functools.partial(
                    _fetch_summary, history)))
                rows = sum(r["requests"] for r in summary["rows"] if r["route"] == CHAT)
                if status and rows + status["lost"] + status["worker_dropped"] == len(
                        load.completed):
                    break
                await trio.sleep(0.1)
        # Published to the shared counter within a second.
        exposed = (f'zai_proxy_recorder_records_lost_total{{variant="production"}} '
                   f'{float(status["lost"])}')
        with trio.fail_after(10):
            while exposed not in (await request(proxy.port, "GET", "/metrics")).body.decode():  # noqa: ASYNC110
                await trio.sleep(0.1)
    finally:
        if holder is not None:
            holder.close()
        assert await stop(proxy) == 0, proxy.logs()[-3000:]
    assert load.failed == 0
    got = file_accounting(history)
    assert got["rows"] == got["distinct"]
    assert got["rows"] + got["lost"] + got["dropped"] == len(load.completed), got
    assert got["lost"] > 0 and got["lost"] == status["lost"]
    warned = log_events(proxy, "recorder_records_lost")
    assert sum(e["records"] for e in warned) == got["lost"]


def _fetch_summary(history: Path) -> bytes:
    from zaiproxy.observe.recorder.endpoint import fetch

    url = recorder_url(history)
    assert url is not None
    return fetch(url, "/history/summary", {"range": "1h", "group_by": "route"})


def test_the_logs_are_compacted_and_read_back_the_same(tmp_path: Path) -> None:
    path = str(tmp_path / "h.duckdb")
    a, b = (0, 10, 1), (1, 11, 2)
    store = HistoryStore.open(path, run="r1")
    for i in range(5):  # five transactions, each moving both sources
        store.write_chunks([Chunk(a, "production", 2 * i, 2, 0, rows_of(2 * i, 2)),
                            Chunk(b, "canary", i, 1, 0, rows_of(100 + i, 1, "canary"))], T0)
    progress, totals = store.progress, {v: t.persisted(0, v) for v, t in store.totals.items()}
    assert store.con.execute("SELECT count(*) FROM recorder_progress").fetchone() == (10,)
    assert store.compact() == 8 + 8  # all but the newest per source, and per variant
    assert store.con.execute("SELECT count(*) FROM recorder_totals").fetchone() == (2,)
    store.close()
    store = HistoryStore.open(path, run="r1")
    assert store.progress == progress == {a: Progress(10, 0, 0), b: Progress(5, 0, 0)}
    assert {v: t.persisted(0, v) for v, t in store.totals.items()} == totals
    assert store.totals["production"].requests == 10 and store.txn == 5
    store.close()


class RefusingStore(HistoryStore):
    """A store whose DuckDB refuses rows as data (``refusing`` on): the seam the recorder
    takes its store class through, instead of patching HistoryStore."""

    refusing = True

    def write_chunks(self, chunks: Any, now: float, *, keep_rows: bool = True) -> Any:
        if keep_rows and self.refusing:
            raise duckdb.DataError("a value DuckDB will not take")
        return super().write_chunks(chunks, now, keep_rows=keep_rows)


async def test_rows_duckdb_refuses_are_discarded_not_lost(tmp_path: Path, channel: Any) -> None:
    recv, _send, sink = channel
    rec = await opened(tmp_path / "h.duckdb", recv, store=RefusingStore)
    send_rows(sink, 0, 10)
    rec.drain_channel_nowait()
    assert await rec.flush()
    assert rec.reader is not None and rec.reader.held == 0  # consumed: nothing to retry
    assert (rec.stats.discarded, rec.stats.rows_written) == (10, 0)
    assert isinstance(rec.store, RefusingStore)
    rec.store.refusing = False
    send_rows(sink, 10, 15)
    rec.drain_channel_nowait()
    await rec.finish()
    assert (rec.stats.rows_written, rec.stats.lost) == (5, 0)  # their numbers were written
