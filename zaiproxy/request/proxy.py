"""One proxied exchange: forward the request, relay the response as it arrives.

Relay rules (docs/architecture.md "One request", steps 5-8):
- status and headers go to the client as soon as upstream sends them;
- each network read from upstream becomes one client write: chunks that
  arrive apart stay apart, nothing is buffered whole, and a slow client
  slows the upstream reads down (TCP backpressure; one read in flight);
- the SSE parser watches the bytes (usage) without changing them;
- upstream lost mid-stream: SSE bodies end with an error event in the
  caller's API shape, then the client connection is closed without the final
  chunk, so a cut stream never looks like a short answer;
- the client gone or the request cancelled: the upstream connection is closed,
  never returned to the pool (it still carries the rest of the response).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
import trio

from zaiproxy.core.errors import Api, UpstreamError, UpstreamTimeout, sse_error_event
from zaiproxy.core.record import Usage
from zaiproxy.http.http11 import h11
from zaiproxy.request import gate
from zaiproxy.request.routing import Route
from zaiproxy.request.usage import StreamUsage, UsageTracker, stream_usage, usage_from_body
from zaiproxy.request.usage_rewrite import UsageChunkStripper, add_include_usage
from zaiproxy.upstream import zai
from zaiproxy.upstream.forward import (
    client_response_headers,
    header_value,
    upstream_request_headers,
)
from zaiproxy.upstream.pool import Origin, UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    from zaiproxy.request.context import WorkerContext
    from zaiproxy.request.gate import Ticket
    from zaiproxy.request.server import ClientConnection

# Non-streaming bodies are kept up to this size to read their usage; larger
# ones are relayed without it (LLM JSON responses are a few KB).
USAGE_BODY_LIMIT = 1 << 20

_UPSTREAM_FAILURES = (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                      OSError)


class ClientGone(Exception):
    """The client connection broke while we were writing to it."""


@dataclass(slots=True)
class Outcome:
    """What happened upstream, for the request log (and the recorder, later)."""

    upstream_status: int | None = None
    streamed: bool = False
    usage: Usage | None = None
    bytes_out: int = 0
    ttfb: float | None = None  # seconds from request start to response head from upstream
    result: str = "ok"  # ok | client_disconnected | upstream_cut | upstream_idle_timeout | cancelled
    retried: bool = False
    usage_estimated: bool = False  # usage counted from the deltas (upstream sent none)
    output_estimate: int = 0  # output tokens counted from the deltas so far
    zai_retries: int = 0  # Z.AI 429s retried
    zai_class: str | None = None  # class of the last Z.AI 429 (the final one if relayed)
    zai_code: str | None = None
    started: float = 0.0  # trio.current_time() when the request was handed to proxy()
    first_byte: float | None = None  # when the first response body byte was queued for the client
    upstream_s: float | None = None  # request sent upstream -> its response ended


async def proxy(
    ctx: WorkerContext,
    client: ClientConnection,
    route: Route,
    request: h11.Request,
    body: bytes,
    outcome: Outcome,
    ticket: Ticket | None = None,
) -> None:
    """Forward ``request`` and relay the response to ``client``; raises ProxyError before any byte is sent."""
    assert route.upstream is not None
    cfg = ctx.config
    origin = ctx.origins[route.upstream]
    added_usage = False
    if cfg.openai_include_usage and route.api is Api.OPENAI and route.reads_json:
        # Ask for usage on streams; the extra chunk is stripped for this client.
        rewritten = add_include_usage(body)
        if rewritten is not None:
            body, added_usage = rewritten, True
    headers = upstream_request_headers(
        request.headers,
        host=origin.host_header,
        client_ip=client.client_ip,
        api_key=ctx.api_key,
        anthropic_style=route.api is Api.ANTHROPIC,
        body_length=len(body) if body or request.method == b"POST" else None,
    )
    upstream_request = h11.Request(
        method=request.method, target=(origin.base_path + route.upstream_path).encode(),
        headers=headers,
    )
    pool = ctx.pool
    start = trio.current_time()
    outcome.started = start
    prefix = b""  # body bytes already read (a Z.AI 429 body, read to classify it)
    prefix_ended = False
    extra_headers: list[tuple[bytes, bytes]] = []
    throttle_epoch = -1  # this request counts once per evidence epoch as a throttled request
    while True:
        conn, response = await _exchange(ctx, origin, upstream_request, body, outcome)
        if response.status_code != 429:
            ctx.admitter.note_upstream()
            break
        # Z.AI 429: read a bounded prefix of the body, classify, maybe retry.
        try:
            prefix, prefix_ended = await _read_prefix(conn, zai.MAX_BODY, cfg.body_idle_timeout)
        except (trio.TooSlowError, *_UPSTREAM_FAILURES):
            await pool.discard(conn)
            raise UpstreamError("upstream connection failed while sending a 429 body") from None
        except BaseException:
            await pool.discard(conn)
            raise
        wall = ctx.wall()
        err = zai.classify(prefix, now=wall)
        outcome.zai_class, outcome.zai_code = err.cls.value, err.code
        ctx.metrics.zai_error(err.cls.value, err.code)
        # Only account throttles (1302, 1303, a 429 without a Z.AI code) are evidence for the
        # adaptive rate; 1305/1312 (Z.AI's capacity) and quotas only shape this request.
        throttle_epoch = ctx.admitter.note_upstream(
            err.cls.value if zai.feeds_adaptive(err.cls) else None, throttle_epoch)
        header_wait = zai.parse_retry_after(header_value(response.headers, b"retry-after"), now=wall)
        wait = ctx.retry_policy.next_wait(err, outcome.zai_retries, header_wait, now=wall,
                                          rand=ctx.jitter())
        if wait is None or client.gone:
            extra_headers = zai.final_headers(err, list(response.headers), now=wall)
            break
        if prefix_ended:
            await pool.release(conn)
        else:
            await pool.discard(conn)
        outcome.zai_retries += 1
        ctx.metrics.retry(err.cls.value)
        # Inside the exchange's cancel scope: a client that leaves ends the wait.
        await ctx.retry_sleep(wait)
        if ticket is not None:
            await gate.readmit(ctx, ticket)  # each retry is admitted again (may raise a 429)
        prefix, prefix_ended = b"", False

    outcome.upstream_status = response.status_code
    outcome.ttfb = trio.current_time() - start
    content_type = header_value(response.headers, b"content-type") or b""
    is_sse = content_type.startswith(b"text/event-stream")
    outcome.streamed = is_sse
    tracker = (UsageTracker(route.api.value, count_deltas=cfg.token_counting)
               if is_sse else None)
    stripper = UsageChunkStripper() if is_sse and added_usage else None
    keep_body = (not is_sse and response.status_code == 200 and route.reads_json
                 and request.method != b"HEAD")
    kept: list[bytes] = []
    kept_len = 0

    try:
        # The head is queued, not written: if the body (or all of it) came in
        # the same upstream read, head, body and end go out in one write
        # (each send_all costs 15-20 us, measured here). Nothing waits for it:
        # before any wait on upstream, whatever is queued is flushed.
        headers = client_response_headers(response.headers, client.request_id)
        if extra_headers:
            headers.extend(extra_headers)
        client.queue_response(response.status_code, headers, response.reason)
        idle = cfg.body_idle_timeout
        # The idle timeout: the pool's watchdog closes the connection when the deadline
        # set before each wait passes (UpstreamPool.watch_idle; no cancel scope per event).
        pool.watch(conn)
        while True:
            try:
                if prefix or prefix_ended:
                    data, ended, prefix, prefix_ended = prefix, prefix_ended, b"", False
                else:
                    data, ended = conn.read_available()
                if not data and not ended:
                    await client.flush()  # a slow client is not an idle upstream: no deadline
                    conn.idle_deadline = trio.current_time() + idle
                    data, ended = await conn.read_more()
                    conn.idle_deadline = math.inf
            except _UPSTREAM_FAILURES as exc:
                if tracker is not None:
                    _apply_stream_usage(outcome, tracker.usage_estimated())
                if conn.idle_expired:
                    outcome.result = "upstream_idle_timeout"
                    why = f"upstream sent nothing for {idle:g} s; stream aborted"
                else:
                    outcome.result = "upstream_cut"
                    why = f"upstream connection lost mid-response: {_why(exc)}"
                await _cut(ctx, client, conn, route, is_sse, why)
                return
            if ended:
                outcome.upstream_s = trio.current_time() - start
                # Back to the pool before the last write: the upstream exchange
                # is complete whatever the client does next, and a client that
                # sends its next request at once finds the connection idle.
                await pool.release(conn)
            if data:
                if tracker is not None:
                    tracker.feed(data)
                    if stripper is not None:
                        data = stripper.feed(data)
                elif keep_body and kept_len < USAGE_BODY_LIMIT:
                    kept.append(data)
                    kept_len += len(data)
                if data:
                    if outcome.first_byte is None:
                        outcome.first_byte = trio.current_time()
                    outcome.bytes_out += len(data)
                    client.queue_data(data)
            if ended:
                if stripper is not None:
                    tail = stripper.close()
                    if tail:
                        outcome.bytes_out += len(tail)
                        client.queue_data(tail)
                client.queue_end()
                break
            await client.flush()
    except ClientGone:
        outcome.result = "client_disconnected"
        if tracker is not None:
            _apply_stream_usage(outcome, tracker.usage_estimated())
        await pool.discard(conn)
        return
    except trio.Cancelled:
        outcome.result = "cancelled" if not client.gone else "client_disconnected"
        if tracker is not None:
            # What was generated before the cut is billed by upstream: count it.
            _apply_stream_usage(outcome, tracker.usage_estimated())
        await _on_cancel(client, conn, route, is_sse, pool)
        raise
    except BaseException:
        await pool.discard(conn)
        raise

    if tracker is not None:
        tracker.close()
        if cfg.token_counting:
            _apply_stream_usage(outcome, await stream_usage(tracker))
        else:
            outcome.usage = tracker.usage  # upstream's report only; nothing to count
    elif kept and kept_len <= USAGE_BODY_LIMIT:
        outcome.usage = usage_from_body(route.api.value, b"".join(kept))
    await client.flush()


async def _exchange(ctx: WorkerContext, origin: Origin, upstream_request: h11.Request, body: bytes,
                    outcome: Outcome) -> tuple[UpstreamConnection, h11.Response]:
    """Send the request and wait for the response head.

    One retry on a fresh connection when a pooled connection fails before any
    response byte (the upstream closed it while idle and we raced its FIN).
    """
    cfg = ctx.config
    pool = ctx.pool
    for attempt in (0, 1):
        conn, reused = await pool.acquire(origin, fresh=attempt > 0)
        try:
            await conn.send_request(upstream_request, body)
            # A bare CancelScope: trio.fail_after wraps one in two generator-based context
            # managers, ~3% of a small request's CPU (py-spy).
            with trio.CancelScope(
                    deadline=trio.current_time() + cfg.response_header_timeout) as waiting:
                event = await conn.next_event()
                while type(event) is h11.InformationalResponse:
                    event = await conn.next_event()
            if waiting.cancelled_caught:
                raise trio.TooSlowError
        except trio.TooSlowError:
            await pool.discard(conn)
            raise UpstreamTimeout(
                f"upstream sent no response headers within {cfg.response_header_timeout:g} s"
            ) from None
        except _UPSTREAM_FAILURES as exc:
            await pool.discard(conn)
            if reused and conn.received_bytes == 0 and attempt == 0:
                outcome.retried = True
                continue
            raise UpstreamError(f"upstream connection failed before the response: {_why(exc)}") from None
        except BaseException:
            await pool.discard(conn)
            raise
        if type(event) is not h11.Response:
            await pool.discard(conn)
            raise UpstreamError("upstream closed the connection without a response")
        return conn, event
    raise AssertionError("unreachable")


async def _read_prefix(conn: UpstreamConnection, limit: int, idle: float) -> tuple[bytes, bool]:
    """Up to ``limit`` body bytes (more if one read brings more); True if the body ended."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        data, ended = conn.read_available()
        if not data and not ended:
            with trio.fail_after(idle):
                data, ended = await conn.read_body()
        if data:
            parts.append(data)
            size += len(data)
        if ended:
            return b"".join(parts), True
    return b"".join(parts), False


