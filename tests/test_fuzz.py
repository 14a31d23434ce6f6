"""Mutated requests never crash a connection handler, and the worker keeps serving.

Seeded (reproducible) mutations of valid requests: byte flips, truncations,
insertions, duplicated and dropped lines. Each must get either a well-formed
HTTP response or a closed connection, and the log must show no
``connection_crashed`` (the handler's catch-all for bugs).
"""

from __future__ import annotations

import random

import h11
import orjson
import pytest
import trio

from tests.harness import make_config, request, send_raw, start_mock, start_proxy
from zaiproxy.core import logs

BODY = orjson.dumps({"model": "glm-4.6", "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]})
SEEDS = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY,
    b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1) if buf else 0
        if op == 0 and buf:  # flip a byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:  # truncate
            del buf[pos:]
        elif op == 2:  # insert junk
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:  # duplicate a line
            lines = bytes(buf).split(b"\r\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            buf = bytearray(b"\r\n".join(lines))
        else:  # drop a line
            lines = bytes(buf).split(b"\r\n")
            del lines[rng.randrange(len(lines))]
            buf = bytearray(b"\r\n".join(lines))
    return bytes(buf)


def well_formed_or_empty(raw: bytes) -> bool:
    """Every response in ``raw`` parses (a closed connection with no bytes is fine too)."""
    if not raw:
        return True
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    try:
        event = conn.next_event()
        while event is not h11.NEED_DATA and type(event) is not h11.Response:
            event = conn.next_event()
    except h11.RemoteProtocolError:
        return False
    return type(event) is h11.Response or (event is h11.NEED_DATA and raw.startswith(b"HTTP/1.1 "))


@pytest.mark.parametrize("seed", range(3))
async def test_mutated_requests(nursery, log_buffer, seed):
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream, header_timeout=0.3,
                                                   keepalive_timeout=0.3))
    rng = random.Random(seed)
    cases = [mutate(rng, rng.choice(SEEDS)) for _ in range(150)]
    results: list[bytes] = []
    limiter = trio.CapacityLimiter(40)

    async def one(data: bytes) -> None:
        async with limiter:
            results.append(await send_raw(proxy.port, data, read_timeout=3))

    async with trio.open_nursery() as inner:
        for data in cases:
            inner.start_soon(one, data)
    assert len(results) == len(cases)
    bad = [r[:120] for r in results if not well_formed_or_empty(r)]
    # A cut stream is well-formed up to its head; anything unparsable is a bug.
    assert not bad, bad
    logs.get_logger().flush()
    assert b"connection_crashed" not in log_buffer.getvalue()
    # Still serving.
    assert (await request(proxy.port, "GET", "/health")).status == 200
