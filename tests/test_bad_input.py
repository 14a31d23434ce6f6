"""Every bad-input case gets its status and a well-formed body in the caller's API shape."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
import trio

from tests.harness import RawClient, make_config, request, send_raw, start_mock, start_proxy

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
JSON = [("content-type", "application/json")]


def openai_error(resp):
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["message"]
    return body["error"]


def anthropic_error(resp):
    body = resp.json()
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture
async def proxy(nursery):
    upstream = await start_mock(nursery)
    return await start_proxy(nursery, make_config(upstream, max_body_bytes=4096,
                                                  max_header_bytes=8192, header_timeout=0.5,
                                                  keepalive_timeout=0.5))


async def test_unknown_route_404_in_both_shapes(proxy):
    resp = await request(proxy.port, "GET", "/v2/whatever")
    assert resp.status == 404
    assert openai_error(resp)["code"] == "not_found"
    resp = await request(proxy.port, "POST", "/v1/messages/unknown", JSON, b"{}")
    assert resp.status == 404
    assert anthropic_error(resp)["type"] == "not_found_error"


async def test_wrong_method_405_with_allow(proxy):
    resp = await request(proxy.port, "GET", CHAT)
    assert resp.status == 405
    assert resp.header(b"allow") == b"POST"
    assert openai_error(resp)["code"] == "method_not_allowed"


@pytest.mark.parametrize("target, api", [(CHAT, "openai"), (MESSAGES, "anthropic")])
@pytest.mark.parametrize("body", [b"{not json", b"", b"[1,2]", b'{"model": "x"', b"\xff\xfe"])
async def test_invalid_json_400(proxy, target, api, body):
    resp = await request(proxy.port, "POST", target, JSON, body)
    assert resp.status == 400
    err = openai_error(resp) if api == "openai" else anthropic_error(resp)
    assert err["type"] == "invalid_request_error"


async def test_body_over_limit_413_from_content_length(proxy):
    # Refused from the declared length, before the body is read.
    head = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100000\r\n\r\n")
    raw = await send_raw(proxy.port, head, read_timeout=2)
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in raw.lower()
    body = orjson.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert body == {"type": "error", "error": {"type": "request_too_large",
                                              "message": body["error"]["message"]}}


async def test_chunked_body_over_limit_413(proxy):
    chunk = b"x" * 3000
    data = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(chunk) + chunk + b"\r\n" + b"%x\r\n" % len(chunk) + chunk + b"\r\n"
            + b"0\r\n\r\n")
    raw = await send_raw(proxy.port, data, read_timeout=2)
    assert raw.startswith(b"HTTP/1.1 413 ")
    body = orjson.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_too_large"


async def test_headers_too_large_431(proxy):
    data = b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 10000 + b"\r\n\r\n"
    raw = await send_raw(proxy.port, data, read_timeout=2)
    assert raw.startswith(b"HTTP/1.1 431 ")
    body = orjson.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_headers_too_large"


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET /health HTTP/1.1\r\nno-colon-header\r\n\r\n",
    b"GET /health HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
    b"GET /health HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
])
async def test_malformed_http_400_and_close(proxy, data):
    raw = await send_raw(proxy.port, data, read_timeout=2)
    assert raw.startswith(b"HTTP/1.1 400 ")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"connection: close" in head.lower()
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"


async def test_unsupported_http_version_505(proxy):
    raw = await send_raw(proxy.port, b"GET /health HTTP/9.9\r\nhost: x\r\n\r\n", read_timeout=2)
    assert raw.startswith(b"HTTP/1.1 505 ")
    assert orjson.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "http_version_not_supported"


@pytest.mark.parametrize("target", [
    "/v1/../admin",
    "/api/paas/v4/../../etc/passwd",
    "/api/paas/v4/%2e%2e/secret",
    "/api/paas/v4/a%2fb",
    "/api/anthropic/%5c..%5cx",
    "/v1/chat/completions%00",
    "http://evil.example/v1/chat/completions",
    "evil.example:443",
])
async def test_path_escape_rejected(proxy, target):
    raw = await send_raw(proxy.port, f"GET {target} HTTP/1.1\r\nhost: x\r\n\r\n".encode(),
                         read_timeout=2)
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:80]


async def test_at_sign_in_authority_rejected(proxy):
    raw = await send_raw(proxy.port, b"GET /v1/models HTTP/1.1\r\nhost: user@evil.example\r\n\r\n",
                         read_timeout=2)
    assert raw.startswith(b"HTTP/1.1 400 ")


async def test_slow_headers_get_408_and_close(proxy):
    # header_timeout is 0.5 s: a client that dribbles a head never finishes it.
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
    out = b""
    with trio.fail_after(5):
        while True:
            data = await stream.receive_some(4096)
            if not data:
                break
            out += data
    assert out.startswith(b"HTTP/1.1 408 ")


async def test_idle_connection_closed_without_response(proxy):
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    with trio.fail_after(5):
        assert await stream.receive_some(4096) == b""


async def test_keep_alive_idle_timeout_closes(proxy):
    client = await RawClient.connect("127.0.0.1", proxy.port)
    resp = await client.request("GET", "/health")
    assert resp.status == 200
    with trio.fail_after(5):
        assert await client.stream.receive_some(4096) == b""


async def test_keep_alive_serves_many_requests(proxy):
    client = await RawClient.connect("127.0.0.1", proxy.port)
    body = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(5):
        resp = await client.request("POST", CHAT, JSON, body)
        assert resp.status == 200
        assert resp.json()["object"] == "chat.completion"
    await client.aclose()


async def test_expect_100_continue(proxy):
    body = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                          b"content-type: application/json\r\nexpect: 100-continue\r\n"
                          b"content-length: %d\r\n\r\n" % len(body))
    with trio.fail_after(5):
        first = await stream.receive_some(4096)
    assert first.startswith(b"HTTP/1.1 100 Continue\r\n")
    await stream.send_all(body)
    out = b""
    with trio.fail_after(5):
        while b"chat.completion" not in out:
            out += await stream.receive_some(65536)
    assert b"HTTP/1.1 200 OK" in out
    await stream.aclose()


async def test_config_limits_are_the_ones_used(nursery):
    upstream = await start_mock(nursery)
    cfg = make_config(upstream)
    assert cfg.max_body_bytes == 32 * 1024 * 1024  # the documented default
    small = dataclasses.replace(cfg, max_body_bytes=10)
    proxy = await start_proxy(nursery, small)
    resp = await request(proxy.port, "POST", CHAT, JSON, b'{"model": "glm-4.6"}')
    assert resp.status == 413


async def test_malformed_request_is_logged_with_its_status(proxy, log_buffer):
    from zaiproxy.core import logs

    await send_raw(proxy.port, b"GARBAGE\r\n\r\n", read_timeout=2)
    logs.get_logger().flush()
    entries = [orjson.loads(line) for line in log_buffer.getvalue().splitlines()]
    [entry] = [e for e in entries if e["event"] == "request"]
    assert (entry["status"], entry["route"], entry["method"]) == (400, "other", "-")
    assert entry["error"].startswith("malformed HTTP request")


async def test_413_reaches_a_client_that_keeps_sending(proxy):
    # The client sends its whole oversized body without waiting. Closing with
    # unread bytes in the socket would make the kernel send RST, and the
    # client could lose the 413 before reading it: the proxy must linger
    # (shut down its side, drain for a while), as nginx and Apache do.
    body = b"x" * 400_000
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    got = b""

    async def send() -> None:
        try:
            await stream.send_all(head + body)
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as inner:
        inner.start_soon(send)
        await trio.sleep(0.2)  # let the body pile up unread on the proxy's side
        with trio.fail_after(5):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                got += data
        # Half-closed, not gone: the proxy still drains what we send.
        assert len(proxy.worker.connections) == 1
        inner.cancel_scope.cancel()
    await stream.aclose()
    assert got.startswith(b"HTTP/1.1 413 "), got[:60]
    assert b"request_too_large" in got


async def test_unknown_route_keeps_the_connection_alive(proxy):
    client = await RawClient.connect("127.0.0.1", proxy.port)
    try:
        missing = await client.request("POST", "/v1/nope", [("content-type", "application/json")],
                                       b'{"model":"x"}')
        assert missing.status == 404
        assert missing.header(b"connection") != b"close"
        wrong = await client.request("DELETE", "/v1/chat/completions")
        assert wrong.status == 405
        health = await client.request("GET", "/health")  # the same connection, still usable
        assert health.status == 200
    finally:
        await client.aclose()