def _apply_stream_usage(outcome: Outcome, result: StreamUsage | None) -> None:
    """Upstream's final usage, else output counted from the deltas (input filled in by the gate)."""
    if result is None:
        return
    outcome.usage = result.usage
    outcome.usage_estimated = result.estimated
    if result.estimated:
        outcome.output_estimate = result.usage.output_tokens


async def _cut(ctx: WorkerContext, client: ClientConnection, conn: UpstreamConnection,
               route: Route, is_sse: bool, message: str) -> None:
    """Upstream failed after the response started: tell SSE clients, then close without a clean end."""
    ctx.metrics.upstream_error("stream_cut")
    await ctx.pool.discard(conn)
    if is_sse:
        await _send_sse_error(client, route, "upstream_error", message, "upstream_stream_cut")
    await client.abort()


async def _on_cancel(client: ClientConnection, conn: UpstreamConnection, route: Route,
                     is_sse: bool, pool: UpstreamPool) -> None:
    """Cancelled mid-relay (drain deadline or client gone): close upstream, tell a live SSE client."""
    with trio.CancelScope(shield=True):
        await pool.discard(conn)
        if is_sse and not client.gone:
            await _send_sse_error(client, route, "server_error",
                                  "the proxy is shutting down; stream aborted", "proxy_shutdown")
        await client.abort()


async def _send_sse_error(client: ClientConnection, route: Route, openai_type: str,
                          message: str, code: str) -> None:
    """Best effort, one second at most: the client may be gone or stalled."""
    type_ = "api_error" if route.api is Api.ANTHROPIC else openai_type
    with trio.move_on_after(1):
        try:
            await client.send_data(sse_error_event(route.api, type_, message, code))
        except ClientGone:
            pass


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def parse_json_body(body: bytes) -> dict[str, object]:
    """The request JSON object (for model/stream and, later, token estimates)."""
    value = orjson.loads(body)
    if not isinstance(value, dict):
        raise ValueError("the request body must be a JSON object")
    return value
