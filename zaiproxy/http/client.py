"""A small HTTP/1.1 client (h11 over trio): one request, one connection, the whole answer.

For the fleet's own plumbing, where an answer is a JSON document or an exposition read
whole: the collector scraping ``/metrics`` and ``/admin/keys``, a worker asking the
recorder for history, ``zaiproxy history`` and ``zaiproxy canary-check`` asking an admin
API or Prometheus. Proxied traffic does not come here (``upstream/``: pooled connections,
streamed bodies, retries).

- One connection per request, ``Connection: close``: the collector's scrapes must spread
  over a host's ``SO_REUSEPORT`` workers, and nothing here is frequent enough to pool.
- The answer's body is bounded (``max_body``): a target that streams forever or answers
  with gigabytes costs an error, not the caller's memory.
- Time: the caller's cancel scope bounds a request, as it bounds anything in trio (a
  collector round, a worker's query); :func:`request_sync` has no caller's scope, so it
  takes ``timeout=`` for the whole request (connect to last byte) and raises :class:`Timeout`.
- Every way a request can fail is one :class:`ClientError` (below); a caller catches that,
  never ``OSError``/``trio.BrokenResourceError``/``h11.ProtocolError``. Messages name the
  address (``host:port``), never a header: a token passed in ``headers`` stays there.
- :func:`request_sync` runs one request in its own ``trio.run``, for command-line code that
  has no event loop (and must not be called from inside one).

Errors::

    ClientError              any failure to get a whole answer (itself: a request that
    │                        is not valid HTTP/1.1, e.g. a header value with a newline)
    ├── ConnectFailed        the address is unusable: bad URL, name not resolved, network
    │                        unreachable, TLS handshake refused
    ├── NoAnswer             nobody answered: connection refused, or reset, or closed
    │   │                    before the answer's head
    │   └── Timeout          no whole answer within request_sync's ``timeout``
    └── BadAnswer            something answered, but not a usable HTTP/1.1 answer:
                             malformed, cut after its head, or larger than ``max_body``
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from zaiproxy.http.http11 import as_bytes, h11

DEFAULT_MAX_BODY = 16 << 20
READ_SIZE = 65536
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ClientError(Exception):
    """A request that produced no whole answer (the subclasses say why)."""


class ConnectFailed(ClientError):
    """The address is unusable: a bad URL, a name that does not resolve, an unreachable
    network, a TLS handshake that failed. Most likely a mistake in the address."""


class NoAnswer(ClientError):
    """Nobody answered: the connection was refused, or reset, or closed before the head of
    an answer; the service is down (or not there)."""


class Timeout(NoAnswer):
    """No whole answer within :func:`request_sync`'s ``timeout``."""


class BadAnswer(ClientError):
    """Something answered, but not usably: not HTTP/1.1 that h11 accepts, cut after its
    head, or a body over ``max_body``."""


