"""The fleet collector: scraping, stale targets, storage, the admin API, SSE, and the CLI."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import h11
import httpx
import orjson
import pytest
import trio
import trio.testing

from tests.harness import REPO, UPSTREAM_KEY, ProcessServer, RawClient, start_process, wait_until
from zaiproxy.core.durations import parse_duration
from zaiproxy.fleet.collector import Collector, CollectorOptions, EventHub, Target
from zaiproxy.fleet.collector_store import Store, row_of
from zaiproxy.fleet.fleet_keys import (
    merge_quota,
    merge_upstreams,
    quota_at,
    quota_entries,
    quota_gauges,
)
from zaiproxy.observe import snapshot
from zaiproxy.observe.snapshot import Counts, Histogram, Rates

TOKEN = "collector-admin-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]
CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
JSON = ("content-type", "application/json")


async def eventually(fetch: Any, ok: Any, limit: float = 5.0) -> Any:
    """Bounded polling of an async source (a table another task writes) until ``ok``."""
    with trio.fail_after(limit):
        while not ok(value := await fetch()):  # noqa: ASYNC110
            await trio.sleep(0.01)
    return value


# ---- pure parts -------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("http://127.0.0.1:8080", ("http://127.0.0.1:8080", "127.0.0.1", 8080, "/metrics")),
    ("http://proxy.internal:9000/", ("http://proxy.internal:9000", "proxy.internal", 9000,
                                     "/metrics")),
    ("10.0.0.5:8080", ("http://10.0.0.5:8080", "10.0.0.5", 8080, "/metrics")),
    ("http://h:1/custom/metrics?x=1", ("http://h:1/custom/metrics", "h", 1,
                                       "/custom/metrics?x=1")),
    ("http://h", ("http://h", "h", 80, "/metrics")),
    ("http://[::1]:9090", ("http://[::1]:9090", "::1", 9090, "/metrics")),
])
def test_target_parse(url: str, expected: tuple[str, str, int, str]) -> None:
    t = Target.parse(url)
    assert (t.url, t.host, t.port, t.path) == expected
    assert t.authority == t.url.split("/")[2]  # the Host header, IPv6 brackets kept


@pytest.mark.parametrize("url", ["https://h:1", "http://:80", "http://h:99999"])
def test_target_parse_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="target"):
        Target.parse(url)


# The collector's flags read core.durations' grammar (tests/test_durations.py has all of it).
@pytest.mark.parametrize(("text", "seconds"), [("5", 5), ("0.5s", 0.5), ("15m", 900),
                                               ("6h", 21600), ("7d", 604800)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1s", "soon", "inf", "5y"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--interval: ") as info:
        parse_duration(text, "--interval")
    assert repr(text) in str(info.value)  # the message names the input


def rates(variant: str, seconds: float, requests: float, errors: float,
          lat: dict[float, float], in_flight: float = 0, reset: bool = False) -> Rates:
    return Rates(variant, seconds, Counts(requests=requests, responses_5xx=errors),
                 latency=Histogram.from_buckets(lat), in_flight=in_flight, reset=reset)


def test_store_history_sums_targets_and_prunes(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "h.duckdb"))
    base = 1_000_000.0 - 1_000_000.0 % 60
    rows = [
        # Two production targets in the same minute, one canary target; one old row.
        row_of(base + 10, "http://a:1", rates("production", 5, 50, 5, {0.1: 50, math.inf: 50},
                                              in_flight=2)),
        row_of(base + 15, "http://a:1", rates("production", 5, 50, 0, {0.1: 50, math.inf: 50},
                                              in_flight=4)),
        row_of(base + 12, "http://b:1", rates("production", 10, 100, 0,
                                              {0.1: 0, math.inf: 100}, reset=True)),
        row_of(base + 20, "http://c:1", rates("canary", 5, 10, 10, {0.1: 0, 1.0: 10,
                                                                    math.inf: 10})),
        row_of(base - 3600, "http://a:1", rates("production", 5, 5, 0, {0.1: 5, math.inf: 5})),
    ]
    store.insert(rows)
    out = store.history(base - 60, 60, "all")
    assert sorted(out) == ["canary", "production"]
    (prod,) = out["production"]
    assert prod["t"] == base and prod["targets"] == 2 and prod["reset"] is True
    assert prod["requests_per_s"] == pytest.approx(100 / 10 + 100 / 10)  # a: 100 in 10 s; b
    assert prod["error_rate"] == pytest.approx(5 / 200)
    assert prod["in_flight"] == pytest.approx(3 + 0)  # a's average + b's
    # Half of the (rate-weighted) observations <= 0.1, half above 0.1: p50 = 0.1 exactly.
    assert prod["latency_p50_s"] == pytest.approx(0.1)
    assert prod["latency_p99_s"] == 0.1  # in +Inf: the highest finite bound
    (canary,) = out["canary"]
    assert canary["error_rate"] == 1.0
    assert canary["latency_p50_s"] == pytest.approx(0.1 + 0.9 * 0.5)
    assert list(store.history(base - 60, 60, "canary")) == ["canary"]
    assert store.history(base - 60, 60, "nightly") == {}
    store.prune(base - 60)
    assert store.history(0, 60, "production")["production"][0]["t"] == base
    store.close()


# ---- SSE fan-out ---------------------------------------------------------------------


async def test_hub_drops_a_consumer_whose_queue_is_full() -> None:
    hub = EventHub(max_queued=2, send_timeout=60, heartbeat=60)
    got: list[bytes] = []
    blocked = trio.Event()

    async def stuck(data: bytes) -> None:
        blocked.set()
        await trio.sleep_forever()

    async def fast(data: bytes) -> None:
        got.append(data)

    async with trio.open_nursery() as nursery:
        results: list[str] = []

        async def run(write: Any) -> None:
            results.append(await hub.serve(write, b"first"))

        nursery.start_soon(run, stuck)
        nursery.start_soon(run, fast)
        await blocked.wait()
        await wait_until(lambda: hub.subscribers == 2)
        for i in range(4):  # the stuck one holds 2 queued; the 3rd publish drops it
            hub.publish(b"event %d" % i)
            await trio.testing.wait_all_tasks_blocked()
        assert hub.subscribers == 1 and hub.dropped == 1
        assert got == [b"first", b"event 0", b"event 1", b"event 2", b"event 3"]
        nursery.cancel_scope.cancel()
    assert results == ["queue_full"]


async def test_hub_heartbeats_when_idle(autojump_clock: trio.testing.MockClock) -> None:
    hub = EventHub(max_queued=4, send_timeout=1, heartbeat=15)
    got: list[tuple[float, bytes]] = []

    async def write(data: bytes) -> None:
        got.append((trio.current_time(), data))

    with trio.move_on_after(50):
        await hub.serve(write, b"first")
    assert got == [(0, b"first"), (15, b": heartbeat\n\n"), (30, b": heartbeat\n\n"),
                   (45, b": heartbeat\n\n")]


# ---- a scripted target -------------------------------------------------------------


def exposition(variant: str, requests: int, errors: int = 0, fast: int | None = None) -> str:
    fast = requests if fast is None else fast
    v = f'variant="{variant}"'
    return (
        f'zai_proxy_build_info{{commit="c1",{v},version="9.9"}} 1\n'
        f'zai_proxy_requests_total{{method="POST",path="/v1/chat/completions",status="200",{v}}} '
        f"{requests - errors}\n"
        f'zai_proxy_requests_total{{method="POST",path="/v1/chat/completions",status="502",{v}}} '
        f"{errors}\n"
        f'zai_proxy_request_duration_seconds_bucket{{le="0.1",{v}}} {fast}\n'
        f'zai_proxy_request_duration_seconds_bucket{{le="+Inf",{v}}} {requests}\n'
        f'zai_proxy_concurrent_requests{{{v}}} 1\n')


class ScriptedTarget:
    """A /metrics endpoint answering whatever the test sets (or hanging, or failing); other
    paths set in ``routes`` answer their body (a proxy's /admin/keys)."""

    def __init__(self, text: str, routes: dict[str, bytes] | None = None) -> None:
        self.text = text
        self.routes = routes or {}
        self.status = 200
        self.hang = False
        self.url = ""

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.url)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        path = ""
        while type(event := conn.next_event()) is not h11.EndOfMessage:
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                path = event.target.decode()
        if self.hang:
            await trio.sleep_forever()
        body = self.routes.get(path, self.text.encode())
        await stream.send_all(conn.send(h11.Response(status_code=self.status, headers=[
            ("content-length", str(len(body)))])) + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage()))
        await stream.aclose()


