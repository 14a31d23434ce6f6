"""A small HTTP/1.1 server for JSON APIs (h11 over trio): a handler turns requests into answers.

For the fleet's own small APIs, where every request is read whole and answered with one
document: the collector's admin API and the recorder's history endpoint. Proxied traffic
does not come here (``http/connection.py``: streaming bodies, limits, drain).

The handler is ``async (Request) -> Answer | Streamed``; this module does the HTTP:

- A request is read whole before the handler sees it: a head up to ``max_head`` bytes
  (431 beyond), a body up to ``max_body`` (413 when its Content-Length says more, or when
  a chunked body passes it), within ``idle_timeout`` of the connection becoming ready for
  it (so a keep-alive connection may idle that long, and a slow client gets no longer to
  send one). A client that sends nothing in time is closed without an answer.
- Keep-alive as HTTP/1.1 says: after an answer the connection serves the next request,
  unless the client asked to close (``Connection: close``, HTTP/1.0) or the answer was an
  error of the protocol itself. An answer the client does not read within
  ``send_timeout`` closes the connection.
- A ``HEAD`` request gets the GET answer's head (its Content-Length too), no body.
- Errors are JSON in the caller's shape (``error_body``, given the :class:`ProxyError`): a
  :class:`ProxyError` raised by the handler is answered like any answer and the connection
  stays open; a request that cannot be read (400, 413, 431, 505) is answered and the
  connection closes, since nothing after it can be trusted to start a request; any other
  exception of the handler is logged and answered 500, and the connection closes. Such a
  close is lingering (half-close, then read what the client still sends, bounded): closing
  with unread bytes would send a reset, which can discard the answer before it is read.
- :class:`Streamed` hands the connection to a body writer (``/admin/events``); the
  connection closes when it returns.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from zaiproxy.core.errors import (
    Api,
    BadRequest,
    HeadersTooLarge,
    PayloadTooLarge,
    ProxyError,
    VersionNotSupported,
)
from zaiproxy.core.logs import get_logger
from zaiproxy.http.http11 import as_bytes, h11
from zaiproxy.http.netstream import lingering_close

READ_SIZE = 65536
# After an error answer that closes: how long (and how much) the client may still send.
LINGER_S = 2.0
LINGER_BYTES = 1 << 20
Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # as sent: path and query
    headers: Headers  # names lower-cased (h11)
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        return next((v for n, v in self.headers if n == name), None)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: Headers = ()  # extra headers (e.g. Allow)

    @classmethod
    def json(cls, status: int, doc: Any, headers: Headers = ()) -> Answer:
        return cls(status, orjson.dumps(doc), headers=headers)


Write = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Streamed:
    """An answer whose body ``body(write)`` writes, as long as it likes (chunked).

    The head goes out with the first write, so a writer that bounds its writes in time
    bounds the head too. The connection closes when ``body`` returns or raises: the end of
    an event stream is its connection's, and a consumer that stopped reading must not hold
    the task for one more write. ``send_buffer``: the socket's SO_SNDBUF, small so that a
    consumer that lags shows up as a blocked write, not as megabytes queued in the kernel.
    """

    status: int
    headers: Headers
    body: Callable[[Write], Awaitable[object]]
    send_buffer: int | None = None


Handler = Callable[[Request], Awaitable[Answer | Streamed]]


def openai_error_body(error: ProxyError) -> bytes:
    """``{"error": {"message", "type", "code"}}``, the admin API's error shape."""
    return error.body(Api.OPENAI)


@dataclass(frozen=True, slots=True)
class Limits:
    max_head: int = 16 << 10
    max_body: int = 64 << 10
    idle_timeout: float = 30.0  # to receive the next request, from when the connection is free
    send_timeout: float = 30.0  # for the client to take one answer


