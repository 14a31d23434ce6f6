"""The server side: one ``ClientConnection`` per accepted client connection.

h11 does the parsing; this module owns the stream and the timers
(hypercorn's split). Per connection:
- slow-header guard: a request head must arrive within ``header_timeout``
  of its first byte (and of the connection opening);
- keep-alive: an idle connection is closed after ``keepalive_timeout``;
- limits: head > ``max_header_bytes`` -> 431, body > ``max_body_bytes`` -> 413
  (refused from Content-Length before reading it), malformed HTTP -> 400,
  each then closes the connection (the rest of the bytes cannot be trusted);
- one reader task per connection owns every read from the client socket and
  queues what it reads (bounded). Because it is always waiting on the socket,
  a client that goes away while its request is proxied is seen at once and
  cancels the upstream exchange, not at the next write; and it costs no extra
  task, nursery or syscall per request (a per-request watcher task cost 15-30%
  of throughput when measured).
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING

import orjson
import trio

from zaiproxy import __version__
from zaiproxy.core.errors import (
    Api,
    BadRequest,
    HeadersTooLarge,
    InvalidJSON,
    PayloadTooLarge,
    PoolExhausted,
    ProxyError,
    RequestTimeout,
    ServiceUnavailable,
    UpstreamError,
    VersionNotSupported,
)
from zaiproxy.core.logs import get_logger
from zaiproxy.core.record import RequestRecord
from zaiproxy.http.framing import check_head, safe_protocol_message
from zaiproxy.http.http11 import as_bytes, h11
from zaiproxy.limits import report as limits_report
from zaiproxy.limits.admission import SC_ADAPTIVE_MRPS, SC_ADAPTIVE_RESET
from zaiproxy.request import admin, gate, tokens
from zaiproxy.request.admin_access import check_admin, security_warnings
from zaiproxy.request.context import STATE_DRAINING
from zaiproxy.request.proxy import ClientGone, Outcome, parse_json_body, proxy
from zaiproxy.request.routing import Control, Route, api_for_path, resolve, safe_method

if TYPE_CHECKING:
    from zaiproxy.request.context import WorkerContext


# How much the reader may queue ahead of the handler (pipelined requests, a
# body being read) before it stops reading: bounded, like everything else.
_MAX_READAHEAD = 65536
_READ_SIZE = 65536
# Lingering close after an early error response (nginx: lingering_time 30 s;
# a shorter bound here, since agents send bodies of a few MB at most).
_LINGER_SECONDS = 5.0
_LINGER_MAX_BYTES = 64 << 20
_JSON = (b"content-type", b"application/json")
_NO_HEADERS: list[tuple[bytes, bytes]] = []  # shared, never mutated
_COUNT_TOKENS = "/messages/count_tokens"


class ClientConnection:
    """Serves the requests of one client connection, one at a time (HTTP/1.1)."""

    def __init__(self, stream: trio.abc.Stream, ctx: WorkerContext, client_ip: str) -> None:
        self.stream = stream
        self.ctx = ctx
        self.client_ip = client_ip
        cfg = ctx.config
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.max_header_bytes)
        self.request_id = b""
        self.gone = False  # the client went away (EOF or broken pipe)
        self.idle_scope: trio.CancelScope | None = None  # set while waiting for a request
        self.response_status: int | None = None
        self.close_after = False
        # Reader -> handler queue of raw reads (b"" = EOF), bounded by _MAX_READAHEAD.
        self._pending = b""  # framed response bytes not yet written
        self._chunks: deque[bytes | bytearray] = deque()
        self._queued = 0
        self._eof_fed = False
        self._data_ready = trio.Event()
        self._space = trio.Event()
        # The exchange in progress: the reader cancels it when the client leaves.
        self._exchange: trio.CancelScope | None = None
        # Headers added to this request's response (the proxy's x-ratelimit-*).
        self.extra_headers: list[tuple[bytes, bytes]] = _NO_HEADERS

    def __repr__(self) -> str:
        return (f"<ClientConnection {self.client_ip} {self.conn.our_state}/{self.conn.their_state}"
                f"{' gone' if self.gone else ''}>")

    # ---- writing to the client ------------------------------------------------

    async def _write(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.gone = True
            raise ClientGone() from exc

    def queue_response(self, status: int, headers: list[tuple[bytes, bytes]],
                       reason: bytes = b"") -> None:
        """Frame the response head; it is written with the next flush."""
        extra = self.extra_headers
        if extra:
            # The proxy's x-ratelimit-* replace upstream's headers of the same names (rare:
            # look for them first instead of rebuilding every response's header list).
            if any(name.startswith(b"x-ratelimit-") for name, _ in headers):
                names = {name for name, _ in extra}
                headers = [h for h in headers if h[0] not in names]
            headers.extend(extra)
        if self.ctx.draining or self.close_after:
            headers = [*headers, (b"connection", b"close")]
        self.response_status = status
        self._pending += self.conn.send(h11.Response(
            status_code=status, headers=headers, reason=reason or _REASONS.get(status, b""))) or b""

    def queue_data(self, data: bytes) -> None:
        self._pending += self.conn.send(h11.Data(data=data)) or b""

    def queue_end(self) -> None:
        self._pending += self.conn.send(h11.EndOfMessage()) or b""

    async def flush(self) -> None:
        """Write everything queued in one send_all."""
        if self._pending:
            out, self._pending = self._pending, b""
            await self._write(out)

    async def send_response(self, status: int, headers: list[tuple[bytes, bytes]],
                            reason: bytes = b"") -> None:
        self.queue_response(status, headers, reason)
        await self.flush()

    async def send_data(self, data: bytes) -> None:
        self.queue_data(data)
        await self.flush()

    async def send_end(self) -> None:
        self.queue_end()
        await self.flush()

    async def abort(self) -> None:
        """Close without finishing the response (the client sees a truncated body)."""
        self.gone = True
        await trio.aclose_forcefully(self.stream)

    async def send_simple(self, status: int, body: bytes,
                          headers: tuple[tuple[bytes, bytes], ...] = (),
                          content_type: bytes = b"application/json", head: bool = False) -> None:
        hdrs = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                (b"x-zaiproxy-request-id", self.request_id), *headers]
        self.queue_response(status, hdrs)
        if body and not head:
            self.queue_data(body)
        self.queue_end()
        await self.flush()

    async def send_error(self, exc: ProxyError, api: Api) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already under way; the caller aborts instead
        await self.send_simple(exc.status, exc.body(api), exc.headers)

    # ---- reading from the client ---------------------------------------------

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
                    if self._exchange is not None:
                        self._exchange.cancel()
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
        """The next request head and the raw bytes it was parsed from (they start with
        the head; more may follow), or None when the connection should just close."""
        cfg = self.ctx.config
        conn = self.conn
        # What h11 holds unparsed is where this request starts (pipelined bytes; usually
        # nothing). Every chunk fed from here on is appended: framing.py checks the raw
        # head h11 parsed, because its events no longer show bare LFs or folded lines.
        raw = conn.trailing_data[0]
        fed: list[bytes] | None = None
        event = conn.next_event()
        if event is h11.NEED_DATA:
            # Wait for the first byte: keep-alive idle time (or the header
            # timeout on a brand-new connection, which could be a slowloris).
            with trio.CancelScope() as scope:
                # A drain closes connections idle *between* requests. A new
                # connection's first request raced the listener closing and is
                # answered (503 + close) rather than dropped unanswered.
                if not first:
                    self.idle_scope = scope
                    if self.ctx.draining:
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
            # h11 only bounds a head that is still incomplete; one that arrived
            # in a single read is checked here, so the limit does not depend
            # on how the client's bytes were segmented.
            if event.http_version not in (b"1.1", b"1.0"):
                raise h11.RemoteProtocolError("unsupported HTTP version", error_status_hint=505)
            size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if size > cfg.max_header_bytes:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            return event, (b"".join(fed) if fed is not None else raw)
        return None  # ConnectionClosed or PAUSED

    async def _read_body(self, request: h11.Request, api: Api) -> bytes:
        cfg = self.ctx.config
        limit = cfg.max_body_bytes
        for name, value in request.headers:
            if name == b"content-length":
                if int(value) > limit:
                    raise PayloadTooLarge(
                        f"request body of {int(value)} bytes exceeds the limit of {limit} bytes")
                break
        if self.conn.they_are_waiting_for_100_continue:
            interim = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            await self._write(self.conn.send(interim) or b"")
        parts: list[bytes] = []
        size = 0
        conn = self.conn
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

    # ---- the request loop ------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                try:
                    await self._serve()
                finally:
                    nursery.cancel_scope.cancel()
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:
            # A bug must cost one connection, never the worker and its other clients.
            get_logger().error("connection_crashed", request_id=self.request_id.decode(),
                               error=repr(exc))
        finally:
            if self.close_after and not self.gone and self.conn.their_state is not h11.DONE:
                await self._lingering_close()
            await trio.aclose_forcefully(self.stream)

    async def _lingering_close(self) -> None:
        """Half-close, then drain what the client still sends, for a bounded while.

        We answered (413, 400, ...) without reading the whole request. Closing
        a socket with unread bytes makes the kernel send RST, and a client still
        sending can then lose our response before reading it. RFC 9112 9.6's
        staged close, nginx's ``lingering_close``: bounded in time and bytes.
        """
        drained = 0
        with trio.move_on_after(_LINGER_SECONDS):
            try:
                if isinstance(self.stream, trio.abc.HalfCloseableStream):
                    await self.stream.send_eof()
                while drained < _LINGER_MAX_BYTES:
                    data = await self.stream.receive_some(_READ_SIZE)
                    if not data:
                        break
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

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
                await self._refuse(BadRequest(problem),
                                   api_for_path(request.target.decode("ascii", "replace")),
                                   request.method.decode("ascii", "replace"))
                return
            if chunked:
                self.close_after = True  # nothing after a chunked body is read (framing.py)
            first = False
            await self._handle(request)
            if (self.gone or self.ctx.draining or conn.our_state is not h11.DONE
                    or conn.their_state is not h11.DONE):
                return
            conn.start_next_cycle()

    async def _refuse(self, err: ProxyError, api: Api, method: str) -> None:
        """Answer a request whose head cannot be trusted, then close the connection."""
        self.request_id = self.ctx.next_request_id()
        self.close_after = True
        await self.send_error(err, api)
        self._emit(RequestRecord(
            request_id=self.request_id.decode(),
            method="-" if method == "-" else safe_method(method), route="other", api=api.value,
            status=err.status, duration_s=0.0, bytes_in=0, client=self.client_ip,
            error=err.message))

    async def _handle(self, request: h11.Request) -> None:
        ctx = self.ctx
        self.request_id = ctx.next_request_id()
        self.response_status = None
        started = trio.current_time()
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        route: Route | None = None
        api = Api.OPENAI
        outcome: Outcome | None = None
        model: str | None = None
        stream_flag: bool | None = None
        error: str | None = None
        body = b""
        alias: str | None = None
        ticket: gate.Ticket | None = None
        self.extra_headers = _NO_HEADERS
        in_flight = False  # counted in zai_proxy_concurrent_requests
        try:
            try:
                for name, value in request.headers:
                    if name == b"host" and (b"@" in value or b"/" in value):
                        raise BadRequest("invalid Host header")
                route = resolve(method, target)
            except ProxyError as exc:
                api = api_for_path(target)
                if not isinstance(exc, BadRequest):
                    # 404/405: read (bounded) what the client sent, so the connection can
                    # serve its next request instead of being closed for an unread body.
                    body = await self._read_body(request, api)
                raise
            api = route.api
            if route.control is None:
                ctx.metrics.request_started()
                in_flight = True
            body = await self._read_body(request, api)
            if route.control is not None:
                await self._control(route.control, request, body)
                return
            payload: dict[str, object] | None = None
            if route.reads_json:
                try:
                    payload = parse_json_body(body)
                except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
                    raise InvalidJSON(f"the request body is not valid JSON: {exc}") from None
                raw_model = payload.get("model")
                model = raw_model if isinstance(raw_model, str) else None
                stream_flag = payload.get("stream") is True
                if stream_flag:
                    ctx.metrics.stream_started()
            if ctx.draining:
                raise ServiceUnavailable("the proxy is shutting down")
            key = gate.authenticate(ctx, request, model)
            if key is not None:
                alias = key.alias
            if (payload is not None and ctx.config.count_tokens_locally
                    and route.upstream_path.partition("?")[0].endswith(_COUNT_TOKENS)):
                await self._count_tokens_locally(route, payload, len(body))
                return
            outcome = Outcome()
            # Errors are carried out of the nursery by hand: trio wraps anything
            # raised inside one in an ExceptionGroup.
            with trio.CancelScope() as exchange:
                self._exchange = exchange
                if self.gone:
                    exchange.cancel()  # the client left while we read its body
                try:
                    ticket = await gate.admit(ctx, route, key, payload, len(body), model)
                    self.extra_headers = gate.response_headers(ctx, ticket)
                    await proxy(ctx, self, route, request, body, outcome, ticket)
                except ClientGone:
                    outcome.result = "client_disconnected"
                finally:
                    self._exchange = None
                    if ticket is not None:
                        gate.settle(ctx, ticket, api.value, outcome)
            if exchange.cancelled_caught and outcome.result == "ok":
                # The reader cancelled the exchange: the client went away first.
                outcome.result = "client_disconnected"
        except ProxyError as exc:
            error = exc.message
            if isinstance(exc, PayloadTooLarge | RequestTimeout | BadRequest):
                self.close_after = True  # unread body bytes may follow
            if isinstance(exc, UpstreamError | PoolExhausted):
                ctx.metrics.upstream_error(exc.code)
            if not self.gone:
                await self.send_error(exc, api)
        finally:
            if in_flight:
                ctx.metrics.request_ended(stream_flag is True)
            self._log(method, api, route, started, len(body), model, stream_flag, outcome, error,
                      alias, ticket)

    async def _control(self, control: Control, request: h11.Request, body: bytes) -> None:
        ctx = self.ctx
        head = request.method == b"HEAD"
        if control is Control.HEALTH:
            adaptive = limits_report.adaptive_state(ctx.config, ctx.ledger)
            body = orjson.dumps({
                "status": "ok", "version": __version__, "variant": ctx.config.deployment_variant,
                "ledger": ctx.ledger_impl, "http": ctx.http_impl, "worker": ctx.worker_index,
                "pid": os.getpid(), "keys": len(ctx.keys) if ctx.keys is not None else None,
                "adaptive_rate_rps": adaptive["rate_rps"],
                # Why the rate is capped (a Z.AI throttle class) and when the cap is gone.
                "adaptive_reason": adaptive["reason"],
                "adaptive_free_in_s": adaptive["free_in_s"],
                "warnings": security_warnings(ctx.config.host, ctx.config.admin_token),
            })
            await self.send_simple(200, body, head=head)
        elif control is Control.READY:
            ready = ctx.ready
            body = orjson.dumps({
                "ready": ready, "draining": ctx.draining or ctx.shared_state.get() == STATE_DRAINING,
                "worker": ctx.worker_index,
            })
            await self.send_simple(200 if ready else 503, body, head=head)
        elif control is Control.METRICS:
            payload, content_type = ctx.metrics.render()
            await self.send_simple(200, payload, content_type=content_type, head=head)
        elif control is Control.RESET_RATE_LIMIT:
            check_admin(ctx.config.admin_token, request.headers, self.client_ip, mutating=True)
            ctx.ledger.scalar_set(SC_ADAPTIVE_MRPS, 0)  # effective at once, in every worker
            generation = ctx.ledger.scalar_add(SC_ADAPTIVE_RESET, 1)  # the supervisor forgets
            get_logger().warning("adaptive_rate_reset_requested", client=self.client_ip,
                                 generation=generation)
            await self.send_simple(200, orjson.dumps({"reset": True, "generation": generation}))
        else:
            await self._admin(control, request)

    async def _admin(self, control: Control, request: h11.Request) -> None:
        """The read side of the admin API (zaiproxy/request/admin.py); token-checked first."""
        ctx = self.ctx
        check_admin(ctx.config.admin_token, request.headers, self.client_ip, mutating=False)
        if control is Control.STATUS:
            await self.send_simple(200, orjson.dumps(admin.status_report(ctx)))
        elif control is Control.KEYS:
            await self.send_simple(200, orjson.dumps(admin.keys_report(ctx)))
        elif control is Control.HISTORY:
            query = request.target.partition(b"?")[2].decode("ascii", "replace")
            range_, variant = admin.parse_history_params(query)
            await self.send_simple(200, orjson.dumps(await admin.history_report(ctx, range_,
                                                                                variant)))
        else:
            await admin.stream_events(ctx, self)

    async def _count_tokens_locally(self, route: Route, payload: dict[str, object],
                                    body_len: int) -> None:
        """Answer /v1/messages/count_tokens from the tiktoken estimate (``count_tokens_locally``)."""
        est = await tokens.estimate(route.api.value, payload, body_len)
        await self.send_simple(200, orjson.dumps({"input_tokens": est.prompt_tokens}),
                               headers=((b"x-zaiproxy-estimate", b"cl100k_base"),))

    def _log(self, method: str, api: Api, route: Route | None, started: float, bytes_in: int,
             model: str | None, stream_flag: bool | None, outcome: Outcome | None,
             error: str | None, alias: str | None = None,
             ticket: gate.Ticket | None = None) -> None:
        record = RequestRecord(
            request_id=self.request_id.decode(),
            method=safe_method(method),
            # The template, never the raw path: raw paths may carry anything.
            route=route.template if route is not None else "other",
            # Control routes are not API traffic; an unrouted request keeps its guessed shape.
            api=None if route is not None and route.control is not None else api.value,
            # 499: the client closed the connection before a response (nginx's convention).
            status=self.response_status or (499 if self.gone else 0),
            duration_s=trio.current_time() - started,
            bytes_in=bytes_in,
            client=self.client_ip,
            model=model[:128] if model is not None else None,
            stream=stream_flag,
            upstream_status=outcome.upstream_status if outcome else None,
            upstream_ttfb_s=outcome.ttfb if outcome else None,
            bytes_out=outcome.bytes_out if outcome else None,
            result=outcome.result if outcome else None,
            retried=outcome.retried if outcome else False,
            usage=outcome.usage if outcome else None,
            error=error,
            key_alias=alias,
            tokens_estimated=outcome.usage_estimated if outcome else False,
            prompt_estimate=ticket.prompt_tokens if ticket is not None and ticket.counted else None,
            zai_retries=outcome.zai_retries if outcome else 0,
            zai_class=outcome.zai_class if outcome else None,
            zai_code=outcome.zai_code if outcome else None,
            ttft_s=(outcome.first_byte - started
                    if outcome is not None and outcome.first_byte is not None else None),
            upstream_s=outcome.upstream_s if outcome else None,
            queue_wait_s=ticket.queue_wait_s if ticket is not None else None,
            token_count_s=ticket.token_count_s if ticket is not None else None,
        )
        self._emit(record)

    def _emit(self, record: RequestRecord) -> None:
        """Hand the finished request's record to its sinks (metrics, access log, history)."""
        self.ctx.metrics.observe(record)
        if self.ctx.record_sink is not None:
            self.ctx.record_sink.submit(record)  # never blocks: drops and counts when full
        if self.ctx.config.access_log:
            log = get_logger()
            if log.enabled("info"):
                log.info("request", **record.log_fields())


_REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 204: b"No Content", 304: b"Not Modified",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}

