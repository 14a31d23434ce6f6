"""The native stream pump (``zaiproxy._native._pump``) against the relay's own loop, its twin.

The pump does, per upstream read, what the relay's Python loop does (``Dechunker`` -> stream
scanner -> ``frame_chunk`` -> one client write), in one C call per wait. Here:

- read by read over real sockets, the pump's client bytes equal the twin's (the pure-Python
  Dechunker, ``UsageTracker``, ``frame_chunk``) for real-looking OpenAI / Z.AI / Anthropic
  streams chunked at random sizes, with extensions and trailers, split at random points;
  both see the same usage and hand h11 the same ``tail``;
- a full client socket stops the upstream reads (backpressure), a burst of ready reads
  yields, a closed or reset socket is an error and never a read of a reused descriptor;
- through a real proxy: chunked SSE streams take the pump and arrive byte-identical to the
  twin's (``netstream.PUMP`` off), including a cut, an idle stall and a client that stops
  reading.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import h11
import orjson
import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zaiproxy._native import _framing, _framing_py, _pump

from tests.harness import UPSTREAM_KEY, RawClient, make_config, request, start_mock, start_proxy
from tests.test_relay_native import ENDINGS, STREAMS, Api, cut, stream_bytes
from tests.test_tlsstream import tls_pair
from zaiproxy.http import netstream
from zaiproxy.http.tlsstream import TLSStream
from zaiproxy.request import relay as relay_module
from zaiproxy.request.scanner import NativeUsageTracker
from zaiproxy.request.usage import UsageTracker

# `make test` runs the suite twice (h11, then h11-mypyc); the pump bypasses the HTTP codec for
# bodies (heads are tested by test_relay): run once.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="independent of the HTTP implementation")

needs_pump = pytest.mark.skipif(not netstream.PUMP, reason="ZAIPROXY_RELAY=python: no pump")


def test_the_pump_is_loaded_with_the_native_relay() -> None:
    # The relay's switch (ZAIPROXY_RELAY) decides, in netstream, once.
    assert netstream.PUMP is (os.environ.get("ZAIPROXY_RELAY", "native") == "native")
    assert _pump.IMPLEMENTATION == "native"


# ---- the pump alone, over socket pairs -----------------------------------------------------


def chunk_body(body: bytes, sizes: list[int], *, ext: bool, trailer: bytes) -> bytes:
    """``body`` as chunks of the given sizes (cycled), then the last chunk and trailers."""
    out, at, i = [], 0, 0
    while at < len(body):
        n = max(1, sizes[i % len(sizes)])
        part = body[at:at + n]
        out.append(b"%x%s\r\n%s\r\n" % (len(part), b";i=%d" % i if ext else b"", part))
        at += n
        i += 1
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


def drain(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


class Pair:
    """Upstream writer -> (up) pump (down) -> client reader, on two Unix stream socket pairs:
    one ``send`` is one ``recv`` on the other side, so reads are exactly the pieces sent."""

    def __init__(self) -> None:
        self.upstream, self.up = socket.socketpair()
        self.down, self.client = socket.socketpair()

    def close(self) -> None:
        for s in (self.upstream, self.up, self.down, self.client):
            s.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def run_both(api: Api, pieces: list[bytes], strip: bool) -> None:
    """Each piece through the pump and through the twin: the same client bytes after every
    read, the same end, the same tail and the same usage."""
    p = Pair()
    try:
        native = NativeUsageTracker(api, strip_usage=strip)
        twin = UsageTracker(api, strip_usage=strip)
        dechunk = _framing.Dechunker(1 << 16)
        twin_dechunk = _framing_py.Dechunker(1 << 16)
        pump = _pump.Pump(p.up, p.down, dechunk, native.feed)
        body_bytes = received = 0
        for piece in pieces:
            p.upstream.sendall(piece)
            received += len(piece)
            what = pump.step()
            body = twin_dechunk.feed(piece)
            if body:
                body = twin.feed(body)
            body_bytes += len(body)
            assert drain(p.client) == _framing_py.frame_chunk(body)
            if twin_dechunk.ended:
                assert what == _pump.END
                assert dechunk.tail == twin_dechunk.tail
                break
            assert what == _pump.READ
        else:
            raise AssertionError("the body never ended")
        assert (pump.body_bytes, pump.received) == (body_bytes, received)
        assert native.close() == twin.close()
        assert (native.usage, native.usage_estimated(), native.events) == (
            twin.usage, twin.usage_estimated(), twin.events)
    finally:
        p.close()


@pytest.mark.parametrize("strip", [False, True], ids=["plain", "strip"])
@pytest.mark.parametrize("name", STREAMS)
def test_every_stream_read_by_read(name: str, strip: bool) -> None:
    api = STREAMS[name][0]
    raw = chunk_body(stream_bytes(name, b"\n", False), [37, 5, 120], ext=True,
                     trailer=b"x-trace: 1\r\n")
    run_both(api, cut(raw, list(range(7, len(raw), 61))), strip)


@pytest.mark.parametrize("name", ["openai-include-usage", "anthropic"])
def test_a_cut_at_every_byte(name: str) -> None:
    # Two reads, the second starting at each byte of the chunked body in turn (chunk size
    # lines, extensions, data, CRLFs, the last chunk and the trailers all get split).
    api = STREAMS[name][0]
    raw = chunk_body(stream_bytes(name, b"\r\n", False), [64, 9], ext=True,
                     trailer=b"x-t: 1\r\n")
    for at in range(1, len(raw)):
        run_both(api, [raw[:at], raw[at:]], strip=name.startswith("openai"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(STREAMS)), ending=st.sampled_from(sorted(ENDINGS)),
       sizes=st.lists(st.integers(1, 400), min_size=1, max_size=6), ext=st.booleans(),
       strip=st.booleans(), data=st.data())
def test_random_chunks_and_splits(name: str, ending: str, sizes: list[int], ext: bool,
                                  strip: bool, data: st.DataObject) -> None:
    api = STREAMS[name][0]
    raw = chunk_body(stream_bytes(name, ENDINGS[ending], False), sizes, ext=ext,
                     trailer=data.draw(st.sampled_from([b"", b"x-a: 1\r\nx-b: 2\r\n"])))
    points = data.draw(st.lists(st.integers(1, len(raw) - 1), max_size=40))
    run_both(api, cut(raw, points), strip)


def test_the_tail_is_what_h11_needs_to_finish(pair: Pair) -> None:
    # The read holding the last chunk also holds trailers and the next response's first
    # bytes: all of it, from the size line on, is the tail h11 is handed.
    dechunk = _framing.Dechunker()
    pump = _pump.Pump(pair.up, pair.down, dechunk, lambda b: b)
    pair.upstream.sendall(b"5\r\nhello\r\n0\r\nx-t: 1\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert pump.step() == _pump.END
    assert dechunk.tail == b"0\r\nx-t: 1\r\n\r\nHTTP/1.1 200 OK\r\n"
    assert drain(pair.client) == b"5\r\nhello\r\n"
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert type(conn.next_event()) is h11.Response
    conn.receive_data(dechunk.tail)
    assert type(conn.next_event()) is h11.EndOfMessage
    assert conn.their_state is h11.DONE
    conn.start_next_cycle()  # bytes after the message stay in h11's buffer
    assert conn.trailing_data == (b"HTTP/1.1 200 OK\r\n", False)


def test_upstream_closing_inside_the_body_is_eof(pair: Pair) -> None:
    pump = _pump.Pump(pair.up, pair.down, _framing.Dechunker(), lambda b: b)
    pair.upstream.sendall(b"5\r\nhel")
    assert pump.step() == _pump.READ
    pair.upstream.shutdown(socket.SHUT_WR)
    assert pump.step() == _pump.EOF
    assert drain(pair.client) == b"3\r\nhel\r\n"


def test_bad_framing_raises_the_dechunkers_error(pair: Pair) -> None:
    pump = _pump.Pump(pair.up, pair.down, _framing.Dechunker(), lambda b: b)
    pair.upstream.sendall(b"zz\r\n")
    with pytest.raises(_framing.FramingError, match="not a hex digit"):
        pump.step()


def test_a_full_client_socket_stops_the_upstream_reads(pair: Pair) -> None:
    # Backpressure: once the client's socket is full, step() says WRITE and reads nothing
    # more from upstream until the pending chunk is out.
    pair.down.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pump = _pump.Pump(pair.up, pair.down, _framing.Dechunker(), lambda b: b)
    block = b"x" * 60000
    wire = b"%x\r\n%s\r\n" % (len(block), block)
    sent = b""
    what = _pump.READ
    while what == _pump.READ:
        pair.upstream.sendall(wire)
        sent += block
        what = pump.step()
    assert what == _pump.WRITE
    received = pump.received
    pair.upstream.sendall(wire)  # more is ready upstream, but must wait
    sent += block
    assert pump.step() == _pump.WRITE
    assert pump.received == received
    assert pump.pending_bytes > 0
    got = bytearray()
    while pump.pending_bytes or pump.received < len(wire) * (len(sent) // len(block)):
        got += drain(pair.client)
        pump.step()
    got += drain(pair.client)
    assert got == b"".join(wire for _ in range(len(sent) // len(block)))


def test_a_burst_of_ready_reads_yields(pair: Pair) -> None:
    # More than two reads (64 KiB each) are ready: with burst=2 the step returns YIELD after
    # two, and the next step reads the rest.
    for s in (pair.upstream, pair.down):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    for s in (pair.up, pair.client):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    block = b"y" * 60000
    wire = b"%x\r\n%s\r\n" % (len(block), block) * 3
    pair.upstream.sendall(wire)
    pump = _pump.Pump(pair.up, pair.down, _framing.Dechunker(), lambda b: b, burst=2)
    assert pump.step() == _pump.YIELD
    assert pump.received == 2 * 65536
    assert pump.step() == _pump.READ
    assert pump.received == len(wire)
    out = _framing_py.Dechunker()
    assert out.feed(drain(pair.client)) == block * 3
    with pytest.raises(ValueError, match="burst"):
        _pump.Pump(pair.up, pair.down, _framing.Dechunker(), lambda b: b, burst=0)


def test_a_closed_socket_is_an_error_not_a_reused_descriptor(pair: Pair) -> None:
    pump = _pump.Pump(pair.up, pair.down, _framing.Dechunker(), lambda b: b)
    pair.up.close()
    with pytest.raises(_pump.UpstreamFailed) as up:
        pump.step()
    assert up.value.errno == errno.EBADF
    other = socket.socketpair()  # would reuse the closed number
    try:
        pump = _pump.Pump(other[0], pair.down, _framing.Dechunker(), lambda b: b)
        pair.down.close()
        with pytest.raises(_pump.ClientFailed) as down:
            pump.step()
        assert down.value.errno == errno.EBADF
    finally:
        other[0].close()
        other[1].close()


def test_a_client_gone_is_a_client_error(pair: Pair) -> None:
    pump = _pump.Pump(pair.up, pair.down, _framing.Dechunker(), lambda b: b)
    pair.client.close()
    pair.upstream.sendall(b"3\r\nabc\r\n")
    with pytest.raises(_pump.ClientFailed) as gone:
        pump.step()
    assert gone.value.errno in (errno.EPIPE, errno.ECONNRESET)


# ---- over TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def tls_session(ca: trustme.CA) -> tuple[TLSStream, TLSStream]:
    client, server = tls_pair(ca)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


@pytest.mark.parametrize("name", ["openai-include-usage", "zai-anthropic"])
async def test_tls_records_relayed_as_the_twin_relays_them(ca: trustme.CA, name: str) -> None:
    # Each record the server sends is decrypted by the pump and relayed as one chunk, as
    # the relay's loop (TLSStream.receive_some, one record per read) does.
    api = STREAMS[name][0]
    raw = chunk_body(stream_bytes(name, b"\n", False), [50, 7, 300], ext=False,
                     trailer=b"x-t: 1\r\n")
    pieces = cut(raw, list(range(13, len(raw), 97)))
    client, server = await tls_session(ca)
    down, reader = socket.socketpair()
    try:
        native, twin = NativeUsageTracker(api), UsageTracker(api)
        dechunk, twin_dechunk = _framing.Dechunker(), _framing_py.Dechunker()
        pump = _pump.Pump(client.transport_stream.socket, down, dechunk, native.feed, tls=client)
        what = _pump.READ
        for piece in pieces:
            await server.send_all(piece)
            body = twin_dechunk.feed(piece)
            want = _framing_py.frame_chunk(twin.feed(body) if body else b"")
            got = b""
            with trio.fail_after(5):
                while len(got) < len(want) or (twin_dechunk.ended and what != _pump.END):
                    what = pump.step()
                    got += drain(reader)
                    if what == _pump.READ:
                        await trio.sleep(0.001)
            assert got == want
            if twin_dechunk.ended:
                break
        assert what == _pump.END and dechunk.tail == twin_dechunk.tail
        assert not client.buffered()
        assert (native.usage, native.events) == (twin.usage, twin.events)
    finally:
        down.close()
        reader.close()
        await client.aclose()
        await server.aclose()


async def test_tls_output_while_reading_hands_the_stream_back(ca: trustme.CA) -> None:
    # Whatever the session wants to send while reading (a KeyUpdate's answer) is the
    # caller's: the pump relays what it decrypted, then says HANDOFF.
    client, server = await tls_session(ca)
    down, reader = socket.socketpair()
    try:
        pump = _pump.Pump(client.transport_stream.socket, down, _framing.Dechunker(),
                          lambda b: b, tls=client)
        await server.send_all(b"3\r\nabc\r\n")
        await trio.sleep(0.05)
        assert pump.step() == _pump.READ
        assert drain(reader) == b"3\r\nabc\r\n"
        await server.send_all(b"3\r\ndef\r\n")
        await trio.sleep(0.05)
        client.outgoing.write(b"pending TLS bytes")
        assert pump.step() == _pump.HANDOFF
        assert drain(reader) == b""  # the rest is the caller's, still in the socket
        assert client.ssl_object.pending() == 0
        sock = client.transport_stream.socket
        assert sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # unread record
    finally:
        down.close()
        reader.close()
        await client.aclose()
        await server.aclose()


# ---- the hub: many pumps, one wait -----------------------------------------------------------


def test_the_hub_relays_every_ready_stream_in_one_call() -> None:
    pairs = [Pair() for _ in range(3)]
    hub = _pump.Hub()
    try:
        pumps = [_pump.Pump(p.up, p.down, _framing.Dechunker(), lambda b: b) for p in pairs]
        for pump in pumps:
            hub.add(pump)
        assert len(hub) == 3
        assert hub.run() == []  # nothing ready
        pairs[0].upstream.sendall(b"3\r\nabc\r\n")
        pairs[2].upstream.sendall(b"2\r\nxy\r\n0\r\n\r\n")
        given_back = hub.run()
        assert given_back == [pumps[2]]
        assert pumps[2].result == _pump.END
        assert len(hub) == 2  # the ended one left; the others wait on
        assert drain(pairs[0].client) == b"3\r\nabc\r\n"
        assert drain(pairs[2].client) == b"2\r\nxy\r\n"
        assert drain(pairs[1].client) == b""
        with pytest.raises(ValueError, match="already in a hub"):
            hub.add(pumps[0])
        hub.discard(pumps[0])
        hub.discard(pumps[0])  # twice: nothing
        pairs[0].upstream.sendall(b"1\r\nz\r\n")
        assert hub.run() == []
        assert drain(pairs[0].client) == b""  # discarded: not relayed
        assert len(hub) == 1
    finally:
        hub.close()
        for p in pairs:
            p.close()


def test_the_hub_takes_what_is_left_on_its_next_run() -> None:
    # Level-triggered: a read that filled the buffer is followed by another in the same
    # run; a short one ends the pump's turn, and what came after it is read next run.
    p = Pair()
    for s in (p.upstream, p.down):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    for s in (p.up, p.client):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    hub = _pump.Hub()
    try:
        pump = _pump.Pump(p.up, p.down, _framing.Dechunker(), lambda b: b)
        hub.add(pump)
        block = b"q" * 50000
        wire = b"%x\r\n%s\r\n" % (len(block), block) * 4
        p.upstream.sendall(wire)
        assert hub.run() == []
        assert pump.received == len(wire)  # 64 KiB, 64 KiB, then the short rest
        p.upstream.sendall(b"1\r\nz\r\n")
        assert hub.run() == []
        assert _framing_py.Dechunker().feed(drain(p.client)) == block * 4 + b"z"
    finally:
        hub.close()
        p.close()


def test_the_hub_gives_back_a_full_client_and_a_failure() -> None:
    full, broken = Pair(), Pair()
    hub = _pump.Hub()
    try:
        full.down.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stalled = _pump.Pump(full.up, full.down, _framing.Dechunker(), lambda b: b)
        failing = _pump.Pump(broken.up, broken.down, _framing.Dechunker(), lambda b: b)
        hub.add(stalled)
        hub.add(failing)
        block = b"w" * 60000
        full.upstream.sendall(b"%x\r\n%s\r\n" % (len(block), block))
        broken.client.close()
        broken.upstream.sendall(b"1\r\na\r\n")
        given_back = {id(x): x for x in hub.run()}
        assert set(given_back) == {id(stalled), id(failing)}
        assert stalled.result == _pump.WRITE and stalled.pending_bytes > 0
        assert failing.result == _pump.FAILED
        assert isinstance(failing.error, _pump.ClientFailed)
        assert len(hub) == 0
    finally:
        hub.close()
        full.close()
        broken.close()


async def test_a_hub_wait_ends_idle_cancelled_or_given_back() -> None:
    from zaiproxy.http.pumphub import IDLE, PumpHub

    hub = PumpHub()
    p = Pair()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await trio.testing.wait_all_tasks_blocked()
            pump = _pump.Pump(p.up, p.down, _framing.Dechunker(), lambda b: b)
            started = trio.current_time()
            assert await hub.wait(pump, 0.2) == IDLE
            assert 0.2 <= trio.current_time() - started < 1.0
            assert len(hub) == 0
            with trio.move_on_after(0.05):
                await hub.wait(pump, 10)
            assert len(hub) == 0  # cancelled: it left the hub
            p.upstream.sendall(b"2\r\nhi\r\n0\r\n\r\n")
            assert await hub.wait(pump, 10) == _pump.END
            assert drain(p.client) == b"2\r\nhi\r\n"
            p2 = Pair()
            try:
                failing = _pump.Pump(p2.up, p2.down, _framing.Dechunker(), lambda b: b)
                p2.upstream.sendall(b"zz\r\n")
                with pytest.raises(_framing.FramingError):
                    await hub.wait(failing, 10)
            finally:
                p2.close()
            nursery.cancel_scope.cancel()
        assert not hub.running
    finally:
        p.close()


# ---- through a real proxy ------------------------------------------------------------------


JSON = ("content-type", "application/json")
CHAT = orjson.dumps({"model": "glm-4.6", "stream": True,
                     "messages": [{"role": "user", "content": "tell me a story"}]})


@pytest.fixture
def pumped(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many responses went through the pump (Relay._pump, counted)."""
    calls: list[int] = []
    real = relay_module.Relay._pump

    async def counting(self: Any, *args: Any) -> tuple[bytes, bool]:
        calls.append(1)
        return await real(self, *args)

    monkeypatch.setattr(relay_module.Relay, "_pump", counting)
    return calls


