"""http/responder.py: JSON answers over HTTP/1.1, keep-alive, bounds, and errors that close."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.harness import RawClient
from zaiproxy.core.errors import NotFound, ProxyError
from zaiproxy.http import client
from zaiproxy.http.responder import (
    Answer,
    Limits,
    Request,
    Responder,
    Streamed,
    Write,
)

Handler = Callable[[Request], Awaitable[Answer | Streamed]]


async def echo(request: Request) -> Answer | Streamed:
    """What the handler saw, as JSON; some paths do something else."""
    if request.path == "/missing":
        raise NotFound("no route for /missing", headers=((b"x-why", b"test"),))
    if request.path == "/bug":
        raise RuntimeError("a bug in the handler")
    if request.path == "/events":
        async def body(write: Write) -> None:
            for i in range(3):
                await write(b"event: n\ndata: %d\n\n" % i)

        return Streamed(200, ((b"content-type", b"text/event-stream"),), body, send_buffer=4096)
    return Answer.json(200, {"method": request.method, "path": request.path,
                             "query": request.query, "body": request.body.decode(),
                             "auth": (request.header(b"authorization") or b"").decode()})


async def serve(nursery: trio.Nursery, handler: Handler = echo, **kwargs: Any) -> int:
    responder = Responder(handler, **kwargs)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(responder.serve, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        got = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                got += chunk
        return got


async def test_answers_json_and_keeps_the_connection(nursery: trio.Nursery) -> None:
    port = await serve(nursery)
    c = await RawClient.connect("127.0.0.1", port)
    try:
        first = await c.request("GET", "/a?x=1", [("authorization", "Bearer t")])
        second = await c.request("POST", "/b", body=b'{"n": 1}')
        head = await c.request("HEAD", "/c")
    finally:
        await c.aclose()
    assert first.status == 200 and first.header(b"content-type") == b"application/json"
    assert first.json() == {"method": "GET", "path": "/a", "query": "x=1", "body": "",
                            "auth": "Bearer t"}
    assert second.json()["body"] == '{"n": 1}'
    assert first.header(b"connection") is None  # kept open: three answers on one connection
    assert head.status == 200 and head.body == b""
    assert int(head.header(b"content-length") or 0) > 0  # the GET answer's length


async def test_a_proxy_error_is_an_answer_and_the_connection_stays(
        nursery: trio.Nursery) -> None:
    port = await serve(nursery)
    c = await RawClient.connect("127.0.0.1", port)
    try:
        missing = await c.request("GET", "/missing")
        after = await c.request("GET", "/ok")
    finally:
        await c.aclose()
    assert missing.status == 404 and missing.header(b"x-why") == b"test"
    assert missing.json() == {"error": {"message": "no route for /missing",
                                        "type": "invalid_request_error", "code": "not_found"}}
    assert after.status == 200


async def test_errors_in_the_callers_shape(nursery: trio.Nursery) -> None:
    def shape(error: ProxyError) -> bytes:
        return orjson.dumps({"error": error.message})

    port = await serve(nursery, error_body=shape)
    got = await client.get(f"http://127.0.0.1:{port}/missing")
    assert (got.status, orjson.loads(got.body)) == (404, {"error": "no route for /missing"})


async def test_a_handler_that_breaks_gets_500_and_a_closed_connection(
        nursery: trio.Nursery, log_buffer: Any) -> None:
    port = await serve(nursery, name="test-api")
    got = await raw_exchange(port, b"GET /bug HTTP/1.1\r\nhost: x\r\n\r\n"
                                   b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 500 ") and b"connection: close" in got.lower()
    assert b'"path":"/ok"' not in got  # the pipelined second request was not served
    assert b'"message":"internal error"' in got and b"a bug" not in got
    assert (await client.get(f"http://127.0.0.1:{port}/ok")).status == 200  # still serving
    from zaiproxy.core import logs

    logs.get_logger().flush()
    assert b'"event":"request_handler_failed"' in log_buffer.getvalue()
    assert b'"server":"test-api"' in log_buffer.getvalue()


@pytest.mark.parametrize(("request_bytes", "status"), ids=[
    "malformed", "head-too-large", "length-too-large", "chunks-too-large", "http2"], argvalues=[
    (b"GET /ok HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n", b"400"),
    (b"GET /ok HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
    (b"POST /ok HTTP/1.1\r\nhost: x\r\ncontent-length: 70000\r\n\r\n", b"413"),
    (b"POST /ok HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
     + b"8000\r\n" + b"a" * 0x8000 + b"\r\n" + b"8000\r\n" + b"a" * 0x8000 + b"\r\n"
     + b"10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", b"413"),
    (b"GET /ok HTTP/2.0\r\nhost: x\r\n\r\n", b"505"),
])
async def test_a_request_that_cannot_be_read_is_answered_and_closed(
        nursery: trio.Nursery, request_bytes: bytes, status: bytes) -> None:
    port = await serve(nursery)
    got = await raw_exchange(port, request_bytes + b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 " + status + b" ") and b"connection: close" in got.lower()
    assert b'"path":"/ok"' not in got  # nothing after a refused request is served
    assert b"bad header line" not in got  # h11's message quotes bytes: never echoed


async def test_connection_close_is_honoured(nursery: trio.Nursery) -> None:
    port = await serve(nursery)
    got = await raw_exchange(port, b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ") and b"connection: close" in got.lower()
    got = await raw_exchange(port, b"GET /ok HTTP/1.0\r\n\r\n")  # HTTP/1.0: no keep-alive
    assert got.startswith(b"HTTP/1.1 200 ")


async def test_expect_100_continue(nursery: trio.Nursery) -> None:
    port = await serve(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                              b"expect: 100-continue\r\nconnection: close\r\n\r\n")
        with trio.fail_after(5):
            interim = await stream.receive_some(65536)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await stream.send_all(b"hi")
        got = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                got += chunk
    assert got.startswith(b"HTTP/1.1 200 ") and b'"body":"hi"' in got


async def test_an_idle_connection_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    responder = Responder(echo, limits=Limits(idle_timeout=30))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder.serve_connection, server_end)
        await client_end.send_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
        got = b""
        while b'"path":"/ok"' not in got:
            got += await client_end.receive_some(65536)
        start = trio.current_time()
        assert await client_end.receive_some(65536) == b""  # closed, without an answer
        assert trio.current_time() - start == pytest.approx(30)


async def test_a_client_that_does_not_read_its_answer_is_closed(
        autojump_clock: trio.testing.MockClock) -> None:
    # lockstep: a write completes only when the peer reads it.
    client_end, server_end = trio.testing.lockstep_stream_pair()
    responder = Responder(echo, limits=Limits(send_timeout=5))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(responder.serve_connection, server_end)
            await client_end.send_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
    # serve_connection returned on its own: the send gave up after 5 s, the stream closed.
    assert trio.current_time() == pytest.approx(5)
    with pytest.raises(trio.BrokenResourceError):
        await client_end.send_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")


async def test_a_streamed_answer_is_chunked_and_closes(nursery: trio.Nursery) -> None:
    port = await serve(nursery)
    got = await raw_exchange(port, b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
    assert b"content-type: text/event-stream" in head
    assert [body.count(b"data: %d" % i) for i in range(3)] == [1, 1, 1]


async def test_the_client_and_the_responder_together(nursery: trio.Nursery) -> None:
    port = await serve(nursery)
    got = await client.post(f"http://127.0.0.1:{port}/p?q=1", b"body",
                            headers=[("authorization", "Bearer k")])
    assert orjson.loads(got.body) == {"method": "POST", "path": "/p", "query": "q=1",
                                      "body": "body", "auth": "Bearer k"}
