"""FastSocketStream: trio's stream conformance suite, plus what the fast path changes."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from zaiproxy.http.netstream import FAIR_EVERY, FastSocketStream


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        left = socket.create_connection(listener.getsockname())
        right, _ = listener.accept()
    return left, right


async def fill(stream: FastSocketStream) -> None:
    """Send until the kernel buffers are full and send_all blocks, then stop it."""
    async def sender() -> None:
        while True:
            await stream.send_all(b"x" * 10000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_trio_conformance_suite() -> None:
    """Over a socket pair, as trio runs it for its own SocketStream (a "clogged" TCP
    socket can accept a few more bytes later, when the peer's window opens)."""
    # fair_every=1: the suite asserts that every call yields, which the default
    # deliberately does not (see the module docstring); everything else must hold.
    async def stream_maker() -> tuple[FastSocketStream, FastSocketStream]:
        left, right = socket.socketpair()
        return FastSocketStream(left, fair_every=1), FastSocketStream(right, fair_every=1)

    async def clogged_stream_maker() -> tuple[FastSocketStream, FastSocketStream]:
        left, right = await stream_maker()
        await fill(left)
        await fill(right)
        return left, right

    await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)


async def test_from_trio_takes_the_socket_over() -> None:
    left, right = tcp_pair()
    stream = FastSocketStream.from_trio(trio.SocketStream(trio.socket.from_stdlib_socket(left)))
    assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    peer = FastSocketStream(right)
    await stream.send_all(b"ping")
    assert await peer.receive_some(10) == b"ping"
    await stream.aclose()
    assert await peer.receive_some(10) == b""
    await peer.aclose()


async def test_a_busy_connection_cannot_starve_the_loop() -> None:
    """A peer that always has data: the reader still yields every FAIR_EVERY calls."""
    left, right = socket.socketpair()
    reader = FastSocketStream(left)
    right.sendall(b"y" * 100_000)  # far more calls' worth than one batch
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()  # the ticker has started
        start = ticks
        for _ in range(64):
            assert await reader.receive_some(1) == b"y"  # each completes at once
        assert FAIR_EVERY <= 16
        assert ticks - start >= 3, "the other task hardly ran while data was ready"
        nursery.cancel_scope.cancel()
    await reader.aclose()
    right.close()


async def test_immediate_completion_still_honours_cancellation() -> None:
    left, right = socket.socketpair()
    stream = FastSocketStream(left)
    right.sendall(b"data")
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.receive_some(10)  # data is ready, but the scope is cancelled
        pytest.fail("receive_some returned inside a cancelled scope")
    assert scope.cancelled_caught
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.send_all(b"x")
    assert scope.cancelled_caught
    await stream.aclose()
    right.close()


async def test_peer_reset_is_broken_resource() -> None:
    left, right = tcp_pair()
    stream = FastSocketStream(left)
    right.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    right.close()  # RST
    await trio.sleep(0.01)
    with pytest.raises(trio.BrokenResourceError) as info:
        for _ in range(100):  # the first send may still succeed into the buffer
            await stream.send_all(b"x" * 1000)
    assert isinstance(info.value.__cause__, OSError)
    await stream.aclose()
