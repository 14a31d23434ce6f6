"""The worker's end of the recorder channel: hand off records, never wait.

:meth:`RecordSink.submit` appends one flat row (:func:`~zaiproxy.observe.recorder.wire.row_of`)
to a list; :meth:`RecordSink.run` (a task in the worker's nursery) sends the list
as one datagram every ``interval``, and ``submit`` itself sends at once when
``max_batch`` rows are waiting. So the list never holds more than ``max_batch``
rows, and the hot path pays a tuple build and, once per batch, one orjson call and
one ``send`` (bench/micro/recorder_cost.py has the numbers).

The channel is one AF_UNIX SOCK_DGRAM socketpair made by the supervisor: every
worker has a copy of the same sending socket, so the kernel buffer of that socket
(SO_SNDBUF, charged until the recorder reads a datagram) is the channel's bound.
Sends use ``MSG_DONTWAIT``; a full buffer (EAGAIN / ENOBUFS) drops the batch and
counts its rows in ``dropped`` (drop + count, never block the hot path). Datagrams
rather than a stream: a batch arrives whole or not at all, so a dropped batch
never leaves half a record in the stream, and many writers need no framing or lock.

The socket's blocking mode is never changed: its file description is shared with
the supervisor and the other workers, so O_NONBLOCK set here would change it for
them; ``MSG_DONTWAIT`` makes each send non-blocking on its own.

Sequence numbers (docs/decisions/recorder-loss.md): each sink numbers the rows it
sends or drops 0, 1, 2, ... (``seq`` is the next number), and every datagram says
which rows it holds and how many earlier ones were dropped here. A random
``nonce`` tells this worker incarnation from an earlier one with the same index
and pid (pids are reused across restarts of the proxy). When the sink has been
quiet for ``heartbeat`` seconds it sends its counts alone (a batch without rows,
~60 bytes), and once more when the worker exits: without that, a batch lost in a
recorder that died after the worker's *last* batch would go unnoticed until the
worker's next request, maybe never.

The history is API traffic: a record without an API (``RequestRecord.api`` None: a
control route, ``/health``, ``/ready``, ``/metrics``, ``/admin/*``) is not handed over,
so a probe, a scrape or an ``/admin/events`` stream open for hours is no row, and never
enters the history's request counts, latency quantiles or in-flight estimate. It gets no
sequence number either (it is neither sent nor dropped). The metrics count control
routes in families of their own (``metrics.py``); the access log has every request.

For metrics: :meth:`RecordSink.stats` returns ``(queue_depth, dropped)`` for this
worker (rows waiting for the next send, rows dropped since the worker started).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable
from typing import NamedTuple

import trio

from zaiproxy.core import logs
from zaiproxy.core.record import RequestRecord
from zaiproxy.observe.recorder.wire import WireRow, encode_batch, row_of

MAX_BATCH = 256
INTERVAL = 0.1  # seconds between sends: how stale the history may be, not a throughput knob
HEARTBEAT = 1.0  # seconds without a datagram before the counts are sent alone
_FULL_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
_LOG_EVERY = 10.0  # at most one "dropping" warning per this many seconds


class SinkStats(NamedTuple):
    queue_depth: int  # rows held by this worker, waiting for the next send
    dropped: int  # rows dropped by this worker since it started (channel full or broken)


class RecordSink:
    def __init__(self, sock: socket.socket, *, worker: int, variant: str,
                 max_batch: int = MAX_BATCH, interval: float = INTERVAL,
                 heartbeat: float = HEARTBEAT,
                 clock: Callable[[], float] = time.time) -> None:
        self.sock = sock
        self.worker = worker
        self.variant = variant
        self.max_batch = max_batch
        self.interval = interval
        self.heartbeat = heartbeat
        self.clock = clock
        self.pid = os.getpid()
        # 48 random bits: this incarnation, whatever pid and index it shares with another.
        self.nonce = int.from_bytes(os.urandom(6), "big")
        self.seq = 0  # the number the next row sent gets (= sent + dropped)
        self.dropped = 0
        self.sent = 0  # rows handed to the kernel
        self.heartbeats = 0  # heartbeats handed to the kernel
        self._datagrams = 0  # send attempts (the heartbeat timer restarts on each)
        self._rows: list[WireRow] = []
        self._logged_at = -_LOG_EVERY
        self._unlogged = 0

    def __repr__(self) -> str:
        return (f"<RecordSink worker={self.worker} queued={len(self._rows)} "
                f"sent={self.sent} dropped={self.dropped}>")

    def stats(self) -> SinkStats:
        return SinkStats(len(self._rows), self.dropped)

    def submit(self, record: RequestRecord) -> None:
        """Queue one finished API request (a control route's is ignored); sends at once if
        a batch is full. Never blocks."""
        if record.api is None:
            return
        rows = self._rows
        rows.append(row_of(record, self.clock()))
        if len(rows) >= self.max_batch:
            self.flush()

    async def run(self) -> None:
        """Send whatever is queued every ``interval``, the counts alone after ``heartbeat``
        quiet seconds (a task in the worker's nursery)."""
        beat_every = max(1, round(self.heartbeat / self.interval))  # in ticks
        quiet = 0
        seen = self._datagrams
        while True:
            await trio.sleep(self.interval)
            if self._rows:
                self.flush()
            if self._datagrams != seen:
                seen, quiet = self._datagrams, 0
                continue
            quiet += 1
            if quiet >= beat_every and self.seq:
                self.send_heartbeat()
                seen, quiet = self._datagrams, 0

    def flush(self, wait: float = 0.0) -> None:
        """Send the queued rows as one datagram; ``wait`` > 0 only when the worker is exiting."""
        rows, self._rows = self._rows, []
        if rows:
            first, self.seq = self.seq, self.seq + len(rows)
            self._send(rows, first, time.monotonic() + wait if wait > 0 else None)

    def send_heartbeat(self, wait: float = 0.0) -> bool:
        """This sink's counts alone (a batch without rows); True if the kernel took it.

        Not counted as a drop when the channel is full: it carries no record, and the
        next datagram carries the same counts.
        """
        data = encode_batch(self.worker, self.pid, self.variant, self.dropped, [],
                            nonce=self.nonce, first=self.seq)
        if self._send_bytes(data, time.monotonic() + wait if wait > 0 else None) is None:
            self.heartbeats += 1
            return True
        return False

    def close(self, timeout: float = 2.0) -> None:
        """The worker is exiting: send the rest and the final counts, waiting up to
        ``timeout`` for room."""
        deadline = time.monotonic() + timeout
        self.flush(wait=timeout)
        if self.seq:
            self.send_heartbeat(wait=max(0.001, deadline - time.monotonic()))

    def _send(self, rows: list[WireRow], first: int, deadline: float | None) -> None:
        data = encode_batch(self.worker, self.pid, self.variant, self.dropped, rows,
                            nonce=self.nonce, first=first)
        exc = self._send_bytes(data, deadline)
        if exc is None:
            self.sent += len(rows)
        elif exc.errno == errno.EMSGSIZE and len(rows) > 1:
            # Long error messages and model names: split rather than lose the batch.
            half = len(rows) // 2
            self._send(rows[:half], first, deadline)
            self._send(rows[half:], first + half, deadline)
        else:
            self._drop(len(rows), exc)

    def _send_bytes(self, data: bytes, deadline: float | None) -> OSError | None:
        """One datagram to the kernel; the error if it was not taken (None: sent)."""
        self._datagrams += 1
        while True:
            try:
                self.sock.send(data, socket.MSG_DONTWAIT)
            except OSError as exc:
                if exc.errno in _FULL_ERRNOS and deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining > 0:
                        select.select([], [self.sock], [], min(remaining, 0.05))
                        continue
                return exc
            return None

    def _drop(self, count: int, exc: OSError) -> None:
        self.dropped += count
        self._unlogged += count
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            # Rate-limited: when the channel is full, a log line per batch would make it worse.
            logs.get_logger().warning(
                "recorder_records_dropped", records=self._unlogged, dropped_total=self.dropped,
                reason="channel full" if exc.errno in _FULL_ERRNOS else (exc.strerror or str(exc)))
            self._logged_at = now
            self._unlogged = 0
