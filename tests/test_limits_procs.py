"""The proxy's limits across real worker processes sharing one ledger segment.

Every test starts a real supervisor (``python -m zaiproxy serve``) with its
worker processes against the real mock upstream, itself a child process with
ONE process so that its ``/mock/stats`` counts every request the proxy sent.
Counts are exact: a limit enforced per process instead of across processes, a
lost update in the shared segment, or a lease not given back shows up as a
wrong number, not as a flaky one.

How exactness is made to hold on a real clock:

* rate limits: all connections are opened first (the kernel spreads them over
  the workers by SO_REUSEPORT), then every request is sent at once. GCRA
  admits its burst (``limit``) and then one more per ``period / limit``, so
  with E seconds from the first send to the last response at most
  ``limit + floor(E / 0.6)`` can pass; a 5-hour window cannot refill at all.
* concurrency: the upstream holds every admitted request for a known time, so
  the mock's ``peak_in_flight`` is what the proxy let through at once.
"""

from __future__ import annotations

import functools
import math
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import h11
import orjson
import pytest
import trio

from tests.harness import UPSTREAM_KEY, ProcessServer, RawClient, Response, request, start_process

CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
STREAM = orjson.dumps({"model": "glm-4.6", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})
JSON = ("content-type", "application/json")
# Bounds on waiting for a state (never a sleep standing in for readiness).
STATE_TIMEOUT = 15.0
POLL_S = 0.05

StartProxy = Callable[..., ProcessServer]


async def wait_until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll another process's state until ``condition`` holds, within STATE_TIMEOUT."""
    with trio.fail_after(STATE_TIMEOUT):
        while not await condition():  # noqa: ASYNC110 - no event crosses the process boundary
            await trio.sleep(POLL_S)


@pytest.fixture
def start_proxy(mock: ProcessServer, tmp_path: Path) -> Iterator[StartProxy]:
    """Start ``zaiproxy serve`` with settings as environment variables; stopped after the test."""
    started: list[ProcessServer] = []

    def start(workers: int, **env: str) -> ProcessServer:
        full = {
            "ZAI_API_KEY": UPSTREAM_KEY,
            "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
            "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
            "ZAIPROXY_NATIVE_BASE_URL": mock.url,
            "ZAIPROXY_WORKERS": str(workers),
            # The learned upstream rate is another limit (and persists per port in a state
            # file): off, so the configured limit is the only one in play.
            "ZAIPROXY_ADAPTIVE_RATE": "false",
            # Irrelevant to request and concurrency limits; off, it keeps the burst short (a
            # tighter bound on what GCRA may refill during it).
            "ZAIPROXY_TOKEN_COUNTING": "false",
            "ZAIPROXY_DRAIN_TIMEOUT": "5",
            **env,
        }
        server = start_process(["serve", "--port", "0"], env=full,
                               stderr_path=tmp_path / f"proxy-{len(started)}.log")
        started.append(server)
        return server

    yield start
    codes = [server.stop() for server in started]
    assert codes == [0] * len(started), [s.logs()[-2000:] for s in started]


async def launch(start: StartProxy, workers: int, **env: str) -> ProcessServer:
    # start_process blocks until the "listening on" line: keep it off the trio loop.
    return await trio.to_thread.run_sync(functools.partial(start, workers, **env))


async def mock_stats(mock: ProcessServer) -> dict[str, object]:
    stats: dict[str, object] = (await request(mock.url, "GET", "/mock/stats")).json()
    return stats


async def reset_mock(mock: ProcessServer) -> None:
    """Zero the mock's counts once nothing from an earlier test is still in flight there."""
    async def idle() -> bool:
        return (await mock_stats(mock))["in_flight"] == 0

    await wait_until(idle)
    await request(mock.url, "POST", "/mock/stats/reset")


async def open_clients(port: int, n: int) -> list[RawClient]:
    clients: list[RawClient | None] = [None] * n
    limiter = trio.CapacityLimiter(100)  # well inside the 1024 accept backlog per worker

    async def connect(i: int) -> None:
        async with limiter:
            clients[i] = await RawClient.connect("127.0.0.1", port)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(connect, i)
    return [c for c in clients if c is not None]


async def close_clients(clients: list[RawClient]) -> None:
    for client in clients:
        await client.aclose()


