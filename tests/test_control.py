"""/health, /ready and /metrics."""

from __future__ import annotations

import multiprocessing
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import make_config, request, start_mock, start_proxy
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
