"""The relay: upstream's response to the client, as it arrives, through a ``ClientSink``.

docs/architecture.md "One request", steps 8-10:
- status and headers go to the client as soon as upstream sends them;
- each network read from upstream becomes one client write: chunks that arrive apart stay
  apart, nothing is buffered whole, and a slow client slows the upstream reads down (TCP
  backpressure; one read in flight);
- the SSE usage tracker watches the bytes (usage) without changing them, or takes out the
  usage chunk ``include_usage`` added for a client that did not ask for it: one call per
  read (zaiproxy/request/scanner.py chooses the native scanner or its pure-Python twin);
- a chunked SSE body (plain or HTTPS upstream) goes through the native stream pump once its first
  read is relayed (:meth:`Relay._pump`): the same steps in one C call per wait, the loop
  below being its pure-Python twin (``ZAIPROXY_RELAY=python``);
- upstream lost mid-stream: SSE bodies end with an error event in the caller's API shape,
  then the client connection is closed without the final chunk, so a cut stream never
  looks like a short answer;
- the client gone or the request cancelled: the upstream connection is closed, never
  returned to the pool (it still carries the rest of the response).

This is the seam the native stream relay plugs into: it reads from an
:class:`~zaiproxy.upstream.pool.UpstreamConnection`, writes to a
:class:`~zaiproxy.http.connection.ClientSink`, and reports one frozen
:class:`RelayOutcome` (:meth:`Relay.outcome`, also after a cancellation).
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from zaiproxy.core.errors import Api, sse_error_event
from zaiproxy.core.record import Ending, Usage
from zaiproxy.http import netstream
from zaiproxy.http.sink import ClientGone, ClientSink
from zaiproxy.http.tlsstream import TLSStream
from zaiproxy.request import scanner
from zaiproxy.request.exchange import Exchanged
from zaiproxy.request.routing import Route
from zaiproxy.request.usage import StreamTracker, StreamUsage, stream_usage, usage_from_body
from zaiproxy.upstream.forward import client_response_headers, header_value
from zaiproxy.upstream.pool import UpstreamBroken, UpstreamConnection

if TYPE_CHECKING:
    from zaiproxy.request.context import WorkerContext

Headers = list[tuple[bytes, bytes]]

# Non-streaming bodies are kept up to this size to read their usage; larger ones are
# relayed without it (LLM JSON responses are a few KB).
USAGE_BODY_LIMIT = 1 << 20


@dataclass(frozen=True, slots=True)
class RelayOutcome:
    """How the relay ended and what it saw."""

    ending: Ending
    status: int  # upstream's status, as relayed
    bytes_out: int
    first_byte: float | None  # trio time the first body byte was queued for the client
    upstream_s: float | None  # the request sent upstream -> its response ended
    # Upstream's usage; for a stream, a StreamUsage saying whether output was counted here.
    usage: StreamUsage | Usage | None


def with_ratelimit(headers: Headers, extra: Headers) -> Headers:
    """``headers`` plus the proxy's ``x-ratelimit-*``, which replace upstream's of the same
    names (rare: looked for first instead of rebuilding every response's header list)."""
    if not extra:
        return headers
    if any(name.startswith(b"x-ratelimit-") for name, _ in headers):
        names = {name for name, _ in extra}
        headers = [h for h in headers if h[0] not in names]
    headers.extend(extra)
    return headers


class Relay:
    """Relay one response; :meth:`outcome` says how it went (at any time after :meth:`run`)."""

    def __init__(self, ctx: WorkerContext, sink: ClientSink, route: Route, exchanged: Exchanged,
                 extra_headers: Headers, *, strip_usage: bool, keep_json: bool) -> None:
        self.ctx = ctx
        self.sink = sink
        self.route = route
        self.exchanged = exchanged
        self.extra_headers = extra_headers
        content_type = header_value(exchanged.response.headers, b"content-type") or b""
        self.is_sse = content_type.startswith(b"text/event-stream")
        self.tracker: StreamTracker | None = (
            scanner.Tracker(route.api.value, count_deltas=ctx.config.token_counting,
                            strip_usage=strip_usage) if self.is_sse else None)
        self.keep_json = keep_json and not self.is_sse and exchanged.response.status_code == 200
        self.ending = Ending.OK
        self.bytes_out = 0
        self.first_byte: float | None = None
        self.upstream_s: float | None = None
        self._usage: StreamUsage | Usage | None = None
        self._final = False  # _usage holds the final count

    def outcome(self) -> RelayOutcome:
        usage = self._usage
        if not self._final and self.tracker is not None:
            # Cut, left or cancelled: what was generated before is billed by upstream.
            usage = self.tracker.usage_estimated()
        return RelayOutcome(self.ending, self.exchanged.response.status_code, self.bytes_out,
                            self.first_byte, self.upstream_s, usage)

    async def run(self) -> None:
        """Relay the whole response (raises Cancelled when cancelled, after cleaning up)."""
        ctx = self.ctx
        sink = self.sink
        pool = ctx.pool
        ex = self.exchanged
        conn = ex.conn
        tracker = self.tracker
        kept: list[bytes] = []
        kept_len = 0
        keep = self.keep_json
        prefix, prefix_ended = ex.prefix, ex.prefix_ended
        try:
            # The head is queued, not written: if the body (or all of it) came in the same
            # upstream read, head, body and end go out in one write (each send_all costs
            # 15-20 us). Nothing waits for it: before any wait on upstream, whatever is
            # queued is flushed.
            headers = client_response_headers(ex.response.headers, sink.request_id)
            headers.extend(ex.final_headers)
            sink.queue_response(ex.response.status_code,
                                with_ratelimit(headers, self.extra_headers), ex.response.reason)
            idle = ctx.config.body_idle_timeout
            # The idle timeout: the pool's watchdog closes the connection when the deadline
            # set before each wait passes (UpstreamPool.watch_idle; no cancel scope per event).
            pool.watch(conn)
            # Nothing holds undecoded body bytes: read_available and read_more return only
            # once h11 (or the pool's native de-chunker) needs more data (or the body ended),
            # so after them the next step is a wait, not another decoding call (one per
            # upstream read saved).
            drained = False
            # The stream pump takes over an SSE body once the loop below reaches its first
            # wait with the body chunked on both sides, nothing read and left undecoded (or
            # decrypted and unread) upstream, and the client's connection a plain socket.
            pump = netstream.PUMP and tracker is not None
            while True:
                try:
                    if prefix or prefix_ended:
                        data, ended, prefix, prefix_ended = prefix, prefix_ended, b"", False
                    else:
                        data, ended = (b"", False) if drained else conn.read_available()
                        if not data and not ended:
                            # Whatever is queued goes out before the wait: one client write
                            # per upstream read. A slow client is not an idle upstream: the
                            # deadline starts after the write.
                            await sink.flush()
                            up = conn.chunked_body() if pump else None
                            down = sink.chunked_socket() if up is not None else None
                            if up is not None and down is not None:
                                pump = False
                                data, ended = await self._pump(conn, *up, down)
                            else:
                                conn.idle_deadline = trio.current_time() + idle
                                data, ended = await conn.read_more()
                                conn.idle_deadline = math.inf
                        drained = True
                except UpstreamBroken as exc:
                    if conn.idle_expired:
                        self.ending = Ending.UPSTREAM_IDLE
                        why = f"upstream sent nothing for {idle:g} s; stream aborted"
                    else:
                        self.ending = Ending.UPSTREAM_CUT
                        why = f"upstream connection lost mid-response: {exc}"
                    await self._cut(why)
                    return
                if ended:
                    self.upstream_s = trio.current_time() - ex.started
                    # Back to the pool before the last write: the upstream exchange is
                    # complete whatever the client does next, and a client that sends its
                    # next request at once finds the connection idle.
                    await pool.release(conn)
                if data:
                    if tracker is not None:
                        data = tracker.feed(data)  # the bytes to send on
                    elif keep and kept_len < USAGE_BODY_LIMIT:
                        kept.append(data)
                        kept_len += len(data)
                    if data:
                        if self.first_byte is None:
                            self.first_byte = trio.current_time()
                        self.bytes_out += len(data)
                        sink.queue_data(data)
                if ended:
                    if tracker is not None:
                        tail = tracker.close()  # what the stripper held: not an event
                        if tail:
                            self.bytes_out += len(tail)
                            sink.queue_data(tail)
                    sink.queue_end()
                    break
        except ClientGone:
            self.ending = Ending.CLIENT_GONE
            await pool.discard(conn)
            return
        except trio.Cancelled:
            self.ending = Ending.CLIENT_GONE if sink.gone else Ending.CANCELLED
            await self._on_cancel()
            raise
        except BaseException:
            await pool.discard(conn)
            raise

        if tracker is not None:
            # Upstream's report, else the deltas counted (only when token counting is on).
            self._usage = (await stream_usage(tracker) if ctx.config.token_counting
                           else tracker.usage)
        elif kept and kept_len <= USAGE_BODY_LIMIT:
            self._usage = usage_from_body(self.route.api.value, b"".join(kept))
        self._final = True
        try:
            await sink.flush()
        except ClientGone:
            self.ending = Ending.CLIENT_GONE

    async def _pump(self, conn: UpstreamConnection, up: socket.socket,
                    dechunk: netstream.framing.Dechunker, tls: TLSStream | None,
                    down: socket.socket) -> tuple[bytes, bool]:
        """The rest of a chunked SSE body through the native stream pump (_native/_pump.pyx):
        each ``step()`` reads what upstream sent, decodes, scans and frames it and writes it
        to the client, one write per read, and says what to wait for. While upstream has
        nothing to read, the pump waits in the worker's hub (zaiproxy/http/pumphub.py), which
        relays every ready stream of the worker in one native call, so this task wakes only
        when the stream needs it. Returns what :meth:`UpstreamConnection.read_more` would at
        the body's end; raises as it does (``UpstreamBroken``), and ``ClientGone`` when the
        client's socket failed.

        Backpressure, idle timeout and cancellation are the loop's: a full client socket is
        waited on (here, out of the hub) before the next upstream read; ``idle`` counts from
        the last upstream read or the end of a wait for the client, whichever is later (the
        hub's wait, or the pool's watchdog when no hub runs); every wait is a trio checkpoint.
        """
        from zaiproxy._native import _pump  # loaded at start-up (netstream)
        from zaiproxy.http.pumphub import IDLE

        assert self.tracker is not None
        p = _pump.Pump(up, down, dechunk, self.tracker.feed, tls=tls)
        hub = self.ctx.pump_hub
        if hub is not None and not hub.running:
            hub = None
        step = p.step
        idle = self.ctx.config.body_idle_timeout
        try:
            while True:
                try:
                    what = step()
                    if what == _pump.READ and hub is not None:
                        what = await hub.wait(p, idle)
                except _pump.ClientFailed as exc:
                    self.sink.gone = True
                    raise ClientGone() from exc
                except (_pump.UpstreamFailed, netstream.framing.FramingError,
                        ssl.SSLError) as exc:
                    raise conn.body_failed(exc) from None
                if self.first_byte is None and p.body_bytes:
                    self.first_byte = trio.current_time() - (time.monotonic() - p.first_sent)
                if what == _pump.READ:
                    conn.idle_deadline = trio.current_time() + idle
                    try:
                        await trio.lowlevel.wait_readable(up)
                    except (trio.ClosedResourceError, OSError) as exc:
                        raise conn.body_failed(exc) from None
                    conn.idle_deadline = math.inf
                elif what == _pump.WRITE:
                    try:
                        await trio.lowlevel.wait_writable(down)
                    except (trio.ClosedResourceError, OSError) as exc:
                        self.sink.gone = True
                        raise ClientGone() from exc
                elif what == _pump.YIELD:
                    await trio.lowlevel.checkpoint()
                elif what == _pump.END:
                    return conn.end_chunked()
                elif what == _pump.HANDOFF:
                    # TLS has something to send (a KeyUpdate's answer): the loop, reading
                    # through the TLSStream, relays the rest of the body.
                    return b"", False
                elif what == IDLE:
                    conn.idle_expired = True
                    raise UpstreamBroken("idle")
                else:
                    raise conn.body_failed(None)
        finally:
            conn.idle_deadline = math.inf
            self.bytes_out += p.body_bytes
            conn.received_bytes += p.received

    async def _cut(self, message: str) -> None:
        """Upstream failed after the response started: tell SSE clients, then close without
        a clean end."""
        self.ctx.metrics.upstream_error("stream_cut")
        await self.ctx.pool.discard(self.exchanged.conn)
        if self.is_sse:
            await self._send_sse_error("upstream_error", message, "upstream_stream_cut")
        await self.sink.abort()

    async def _on_cancel(self) -> None:
        """Cancelled mid-relay (drain deadline or client gone): close upstream, tell a live
        SSE client."""
        with trio.CancelScope(shield=True):
            await self.ctx.pool.discard(self.exchanged.conn)
            if self.is_sse and not self.sink.gone:
                await self._send_sse_error("server_error",
                                           "the proxy is shutting down; stream aborted",
                                           "proxy_shutdown")
            await self.sink.abort()

    async def _send_sse_error(self, openai_type: str, message: str, code: str) -> None:
        """Best effort, one second at most: the client may be gone or stalled."""
        api = self.route.api
        type_ = "api_error" if api is Api.ANTHROPIC else openai_type
        with trio.move_on_after(1):
            try:
                await self.sink.send_data(sse_error_event(api, type_, message, code))
            except ClientGone:
                pass
