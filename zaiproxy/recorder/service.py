"""The recorder's trio service: read the channel, write DuckDB, survive DuckDB.

Tasks (one nursery):

* ``read_channel``: datagrams from the workers → rows in ``pending`` (decoded and
  type-checked here, so a bad row never reaches DuckDB). The supervisor's STOP
  marker ends it: every datagram sent before it has then been read.
* ``write_loop``: every ``write_interval`` (or at ``write_batch`` rows) the pending
  rows go to DuckDB through one appender per transaction, in a worker thread.
* ``snapshot_loop`` (every 5 s) and ``maintain_loop`` (rollups + retention, every
  60 s), on trio's clock; the values they write use ``wall`` (injectable).
* the query endpoint (:mod:`zaiproxy.recorder.endpoint`).

Every DuckDB call goes through :meth:`Recorder.with_store`: one at a time (one
thread, one lock), and any error there — an unwritable path, a corrupt file,
a file locked by another process, a full disk — is logged, counted, the
connection dropped, and the file opened again after a backoff (0.5 s doubling to
30 s). The rows wait in ``pending`` meanwhile (bounded: past ``max_pending`` the
oldest are dropped and counted). Nothing here can stop the workers: they only
ever see a socket buffer, and the DESIGN.md incident (monitoring storage that
exited on error took the dashboard down for weeks) is why.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import duckdb
import trio

from zaiproxy import logs
from zaiproxy.pricing import PriceTable
from zaiproxy.recorder.schema import SchemaError
from zaiproxy.recorder.store import BadRow, DbRow, HistoryStore, db_row
from zaiproxy.recorder.wire import STOP, WireError, decode_batch

T = TypeVar("T")


class Cells(Protocol):
    """Where the recorder's own backlog and losses go (metrics.RecorderCells)."""

    def dropped(self, n: int = 1) -> None: ...

    def set_queue_depth(self, depth: int) -> None: ...


MAX_DATAGRAM = 1 << 20  # receive buffer: larger than any datagram the kernel accepts here
WRITE_INTERVAL = 0.5
WRITE_BATCH = 4096  # ~100k rows/s at this size vs ~35k at 256 (bench/recorder_cost.py)
SNAPSHOT_INTERVAL = 5.0
PUBLISH_INTERVAL = 1.0  # the metrics cells: queue depth, records lost here
MAINTAIN_INTERVAL = 60.0
MAX_PENDING = 200_000  # rows held while DuckDB is unavailable (~100 MB at worst)
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
FINISH_TIMEOUT = 3.0  # the final flush's retries (supervise.STOP_TIMEOUT is longer)
# Errors that say "the data is bad", not "the storage is bad": retrying cannot help.
_DATA_ERRORS: tuple[type[BaseException], ...] = (
    duckdb.DataError, duckdb.IntegrityError, duckdb.InvalidInputException, TypeError)
# ... and "the query is bad" (the endpoint answers 400/500; the file is fine).
QUERY_ERRORS: tuple[type[BaseException], ...] = (*_DATA_ERRORS, duckdb.ProgrammingError)
_STORE_ERRORS = (duckdb.Error, OSError, SchemaError)


@dataclass
class RecorderStats:
    datagrams: int = 0
    rows_received: int = 0
    rows_written: int = 0
    bad_datagrams: int = 0
    bad_rows: int = 0
    dropped_pending: int = 0  # rows dropped here: pending was full (DuckDB down too long)
    discarded: int = 0  # rows DuckDB refused as data (never expected)
    lost_at_exit: int = 0  # rows still pending when the final flush gave up
    worker_dropped: int = 0  # rows the workers reported dropping (channel full)
    store_errors: int = 0
    opens: int = 0


def _writer(rows: list[DbRow], dropped: dict[str, int]) -> Callable[[HistoryStore], None]:
    def write(store: HistoryStore) -> None:
        store.write(rows, dropped)

    return write


