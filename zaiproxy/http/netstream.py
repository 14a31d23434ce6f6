"""A TCP stream for the hot path: trio's ``SocketStream`` minus a scheduler round trip per call.

``trio.SocketStream.send_all`` and ``receive_some`` try the syscall first and,
when it succeeds, still yield to the scheduler (``cancel_shielded_checkpoint``)
before returning: every call on every connection is one trip through trio's
run loop. Measured here on a ping-pong over a socket pair that is ~4 us per
call (56 -> 36 us per round trip of two sends and two receives); a proxied
request makes four to six such calls, a relayed stream two per event.

:class:`FastSocketStream` keeps the semantics callers rely on and only drops
that yield when the syscall did all the work:

- a receive always tries ``recv`` first, as trio does. Waiting for
  readability first when the last read drained the socket was tried: it saves
  the ``EAGAIN`` at low load but costs an ``epoll_ctl`` and a scheduler round
  at high load, when the answer is often already there (strace: epoll_ctl
  went from 1 to 2 per proxied request at c16);
- a call that has to wait (``EAGAIN``) waits in ``trio.lowlevel.wait_readable``
  / ``wait_writable``: a real schedule point, as before;
- a call that completes at once still checks for cancellation
  (``checkpoint_if_cancelled``: a cancelled scope raises ``Cancelled`` there),
  and every :data:`FAIR_EVERY` th such call yields anyway, so a connection
  whose peer always has data ready cannot monopolise the worker's loop;
- errors translate as trio's do: ``EBADF`` -> ``ClosedResourceError``, any
  other ``OSError`` -> ``BrokenResourceError`` (``__cause__`` is the OSError);
  closing the stream wakes a task blocked on it with ``ClosedResourceError``
  (``trio.lowlevel.notify_closing``); two tasks sending (or receiving) at once
  get ``BusyResourceError``.

``tests/test_netstream.py`` runs trio's own conformance suite for half-closeable
streams (``trio.testing.check_half_closeable_stream``) against it, with
``fair_every=1``: that suite asserts that every call yields, which is exactly
what the default trades away; everything else it checks holds. It wraps a
plain stdlib socket (TCP only; the pool's TLS goes on top with
:class:`zaiproxy.http.tlsstream.TLSStream`).
"""

from __future__ import annotations

import errno
import os
import socket

import trio

# The chunked framing of relayed bodies, both ways: upstream/pool.py decodes an upstream's
# chunked body with ``framing.Dechunker`` (h11 reads only heads and the last chunk),
# http/connection.py frames the client's chunks with ``framing.frame_chunk``. Chosen here,
# once, by the stream scanner's switch (zaiproxy/request/scanner.py): native unless
# ZAIPROXY_RELAY=python, never a silent fallback (a broken build fails at import, i.e. at
# worker start-up). Both implementations are tested against h11 in
# tests/test_framing_native.py.
#
# The same switch loads the stream pump (``zaiproxy._native._pump``), the relay's inner loop
# in C for a chunked body (plain or TLS upstream): PUMP says whether the relay uses it.
# With ZAIPROXY_RELAY=python the relay's own loop, the pump's twin, does that work
# (zaiproxy/request/relay.py).
if os.environ.get("ZAIPROXY_RELAY", "").lower() == "python":
    from zaiproxy._native import _framing_py as framing
    PUMP = False
else:
    from zaiproxy._native import _framing as framing  # type: ignore[no-redef]
    from zaiproxy._native import _pump  # noqa: F401  (loaded at start-up: a broken build fails there)
    PUMP = True

DEFAULT_RECEIVE_SIZE = 65536
FAIR_EVERY = 16  # immediate completions in a row before one real yield


class FastSocketStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a trio stream (see the module docstring)."""

    def __init__(self, sock: socket.socket, *, fair_every: int = FAIR_EVERY) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # As trio.SocketStream does: small writes (an SSE event) go out now.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self._closed = False
        self._shut_wr = False
        self._sending = False
        self._receiving = False
        self._streak = 0
        self._fair_every = fair_every

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> FastSocketStream:
        """Take over the socket of a trio ``SocketStream`` (which is left closed)."""
        tsock = stream.socket
        return cls(socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.detach()))

    async def done_at_once(self) -> None:
        """The schedule point of a call that did not wait: cheap, except every FAIR_EVERY th."""
        self._streak += 1
        if self._streak >= self._fair_every:
            self._streak = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            if self._shut_wr:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            sock = self.socket
            total = len(data)
            try:
                sent = sock.send(data) if total else 0
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _translate(exc) from exc
            if sent == total:
                await self.done_at_once()
                return
            self._streak = 0
            with memoryview(data) as view:
                while sent < total:
                    await trio.lowlevel.wait_writable(sock)
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        raise _translate(exc) from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            await trio.lowlevel.wait_writable(self.socket)
        except OSError as exc:
            raise _translate(exc) from exc
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            await trio.lowlevel.checkpoint()
            if self._shut_wr:
                return
            self._shut_wr = True
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError as exc:
                raise _translate(exc) from exc
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            self._check_open()
            sock = self.socket
            try:
                data = sock.recv(max_bytes)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _translate(exc) from exc
            else:
                await self.done_at_once()
                return data
            self._streak = 0
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recv(max_bytes)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _translate(exc) from exc
        finally:
            self._receiving = False

    def close_now(self) -> None:
        """Close without waiting (from another task): a task blocked on this stream gets
        ``ClosedResourceError``, as with :meth:`aclose`."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()


def _translate(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def lingering_close(stream: trio.abc.Stream, *, seconds: float, max_bytes: int) -> None:
    """Half-close, then read and drop what the peer still sends, bounded in time and bytes.

    An answer sent before the whole request was read (413, 400, ...): closing a socket with
    unread bytes makes the kernel send RST, and a peer still sending can then lose the
    answer before reading it. RFC 9112 9.6's staged close, nginx's ``lingering_close``. The
    caller closes the stream afterwards; a stream that cannot half-close is left as it is.
    """
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    drained = 0
    with trio.move_on_after(seconds):
        try:
            await stream.send_eof()
            while drained < max_bytes:
                data = await stream.receive_some(DEFAULT_RECEIVE_SIZE)
                if not data:
                    return
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


__all__ = ["DEFAULT_RECEIVE_SIZE", "FAIR_EVERY", "FastSocketStream", "framing", "lingering_close"]