@needs_pump
@pytest.mark.parametrize("split", ["one", "bytes", "random"])
async def test_streams_through_the_pump_equal_the_twins(nursery: trio.Nursery, pumped: list[int],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         split: str) -> None:
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream))
    # Events paced 2 ms apart: the relay waits for upstream, where the pump takes over.
    headers = [JSON, ("x-mock-write-split", split), ("x-mock-seed", "3"),
               ("x-mock-chunks", "30"), ("x-mock-chunk-size", "24"),
               ("x-mock-chunk-delay", "0.002")]
    via_pump = await request(proxy.port, "POST", "/v1/chat/completions", headers, CHAT)
    assert len(pumped) == 1
    monkeypatch.setattr(netstream, "PUMP", False)
    via_twin = await request(proxy.port, "POST", "/v1/chat/completions", headers, CHAT)
    assert len(pumped) == 1
    assert via_pump.status == via_twin.status == 200
    assert via_pump.complete and via_twin.complete
    assert via_pump.body == via_twin.body
    assert via_pump.body.endswith(b"data: [DONE]\n\n")


@needs_pump
async def test_a_paced_stream_waits_in_the_workers_hub(nursery: trio.Nursery) -> None:
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream))
    hub = proxy.worker.ctx.pump_hub
    assert hub is not None
    await trio.testing.wait_all_tasks_blocked()
    assert hub.running
    headers = [JSON, ("x-mock-seed", "5"), ("x-mock-chunks", "12"),
               ("x-mock-chunk-delay", "0.05")]
    seen: list[int] = []
    result: list[Any] = []

    async def one() -> None:
        result.append(await request(proxy.port, "POST", "/v1/chat/completions", headers, CHAT))

    async with trio.open_nursery() as inner:
        inner.start_soon(one)
        while not result:
            seen.append(len(hub))
            await trio.sleep(0.01)
    assert max(seen) == 1  # the stream waited in the hub, not on its socket
    assert len(hub) == 0
    direct = await request(upstream, "POST", "/api/paas/v4/chat/completions",
                           [*headers, ("authorization", f"Bearer {UPSTREAM_KEY}")], CHAT)
    assert result[0].body == direct.body


