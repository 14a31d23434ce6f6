"""The C load generator (bench/loadgen) against the real mock upstream (a child process).

Expected bodies come from the mock's pure planner (``plan_response``), not from the
loadgen, so a body check that passes is a byte comparison against an independent
source. Every run is short (0.5-1 s, 1-4 connections).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import loadgen
from tests.harness import UPSTREAM_KEY, ProcessServer
from zaiproxy.mock.behaviour import MockOptions, MockRequest, plan_response

# Run once, with h11: `make test`'s second run (h11-mypyc) is for what parses HTTP.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="the C load generator does not use the proxy's HTTP parser")

PATH = "/api/paas/v4/chat/completions"
JSON_BODY = (
    b'{"model":"glm-4.6","stream":false,"messages":'
    b'[{"role":"user","content":"Say hello in one short sentence."}]}'
)
STREAM_BODY = (
    b'{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true},"messages":'
    b'[{"role":"user","content":"Say hello in one short sentence."}]}'
)


def chat(
    port: int, *, stream: bool = False, body: bytes | None = None, **controls: str
) -> tuple[bytes, bytes]:
    """The raw request (``controls``: x-mock-* headers, ``chunk_delay`` -> x-mock-chunk-delay)
    and the de-framed body the mock answers it with."""
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"}
    headers.update({f"x-mock-{k.replace('_', '-')}": v for k, v in controls.items()})
    if body is None:
        body = STREAM_BODY if stream else JSON_BODY
    raw = loadgen.http_request("POST", PATH, headers, body, port=port)
    planned = plan_response(
        MockRequest(
            b"POST",
            PATH.encode(),
            b"1.1",
            tuple((k.lower().encode(), v.encode()) for k, v in headers.items()),
            body,
        ),
        MockOptions(api_key=UPSTREAM_KEY),
    )
    expected = b"".join(planned.events) if planned.events is not None else planned.body
    return raw, expected


def run(mock: ProcessServer, request: bytes, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("connections", 2)
    kwargs.setdefault("duration", 0.5)
    return loadgen.run("127.0.0.1", mock.port, request, **kwargs)


@pytest.fixture(scope="module")
def binary() -> Path:
    return loadgen.build()


def assert_ordered(result: dict[str, Any]) -> None:
    lat, ttfb = result["latency_us"], result["ttfb_us"]
    for key in ("p50", "p90", "p99", "max"):
        assert lat[key] >= ttfb[key] > 0, (key, lat, ttfb)
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_build_is_cached_by_source_hash(binary: Path) -> None:
    assert binary.name.startswith("loadgen-") and len(binary.name) == len("loadgen-") + 12
    assert loadgen.build() == binary
    assert binary.stat().st_mode & 0o111


def test_content_length_body_verified(mock: ProcessServer) -> None:
    raw, expected = chat(mock.port)
    assert b'"usage"' in expected and len(expected) > 400
    result = run(mock, raw, expect_body=expected)
    assert result["errors"] == {} and result["errors_total"] == 0
    assert result["requests"] > 20
    assert result["bytes_received"] > result["requests"] * len(expected)
    assert result["rps"] == pytest.approx(result["requests"] / result["duration_s"], rel=0.01)
    assert result["connections"] == 2 and result["reconnects"] == 0
    assert_ordered(result)


def test_large_request_body_written_in_pieces(mock: ProcessServer) -> None:
    raw, expected = chat(mock.port, body=JSON_BODY.replace(b"Say hello", b"x" * 300_000))
    assert len(raw) > 300_000
    assert b'"prompt_tokens":75' in expected  # the mock read all of it
    result = run(mock, raw, expect_body=expected)
    assert result["errors"] == {} and result["requests"] > 5


def test_wrong_body_is_a_mismatch(mock: ProcessServer) -> None:
    raw, expected = chat(mock.port)
    i = len(expected) // 2
    changed = expected[:i] + bytes([expected[i] ^ 1]) + expected[i + 1 :]
    for wrong in (changed, expected[:-1], expected + b"\n"):
        result = run(mock, raw, expect_body=wrong, duration=0.3)
        assert result["requests"] == 0
        assert set(result["errors"]) == {"body_mismatch"}
        assert result["errors"]["body_mismatch"] == result["errors_total"] >= 2


def test_unexpected_status_counted_or_allowed(mock: ProcessServer) -> None:
    raw, _ = chat(mock.port, status="502")
    result = run(mock, raw)
    assert result["requests"] == 0
    assert set(result["errors"]) == {"status_502"} and result["errors"]["status_502"] >= 2
    allowed = run(mock, raw, expect_status=(200, 502))
    assert allowed["errors"] == {} and allowed["requests"] > 5

    raw, expected = chat(mock.port, status="429", zai_code="1303")
    assert b"1303" in expected
    result = run(mock, raw, expect_status=(429,), expect_body=expected)
    assert result["errors"] == {} and result["requests"] > 5


def test_sse_stream_chunked_body_verified(mock: ProcessServer) -> None:
    raw, expected = chat(mock.port, stream=True, chunks="50")
    assert expected.endswith(b"data: [DONE]\n\n") and expected.count(b"\n\n") == 52
    result = run(mock, raw, expect_body=expected, sse=True)
    assert result["errors"] == {} and result["requests"] > 5
    assert result["events"] == 52 * result["requests"]
    assert_ordered(result)


def test_sse_without_usage_or_done(mock: ProcessServer) -> None:
    raw, expected = chat(mock.port, stream=True, usage="none")
    assert b'"usage"' not in expected
    result = run(mock, raw, sse=True)
    assert result["requests"] == 0
    assert set(result["errors"]) == {"sse_no_usage"} and result["errors_total"] >= 2

    raw, _ = chat(mock.port, stream=True, usage="separate")
    assert run(mock, raw, sse=True)["errors"] == {}

    raw, _ = chat(mock.port)  # a JSON body is no event stream
    result = run(mock, raw, sse=True)
    assert result["requests"] == 0 and set(result["errors"]) == {"sse_no_done"}


def test_paced_events_are_not_coalesced(mock: ProcessServer) -> None:
    raw, expected = chat(mock.port, stream=True, chunks="10", chunk_delay="0.02")
    paced = run(mock, raw, expect_body=expected, sse=True, duration=0.8)
    assert paced["errors"] == {} and paced["requests"] >= 2
    assert paced["events"] == 12 * paced["requests"]
    assert paced["coalesced_events"] == 0
    gaps = paced["event_gap_us"]
    assert gaps["count"] == 11 * paced["requests"]
    assert gaps["p50"] >= 15_000 and gaps["max"] < 200_000
    # 11 gaps of 20 ms between the first event (with the head) and the last
    assert paced["latency_us"]["p50"] - paced["ttfb_us"]["p50"] >= 11 * 15_000

    raw, expected = chat(mock.port, stream=True, chunks="10")  # head + whole body in one write
    burst = run(mock, raw, expect_body=expected, sse=True, duration=0.3)
    assert burst["errors"] == {} and burst["requests"] > 5
    assert burst["coalesced_events"] > burst["requests"] * 5
    assert burst["event_gap_us"]["count"] < burst["requests"]


def test_split_writes_parse_and_verify(mock: ProcessServer) -> None:
    """Every body byte as its own write (and random 1-64 byte writes): the head, chunk-size
    lines and CRLFs all arrive in pieces."""
    for stream, split in ((True, "bytes"), (True, "random"), (False, "random")):
        raw, expected = chat(mock.port, stream=stream, write_split=split, seed="7", chunks="3")
        result = run(mock, raw, expect_body=expected, sse=stream, duration=0.5)
        assert result["errors"] == {} and result["requests"] >= 2, (split, result)
        if stream:
            assert result["events"] == 5 * result["requests"]


def test_close_mid_body_is_a_reset(mock: ProcessServer) -> None:
    for stream, fault in (
        (False, "close-mid-body"),
        (True, "close-mid-body"),
        (True, "reset-mid-stream"),
    ):
        raw, _ = chat(mock.port, stream=stream, fault=fault)
        result = run(mock, raw, sse=stream, duration=0.3)
        assert result["requests"] == 0, fault
        assert set(result["errors"]) == {"reset"} and result["errors_total"] >= 2, fault


def test_stall_is_a_timeout(mock: ProcessServer) -> None:
    raw, _ = chat(mock.port, stream=True, fault="stall")
    result = run(mock, raw, sse=True, duration=0.7, timeout=0.2)
    assert result["requests"] == 0
    assert set(result["errors"]) == {"timeout"} and 2 <= result["errors"]["timeout"] <= 8


def test_connection_close_reconnects(mock: ProcessServer) -> None:
    raw, expected = chat(mock.port, stream=True)
    raw = raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    result = run(mock, raw, expect_body=expected, sse=True)
    assert result["errors"] == {} and result["requests"] > 5
    assert result["reconnects"] >= result["requests"] - 2


def test_max_requests_and_warmup(mock: ProcessServer) -> None:
    raw, expected = chat(mock.port)
    result = run(mock, raw, expect_body=expected, duration=5.0, warmup=0.2, max_requests=40)
    assert result["requests"] == 40 and result["max_requests_reached"] is True
    assert result["warmup_requests"] > 0
    assert result["duration_s"] < 2.0
    assert len(result["latency_us"]) == 5


def test_connection_refused(binary: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    request = tmp_path / "request.bin"
    request.write_bytes(loadgen.http_request("GET", "/", {}, port=port))
    args = loadgen.command(binary, "127.0.0.1", port, request, connections=3, duration=0.5)
    started = time.monotonic()
    proc = subprocess.run(args, capture_output=True, timeout=10, check=True)
    assert time.monotonic() - started < 2.5
    result = json.loads(proc.stdout)
    assert result["requests"] == 0 and result["duration_s"] == pytest.approx(0.5, abs=0.05)
    assert set(result["errors"]) == {"connect"} and result["errors"]["connect"] >= 3


def test_usage_errors_exit_2(binary: Path, tmp_path: Path) -> None:
    request = tmp_path / "request.bin"
    request.write_bytes(b"GET / HTTP/1.1\r\n\r\n")
    base = [str(binary), "--host", "127.0.0.1", "--port", "1", "--request", str(request)]
    for extra in (
        [],
        ["--connections", "1"],
        ["--connections", "x", "--duration", "1"],
        ["--connections", "1", "--duration", "1", "--bogus"],
        ["--connections", "1", "--duration", "1", "--expect-status", "99"],
    ):
        proc = subprocess.run([*base, *extra], capture_output=True, timeout=10, check=False)
        assert proc.returncode == 2, extra
        assert proc.stdout == b"" and b"usage:" in proc.stderr
    with pytest.raises(RuntimeError, match="loadgen exited 2"):
        loadgen.run("127.0.0.1", 1, b"GET / HTTP/1.1\r\n\r\n", connections=0, duration=1)


def test_http_request_bytes() -> None:
    raw = loadgen.http_request("POST", "/x", {"A": "b"}, b"hello", port=8080)
    assert raw == (
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nA: b\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert loadgen.http_request("GET", "/", {"Host": "h"}) == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


@contextlib.contextmanager
def canned(response: bytes, *, close: bool = False) -> Iterator[int]:
    """A TCP server on port 0 answering each request head with ``response``; with ``close``
    it closes the connection after every answer. Yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the loadgen resets what it abandons
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf.split(b"\r\n\r\n", 1)[1]
                conn.sendall(response)
                if close:
                    return

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


