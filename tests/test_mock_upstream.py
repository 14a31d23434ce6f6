"""The built-in mock upstream: pure behaviour, the real server on port 0, the SDKs, run().

Byte-exact tests send ``connection: close``, read to EOF and compare with
``build_schedule(plan_response(request, options)).data`` - the pure functions
are the specification of what the server writes.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import math
import os
import queue
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anthropic
import h11
import openai
import pytest
import trio
import trio.testing
import trustme

from zaiproxy.http.netstream import FastSocketStream
from zaiproxy.http.sse import SSEEvent, SSEParser
from zaiproxy.mock.behaviour import (
    Fault,
    MockOptions,
    MockRequest,
    ResponsePlan,
    WriteSplit,
    expected_text,
    plan_response,
)
from zaiproxy.mock.pacer import QUANTUM, Pacer, next_due
from zaiproxy.mock.payloads import GLM_MODELS, ZAI_MESSAGES, embedding_vector, prompt_tokens
from zaiproxy.mock.server import ScheduleCache, serve_mock_tcp
from zaiproxy.mock.stats import BoundedCounter, MockStats
from zaiproxy.mock.wire import Ending, Write, build_schedule, render_response

Address = tuple[str, int]
CHAT = b"/v1/chat/completions"
MESSAGES = b"/v1/messages"
CHAT_BODY = b'{"model":"glm-4.6","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"model":"glm-4.6","stream":true,"messages":[{"role":"user","content":"hi"}]}'
ANTHROPIC_BODY = b'{"model":"glm-4.6","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}'
ANTHROPIC_STREAM = (
    b'{"model":"glm-4.6","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}'
)


# --- helpers -------------------------------------------------------------------------------


def make_request(
    method: bytes,
    target: bytes,
    body: bytes = b"",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    *,
    close: bool = True,
) -> tuple[bytes, MockRequest]:
    """The raw request bytes and the MockRequest the server builds from them."""
    all_headers = [(b"host", b"mock"), *headers]
    if body or method == b"POST":
        all_headers.append((b"content-length", b"%d" % len(body)))
    if close:
        all_headers.append((b"connection", b"close"))
    raw = b"%s %s HTTP/1.1\r\n" % (method, target)
    raw += b"".join(n + b": " + v + b"\r\n" for n, v in all_headers) + b"\r\n" + body
    lowered = tuple((n.lower(), v) for n, v in all_headers)
    return raw, MockRequest(method, target, b"1.1", lowered, body)


async def exchange(address: Address, raw: bytes) -> tuple[bytes, bool]:
    """Send ``raw``, read until EOF. Returns (bytes received, was the connection reset)."""
    stream = await trio.open_tcp_stream(*address)
    received = bytearray()
    with trio.fail_after(10):
        try:
            await stream.send_all(raw)
            while data := await stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            return bytes(received), True
        finally:
            await stream.aclose()
    return bytes(received), False


@dataclass
class Reply:
    status: int
    reason: bytes
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A keep-alive HTTP/1.1 client on one connection (h11 in client role)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Reply:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [("host", "mock"), *(headers or {}).items(), ("content-length", str(len(body)))]
        data = self.conn.send(h11.Request(method=method, target=target, headers=hdrs))
        data += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        response: h11.Response | None = None
        chunks = []
        with trio.fail_after(10):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
        assert response is not None
        return Reply(
            response.status_code, response.reason, dict(response.headers), b"".join(chunks)
        )


async def one_request(
    address: Address,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Reply:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        return await Client(stream).request(method, target, body, headers)


async def start_mock(nursery: trio.Nursery, options: MockOptions | None = None) -> Address:
    address: Address = await nursery.start(
        functools.partial(serve_mock_tcp, options or MockOptions())
    )
    return address


@pytest.fixture
async def mock(nursery: trio.Nursery) -> Address:
    return await start_mock(nursery)


def sse_data(body: bytes) -> list[Any]:
    return [
        json.loads(line[6:])
        for line in body.decode().split("\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


# --- pure behaviour ------------------------------------------------------------------------


def test_expected_text_is_the_concatenated_deltas() -> None:
    headers = ((b"x-mock-chunks", b"7"), (b"x-mock-chunk-size", b"5"))
    _, request = make_request(b"POST", CHAT, STREAM_BODY, headers)
    plan = plan_response(request, MockOptions())
    assert plan.events is not None
    events = sse_data(b"".join(plan.events))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == expected_text(7, 5)
    assert len(expected_text(10, 16)) == 160
    assert expected_text(3, 4) == expected_text(10, 16)[:12]


def test_default_chat_body_is_realistically_sized_and_deterministic() -> None:
    _, request = make_request(b"POST", CHAT, CHAT_BODY)
    plan = plan_response(request, MockOptions())
    assert 600 <= len(plan.body) <= 700
    assert plan_response(request, MockOptions()) == plan
    body = json.loads(plan.body)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens(CHAT_BODY),
        "completion_tokens": 10,
        "total_tokens": prompt_tokens(CHAT_BODY) + 10,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    _, other = make_request(b"POST", CHAT, CHAT_BODY.replace(b"hi", b"ho"))
    assert json.loads(plan_response(other, MockOptions()).body)["id"] != body["id"]


def test_write_split_changes_boundaries_not_bytes() -> None:
    datas = set()
    for split in (None, *WriteSplit):
        extra = () if split is None else ((b"x-mock-write-split", split.value.encode()),)
        _, request = make_request(b"POST", CHAT, STREAM_BODY, extra)
        schedule = build_schedule(plan_response(request, MockOptions()))
        datas.add(schedule.data)
        sizes = [len(w.data) for w in schedule.writes]
        if split in (None, WriteSplit.LARGE):
            assert len(sizes) == 1
        elif split is WriteSplit.ONE:
            assert len(sizes) == 2
        elif split is WriteSplit.BYTES:
            assert sizes[1:] == [1] * sum(sizes[1:])
        else:
            assert all(1 <= s <= 64 for s in sizes[1:]) and len(sizes) > 10
    assert len(datas) == 1


def test_random_split_is_seeded() -> None:
    def sizes(seed: bytes) -> list[int]:
        headers = ((b"x-mock-write-split", b"random"), (b"x-mock-seed", seed))
        _, request = make_request(b"POST", CHAT, CHAT_BODY, headers)
        return [len(w.data) for w in build_schedule(plan_response(request, MockOptions())).writes]

    assert sizes(b"1") == sizes(b"1")
    assert sizes(b"1") != sizes(b"2")


def test_chunk_delay_makes_one_timed_write_per_event() -> None:
    headers = ((b"x-mock-chunk-delay", b"0.25"), (b"x-mock-chunks", b"3"))
    _, request = make_request(b"POST", CHAT, STREAM_BODY, headers)
    plan = plan_response(request, MockOptions(first_byte_delay=0.5))
    schedule = build_schedule(plan)
    assert [w.delay for w in schedule.writes] == [0.5, 0.25, 0.25, 0.25, 0.25]  # 3 + final + DONE
    assert schedule.data == render_response(plan)


def test_model_names_and_headers_set_controls() -> None:
    def plan(model: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> ResponsePlan:
        body = b'{"model":"%s","messages":[]}' % model.encode()
        return plan_response(make_request(b"POST", CHAT, body, headers)[1], MockOptions())

    assert plan("mock-reset").fault is Fault.RESET_MID_STREAM
    assert plan("mock-stall").fault is Fault.STALL
    assert plan("mock-slow-250").first_byte_delay == 0.25
    assert plan("mock-status-503").status == 503
    assert plan("mock-zai-1312").status == 429
    assert json.loads(plan("mock-zai-1302-native").body)["code"] == 1302
    assert plan("mock-zai-1302-bogus").status == 200  # not a control: just a model name
    # A header wins over the model name.
    header = ((b"x-mock-first-byte-delay", b"0"),)
    assert plan("mock-slow-250", header).first_byte_delay == 0
    assert plan("mock-unknown-thing").status == 200


# --- the server: byte-exact ----------------------------------------------------------------


@pytest.mark.parametrize("split", [None, *WriteSplit], ids=lambda s: s.value if s else "default")
@pytest.mark.parametrize(
    ("target", "body"),
    [(CHAT, CHAT_BODY), (CHAT, STREAM_BODY), (MESSAGES, ANTHROPIC_STREAM), (b"/v1/models", b"")],
    ids=["chat", "chat-stream", "messages-stream", "models"],
)
async def test_bytes_on_the_wire_equal_the_pure_rendering(
    mock: Address, split: WriteSplit | None, target: bytes, body: bytes
) -> None:
    headers: tuple[tuple[bytes, bytes], ...] = ((b"x-mock-seed", b"3"),)
    if split is not None:
        headers += ((b"x-mock-write-split", split.value.encode()),)
    method = b"GET" if target.endswith(b"/models") else b"POST"
    raw, request = make_request(method, target, body, headers)
    received, reset = await exchange(mock, raw)
    plan = plan_response(request, MockOptions())
    assert not reset
    assert received == build_schedule(plan).data == render_response(plan)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_keep_alive_serves_many_requests_on_one_connection(mock: Address) -> None:
    stream = await trio.open_tcp_stream(*mock)
    async with stream:
        client = Client(stream)
        for i in range(6):
            body = STREAM_BODY if i % 2 else CHAT_BODY
            reply = await client.request(
                "POST", "/v1/chat/completions", body, {"x-mock-chunks": str(i + 1)}
            )
            assert reply.status == 200
            if i % 2:
                assert reply.headers[b"transfer-encoding"] == b"chunked"
                assert reply.headers[b"cache-control"] == b"no-cache"
                text = "".join(
                    e["choices"][0]["delta"].get("content", "") for e in sse_data(reply.body)
                )
            else:
                text = reply.json()["choices"][0]["message"]["content"]
            assert text == expected_text(i + 1, 16)
        reply = await client.request("GET", "/v1/models")
        assert [m["id"] for m in reply.json()["data"]] == list(GLM_MODELS)


async def test_pipelined_requests_are_answered_in_order(mock: Address) -> None:
    first, req1 = make_request(b"POST", CHAT, CHAT_BODY, close=False)
    second, req2 = make_request(b"POST", b"/v1/embeddings", b'{"model":"e","input":"x"}')
    received, _ = await exchange(mock, first + second)
    expected = render_response(plan_response(req1, MockOptions()))
    expected += render_response(plan_response(req2, MockOptions()))
    assert received == expected


# --- controls ------------------------------------------------------------------------------


async def test_status_control_uses_the_api_error_shape(mock: Address) -> None:
    reply = await one_request(
        mock, "POST", "/v1/chat/completions", CHAT_BODY, {"x-mock-status": "503"}
    )
    assert (reply.status, reply.reason) == (503, b"Service Unavailable")
    assert reply.json() == {
        "error": {"message": "mock status 503", "type": "server_error", "code": None}
    }
    headers = {"x-mock-status": "529", "x-mock-retry-after": "4"}
    reply = await one_request(mock, "POST", "/api/anthropic/v1/messages", ANTHROPIC_BODY, headers)
    assert reply.status == 529
    assert reply.headers[b"retry-after"] == b"4"
    assert reply.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "mock status 529"},
    }


@pytest.mark.parametrize("code", [1302, 1303, 1305, 1308, 1310, 1312])
async def test_zai_codes_are_429_with_zai_body(mock: Address, code: int) -> None:
    reply = await one_request(
        mock, "POST", "/api/paas/v4/chat/completions", CHAT_BODY, {"x-mock-zai-code": str(code)}
    )
    assert reply.status == 429
    assert reply.headers[b"retry-after"] == b"1"
    error = reply.json()["error"]
    assert error["code"] == str(code)
    assert error["message"]
    if code in (1308, 1310):
        assert "will reset at 20" in error["message"]


async def test_retry_after_control(mock: Address) -> None:
    headers = {"x-mock-zai-code": "1303", "x-mock-retry-after": "7"}
    reply = await one_request(mock, "POST", "/v1/chat/completions", CHAT_BODY, headers)
    assert reply.headers[b"retry-after"] == b"7"
    headers["x-mock-retry-after"] = "none"
    reply = await one_request(mock, "POST", "/v1/chat/completions", CHAT_BODY, headers)
    assert b"retry-after" not in reply.headers
    body = b'{"model":"mock-zai-1308","messages":[]}'
    reply = await one_request(mock, "POST", "/v1/chat/completions", body)
    assert reply.status == 429
    assert reply.json()["error"]["code"] == "1308"


async def test_invalid_control_is_400(mock: Address) -> None:
    reply = await one_request(
        mock, "POST", "/v1/chat/completions", CHAT_BODY, {"x-mock-chunks": "many"}
    )
    assert reply.status == 400
    assert "x-mock-chunks" in reply.json()["error"]["message"]
    reply = await one_request(
        mock, "POST", "/v1/messages", ANTHROPIC_BODY, {"x-mock-fault": "explode"}
    )
    assert reply.status == 400
    assert reply.json()["type"] == "error"


async def test_first_byte_delay(mock: Address) -> None:
    for headers, body in (
        ({"x-mock-first-byte-delay": "0.15"}, CHAT_BODY),
        ({}, b'{"model":"mock-slow-150"}'),
    ):
        start = trio.current_time()
        reply = await one_request(mock, "POST", "/v1/chat/completions", body, headers)
        assert reply.status == 200
        assert trio.current_time() - start >= 0.15


async def test_chunk_delay_spaces_the_events(mock: Address) -> None:
    stream = await trio.open_tcp_stream(*mock)
    async with stream:
        headers = {"x-mock-chunk-delay": "0.03", "x-mock-chunks": "4"}
        start = trio.current_time()
        reply = await Client(stream).request("POST", "/v1/messages", ANTHROPIC_STREAM, headers)
        elapsed = trio.current_time() - start
    events = [e["type"] for e in sse_data(reply.body)]
    assert events == [
        "message_start", "content_block_start", "ping", *["content_block_delta"] * 4,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert elapsed >= 0.03 * (len(events) - 1)


@pytest.mark.parametrize("split", [None, WriteSplit.ONE, WriteSplit.RANDOM])
@pytest.mark.parametrize("fault", [None, b"reset-mid-stream", b"close-mid-body"])
async def test_paced_bytes_on_the_wire_equal_the_pure_rendering(
    mock: Address, split: WriteSplit | None, fault: bytes | None
) -> None:
    """Paced writes go through the pacer: still exactly the scheduled bytes and ending."""
    headers: tuple[tuple[bytes, bytes], ...] = (
        (b"x-mock-chunk-delay", b"0.003"), (b"x-mock-chunks", b"4"), (b"x-mock-seed", b"5"),
    )  # fmt: skip
    if split is not None:
        headers += ((b"x-mock-write-split", split.value.encode()),)
    if fault is not None:
        headers += ((b"x-mock-fault", fault),)
    raw, request = make_request(b"POST", CHAT, STREAM_BODY, headers)
    schedule = build_schedule(plan_response(request, MockOptions()))
    assert sum(w.delay > 0 for w in schedule.writes) >= 2
    assert await exchange(mock, raw) == (schedule.data, schedule.ending is Ending.RESET)


def test_next_due_counts_from_the_previous_due_time() -> None:
    assert next_due(10.0, 0.02, now=10.005) == 10.02  # a late wake-up does not add up
    assert next_due(10.0, 0.02, now=10.02) == 10.02
    # More than a whole delay behind (a slow reader): the next delay counts from now.
    assert next_due(10.0, 0.02, now=10.5) == 10.52


class RecordingSocket:
    """Enough of a socket for FastSocketStream and the pacer: records (time, data) per send."""

    family = socket.AF_UNIX

    def __init__(self) -> None:
        self.sends: list[tuple[float, bytes]] = []

    def setblocking(self, flag: bool) -> None:
        pass

    def send(self, data: bytes) -> int:
        self.sends.append((trio.current_time(), bytes(data)))
        return len(data)


def paced(n: int, delay: float, first: float = 0.0) -> tuple[Write, ...]:
    return (Write(first, b"head+0"), *(Write(delay, b"event %d" % i) for i in range(1, n)))


async def run_paced(pacer: Pacer, stream: FastSocketStream, writes: tuple[Write, ...]) -> None:
    """What the server's _execute does with a schedule of delayed writes."""
    due, index = trio.current_time(), 0
    while index < len(writes):
        if writes[index].delay > 0:
            index, due = await pacer.write(stream, writes, index, due)
        else:
            await stream.send_all(writes[index].data)
            index += 1


