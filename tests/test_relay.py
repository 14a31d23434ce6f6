"""Byte-exact relay: what the client gets equals what the upstream sent.

The mock is deterministic, so the body a client gets directly from it is the
reference; through the proxy it must be identical for every way the upstream
splits its writes (one write, byte by byte, random sizes, one large write).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import h11
import orjson
import pytest
import trio

from tests.harness import UPSTREAM_KEY, RawClient, make_config, request, start_mock, start_proxy
from zaiproxy.http import netstream
from zaiproxy.request import scanner

OPENAI = ("/v1/chat/completions", "/api/paas/v4/chat/completions", "authorization",
          f"Bearer {UPSTREAM_KEY}")
ANTHROPIC = ("/v1/messages", "/api/anthropic/v1/messages", "x-api-key", UPSTREAM_KEY)


@pytest.fixture(scope="module", autouse=True, params=["python", "native"])
def relay_scanner(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs with the native stream scanner and pump and with their pure-Python
    twins (zaiproxy/request/scanner.py chooses the scanner, netstream.PUMP says whether the
    relay uses the pump)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scanner, "Tracker", scanner.load(request.param))
        if request.param == "python":
            patch.setattr(netstream, "PUMP", False)
        yield request.param


def body_for(stream: bool, anthropic: bool) -> bytes:
    payload: dict[str, object] = {"model": "glm-4.6", "stream": stream,
                                  "messages": [{"role": "user", "content": "héllo ✓"}]}
    if anthropic:
        payload["max_tokens"] = 512
    return orjson.dumps(payload)


@pytest.fixture
async def stack(nursery):
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream))
    return upstream, proxy


@pytest.mark.parametrize("split", ["one", "bytes", "random", "large"])
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("route", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])
async def test_body_identical_to_direct(stack, split, stream, route):
    upstream, proxy = stack
    proxy_path, upstream_path, key_name, key_value = route
    body = body_for(stream, route is ANTHROPIC)
    chunks = "400" if split == "large" else "12"
    size = "256" if split == "large" else "16"
    controls = [("content-type", "application/json"), ("x-mock-write-split", split),
                ("x-mock-seed", "7"), ("x-mock-chunks", chunks), ("x-mock-chunk-size", size)]
    direct = await request(int(upstream.rsplit(":", 1)[1]), "POST", upstream_path,
                           [*controls, (key_name, key_value)], body)
    via = await request(proxy.port, "POST", proxy_path, controls, body)
    assert direct.status == via.status == 200
    assert via.complete
    assert via.body == direct.body
    assert len(via.body) > (100_000 if split == "large" else 300)
    assert via.header(b"content-type") == direct.header(b"content-type")


async def test_paced_events_are_not_coalesced(stack):
    _, proxy = stack
    client = await RawClient.connect("127.0.0.1", proxy.port)
    body = body_for(True, False)
    conn = client.conn
    await client.stream.send_all(
        conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=[
            ("host", "x"), ("content-type", "application/json"), ("x-mock-chunks", "6"),
            ("x-mock-chunk-delay", "0.05"), ("content-length", str(len(body)))]))
        + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    events: list[bytes] = []
    stamps: list[float] = []
    with trio.fail_after(10):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await client.stream.receive_some(65536))
            elif type(event) is h11.Data:
                events.append(bytes(event.data))
                stamps.append(trio.current_time())
            elif type(event) is h11.EndOfMessage:
                break
    await client.aclose()
    # Each paced upstream event reaches the client as its own chunk, ~50 ms apart.
    assert sum(1 for e in events if b'"delta"' in e) >= 6
    for chunk in events:
        assert chunk.count(b"data: ") == 1, chunk
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert sum(1 for g in gaps if g >= 0.03) >= 5


async def test_head_request_and_query_kept(stack):
    _, proxy = stack
    resp = await request(proxy.port, "GET", "/api/paas/v4/models?limit=2")
    assert resp.status == 200
    assert resp.json()["object"] == "list"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("route", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])
async def test_usage_recorded_in_the_request_log(stack, log_buffer, stream, route):
    from zaiproxy.core import logs

    _, proxy = stack
    body = body_for(stream, route is ANTHROPIC)
    resp = await request(proxy.port, "POST", route[0],
                         [("content-type", "application/json"), ("x-mock-chunks", "7"),
                          ("authorization", "Bearer client-secret-XYZ")], body)
    assert resp.status == 200
    logs.get_logger().flush()
    lines = [orjson.loads(line) for line in log_buffer.getvalue().splitlines()]
    [entry] = [e for e in lines if e["event"] == "request"]
    assert entry["request_id"] == resp.header(b"x-zaiproxy-request-id").decode()
    assert entry["route"] == route[0]
    assert entry["stream"] is stream
    assert entry["result"] == "ok"
    # The mock's contract: output tokens = deltas, input tokens = len(body) // 4.
    assert entry["usage"]["output_tokens"] == 7
    assert entry["usage"]["input_tokens"] == len(body) // 4
    raw = log_buffer.getvalue()
    assert b"client-secret-XYZ" not in raw and UPSTREAM_KEY.encode() not in raw
