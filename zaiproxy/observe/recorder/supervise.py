"""The supervisor's side of the recorder: the channel, the process, restarts, the stop.

The supervisor makes the channel (an AF_UNIX SOCK_DGRAM socketpair) once and
keeps both ends for its whole life, like the listening sockets: a recorder that
dies and is replaced finds the datagrams sent meanwhile still queued (up to the
buffer), and workers never see the channel close. Every worker gets the sending
end; the recorder gets the receiving end.

The recorder is restarted like a worker (``core/backoff.py``: 0.25 s doubling to 30 s,
reset after a minute of health), but it is never fatal: not at start, not later. Without it
the proxy serves and the workers count what they drop.

Stop (after the workers have exited, so nothing more will be sent): the STOP
marker goes into the channel behind everything the workers sent; the recorder
exits when it has written all of it. Bounded by :data:`STOP_TIMEOUT`, then killed.

The channel has an id, ``run`` (random, one per `serve`): the recorder keeps each
worker incarnation's sequence-number progress in the file under it, and drops the
progress of other runs, whose workers and channel are gone
(docs/decisions/recorder-loss.md).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import time
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any

from zaiproxy.core import logs
from zaiproxy.core.backoff import Backoff
from zaiproxy.core.config import Config
from zaiproxy.observe.recorder.process import recorder_main
from zaiproxy.observe.recorder.wire import STOP

# The channel's capacity. Linux caps SO_SNDBUF at net.core.wmem_max (and doubles
# it for bookkeeping): 212992 by default, i.e. ~0.4 MB or ~2,300 records; hosts tuned
# for throughput (wmem_max = 4 MiB here) hold ~45,000. SO_SNDBUFFORCE can exceed the
# cap when the proxy runs with CAP_NET_ADMIN. ~175 bytes per record on the wire.
CHANNEL_BYTES = 4 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
STOP_TIMEOUT = 15.0


def make_channel(capacity: int = CHANNEL_BYTES) -> tuple[socket.socket, socket.socket]:
    """(receiving end, sending end); the sending end's buffer raised towards ``capacity``."""
    recv_end, send_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        send_end.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, capacity)
    except OSError:
        send_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, capacity)
    return recv_end, send_end


class RecorderHandle:
    def __init__(self, mp: SpawnContext, config: Config, ledger_path: str | None = None) -> None:
        self.mp = mp
        self.config = config
        self.ledger_path = ledger_path  # the shared-memory segment (metric cells)
        self.recv_end, self.channel = make_channel()
        self.capacity = self.channel.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.run = os.urandom(8).hex()  # this channel's id (the sequence numbers' scope)
        self.process: BaseProcess | None = None
        self.ready_pipe: Connection | None = None
        self.backoff = Backoff()
        self.restart_at: float | None = None
        self.url: str | None = None
        self.stopping = False
        self.log = logs.get_logger()

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"<RecorderHandle pid={pid} url={self.url} restart_at={self.restart_at}>"

    def spawn(self) -> None:
        parent_end, child_end = self.mp.Pipe(duplex=False)
        process = self.mp.Process(
            target=recorder_main,
            args=(self.recv_end, self.config, child_end, os.getpid(), self.ledger_path,
                  self.run, self.capacity),
            name="zaiproxy-recorder",
        )
        process.start()
        child_end.close()
        self.process = process
        self.ready_pipe = parent_end
        self.backoff.started(time.monotonic())
        self.restart_at = None
        self.log.info("recorder_started", recorder_pid=process.pid,
                      path=self.config.history_path, channel_bytes=self.capacity)

    def waitables(self) -> list[Any]:
        out: list[Any] = []
        if self.process is not None:
            out.append(self.process.sentinel)
        if self.ready_pipe is not None:
            out.append(self.ready_pipe)
        return out

    def poll(self, now: float) -> None:
        """Readiness, death (schedule a restart), a restart that is due."""
        pipe = self.ready_pipe
        if pipe is not None:
            try:
                if pipe.poll():
                    _, pid, self.url = pipe.recv()
                    self.log.info("recorder_ready", recorder_pid=pid, url=self.url)
                    pipe.close()
                    self.ready_pipe = None
            except (EOFError, OSError):
                pipe.close()
                self.ready_pipe = None
        if self.process is not None and not self.process.is_alive():
            self._on_exit()
        if self.restart_at is not None and now >= self.restart_at and not self.stopping:
            self.spawn()

    def _on_exit(self) -> None:
        assert self.process is not None
        code = self.process.exitcode
        now = time.monotonic()
        self.process.close()
        self.process = None
        self.url = None
        if self.ready_pipe is not None:
            self.ready_pipe.close()
            self.ready_pipe = None
        if self.stopping:
            return
        restart = self.backoff.exited(now)
        self.restart_at = restart.at
        self.log.error("recorder_died", exit_code=code,
                       signal=-code if code is not None and code < 0 else None,
                       restart_in_s=restart.delay, lived_s=round(restart.lived, 3))

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Workers are gone: let the recorder write everything and exit. True if it did."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        if self.process is None:
            # Dead or waiting for its restart: start one to write what the channel holds.
            self.spawn()
        assert self.process is not None
        if not self._send_stop(deadline):
            self.log.error("recorder_stop_not_sent", reason="channel full")
            if self.process.pid is not None:
                try:
                    os.kill(self.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.log.error("recorder_stop_timeout", timeout_s=timeout)
            self.kill()
            return False
        code = self.process.exitcode
        self.log.info("recorder_stopped", exit_code=code)
        return code == 0

    def _send_stop(self, deadline: float) -> bool:
        while True:
            try:
                # MSG_DONTWAIT: never change the shared socket's blocking mode (see sink.py).
                self.channel.send(STOP, socket.MSG_DONTWAIT)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                    return False
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process is None or not self.process.is_alive():
                return False
            select.select([], [self.channel], [], min(remaining, 0.1))

    def kill(self) -> None:
        self.stopping = True
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(2)

    def close(self) -> None:
        self.kill()
        self.recv_end.close()
        self.channel.close()
