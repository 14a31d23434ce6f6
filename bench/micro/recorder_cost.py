"""What the request history costs: the worker's sink per record, the recorder's rows/s.

Run it from the repository root::

    .venv/bin/python -m bench.micro.recorder_cost [--records 100000] [--repeat 3]

Every number is the best of ``--repeat`` timed runs (least disturbed by other work on
a shared machine), on one core:

1. Worker side (the hot path), µs per record: ``RecordSink.submit`` for a typical
   record, batches of 256 sent through a real AF_UNIX datagram socketpair that a
   thread drains (so nothing is dropped), split into its parts: building the wire
   row, encoding the batch (orjson, per record), and the ``send`` (per record);
   plus the cost of a submit whose batch is dropped (channel full).
2. Recorder side, rows/s: ``Recorder.ingest`` (decode + type checks + DB row), and
   ``HistoryStore.write`` (one appender per transaction) into a file at batch sizes
   256 .. 16384, the numbers behind ``service.WRITE_BATCH``; plus ``executemany`` at
   1,000 rows for reference.
3. The channel's capacity as the supervisor makes it (``supervise.make_channel``):
   records queued before the first drop when nobody reads, by sink batch size (each
   datagram costs the kernel ~1 KB of bookkeeping on top of its bytes).
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import duckdb

from zaiproxy.core import logs
from zaiproxy.core.record import RequestRecord, Usage
from zaiproxy.observe.recorder import wire
from zaiproxy.observe.recorder.service import Recorder
from zaiproxy.observe.recorder.sink import RecordSink
from zaiproxy.observe.recorder.store import HistoryStore, db_row
from zaiproxy.observe.recorder.supervise import make_channel

RECORD = RequestRecord(
    request_id="a1b2c3d400000001", method="POST", route="/v1/messages", api="anthropic", status=200,
    duration_s=1.234, bytes_in=52_311, client="127.0.0.1", model="glm-4.6", stream=True,
    upstream_status=200, upstream_ttfb_s=0.412, bytes_out=18_220, result="ok",
    usage=Usage(12_034, 611, 9_000, 0), key_alias="agent-7", prompt_estimate=11_980)


def best(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` runs, seconds."""
    out = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - start)
    return out


