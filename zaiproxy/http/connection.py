"""The client side's I/O shell: one ``ClientConnection`` per accepted connection.

h11 does the parsing; this module owns the stream and the timers (hypercorn's split) and
knows nothing of routes, keys or upstreams: it hands each parsed request to a
:class:`RequestHandler` and writes what the handler queues. Per connection:

- slow-header guard: a request head must arrive within ``header_timeout`` of its first
  byte (and of the connection opening); keep-alive: an idle connection is closed after
  ``keepalive_timeout``;
- limits: head > ``max_header_bytes`` -> 431, body > ``max_body_bytes`` -> 413 (refused
  from Content-Length before reading it), malformed HTTP -> 400, ambiguous framing -> 400
  (:mod:`zaiproxy.http.framing`); each then closes the connection (the rest of the bytes
  cannot be trusted), with a lingering close when request bytes are still unread;
- one reader task per connection owns every read from the client socket and queues what it
  reads (bounded). Because it is always waiting on the socket, a client that goes away
  while its request is proxied is seen at once and cancels the scope the handler asked it
  to watch (:meth:`ClientConnection.watch_disconnect`), not at the next write; and it costs
  no extra task, nursery or syscall per request (a per-request watcher task cost 15-30 % of
  throughput when measured).
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio

from zaiproxy.core.config import Config
from zaiproxy.core.errors import (
    Api,
    BadRequest,
    HeadersTooLarge,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    VersionNotSupported,
    api_for_path,
)
from zaiproxy.core.logs import get_logger
from zaiproxy.http.framing import check_head, safe_protocol_message
from zaiproxy.http.http11 import as_bytes, h11
from zaiproxy.http.netstream import FastSocketStream, framing, lingering_close
from zaiproxy.http.sink import ClientGone, Headers, WorkerState

# How much the reader may queue ahead of the handler (pipelined requests, a body being
# read) before it stops reading: bounded, like everything else.
_MAX_READAHEAD = 65536
_READ_SIZE = 65536
# Lingering close after an early error response (nginx: lingering_time 30 s; a shorter
# bound here, since agents send bodies of a few MB at most).
_LINGER_SECONDS = 5.0
_LINGER_MAX_BYTES = 64 << 20
_REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 204: b"No Content", 304: b"Not Modified",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


class RequestHandler(Protocol):
    """The request path, as the shell sees it."""

    async def handle(self, conn: ClientConnection, request: h11.Request) -> None:
        """Answer one request (reading its body through :meth:`ClientConnection.read_body`)."""

    def refused(self, conn: ClientConnection, error: ProxyError, api: Api, method: str) -> None:
        """A head the shell answered itself (malformed, too large, ambiguous): record it."""


class ClientConnection:
    """Serves the requests of one client connection, one at a time (HTTP/1.1)."""

    def __init__(self, stream: trio.abc.Stream, handler: RequestHandler, config: Config,
                 state: WorkerState, client_ip: str, request_ids: Callable[[], bytes]) -> None:
        self.stream = stream
        self.handler = handler
        self.config = config
        self.state = state
        self.client_ip = client_ip
        self._request_ids = request_ids
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_bytes)
        self.request_id = b""
        self.gone = False  # the client went away (EOF or broken pipe)
        self.idle_scope: trio.CancelScope | None = None  # set while waiting for a request
        self.response_status: int | None = None
        self.close_after = False
        self._pending = b""  # framed response bytes not yet written
        self._method = b""  # the current request's (h11's body-framing rule)
        self._chunked = False  # the response under way is chunked: queue_data frames natively
        # Reader -> handler queue of raw reads (b"" = EOF), bounded by _MAX_READAHEAD.
        self._chunks: deque[bytes | bytearray] = deque()
        self._queued = 0
        self._eof_fed = False
        self._data_ready = trio.Event()
        self._space = trio.Event()
        self._watched: trio.CancelScope | None = None  # cancelled when the client leaves

    def __repr__(self) -> str:
        return (f"<ClientConnection {self.client_ip} {self.conn.our_state}/{self.conn.their_state}"
                f"{' gone' if self.gone else ''}>")

    # ---- writing to the client (ClientSink) --------------------------------------------

    def queue_response(self, status: int, headers: Headers, reason: bytes = b"") -> None:
        """Frame the response head; it is written with the next flush."""
        if self.state.draining or self.close_after:
            headers = [*headers, (b"connection", b"close")]
        self.response_status = status
        head = self.conn.send(h11.Response(
            status_code=status, headers=headers, reason=reason or _REASONS.get(status, b""))) or b""
        self._pending += head
        # h11 frames the body in chunks exactly when it wrote this header itself (it
        # title-cases the name and drops any Content-Length) and the body is not empty by
        # rule (HEAD, 204, 304: its writer then takes no data at all).
        self._chunked = (b"\r\nTransfer-Encoding: chunked\r\n" in head
                         and self._method != b"HEAD" and status not in (204, 304))

    def queue_data(self, data: bytes) -> None:
        """Frame ``data`` as one chunk of the body.

        A chunked body is framed natively (``framing.frame_chunk``: the bytes h11's
        ``ChunkedWriter`` writes, ~3 µs less per relayed read): h11's ``send(Data)`` changes
        no state in ``SEND_BODY`` (its state machine maps Data to the same state and the
        chunked writer keeps no count), so h11 is told only of the end (:meth:`queue_end`),
        which writes the last chunk and moves ``our_state`` to ``DONE``. A Content-Length
        body goes through h11, which counts its bytes.
        """
        if self._chunked:
            self._pending += framing.frame_chunk(data)
        else:
            self._pending += self.conn.send(h11.Data(data=data)) or b""

    def chunked_socket(self) -> socket.socket | None:
        """The client's socket while the response under way is chunked and nothing is queued:
        the stream pump frames the chunks (as :meth:`queue_data` does) and writes them to it
        directly, until :meth:`queue_end`. h11 stays consistent for the same reason as with
        :meth:`queue_data`: it is told of no ``Data`` in ``SEND_BODY`` either way."""
        stream = self.stream
        if not self._chunked or self._pending or self.gone or type(stream) is not FastSocketStream:
            return None
        return stream.socket

    def queue_end(self) -> None:
        self._chunked = False
        self._pending += self.conn.send(h11.EndOfMessage()) or b""

    async def flush(self) -> None:
        """Write everything queued in one send_all."""
        if self._pending:
            out, self._pending = self._pending, b""
            try:
                await self.stream.send_all(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.gone = True
                raise ClientGone() from exc

    async def send_data(self, data: bytes) -> None:
        self.queue_data(data)
        await self.flush()

    async def abort(self) -> None:
        """Close without finishing the response (the client sees a truncated body)."""
        self.gone = True
        await trio.aclose_forcefully(self.stream)

    async def send_simple(self, status: int, body: bytes, headers: Headers | tuple[
            tuple[bytes, bytes], ...] = (), content_type: bytes = b"application/json",
                          head: bool = False) -> None:
        hdrs = [(b"content-type", content_type), (b"content-length", b"%d" % len(body)),
                (b"x-zaiproxy-request-id", self.request_id), *headers]
        self.queue_response(status, hdrs)
        if body and not head:
            self.queue_data(body)
        self.queue_end()
        await self.flush()

    async def send_error(self, exc: ProxyError, api: Api, headers: Headers | None = None) -> None:
        """The error in the caller's API shape, with ``headers`` (default: the error's own)."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already under way; the caller aborts instead
        await self.send_simple(exc.status, exc.body(api),
                               exc.headers if headers is None else headers)

    # ---- the client leaving --------------------------------------------------------------

    def watch_disconnect(self) -> trio.CancelScope:
        """A scope the reader cancels when the client goes away (already, if it has)."""
        scope = self._watched = trio.CancelScope()
        if self.gone:
            scope.cancel()
        return scope

    def unwatch(self) -> None:
        self._watched = None

    # ---- reading from the client ---------------------------------------------------------

    async def _reader(self) -> None:
        """Owns all reads from the client: queue data, notice EOF/reset at once."""
        stream = self.stream
        try:
            while True:
                while self._queued >= _MAX_READAHEAD:
                    self._space = trio.Event()
                    await self._space.wait()
                try:
                    data = await stream.receive_some(_READ_SIZE)
                except trio.BrokenResourceError:
                    data = b""
                self._chunks.append(data)
                self._queued += len(data)
                self._data_ready.set()
                if not data:
                    self.gone = True
                    if self._watched is not None:
                        self._watched.cancel()
                    return
        except trio.ClosedResourceError:
            return  # we closed it (abort / end of connection)

    async def _receive(self) -> bytes:
        """Feed h11 the next chunk the reader queued (waits for one); returns what was fed."""
        while not self._chunks:
            if self._eof_fed:
                return b""  # h11 has seen EOF; it will not ask for more
            self._data_ready = trio.Event()
            await self._data_ready.wait()
        data = as_bytes(self._chunks.popleft())
        if not data:
            self._eof_fed = True
        self._queued -= len(data)
        if self._queued < _MAX_READAHEAD:
            self._space.set()
        self.conn.receive_data(data)
        return data

    async def _read_head(self, first: bool) -> tuple[h11.Request, bytes] | None:
        """The next request head and the raw bytes it was parsed from (they start with the
        head; more may follow), or None when the connection should just close."""
        cfg = self.config
        conn = self.conn
        # What h11 holds unparsed is where this request starts (pipelined bytes; usually
        # nothing). Every chunk fed from here on is appended: framing.py checks the raw
        # head h11 parsed, because its events no longer show bare LFs or folded lines.
        raw = conn.trailing_data[0]
        fed: list[bytes] | None = None
        event = conn.next_event()
        if event is h11.NEED_DATA:
            # Wait for the first byte: keep-alive idle time (or the header timeout on a
            # brand-new connection, which could be a slowloris).
            with trio.CancelScope() as scope:
                # A drain closes connections idle *between* requests. A new connection's
                # first request raced the listener closing and is answered (503 + close)
                # rather than dropped unanswered.
                if not first:
                    self.idle_scope = scope
                    if self.state.draining:
                        scope.cancel()
                scope.deadline = trio.current_time() + (
                    cfg.header_timeout if first else cfg.keepalive_timeout)
                data = await self._receive()
            self.idle_scope = None
            if scope.cancelled_caught:
                return None
            if raw:
                fed = [raw, data]
            else:
                raw = data  # the common case: the head arrived in one read, nothing copied
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if fed is None:
                    fed = [raw]
                with trio.move_on_after(cfg.header_timeout) as hscope:
                    while event is h11.NEED_DATA:
                        # Bounded: h11 refuses a head over max_header_bytes.
                        fed.append(await self._receive())
                        event = conn.next_event()
                if hscope.cancelled_caught:
                    await self.send_error(RequestTimeout("request headers were not received in time"),
                                          Api.OPENAI)
                    return None
        if type(event) is h11.Request:
            # h11 only bounds a head that is still incomplete; one that arrived in a single
            # read is checked here, so the limit does not depend on how the client's bytes
            # were segmented.
            if event.http_version not in (b"1.1", b"1.0"):
                raise h11.RemoteProtocolError("unsupported HTTP version", error_status_hint=505)
            size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if size > cfg.max_header_bytes:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            return event, (b"".join(fed) if fed is not None else raw)
        return None  # ConnectionClosed or PAUSED

    async def read_body(self, request: h11.Request) -> bytes:
        """The request's body, whole (bounded by ``max_body_bytes``); raises ProxyError."""
        cfg = self.config
        limit = cfg.max_body_bytes
        for name, value in request.headers:
            if name == b"content-length":
                if int(value) > limit:
                    raise PayloadTooLarge(
                        f"request body of {int(value)} bytes exceeds the limit of {limit} bytes")
                break
        conn = self.conn
        if conn.they_are_waiting_for_100_continue:
            interim = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            self._pending += conn.send(interim) or b""
            await self.flush()
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.close_after = True
                raise BadRequest(f"malformed request body: {safe_protocol_message(exc)}") from None
            if type(event) is h11.Data:
                size += len(event.data)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                return b"".join(parts) if len(parts) != 1 else parts[0]
            elif event is h11.NEED_DATA:
                with trio.move_on_after(cfg.header_timeout) as scope:
                    await self._receive()
                if scope.cancelled_caught:
                    raise RequestTimeout("the request body was not received in time")
            else:
                raise BadRequest("the client closed the connection before the request body ended")

    # ---- the request loop ----------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                try:
                    await self._serve_guarded()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if self.close_after and not self.gone and self.conn.their_state is not h11.DONE:
                # Request bytes are still unread: don't let our close reset the answer.
                await lingering_close(self.stream, seconds=_LINGER_SECONDS,
                                      max_bytes=_LINGER_MAX_BYTES)
            await trio.aclose_forcefully(self.stream)

    async def _serve_guarded(self) -> None:
        # Inside the nursery, so nothing reaches it: trio would wrap an exception in an
        # ExceptionGroup, and a client leaving would look like a crash.
        try:
            await self._serve()
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            self.gone = True  # a client leaving mid-answer is normal, not an error
        except Exception as exc:
            # A bug must cost one connection, never the worker and its other clients.
            get_logger().error("connection_crashed", request_id=self.request_id.decode(),
                               error=repr(exc))

    async def _serve(self) -> None:
        first = True
        conn = self.conn
        while True:
            try:
                head = await self._read_head(first)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                err: ProxyError
                if status == 431:
                    err = HeadersTooLarge("request headers are too large")
                elif status == 505:
                    err = VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are supported")
                else:
                    err = BadRequest(f"malformed HTTP request: {safe_protocol_message(exc)}")
                await self._refuse(err, Api.OPENAI, "-")
                return
            if head is None:
                return
            request, raw = head
            problem, chunked = check_head(raw, request.http_version)
            if problem is not None:
                # Ambiguous framing (framing.py): answered in the caller's API shape, then
                # the connection is closed, so no byte after this head is ever parsed.
                await self._refuse(BadRequest(problem), api_for_path(request.target),
                                   request.method.decode("ascii", "replace"))
                return
            if chunked:
                self.close_after = True  # nothing after a chunked body is read (framing.py)
            first = False
            self.request_id = self._request_ids()
            self.response_status = None
            self._method = request.method
            self._chunked = False
            await self.handler.handle(self, request)
            if (self.gone or self.state.draining or conn.our_state is not h11.DONE
                    or conn.their_state is not h11.DONE):
                return
            conn.start_next_cycle()

    async def _refuse(self, err: ProxyError, api: Api, method: str) -> None:
        """Answer a request whose head cannot be trusted, then close the connection."""
        self.request_id = self._request_ids()
        self.close_after = True
        await self.send_error(err, api)
        self.handler.refused(self, err, api, method)