def options(tmp_path: Path, *urls: str, **kw: Any) -> CollectorOptions:
    kw.setdefault("interval", 3600.0)  # rounds driven by the test unless it says otherwise
    return CollectorOptions(targets=tuple(Target.parse(u) for u in urls),
                            db=str(tmp_path / "collector.duckdb"), **kw)


async def test_rates_resets_and_stale_targets(nursery: trio.Nursery, tmp_path: Path) -> None:
    prod = ScriptedTarget(exposition("production", 100, 0))
    canary = ScriptedTarget(exposition("canary", 10, 0))
    await nursery.start(prod.run)
    await nursery.start(canary.run)
    collector = Collector(options(tmp_path, prod.url, canary.url, scrape_timeout=0.5))
    await nursery.start(collector.run)
    await wait_until(lambda: all(s.scrapes for s in collector.states))  # the first round
    status = collector.status()
    assert status["variants"]["production"]["rates"] is None  # one scrape: no rate yet
    assert status["variants"]["production"]["requests"] == 100

    prod.text, canary.text = exposition("production", 150, 5, fast=140), \
        exposition("canary", 30, 10, fast=10)
    await collector.scrape_all()
    status = collector.status()
    p, c = status["variants"]["production"], status["variants"]["canary"]
    assert p["rates"]["requests"] == 50 and p["rates"]["requests_per_s"] > 0
    assert p["rates"]["error_rate"] == pytest.approx(0.1)
    assert c["rates"]["error_rate"] == pytest.approx(0.5)
    assert p["rates"]["latency_p50_s"] == pytest.approx(0.1 * 25 / 40)
    assert c["rates"]["latency_p50_s"] == 0.1  # all 20 new ones above 0.1: +Inf bucket
    assert (p["versions"], p["stale"], p["targets"]) == (["9.9"], False, 1)

    prod.text = exposition("production", 20, 0)  # restarted: the counter went down
    canary.status = 500
    await collector.scrape_all()
    status = collector.status()
    p = status["variants"]["production"]["rates"]
    assert p["reset"] is True and p["requests"] == 20 and p["requests_per_s"] > 0
    c = status["variants"]["canary"]
    assert c["stale"] is True and c["rates"] is None and c["stale_targets"] == 1
    target = status["targets"][1]
    assert target["stale"] is True and target["last_error"] == "ScrapeError: HTTP 500 from /metrics"
    assert target["last_success"] is not None and target["consecutive_failures"] == 1

    canary.status, canary.hang = 200, True
    await collector.scrape_all()
    assert collector.status()["targets"][1]["last_error"] == "timed out after 0.5s"
    canary.hang = False
    canary.text = "this is not an exposition {"
    await collector.scrape_all()
    assert collector.status()["targets"][1]["last_error"].startswith("ParseError")
    canary.text = exposition("canary", 31, 10)
    await collector.scrape_all()
    status = collector.status()
    assert status["variants"]["canary"]["stale"] is False
    assert status["variants"]["canary"]["rates"]["requests"] == 1  # against the last good one

    # Everything stored is an increase >= 0; history groups it per variant.
    hist = await eventually(lambda: collector.history("5m", "all"),
                            lambda h: len(h["series"]) == 2)
    for points in hist["series"].values():
        for point in points:
            assert all(v >= 0 for v in point.values() if isinstance(v, float | int))
    assert hist["step_s"] == 3600  # never finer than the interval