@needs_pump
async def test_idle_and_cut_streams_end_with_the_error_event(nursery: trio.Nursery,
                                                            pumped: list[int]) -> None:
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream, body_idle_timeout=0.3))
    await stall_and_cut(proxy.port, pumped)
    assert proxy.pool.active == 0


async def stall_and_cut(port: int, pumped: list[int]) -> None:
    """A stream whose upstream stalls (body_idle_timeout 0.3 s) and one whose upstream closes
    mid-body, both through the pump, end with the SSE error event and no clean end."""
    before = len(pumped)
    with trio.fail_after(10):
        stalled = await request(port, "POST", "/v1/chat/completions",
                                [JSON, ("x-mock-fault", "stall")], CHAT)
        cut_off = await request(port, "POST", "/v1/chat/completions",
                                [JSON, ("x-mock-fault", "close-mid-body")], CHAT)
    assert len(pumped) == before + 2
    assert not stalled.complete and b"sent nothing for 0.3 s" in stalled.body
    assert not cut_off.complete and b"upstream connection lost mid-response" in cut_off.body


@needs_pump
async def test_a_client_that_stops_reading_stalls_the_upstream(nursery: trio.Nursery,
                                                             pumped: list[int]) -> None:
    # A chunked SSE upstream writing as fast as it can to a client that reads only the head:
    # the pump stops reading upstream once the client's socket is full.
    sent = 0
    event = b"data: " + b"z" * 4000 + b"\n\n"
    wire = b"%x\r\n%s\r\n" % (len(event), event)

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal sent
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                              b"transfer-encoding: chunked\r\n\r\n")
        with trio.move_on_after(30):
            while sent < 256 << 20:
                await stream.send_all(wire)
                sent += len(wire)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]
    proxy = await start_proxy(nursery, make_config(f"http://127.0.0.1:{port}"))
    client = await RawClient.connect("127.0.0.1", proxy.port)
    await client.stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                                 b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(CHAT), CHAT))
    with trio.fail_after(5):
        first = await client.stream.receive_some(1024)
    assert first.startswith(b"HTTP/1.1 200 ")
    await trio.testing.wait_all_tasks_blocked(cushion=0.2)
    stalled_at = sent
    await trio.testing.wait_all_tasks_blocked(cushion=0.2)
    assert len(pumped) == 1
    assert 0 < stalled_at < 48 << 20, stalled_at
    assert sent - stalled_at < 8 << 20, (stalled_at, sent)
    await client.aclose()


