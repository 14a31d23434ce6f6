"""The recorder's trio service: read the channel, write DuckDB, survive DuckDB.

Tasks (one nursery):

* ``read_channel``: datagrams from the workers → chunks of rows in ``pending``
  (decoded and type-checked here, so a bad row never reaches DuckDB). The
  supervisor's STOP marker ends it: every datagram sent before it has then been read.
* ``write_loop``: every ``write_interval`` (or at ``write_batch`` rows) the pending
  rows go to DuckDB through one appender per transaction, in a worker thread,
  together with each worker's progress (sequence numbers, recorder/sequence.py).
* ``snapshot_loop`` (every 5 s; with it, Z.AI's quota samples that are new since the last,
  recorder/quota.py) and ``maintain_loop`` (rollups + retention, every 60 s), on trio's
  clock; the values they write use ``wall`` (injectable).
* the query endpoint (:mod:`zaiproxy.observe.recorder.endpoint`).

Users' own SQL (``POST /history/sql``, :meth:`Recorder.sql`) does not go through the DuckDB
thread: it runs on a cursor of the writer's connection (a connection of its own to the same
DuckDB instance), in a read-only transaction, in a thread of its own (at most
:data:`SQL_CONCURRENCY` at a time), stopped at its time limit (recorder/sql.py). A slow query
then delays no write, and a refused or failing one is the user's error, never the storage's.
When the recorder opens the file it turns off DuckDB's file, network and extension access for
the instance (:func:`~zaiproxy.observe.recorder.sql.lock_down`), keeping one directory for
its Parquet exports' temporary files (``<history_path>.exports``, :attr:`Recorder.export_dir`).

Every DuckDB call goes through :meth:`Recorder.with_store`: one at a time (one
thread, one lock), and any error there — an unwritable path, a corrupt file,
a file locked by another process, a full disk — is logged, counted, the
connection dropped, and the file opened again after a backoff (0.5 s doubling to
30 s). The rows wait in ``pending`` meanwhile (bounded: past ``max_pending`` the
oldest are dropped and counted). Nothing here can stop the workers: they only
ever see a socket buffer: in the system this proxy replaces, monitoring storage
that exited on error took the dashboard down for weeks.

A recorder that is killed loses nothing it has read while DuckDB works: datagrams
stay in the channel until the transaction holding their rows committed
(recorder/channel.py), and the next recorder skips what the file already has. When
it cannot hold them (DuckDB failing, rows held in memory; the channel more than
half full with held datagrams; no ``SO_PEEK_OFF``) the rows it read are at risk,
and if it dies, the next recorder counts exactly how many were lost from the
sequence numbers: ``lost`` in :meth:`Recorder.status`, ``recorder_records_lost``
in the log, ``zai_proxy_recorder_records_lost_total``. The choice is in
docs/decisions/recorder-loss.md.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import duckdb
import orjson
import trio

from zaiproxy.core import logs
from zaiproxy.core.pricing import PriceTable
from zaiproxy.observe.recorder.channel import ChannelReader
from zaiproxy.observe.recorder.queries import EXPORT_PREFIX
from zaiproxy.observe.recorder.schema import SchemaError
from zaiproxy.observe.recorder.sequence import Chunk, Progress, Settlement, SourceKey, settle
from zaiproxy.observe.recorder.sql import Query, SqlError, lock_down
from zaiproxy.observe.recorder.store import BadRow, DbRow, HistoryStore, db_row
from zaiproxy.observe.recorder.wire import STOP, WireError, decode_batch

if TYPE_CHECKING:
    from zaiproxy.observe.recorder.quota import QuotaBatch

T = TypeVar("T")


class Cells(Protocol):
    """Where the recorder's own backlog and losses go (metrics.RecorderCells)."""

    def dropped(self, n: int = 1) -> None: ...

    def lost(self, n: int = 1) -> None: ...

    def set_queue_depth(self, depth: int) -> None: ...


class QuotaSamples(Protocol):
    """Z.AI's quota samples not recorded yet (recorder/quota.py's ``QuotaFeed``)."""

    def new(self) -> QuotaBatch: ...

    def recorded(self, batch: QuotaBatch) -> None: ...


