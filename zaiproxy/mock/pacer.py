"""The timer of a mock worker's delayed writes: one task sends every paced event.

A paced stream (``x-mock-chunk-delay``) writes one event per delay. Done by
the connection's own task, each event cost a ``trio.sleep`` (a cancel scope
whose wake-up is a ``Cancelled`` exception raised through the coroutine and
caught again), a trip through the scheduler to resume the task, a
``send_all`` with its own trip, and usually a wake-up of the whole worker
from idle, since the sleeps of many streams end at scattered times. On the
2-core VM of the bench suite a wake-up from idle alone costs ~100-200 us of
CPU (``epoll_wait`` plus trio's run loop on cold caches), the ``send`` system
call ~10-15 us: 256 streams of 50 events 20 ms apart cost ~70 us of mock CPU
per event.

Here the connection task hands its delayed writes to :class:`Pacer` and
parks. One ticker task keeps every parked stream in a heap ordered by when
its next write is due, sleeps until the earliest one, and on waking sends
each due write itself with one non-blocking ``socket.send``: the same bytes
in the same writes, without resuming the connection task in between (~2 us
of Python per event besides the system call). The task gets control back
(:meth:`Pacer.write` returns) when its next write is not a delayed one (a
write split's follow-up pieces, the end of the response) or when a send did
not complete at once: the peer is slow (the task finishes that write with
``send_all``, which waits) or the connection broke (the task raises what
``send_all`` would have raised).

Timing: a write is never sent before it is due. Each delay counts from when
the previous write was due, not from when it was sent, so the wake-up
latency does not add up over a stream (with ``trio.sleep`` after each write,
50 events 20 ms apart took ~1.2 s under load instead of ~1.0 s); a stream that
fell more than a whole delay behind (a slow reader) counts its next delay
from now instead of sending its remaining events back to back. The ticker
sleeps until the next multiple of :data:`QUANTUM` at or after the earliest
due write, so that writes due within the same millisecond leave in one
wake-up of the worker: a write leaves at most ~1 ms after it is due, plus the
millisecond trio's own timer may add (an ``epoll`` timeout is whole
milliseconds, rounded up), plus the time to send the writes before it.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import math
from collections.abc import Sequence

import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, reschedule

from zaiproxy.http.netstream import FastSocketStream
from zaiproxy.mock.wire import Write

QUANTUM = 0.001  # seconds: the ticker wakes on this grid (never before a write is due)


def _wake_time(due: float) -> float:
    """The ticker's wake-up for a write due at ``due``: the next QUANTUM boundary, never
    before ``due`` (the product may round below it)."""
    return max(due, math.ceil(due / QUANTUM) * QUANTUM)


def next_due(due: float, delay: float, now: float) -> float:
    """When the write ``delay`` after one due at ``due`` is due, at ``now``."""
    due += delay
    return due if due >= now else now + delay


class _Job:
    """One stream's delayed writes in progress."""

    __slots__ = ("due", "error", "index", "pending", "sent", "sock", "task", "writes")

    def __init__(self, stream: FastSocketStream, writes: Sequence[Write], index: int) -> None:
        self.sock = stream.socket
        self.writes = writes
        self.index = index  # the next write to send; delay > 0
        self.due = 0.0  # when writes[index] is due
        self.pending = False  # handed back before writes[index] was completely sent
        self.sent = 0  # how much of it was
        self.error: OSError | None = None
        self.task: Task | None = current_task()  # None once cancelled or handed back


class Pacer:
    """The delayed writes of every plain-TCP connection of one ``serve_mock``.

    :meth:`run` is the ticker task. Before it has started (or after it
    ended), :meth:`write` does the work in the calling task, with
    ``trio.sleep_until`` and ``send_all``.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._scope: trio.CancelScope | None = None  # the ticker's current sleep
        self._running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the due writes and wake their tasks, until cancelled."""
        heap = self._heap
        self._running = True
        task_status.started()
        try:
            while True:
                now = trio.current_time()
                while heap and heap[0][0] <= now:
                    job = heapq.heappop(heap)[2]
                    if job.task is not None and self._send(job, now):
                        heapq.heappush(heap, (job.due, next(self._seq), job))
                wake = _wake_time(heap[0][0]) if heap else math.inf
                with trio.CancelScope(deadline=wake) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
                self._scope = None
        finally:
            self._running = False
            self._scope = None
            # Nothing will send for the tasks still parked: they carry on by themselves.
            while heap:
                job = heapq.heappop(heap)[2]
                job.pending = True
                self._hand_back(job)

    def _send(self, job: _Job, now: float) -> bool:
        """Send ``job``'s due write; True when its next write is delayed too (still ours)."""
        writes = job.writes
        data = writes[job.index].data
        if data:
            try:
                sent = job.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                job.error = exc
                self._hand_back(job)
                return False
            if sent != len(data):
                job.pending = True
                job.sent = sent
                self._hand_back(job)
                return False
        job.index += 1
        if job.index == len(writes) or writes[job.index].delay <= 0:
            self._hand_back(job)
            return False
        job.due = next_due(job.due, writes[job.index].delay, now)
        return True

    @staticmethod
    def _hand_back(job: _Job) -> None:
        task, job.task = job.task, None
        if task is not None:
            reschedule(task)

    async def write(
        self, stream: FastSocketStream, writes: Sequence[Write], index: int, due: float
    ) -> tuple[int, float]:
        """Send ``writes[index:]`` while they are delayed writes, each when due.

        ``writes[index].delay > 0``; ``due`` is when the write before it was
        due. Returns the index of the first write not sent yet and when the
        write before it was due. A send that did not complete at once is
        finished here with ``stream.send_all``; a broken connection raises as
        ``send_all`` does.
        """
        now = trio.current_time()
        due = next_due(due, writes[index].delay, now)
        if not self._running:
            await trio.sleep_until(due)
            data = writes[index].data
            if data:
                await stream.send_all(data)
            return index + 1, due
        job = _Job(stream, writes, index)
        job.due = due
        heapq.heappush(self._heap, (due, next(self._seq), job))
        scope = self._scope
        if scope is not None:
            wake = _wake_time(due)
            if wake < scope.deadline:
                scope.deadline = wake

        def abort(_: RaiseCancelT) -> Abort:
            job.task = None  # the heap entry stays, inert, until it is due
            return Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if job.error is not None:
            exc = job.error
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("this socket was already closed") from exc
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        index = job.index
        if job.pending:
            # Handed back with writes[index] due but not (all) sent: the peer is slow, or
            # (not due yet) the ticker stopped.
            await trio.sleep_until(job.due)
            data = writes[index].data
            if data:
                await stream.send_all(memoryview(data)[job.sent :] if job.sent else data)
            index += 1
        return index, job.due