def breakdown_exposition(variant: str, ok: int, limited: int, retries: int,
                         limit: int | None) -> str:
    v = f'variant="{variant}"'
    text = (
        f'zai_proxy_requests_total{{method="POST",path="/v1/messages",status="200",{v}}} {ok}\n'
        f'zai_proxy_requests_total{{method="POST",path="/v1/messages",status="429",{v}}} '
        f"{limited}\n"
        f'zai_proxy_requests_total{{method="GET",path="/metrics",status="200",{v}}} 1000\n'
        f'zai_proxy_zai_errors_total{{class="frequency",code="1302",{v}}} {limited}\n'
        f'zai_proxy_retry_attempts_total{{reason="frequency",{v}}} {retries}\n'
        # The proxy's own 429s by the original's client buckets: summed per scope:limit.
        f'zai_proxy_rate_limit_rejections_total{{limit="requests_per_minute",scope="key",'
        f'client="source-30",{v}}} {limited}\n'
        f'zai_proxy_rate_limit_rejections_total{{limit="requests_per_minute",scope="key",'
        f'client="source-07",{v}}} {retries}\n'
        f'zai_proxy_worker_processes{{{v}}} 2\n')
    if limit is not None:
        text += f'zai_proxy_max_workers{{{v}}} {limit}\n'  # the cap: never the workers
        text += f'zai_proxy_concurrency_limit{{scope="proxy",{v}}} {limit}\n'
    return text


async def test_status_carries_breakdowns_workers_and_limits(nursery: trio.Nursery,
                                                            tmp_path: Path) -> None:
    a = ScriptedTarget(breakdown_exposition("production", 10, 2, 1, 8))
    b = ScriptedTarget(breakdown_exposition("production", 5, 0, 0, 4))
    await nursery.start(a.run)
    await nursery.start(b.run)
    collector = Collector(options(tmp_path, a.url, b.url))
    _, port = await nursery.start(collector.run)
    await wait_until(lambda: all(s.scrapes for s in collector.states))
    a.text = breakdown_exposition("production", 30, 6, 5, 8)
    b.text = breakdown_exposition("production", 5, 0, 0, None)
    await collector.scrape_all()
    status = (await get(port, "/admin/status")).json()
    p = status["variants"]["production"]
    # Totals of both targets, the /metrics scrapes left out.
    assert p["requests"] == 41 and p["breakdown"]["status"] == {"200": 35, "429": 6}
    assert p["breakdown"]["zai_errors"] == {"1302": 6}
    assert p["breakdown"]["zai_error_classes"] == {"frequency": 6}
    assert p["breakdown"]["retries"] == {"frequency": 5}
    assert p["breakdown"]["rejections"] == {"key:requests_per_minute": 6 + 5}
    assert p["rejections"] == 11 and p["breakdown"]["adjustments"] == {}
    assert p["workers"] == 4
    assert p["concurrency_limit"] == 0  # b has no limit any more: neither has the fleet
    ra, rb = (t["variants"]["production"] for t in status["targets"])
    assert ra["breakdown_per_s"]["status"] == pytest.approx(
        {"200": 20 / ra["seconds"], "429": 4 / ra["seconds"]})
    assert ra["breakdown_per_s"]["retries"] == pytest.approx({"frequency": 4 / ra["seconds"]})
    assert ra["breakdown_per_s"]["rejections"] == pytest.approx(
        {"key:requests_per_minute": (4 + 4) / ra["seconds"]})
    assert rb["breakdown_per_s"]["status"] == {"200": 0, "429": 0}
    assert (ra["concurrency_limit"], rb["concurrency_limit"]) == (8, 0)
    assert (ra["workers"], rb["workers"]) == (2, 2)
    # The variant's rates: the targets' rates summed (sum(rate(...))).
    rates = p["rates"]
    assert rates["workers"] == 4 and rates["concurrency_limit"] == 0
    assert rates["breakdown_per_s"]["status"] == pytest.approx(ra["breakdown_per_s"]["status"])
    assert rates["breakdown_per_s"]["zai_errors"] == pytest.approx(
        {"1302": 4 / ra["seconds"]})


async def test_unwritable_database_degrades(nursery: trio.Nursery, tmp_path: Path) -> None:
    target = ScriptedTarget(exposition("production", 1))
    await nursery.start(target.run)
    # A directory where the file should be: every DuckDB call fails, nothing else does.
    collector = Collector(replace(options(tmp_path, target.url), db=str(tmp_path)))
    _, port = await nursery.start(collector.run)
    await wait_until(lambda: collector.states[0].scrapes >= 1 and collector.storage.errors >= 1)
    target.text = exposition("production", 5)
    await collector.scrape_all()
    status = (await get(port, "/admin/status")).json()
    assert status["storage"]["ok"] is False and "Is a directory" in status["storage"]["last_error"]
    assert status["variants"]["production"]["rates"]["requests"] == 4
    history = await get(port, "/admin/history?range=5m")
    assert history.status == 503
    assert "history is unavailable" in history.json()["error"]["message"]


# ---- the admin API ------------------------------------------------------------------


async def get(port: int, path: str, headers: list[tuple[str, str]] | None = None,
              method: str = "GET") -> Any:
    client = await RawClient.connect("127.0.0.1", port)
    try:
        return await client.request(method, path, headers)
    finally:
        await client.aclose()


@pytest.fixture
async def admin(nursery: trio.Nursery, tmp_path: Path) -> tuple[Collector, int]:
    target = ScriptedTarget(exposition("production", 3))
    await nursery.start(target.run)
    collector = Collector(options(tmp_path, target.url, "http://127.0.0.1:1", admin_token=TOKEN,
                                  interval=0.1, heartbeat_s=0.15, send_timeout_s=0.3))
    _, port = await nursery.start(collector.run)
    return collector, port


async def test_admin_auth_params_and_routes(admin: tuple[Collector, int]) -> None:
    collector, port = admin
    health = await get(port, "/health")
    assert health.status == 200 and health.json()["source"] == "collector"
    for path in ("/admin/status", "/admin/history", "/admin/events"):
        for headers in (None, [("authorization", "Bearer wrong")], [("x-api-key", "wrong")],
                        [("authorization", TOKEN)]):
            resp = await get(port, path, headers)
            assert resp.status == 401, (path, headers)
            assert resp.json()["error"]["code"] == "invalid_api_key"
        # The same rule as the proxy's admin API (admin_access.py): either header carries it.
        if path != "/admin/events":
            assert (await get(port, path, [("x-api-key", TOKEN)])).status == 200
    for query, message in (("range=2h", "range must be one of 5m, 15m, 1h, 6h, 24h, 7d"),
                           ("variant=Prod!", "variant must be a variant name"),
                           ("range=5m&range=1h", "range given more than once"),
                           ("since=1", "unknown parameter(s) since")):
        resp = await get(port, f"/admin/history?{query}", AUTH)
        assert resp.status == 400 and message in resp.json()["error"]["message"], query
    assert (await get(port, "/nope", AUTH)).status == 404
    post = await get(port, "/admin/status", AUTH, method="POST")
    assert post.status == 405 and post.header(b"allow") == b"GET, HEAD"
    head_events = await get(port, "/admin/events", AUTH, method="HEAD")
    assert head_events.status == 405 and head_events.header(b"allow") == b"GET"
    # Keep-alive: several requests on one connection; HEAD has no body.
    client = await RawClient.connect("127.0.0.1", port)
    try:
        await wait_until(lambda: collector.states[0].scrapes >= 1
                         and collector.states[1].failures >= 1)
        status = (await client.request("GET", "/admin/status", AUTH)).json()
        head = await client.request("HEAD", "/admin/status", AUTH)
        history = (await client.request("GET", "/admin/history?range=5m&variant=production",
                                        AUTH)).json()
    finally:
        await client.aclose()
    assert (head.status, head.body) == (200, b"")
    assert [t["stale"] for t in status["targets"]] == [False, True]
    assert "connect" in status["targets"][1]["last_error"]
    assert status["targets"][1]["last_success"] is None
    assert history["range"] == "5m" and history["variant"] == "production"