WRITE_INTERVAL = 0.5
WRITE_BATCH = 4096  # ~100k rows/s at this size vs ~35k at 256 (bench/micro/recorder_cost.py)
SNAPSHOT_INTERVAL = 5.0
PUBLISH_INTERVAL = 1.0  # the metrics cells: queue depth, records lost here
MAINTAIN_INTERVAL = 60.0
MAX_PENDING = 200_000  # rows held while DuckDB is unavailable (~100 MB at worst)
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
FINISH_TIMEOUT = 3.0  # the final flush's retries (supervise.STOP_TIMEOUT is longer)
# Held datagrams (read, not yet consumed) take room in the channel the workers send into:
# past this share of its capacity the writer is woken, past HOLD_SHARE the recorder stops
# holding (consumes; the rows are then at risk in its memory, and counted if it dies).
WAKE_SHARE = 8  # 1/8
HOLD_SHARE = 2  # 1/2
SQL_CONCURRENCY = 2  # users' queries running at once (each in its own thread)
# Errors that say "the data is bad", not "the storage is bad": retrying cannot help.
_DATA_ERRORS: tuple[type[BaseException], ...] = (
    duckdb.DataError, duckdb.IntegrityError, duckdb.InvalidInputException, TypeError)
# ... and "the query is bad" (the endpoint answers 400/500; the file is fine).
QUERY_ERRORS: tuple[type[BaseException], ...] = (*_DATA_ERRORS, duckdb.ProgrammingError)
_STORE_ERRORS = (duckdb.Error, OSError, SchemaError)


@dataclass
class RecorderStats:
    datagrams: int = 0
    heartbeats: int = 0  # datagrams without rows (a worker's counts alone)
    rows_received: int = 0
    rows_written: int = 0
    duplicates: int = 0  # rows read again after a restart that the file already had
    bad_datagrams: int = 0
    bad_rows: int = 0
    dropped_pending: int = 0  # rows dropped here: pending was full (DuckDB down too long)
    discarded: int = 0  # rows DuckDB refused as data (never expected)
    lost_at_exit: int = 0  # rows still pending when the final flush gave up
    worker_dropped: int = 0  # rows the workers dropped (channel full), learnt here
    lost: int = 0  # rows sent and never written (a recorder died holding them), counted here
    released: int = 0  # datagrams consumed from the channel after being held
    store_errors: int = 0
    opens: int = 0
    zai_quota_rows: int = 0  # rows of Z.AI's quota samples written (recorder/quota.py)


@dataclass(frozen=True, slots=True)
class Written:
    """What one write did (the DuckDB thread's answer)."""

    settlement: Settlement
    progress: dict[SourceKey, Progress]  # the file's progress after it
    kept: bool  # False: the rows were refused as data, only their numbers were written


def _clear_exports(directory: str) -> None:
    """Remove the temporary export directories (queries.export_parquet_bytes) a recorder
    left in ``directory``, and nothing else."""
    for name in os.listdir(directory):
        if name.startswith(EXPORT_PREFIX):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _answer_of(job: Query) -> bytes | SqlError:
    """The job's answer as JSON, or its error. In the job's thread: encoding 100,000 rows
    takes long enough to be kept off the loop that reads the channel; the cursor is closed
    there too."""
    try:
        return orjson.dumps(job.run())
    except SqlError as exc:
        return exc
    finally:
        with contextlib.suppress(duckdb.Error):
            job.con.close()


async def _cancel_on_cancel(job: Query) -> None:
    """Interrupt ``job`` when this task is cancelled (its thread cannot be: trio waits
    for it, and the job's watchdog makes that wait short)."""
    try:
        await trio.sleep_forever()
    finally:
        job.cancel()


def _writer(chunks: list[Chunk], now: float,
            keep_rows: bool = True) -> Callable[[HistoryStore], Written]:
    def write(store: HistoryStore) -> Written:
        s = store.write_chunks(chunks, now, keep_rows=keep_rows)
        return Written(s, store.progress, keep_rows)

    return write


