"""A trio loop in a thread of the supervisor, for work that waits on the network.

The supervisor's own loop is synchronous (process sentinels, signals, the rate tick) and must
never wait on Redis or Z.AI, so the fleet's adaptive rate (``fleet_rate.py``) and Z.AI's quota
poller (``zai_quota.py``) each run their own trio loop in a daemon thread: started once, and
stopped from the supervisor's thread by setting an event inside that loop.
"""

from __future__ import annotations

import contextlib
import threading

import trio


class LoopThread:
    """Subclasses implement :meth:`run_loop` (set ``started`` once ready, return when
    :attr:`stopping`) and wait with :meth:`pause`."""

    thread_name = "loop"

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        started = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main, started),
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        started.wait(5)

    def stop(self) -> None:
        if self._thread is None or self._token is None or self._stop is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(5)

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the thread is stopped meanwhile."""
        assert self._stop is not None
        with trio.move_on_after(seconds):
            await self._stop.wait()

    async def _main(self, started: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        await self.run_loop(started)

    async def run_loop(self, started: threading.Event) -> None:
        raise NotImplementedError