class Drain:
    """A forked process that reads and discards datagrams: a recorder that keeps up.

    A process, not a thread: a reader thread here would take the GIL from the sender
    and make the sink look slower than it is.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.pid = os.fork()
        if self.pid == 0:  # the child: no threads, no trio in this process, fork is fine
            while sock.recv(1 << 20) != wire.STOP:
                pass
            os._exit(0)

    def join(self) -> None:
        os.waitpid(self.pid, 0)


def timed_sends(sock: socket.socket, data: bytes, count: int) -> float:
    """Seconds spent in ``count`` successful sends (waits for the reader not counted)."""
    spent = 0.0
    done = 0
    while done < count:
        start = time.perf_counter()
        try:
            sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            select.select([], [sock], [], 1.0)
            continue
        spent += time.perf_counter() - start
        done += 1
    return spent


def worker_side(n: int, repeat: int) -> dict[str, float]:
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    send.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    drain = Drain(recv)
    sink = RecordSink(send, worker=0, variant="production")

    def submit_all() -> None:
        for _ in range(n):
            sink.submit(RECORD)
        sink.flush()

    total = best(submit_all, repeat) / n * 1e6
    assert sink.dropped == 0, sink.dropped
    rows = [wire.row_of(RECORD, 1.0) for _ in range(256)]
    row_us = best(lambda: [wire.row_of(RECORD, 1.0) for _ in range(n)], repeat) / n * 1e6
    encode_us = best(lambda: [wire.encode_batch(0, 1, "production", 0, rows)
                              for _ in range(n // 256)], repeat) / n * 1e6
    data = wire.encode_batch(0, 1, "production", 0, rows)
    send_us = min(timed_sends(send, data, n // 256) for _ in range(repeat)) / n * 1e6
    send.send(wire.STOP)
    drain.join()
    recv.close()
    send.close()

    # A channel nobody reads: every batch after the first few is dropped.
    recv, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    full = RecordSink(send, worker=0, variant="production")
    for _ in range(20_000):
        full.submit(RECORD)
    dropped_us = best(lambda: [full.submit(RECORD) for _ in range(n)], repeat) / n * 1e6
    recv.close()
    send.close()
    return {"submit_us": total, "row_us": row_us, "encode_us": encode_us, "send_us": send_us,
            "bytes_per_record": len(data) / 256, "submit_dropping_us": dropped_us}


def channel_capacity() -> dict[str, int]:
    """Records the channel holds before a sink drops (nobody reading), per batch size."""
    out = {}
    for batch in (1, 16, 256):
        recv, send = make_channel()
        sink = RecordSink(send, worker=0, variant="production", max_batch=batch)
        while sink.dropped == 0:
            sink.submit(RECORD)
        out[f"batch {batch}"] = sink.sent
        out["so_sndbuf"] = send.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        recv.close()
        send.close()
    return out


def recorder_side(n: int, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rows = [wire.row_of(RECORD, 1_800_000_000.0 + i * 0.001) for i in range(256)]
    datagram = wire.encode_batch(0, 1, "production", 0, rows)
    def ingest() -> None:
        # A fresh recorder per repeat: it keeps each worker's row count (sequence
        # numbers), so re-sending the same datagrams to one would count duplicates.
        fresh = Recorder("/nonexistent", variant="production", max_pending=n + 256)
        for _ in range(n // 256):
            fresh.ingest(datagram)

    out["ingest_rows_per_s"] = (n // 256 * 256) / best(ingest, repeat)
    db_rows = [db_row("production", 0, list(r)) for r in rows] * (n // 256)
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (256, 1024, 4096, 16384):
            path = os.path.join(tmp, f"h{batch}.duckdb")
            store = HistoryStore.open(path)

            def write(store: HistoryStore = store, batch: int = batch) -> None:
                for start in range(0, len(db_rows), batch):
                    store.write(db_rows[start:start + batch])

            out[f"write_rows_per_s@{batch}"] = len(db_rows) / best(write, repeat)
            store.close()
        con = duckdb.connect(os.path.join(tmp, "em.duckdb"))
        HistoryStore.open(os.path.join(tmp, "x.duckdb")).close()
        con.execute("ATTACH '" + os.path.join(tmp, "x.duckdb") + "' AS x")
        placeholders = ", ".join("?" * len(db_rows[0]))
        sample = db_rows[:1000]
        out["executemany_rows_per_s@1000"] = len(sample) / best(
            lambda: con.executemany(f"INSERT INTO x.requests VALUES ({placeholders})", sample), 1)
        con.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logs.configure("error")  # the dropping sink warns; that is measured, not wanted on screen
    w = worker_side(args.records, args.repeat)
    print(f"worker side, per record ({args.records:,} records, batches of 256):")
    print(f"  RecordSink.submit, all in           {w['submit_us']:6.2f} us")
    print(f"    wire row                          {w['row_us']:6.2f} us")
    print(f"    batch encode (orjson)             {w['encode_us']:6.2f} us")
    print(f"    send (MSG_DONTWAIT)               {w['send_us']:6.2f} us")
    print(f"  submit while the channel is full    {w['submit_dropping_us']:6.2f} us")
    print(f"  bytes per record on the wire        {w['bytes_per_record']:6.0f}")
    cap = channel_capacity()
    print(f"channel capacity (SO_SNDBUF {cap.pop('so_sndbuf'):,} bytes; "
          "records queued before the first drop):")
    for name, value in cap.items():
        print(f"  {name:34s} {value:10,}")
    r = recorder_side(args.records, args.repeat)
    print("recorder side, rows/s:")
    for name, value in r.items():
        print(f"  {name:34s} {value:10,.0f}")


if __name__ == "__main__":
    main()
