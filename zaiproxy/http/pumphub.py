"""One wait for every stream the worker is pumping: the native stream pump's hub, in trio.

A pumped stream (zaiproxy/request/relay.py, ``Relay._pump``) whose upstream has nothing to
read does not wait on its own socket: it hands its :class:`~zaiproxy._native._pump.Pump` to
the worker's :class:`PumpHub` and sleeps until the hub gives it back. The hub is one task:
it waits in trio for its own epoll set (``_pump.Hub``, its descriptor registered once in
trio's), and each time that set is readable one native call (``Hub.run``) reads, decodes,
scans, frames and writes every stream that is ready. Per relayed event no Python runs and
no task wakes; a task wakes only when its stream needs it (the client's socket is full,
the body ended, upstream failed or was idle too long).

What a stream keeps:
- one client write per upstream read, and backpressure: a pump whose client socket is full
  leaves the hub (``WRITE``) and its task waits for the client before handing it back;
- the idle timeout: :meth:`PumpHub.wait` sleeps at most until ``idle`` seconds after the
  later of the stream's last read and the moment it was handed over (time spent waiting
  for a slow client does not count), and answers :data:`IDLE` then;
- cancellation (the client gone, the drain deadline): the waiting task is cancelled as
  any other; the pump leaves the hub in a ``finally``, before its socket can close.

The hub task runs for the worker's life (``Worker.run``); at most ``MAX_EVENTS`` (256) ready
streams per native call, and the task waits in trio between calls, so other tasks run.
"""

from __future__ import annotations

import time

import trio

from zaiproxy._native import _pump

IDLE = -1  # PumpHub.wait: nothing came for ``idle`` seconds


class PumpHub:
    """The worker's hub (see the module docstring)."""

    def __init__(self) -> None:
        self._hub = _pump.Hub()
        self.running = False

    def __len__(self) -> int:
        return len(self._hub)

    async def run(self) -> None:
        """Relay whatever is ready, for the worker's life; wakes the streams given back."""
        hub = self._hub
        fd = hub.fileno()
        self.running = True
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                for pump in hub.run():
                    pump.waker.set()
        finally:
            self.running = False
            hub.close()

    async def wait(self, pump: _pump.Pump, idle: float) -> int:
        """Hand ``pump`` (whose last step said ``READ``) to the hub until it is given back;
        returns its step result (``WRITE``, ``END``, ``EOF``) or :data:`IDLE`, and raises
        what its step raised."""
        done = trio.Event()
        pump.waker = done
        hub = self._hub
        hub.add(pump)
        since = time.monotonic()  # a slow client's time before this is not upstream idling
        try:
            while True:
                quiet = time.monotonic() - max(pump.last_read, since)
                if quiet >= idle:
                    return IDLE
                with trio.move_on_after(idle - quiet):
                    await done.wait()
                if done.is_set():
                    break
        finally:
            hub.discard(pump)
            pump.waker = None
        error = pump.error
        if error is not None:
            pump.error = None
            raise error
        return pump.result