class SSEReader:
    """Events from an ``/admin/events`` response, de-chunked by h11: (event, data) pairs and
    ("heartbeat", None); partial frames are kept between calls."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.buf = b""

    async def start(self) -> None:
        conn = self.client.conn
        await self.client.stream.send_all(conn.send(h11.Request(
            method="GET", target="/admin/events", headers=[("host", "x"), *AUTH]))
            + conn.send(h11.EndOfMessage()))

    async def read(self, until: Any, limit: float = 5) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        conn = self.client.conn
        with trio.fail_after(limit):
            while not until(events):
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await self.client.stream.receive_some(65536))
                elif type(event) is h11.Response:
                    assert event.status_code == 200
                    assert (b"content-type", b"text/event-stream") in event.headers
                    assert (b"transfer-encoding", b"chunked") in event.headers
                elif type(event) is h11.Data:
                    self.buf += event.data
                    while b"\n\n" in self.buf:
                        frame, self.buf = self.buf.split(b"\n\n", 1)
                        if frame == b": heartbeat":
                            events.append(("heartbeat", None))
                            continue
                        name, data = frame.split(b"\n")
                        assert name.startswith(b"event: ") and data.startswith(b"data: ")
                        events.append((name[7:].decode(), orjson.loads(data[6:])))
                else:
                    raise AssertionError(f"stream ended: {event!r}")
        return events


async def test_events_framing_and_heartbeat(admin: tuple[Collector, int]) -> None:
    collector, port = admin
    client = await RawClient.connect("127.0.0.1", port)
    try:
        reader = SSEReader(client)
        await reader.start()
        events = await reader.read(lambda ev: sum(k == "heartbeat" for k, _ in ev) >= 2
                                   and sum(k == "metrics" for k, _ in ev) >= 3)
    finally:
        await client.aclose()
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["connected", "metrics"]
    assert set(kinds) == {"connected", "metrics", "heartbeat"}
    connected = events[0][1]
    assert connected["source"] == "collector" and connected["heartbeat_s"] == 0.15
    assert len(connected["targets"]) == 2
    last = [d for k, d in events if k == "metrics"][-1]
    assert last["variants"]["production"]["requests"] == 3
    assert [t["stale"] for t in last["targets"]] == [False, True]
    await wait_until(lambda: collector.hub.subscribers == 0)


async def test_a_consumer_that_stops_reading_is_dropped(admin: tuple[Collector, int]) -> None:
    collector, port = admin
    # lockstep: a write completes only when the peer reads it, so "stops reading" is exact.
    slow_client, slow_server = trio.testing.lockstep_stream_pair()
    fast = await RawClient.connect("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.serve_connection, slow_server)
            await slow_client.send_all(b"GET /admin/events HTTP/1.1\r\nhost: x\r\n"
                                       b"authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
            reader = SSEReader(fast)
            await reader.start()
            await reader.read(lambda ev: len(ev) >= 2)
            await wait_until(lambda: collector.hub.dropped >= 1)
            # The fast consumer keeps getting every interval's snapshot.
            more = await reader.read(lambda ev: sum(k == "metrics" for k, _ in ev) >= 3)
            assert [k for k, _ in more if k != "heartbeat"] == ["metrics"] * 3
            assert collector.hub.subscribers == 1
            # The dropped consumer's connection was closed after its send timed out.
            # Its connection was closed: what it gets is at most the first write, then EOF.
            got = b""
            with trio.fail_after(2):
                while chunk := await slow_client.receive_some(65536):
                    got += chunk
            assert got.startswith(b"HTTP/1.1 200") and got.count(b"event: metrics") <= 1
            assert collector.status()["events"]["dropped"] == 1
    finally:
        await fast.aclose()


# ---- live proxies (real processes) ------------------------------------------------


@pytest.fixture(scope="module")
def mock_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    tmp = tmp_path_factory.mktemp("collector-mock")
    server = start_process(["mock-upstream", "--port", "0", "--api-key", UPSTREAM_KEY],
                           env=None, stderr_path=tmp / "mock.log")
    yield server
    server.stop()


def serve(mock: ProcessServer, tmp: Path, variant: str, port: int = 0) -> ProcessServer:
    return start_process(["serve", "--port", str(port), "--workers", "1"], env={
        "ZAI_API_KEY": UPSTREAM_KEY, "DEPLOYMENT_VARIANT": variant,
        "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
        "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
        "ZAIPROXY_NATIVE_BASE_URL": mock.url,
    }, stderr_path=tmp / f"{variant}-{port}.log")


async def traffic(url: str, ok: int, missing: int) -> None:
    for _ in range(ok):
        assert (await _request(url, "POST", "/v1/chat/completions", CHAT)).status == 200
    for _ in range(missing):
        assert (await _request(url, "GET", "/v1/nothing", b"")).status == 404


async def _request(url: str, method: str, path: str, body: bytes) -> Any:
    from tests.harness import request

    return await request(url, method, path, [JSON] if body else None, body)


@pytest.mark.slow
async def test_two_live_variants_with_a_restart(nursery: trio.Nursery, tmp_path: Path,
                                                mock_upstream: ProcessServer) -> None:
    start = trio.to_thread.run_sync
    prod = await start(serve, mock_upstream, tmp_path, "production")
    canary = await start(serve, mock_upstream, tmp_path, "canary")
    try:
        collector = Collector(options(tmp_path, prod.url, canary.url, interval=0.4))
        await nursery.start(collector.run)
        await traffic(prod.url, 5, 1)
        await traffic(canary.url, 2, 2)

        def settled() -> bool:
            v = collector.status()["variants"]
            return (v.keys() == {"production", "canary"} and v["canary"]["rates"] is not None
                    and v["production"]["responses_2xx"] >= 5
                    and v["canary"]["responses_4xx"] == 2)

        await wait_until(settled, limit=10)
        status = collector.status()
        p, c = status["variants"]["production"], status["variants"]["canary"]
        assert (p["responses_4xx"], c["responses_4xx"]) == (1, 2)
        assert p["tokens_in"] > 0 and p["cost_usd"] > 0 and p["latency_seconds"]["counts"]
        assert [list(t["variants"]) for t in status["targets"]] == [["production"], ["canary"]]
        assert not p["stale"] and not c["stale"] and p["versions"] == c["versions"]

        # SIGKILL production's worker: the supervisor replaces it and the shared-memory
        # totals survive, so its series go on without a reset (a scrape or two may time out
        # while the replacement starts: connections queue on the socket the supervisor keeps).
        victim = (await _request(prod.url, "GET", "/health", b"")).json()["pid"]
        os.kill(victim, signal.SIGKILL)

        # Restart the canary on the same address: a stale window, then counters from zero.
        port = canary.port
        await start(canary.stop)
        await wait_until(lambda: collector.states[1].stale, limit=10)
        assert collector.status()["variants"]["canary"]["stale"] is True
        canary = await start(serve, mock_upstream, tmp_path, "canary", port)
        await traffic(canary.url, 3, 0)
        await wait_until(lambda: not collector.states[1].stale
                         and "canary" in collector.states[1].rates, limit=10)

        # Stop it for good: stale, with its last error and last success, production unaffected.
        await start(canary.stop)
        await wait_until(lambda: collector.states[1].stale and not collector.states[0].stale,
                         limit=10)
        status = collector.status()
        dead = status["targets"][1]
        assert dead["stale"] and dead["last_error"] and dead["last_success"] is not None
        assert status["variants"]["canary"]["stale"] is True
        assert status["variants"]["production"]["stale"] is False
        assert status["variants"]["production"]["rates"]["requests_per_s"] >= 0

        # What was stored: never a negative increase; the restart seen as a reset (the
        # canary's 404 count went from 2 to 0).
        await eventually(lambda: collector.storage_call(_resets, collector.store, "canary"),
                         lambda n: bool(n and n > 0))
        negatives = await collector.storage_call(_negatives, collector.store)
        assert negatives == 0
        assert (await _request(prod.url, "GET", "/health", b"")).json()["pid"] != victim
        assert await collector.storage_call(_resets, collector.store, "production") == 0
        history = await collector.history("5m", "all")
        assert set(history["series"]) == {"production", "canary"}
    finally:
        await start(prod.stop)
        await start(canary.stop)


def _resets(store: Store, variant: str) -> int:
    rows = store.query("SELECT count(*) FROM snapshots WHERE variant = ? AND reset", [variant])
    return int(rows[0][0]) if rows else -1


def _negatives(store: Store) -> int:
    cols = " OR ".join(f"{c} < 0" for c in (*snapshot.COUNT_NAMES, "seconds", "latency_p50",
                                               "latency_p99"))
    rows = store.query(f"SELECT count(*) FROM snapshots WHERE {cols} "
                       "OR list_min(latency_counts) < 0")
    return int(rows[0][0]) if rows else -1


# ---- the command ----------------------------------------------------------------------


def test_collect_command_prints_its_address_first_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZAIPROXY_")}
    env["ZAIPROXY_ADMIN_TOKEN"] = TOKEN
    proc = subprocess.Popen(
        [sys.executable, "-m", "zaiproxy", "collect", "--target", "http://127.0.0.1:1",
         "--interval", "0.2s", "--db", str(tmp_path / "c.duckdb"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "collect.log").open("wb"), env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first.startswith("zaiproxy collect listening on http://127.0.0.1:"), first
        url = first.split("listening on ", 1)[1].split()[0]
        assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
        assert httpx.get(f"{url}/admin/status", timeout=5).status_code == 401
        status = httpx.get(f"{url}/admin/status", timeout=5,
                           headers={"authorization": f"Bearer {TOKEN}"}).json()
        assert status["source"] == "collector"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "c.duckdb").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "https://x:1"], "only http:// targets"),
    (["--target", "http://x:1", "--interval", "0"], "--interval: duration must be positive"),
    (["--target", "http://x:1", "--retention", "a week"], "--retention: bad duration 'a week'"),
    (["--target", "http://x:1", "--target", "x:1/"], "a target is given twice: http://x:1"),
])
def test_collect_command_rejects_bad_arguments(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "zaiproxy", "collect", *args],
                          capture_output=True, cwd=REPO, timeout=30)
    assert done.returncode == 2
    assert message in done.stderr.decode()


def test_collect_command_reports_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "zaiproxy", "collect", "--target", "http://127.0.0.1:1",
             "--port", str(port), "--db", str(tmp_path / "c.duckdb")],
            capture_output=True, cwd=REPO, timeout=30)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr.decode()


# ---- the fleet's /admin/keys (in-process proxies: real /metrics and /admin/keys) --------

TARGET_TOKEN = "target-admin-token"


async def test_fleet_keys_merge_targets_and_list_the_failing_one(nursery: trio.Nursery,
                                                                 tmp_path: Path) -> None:
    from tests.harness import make_config, request, start_mock, start_proxy

    upstream = await start_mock(nursery)
    proxies = []
    for name, alice_rpm, token in (("a", 10, TARGET_TOKEN), ("b", 3, TARGET_TOKEN),
                                   ("c", 10, "another-token")):
        keys = tmp_path / f"keys-{name}.toml"
        keys.write_text(f'[[keys]]\nalias = "alice"\nkey = "zp-alice-{name}"\n'
                        f'[keys.limits]\nrequests_per_minute = {alice_rpm}\n'
                        f'requests_per_5h = 100\n'
                        + ('\n[[keys]]\nalias = "bob"\nkey = "zp-bob-a"\nenabled = false\n'
                           if name == "a" else ""))
        proxies.append(await start_proxy(nursery, make_config(
            upstream, keys_file=str(keys), admin_token=token,
            requests_per_minute=50 if name == "a" else 20)))
    a, b, c = proxies
    for proxy, name, n in ((a, "a", 2), (b, "b", 3)):
        for _ in range(n):
            resp = await request(proxy.port, "POST", "/v1/chat/completions",
                                 [JSON, ("x-api-key", f"zp-alice-{name}")], CHAT)
            assert resp.status == 200
    collector = Collector(options(tmp_path, a.url, b.url, c.url, admin_token=TOKEN,
                                  target_token=TARGET_TOKEN, interval=0.2))
    assert TARGET_TOKEN not in repr(collector.options)
    _, port = await nursery.start(collector.run)
    await wait_until(lambda: all(s.scrapes for s in collector.states))
    assert (await get(port, "/admin/keys")).status == 401  # the collector's own token
    resp = await get(port, "/admin/keys", AUTH)
    assert resp.status == 200
    fleet = resp.json()
    assert TARGET_TOKEN.encode() not in resp.body
    assert (fleet["mode"], fleet["adaptive"]) == ("fleet", None)
    assert [(t["target"], t["ok"]) for t in fleet["targets"]] == [
        (a.url, True), (b.url, True), (c.url, False)]
    assert fleet["targets"][2]["error"].startswith("HTTP 401: admin endpoint")
    assert fleet["targets"][0]["error"] is None
    alice, bob = fleet["keys"]
    assert alice["alias"] == "alice" and alice["usage"]["requests"] == 5  # 2 on a + 3 on b
    assert alice["usage"]["input_tokens"] > 0
    assert (alice["enabled"], alice["state"], alice["limited_by"]) == (
        True, "limited", ["requests_per_minute"])  # b's 3 per minute are used up
    assert alice["limits"] == {"requests_per_minute": 10, "requests_per_5h": 100}
    assert {k: alice["now"]["requests_per_minute"][k] for k in ("limit", "remaining")} == {
        "limit": 3, "remaining": 0}
    assert {k: alice["now"]["requests_per_5h"][k] for k in ("limit", "used", "remaining")} == {
        "limit": 100, "used": 3, "remaining": 97}  # b's: the fewest left
    assert (bob["alias"], bob["enabled"], bob["state"]) == ("bob", False, "disabled")
    assert fleet["global"]["requests_per_minute"]["limit"] == 20  # b: 20 - 3 left < 50 - 2

    # Every target failing still answers, listing why; a stale target is not asked.
    collector.options = replace(collector.options, target_token=None)
    collector.states[1].consecutive_failures = 1  # as if b's last scrape had failed
    fleet = (await collector.keys())
    assert [t["ok"] for t in fleet["targets"]] == [False, False, False]
    assert fleet["targets"][1]["error"].startswith("stale: ")
    assert (fleet["keys"], fleet["global"]) == ([], {})


# ---- Z.AI's own quota and the pool of upstream keys ----------------------------------------
#
# A real proxy's answers (captured from `zaiproxy serve` with a pool file of two upstream keys
# polling the mock's quota endpoint, tests/tui/data/proxy_keys_pool.json): team-plan fresh at
# 43 % of its 5 hours and resting after Z.AI's 1308; backup at 97 %, its quota API answering
# malformed, its sample stale and its reserve reached. The /metrics lines are that proxy's.

POOL_KEYS = Path(__file__).parent / "tui" / "data" / "proxy_keys_pool.json"
RESET_5H, RESET_WEEK = 1796633384.08, 1797220184.08


def pool_keys(**changes: Any) -> dict[str, Any]:
    """The captured /admin/keys; ``changes``: per upstream alias, fields of its zai_quota
    entry (``quota``) and of its upstreams entry (``pool``) to replace."""
    doc: dict[str, Any] = orjson.loads(POOL_KEYS.read_bytes())
    for entry in doc["zai_quota"]:
        entry.update(changes.get(entry["upstream"], {}).get("quota", {}))
    for entry in doc["upstreams"]:
        entry.update(changes.get(entry["alias"], {}).get("pool", {}))
    return doc


def quota_exposition(variant: str = "production", *, team_age: float = 0.101,
                     backup_age: float | None = 14.165, team_polls: int = 18,
                     backup_polls: tuple[int, int, int] = (4, 14, 1),
                     backup_gate: float = 0.0, upstream: bool = True) -> str:
    """The zai_proxy_quota_* lines of that proxy's /metrics (``upstream=False``: one key
    without a pool file, the original's label sets); ``backup_polls``: success, malformed,
    stale."""
    def labels(alias: str, **more: str) -> str:
        pairs = {**more, **({"upstream": alias} if upstream else {}), "variant": variant}
        return ",".join(f'{k}="{v}"' for k, v in pairs.items())

    keys = [("team-plan", 0.43, 0.18, RESET_5H, RESET_WEEK)]
    if upstream:
        keys.append(("backup", 0.97, 0.75, 1796633384.061, 1797220184.061))
    lines = ["# HELP zai_proxy_quota_used_ratio Share of each configured rolling-window limit "
             "used now.", "# TYPE zai_proxy_quota_used_ratio gauge",
             f'zai_proxy_quota_used_ratio{{limit="upstream_tokens_per_5h",scope="upstream",'
             f'variant="{variant}"}} 0.00168',
             "# HELP zai_proxy_quota_usage_ratio Share of Z.AI's quota window used (Z.AI's own "
             "number).", "# TYPE zai_proxy_quota_usage_ratio gauge"]
    for alias, five, week, _, _ in keys:
        for window, used in (("five_hour", five), ("weekly", week)):
            lines.append(f"zai_proxy_quota_usage_ratio"
                         f"{{{labels(alias, limit_type='tokens_limit', window=window)}}} {used}")
    lines += ["# HELP zai_proxy_quota_reset_time_seconds When Z.AI's quota window resets (unix "
              "seconds).", "# TYPE zai_proxy_quota_reset_time_seconds gauge"]
    for alias, _, _, reset5, resetw in keys:
        for window, reset in (("five_hour", reset5), ("weekly", resetw)):
            lines.append(f"zai_proxy_quota_reset_time_seconds"
                         f"{{{labels(alias, limit_type='tokens_limit', window=window)}}} {reset}")
    lines += ["# HELP zai_proxy_quota_sample_age_seconds Seconds since Z.AI's quota was last "
              "read successfully.", "# TYPE zai_proxy_quota_sample_age_seconds gauge",
              f"zai_proxy_quota_sample_age_seconds{{{labels('team-plan')}}} {team_age}"]
    if upstream and backup_age is not None:
        lines.append(f"zai_proxy_quota_sample_age_seconds{{{labels('backup')}}} {backup_age}")
    lines += ["# HELP zai_proxy_quota_poll_total Polls of Z.AI's quota API by result.",
              "# TYPE zai_proxy_quota_poll_total counter"]
    polls = {"team-plan": (team_polls, 0, 0)} | ({"backup": backup_polls} if upstream else {})
    for alias, (ok, malformed, stale) in polls.items():
        for result, n in (("success", ok), ("error", 0), ("malformed", malformed),
                          ("stale", stale)):
            lines.append(f"zai_proxy_quota_poll_total{{{labels(alias, result=result)}}} {n}.0")
    lines += ["# HELP zai_proxy_quota_rate_cap The request rate quota pacing allows now "
              "(requests/s).", "# TYPE zai_proxy_quota_rate_cap gauge",
              f"zai_proxy_quota_rate_cap{{{labels('team-plan')}}} 0.017",
              "# HELP zai_proxy_quota_gate_open 0 while the window's quota reserve is reached "
              "(requests get 429).", "# TYPE zai_proxy_quota_gate_open gauge"]
    gates = {"team-plan": 1.0} | ({"backup": backup_gate} if upstream else {})
    for alias, five in gates.items():
        for window, open_ in (("five_hour", five), ("weekly", 1.0)):
            lines.append(f"zai_proxy_quota_gate_open{{{labels(alias, window=window)}}} {open_}")
    return exposition(variant, 10) + "\n".join(lines) + "\n"


def test_merge_quota_takes_the_freshest_sample_per_upstream_key() -> None:
    a = pool_keys()
    # b polls the same accounts: an older team-plan sample, a newer backup one (its quota
    # API answered again there), a lower paced rate, backup's reserve open.
    b = pool_keys(**{
        "team-plan": {"quota": {"last_success_at": 1796615354.995, "sample_age_s": 60.36,
                                "pacing": {**a["zai_quota"][0]["pacing"], "rate_rps": 0.01}}},
        "backup": {"quota": {"last_success_at": 1796615414.0, "sample_age_s": 1.0,
                             "fresh": True, "stale": False, "last_outcome": "success",
                             "pacing": {**a["zai_quota"][1]["pacing"], "reserve_reached": False,
                                        "closed_until": None}}}})
    team, backup = merge_quota([a["zai_quota"], b["zai_quota"], None])
    assert {k: v for k, v in team.items() if k != "pacing"} == {
        k: v for k, v in a["zai_quota"][0].items() if k != "pacing"}
    assert team["pacing"]["rate_rps"] == 0.01  # the lowest paced rate
    assert (backup["sample_age_s"], backup["stale"], backup["last_outcome"]) == (
        1.0, False, "success")
    # Reserve reached on a (its own admission refuses): the fleet shows it closed.
    assert backup["pacing"]["reserve_reached"] is True
    assert backup["pacing"]["closed_until"] == 1796633384.061
    assert merge_quota([None, "x"]) is None and merge_quota([[], None]) == []


def test_merge_upstreams_rests_a_key_any_target_rests() -> None:
    a = pool_keys()["upstreams"]
    b = pool_keys(**{"team-plan": {"pool": {"resting_until": 1796617000.0,
                                            "rest_reason": "throttled", "headroom": 0.6}},
                     "backup": {"pool": {"resting": True, "resting_until": 1796616000.0,
                                         "rest_reason": "throttled", "rests": 2,
                                         "pinned_clients": ["nightly"], "headroom": 0.02}}}
                  )["upstreams"]
    team, backup = merge_upstreams([a, b])
    assert team == {"alias": "team-plan", "index": 0, "resting": True,
                    "resting_until": 1796619014.342, "rest_reason": "quota",  # a's, later
                    "rests": 2, "switched_away": 2, "pinned_clients": [], "headroom": 0.57}
    assert (backup["resting"], backup["resting_until"], backup["rest_reason"]) == (
        True, 1796616000.0, "throttled")  # b's: a does not rest it
    assert (backup["rests"], backup["pinned_clients"], backup["headroom"]) == (
        2, ["ci-runner", "nightly"], 0.02)
    assert merge_upstreams([None]) is None


def test_quota_entries_read_the_outcome_and_staleness_from_the_poll_counters() -> None:
    first = quota_entries(quota_gauges(quota_exposition()), 1796615415.0, None)
    team, backup = sorted(first, key=lambda e: e["upstream"] != "team-plan")
    assert team["windows"] == [
        {"window": "five_hour", "limit_type": "TOKENS_LIMIT", "used_fraction": 0.43,
         "used_pct": 43.0, "reset_at": RESET_5H, "reset_in_s": round(RESET_5H - 1796615415.0, 3)},
        {"window": "weekly", "limit_type": "TOKENS_LIMIT", "used_fraction": 0.18,
         "used_pct": 18.0, "reset_at": RESET_WEEK,
         "reset_in_s": round(RESET_WEEK - 1796615415.0, 3)}]
    assert (team["sample_age_s"], team["last_success_at"]) == (0.101, 1796615414.899)
    assert team["pacing"] == {"enabled": True, "rate_rps": 0.017, "reserve_reached": False,
                              "window": None, "closed_until": None}
    assert backup["pacing"]["reserve_reached"] is True
    assert backup["pacing"]["closed_until"] == 1796633384.061
    # One scrape: nothing moved yet, so no word on the last poll or on staleness.
    assert (team["last_outcome"], team["stale"], backup["last_outcome"], backup["stale"]) == (
        None, None, None, None)
    # The next scrape: team-plan polled fine, backup failed again and went stale.
    second = quota_entries(quota_gauges(quota_exposition(team_polls=19, backup_polls=(4, 15, 2))),
                           1796615416.0, first)
    team, backup = sorted(second, key=lambda e: e["upstream"] != "team-plan")
    assert (team["last_outcome"], team["stale"], team["fresh"]) == ("success", False, True)
    assert (backup["last_outcome"], backup["stale"], backup["fresh"]) == (
        "malformed", True, False)
    # Nothing moves: what was read is kept; the proxy restarted (counters down): unknown.
    third = quota_entries(quota_gauges(quota_exposition(team_polls=19, backup_polls=(4, 15, 2))),
                          1796615417.0, second)
    assert [e["last_outcome"] for e in third] == ["success", "malformed"]
    restarted = quota_entries(quota_gauges(quota_exposition(team_polls=1, backup_polls=(0, 1, 0),
                                                            backup_age=None)),
                              1796615418.0, third)
    assert [(e["last_outcome"], e["stale"]) for e in restarted] == [(None, None), (None, True)]
    assert restarted[1]["sample_age_s"] is None  # never read since the restart: stale
    # Without a pool file the one key is "default"; a proxy that does not poll has none.
    (one,) = quota_entries(quota_gauges(quota_exposition(upstream=False)), 1796615415.0, None)
    assert one["upstream"] == "default" and len(one["windows"]) == 2
    assert quota_gauges(exposition("production", 3)) == {}
    aged = quota_at(second, 1796615426.0)
    assert aged[0]["sample_age_s"] == round(1796615426.0 - team["last_success_at"], 3)


async def test_fleet_keys_carry_zai_quota_and_the_pool(nursery: trio.Nursery,
                                                       tmp_path: Path) -> None:
    """Targets answering a real proxy's /admin/keys: per upstream alias the freshest sample
    and the pool merged; a target of an older proxy (no zai_quota, no upstreams) adds
    nothing, and a fleet of older proxies answers without the fields (not "not polled")."""
    b_doc = pool_keys(**{"backup": {
        "quota": {"last_success_at": 1796615414.0, "sample_age_s": 1.0, "fresh": True,
                  "stale": False, "last_outcome": "success"},
        "pool": {"resting": True, "resting_until": 1796616000.0, "rest_reason": "throttled"}}})
    older = pool_keys()
    del older["zai_quota"], older["upstreams"]
    targets = [ScriptedTarget(quota_exposition(), {"/admin/keys": orjson.dumps(doc)})
               for doc in (pool_keys(), b_doc, older)]
    for target in targets:
        await nursery.start(target.run)
    collector = Collector(options(tmp_path, *(t.url for t in targets)))
    _, port = await nursery.start(collector.run)
    await wait_until(lambda: all(s.scrapes for s in collector.states))
    fleet = (await get(port, "/admin/keys")).json()
    assert [t["ok"] for t in fleet["targets"]] == [True, True, True]
    team, backup = fleet["zai_quota"]
    assert (team["upstream"], team["last_success_at"], team["stale"]) == (
        "team-plan", 1796615414.995, False)
    assert (backup["upstream"], backup["last_success_at"], backup["last_outcome"]) == (
        "backup", 1796615414.0, "success")
    assert backup["pacing"]["reserve_reached"] is True  # the first target's admission
    pool = {u["alias"]: u for u in fleet["upstreams"]}
    assert pool["team-plan"]["resting"] and pool["team-plan"]["rest_reason"] == "quota"
    assert (pool["backup"]["resting"], pool["backup"]["resting_until"]) == (True, 1796616000.0)
    assert pool["backup"]["pinned_clients"] == ["ci-runner"]
    # What the TUI reads of it.
    from zaiproxy_tui.model import parse_keys
    report = parse_keys(fleet)
    assert report.zai_quota is not None and [q.upstream for q in report.zai_quota] == [
        "team-plan", "backup"]
    assert report.upstreams is not None and report.upstreams[1].resting

    for target in targets[:2]:
        target.routes = {"/admin/keys": orjson.dumps(older)}
    fleet = (await get(port, "/admin/keys")).json()
    assert "zai_quota" not in fleet and "upstreams" not in fleet


async def test_status_carries_zai_quota_from_the_scraped_series(nursery: trio.Nursery,
                                                                tmp_path: Path) -> None:
    """No token needed: the collector reads Z.AI's quota from the /metrics it scrapes. Two
    pods polling the same accounts: the freshest sample per key, the poll outcome and the
    staleness from the counters between scrapes, ages as of the status."""
    a = ScriptedTarget(quota_exposition(team_age=30.0, backup_age=14.165))
    b = ScriptedTarget(quota_exposition(team_age=5.0, backup_age=20.0, backup_gate=1.0))
    plain = ScriptedTarget(exposition("canary", 3))  # does not poll
    for target in (a, b, plain):
        await nursery.start(target.run)
    collector = Collector(options(tmp_path, a.url, b.url, plain.url))
    _, port = await nursery.start(collector.run)
    await wait_until(lambda: all(s.scrapes for s in collector.states))
    a.text = quota_exposition(team_age=31.0, team_polls=19, backup_polls=(4, 15, 2))
    b.text = quota_exposition(team_age=6.0, team_polls=19, backup_age=21.0,
                              backup_polls=(4, 15, 2), backup_gate=1.0)
    await collector.scrape_all()
    before = time.time()
    status = (await get(port, "/admin/status")).json()
    team, backup = status["zai_quota"]
    assert team["upstream"] == "team-plan" and 6.0 <= team["sample_age_s"] < 6.0 + 5
    assert team["last_success_at"] == pytest.approx(before - 6.0, abs=5)  # b's: fresher
    assert (team["last_outcome"], team["stale"]) == ("success", False)
    assert backup["sample_age_s"] >= 14.165  # a's sample
    assert (backup["last_outcome"], backup["stale"]) == ("malformed", True)
    assert [w["used_fraction"] for w in backup["windows"]] == [0.97, 0.75]
    # a's sample carries a's gate: its reserve is reached (b's is open).
    assert backup["pacing"]["reserve_reached"] is True
    # The TUI reads it as it reads a proxy's.
    from zaiproxy_tui.model import parse_snapshot
    snap = parse_snapshot(status)
    assert snap.zai_quota is not None and snap.zai_quota[1].failing
    # A fleet whose pods do not poll: [] ("not polled"), not absent.
    a.text = b.text = exposition("production", 20)
    await collector.scrape_all()
    assert (await get(port, "/admin/status")).json()["zai_quota"] == []
