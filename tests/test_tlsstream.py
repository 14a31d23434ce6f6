"""zaiproxy.http.tlsstream.TLSStream: the pool's TLS, the stdlib's SSLObject over memory BIOs.

A client and a server instance over a TCP socket pair; what the pool relies on: trio's
stream contract for the calls it makes, verification (an untrusted certificate, a
wrong hostname), large transfers both ways, close_notify and a ragged EOF both read as the
end, and ``buffered()``, which says whether the stream pump may read the socket itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl

import pytest
import trio
import trio.testing
import trustme

from zaiproxy.http.netstream import FastSocketStream
from zaiproxy.http.tlsstream import TLSStream

# `make test` runs the suite twice (h11, then h11-mypyc); TLS is independent of the HTTP
# implementation: run once.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="independent of the HTTP implementation")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def contexts(ca: trustme.CA, name: str = "example.test") -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def tcp_pair(fair_every: int = 16) -> tuple[FastSocketStream, FastSocketStream]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return FastSocketStream(a, fair_every=fair_every), FastSocketStream(b, fair_every=fair_every)


def tls_pair(ca: trustme.CA, hostname: str = "example.test",
             fair_every: int = 16) -> tuple[TLSStream, TLSStream]:
    server_ctx, client_ctx = contexts(ca)
    a, b = tcp_pair(fair_every)
    return (TLSStream(a, client_ctx, server_hostname=hostname),
            TLSStream(b, server_ctx, server_side=True))


async def test_stream_contract(ca: trustme.CA) -> None:
    # What trio's stream contract asks of the calls the pool makes (its conformance suite
    # closes TCP sockets with unread TLS session tickets in them, which the kernel answers
    # with a reset: not a property of this class).
    client, server = tls_pair(ca)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    with pytest.raises(ValueError):
        await client.receive_some(0)

    errors: list[BaseException] = []

    async def read() -> None:
        try:
            await client.receive_some()
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await client.receive_some()
        await client.aclose()  # from another task: the blocked receive wakes
    assert len(errors) == 1
    for call in (client.send_all(b""), client.send_all(b"x"), client.receive_some(),
                 client.wait_send_all_might_not_block()):
        with pytest.raises(trio.ClosedResourceError):
            await call
    await client.aclose()  # twice: fine
    await server.aclose()


async def test_large_transfers_both_ways_and_the_end(ca: trustme.CA) -> None:
    client, server = tls_pair(ca)
    blob = bytes(range(256)) * 4096  # 1 MiB

    async def pump(src: TLSStream, dst: bytearray, size: int) -> None:
        while len(dst) < size:
            dst += await src.receive_some()

    got_server, got_client = bytearray(), bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, blob)
        nursery.start_soon(pump, server, got_server, len(blob))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, blob[::-1])
        nursery.start_soon(pump, client, got_client, len(blob))
    assert bytes(got_server) == blob and bytes(got_client) == blob[::-1]
    assert not client.buffered()
    # A ragged EOF (the peer's socket closed without close_notify) reads as the end.
    await server.transport_stream.aclose()
    assert await client.receive_some() == b""
    await client.aclose()


async def test_buffered_says_when_decrypted_bytes_wait(ca: trustme.CA) -> None:
    client, server = tls_pair(ca)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    await server.send_all(b"x" * 3000)
    assert await client.receive_some(1000) == b"x" * 1000
    assert client.buffered()  # 2000 decrypted bytes wait: the socket says nothing of them
    assert await client.receive_some() == b"x" * 2000
    assert not client.buffered()
    await client.aclose()
    await server.aclose()


async def test_an_untrusted_or_misnamed_server_is_refused(ca: trustme.CA) -> None:
    other = trustme.CA()
    for trust, hostname in ((other, "example.test"), (ca, "wrong.test")):
        server_ctx, _ = contexts(ca)
        client_ctx = ssl.create_default_context()
        trust.configure_trust(client_ctx)
        a, b = tcp_pair()
        client = TLSStream(a, client_ctx, server_hostname=hostname)
        server = TLSStream(b, server_ctx, server_side=True)

        async def serve(server: TLSStream = server) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await server.do_handshake()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(trio.BrokenResourceError) as refused:
                await client.do_handshake()
            await client.aclose()
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
        await server.aclose()