def frame(client: RawClient, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """The bytes of one request on ``client`` (its h11 state advances as if sent)."""
    hdrs = [("host", "proxy.test"), ("content-length", str(len(body))), *headers]
    return (client.conn.send(h11.Request(method="POST", target=target, headers=hdrs))
            + client.conn.send(h11.Data(data=body)) + client.conn.send(h11.EndOfMessage()))


async def burst(clients: list[RawClient], headers: list[tuple[str, str]],
                body: bytes = CHAT) -> tuple[list[Response], float]:
    """One request on every client at once; (responses in client order, seconds taken).

    The requests are framed before the clock starts, so the measured span is
    only sending and answering: from the first send to the last response.
    """
    frames = [frame(c, "/v1/chat/completions", [JSON, *headers], body) for c in clients]
    responses: list[Response | None] = [None] * len(clients)

    async def one(i: int) -> None:
        await clients[i].stream.send_all(frames[i])
        responses[i] = await clients[i].read_response()

    started = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(len(clients)):
                nursery.start_soon(one, i)
    elapsed = trio.current_time() - started
    assert all(r is not None for r in responses)
    return [r for r in responses if r is not None], elapsed


async def worker_pids(clients: list[RawClient]) -> list[int]:
    """The pid of the worker serving each (keep-alive) connection, from its ``/health``."""
    pids: list[int] = []
    for client in clients:
        resp = await client.request("GET", "/health")
        assert resp.status == 200
        health = resp.json()
        # The ledger under test is the one the run asked for (ZAIPROXY_LEDGER is inherited).
        assert health["ledger"] == os.environ.get("ZAIPROXY_LEDGER", "native")
        pids.append(int(health["pid"]))
    return pids


def assert_proxy_429(resp: Response, limit: str) -> None:
    """A 429 the PROXY answered (not one relayed from upstream), naming ``limit``."""
    assert resp.status == 429, resp.body
    assert resp.json()["error"]["code"] == "proxy_rate_limit"
    assert resp.header(b"x-zaiproxy-limit") == limit.encode()
    assert int(resp.header(b"retry-after") or b"0") >= 1


# ---- request limits: exact across four workers ------------------------------------------

CLIENTS = 1000
LIMIT = 100


# (setting, the 429's x-zaiproxy-limit, seconds GCRA takes to admit one more); shared with
# the fleet's test (test_fleet_procs.py), which spreads the same burst over two proxies.
REQUEST_LIMITS = pytest.mark.parametrize(("setting", "limit_name", "refill_s"), [
    ("ZAIPROXY_REQUESTS_PER_MINUTE", "global:requests_per_minute", 60 / LIMIT),
    # A 5-hour rolling window: nothing can come back during the test.
    ("ZAIPROXY_REQUESTS_PER_5H", "global:requests_per_5h", math.inf),
], ids=["gcra_per_minute", "window_per_5h"])


@REQUEST_LIMITS
async def test_a_request_limit_is_exact_across_workers(
        start_proxy: StartProxy, mock: ProcessServer, setting: str, limit_name: str,
        refill_s: float) -> None:
    proxy = await launch(start_proxy, 4, **{setting: str(LIMIT)})
    await reset_mock(mock)
    clients = await open_clients(proxy.port, CLIENTS)
    try:
        responses, elapsed = await burst(clients, [])
        pids = await worker_pids(clients)
    finally:
        await close_clients(clients)

    statuses = Counter(r.status for r in responses)
    admitted = statuses[200]
    refill = 0 if math.isinf(refill_s) else math.floor(elapsed / refill_s)
    per_worker = Counter(pids)
    admitted_per_worker = Counter(
        pid for pid, r in zip(pids, responses, strict=True) if r.status == 200)
    # Shown with -s: E decides how exact the GCRA bound is.
    print(f"\n{limit_name}: E={elapsed:.3f}s admitted={admitted} "
          f"requests per worker={sorted(per_worker.values())} "
          f"admitted per worker={sorted(admitted_per_worker.values())}")
    assert statuses[200] + statuses[429] == CLIENTS, statuses
    # With E < 0.6 s (usual here) or the 5-hour window, refill is 0: exactly LIMIT.
    assert LIMIT <= admitted <= LIMIT + refill, (admitted, elapsed)
    for resp in responses:
        if resp.status == 429:
            assert_proxy_429(resp, limit_name)
    # The upstream saw exactly the admitted requests, and nothing else.
    stats = await mock_stats(mock)
    assert stats["requests"] == admitted
    # The requests really spread over the processes: several workers served them, and at
    # least two of them each got more than LIMIT, so per-process limits would have let
    # through far more than LIMIT in total.
    assert len(per_worker) >= 2, per_worker
    assert sum(1 for n in per_worker.values() if n > LIMIT) >= 2, per_worker


# ---- concurrency: never more in flight upstream than the limit ------------------------

async def test_concurrency_limit_holds_across_workers_and_queued_requests_all_pass(
        start_proxy: StartProxy, mock: ProcessServer) -> None:
    proxy = await launch(start_proxy, 4, ZAIPROXY_CONCURRENCY="8", ZAIPROXY_QUEUE_TIMEOUT="30")
    await reset_mock(mock)
    clients = await open_clients(proxy.port, 64)
    try:
        responses, elapsed = await burst(clients, [("x-mock-first-byte-delay", "0.2")])
        pids = await worker_pids(clients)
    finally:
        await close_clients(clients)
    assert [r.status for r in responses] == [200] * 64
    stats = await mock_stats(mock)
    assert stats["requests"] == 64
    # Never more than 8 upstream at once, across every worker; exactly 8 shows the limit was
    # reached (and so was what made the others wait).
    assert stats["peak_in_flight"] == 8
    assert len(set(pids)) >= 2
    assert elapsed >= 64 / 8 * 0.2  # eight rounds of 0.2 s: the queue really waited


async def test_concurrency_limit_without_queue_refuses_the_rest(
        start_proxy: StartProxy, mock: ProcessServer) -> None:
    proxy = await launch(start_proxy, 4, ZAIPROXY_CONCURRENCY="8")
    await reset_mock(mock)
    clients = await open_clients(proxy.port, 64)
    try:
        # Each admitted request holds its slot for 1 s upstream: every other request
        # arrives (well) within that second, so exactly 8 pass.
        responses, _ = await burst(clients, [("x-mock-first-byte-delay", "1")])
    finally:
        await close_clients(clients)
    statuses = Counter(r.status for r in responses)
    assert statuses == {200: 8, 429: 56}
    for resp in responses:
        if resp.status == 429:
            assert_proxy_429(resp, "global:concurrency")
    stats = await mock_stats(mock)
    assert stats["requests"] == 8
    assert stats["peak_in_flight"] == 8


# ---- a worker killed while holding leases ---------------------------------------------

async def open_stream(port: int) -> tuple[RawClient, int]:
    """A long streaming request, read until its first body bytes: it is admitted and running."""
    client = await RawClient.connect("127.0.0.1", port)
    await client.stream.send_all(frame(client, "/v1/chat/completions", [
        JSON, ("x-mock-chunks", "100000"), ("x-mock-chunk-delay", "0.05")], STREAM))
    status = 0
    with trio.fail_after(STATE_TIMEOUT):
        while True:
            event = client.conn.next_event()
            if event is h11.NEED_DATA:
                client.conn.receive_data(await client.stream.receive_some(65536))
            elif type(event) is h11.Response:
                status = event.status_code
            elif type(event) is h11.Data:
                return client, status
            else:
                raise AssertionError(f"unexpected {event!r}")


async def health_pid(port: int) -> int:
    with trio.fail_after(STATE_TIMEOUT):
        resp = await request(port, "GET", "/health")
    assert resp.status == 200
    return int(resp.json()["pid"])


def log_events(proxy: ProcessServer, event: str) -> list[dict[str, object]]:
    """The JSON log lines of ``event`` written so far (stderr of supervisor and workers)."""
    marker = f'"event":"{event}"'
    return [orjson.loads(line) for line in proxy.logs().splitlines() if marker in line]


async def wait_for_log(proxy: ProcessServer, event: str, count: int = 1) -> list[dict[str, object]]:
    """Poll the log (written by a thread, batched) until ``count`` lines of ``event`` are in."""
    async def logged() -> bool:
        return len(log_events(proxy, event)) >= count

    await wait_until(logged)
    return log_events(proxy, event)


async def test_leases_of_a_killed_worker_are_reclaimed(
        start_proxy: StartProxy, mock: ProcessServer) -> None:
    proxy = await launch(start_proxy, 1, ZAIPROXY_CONCURRENCY="2")
    streams: list[RawClient] = []
    try:
        for _ in range(2):
            client, status = await open_stream(proxy.port)
            streams.append(client)
            assert status == 200
        third = await request(proxy.port, "POST", "/v1/chat/completions", [JSON], CHAT)
        assert_proxy_429(third, "global:concurrency")

        victim = await health_pid(proxy.port)
        os.kill(victim, signal.SIGKILL)
        # The supervisor keeps the listening socket: a new connection waits in its backlog
        # for the replacement worker, which answers with another pid.
        async def replaced() -> bool:
            return await health_pid(proxy.port) != victim

        await wait_until(replaced)
    finally:
        await close_clients(streams)

    # Both slots the dead worker held are free again: two requests that overlap upstream
    # both pass. Without the reclaim the row would stay at 2 of 2 and refuse both.
    results: list[Response] = []

    async def slow() -> None:
        results.append(await request(proxy.port, "POST", "/v1/chat/completions",
                                     [JSON, ("x-mock-first-byte-delay", "0.3")], CHAT))

    with trio.fail_after(STATE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            nursery.start_soon(slow)
    assert [r.status for r in results] == [200, 200], [r.body for r in results]

    reclaimed = await wait_for_log(proxy, "leases_reclaimed")
    assert [(e["worker"], e["leases"], e["proc"]) for e in reclaimed] == [(0, 2, "supervisor")]
    died = await wait_for_log(proxy, "worker_died")
    assert [e["signal"] for e in died] == [signal.SIGKILL]