@dataclass(frozen=True, slots=True)
class Url:
    """Where a request goes: what a URL says, checked once."""

    scheme: str  # http or https
    host: str  # for connecting (IPv6 without brackets)
    port: int
    target: str  # path and query, as sent
    authority: str  # the Host header: host[:port] as written (IPv6 in brackets)

    @classmethod
    def parse(cls, url: str) -> Url:
        """``http[s]://host[:port][/path][?query]``; ConnectFailed naming what is wrong."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConnectFailed(f"bad URL {url!r}: {exc}") from None
        if parts.scheme not in _DEFAULT_PORTS:
            raise ConnectFailed(f"bad URL {url!r}: the scheme must be http or https")
        if not parts.hostname:
            raise ConnectFailed(f"bad URL {url!r}: no host")
        if "@" in parts.netloc:  # user info would be a credential sent nowhere: refuse it
            raise ConnectFailed("bad URL: user info (user:password@) is not supported")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, port or _DEFAULT_PORTS[parts.scheme],
                   target, parts.netloc)

    @property
    def where(self) -> str:
        """``host:port`` for messages (the path may hold a query an operator typed)."""
        return self.authority if ":" in self.authority.rpartition("]")[2] \
            else f"{self.authority}:{self.port}"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased (h11)
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        return next((v for n, v in self.headers if n == name), None)


async def request(method: str, url: str | Url, *, headers: Iterable[tuple[str, str]] = (),
                  body: bytes | None = None, max_body: int = DEFAULT_MAX_BODY,
                  ssl_context: ssl.SSLContext | None = None) -> Response:
    """Send one request and read its whole answer (see the module's docstring).

    ``headers`` are sent as given, after ``Host`` (unless given) and before
    ``Content-Length`` (set from ``body``) and ``Connection: close``. ``ssl_context`` is
    for ``https`` (default: the system's trust store, as urllib's).
    """
    where = url if isinstance(url, Url) else Url.parse(url)
    hdrs = list(headers)
    if not any(n.lower() == "host" for n, _ in hdrs):
        hdrs.insert(0, ("host", where.authority))
    if body is not None:
        hdrs.append(("content-length", str(len(body))))
    hdrs.append(("connection", "close"))
    conn = h11.Connection(h11.CLIENT)
    try:
        data = conn.send(h11.Request(method=method, target=where.target, headers=hdrs))
    except h11.LocalProtocolError:
        # h11's message quotes the refused value, and a header may hold a credential.
        raise ClientError("the request is not valid HTTP/1.1 (a header value or the target; "
                          "not shown: a header may hold a credential)") from None
    if body:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    stream = await _connect(where, ssl_context)
    try:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            # The peer closed or reset while we sent: an answer may still be readable
            # (an early error answer), so read on; the read says what happened.
            pass
        return await _read(conn, stream, where, max_body)
    finally:
        await trio.aclose_forcefully(stream)


async def get(url: str | Url, *, headers: Iterable[tuple[str, str]] = (),
              max_body: int = DEFAULT_MAX_BODY,
              ssl_context: ssl.SSLContext | None = None) -> Response:
    return await request("GET", url, headers=headers, max_body=max_body,
                         ssl_context=ssl_context)


async def post(url: str | Url, body: bytes, *, headers: Iterable[tuple[str, str]] = (),
               max_body: int = DEFAULT_MAX_BODY,
               ssl_context: ssl.SSLContext | None = None) -> Response:
    return await request("POST", url, headers=headers, body=body, max_body=max_body,
                         ssl_context=ssl_context)


def request_sync(method: str, url: str | Url, *, headers: Iterable[tuple[str, str]] = (),
                 body: bytes | None = None, max_body: int = DEFAULT_MAX_BODY,
                 timeout: float | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> Response:
    """:func:`request` from code without an event loop (a CLI), in its own ``trio.run``;
    :class:`Timeout` when the whole answer is not in within ``timeout`` seconds."""
    where = url if isinstance(url, Url) else Url.parse(url)
    limit = math.inf if timeout is None else timeout

    async def bounded() -> Response:
        with trio.move_on_after(limit):
            return await request(method, where, headers=headers, body=body,
                                 max_body=max_body, ssl_context=ssl_context)
        raise Timeout(f"no answer from {where.where} within {limit:g}s")

    return trio.run(bounded)


async def _connect(where: Url, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    try:
        tcp = await trio.open_tcp_stream(where.host, where.port)
    except OSError as exc:
        raise _connect_error(exc, where) from None
    if where.scheme != "https":
        return tcp
    tls = trio.SSLStream(tcp, ssl_context or ssl.create_default_context(),
                         server_hostname=where.host, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__
        if isinstance(cause, ConnectionError):
            raise NoAnswer(f"{where.where}: the connection was closed during TLS: "
                           f"{cause}") from None
        raise ConnectFailed(f"TLS with {where.where} failed: {cause or exc}") from None
    return tls


def _connect_error(exc: OSError, where: Url) -> ClientError:
    """NoAnswer when every address refused (or reset) the connection, else ConnectFailed.

    ``trio.open_tcp_stream`` tries each address of the name and raises one OSError whose
    cause groups the attempts' errors; a name that does not resolve raises gaierror."""
    causes: list[BaseException] = [exc]
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup):
        causes = list(_leaves(group))
    reason = "; ".join(dict.fromkeys(_strerror(c) for c in causes))
    if all(isinstance(c, ConnectionError) for c in causes):
        return NoAnswer(f"cannot connect to {where.where}: {reason}")
    return ConnectFailed(f"cannot connect to {where.where}: {reason}")


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterable[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _strerror(exc: BaseException) -> str:
    """The reason alone ("Connection refused"): trio's own text repeats the address."""
    if isinstance(exc, ConnectionError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _read(conn: h11.Connection, stream: trio.abc.Stream, where: Url,
                max_body: int) -> Response:
    head: h11.Response | None = None
    body = bytearray()
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if not received:  # EOF before a single byte: h11 calls that a protocol error
                raise NoAnswer(f"{where.where} closed the connection without an answer") \
                    from None
            raise BadAnswer(f"bad HTTP from {where.where}: {exc}") from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(READ_SIZE)
            except trio.BrokenResourceError as exc:
                raise NoAnswer(f"{where.where} reset the connection: "
                               f"{_strerror(exc.__cause__ or exc)}") from None
            received += len(data)
            conn.receive_data(as_bytes(data))  # b"": EOF, which h11 judges next
        elif type(event) is h11.Response:
            head = event
        elif type(event) is h11.Data:
            body += event.data
            if len(body) > max_body:
                raise BadAnswer(f"the answer from {where.where} is larger than "
                                f"{max_body} bytes")
        elif type(event) is h11.EndOfMessage:
            assert head is not None
            return Response(head.status_code, head.reason.decode("latin-1"),
                            tuple(head.headers), bytes(body))
        elif type(event) is h11.ConnectionClosed:
            if head is None:
                raise NoAnswer(f"{where.where} closed the connection without an answer")
            raise BadAnswer(f"{where.where} closed the connection before the answer ended")
        # InformationalResponse (100 Continue): the real answer follows.
