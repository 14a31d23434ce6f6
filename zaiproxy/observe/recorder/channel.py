"""The recorder's end of the channel: read a datagram, consume it only once it is written.

The channel is one AF_UNIX datagram socket whose receiving end the supervisor keeps
for its whole life (recorder/supervise.py): what the kernel still queues survives a
recorder that dies. So the recorder reads with ``MSG_PEEK`` and consumes the
datagrams (:meth:`ChannelReader.release`) only after the transaction that wrote
their rows committed; killed in between, the next recorder reads them again and
skips what the file already has (sequence numbers, recorder/sequence.py).

``SO_PEEK_OFF`` (Linux) is what makes that cheap: with a peek offset, each
``MSG_PEEK`` read returns the *next* datagram instead of the first one again, and
each consuming read moves the offset back by the datagram it removed. The offset
belongs to the socket, which a restarted recorder shares with the dead one, so a
new reader sets it to 0 (and logs what the previous one held: that much is read
again).

Two costs, both bounded here: a held datagram still takes room in the socket
buffer (the workers' senders see it full sooner), so the recorder stops holding
past a share of the capacity and consumes instead (service.py: the rows are then
at risk in its memory, and counted if it dies); and the socket stays readable
while it holds datagrams, even when every one of them has been read, so waiting
for *new* ones uses an edge-triggered epoll on it (a wakeup per arriving datagram)
instead of readability.

Without ``SO_PEEK_OFF`` (another kernel, or ``hold=False``) every read consumes,
as before: a recorder that dies loses what it read and had not written, and the
next one counts exactly that from the sequence numbers.
"""

from __future__ import annotations

import select
import socket
import sys
from typing import Final

import trio

SO_PEEK_OFF: Final = getattr(socket, "SO_PEEK_OFF", 42)  # Linux's value; Python has no name
MAX_DATAGRAM: Final = 1 << 20  # the first receive buffer; grown if a datagram is larger
# What the kernel charges per datagram on top of its bytes (sk_buff + shared info, rounded):
# the channel's capacity is in these units.
DATAGRAM_OVERHEAD: Final = 1024


class ChannelReader:
    """Non-blocking reads of the recorder's end; never changes the socket's blocking mode
    (the file description is shared with the supervisor)."""

    def __init__(self, sock: socket.socket, *, hold: bool = True,
                 capacity: int | None = None) -> None:
        self.sock = sock
        # The senders' buffer (SO_SNDBUF as the kernel reports it, i.e. doubled): a datagram
        # is never larger, and the held ones count against it.
        self.capacity = capacity or sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.held = 0  # datagrams read (peeked) and not consumed yet
        self.held_bytes = 0
        self.replayed_bytes = 0  # what a previous reader held when this one started
        self.holding = hold and self._peek_offset()
        self._buf = bytearray(MAX_DATAGRAM)  # a sink's batch is ~50 KB; grown if need be
        self._small = bytearray(1)
        self._epoll: select.epoll | None = None
        if sys.platform.startswith("linux"):
            self._epoll = select.epoll()
            self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLET)

    def __repr__(self) -> str:
        return (f"<ChannelReader holding={self.holding} held={self.held} "
                f"held_bytes={self.held_bytes}>")

    def _peek_offset(self) -> bool:
        if not sys.platform.startswith("linux"):
            return False
        try:
            before = self.sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError:
            return False
        self.replayed_bytes = max(0, before)  # -1: never set (no previous reader held any)
        return True

    @property
    def held_charge(self) -> int:
        """The socket buffer the held datagrams take (bytes + the kernel's overhead)."""
        return self.held_bytes + self.held * DATAGRAM_OVERHEAD

    def read(self, *, hold: bool) -> bytes | None:
        """The next datagram (None: nothing queued). ``hold``: leave it in the channel
        until :meth:`release` (only when :attr:`holding`; else it is consumed)."""
        if hold and self.holding:
            return self._peek()
        if self.held:
            raise RuntimeError("consuming behind held datagrams: release them first")
        flags = socket.MSG_DONTWAIT | socket.MSG_TRUNC
        try:
            size = self.sock.recv_into(self._buf, len(self._buf), flags)
        except BlockingIOError:
            return None
        if size > len(self._buf):
            # Consumed, and cut (never seen: a batch over 1 MB): its rows will count as lost,
            # the sequence numbers say how many. The next one fits.
            self._buf = bytearray(size)
            return b""
        return bytes(self._buf[:size])

    def _peek(self) -> bytes | None:
        flags = socket.MSG_PEEK | socket.MSG_DONTWAIT | socket.MSG_TRUNC
        while True:
            try:
                size = self.sock.recv_into(self._buf, len(self._buf), flags)
            except BlockingIOError:
                return None
            if size <= len(self._buf):
                break
            # Larger than the buffer: the peek offset moved by what was copied only. Put it
            # back on this datagram's start and read it whole.
            self._buf = bytearray(size)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, self.held_bytes)
        self.held += 1
        self.held_bytes += size
        return bytes(self._buf[:size])

    def release(self, count: int) -> int:
        """Consume the ``count`` oldest held datagrams (their rows are in the file, or
        in memory at the recorder's risk); returns how many were."""
        done = 0
        flags = socket.MSG_DONTWAIT | socket.MSG_TRUNC
        while done < count and self.held:
            try:
                size = self.sock.recv_into(self._small, 1, flags)
            except BlockingIOError:  # nothing queued: someone else read the channel
                self.held = self.held_bytes = 0
                break
            self.held -= 1
            self.held_bytes = max(0, self.held_bytes - size)
            done += 1
        return done

    async def wait(self) -> None:
        """Until a datagram arrives (one that was not there at the last :meth:`read`)."""
        if self._epoll is None:
            await trio.lowlevel.wait_readable(self.sock)
            return
        await trio.lowlevel.wait_readable(self._epoll.fileno())
        self._epoll.poll(0)  # take the edge: the next wait is for the next datagram

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