class Recorder:
    def __init__(self, path: str, *, variant: str, raw_days: float = 7.0,
                 rollup_days: float = 90.0, channel: socket.socket | None = None,
                 wall: Callable[[], float] = time.time,
                 write_interval: float = WRITE_INTERVAL, write_batch: int = WRITE_BATCH,
                 max_pending: int = MAX_PENDING, cells: Cells | None = None,
                 prices: PriceTable | None = None) -> None:
        self.path = path
        self.variant = variant
        self.raw_days = raw_days
        self.rollup_days = rollup_days
        self.channel = channel  # the recorder's end of the socketpair (None: fed by ingest())
        self.wall = wall
        self.write_interval = write_interval
        self.write_batch = write_batch
        self.max_pending = max_pending
        self.cells = cells
        self.prices = prices  # for requests.cost_usd (None: left NULL)
        self._published_lost = 0
        self.pending: collections.deque[DbRow] = collections.deque()
        self.stats = RecorderStats()
        self.store: HistoryStore | None = None
        self.last_error: str | None = None
        self.stop_seen = trio.Event()  # the STOP marker was read
        self.stop_requested = trio.Event()
        self._lock = trio.Lock()
        self._flush_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._backoff = BACKOFF_INITIAL
        self._retry_at = 0.0
        self._writing = 0  # rows taken from ``pending`` by the write in progress
        self._wake_writer = trio.Event()
        self._worker_dropped: dict[tuple[int, int], int] = {}
        self._dropped_delta: dict[str, int] = {}
        self.log = logs.get_logger()

    def __repr__(self) -> str:
        state = "open" if self.store is not None else f"unavailable ({self.last_error})"
        return (f"<Recorder {self.path!r} {state} pending={len(self.pending)} "
                f"written={self.stats.rows_written}>")

    # ---- ingest ------------------------------------------------------------------

    def ingest(self, data: bytes) -> int:
        """One datagram → rows in ``pending``; returns the rows taken. Never raises."""
        st = self.stats
        st.datagrams += 1
        try:
            batch = decode_batch(data)
        except WireError as exc:
            st.bad_datagrams += 1
            if st.bad_datagrams == 1 or st.bad_datagrams % 1000 == 0:  # a stray writer: no flood
                self.log.error("recorder_bad_datagram", error=str(exc), bytes=len(data),
                               bad_datagrams=st.bad_datagrams)
            return 0
        key = (batch.worker, batch.pid)
        seen = self._worker_dropped.get(key, 0)
        if batch.dropped_total > seen:
            delta = batch.dropped_total - seen
            self._worker_dropped[key] = batch.dropped_total
            st.worker_dropped += delta
            self._dropped_delta[batch.variant] = self._dropped_delta.get(batch.variant, 0) + delta
        pending = self.pending
        taken = 0
        for wire_row in batch.rows:
            try:
                pending.append(db_row(batch.variant, batch.worker, wire_row, self.prices))
            except BadRow as exc:
                st.bad_rows += 1
                if st.bad_rows == 1 or st.bad_rows % 1000 == 0:
                    self.log.error("recorder_bad_row", error=str(exc), bad_rows=st.bad_rows)
                continue
            taken += 1
        st.rows_received += taken
        over = len(pending) - self.max_pending
        if over > 0:
            for _ in range(over):
                pending.popleft()
            st.dropped_pending += over
            self.log.warning("recorder_pending_full", dropped=over, held=len(pending),
                             error=self.last_error)
        if len(pending) >= self.write_batch:
            self._wake_writer.set()
        return taken

    async def read_channel(self) -> None:
        """Datagrams until the STOP marker (then every earlier datagram has been read)."""
        assert self.channel is not None
        sock = trio.socket.from_stdlib_socket(self.channel)
        while True:
            data = await sock.recv(MAX_DATAGRAM)
            if data == STOP:
                self.stop_seen.set()
                self.stop_requested.set()
                return
            self.ingest(data)

    def drain_channel_nowait(self) -> int:
        """Read what is queued right now without waiting (exit without a STOP marker)."""
        if self.channel is None:
            return 0
        count = 0
        while True:
            try:
                data = self.channel.recv(MAX_DATAGRAM, socket.MSG_DONTWAIT)
            except OSError:  # BlockingIOError: nothing more queued
                return count
            if data == STOP:
                self.stop_seen.set()
                return count
            count += self.ingest(data)

    # ---- DuckDB, one call at a time ---------------------------------------------------

    async def with_store(self, what: str, fn: Callable[[HistoryStore], T], *,
                         force: bool = False,
                         passthrough: tuple[type[BaseException], ...] = _DATA_ERRORS,
                         ) -> tuple[bool, T | None]:
        """Run ``fn(store)`` in the DuckDB thread; (False, None) when the store is unavailable.

        A DuckDB or OS error counts as the storage failing (logged, connection dropped,
        reopened after the backoff), except ``passthrough`` errors (bad data, a bad query),
        which are raised to the caller with the connection kept. ``force`` ignores the
        backoff (the final flush at exit).
        """
        async with self._lock:
            if self.store is None:
                if not force and trio.current_time() < self._retry_at:
                    return False, None
                try:
                    self.store = await trio.to_thread.run_sync(
                        self._open, limiter=self._limiter)
                except _STORE_ERRORS as exc:
                    self._failed("open", exc)
                    return False, None
            store = self.store
            try:
                result = await trio.to_thread.run_sync(fn, store, limiter=self._limiter)
            except passthrough:
                raise
            except _STORE_ERRORS as exc:
                self._failed(what, exc)
                return False, None
            if self.last_error is not None:
                self.log.warning("history_recovered", path=self.path, after=self.last_error,
                                 pending=len(self.pending))
                self.last_error = None
            self._backoff = BACKOFF_INITIAL
            return True, result

    def _open(self) -> HistoryStore:
        store = HistoryStore.open(self.path, variant=self.variant, raw_days=self.raw_days,
                                  rollup_days=self.rollup_days, opened_at=self.wall())
        self.stats.opens += 1
        self.log.info("history_opened", path=self.path, rows=self._count(store))
        return store

    @staticmethod
    def _count(store: HistoryStore) -> int:
        row = store.con.execute("SELECT count(*) FROM requests").fetchone()
        return int(row[0]) if row else 0

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.store_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if self.store is not None:
            store, self.store = self.store, None
            try:
                store.con.close()
            except Exception as close_exc:  # already broken: nothing more to do than say so
                self.log.debug("history_close_failed", error=str(close_exc))
        self.log.error("history_error", op=what, path=self.path, error=self.last_error,
                       retry_in_s=self._backoff, pending=len(self.pending) + self._writing,
                       errors=self.stats.store_errors)
        self._retry_at = trio.current_time() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    # ---- writing -----------------------------------------------------------------

    async def flush(self, *, force: bool = False) -> bool:
        """Write every pending row; False if DuckDB is unavailable (the rows stay pending)."""
        async with self._flush_lock:  # the write loop and the snapshot loop both flush
            return await self._flush(force)

    async def _flush(self, force: bool) -> bool:
        while self.pending or self._dropped_delta:
            n = min(len(self.pending), self.write_batch)
            batch = [self.pending.popleft() for _ in range(n)]
            dropped, self._dropped_delta = self._dropped_delta, {}
            self._writing = n
            try:
                ok, _ = await self.with_store("write", _writer(batch, dropped), force=force)
            except _DATA_ERRORS as exc:
                self.stats.discarded += len(batch)
                self.log.error("history_batch_discarded", rows=len(batch),
                               error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            finally:
                self._writing = 0
            if not ok:
                self.pending.extendleft(reversed(batch))
                for variant, count in dropped.items():
                    self._dropped_delta[variant] = self._dropped_delta.get(variant, 0) + count
                return False
            self.stats.rows_written += len(batch)
        return True

    async def write_loop(self) -> None:
        while True:
            with trio.move_on_after(self.write_interval):
                await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            await self.flush()

    async def snapshot_loop(self) -> None:
        while True:
            await trio.sleep(SNAPSHOT_INTERVAL)
            await self.flush()  # the snapshot counts what is in the file
            await self.snapshot()

    def publish(self) -> None:
        """Queue depth (rows not yet in the file) and rows lost here, to the metrics cells."""
        if self.cells is None:
            return
        self.cells.set_queue_depth(len(self.pending) + self._writing)
        st = self.stats
        lost = st.dropped_pending + st.discarded + st.lost_at_exit
        if lost > self._published_lost:
            self.cells.dropped(lost - self._published_lost)
            self._published_lost = lost

    async def publish_loop(self) -> None:
        while True:
            self.publish()
            await trio.sleep(PUBLISH_INTERVAL)

    async def maintain_loop(self) -> None:
        while True:
            await self.maintain()
            await trio.sleep(MAINTAIN_INTERVAL)

    async def snapshot(self, *, force: bool = False) -> None:
        now = self.wall()
        await self.with_store("snapshot", lambda s: s.snapshot(now), force=force)

    async def maintain(self, *, force: bool = False) -> None:
        now = self.wall()
        ok, result = await self.with_store("maintain", lambda s: s.maintain(now), force=force)
        if ok and result is not None:
            _rolled, (raw, snaps, rollups) = result
            if raw or snaps or rollups:
                self.log.info("history_retention", deleted_requests=raw, deleted_snapshots=snaps,
                              deleted_rollups=rollups, raw_days=self.raw_days,
                              rollup_days=self.rollup_days)

    async def query(self, fn: Callable[[HistoryStore], T]) -> tuple[bool, T | None]:
        """Run a read query (the endpoint); data errors propagate to the caller."""
        return await self.with_store("query", fn, passthrough=QUERY_ERRORS)

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self, serve: Callable[..., Any] | None = None, *,
                  task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``stop_requested``, then write everything held and close the file.

        ``serve``: the query endpoint's ``nursery.start`` target, whose started value
        (its URL) is this task's.
        """
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, self) if serve is not None else None
            # Open at once (a broken file is reported at start, not at the first write).
            await self.with_store("open", lambda s: None)
            if self.channel is not None:
                nursery.start_soon(self.read_channel)
            nursery.start_soon(self.write_loop)
            nursery.start_soon(self.snapshot_loop)
            nursery.start_soon(self.maintain_loop)
            nursery.start_soon(self.publish_loop)
            task_status.started(url)
            await self.stop_requested.wait()
            nursery.cancel_scope.cancel()
        await self.finish()

    async def finish(self, deadline: float = FINISH_TIMEOUT) -> None:
        """Drain the channel, write everything pending, snapshot, roll up, close.

        DuckDB failing now is retried for ``deadline`` seconds, then the rows are lost
        (and the number logged): the process is exiting.
        """
        if not self.stop_seen.is_set():
            self.drain_channel_nowait()
        # A file never opened in this process's life (an unwritable path, a corrupt file)
        # gets one more try, not ``deadline`` seconds of them: nothing says it is transient.
        retry = self.stats.opens > 0
        with trio.move_on_after(deadline):
            while not await self.flush(force=True) and retry:  # noqa: ASYNC110  (a retry)
                await trio.sleep(min(self._backoff, 1.0))
            if not self.pending:
                await self.snapshot(force=True)
                await self.maintain(force=True)
        if self.pending:
            self.stats.lost_at_exit = len(self.pending)
            self.log.error("history_rows_lost_at_exit", rows=len(self.pending),
                           error=self.last_error)
            self.pending.clear()
        self.publish()  # depth 0, the lost rows counted
        async with self._lock:
            if self.store is not None:
                store, self.store = self.store, None
                try:
                    await trio.to_thread.run_sync(store.close, limiter=self._limiter)
                except _STORE_ERRORS as exc:
                    self.log.error("history_close_failed", error=str(exc))
        st = self.stats
        self.log.info("recorder_stopped", rows_written=st.rows_written,
                      rows_received=st.rows_received, worker_dropped=st.worker_dropped,
                      dropped_pending=st.dropped_pending, lost=st.lost_at_exit,
                      store_errors=st.store_errors)

    def status(self) -> dict[str, Any]:
        st = self.stats
        return {
            "path": self.path, "available": self.store is not None, "error": self.last_error,
            "pending": len(self.pending), "datagrams": st.datagrams,
            "rows_received": st.rows_received, "rows_written": st.rows_written,
            "worker_dropped": st.worker_dropped, "dropped_pending": st.dropped_pending,
            "bad_datagrams": st.bad_datagrams, "bad_rows": st.bad_rows,
            "discarded": st.discarded, "store_errors": st.store_errors,
            "raw_days": self.raw_days, "rollup_days": self.rollup_days,
        }
