"""The trio shell of the mock upstream: accept, parse with h11, execute the plan.

Everything about *what* to send is decided by pure code
(:func:`~zaiproxy.mock.behaviour.plan_response`,
:func:`~zaiproxy.mock.wire.build_schedule`); this module only owns sockets and
timers (the hypercorn split). Per connection it loops: read one request with
h11, plan, sleep/write as scheduled, then keep the connection alive, close it
(FIN), reset it (RST) or stall until the peer leaves. The delayed writes of
plain-TCP connections (paced streams) are sent by one :class:`~zaiproxy.mock.pacer.Pacer`
task per ``serve_mock``, not by the connection's task.

h11 is used for parsing only. Its writer and state machine would want to see
the response; we write prebuilt bytes instead (see :mod:`~zaiproxy.mock.wire`)
and start a fresh ``h11.Connection`` for the next request on the connection,
seeded with the bytes the previous one had buffered (pipelining keeps working).
A new connection object costs ~2 us; sending the response through h11 just to
advance its state would cost more than the rest of a small response.

The only state (:mod:`~zaiproxy.mock.stats`) is one :class:`MockState` per
``serve_mock``: request statistics (``GET /mock/stats``, ``POST
/mock/stats/reset``, answered here and never counted), the per-key counts
behind ``x-mock-fail-times`` and the accounts' quota usage
(:mod:`~zaiproxy.mock.quota`: Z.AI's quota endpoint and ``/mock/quota``, also
answered here and not counted as traffic; a generation's tokens are charged to
its key's account when its answer is planned).
"""

from __future__ import annotations

import functools
import socket
import ssl
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Final

import h11
import orjson
import trio

from zaiproxy.http.netstream import FastSocketStream, lingering_close
from zaiproxy.mock import payloads
from zaiproxy.mock.behaviour import (
    MockOptions,
    MockRequest,
    ResponsePlan,
    error_plan,
    json_plan,
    plan_response,
)
from zaiproxy.mock.controls import ControlError, fail_key
from zaiproxy.mock.pacer import Pacer, next_due
from zaiproxy.mock.quota import QuotaBook, account_key, is_quota_route
from zaiproxy.mock.quota import handle as quota_reply
from zaiproxy.mock.stats import STATS_PATH, STATS_RESET_PATH, MockState, MockStats, is_stats_path
from zaiproxy.mock.wire import CONTINUE, Ending, Schedule, build_schedule
from zaiproxy.run.sockets import bind_reuseport, format_addr, trio_listener

RECEIVE_SIZE = 65536
# A graceful close waits this long for the peer's FIN, so that unread request
# bytes (e.g. after a 413) do not turn our close into an RST before the client
# has read the response (the "lingering close" of Apache and nginx).
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 1 << 20


class ScheduleCache:
    """A bounded memo of ``build_schedule(plan_response(request, options))``.

    The answer is a pure function of the request, and a benchmark repeats the
    same request, so planning it again each time is wasted work. Measured with
    wrk (-t1 -c16, small chat JSON, one process): ~125 us of CPU per request
    without the memo, ~70 us with it (~7k -> ~12k req/s). Only small requests
    and responses are kept, so the memo stays below ~20 MiB; the oldest entry
    goes first when it is full. Requests that differ in any header (a proxy's
    own request ids, say) simply miss and are planned as usual.
    """

    MAX_ENTRIES = 256
    MAX_BODY = 16 << 10
    MAX_RESPONSE = 64 << 10

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self._entries: dict[MockRequest, tuple[Schedule, int]] = {}

    def schedule(self, request: MockRequest, seen: int | None = None) -> Schedule:
        """The schedule for ``request``; ``seen`` (its x-mock-fail-key count, see
        ``plan_response``) makes the answer depend on more than the request: no memo."""
        return self.planned(request, seen)[0]

    def planned(self, request: MockRequest, seen: int | None = None) -> tuple[Schedule, int]:
        """The schedule and the tokens the answer bills (``ResponsePlan.tokens``)."""
        if seen is not None:
            plan = plan_response(request, self.options, seen=seen)
            return build_schedule(plan), plan.tokens
        entry = self._entries.get(request)
        if entry is None:
            plan = plan_response(request, self.options)
            entry = build_schedule(plan), plan.tokens
            if len(request.body) <= self.MAX_BODY and _size(entry[0]) <= self.MAX_RESPONSE:
                if len(self._entries) >= self.MAX_ENTRIES:
                    del self._entries[next(iter(self._entries))]
                self._entries[request] = entry
        return entry


def _size(schedule: Schedule) -> int:
    return sum(len(write.data) for write in schedule.writes)


