"""History and the live rates count API traffic only, by each request's API (real processes).

A dashboard's ``/admin/events`` stream stays open as long as someone watches it. It used to
end up in the history as one request of minutes (694,907 ms in the field), the p95 of every
range that held it and seconds of "in flight" in its snapshot. Here a supervisor with one
worker, its recorder and the mock upstream serve API requests while such a stream is open
for two of its intervals; the live snapshot, the history (summary, series, rows, snapshots)
and ``/metrics`` must count the API requests only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import duckdb
import orjson
import trio

from tests.harness import ProcessServer, RawClient, request, wait_until
from tests.test_recorder_procs import launch, recorder_status, recorder_url, stop

CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
MESSAGES = orjson.dumps({"model": "glm-4.6", "max_tokens": 16,
                         "messages": [{"role": "user", "content": "hi"}]})
JSON = [("content-type", "application/json")]


class EventStream:
    """A client of ``GET /admin/events`` reading one server-sent event at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def open(cls, port: int) -> EventStream:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /admin/events HTTP/1.1\r\nhost: x\r\n\r\n")
        events = cls(stream)
        head = await events._until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return events

    async def _until(self, end: bytes) -> bytes:
        while end not in self.buf:
            data = await self.stream.receive_some(65536)
            assert data, "the proxy closed the event stream"
            self.buf += data
        part, _, self.buf = self.buf.partition(end)
        return part

    async def next(self, name: str) -> dict[str, Any]:
        """The data of the next event called ``name`` (others and heartbeats skipped)."""
        while True:
            block = await self._until(b"\n\n")
            # Chunked framing: a chunk-size line may precede the event's first line.
            lines = [line for line in block.split(b"\n") if b": " in line or line.startswith(b":")]
            fields = dict(line.split(b": ", 1) for line in lines if not line.startswith(b":"))
            if fields.get(b"event") == name.encode():
                data: dict[str, Any] = orjson.loads(fields[b"data"])
                return data


async def api_requests(port: int, n: int) -> list[str]:
    """``n`` API requests over one keep-alive connection, OpenAI and Anthropic shapes
    alternating; their request ids."""
    client = await RawClient.connect("127.0.0.1", port)
    ids = []
    try:
        for i in range(n):
            path, body = ("/v1/chat/completions", CHAT) if i % 2 else ("/v1/messages", MESSAGES)
            resp = await client.request("POST", path, JSON, body)
            assert resp.status == 200, resp.body
            rid = resp.header(b"x-zaiproxy-request-id")
            assert rid is not None
            ids.append(rid.decode())
    finally:
        await client.aclose()
    return ids


def answered(samples: str, path: str) -> bool:
    """A request to ``path`` has been counted (in whichever family counts it)."""
    return any(f'path="{path}"' in line and not line.startswith("#")
               for line in samples.splitlines())


async def test_an_open_admin_events_stream_is_in_neither_the_history_nor_the_live_rates(
        mock: ProcessServer, tmp_path: Path) -> None:
    history = tmp_path / "h.duckdb"
    proxy = await launch(mock, tmp_path, history, ZAIPROXY_WORKERS="1")
    try:
        await wait_until(lambda: recorder_url(history) is not None, 10)
        events = await EventStream.open(proxy.port)
        await events.next("connected")
        first = (await events.next("metrics"))["variants"]["production"]
        assert first["requests"] == 0
        ids = await api_requests(proxy.port, 20)
        # The live snapshot while the stream is open: the API requests, nothing else.
        live = (await events.next("metrics"))["variants"]["production"]
        assert live["requests"] == 20 and live["responses_2xx"] == 20
        assert live["in_flight"] == 0  # this stream is in flight, and is not an API request
        assert live["latency_seconds"]["counts"][-1] == 20
        assert live["rates"]["requests"] == 20
        await events.next("metrics")  # open for two intervals: ~4 s
        await events.stream.aclose()

        async def events_counted() -> bool:
            return answered((await request(proxy.port, "GET", "/metrics")).body.decode(),
                            "/admin/events")

        with trio.fail_after(15):
            while not await events_counted():  # noqa: ASYNC110  (another process's state)
                await trio.sleep(0.05)
        # One worker, one channel: a request answered after the stream ended is written
        # after anything the stream's end handed to the recorder.
        ids += await api_requests(proxy.port, 1)
        with trio.fail_after(15):
            while (await recorder_status(history))["rows_written"] < len(ids):  # noqa: ASYNC110
                await trio.sleep(0.05)

        status = (await request(proxy.port, "GET", "/admin/status")).json()
        now = status["variants"]["production"]
        assert now["requests"] == 21 and now["in_flight"] == 0
        latency = now["latency_seconds"]
        assert latency["counts"][-1] == 21
        # Every API request took well under a second: so do all quantiles of the histogram.
        assert latency["counts"][latency["bounds"].index(1)] == 21

        resp = await request(proxy.port, "GET", "/admin/history?range=1h&variant=production")
        assert resp.status == 200, resp.body
        doc = resp.json()
        total = doc["summary"]["total"]
        assert total["requests"] == 21
        assert total["latency_ms_max"] < 1000 and total["latency_ms_p95"] < 1000
        points = doc["series"]["series"]["production"]
        assert sum(p["requests"] for p in points) == 21
        assert all(p["latency_ms_p95"] < 1000 for p in points)
        metrics = (await request(proxy.port, "GET", "/metrics")).body.decode()
    finally:
        assert await stop(proxy) == 0, proxy.logs()[-3000:]

    # /metrics: the stream is a control route's request, in the control families only.
    assert any(line.startswith("zai_proxy_control_requests_total{")
               and 'path="/admin/events"' in line for line in metrics.splitlines())
    assert not any(line.startswith("zai_proxy_request") and 'path="/admin' in line
                   for line in metrics.splitlines())
    con = duckdb.connect(str(history), read_only=True)
    try:
        rows = con.execute("SELECT request_id, route, api, latency_ms FROM requests").fetchall()
        in_flight = [r[0] for r in con.execute("SELECT in_flight FROM snapshots").fetchall()]
    finally:
        con.close()
    assert sorted(r[0] for r in rows) == sorted(ids)  # the API requests, every one of them
    assert {(r[1], r[2]) for r in rows} == {("/v1/messages", "anthropic"),
                                            ("/v1/chat/completions", "openai")}
    assert max(r[3] for r in rows) < 1000
    # Little's law over the finished API requests: a few ms each, never the stream's ~4 s.
    assert in_flight and max(in_flight) < 0.5 and not any(math.isnan(v) for v in in_flight)
