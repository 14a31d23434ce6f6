"""TLS to an upstream, over a :class:`~zaiproxy.http.netstream.FastSocketStream`.

The pool's TLS connections (api.z.ai is HTTPS). The protocol work is the stdlib's, as in
``trio.SSLStream`` (an ``ssl.SSLObject`` over two memory BIOs: the context's certificate and
hostname checks, SNI, ALPN-less HTTP/1.1); unlike trio's class, what the stream pump needs
is public: the plain socket under it, the ``SSLObject`` and the incoming and
outgoing BIOs, so a chunked body can be decrypted and relayed by the pump in C
(_native/_pump.pyx) while h11 and this class own everything else.

Semantics the pool relies on (those of ``trio.SSLStream(..., https_compatible=True)`` for one
task at a time, which is how the pool uses a connection):

- ``do_handshake`` completes the handshake (certificate verification included);
- ``send_all`` encrypts and writes everything; ``receive_some`` returns decrypted bytes,
  ``b""`` at the end (a close_notify, or an EOF without one: HTTP/1.1 frames its own
  messages, so a missing close_notify is not an attack on a framed body; h11 still refuses
  a body cut short);
- whatever the ``SSLObject`` wants to send while reading (a TLS 1.3 KeyUpdate's answer) goes
  out before the next read;
- a call that needed no network I/O has the transport's schedule point
  (``FastSocketStream.done_at_once``: cancellation checked, a real yield every 16th);
- TLS errors are ``trio.BrokenResourceError`` (``__cause__`` the ``ssl.SSLError``), a
  closed stream ``trio.ClosedResourceError``, as with trio's class.

``tests/test_tlsstream.py`` runs trio's conformance suite for two-way streams against it
(a client and a server instance over a socket pair) and the pool's TLS tests use it.
"""

from __future__ import annotations

import ssl

import trio

from zaiproxy.http.netstream import FastSocketStream

READ_SIZE = 65536


class TLSStream(trio.abc.Stream):
    """One TLS session over a FastSocketStream (see the module docstring)."""

    def __init__(self, transport: FastSocketStream, context: ssl.SSLContext, *,
                 server_hostname: str | None = None, server_side: bool = False) -> None:
        self.transport_stream = transport
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                           server_hostname=server_hostname)
        self._handshook = False
        self._closed = False
        self._sending = False
        self._receiving = False

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.transport_stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.transport_stream.receive_some(READ_SIZE)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def do_handshake(self) -> None:
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        try:
            while True:
                try:
                    self.ssl_object.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._flush()
                    await self._fill()
            await self._flush()
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
        self._handshook = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            if not self._handshook:
                await self.do_handshake()
            try:
                if data:
                    self.ssl_object.write(data)
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS write failed: {exc}") from exc
            if self.outgoing.pending:
                await self._flush()
            else:
                await self.transport_stream.done_at_once()
        finally:
            self._sending = False

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = READ_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            self._check_open()
            if not self._handshook:
                await self.do_handshake()
            while True:
                try:
                    data = self.ssl_object.read(max_bytes)
                except ssl.SSLWantReadError:
                    if self.outgoing.pending:
                        await self._flush()
                    await self._fill()
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                except ssl.SSLError as exc:
                    raise trio.BrokenResourceError(f"TLS read failed: {exc}") from exc
                if self.outgoing.pending:
                    await self._flush()
                else:
                    await self.transport_stream.done_at_once()
                return data
        finally:
            self._receiving = False

    def buffered(self) -> bool:
        """Bytes received and not yet returned (decrypted, or still to decrypt)."""
        return bool(self.ssl_object.pending() or self.incoming.pending)

    async def aclose(self) -> None:
        """Close without a close_notify exchange (the peer may be gone; HTTP frames itself)."""
        self._closed = True
        await self.transport_stream.aclose()