CANNED_OK = [
    # chunk extensions, upper-case hex, mixed-case header names and values, trailers
    (
        b"HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: Chunked\r\nX-A: b\r\n\r\n"
        b"5;name=v\r\nhello\r\nA ; x\r\n, world!!!\r\n0\r\nTrailer: x\r\n\r\n",
        b"hello, world!!!",
        False,
        {},
    ),
    # an interim 100 before the response
    (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"ok",
        False,
        {},
    ),
    # a body delimited by EOF
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil eof", b"until eof", True, {}),
    # HTTP/1.0 without keep-alive, and a keep-alive response the server closes anyway
    (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc", b"abc", True, {}),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", b"abc", True, {}),
    # SSE with CRLF line endings
    (
        b"HTTP/1.1 200 OK\r\nContent-Length: 39\r\n\r\n"
        b'data: {"usage":1}\r\n\r\ndata: [DONE]\r\n\r\n\r\n',
        None,
        False,
        {"sse": True},
    ),
]


@pytest.mark.parametrize(
    ("response", "body", "close", "extra"),
    CANNED_OK,
    ids=["chunked-ext-trailers", "interim-100", "eof-body", "http10", "server-closes", "sse-crlf"],
)
def test_canned_framings(
    response: bytes, body: bytes | None, close: bool, extra: dict[str, Any]
) -> None:
    with canned(response, close=close) as port:
        raw = loadgen.http_request("GET", "/", {}, port=port)
        result = loadgen.run(
            "127.0.0.1", port, raw, connections=1, duration=0.3, expect_body=body, **extra
        )
    assert result["errors"] == {}, result
    assert result["requests"] > 2, result
    if close:
        assert result["reconnects"] >= result["requests"] - 1
    else:
        assert result["reconnects"] == 0
    if extra.get("sse"):
        assert result["events"] == 2 * result["requests"]


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\n",
    ],
    ids=["status-line", "two-lengths", "chunk-size", "chunk-crlf"],
)
def test_canned_malformed(response: bytes) -> None:
    with canned(response) as port:
        raw = loadgen.http_request("GET", "/", {}, port=port)
        result = loadgen.run("127.0.0.1", port, raw, connections=1, duration=0.3)
    assert result["requests"] == 0
    assert set(result["errors"]) == {"parse"} and result["errors_total"] > 2