async def serve_mock(
    listeners: list[trio.SocketListener],
    options: MockOptions,
    ssl_context: ssl.SSLContext | None = None,
    *,
    quota: QuotaBook | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the mock on ``listeners`` until cancelled; reports the listeners when ready.
    ``quota``: the accounts' quota state (shared by the workers of ``run``; a test's
    with its own clock); by default one of this server's own, from ``options``."""
    cache = ScheduleCache(options)
    pacer = Pacer()
    own = quota is None
    state = MockState(quota=QuotaBook.from_options(options) if quota is None else quota)
    handler = functools.partial(
        _handle_connection, cache=cache, state=state, pacer=pacer, ssl_context=ssl_context
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pacer.run)
            await trio.serve_listeners(handler, listeners, task_status=task_status)
    finally:
        if own:
            state.quota.close()


async def serve_mock_tcp(
    options: MockOptions,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    *,
    quota: QuotaBook | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind ``host:port`` (0 = a free port), serve, and report ``(host, port)`` when ready."""
    sock = bind_reuseport(host, port, 1)[0]
    address = format_addr(sock)
    listener = trio_listener(sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(serve_mock, [listener], options, ssl_context, quota=quota)
        )
        task_status.started(address)


async def _handle_connection(
    accepted: trio.SocketStream,
    *,
    cache: ScheduleCache,
    state: MockState,
    pacer: Pacer,
    ssl_context: ssl.SSLContext | None,
) -> None:
    # FastSocketStream: no scheduler round trip after a send that completes at once, and
    # a plain socket the pacer can send on (see zaiproxy.mock.pacer).
    try:
        stream = FastSocketStream.from_trio(accepted)
    except OSError:  # the peer is already gone
        await trio.aclose_forcefully(accepted)
        return
    conn: trio.abc.Stream = stream
    if ssl_context is not None:
        # https_compatible: HTTPS clients usually close without close_notify.
        conn = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
    ending: Ending | None = None  # stays None when the peer left, on a bug or on shutdown
    try:
        ending = await _serve_requests(conn, cache, state, pacer)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer went away; nothing to tell it
    except Exception:
        # A bug in the mock must not take the whole listener down mid-benchmark.
        traceback.print_exc(file=sys.stderr)
    finally:
        if ending is None:
            await trio.aclose_forcefully(conn)
        else:
            await _finish(stream, conn, ending)


async def _finish(transport: FastSocketStream, conn: trio.abc.Stream, ending: Ending) -> None:
    if ending is Ending.RESET:
        # SO_LINGER {on, 0 s}: close() discards unsent data and sends RST instead of FIN.
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await transport.aclose()  # under TLS too: no close_notify, just the reset
        return
    if conn is transport:
        await lingering_close(transport, seconds=LINGER_SECONDS, max_bytes=LINGER_MAX_BYTES)
    with trio.move_on_after(LINGER_SECONDS):
        await conn.aclose()  # if cancelled, aclose still closes (forcefully)


class _InFlight:
    """One request's entry in the statistics: counted when its head arrives, out of
    flight in the ``finally`` that follows its response, whatever ended it (written,
    peer gone, a bug, cancellation at shutdown)."""

    __slots__ = ("counted", "stats")

    def __init__(self, stats: MockStats) -> None:
        self.stats = stats
        self.counted = False

    def head(self, target: bytes, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        path = target.split(b"?", 1)[0]
        if is_stats_path(path) or is_quota_route(path):
            return  # reading the statistics must not change them; quota polls are not traffic
        self.stats.started(path, _fail_key(headers))
        self.counted = True

    def done(self) -> None:
        if self.counted:
            self.counted = False
            self.stats.finished()


def _fail_key(headers: tuple[tuple[bytes, bytes], ...]) -> str | None:
    for name, value in headers:
        if name == b"x-mock-fail-key":
            try:
                return fail_key(value)
            except ControlError:
                return None  # plan_response answers 400 for it
    return None


async def _serve_requests(
    stream: trio.abc.Stream, cache: ScheduleCache, state: MockState, pacer: Pacer
) -> Ending:
    buffered, peer_closed = b"", False
    while True:
        parser = h11.Connection(h11.SERVER)
        if buffered:
            parser.receive_data(buffered)
        if peer_closed:
            parser.receive_data(b"")
        flight = _InFlight(state.stats)
        try:
            request = await _read_request(stream, parser, cache.options.max_body_bytes, flight.head)
            if request is None:
                return Ending.CLOSE
            if isinstance(request, ResponsePlan):
                schedule = build_schedule(request)
            else:
                schedule = _schedule(request, cache, state)
            ending = await _execute(stream, schedule, pacer)
        finally:
            flight.done()
        if ending is not Ending.KEEP_ALIVE:
            return ending
        buffered, peer_closed = parser.trailing_data


def _schedule(request: MockRequest, cache: ScheduleCache, state: MockState) -> Schedule:
    path = request.target.split(b"?", 1)[0]
    if is_stats_path(path):
        return build_schedule(_stats_reply(request, path.rstrip(b"/"), state))
    if is_quota_route(path):
        return build_schedule(quota_reply(request, state.quota, cache.options))
    if _QUOTA_ENFORCE in request.headers:  # a spent account gets Z.AI's 1308 (opt-in)
        reset = state.quota.spent(account_key(request.headers))
        if reset is not None:
            return build_schedule(json_plan(request, 429, payloads.quota_spent(reset)))
    key = _fail_key(request.headers)
    schedule, tokens = cache.planned(request, None if key is None else state.failures.hit(key))
    if tokens:
        state.quota.charge(account_key(request.headers), tokens)
    return schedule


# ``x-mock-quota-enforce: 1``: the request is refused like Z.AI does once its account's
# quota is spent (1308 with the reset time). Opt-in: benchmarks spend far more than an
# account's allowance and must not be refused.
_QUOTA_ENFORCE: Final = (b"x-mock-quota-enforce", b"1")


def _stats_reply(request: MockRequest, path: bytes, state: MockState) -> ResponsePlan:
    stats = state.stats
    if path == STATS_PATH and request.method in (b"GET", b"HEAD"):
        return json_plan(request, 200, _stats_json(state))
    if path == STATS_RESET_PATH and request.method == b"POST":
        stats.reset()  # the quota's usage stays: it is the accounts' state, not a count
        return json_plan(request, 200, _stats_json(state))
    allow = b"GET, HEAD" if path == STATS_PATH else b"POST"
    message = f"{request.method.decode('latin-1')} not allowed on {path.decode('latin-1')}"
    return json_plan(request, 405, payloads.openai_error(405, message), ((b"allow", allow),))


def _stats_json(state: MockState) -> bytes:
    return orjson.dumps({**state.stats.snapshot(), "quota": state.quota.snapshot()})


async def _read_request(
    stream: trio.abc.Stream,
    parser: h11.Connection,
    max_body: int,
    on_head: Callable[[bytes, tuple[tuple[bytes, bytes], ...]], None],
) -> MockRequest | ResponsePlan | None:
    """The next request; a ResponsePlan to send instead (bad HTTP, too large); None at EOF.
    ``on_head`` is told the target and headers as soon as the head is parsed."""
    request: h11.Request | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: list[bytes] = []
    size = 0
    sent_continue = False
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            return error_plan(exc.error_status_hint, f"bad request: {exc}")
        if event is h11.NEED_DATA:
            if (
                request is not None
                and parser.they_are_waiting_for_100_continue
                and not sent_continue
            ):
                await stream.send_all(CONTINUE)
                sent_continue = True
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return None  # EOF, between requests or in the middle of one
            parser.receive_data(bytes(data))  # a no-op for bytes, which SocketStream returns
        elif isinstance(event, h11.Request):
            request = event
            # Copied once: iterating h11's Headers goes through Sequence.__getitem__.
            headers = tuple(event.headers)
            on_head(event.target, headers)
            length = _content_length(headers)
            if length is not None and length > max_body:
                return _too_large(max_body)
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_body:
                return _too_large(max_body)
            body.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return MockRequest(
                request.method,
                request.target,
                request.http_version,
                headers,
                b"".join(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _content_length(headers: tuple[tuple[bytes, bytes], ...]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return None


def _too_large(max_body: int) -> ResponsePlan:
    return error_plan(413, f"request body exceeds {max_body} bytes")


async def _execute(stream: trio.abc.Stream, schedule: Schedule, pacer: Pacer) -> Ending:
    writes = schedule.writes
    # When the write before the next one was due: delays count from there (see pacer).
    due = trio.current_time()
    index = 0
    while index < len(writes):
        write = writes[index]
        if write.delay > 0:
            if isinstance(stream, FastSocketStream):
                index, due = await pacer.write(stream, writes, index, due)
                continue
            due = next_due(due, write.delay, trio.current_time())
            await trio.sleep_until(due)
        if write.data:
            await stream.send_all(write.data)
        index += 1
    if schedule.ending is Ending.STALL:
        # Hold the connection open, discarding input, until the peer closes it.
        while await stream.receive_some(RECEIVE_SIZE):
            pass
        return Ending.CLOSE
    return schedule.ending