class Recorder:
    def __init__(self, path: str, *, variant: str, raw_days: float = 7.0,
                 rollup_days: float = 90.0, channel: socket.socket | None = None,
                 wall: Callable[[], float] = time.time,
                 write_interval: float = WRITE_INTERVAL, write_batch: int = WRITE_BATCH,
                 max_pending: int = MAX_PENDING, cells: Cells | None = None,
                 prices: PriceTable | None = None, run: str | None = None,
                 channel_bytes: int | None = None, hold: bool = True,
                 store: type[HistoryStore] = HistoryStore,
                 quota: QuotaSamples | None = None) -> None:
        """``run``: the channel's id (supervise.py makes one per `serve`; a random one
        here otherwise); ``channel_bytes``: its capacity as the senders' SO_SNDBUF reports
        it; ``hold``: keep datagrams in the channel until written (channel.py); ``store``:
        the store class (a seam: tests give a store that fails the way DuckDB can);
        ``quota``: Z.AI's quota samples to record (None: not polled)."""
        self.store_class = store
        self.path = path
        self.variant = variant
        self.raw_days = raw_days
        self.rollup_days = rollup_days
        self.wall = wall
        self.write_interval = write_interval
        self.write_batch = write_batch
        self.max_pending = max_pending
        self.cells = cells
        self.quota = quota
        self.prices = prices  # for requests.cost_usd (None: left NULL)
        self.run_id = run if run is not None else os.urandom(8).hex()
        self.reader = (ChannelReader(channel, hold=hold, capacity=channel_bytes)
                       if channel is not None else None)
        self._published_dropped = 0
        self._published_lost = 0
        # Datagrams read and not yet written, in channel order; ``_shed`` are older ones
        # whose rows were all shed (memory full), kept for their sequence numbers only.
        self.pending: collections.deque[Chunk] = collections.deque()
        self._pending_rows = 0
        self._shed: list[Chunk] = []
        self._shed_last: dict[SourceKey, Chunk] = {}
        self._inflight: list[Chunk] = []  # taken by the write in progress
        self._ends: dict[SourceKey, tuple[int, int]] = {}  # per source: (next row, dropped)
        # The file's progress as of the last write (None: never opened here): settles the
        # chunks left at exit, so losses found then are counted too.
        self._progress: dict[SourceKey, Progress] | None = None
        self.stats = RecorderStats()
        self.store: HistoryStore | None = None
        self.last_error: str | None = None
        self.stop_seen = trio.Event()  # the STOP marker was read
        self.stop_requested = trio.Event()
        self._lock = trio.Lock()
        self._flush_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._sql_limiter = trio.CapacityLimiter(SQL_CONCURRENCY)
        # The private directory the locked-down instance may write exports to (created
        # with the first open); ``sql_ready``: access outside it is off, users' SQL may run.
        self.export_dir: str | None = None
        self.sql_ready = False
        self._backoff = BACKOFF_INITIAL
        self._retry_at = 0.0
        self._writing = 0  # rows taken from ``pending`` by the write in progress
        self._wake_writer = trio.Event()
        self.log = logs.get_logger()

    def __repr__(self) -> str:
        state = "open" if self.store is not None else f"unavailable ({self.last_error})"
        return (f"<Recorder {self.path!r} {state} pending={self._pending_rows} "
                f"written={self.stats.rows_written}>")

    @property
    def pending_rows(self) -> int:
        """Rows read and not written yet (the write in progress included)."""
        return self._pending_rows + self._writing

    # ---- ingest ------------------------------------------------------------------

    def ingest(self, data: bytes, *, held: bool = False) -> int:
        """One datagram → a chunk in ``pending``; returns the rows taken. Never raises.

        ``held``: the datagram is still in the channel (consumed once written).
        """
        st = self.stats
        st.datagrams += 1
        try:
            batch = decode_batch(data)
        except WireError as exc:
            st.bad_datagrams += 1
            if st.bad_datagrams == 1 or st.bad_datagrams % 1000 == 0:  # a stray writer: no flood
                self.log.error("recorder_bad_datagram", error=str(exc), bytes=len(data),
                               bad_datagrams=st.bad_datagrams)
            if held:  # nothing to write, but consumed in channel order like the rest
                self.pending.append(Chunk(None, "", 0, 0, 0, [], held=1))
            return 0
        source = batch.source
        count = len(batch.rows)
        end = (batch.first + count, batch.dropped_total)
        if not count:
            st.heartbeats += 1
            if not held and self._ends.get(source) == end:
                return 0  # says nothing the chunk before it did not (DuckDB down: bounded)
        self._ends[source] = end
        rows: list[DbRow | None] = []
        taken = 0
        for wire_row in batch.rows:
            try:
                rows.append(db_row(batch.variant, batch.worker, wire_row, self.prices))
            except BadRow as exc:
                st.bad_rows += 1
                rows.append(None)  # keeps the numbering: row i is first + i
                if st.bad_rows == 1 or st.bad_rows % 1000 == 0:
                    self.log.error("recorder_bad_row", error=str(exc), bad_rows=st.bad_rows)
                continue
            taken += 1
        self.pending.append(Chunk(source, batch.variant, batch.first, count, batch.dropped_total,
                                  rows, held=int(held)))
        self._pending_rows += count
        st.rows_received += taken
        over = self._pending_rows - self.max_pending
        if over > 0:
            self._shed_rows(over)
        reader = self.reader
        if self._pending_rows >= self.write_batch or (
                reader is not None and reader.held_charge * WAKE_SHARE >= reader.capacity):
            self._wake_writer.set()
        return taken

    def _shed_rows(self, over: int) -> None:
        """Memory full (DuckDB down too long): drop the oldest rows, keep their numbers."""
        dropped = 0
        pending = self.pending
        while over > 0 and pending:
            chunk = pending[0]
            if chunk.rows:
                n = min(over, len(chunk.rows))
                dropped += chunk.trim(n)
                over -= n
                self._pending_rows -= n
            if not chunk.rows:
                self._to_shed(pending.popleft())
        self.stats.dropped_pending += dropped
        self.log.warning("recorder_pending_full", dropped=dropped, held=self._pending_rows,
                         error=self.last_error)

    def _to_shed(self, chunk: Chunk) -> None:
        src = chunk.source
        if src is not None and not chunk.held:
            last = self._shed_last.get(src)
            if (last is not None and not last.held and last.first + last.count == chunk.first
                    and last.dropped_total == chunk.dropped_total):
                # One run of shed rows per source, however long DuckDB stays down.
                last.count += chunk.count
                last.trimmed += chunk.trimmed
                last.shed += chunk.shed
                return
            self._shed_last[src] = chunk
        self._shed.append(chunk)

    def _hold(self) -> bool:
        """Leave the next datagram in the channel until it is written?"""
        reader = self.reader
        return (reader is not None and reader.holding and self.last_error is None
                and reader.held_charge * HOLD_SHARE < reader.capacity)

    def release_held(self) -> int:
        """Consume every held datagram now: their rows stay in memory, at risk."""
        reader = self.reader
        if reader is None or not reader.held:
            return 0
        for chunk in (*self._inflight, *self._shed, *self.pending):
            chunk.held = 0
        done = reader.release(reader.held)
        self.stats.released += done
        return done

    def _read_one(self) -> int | None:
        """Read and ingest one datagram: its rows, -1 for STOP, None when none is queued."""
        assert self.reader is not None
        hold = self._hold()
        if not hold:
            self.release_held()
        data = self.reader.read(hold=hold)
        if data is None:
            return None
        if data == STOP:
            if hold:  # consumed in channel order, after the rows before it are written
                self.pending.append(Chunk(None, "", 0, 0, 0, [], held=1))
            self.stop_seen.set()
            return -1
        return self.ingest(data, held=hold)

    async def read_channel(self) -> None:
        """Datagrams until the STOP marker (then every earlier datagram has been read)."""
        assert self.reader is not None
        while True:
            got = self._read_one()
            if got is None:
                await self.reader.wait()
            elif got < 0:
                self.stop_requested.set()
                return
            else:
                await trio.lowlevel.checkpoint()  # a full channel is many datagrams

    def drain_channel_nowait(self) -> int:
        """Read what is queued right now without waiting (exit without a STOP marker)."""
        if self.reader is None:
            return 0
        count = 0
        while True:
            got = self._read_one()
            if got is None or got < 0:
                return count
            count += got

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
                self._progress = self.store.progress
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
                                 pending=self.pending_rows)
                self.last_error = None
            self._backoff = BACKOFF_INITIAL
            return True, result

    def _open(self) -> HistoryStore:
        store = self.store_class.open(self.path, variant=self.variant, raw_days=self.raw_days,
                                  rollup_days=self.rollup_days, opened_at=self.wall(),
                                  run=self.run_id)
        self.stats.opens += 1
        self.log.info("history_opened", path=self.path, rows=self._count(store))
        self._lock_down(store)
        return store

    def _lock_down(self, store: HistoryStore) -> None:
        """Users' SQL may run only on an instance that reaches nothing but the file; a
        failure here turns that off and nothing else (the writer needs no lockdown).

        The one directory left open is ``<history_path>.exports``, beside the file (its
        disk, its owner-only state directory, one name per file: a recorder that was killed
        leaves no stray directory behind, the next one clears what it left in it).
        """
        if self.export_dir is None:
            directory = self.path + ".exports"
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                _clear_exports(directory)
            except OSError as exc:
                self.log.error("history_sql_unavailable", error=f"export directory: {exc}")
                self.sql_ready = False
                return
            self.export_dir = directory
        self.sql_ready = lock_down(store.con, [self.export_dir])
        if not self.sql_ready:
            self.log.error("history_sql_unavailable",
                           error="could not turn off DuckDB's external access")

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
                       retry_in_s=self._backoff, pending=self.pending_rows,
                       errors=self.stats.store_errors)
        self._retry_at = trio.current_time() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    # ---- writing -----------------------------------------------------------------

    async def flush(self, *, force: bool = False) -> bool:
        """Write every pending row; False if DuckDB is unavailable (the rows stay pending)."""
        async with self._flush_lock:  # the write loop and the snapshot loop both flush
            return await self._flush(force)

    def _take(self) -> list[Chunk]:
        """The oldest chunks, up to ``write_batch`` rows (never splits a datagram)."""
        chunks, self._shed, self._shed_last = self._shed, [], {}
        rows = 0
        pending = self.pending
        while pending and rows < self.write_batch:
            chunk = pending.popleft()
            chunks.append(chunk)
            rows += len(chunk.rows)
        self._pending_rows -= rows
        self._writing = rows
        self._inflight = chunks
        return chunks

    def _put_back(self, chunks: list[Chunk]) -> None:
        """A write failed: the chunks go back before everything read since (order matters:
        a source's rows are settled in their numbering order)."""
        later_shed, self._shed, self._shed_last = self._shed, [], {}
        self.pending.extendleft(reversed(later_shed))
        self.pending.extendleft(reversed(chunks))
        self._pending_rows += sum(len(c.rows) for c in chunks)

    async def _flush(self, force: bool) -> bool:
        while self.pending or self._shed:
            chunks = self._take()
            ok, written = False, None
            try:
                ok, written = await self._write(chunks, force)
            finally:
                # Not written (DuckDB failing, or cancelled before the write began: a write
                # that began runs to its end, trio.to_thread): back where they were.
                self._writing = 0
                self._inflight = []
                if not ok:
                    self._put_back(chunks)
            if not ok:
                self.release_held()  # DuckDB is failing: do not fill the channel meanwhile
                return False
            if written is None:  # refused even without rows (a bug): given up, counted
                self._given_up(chunks)
                continue
            self._settled(chunks, written)
        return True

    async def _write(self, chunks: list[Chunk], force: bool) -> tuple[bool, Written | None]:
        now = self.wall()
        try:
            return await self.with_store("write", _writer(chunks, now), force=force)
        except _DATA_ERRORS as exc:
            # DuckDB refused the rows as data: account for them (the sequence numbers move
            # on, or the next batch would count them lost) and write none.
            self.log.error("history_batch_discarded", rows=sum(len(c.rows) for c in chunks),
                           error=f"{type(exc).__name__}: {exc}"[:300])
            try:
                return await self.with_store("write", _writer(chunks, now, keep_rows=False),
                                             force=force)
            except _DATA_ERRORS as again:
                self.log.error("history_batch_discarded", rows=0, numbers=True,
                               error=f"{type(again).__name__}: {again}"[:300])
                return True, None

    def _given_up(self, chunks: list[Chunk]) -> None:
        """Chunks no transaction takes: counted as discarded, consumed from the channel (the
        next batch of their sources will count them as lost too: a bug is loud)."""
        self.stats.discarded += sum(1 for c in chunks for r in c.rows if r is not None)
        held = sum(c.held for c in chunks)
        if held and self.reader is not None:
            self.stats.released += self.reader.release(held)

    def _settled(self, chunks: list[Chunk], written: Written) -> None:
        """A write committed: consume its datagrams, count what it found."""
        s = written.settlement
        self._progress = written.progress
        held = sum(c.held for c in chunks)
        if held and self.reader is not None:
            self.stats.released += self.reader.release(held)
        if written.kept:
            self.stats.rows_written += len(s.rows)
        else:
            self.stats.discarded += len(s.rows)
        self._tally(s)

    def _tally(self, s: Settlement) -> None:
        st = self.stats
        st.duplicates += s.duplicates
        st.dropped_pending -= s.shed_duplicates
        st.worker_dropped += sum(s.worker_dropped.values())
        for (worker, pid, _nonce), variant, rows in s.losses:
            st.lost += rows
            # Once per gap: a recorder died holding these rows (this one found the gap).
            self.log.warning("recorder_records_lost", records=rows, worker=worker,
                             worker_pid=pid, variant=variant, lost_total=st.lost)

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
            await self.record_quota()

    def publish(self) -> None:
        """Queue depth (rows not yet in the file) and rows lost here, to the metrics cells."""
        if self.cells is None:
            return
        self.cells.set_queue_depth(self.pending_rows)
        st = self.stats
        dropped = st.dropped_pending + st.discarded + st.lost_at_exit
        if dropped > self._published_dropped:
            self.cells.dropped(dropped - self._published_dropped)
            self._published_dropped = dropped
        if st.lost > self._published_lost:
            self.cells.lost(st.lost - self._published_lost)
            self._published_lost = st.lost

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

    async def record_quota(self, *, force: bool = False) -> int:
        """Z.AI's quota samples that are new since the last ones recorded, into ``zai_quota``;
        returns the rows written. Not written (DuckDB unavailable): tried again next time;
        refused by DuckDB as data (never expected): logged and not tried again."""
        feed = self.quota
        if feed is None:
            return 0
        batch = feed.new()
        if not batch.sequences:
            return 0
        rows, variant = batch.rows, self.variant
        try:
            ok, written = await self.with_store(
                "zai_quota", lambda s: s.write_zai_quota(variant, rows), force=force)
        except _DATA_ERRORS as exc:
            self.log.error("history_zai_quota_discarded", rows=len(rows),
                           error=f"{type(exc).__name__}: {exc}"[:300])
            ok, written = True, 0
        if not ok:
            return 0
        feed.recorded(batch)
        self.stats.zai_quota_rows += written or 0
        return written or 0

    async def maintain(self, *, force: bool = False) -> None:
        now = self.wall()
        ok, result = await self.with_store("maintain", lambda s: s.maintain(now), force=force)
        if ok and result is not None:
            _rolled, (raw, snaps, rollups, quota) = result
            if raw or snaps or rollups or quota:
                self.log.info("history_retention", deleted_requests=raw, deleted_snapshots=snaps,
                              deleted_rollups=rollups, deleted_zai_quota=quota,
                              raw_days=self.raw_days, rollup_days=self.rollup_days)

    async def query(self, fn: Callable[[HistoryStore], T]) -> tuple[bool, T | None]:
        """Run a read query (the endpoint); data errors propagate to the caller."""
        return await self.with_store("query", fn, passthrough=QUERY_ERRORS)

    async def sql(self, text: str, *, limit_s: float, max_rows: int,
                  ) -> tuple[bool, bytes | None]:
        """A user's query (``POST /history/sql``), stopped after ``limit_s`` seconds (DuckDB's
        interrupt, recorder/sql.py), at most ``max_rows`` rows: (True, the answer as JSON),
        (False, None) when the file is not open; :class:`~zaiproxy.observe.recorder.sql.SqlError` when refused, invalid,
        too slow, or when SQL is off (the lockdown failed).

        Only the cursor is made in the DuckDB thread (under the store's lock); the query runs
        in a thread of its own, so writes go on meanwhile. Cancelled (the recorder stopping,
        the client gone), it is interrupted and this returns once DuckDB has let go of it:
        the file is closed after, never under a running query.
        """
        ok, cursor = await self.with_store(
            "sql", lambda s: s.con.cursor() if self.sql_ready else None)
        if not ok:
            return False, None
        if cursor is None:
            raise SqlError("unavailable", "SQL is off in this recorder: it could not turn off "
                                          "DuckDB's file access (see its log)")
        job = Query(cursor, text, timeout=limit_s, max_rows=max_rows)
        answer: list[bytes | SqlError] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_cancel, job)
                try:
                    answer.append(await trio.to_thread.run_sync(_answer_of, job,
                                                                 limiter=self._sql_limiter))
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if not answer:  # cancelled before its thread began: the cursor is idle
                with contextlib.suppress(duckdb.Error):
                    cursor.close()
        if isinstance(answer[0], SqlError):
            raise answer[0]  # outside the nursery: not wrapped in an exception group
        return True, answer[0]

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
            if self.reader is not None:
                self.log.info("recorder_channel", holding=self.reader.holding,
                              replayed_bytes=self.reader.replayed_bytes,
                              capacity=self.reader.capacity, run=self.run_id)
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
            if not self.pending and not self._shed:
                await self.snapshot(force=True)
                await self.record_quota(force=True)  # a sample newer than the last snapshot
                await self.maintain(force=True)
        if self.pending or self._shed:
            self._abandon()
        self.publish()  # depth 0, the lost rows counted
        if self.reader is not None:
            self.reader.close()
        async with self._lock:
            if self.store is not None:
                store, self.store = self.store, None
                try:
                    await trio.to_thread.run_sync(store.close, limiter=self._limiter)
                except _STORE_ERRORS as exc:
                    self.log.error("history_close_failed", error=str(exc))
        if self.export_dir is not None:
            with contextlib.suppress(OSError):
                _clear_exports(self.export_dir)
                os.rmdir(self.export_dir)  # only when nothing else is in it
            self.export_dir = None
        st = self.stats
        self.log.info("recorder_stopped", rows_written=st.rows_written,
                      rows_received=st.rows_received, duplicates=st.duplicates,
                      worker_dropped=st.worker_dropped, dropped_pending=st.dropped_pending,
                      lost=st.lost, lost_at_exit=st.lost_at_exit, discarded=st.discarded,
                      store_errors=st.store_errors)

    def _abandon(self) -> None:
        """The final flush gave up: count what is left as lost at exit, and consume it (a
        recorder started after this one must not write rows counted as lost)."""
        chunks = [*self._shed, *self.pending]
        if self._progress is not None:
            s = settle(chunks, self._progress)  # losses found only now are counted too
            self._tally(s)
            rows = len(s.rows)
        else:  # never opened here: whether some were in the file already is unknowable
            rows = sum(1 for c in chunks for r in c.rows if r is not None)
        self.stats.lost_at_exit += rows
        self.log.error("history_rows_lost_at_exit", rows=rows, error=self.last_error)
        self.pending.clear()
        self._shed, self._shed_last, self._pending_rows = [], {}, 0
        if self.reader is not None and self.reader.held:
            self.stats.released += self.reader.release(self.reader.held)

    def status(self) -> dict[str, Any]:
        st = self.stats
        reader = self.reader
        return {
            "path": self.path, "available": self.store is not None, "error": self.last_error,
            "pending": self.pending_rows, "datagrams": st.datagrams,
            "heartbeats": st.heartbeats,
            "rows_received": st.rows_received, "rows_written": st.rows_written,
            "duplicates": st.duplicates,
            "worker_dropped": st.worker_dropped, "dropped_pending": st.dropped_pending,
            # Sent, never written: a recorder died holding them (counted from the sequence
            # numbers); and left unwritten when this one exited.
            "lost": st.lost, "lost_at_exit": st.lost_at_exit,
            "bad_datagrams": st.bad_datagrams, "bad_rows": st.bad_rows,
            "discarded": st.discarded, "store_errors": st.store_errors,
            "zai_quota_rows": st.zai_quota_rows,
            "channel": None if reader is None else {
                "holding": reader.holding, "held": reader.held, "held_bytes": reader.held_bytes,
                "capacity": reader.capacity, "replayed_bytes": reader.replayed_bytes},
            "sources": len(self._progress or {}), "run": self.run_id,
            # The file's running totals (every recorder since it began); None: not open.
            "unrecorded": None if self.store is None else {
                v: {"dropped": t.dropped, "lost": t.lost}
                for v, t in sorted(self.store.totals.items())},
            "raw_days": self.raw_days, "rollup_days": self.rollup_days,
        }
