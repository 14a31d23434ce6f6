"""/health, /ready and /metrics (the original's concurrency cap and client buckets at the end)."""

from __future__ import annotations

import multiprocessing
import os

import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import make_config, request, start_mock, start_proxy, wait_until
from tests.test_labels import expected_bucket
from zaiproxy import __version__
from zaiproxy.request.context import STATE_DRAINING, STATE_RUNNING, STATE_STARTING, SharedState


@pytest.fixture
async def proxy(nursery):
    upstream = await start_mock(nursery)
    return await start_proxy(nursery, make_config(upstream, deployment_variant="canary"))


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_health(proxy):
    resp = await request(proxy.port, "GET", "/health")
    assert resp.status == 200
    body = resp.json()
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["variant"] == "canary"
    assert body["ledger"] in ("native", "python")
    # The suite runs once per HTTP implementation; the worker must be using the chosen one.
    assert body["http"] == os.environ.get("ZAIPROXY_HTTP_IMPL", "h11")
    head = await request(proxy.port, "HEAD", "/health")
    assert head.status == 200 and head.body == b""


async def test_ready_follows_supervisor_state_and_drain(proxy):
    cell = multiprocessing.get_context("spawn").RawValue("i", STATE_STARTING)
    proxy.worker.ctx.shared_state = SharedState(cell)
    assert (await request(proxy.port, "GET", "/ready")).status == 503  # workers not all up
    cell.value = STATE_RUNNING
    resp = await request(proxy.port, "GET", "/ready")
    assert resp.status == 200 and resp.json()["ready"] is True
    cell.value = STATE_DRAINING
    resp = await request(proxy.port, "GET", "/ready")
    assert resp.status == 503
    assert resp.json() == {"ready": False, "draining": True, "worker": 0}


async def test_draining_worker_refuses_new_proxy_requests(proxy):
    proxy.worker.ctx.draining = True
    resp = await request(proxy.port, "POST", "/v1/chat/completions",
                         [("content-type", "application/json")], b'{"model":"glm-4.6"}')
    assert resp.status == 503
    assert resp.header(b"connection") == b"close"
    assert (await request(proxy.port, "GET", "/ready")).status == 503


async def test_metrics_count_requests_with_variant(proxy):
    for _ in range(3):
        await request(proxy.port, "GET", "/v1/models")
    await request(proxy.port, "GET", "/nope")
    resp = await request(proxy.port, "GET", "/metrics")
    assert resp.status == 200
    assert resp.header(b"content-type").startswith(b"text/plain")
    got = samples(resp.body)
    # status_code (the original service's label) beside our status, with the same value.
    key = ("zai_proxy_requests_total", (("method", "GET"), ("path", "/v1/models"),
                                        ("status", "200"), ("status_code", "200"),
                                        ("variant", "canary")))
    assert got[key] == 3
    assert got[("zai_proxy_requests_total", (("method", "GET"), ("path", "other"),
                                             ("status", "404"), ("status_code", "404"),
                                             ("variant", "canary")))] == 1
    info = [k for k in got if k[0] == "zai_proxy_build_info"]
    assert info and dict(info[0][1])["version"] == __version__
    for name, labels in got:
        assert dict(labels).get("variant") == "canary", name


