"""http/client.py: one request, the whole answer, and every failure as one ClientError."""

from __future__ import annotations

import functools
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterator

import h11
import pytest
import trio
import trio.testing
import trustme

from zaiproxy.http import client
from zaiproxy.http.client import (
    BadAnswer,
    ClientError,
    ConnectFailed,
    NoAnswer,
    Timeout,
    Url,
)

Script = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def read_head(stream: trio.SocketStream) -> bytes:
    """What the client sent, up to the end of its head (and what came with it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


async def start_raw(nursery: trio.Nursery, script: Script) -> tuple[int, list[bytes]]:
    """A server on port 0 that reads each request's head and runs ``script`` on it."""
    seen: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            head = await read_head(stream)
            seen.append(head)
            await script(stream, head)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0,
                                                      host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], seen


def answer_with(data: bytes) -> Script:
    async def script(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(data)

    return script


@pytest.fixture
def refused_port() -> int:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    with socket.socket() as s:  # listening, never accepting: connects, then no answer
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


async def test_get_sends_host_headers_and_close_and_reads_the_whole_answer(
        nursery: trio.Nursery) -> None:
    port, seen = await start_raw(nursery, answer_with(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n"
        b'{"a": true}'))
    got = await client.get(f"http://127.0.0.1:{port}/admin/status?x=1",
                           headers=[("authorization", "Bearer t0k")])
    assert (got.status, got.reason, got.body) == (200, "OK", b'{"a": true}')
    assert got.header(b"content-type") == b"application/json" and got.header(b"x") is None
    request = seen[0].decode().lower()
    assert request.startswith("get /admin/status?x=1 http/1.1\r\n")
    assert f"host: 127.0.0.1:{port}\r\n" in request
    assert "authorization: bearer t0k\r\n" in request and "connection: close\r\n" in request


async def test_post_sends_its_body(nursery: trio.Nursery) -> None:
    bodies: list[bytes] = []

    async def echo(stream: trio.SocketStream, head: bytes) -> None:
        body = head.partition(b"\r\n\r\n")[2]
        while len(body) < 7:
            body += await stream.receive_some(65536)
        bodies.append(body)
        await stream.send_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")

    port, seen = await start_raw(nursery, echo)
    got = await client.post(f"http://127.0.0.1:{port}/x", b'{"n":1}')
    assert got.status == 201 and got.body == b""
    assert b"content-length: 7\r\n" in seen[0] and bodies == [b'{"n":1}']


async def test_an_answer_delimited_by_close_is_read_to_the_end(nursery: trio.Nursery) -> None:
    port, _ = await start_raw(nursery, answer_with(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 100_000))
    assert (await client.get(f"http://127.0.0.1:{port}/")).body == b"x" * 100_000


async def test_a_body_over_max_body_is_refused(nursery: trio.Nursery) -> None:
    port, _ = await start_raw(nursery, answer_with(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2000\r\n\r\n" + b"x" * 2000))
    with pytest.raises(BadAnswer, match=f"127.0.0.1:{port} is larger than 1000 bytes"):
        await client.get(f"http://127.0.0.1:{port}/", max_body=1000)
    assert len((await client.get(f"http://127.0.0.1:{port}/", max_body=2000)).body) == 2000


async def test_refused_is_no_answer_naming_the_address(refused_port: int) -> None:
    with pytest.raises(NoAnswer) as info:
        await client.get(f"http://127.0.0.1:{refused_port}/admin/keys",
                         headers=[("authorization", "Bearer s3cret")])
    assert str(info.value) == f"cannot connect to 127.0.0.1:{refused_port}: Connection refused"
    assert not isinstance(info.value, Timeout)


@pytest.mark.parametrize(("script", "error", "message"), [
    (answer_with(b""), NoAnswer, "closed the connection without an answer"),
    (answer_with(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"), BadAnswer,
     "bad HTTP from"),
    (answer_with(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), BadAnswer, "bad HTTP from"),
    (answer_with(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n"), BadAnswer, "bad HTTP from"),
])
async def test_what_answered_and_how(nursery: trio.Nursery, script: Script,
                                     error: type[ClientError], message: str) -> None:
    port, _ = await start_raw(nursery, script)
    with pytest.raises(error, match=message):
        await client.get(f"http://127.0.0.1:{port}/")


async def test_a_reset_is_no_answer(nursery: trio.Nursery) -> None:
    async def reset(stream: trio.SocketStream, head: bytes) -> None:
        # SO_LINGER 0: close sends RST instead of FIN.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    port, _ = await start_raw(nursery, reset)
    with pytest.raises(NoAnswer, match=r"reset the connection|without an answer"):
        await client.get(f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://x.test/", "scheme must be http or https"), ("http:///nohost", "no host"),
    ("http://x.test:99999/", "Port out of range"),
    ("http://me:pw@x.test/", "user info"),
])
async def test_a_bad_url_is_connect_failed(url: str, message: str) -> None:
    with pytest.raises(ConnectFailed, match=message) as info:
        await client.get(url)
    assert "pw" not in str(info.value)


def test_url_parse() -> None:
    assert Url.parse("http://[::1]:9100") == Url("http", "::1", 9100, "/", "[::1]:9100")
    assert Url.parse("https://prom.test/api/v1/query?q=up") == Url(
        "https", "prom.test", 443, "/api/v1/query?q=up", "prom.test")
    assert Url.parse("http://h.test/x").where == "h.test:80"
    assert Url.parse("http://[::1]:9100/x").where == "[::1]:9100"


async def test_the_callers_cancel_scope_bounds_a_request(
        silent_port: int, autojump_clock: trio.testing.MockClock) -> None:
    with trio.move_on_after(30) as scope:
        await client.get(f"http://127.0.0.1:{silent_port}/")
    assert scope.cancelled_caught and trio.current_time() == pytest.approx(30)


def test_request_sync_runs_its_own_loop_and_times_out(silent_port: int) -> None:
    with pytest.raises(Timeout) as info:
        client.request_sync("GET", f"http://127.0.0.1:{silent_port}/", timeout=0.2)
    assert str(info.value) == f"no answer from 127.0.0.1:{silent_port} within 0.2s"
    assert isinstance(info.value, NoAnswer)  # nothing answered


def test_request_sync_returns_the_answer() -> None:
    """Against a server in another thread's trio loop (request_sync owns this thread's)."""
    import threading

    ready = threading.Event()
    port: list[int] = []

    async def serve_one() -> None:
        async with trio.open_nursery() as nursery:
            async def once(stream: trio.SocketStream, head: bytes) -> None:
                await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                nursery.cancel_scope.cancel()

            p, _ = await start_raw(nursery, once)
            port.append(p)
            ready.set()

    thread = threading.Thread(target=trio.run, args=(serve_one,))
    thread.start()
    try:
        assert ready.wait(10)
        got = client.request_sync("GET", f"http://127.0.0.1:{port[0]}/", timeout=10)
        assert (got.status, got.reason, got.body) == (204, "No Content", b"")
    finally:
        thread.join(10)


# ---- https ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def start_tls(nursery: trio.Nursery, ca: trustme.CA) -> int:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while type(event := conn.next_event()) is not h11.EndOfMessage:
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("content-length", "6")])) + conn.send(h11.Data(data=b"secure"))
                + conn.send(h11.EndOfMessage()))
        except trio.BrokenResourceError:
            pass  # a client that refused our certificate
        finally:
            await trio.aclose_forcefully(stream)

    tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = tcp[0].socket.getsockname()[1]
    await nursery.start(trio.serve_listeners, handle, [trio.SSLListener(tcp[0], server_ctx)])
    return int(port)


async def test_https(nursery: trio.Nursery, ca: trustme.CA) -> None:
    port = await start_tls(nursery, ca)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    got = await client.get(f"https://localhost:{port}/", ssl_context=trusting)
    assert (got.status, got.body) == (200, b"secure")
    with pytest.raises(ConnectFailed, match=f"TLS with localhost:{port} failed"):
        await client.get(f"https://localhost:{port}/", ssl_context=ssl.create_default_context())


async def test_a_request_h11_refuses_is_a_client_error_that_shows_no_header() -> None:
    with pytest.raises(ClientError) as info:  # refused before connecting (port 1: nobody)
        await client.get("http://127.0.0.1:1/", headers=[("authorization", "Bearer s3\ncret")])
    assert type(info.value) is ClientError and "s3" not in str(info.value)