async def test_pacer_sends_each_write_on_the_grid_without_drift(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = Pacer()
    sockets = [RecordingSocket() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(pacer.run)
        start = trio.current_time()
        async with trio.open_nursery() as streams:
            for i, sock in enumerate(sockets):
                writes = paced(20, 0.0201 + i * 0.0007, first=0.0003 * i)
                stream = FastSocketStream(sock)  # type: ignore[arg-type]
                streams.start_soon(run_paced, pacer, stream, writes)
        nursery.cancel_scope.cancel()
    for i, sock in enumerate(sockets):
        delay, first = 0.0201 + i * 0.0007, 0.0003 * i
        assert [data for _, data in sock.sends] == [w.data for w in paced(20, delay)]
        for n, (sent_at, _) in enumerate(sock.sends):
            due = start + first + n * delay
            # Never early; on the next QUANTUM boundary; the lateness never accumulates.
            assert due - 1e-9 <= sent_at <= due + QUANTUM + 1e-9
            assert math.isclose(sent_at / QUANTUM, round(sent_at / QUANTUM), abs_tol=1e-6)


async def test_pacer_cancelled_stream_sends_nothing_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = Pacer()
    cancelled, other = RecordingSocket(), RecordingSocket()
    async with trio.open_nursery() as nursery:
        await nursery.start(pacer.run)
        with trio.move_on_after(0.055):
            await run_paced(pacer, FastSocketStream(cancelled), paced(10, 0.02))  # type: ignore[arg-type]
        await run_paced(pacer, FastSocketStream(other), paced(5, 0.02))  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert [d for _, d in cancelled.sends] == [b"head+0", b"event 1", b"event 2"]
    assert len(other.sends) == 5


async def test_pacer_without_its_task_sleeps_in_the_caller() -> None:
    sock = RecordingSocket()
    await run_paced(Pacer(), FastSocketStream(sock), paced(3, 0.01))  # type: ignore[arg-type]
    assert [d for _, d in sock.sends] == [w.data for w in paced(3, 0.01)]
    assert sock.sends[-1][0] - sock.sends[0][0] >= 0.02


async def test_pacer_hands_a_blocked_write_back_to_the_stream() -> None:
    """A peer that does not read: the send cannot complete at once, the connection's
    task finishes it with send_all (which waits) and the delays go on from there."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 2048  # 512 KiB: far more than the socket buffers
    writes = (Write(0.0, b"head"), Write(0.005, big), Write(0.005, b"tail"))
    pacer = Pacer()
    stream, peer = FastSocketStream(a), FastSocketStream(b)
    received = bytearray()

    async def read_late() -> None:
        await trio.sleep(0.1)
        while data := await peer.receive_some(65536):
            received.extend(data)

    async with trio.open_nursery() as nursery:
        await nursery.start(pacer.run)
        with trio.fail_after(10):
            async with trio.open_nursery() as peers:
                peers.start_soon(read_late)  # until EOF
                await run_paced(pacer, stream, writes)
                await stream.send_eof()
        nursery.cancel_scope.cancel()
    await stream.aclose()
    await peer.aclose()
    assert bytes(received) == b"head" + big + b"tail"


async def test_pacer_raises_like_send_all_on_a_broken_connection() -> None:
    a, b = socket.socketpair()
    b.close()
    pacer = Pacer()
    stream = FastSocketStream(a)
    async with trio.open_nursery() as nursery:
        await nursery.start(pacer.run)
        with pytest.raises(trio.BrokenResourceError):  # the pacer's own send fails
            await run_paced(pacer, stream, (Write(0.002, b"head"), Write(0.002, b"x")))
        nursery.cancel_scope.cancel()
    await stream.aclose()


async def test_echo_shows_what_arrived(mock: Address) -> None:
    raw = (
        b"PUT /any/where?x=1 HTTP/1.1\r\nHost: mock\r\nX-Mock-Echo: 1\r\n"
        b"Authorization: Bearer k\r\nContent-Length: 3\r\nX-Custom: a\r\nConnection: close\r\n"
        b"\r\nabc"
    )
    received, _ = await exchange(mock, raw)
    body = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert body == {
        "method": "PUT",
        "target": "/any/where?x=1",
        "http_version": "1.1",
        "headers": [
            ["host", "mock"], ["x-mock-echo", "1"], ["authorization", "Bearer k"],
            ["content-length", "3"], ["x-custom", "a"], ["connection", "close"],
        ],
        "body_len": 3,
        "body_sha256": hashlib.sha256(b"abc").hexdigest(),
    }  # fmt: skip


# --- faults --------------------------------------------------------------------------------


async def test_reset_before_headers(mock: Address) -> None:
    raw, _ = make_request(b"POST", CHAT, CHAT_BODY, ((b"x-mock-fault", b"reset-before-headers"),))
    assert await exchange(mock, raw) == (b"", True)


@pytest.mark.parametrize(
    ("body", "fault", "reset"),
    [
        pytest.param(STREAM_BODY, b"reset-mid-stream", True, id="reset-stream"),
        pytest.param(CHAT_BODY, b"reset-mid-stream", True, id="reset-json"),
        pytest.param(STREAM_BODY, b"close-mid-body", False, id="close-stream"),
        pytest.param(CHAT_BODY, b"close-mid-body", False, id="close-json"),
        pytest.param(b'{"model":"mock-reset","stream":true}', None, True, id="model-mock-reset"),
    ],
)
async def test_faults_cut_the_body(
    mock: Address, body: bytes, fault: bytes | None, reset: bool
) -> None:
    headers = () if fault is None else ((b"x-mock-fault", fault),)
    raw, request = make_request(b"POST", CHAT, body, headers)
    plan = plan_response(request, MockOptions())
    schedule = build_schedule(plan)
    assert schedule.ending is (Ending.RESET if reset else Ending.CLOSE)
    received = await exchange(mock, raw)
    assert received == (schedule.data, reset)
    full = render_response(plan)
    head_len = full.index(b"\r\n\r\n") + 4
    assert head_len < len(received[0]) < len(full)
    if plan.events is not None:  # half of the events, each a whole chunk
        assert received[0].count(b"\r\ndata: ") == len(plan.events) // 2


@pytest.mark.parametrize(
    ("body", "headers", "expect_head"),
    [
        pytest.param(STREAM_BODY, {"x-mock-fault": "stall"}, True, id="stall-stream"),
        pytest.param(CHAT_BODY, {"x-mock-fault": "stall"}, True, id="stall-json"),
        pytest.param(b'{"model":"mock-stall","stream":true}', {}, True, id="model-mock-stall"),
        pytest.param(CHAT_BODY, {"x-mock-fault": "stall-headers"}, False, id="stall-headers"),
    ],
)
async def test_stalls_send_nothing_more(
    mock: Address, body: bytes, headers: dict[str, str], expect_head: bool
) -> None:
    raw, request = make_request(
        b"POST", CHAT, body, tuple((k.encode(), v.encode()) for k, v in headers.items())
    )
    expected = build_schedule(plan_response(request, MockOptions())).data
    assert bool(expected) is expect_head
    stream = await trio.open_tcp_stream(*mock)
    async with stream:
        await stream.send_all(raw)
        received = b""
        with trio.move_on_after(10):
            while len(received) < len(expected):
                received += await stream.receive_some(65536)
        assert received == expected
        if b'"stream":true' in body:  # headers and the first event
            assert received.count(b"\r\ndata: ") == 1
        with trio.move_on_after(0.2) as idle:  # the point of a stall: nothing arrives
            await stream.receive_some(65536)
        assert idle.cancelled_caught


# --- routes, auth, errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/v1/chat/completions",
        "/api/paas/v4/chat/completions",
        "/api/coding/paas/v4/chat/completions?x=1",
    ],
)
async def test_routes_match_by_suffix(mock: Address, target: str) -> None:
    reply = await one_request(mock, "POST", target, CHAT_BODY)
    assert reply.json()["object"] == "chat.completion"


async def test_unknown_route_and_bad_json(mock: Address) -> None:
    reply = await one_request(mock, "GET", "/v1/nothing")
    assert reply.status == 404
    assert reply.json()["error"]["type"] == "not_found_error"
    reply = await one_request(mock, "GET", "/v1/chat/completions")
    assert reply.status == 404
    reply = await one_request(mock, "POST", "/v1/chat/completions", b"{nope")
    assert reply.status == 400
    assert set(reply.json()["error"]) == {"message", "type", "code"}
    reply = await one_request(mock, "POST", "/api/anthropic/v1/messages?beta=true", b"{nope")
    assert reply.status == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert reply.json()["type"] == "error"


async def test_bad_http_is_400(mock: Address) -> None:
    received, _ = await exchange(mock, b"NOT HTTP AT ALL\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_body_cap(nursery: trio.Nursery) -> None:
    address = await start_mock(nursery, MockOptions(max_body_bytes=1000))
    raw, _ = make_request(b"POST", CHAT, b"x" * 1001)
    received, _ = await exchange(address, raw)
    assert received.startswith(b"HTTP/1.1 413 ")
    chunked = b"POST /v1/chat/completions HTTP/1.1\r\nhost: m\r\ntransfer-encoding: chunked\r\n\r\n"
    chunk = b"200\r\n" + b"x" * 0x200 + b"\r\n"  # no content-length: the cap counts as it reads
    received, _ = await exchange(address, chunked + chunk * 2 + b"0\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 413 ")
    # The default cap of 64 MiB is checked against content-length before reading.
    default = await start_mock(nursery)
    received, _ = await exchange(
        default,
        b"POST /v1/embeddings HTTP/1.1\r\nhost: m\r\ncontent-length: %d\r\n\r\n" % ((64 << 20) + 1),
    )
    assert received.startswith(b"HTTP/1.1 413 ")


async def test_expect_100_continue(mock: Address) -> None:
    stream = await trio.open_tcp_stream(*mock)
    async with stream:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: m\r\nexpect: 100-continue\r\n"
        await stream.send_all(
            head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(CHAT_BODY)
        )
        assert await stream.receive_some(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(CHAT_BODY)
        received = b""
        while data := await stream.receive_some(65536):
            received += data
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_auth_mirrors_zai(nursery: trio.Nursery) -> None:
    address = await start_mock(nursery, MockOptions(api_key="sekret"))

    async def status(target: str, body: bytes, headers: dict[str, str]) -> Reply:
        return await one_request(address, "POST", target, body, headers)

    openai_path, messages = "/v1/chat/completions", "/api/anthropic/v1/messages"
    assert (await status(openai_path, CHAT_BODY, {"authorization": "Bearer sekret"})).status == 200
    for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "sekret"}):
        reply = await status(openai_path, CHAT_BODY, headers)
        assert reply.status == 401
        assert reply.json()["error"]["type"] == "authentication_error"
    for target in (messages, messages + "/count_tokens"):
        assert (await status(target, ANTHROPIC_BODY, {"x-api-key": "sekret"})).status == 200
        bare = await status(target, ANTHROPIC_BODY, {"authorization": "Bearer sekret"})
        assert (bare.status, bare.body, bare.headers[b"content-length"]) == (404, b"", b"0")
        for headers in ({}, {"x-api-key": "wrong"}):
            reply = await status(target, ANTHROPIC_BODY, headers)
            assert reply.status == 401
            assert reply.json() == {
                "type": "error",
                "error": {"type": "authentication_error", "message": "invalid x-api-key"},
            }


async def test_tls(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    address: Address = await nursery.start(
        functools.partial(serve_mock_tcp, MockOptions(), ssl_context=server_context)
    )
    tcp = await trio.open_tcp_stream(*address)
    stream = trio.SSLStream(tcp, client_context, server_hostname="127.0.0.1", https_compatible=True)
    async with stream:
        client = Client(stream)
        for _ in range(2):
            reply = await client.request("POST", "/v1/chat/completions", STREAM_BODY)
            assert reply.status == 200
            assert b"data: [DONE]" in reply.body


# --- the official SDKs ---------------------------------------------------------------------


class ThreadedMock:
    """The mock in a background thread with its own trio.run, for the synchronous SDKs."""

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self.ready: queue.Queue[tuple[Address, trio.CancelScope, trio.lowlevel.TrioToken]] = (
            queue.Queue()
        )
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                address = await nursery.start(functools.partial(serve_mock_tcp, self.options))
                self.ready.put((address, scope, trio.lowlevel.current_trio_token()))

    def __enter__(self) -> str:
        self.thread.start()
        (host, port), self.scope, self.token = self.ready.get(timeout=10)
        return f"http://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
        self.thread.join(10)


@pytest.fixture(scope="module")
def mock_url() -> Iterator[str]:
    with ThreadedMock(MockOptions()) as url:
        yield url


@pytest.fixture
def oai(mock_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key="k", base_url=mock_url + "/v1", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(mock_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key="k", base_url=mock_url, max_retries=0) as client:
        yield client


MESSAGES_IN: Any = [{"role": "user", "content": "Say something."}]


def test_openai_chat(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="glm-4.6", messages=MESSAGES_IN)
    assert completion.choices[0].message.content == expected_text(10, 16)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "glm-4.6"
    assert completion.usage is not None and completion.usage.completion_tokens == 10
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 10


def test_openai_chat_stream(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="glm-4.5", messages=MESSAGES_IN, stream=True,
        extra_headers={"x-mock-chunks": "5", "x-mock-chunk-size": "3"},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(5, 3)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_openai_legacy_completions_embeddings_models(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model="glm-4.6", prompt="Once")
    assert completion.choices[0].text == expected_text(10, 16)
    stream = oai.completions.create(model="glm-4.6", prompt="Once", stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected_text(10, 16)
    formats: tuple[Literal["float", "base64"], ...] = ("float", "base64")
    for fmt in formats:
        result = oai.embeddings.create(model="embedding-3", input=["a", "b"], encoding_format=fmt)
        # Asked for base64 explicitly, the SDK hands over the string: float32 little-endian.
        raw: list[Any] = [d.embedding for d in result.data]
        vectors = [
            list(struct.unpack("<8f", base64.b64decode(v))) if isinstance(v, str) else v
            for v in raw
        ]
        assert vectors == [embedding_vector("a"), embedding_vector("b")]
        assert result.usage.prompt_tokens > 0
    assert [m.id for m in oai.models.list()] == list(GLM_MODELS)


def test_openai_sees_status_controls(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        oai.chat.completions.create(model="mock-status-503", messages=MESSAGES_IN)
    assert info.value.status_code == 503
    with pytest.raises(openai.RateLimitError) as limited:
        oai.chat.completions.create(model="mock-zai-1302", messages=MESSAGES_IN)
    body: Any = limited.value.body  # the SDK unwraps {"error": ...}
    assert body["code"] == "1302"
    assert body["message"].startswith("High concurrency")


def test_anthropic_messages(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="glm-4.6", max_tokens=100, messages=MESSAGES_IN)
    assert message.content[0].text == expected_text(10, 16)  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 10 and message.usage.input_tokens > 0
    count = claude.messages.count_tokens(model="glm-4.6", messages=MESSAGES_IN)
    assert count.input_tokens > 0


def test_anthropic_stream_helpers(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="glm-4.6", max_tokens=100, messages=MESSAGES_IN,
        extra_headers={"x-mock-chunks": "6"},
    ) as stream:  # fmt: skip
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(deltas) == expected_text(6, 16)
    assert final.content[0].text == expected_text(6, 16)  # type: ignore[union-attr]
    assert final.usage.output_tokens == 6
    assert final.stop_reason == "end_turn"


async def test_anthropic_async_stream(mock: Address) -> None:
    # The async SDK runs on asyncio; drive it from a thread so trio stays in charge here.
    url = f"http://{mock[0]}:{mock[1]}"

    def run_client() -> str:
        import asyncio

        async def go() -> str:
            client = anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0)
            async with (
                client,
                client.messages.stream(
                    model="glm-4.6",
                    max_tokens=9,
                    messages=MESSAGES_IN,
                ) as s,
            ):
                return await s.get_final_text()

        return asyncio.run(go())

    assert await trio.to_thread.run_sync(run_client) == expected_text(10, 16)


# --- run() in real processes ---------------------------------------------------------------


@contextlib.contextmanager
def spawn_mock(workers: int, tls: str = "") -> Iterator[tuple[subprocess.Popen[str], Address]]:
    code = (
        "from zaiproxy.mock.run import run; from zaiproxy.mock.behaviour import MockOptions; "
        f"raise SystemExit(run(MockOptions(chunks=3), '127.0.0.1', 0, workers={workers}{tls}))"
    )
    # A session of its own, so a process-group SIGINT (Ctrl-C) does not reach pytest.
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        scheme = "https" if tls else "http"
        assert line.startswith(f"mock-upstream listening on {scheme}://127.0.0.1:"), line
        assert line.endswith(f" ({workers} workers)\n")
        port = int(line.rsplit(":", 1)[1].split()[0])
        yield proc, ("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def spawned_workers(pid: int) -> list[int]:
    """Children of ``pid`` started by multiprocessing's spawn (not its resource tracker)."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_run_serves_until_a_signal(workers: int, signum: signal.Signals) -> None:
    with spawn_mock(workers) as (proc, address):
        assert len(spawned_workers(proc.pid)) == (workers if workers > 1 else 0)
        for _ in range(8):  # new connections: the kernel spreads them over the workers
            reply = await one_request(address, "POST", "/v1/chat/completions", STREAM_BODY)
            assert reply.status == 200
            assert reply.body.count(b"data: ") == 3 + 2
        if signum is signal.SIGINT:
            os.killpg(proc.pid, signum)  # like Ctrl-C: the whole process group gets it
        else:
            proc.send_signal(signum)
        _, stderr = await trio.to_thread.run_sync(functools.partial(proc.communicate, timeout=20))
        assert proc.returncode == 0
        assert "Traceback" not in stderr, stderr


async def test_run_with_tls_workers(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with spawn_mock(2, f", certfile={str(certfile)!r}, keyfile={str(keyfile)!r}") as (
        proc,
        address,
    ):
        tcp = await trio.open_tcp_stream(*address)
        stream = trio.SSLStream(tcp, client_context, server_hostname="127.0.0.1")
        async with stream:
            reply = await Client(stream).request("GET", "/v1/models")
            assert reply.status == 200
        proc.terminate()
        await trio.to_thread.run_sync(functools.partial(proc.communicate, timeout=20))
        assert proc.returncode == 0


async def test_workers_exit_when_the_parent_is_killed() -> None:
    with spawn_mock(2) as (proc, address):
        workers = spawned_workers(proc.pid)
        assert len(workers) == 2
        pidfds = [os.pidfd_open(pid) for pid in workers]  # readable once the process exits
        try:
            proc.kill()  # SIGKILL: no chance to terminate its children
            with trio.fail_after(10):
                for fd in pidfds:
                    await trio.lowlevel.wait_readable(fd)
        finally:
            for fd in pidfds:
                os.close(fd)
        with pytest.raises(OSError):  # nobody holds the port any more
            await trio.open_tcp_stream(*address)


async def test_client_leaving_mid_stream_does_not_hurt_the_server(mock: Address) -> None:
    raw, _ = make_request(b"POST", CHAT, STREAM_BODY, ((b"x-mock-chunk-delay", b"0.05"),))
    stream = await trio.open_tcp_stream(*mock)
    await stream.send_all(raw)
    await stream.receive_some(10)
    await stream.aclose()
    reply = await one_request(mock, "POST", "/v1/chat/completions", CHAT_BODY)
    assert reply.status == 200


def test_options_are_validated() -> None:
    for bad in ({"chunks": -1}, {"chunk_size": 0}, {"chunk_delay": -0.5}, {"api_key": ""}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MockOptions(**bad)


async def test_http_1_0_gets_connection_close(mock: Address) -> None:
    raw = b"GET /v1/models HTTP/1.0\r\n\r\n"
    request = MockRequest(b"GET", b"/v1/models", b"1.0", ())
    received, _ = await exchange(mock, raw)
    assert received == render_response(plan_response(request, MockOptions()))
    assert b"\r\nconnection: close\r\n" in received


def test_schedule_cache_is_bounded_and_transparent() -> None:
    cache = ScheduleCache(MockOptions())
    requests = [make_request(b"POST", CHAT, b'{"model":"m%d"}' % i)[1] for i in range(300)]
    for request in requests:
        assert cache.schedule(request) == build_schedule(plan_response(request, MockOptions()))
    assert cache.schedule(requests[-1]) is cache.schedule(requests[-1])
    assert len(cache._entries) == ScheduleCache.MAX_ENTRIES
    assert requests[0] not in cache._entries  # the oldest went first
    big = make_request(b"POST", CHAT, CHAT_BODY, ((b"x-mock-chunks", b"10000"),))[1]
    cache.schedule(big)
    assert big not in cache._entries


# --- Z.AI body shapes, fail-times, statistics ------------------------------------------------


def zai_plan(headers: dict[str, str], *, seen: int = 1, body: bytes = CHAT_BODY) -> ResponsePlan:
    encoded = tuple((k.encode(), v.encode()) for k, v in headers.items())
    _, request = make_request(b"POST", CHAT, body, encoded)
    return plan_response(request, MockOptions(), seen=seen)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, {"error": {"code": "1303", "message": ZAI_MESSAGES[1303]}}),
        (
            {"x-mock-zai-shape": "openai"},
            {"error": {"code": "1303", "message": ZAI_MESSAGES[1303]}},
        ),
        (
            {"x-mock-zai-shape": "native"},
            {"code": 1303, "msg": ZAI_MESSAGES[1303], "success": False},
        ),
        (
            {"x-mock-zai-shape": "ANTHROPIC"},
            {
                "type": "error",
                "error": {"type": "rate_limit_error", "message": "[1303] " + ZAI_MESSAGES[1303]},
            },
        ),
        (
            {"x-mock-zai-retry-after-body": "5"},
            {"error": {"code": "1303", "message": ZAI_MESSAGES[1303], "retry_after": 5}},
        ),
        (
            {"x-mock-zai-shape": "native", "x-mock-zai-retry-after-body": "2.5"},
            {"code": 1303, "msg": ZAI_MESSAGES[1303], "success": False, "retry_after": 2.5},
        ),
        (
            {"x-mock-zai-shape": "anthropic", "x-mock-zai-retry-after-body": "0"},
            {
                "type": "error",
                "error": {
                    "type": "rate_limit_error",
                    "message": "[1303] " + ZAI_MESSAGES[1303],
                    "retry_after": 0,
                },
            },
        ),
    ],
)
def test_zai_shape_and_body_retry_after(headers: dict[str, str], expected: Any) -> None:
    plan = zai_plan({"x-mock-zai-code": "1303", **headers})
    assert plan.status == 429
    assert json.loads(plan.body) == expected
    assert (b"retry-after", b"1") in plan.headers  # the header default is unchanged


def test_zai_controls_are_validated() -> None:
    for headers in (
        {"x-mock-zai-shape": "xml"},
        {"x-mock-zai-retry-after-body": "-1"},
        {"x-mock-zai-retry-after-body": "soon"},
        {"x-mock-fail-times": "2"},  # no key to count against
        {"x-mock-fail-key": "k", "x-mock-fail-times": "-1"},
        {"x-mock-fail-times": "1", "x-mock-fail-key": "k" * 201},
    ):
        plan = zai_plan(headers)
        assert plan.status == 400, headers
        assert list(headers)[-1] in json.loads(plan.body)["error"]["message"]  # the bad one


async def test_zai_shapes_on_the_wire(mock: Address) -> None:
    headers = {
        "x-mock-zai-code": "1308",
        "x-mock-zai-shape": "native",
        "x-mock-zai-retry-after-body": "30",
        "x-mock-retry-after": "none",
    }
    reply = await one_request(mock, "POST", "/api/paas/v4/chat/completions", CHAT_BODY, headers)
    assert reply.status == 429
    assert b"retry-after" not in reply.headers
    assert reply.json() == {
        "code": 1308, "msg": ZAI_MESSAGES[1308], "success": False, "retry_after": 30,
    }  # fmt: skip
    body = b'{"model":"mock-zai-1312-anthropic","max_tokens":5,"messages":[]}'
    reply = await one_request(mock, "POST", "/api/anthropic/v1/messages", body)
    assert reply.status == 429
    assert reply.headers[b"retry-after"] == b"1"
    assert reply.json()["error"]["message"] == "[1312] " + ZAI_MESSAGES[1312]


def test_fail_times_is_a_function_of_seen() -> None:
    headers = {"x-mock-fail-key": "k", "x-mock-fail-times": "2"}
    assert [zai_plan(headers, seen=n).status for n in (1, 2, 3, 4)] == [429, 429, 200, 200]
    assert json.loads(zai_plan(headers).body) == {
        "error": {"code": "1302", "message": ZAI_MESSAGES[1302]}  # the default failure
    }
    named = {**headers, "x-mock-zai-code": "1303", "x-mock-zai-shape": "native"}
    assert json.loads(zai_plan(named, seen=2).body)["code"] == 1303
    assert zai_plan(named, seen=3).status == 200  # the status controls are spent too
    status = {**headers, "x-mock-status": "503"}
    assert [zai_plan(status, seen=n).status for n in (2, 3)] == [503, 200]
    model = b'{"model":"mock-zai-1310","messages":[]}'
    assert json.loads(zai_plan(headers, body=model).body)["error"]["code"] == "1310"
    assert zai_plan(headers, body=model, seen=3).status == 200
    assert zai_plan({"x-mock-fail-key": "k", "x-mock-fail-times": "0"}).status == 200
    assert zai_plan({"x-mock-fail-key": "k"}).status == 200  # a key alone only counts


async def test_fail_times_then_success(mock: Address) -> None:
    headers = {"x-mock-fail-key": "retry-1", "x-mock-fail-times": "2", "x-mock-retry-after": "0"}
    stream = await trio.open_tcp_stream(*mock)
    async with stream:
        client = Client(stream)
        replies = [
            await client.request("POST", CHAT.decode(), CHAT_BODY, headers) for _ in range(3)
        ]
    assert [r.status for r in replies] == [429, 429, 200]
    assert replies[0].headers[b"retry-after"] == b"0"
    assert replies[0].json()["error"]["code"] == "1302"
    assert replies[2].json()["choices"][0]["message"]["content"] == expected_text(10, 16)
    # Another key has its own count, on new connections too; GET routes fail as well.
    other = {"x-mock-fail-key": "retry-2", "x-mock-fail-times": "1"}
    assert (await one_request(mock, "GET", "/v1/models", b"", other)).status == 429
    assert (await one_request(mock, "GET", "/v1/models", b"", other)).status == 200
    reply = await one_request(mock, "POST", CHAT.decode(), CHAT_BODY, headers)
    assert reply.status == 200
    # Resetting the statistics does not re-arm the failures.
    await one_request(mock, "POST", "/mock/stats/reset")
    reply = await one_request(mock, "POST", CHAT.decode(), CHAT_BODY, headers)
    assert reply.status == 200


async def stats(address: Address) -> Any:
    """GET /mock/stats without its quota section (tests/test_mock_quota.py reads that)."""
    reply = await one_request(address, "GET", "/mock/stats")
    assert reply.status == 200
    body = reply.json()
    assert set(body.pop("quota")) == {"polls", "accounts"}
    return body


async def test_stats_count_requests_paths_and_keys(mock: Address) -> None:
    empty = {"requests": 0, "in_flight": 0, "peak_in_flight": 0, "by_key": {}, "by_path": {}}
    assert await stats(mock) == empty
    assert await stats(mock) == empty  # reading the statistics is not counted
    await one_request(mock, "POST", "/v1/chat/completions?x=1", CHAT_BODY, {"x-mock-fail-key": "a"})
    await one_request(mock, "POST", "/v1/chat/completions", CHAT_BODY, {"x-mock-fail-key": "a"})
    await one_request(mock, "GET", "/v1/models", b"", {"x-mock-fail-key": "b"})
    await one_request(mock, "GET", "/nowhere")
    await one_request(mock, "POST", "/v1/chat/completions", b"{bad", {"x-mock-chunks": "x"})
    assert await stats(mock) == {
        "requests": 5,
        "in_flight": 0,
        "peak_in_flight": 1,
        "by_key": {"a": 2, "b": 1},
        "by_path": {"/v1/chat/completions": 3, "/v1/models": 1, "/nowhere": 1},
    }
    reply = await one_request(mock, "POST", "/mock/stats/reset")
    assert reply.status == 200
    assert {k: v for k, v in reply.json().items() if k != "quota"} == empty
    assert await stats(mock) == empty
    for method, target in (("POST", "/mock/stats"), ("GET", "/mock/stats/reset")):
        reply = await one_request(mock, method, target)
        assert reply.status == 405
        assert reply.headers[b"allow"] == (b"POST" if target.endswith("reset") else b"GET, HEAD")
    assert (await stats(mock))["requests"] == 0


async def test_stats_track_in_flight_and_peak(mock: Address) -> None:
    """Stalled streams stay in flight until their client leaves (the finally)."""
    raw, _ = make_request(b"POST", CHAT, STREAM_BODY, ((b"x-mock-fault", b"stall"),))
    streams = []
    for _ in range(3):
        stream = await trio.open_tcp_stream(*mock)
        await stream.send_all(raw)
        received = b""
        with trio.fail_after(10):
            while b"\r\ndata: " not in received:  # the head and the first event
                received += await stream.receive_some(65536)
        streams.append(stream)
    assert await stats(mock) == {
        "requests": 3, "in_flight": 3, "peak_in_flight": 3, "by_key": {},
        "by_path": {"/v1/chat/completions": 3},
    }  # fmt: skip
    await streams.pop().aclose()
    await trio.testing.wait_all_tasks_blocked()  # the mock has seen the FIN
    current = await stats(mock)
    assert (current["in_flight"], current["peak_in_flight"]) == (2, 3)
    await one_request(mock, "POST", "/mock/stats/reset")
    current = await stats(mock)
    assert (current["requests"], current["in_flight"], current["peak_in_flight"]) == (0, 2, 2)
    for stream in streams:
        await stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert (await stats(mock))["in_flight"] == 0


async def test_stats_count_a_request_whose_client_leaves_before_the_answer(mock: Address) -> None:
    stream = await trio.open_tcp_stream(*mock)
    raw, _ = make_request(b"POST", CHAT, CHAT_BODY, ((b"x-mock-fault", b"stall-headers"),))
    await stream.send_all(raw)
    await trio.testing.wait_all_tasks_blocked()  # the mock has read the request
    assert (await stats(mock))["in_flight"] == 1
    await stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert (await stats(mock))["in_flight"] == 0
    assert (await stats(mock))["requests"] == 1


def test_bounded_counters() -> None:
    counter = BoundedCounter(2)
    assert [counter.hit(k) for k in ("a", "b", "a", "c", "a")] == [1, 1, 2, 1, 3]
    assert counter.as_dict() == {"c": 1, "a": 3}  # "b" was the least recently used
    assert repr(counter) == "BoundedCounter(2/2 keys)"
    stats = MockStats(max_keys=2, max_paths=1)
    for key in ("x", "y", "z", None):
        stats.started(b"/p/" + str(key).encode(), key)
    stats.finished()
    assert stats.snapshot() == {
        "requests": 4, "in_flight": 3, "peak_in_flight": 4,
        "by_key": {"y": 1, "z": 1}, "by_path": {"/p/None": 1},
    }  # fmt: skip
    assert repr(stats) == "MockStats(requests=4, in_flight=3, peak_in_flight=4)"


# --- x-mock-usage --------------------------------------------------------------------------

COMPLETIONS = b"/v1/completions"
COMPLETION_STREAM = b'{"model":"glm-4.6","stream":true,"prompt":"Once"}'
COMPLETION_BODY = b'{"model":"glm-4.6","prompt":"Once"}'
USAGE_HEAD = {"x-mock-chunks": "3", "x-mock-chunk-size": "4"}


def usage_plan(target: bytes, body: bytes, usage: str | None) -> ResponsePlan:
    headers = {**USAGE_HEAD, **({} if usage is None else {"x-mock-usage": usage})}
    encoded = tuple((k.encode(), v.encode()) for k, v in headers.items())
    return plan_response(make_request(b"POST", target, body, encoded)[1], MockOptions())


def parsed_events(plan: ResponsePlan) -> list[SSEEvent]:
    assert plan.events is not None
    parser = SSEParser()
    events = [e for chunk in plan.events for e in parser.feed(chunk)]
    return events + parser.close()


def openai_usage(body: bytes) -> dict[str, Any]:
    prompt = prompt_tokens(body)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": 3,
        "total_tokens": prompt + 3,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


@pytest.mark.parametrize(
    ("target", "body", "obj", "finish"),
    [
        (
            CHAT,
            STREAM_BODY,
            "chat.completion.chunk",
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"},
        ),
        (
            COMPLETIONS,
            COMPLETION_STREAM,
            "text_completion",
            {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"},
        ),
    ],
    ids=["chat", "completions"],
)
def test_usage_modes_of_openai_streams(
    target: bytes, body: bytes, obj: str, finish: dict[str, Any]
) -> None:
    default = usage_plan(target, body, None)
    assert usage_plan(target, body, "final").events == default.events  # byte-identical
    assert usage_plan(target, body, "FINAL").events == default.events

    final = parsed_events(default)
    assert final[-1].data == "[DONE]"
    *text, last = [json.loads(e.data) for e in final[:-1]]
    assert len(text) == 3 and all("usage" not in c for c in text)
    assert last["object"] == obj
    assert last["choices"] == [finish]
    assert last["usage"] == openai_usage(body)

    separate = parsed_events(usage_plan(target, body, "separate"))
    assert [e.data for e in separate[:3]] == [e.data for e in final[:3]]  # same text chunks
    assert separate[-1].data == "[DONE]"
    assert len(separate) == len(final) + 1
    finish_chunk, usage_chunk = (json.loads(e.data) for e in separate[3:5])
    assert finish_chunk == {k: v for k, v in last.items() if k != "usage"}
    assert "usage" not in finish_chunk
    # The extra chunk: the same envelope (id, object, created, model, ...), no choices.
    assert usage_chunk == {**finish_chunk, "choices": [], "usage": openai_usage(body)}
    assert list(usage_chunk)[-2:] == ["choices", "usage"]

    none = parsed_events(usage_plan(target, body, "none"))
    assert len(none) == len(final)
    assert [e.data for e in none[:-2]] == [e.data for e in final[:-2]]
    assert json.loads(none[-2].data) == finish_chunk
    assert none[-1].data == "[DONE]"
    assert b"usage" not in b"".join(usage_plan(target, body, "none").events or ())


def test_usage_modes_of_anthropic_streams() -> None:
    default = usage_plan(MESSAGES, ANTHROPIC_STREAM, None)
    assert usage_plan(MESSAGES, ANTHROPIC_STREAM, "final").events == default.events
    assert usage_plan(MESSAGES, ANTHROPIC_STREAM, "separate").events == default.events
    final = parsed_events(default)
    none = parsed_events(usage_plan(MESSAGES, ANTHROPIC_STREAM, "none"))
    assert [e.event for e in none] == [e.event for e in final] == [
        "message_start", "content_block_start", "ping",
        "content_block_delta", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    start = json.loads(final[0].data)
    assert start["message"]["usage"] == {
        "input_tokens": prompt_tokens(ANTHROPIC_STREAM), "output_tokens": 1,
    }  # fmt: skip
    assert json.loads(none[0].data) == {
        **start, "message": {**start["message"], "usage": {"input_tokens": 0, "output_tokens": 0}},
    }  # fmt: skip
    assert [e.data for e in none[1:7]] == [e.data for e in final[1:7]]
    assert json.loads(final[7].data)["usage"] == {"output_tokens": 3}
    assert json.loads(none[7].data) == {
        "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    }  # fmt: skip
    assert none[8] == final[8]


@pytest.mark.parametrize(
    ("target", "body"),
    [(CHAT, CHAT_BODY), (COMPLETIONS, COMPLETION_BODY), (MESSAGES, ANTHROPIC_BODY)],
    ids=["chat", "completions", "messages"],
)
def test_usage_modes_of_whole_bodies(target: bytes, body: bytes) -> None:
    default = usage_plan(target, body, None)
    assert default.events is None and default.status == 200
    assert usage_plan(target, body, "final").body == default.body
    assert usage_plan(target, body, "separate").body == default.body
    expected = json.loads(default.body)
    assert "usage" in expected
    del expected["usage"]
    none = usage_plan(target, body, "none").body
    assert json.loads(none) == expected
    assert list(json.loads(none)) == list(expected)  # key order kept


def test_usage_model_names_and_validation() -> None:
    def events(model: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[bytes, ...]:
        body = b'{"model":"%s","stream":true,"messages":[]}' % model.encode()
        plan = plan_response(make_request(b"POST", CHAT, body, headers)[1], MockOptions())
        assert plan.events is not None
        return plan.events

    assert b'"choices":[],"usage"' in events("mock-usage-separate")[-2]
    assert not any(b'"usage"' in e for e in events("mock-usage-none"))  # the name has "usage-"
    assert b'"usage"' in events("mock-usage-final")[-2]
    assert b'"usage"' in events("mock-usage-bogus")[-2]  # not a control: just a model name
    # A header wins over the model name.
    assert b'"usage"' in events("mock-usage-none", ((b"x-mock-usage", b"final"),))[-2]
    assert not any(b'"usage"' in e for e in events("glm-4.6", ((b"x-mock-usage", b"none"),)))
    bad = usage_plan(CHAT, STREAM_BODY, "sometimes")
    assert bad.status == 400
    assert "x-mock-usage" in json.loads(bad.body)["error"]["message"]


def test_schedule_cache_keys_on_the_usage_control() -> None:
    cache = ScheduleCache(MockOptions())
    schedules = {}
    for usage in (None, "final", "separate", "none"):
        headers = () if usage is None else ((b"x-mock-usage", usage.encode()),)
        request = make_request(b"POST", CHAT, STREAM_BODY, headers)[1]
        schedules[usage] = cache.schedule(request).data
        assert cache.schedule(request) is cache.schedule(request)  # memoised
    # The header is echoed in nothing, so final and the default give the same bytes.
    assert schedules[None] == schedules["final"]
    assert len({schedules["final"], schedules["separate"], schedules["none"]}) == 3


def test_openai_sdk_reads_the_separate_usage_chunk(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="glm-4.6", messages=MESSAGES_IN, stream=True,
        extra_headers={"x-mock-usage": "separate", "x-mock-chunks": "4"},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_usage_none_on_the_wire(mock: Address) -> None:
    reply = await one_request(
        mock, "POST", "/v1/messages", ANTHROPIC_STREAM, {"x-mock-usage": "none"}
    )
    assert reply.status == 200
    data = sse_data(reply.body)
    assert data[0]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert [d["type"] for d in data if "usage" in d] == []