class _Close(Exception):
    """Answer ``error`` and close the connection (its bytes cannot be trusted)."""

    def __init__(self, error: ProxyError, head_only: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.head_only = head_only


class Responder:
    """Serves ``handler`` on connections: ``nursery.start(responder.serve, listeners)``, or
    ``serve_connection(stream)`` for one stream."""

    def __init__(self, handler: Handler, *, limits: Limits | None = None,
                 error_body: Callable[[ProxyError], bytes] = openai_error_body,
                 name: str = "http") -> None:
        self.handler = handler
        self.limits = limits or Limits()
        self.error_body = error_body
        self.name = name  # in log lines

    async def serve(self, listeners: Sequence[trio.SocketListener], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve connections on ``listeners`` until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.serve_connection, listeners)
            task_status.started()

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve requests on ``stream`` until the client leaves or the connection must close."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        try:
            while True:
                request: Request | None = None
                with trio.move_on_after(self.limits.idle_timeout):
                    request = await self._read(conn, stream)
                if request is None:
                    return
                answer, close = await self._answer(request)
                if isinstance(answer, Streamed):
                    await self._stream(conn, stream, answer)
                    return
                if not await self._send(conn, stream, answer, request.method == "HEAD", close):
                    if close:
                        await lingering_close(stream, seconds=LINGER_S, max_bytes=LINGER_BYTES)
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # the client asked to close, or did not finish its request
                conn.start_next_cycle()
        except _Close as refused:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                error = refused.error
                answer = Answer(error.status, self.error_body(error), headers=error.headers)
                try:
                    await self._send(conn, stream, answer, refused.head_only, True)
                    await lingering_close(stream, seconds=LINGER_S, max_bytes=LINGER_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left
        except Exception as exc:  # a bug here must not take the listener down with it
            get_logger().error("http_connection_failed", server=self.name,
                               error=repr(exc)[:500])
        finally:
            await trio.aclose_forcefully(stream)

    async def _read(self, conn: h11.Connection, stream: trio.abc.Stream) -> Request | None:
        """The next request, read whole; None when the client closed between requests."""
        head: h11.Request | None = None
        body = bytearray()
        # Bytes of this request given to h11: h11 bounds only a head still incomplete after
        # a read, so a head that arrived whole in one read is measured here.
        fed = len(conn.trailing_data[0])
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Close(_protocol_error(exc)) from None
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(conn.send(h11.InformationalResponse(
                        status_code=100, headers=[])))
                data = await stream.receive_some(READ_SIZE)
                fed += len(data)
                conn.receive_data(as_bytes(data))
            elif type(event) is h11.Request:
                head = event
                if fed - len(conn.trailing_data[0]) > self.limits.max_head:
                    raise _Close(HeadersTooLarge("request head too large"))
                if event.http_version not in (b"1.0", b"1.1"):  # h11 reads "HTTP/2.0" as 1.1
                    raise _Close(VersionNotSupported(
                        "HTTP version not supported: use HTTP/1.1"))
                length = next((v for n, v in event.headers if n == b"content-length"), None)
                if length is not None and int(length) > self.limits.max_body:
                    raise _Close(self._too_large(), event.method == b"HEAD")
            elif type(event) is h11.Data:
                body += event.data
                if len(body) > self.limits.max_body:
                    raise _Close(self._too_large(), head is not None and head.method == b"HEAD")
            elif type(event) is h11.EndOfMessage:
                assert head is not None
                return Request(head.method.decode("ascii", "replace"),
                               head.target.decode("ascii", "replace"), tuple(head.headers),
                               bytes(body))
            else:  # ConnectionClosed: the client left between requests
                return None

    def _too_large(self) -> ProxyError:
        return PayloadTooLarge(f"request body larger than {self.limits.max_body} bytes")

    async def _answer(self, request: Request) -> tuple[Answer | Streamed, bool]:
        """The handler's answer and whether the connection closes after it."""
        try:
            return await self.handler(request), False
        except ProxyError as exc:
            return Answer(exc.status, self.error_body(exc), headers=exc.headers), False
        except Exception as exc:  # one bad request must not take the API down
            # No path: it is client text, and the logs keep client text out.
            get_logger().error("request_handler_failed", server=self.name,
                               error=repr(exc)[:500])
            error = ProxyError("internal error")
            return Answer(error.status, self.error_body(error)), True

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream, answer: Answer,
                    head_only: bool, close: bool) -> bool:
        """Send one answer; False when the connection must close after it."""
        headers = [(b"content-type", answer.content_type.encode()),
                   (b"content-length", b"%d" % len(answer.body)), *answer.headers]
        if close:
            headers.append((b"connection", b"close"))
        data = conn.send(h11.Response(status_code=answer.status, headers=headers))
        if not head_only and answer.body:
            data += conn.send(h11.Data(data=answer.body))
        data += conn.send(h11.EndOfMessage())
        with trio.move_on_after(self.limits.send_timeout) as timer:  # a client not reading
            await stream.send_all(data)
        return not close and not timer.cancelled_caught

    async def _stream(self, conn: h11.Connection, stream: trio.abc.Stream,
                      answer: Streamed) -> None:
        if answer.send_buffer is not None and isinstance(stream, trio.SocketStream):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, answer.send_buffer)
        pending = [conn.send(h11.Response(status_code=answer.status,
                                          headers=list(answer.headers)))]

        async def write(data: bytes) -> None:
            framed = conn.send(h11.Data(data=data))
            await stream.send_all(pending.pop() + framed if pending else framed)

        await answer.body(write)



def _protocol_error(exc: h11.RemoteProtocolError) -> ProxyError:
    """What a request h11 refused gets. h11's message may quote the refused bytes (a
    header line may hold a credential), so it is not passed on."""
    status = exc.error_status_hint
    if status == 431:
        return HeadersTooLarge("request head too large")
    return BadRequest("malformed HTTP request")