@needs_pump
async def test_tls_upstream_streams_are_pumped_too(nursery: trio.Nursery, pumped: list[int],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   ca: trustme.CA, tmp_path: Any) -> None:
    # An HTTPS upstream (Z.AI itself): the stream is decrypted by the pump, waits in the
    # hub, and reaches the client as the twin relays it; a stall and a cut end as in plain.
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    upstream = await start_mock(nursery, ssl_context=server_ctx)
    proxy = await start_proxy(nursery, make_config(upstream, ca_file=str(ca_path),
                                                   body_idle_timeout=0.3))
    headers = [JSON, ("x-mock-seed", "9"), ("x-mock-chunks", "20"), ("x-mock-chunk-size", "30"),
               ("x-mock-chunk-delay", "0.005"), ("x-mock-write-split", "random")]
    via_pump = await request(proxy.port, "POST", "/v1/chat/completions", headers, CHAT)
    assert len(pumped) == 1
    await stall_and_cut(proxy.port, pumped)
    monkeypatch.setattr(netstream, "PUMP", False)
    via_twin = await request(proxy.port, "POST", "/v1/chat/completions", headers, CHAT)
    assert len(pumped) == 3
    assert via_pump.complete and via_twin.complete
    assert via_pump.body == via_twin.body
    assert proxy.pool.active == 0