async def test_client_chosen_paths_and_methods_add_no_series(proxy):
    await request(proxy.port, "GET", "/nope")
    before = series(samples((await request(proxy.port, "GET", "/metrics")).body))
    for i in range(300):
        await request(proxy.port, "GET", f"/random/{i}/path")
        await request(proxy.port, "GET", f"/api/paas/v4/x{i}")  # native prefix: one template
    for i in range(50):
        from tests.harness import send_raw

        # connection: close, or the answered connection stays open until read_timeout.
        await send_raw(proxy.port, f"M{i} /x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                       .encode(), read_timeout=1)
    after = samples((await request(proxy.port, "GET", "/metrics")).body)
    new = [k for k in after if k[0] == "zai_proxy_requests_total"]
    paths = {dict(k[1])["path"] for k in new}
    methods = {dict(k[1])["method"] for k in new}
    assert paths <= {"other", "/api/paas/v4/*", "/metrics"}
    assert methods <= {"GET", "other"}
    # At most the per-request families (requests, duration, request and response size) for
    # three new (method, template) pairs: /api/paas/v4/*, other, and the /metrics scrape.
    assert len(series(after) - before) <= 12


def series(got: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[object]:
    """Distinct series: a histogram's _bucket/_sum/_count samples are one series."""
    return {(name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count"),
             tuple(kv for kv in labels if kv[0] != "le")) for name, labels in got}


# ---- the original's concurrency cap and client buckets, on a real proxy ---------------------

CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
# The original's client bucket of this test's peer, 127.0.0.1 ("source-30"; test_labels.py).
LOCALHOST = expected_bucket("127.0.0.1")


async def chat(port: int, *headers: tuple[str, str]) -> int:
    resp = await request(port, "POST", "/v1/chat/completions",
                         [("content-type", "application/json"), *headers], CHAT)
    return resp.status


def metric(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> dict[str, float]:
    """The samples of ``name`` with these labels, by their ``client`` label."""
    return {dict(ls).get("client", ""): v for (n, ls), v in got.items()
            if n == name and set(labels.items()) <= set(ls)}


async def test_max_workers_and_utilization_on_a_real_proxy(nursery):
    """ZAIPROXY_CONCURRENCY=4 with 5 requests in flight: 4 admitted, 1 waiting in the queue,
    all of them in flight, as the original counted the requests waiting in its limiter."""
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream, concurrency=4, queue_timeout=30.0))
    ctx = proxy.worker.ctx
    row = ctx.admitter.plan(None, None).ops[0].index  # the concurrency lease
    async with trio.open_nursery() as held:
        for _ in range(5):  # upstream answers after 30 s: they stay until cancelled
            held.start_soon(chat, proxy.port, ("x-mock-first-byte-delay", "30"))
        await wait_until(lambda: ctx.ledger.in_use(row) == 4 and ctx.wait_queue.waiting == 1)
        got = samples((await request(proxy.port, "GET", "/metrics")).body)
        prod = (("variant", "production"),)
        assert got[("zai_proxy_concurrent_requests", prod)] == 5
        assert got[("zai_proxy_max_workers", prod)] == 4
        assert got[("zai_proxy_worker_utilization_ratio", prod)] == 5 / 4
        assert got[("zai_proxy_worker_processes", prod)] == 1
        assert got[("zai_proxy_worker_processes_busy_ratio", prod)] == 1
        held.cancel_scope.cancel()  # the clients leave: the proxy lets go of upstream
    await wait_until(lambda: ctx.ledger.in_use(row) == 0)
    got = samples((await request(proxy.port, "GET", "/metrics")).body)
    assert got[("zai_proxy_worker_utilization_ratio", (("variant", "production"),))] == 0


async def test_no_cap_no_max_workers_on_a_real_proxy(proxy):
    assert await chat(proxy.port) == 200
    got = samples((await request(proxy.port, "GET", "/metrics")).body)
    names = {name for name, _ in got}
    assert "zai_proxy_max_workers" not in names
    assert "zai_proxy_worker_utilization_ratio" not in names
    assert got[("zai_proxy_worker_processes", (("variant", "canary"),))] == 1


async def test_a_real_refusal_is_counted_in_the_peer_s_bucket(nursery):
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream, requests_per_minute=1))
    assert await chat(proxy.port) == 200
    # Forwarded headers are not trusted (as the original): the direct peer decides.
    assert await chat(proxy.port, ("x-forwarded-for", "203.0.113.7"),
                      ("x-real-ip", "203.0.113.7"), ("forwarded", "for=203.0.113.7")) == 429
    got = samples((await request(proxy.port, "GET", "/metrics")).body)
    assert metric(got, "zai_proxy_rate_limit_rejections_total", limit="requests_per_minute",
                  scope="global") == {LOCALHOST: 1}
    # The first was admitted at once (a 0-second wait); the refused one waited for nothing.
    assert metric(got, "zai_proxy_rate_limit_wait_seconds_count") == {LOCALHOST: 1}


async def test_a_real_wait_is_observed_in_the_peer_s_bucket(nursery):
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream, concurrency=1, queue_timeout=10.0))
    ctx = proxy.worker.ctx
    row = ctx.admitter.plan(None, None).ops[0].index
    statuses: list[int] = []

    async def first() -> None:
        statuses.append(await chat(proxy.port, ("x-mock-first-byte-delay", "0.3")))

    async with trio.open_nursery() as inner:
        inner.start_soon(first)
        await wait_until(lambda: ctx.ledger.in_use(row) == 1)
        statuses.append(await chat(proxy.port))  # waits for the first one's slot
    assert statuses == [200, 200]
    got = samples((await request(proxy.port, "GET", "/metrics")).body)
    wait = "zai_proxy_rate_limit_wait_seconds"
    assert metric(got, wait + "_count") == {LOCALHOST: 2}
    assert metric(got, wait + "_bucket", le="0.001") == {LOCALHOST: 1}  # the first: at once
    assert metric(got, wait + "_bucket", le="0.1") == {LOCALHOST: 1}  # the second waited
    assert metric(got, wait + "_sum")[LOCALHOST] >= 0.2
