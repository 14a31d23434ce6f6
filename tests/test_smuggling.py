"""Request smuggling: ambiguous framing is refused with 400 + close, and nothing reaches upstream.

Each shape is sent raw over a real socket to a proxy in front of the real mock upstream,
with a second request hidden behind the first one's framing: a front end that frames by
Content-Length (or ends lines only at CRLF) would take those bytes for the body, h11 for
a new request. The proxy must answer once, close, and never forward either request.
The same shapes fed one byte per read through a memory stream check that the raw head
the guard inspects is assembled correctly however the bytes arrive.
"""

from __future__ import annotations

import orjson
import pytest
import trio
import trio.testing

from tests.harness import make_config, request, start_mock, start_proxy
from zaiproxy.http import framing
from zaiproxy.request.pipeline import Pipeline
from zaiproxy.run.worker import build_context

SMUGGLED_MODELS = b"GET /v1/models/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLED_ADMIN = b"GET /admin/keys HTTP/1.1\r\nHost: x\r\n\r\n"


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


BODY = b'{"model":"glm-4.6","messages":[{"role":"user","content":"hi"}]}'

# name -> (raw bytes, reason the guard gives, error shape)
SHAPES: dict[str, tuple[bytes, str, str]] = {
    # CL.TE: a front end that frames by Content-Length forwards all of it as one request.
    "cl-te": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
              b"\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
              % (len(chunked(BODY)) + len(SMUGGLED_MODELS)) + chunked(BODY) + SMUGGLED_MODELS,
              framing.BOTH_LENGTHS, "openai"),
    "te-cl-admin": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                    b"Content-Length: 4\r\n\r\n" + chunked(BODY) + SMUGGLED_ADMIN,
                    framing.BOTH_LENGTHS, "anthropic"),
    # TE hidden behind a bare LF inside another header line.
    "te-behind-bare-lf": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: %d\r\nX-A: b\nTransfer-Encoding: chunked\r\n\r\n"
                          % (len(chunked(BODY)) + len(SMUGGLED_MODELS))
                          + chunked(BODY) + SMUGGLED_MODELS, framing.BARE_LF, "openai"),
    "bare-lf-only": (b"POST /v1/messages HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}"
                     + SMUGGLED_MODELS, framing.BARE_LF, "anthropic"),
    "bare-lf-head-end": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\n" + SMUGGLED_MODELS,
                         framing.BARE_LF, "openai"),
    "obs-fold": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-A: b\r\n Transfer-Encoding:"
                 b" chunked\r\nContent-Length: 2\r\n\r\n{}" + SMUGGLED_MODELS,
                 framing.OBS_FOLD, "openai"),
    "cl-duplicate-equal": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                           b"Content-Length: 2\r\n\r\n{}" + SMUGGLED_MODELS,
                           framing.CL_REPEATED, "anthropic"),
    "cl-list-equal": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n"
                      b"\r\n{}" + SMUGGLED_MODELS, framing.CL_REPEATED, "openai"),
    "te-http10": (b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunked(BODY) + SMUGGLED_MODELS, framing.TE_HTTP10, "openai"),
}


async def read_until_close(stream: trio.abc.Stream, limit: float = 5.0) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it closed the connection (EOF) in time."""
    out = bytearray()
    with trio.move_on_after(limit):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return bytes(out), True
            if not chunk:
                return bytes(out), True
            out += chunk
    return bytes(out), False


def check_refusal(raw: bytes, closed: bool, reason: str, shape: str) -> None:
    assert closed, "the connection must be closed after a refused head"
    assert raw.count(b"HTTP/1.1 ") == 1, raw  # exactly one response: nothing was smuggled
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in head.lower()
    doc = orjson.loads(body)
    if shape == "anthropic":
        assert doc == {"type": "error", "error": {"type": "invalid_request_error",
                                                  "message": reason}}
    else:
        assert doc == {"error": {"message": reason, "type": "invalid_request_error",
                                 "code": "bad_request"}}


async def mock_requests(upstream: str) -> int:
    return int((await request(upstream, "GET", "/mock/stats")).json()["requests"])


@pytest.fixture
async def proxy_and_mock(nursery):
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream))
    return proxy, upstream


@pytest.mark.parametrize("name", sorted(SHAPES))
async def test_smuggling_shape_gets_400_close_and_never_reaches_upstream(proxy_and_mock, name):
    proxy, upstream = proxy_and_mock
    data, reason, shape = SHAPES[name]
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await stream.send_all(data)
        raw, closed = await read_until_close(stream)
    check_refusal(raw, closed, reason, shape)
    assert await mock_requests(upstream) == 0


async def test_chunked_request_is_served_then_the_connection_closes(proxy_and_mock):
    # Without Content-Length a chunked body is unambiguous; but its trailer section ends at a
    # blank line found with the bare-LF leniency, so nothing after it is ever parsed.
    proxy, upstream = proxy_and_mock
    data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\nX-T: 1\n\n"
            % (len(BODY), BODY) + SMUGGLED_MODELS)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await stream.send_all(data)
        raw, closed = await read_until_close(stream)
    assert closed
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" in raw.split(b"\r\n\r\n", 1)[0].lower()
    assert await mock_requests(upstream) == 1  # the chat request, not the smuggled one


async def test_unambiguous_pipelined_requests_still_served_on_one_connection(proxy_and_mock):
    proxy, upstream = proxy_and_mock
    post = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
    last = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await stream.send_all(post + post + last)
        raw, closed = await read_until_close(stream)
    assert closed
    assert raw.count(b"HTTP/1.1 200 ") == 3
    assert await mock_requests(upstream) == 3


# ---- the same shapes, one byte per read, through the connection object -------------


async def serve_bytewise(ctx, data: bytes) -> tuple[bytes, bool]:
    """Feed ``data`` to one ClientConnection one byte per read; return what it answered."""
    client, server = trio.testing.memory_stream_pair()
    conn = Pipeline(ctx).connection(server, "127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        for i in range(len(data)):
            try:
                await client.send_all(data[i:i + 1])
            except trio.BrokenResourceError:
                break  # the server closed after its answer: the rest is never read
            await trio.testing.wait_all_tasks_blocked()
        await client.send_eof()
        raw, closed = await read_until_close(client)
    return raw, closed


@pytest.mark.parametrize("name", sorted(SHAPES))
async def test_smuggling_shape_fed_one_byte_per_read(nursery, name):
    upstream = await start_mock(nursery)
    ctx = build_context(make_config(upstream))
    data, reason, shape = SHAPES[name]
    raw, closed = await serve_bytewise(ctx, data)
    check_refusal(raw, closed, reason, shape)
    assert await mock_requests(upstream) == 0


async def test_valid_pipelined_heads_fed_one_byte_per_read_pass_the_guard(nursery):
    upstream = await start_mock(nursery)
    ctx = build_context(make_config(upstream))
    one = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Latin: caf\xe9\r\n\r\n"
    raw, _ = await serve_bytewise(ctx, one + one + b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                  b"Connection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 ") == 3, raw
