"""Cross-worker Prometheus metrics: shared-memory series, the scrape, pricing.

In-process tests drive ``WorkerMetrics`` objects that each attach to one segment the way
worker processes do (their own ``Ledger`` and names mapping), against both ledger
implementations, and parse the exposition with prometheus-client's parser. The tests at
the end run a real supervisor with two worker processes and a mock upstream child.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import UPSTREAM_KEY, ProcessServer, RawClient, request, start_process
from tests.test_labels import expected_bucket
from zaiproxy.core.pricing import (
    DEFAULT_PRICES,
    PriceFileError,
    load_prices,
    parse_prices,
)
from zaiproxy.core.record import RequestRecord, Usage
from zaiproxy.limits.ledger import load
from zaiproxy.observe.metrics import (
    DURATION,
    REJECTIONS,
    REQUEST_SIZE,
    REQUESTS,
    WAIT,
    RecorderCells,
    WorkerMetrics,
)
from zaiproxy.observe.shm_metrics import KEY_MAX, SLOT_BYTES, NamesFile, names_offset

# `make test` runs the suite twice (h11, then h11-mypyc); the shared-memory metrics are
# independent of the HTTP implementation: run once.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="independent of the HTTP implementation")

IMPLEMENTATIONS = ["native", "python"]
# The original's client bucket of 127.0.0.1 ("source-30"): FNV-1a 32 of the address, mod
# 64, computed by the test's own FNV-1a (tests/test_labels.py).
LOCALHOST = expected_bucket("127.0.0.1")
# 2026-11-27 04:00 UTC = 12:00 in Beijing: outside the default 14:00-18:00 peak window.
NOON_BEIJING = 1_795_752_000.0
PEAK_BEIJING = NOON_BEIJING + 3 * 3600  # 15:00 in Beijing

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
COUNTED = ("_total", "_bucket", "_count", "_sum")  # samples that may never go down


def parse(text: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The samples of ``name`` with these labels, summed over the labels not named (PromQL's
    ``sum``): e.g. a histogram by method and path whatever its ``status_code``."""
    want = {"variant": "canary", **labels}.items()
    found = [v for (n, got), v in samples.items() if n == name and want <= got]
    if not found:
        raise KeyError((name, labels))
    return sum(found)


def series_of(samples: Samples) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    """Distinct series: a histogram's _bucket/_sum/_count samples are one series."""
    return {(n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count"),
             frozenset(kv for kv in labels if kv[0] != "le")) for n, labels in samples}


def rec(**fields: Any) -> RequestRecord:
    base: dict[str, Any] = dict(request_id="r", method="POST", route="/v1/chat/completions",
                                api="openai", status=200, duration_s=0.02, bytes_in=50,
                                client="127.0.0.1")
    base.update(fields)
    return RequestRecord(**base)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="zaiproxy-metrics-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Host:
    """One segment (the supervisor's) and the workers attached to it, as processes would."""

    def __init__(self, impl: str, path: Path, rows: int = 512, workers: int = 2) -> None:
        self.mod = load(impl)
        self.path = str(path)
        self.segment = self.mod.Ledger(self.path, create=True, rows=rows, windows=4,
                                       workers=workers)
        self.workers = workers
        self.attached: list[Any] = []

    def worker(self, index: int, **kw: Any) -> WorkerMetrics:
        led = self.mod.Ledger(self.path, create=False)  # each worker attaches on its own
        self.attached.append(led)
        options: dict[str, Any] = dict(
            variant="canary", ledger=self.mod.IMPLEMENTATION, workers=self.workers,
            segment=led, worker_index=index, known_models=frozenset({"glm-4.6", "glm-4.5"}),
            wall=lambda: NOON_BEIJING)
        options.update(kw)
        return WorkerMetrics(**options)

    def close(self) -> None:
        for led in self.attached:
            led.close()
        self.segment.close()


@pytest.fixture(params=IMPLEMENTATIONS)
def host(request: pytest.FixtureRequest, shm_dir: Path) -> Iterator[Host]:
    h = Host(request.param, shm_dir / "seg")
    yield h
    h.close()


def scrape(m: WorkerMetrics) -> Samples:
    body, content_type = m.render()
    assert content_type.startswith(b"text/plain")
    return parse(body)


# ---- one scrape shows every worker ---------------------------------------------------------


def test_any_worker_scrapes_the_exact_totals_of_all_workers(host: Host) -> None:
    w0, w1 = host.worker(0), host.worker(1)
    usage = Usage(input_tokens=1000, output_tokens=200, cache_read_tokens=300)
    # Durations on a bound (le is inclusive), inside a bucket, and past the last bound.
    w0.observe(rec(duration_s=0.005, bytes_in=100, bytes_out=900, usage=usage, model="glm-4.6",
                   ttft_s=0.3, upstream_s=0.0046, queue_wait_s=0.0, token_count_s=0.0002))
    w1.observe(rec(duration_s=0.02, bytes_in=101, bytes_out=1000, usage=usage, model="glm-4.6",
                   ttft_s=0.05, upstream_s=0.0192, queue_wait_s=2.0))
    w1.observe(rec(duration_s=400.0, bytes_in=0, status=502, model="custom-model",
                   usage=Usage(10, 20)))
    w0.observe(rec(method="GET", route="/v1/models", bytes_in=0))
    w1.upstream_error("upstream_timeout")
    w0.rejection("requests", "global", "127.0.0.1")
    w1.rejection("requests", "global", "10.0.0.1:50123")  # a port never changes the bucket
    w0.zai_error("frequency", "1302")
    w1.zai_error("unknown", "<script>")  # an upstream-chosen code is not a label
    w1.retry("frequency")

    got = scrape(w0)
    assert got == scrape(w1)  # the same totals whichever worker is asked
    assert value(got, "zai_proxy_requests_total", method="POST", path="/v1/chat/completions",
                 status="200") == 2
    assert value(got, "zai_proxy_requests_total", method="POST", path="/v1/chat/completions",
                 status="502") == 1
    assert value(got, "zai_proxy_requests_total", method="GET", path="/v1/models",
                 status="200") == 1
    hist = "zai_proxy_request_duration_seconds"
    labels = {"method": "POST", "path": "/v1/chat/completions"}
    buckets = {le: value(got, hist + "_bucket", le=le, **labels)
               for le in ("0.005", "0.01", "0.025", "300.0", "+Inf")}
    assert buckets == {"0.005": 1, "0.01": 1, "0.025": 2, "300.0": 2, "+Inf": 3}
    assert value(got, hist + "_count", **labels) == 3
    assert value(got, hist + "_sum", **labels) == pytest.approx(400.025, abs=1e-9)
    size = "zai_proxy_request_size_bytes"
    path = {"path": "/v1/chat/completions"}
    assert [value(got, size + "_bucket", le=le, **path) for le in ("100.0", "1000.0", "+Inf")] \
        == [2, 3, 3]
    assert value(got, size + "_sum", **path) == 201
    resp = "zai_proxy_response_size_bytes"
    assert [value(got, resp + "_bucket", le=le, **path) for le in ("100.0", "1000.0", "+Inf")] \
        == [0, 2, 2]  # the 502 had no bytes_out: not observed
    assert value(got, resp + "_sum", **path) == 1900
    ttft = "zai_proxy_time_to_first_token_seconds"
    assert value(got, ttft + "_bucket", le="0.05", model="glm-4.6") == 1
    assert value(got, ttft + "_count", model="glm-4.6") == 2
    overhead = "zai_proxy_overhead_seconds"
    assert value(got, overhead + "_bucket", le="0.0005", **path) == 1  # 0.005 - 0.0046
    assert value(got, overhead + "_bucket", le="0.001", **path) == 2  # 0.02 - 0.0192
    assert value(got, overhead + "_sum", **path) == pytest.approx(0.0012, abs=1e-9)
    wait = "zai_proxy_rate_limit_wait_seconds"
    assert value(got, wait + "_bucket", le="0.001") == 1
    assert value(got, wait + "_bucket", le="2.5") == 2
    assert value(got, wait + "_sum") == 2.0
    assert value(got, wait + "_count", client=LOCALHOST) == 2  # rec()'s peer is 127.0.0.1
    assert value(got, "zai_proxy_token_count_duration_seconds_bucket", le="0.0005") == 1
    # Tokens: OpenAI-style usage counts cached tokens inside input; the directions are disjoint.
    tok = "zai_proxy_tokens_total"
    std = {"model": "glm-4.6", "pricing_tier": "standard"}
    assert value(got, tok, direction="input", **std) == 2 * 700
    assert value(got, tok, direction="cache_read", **std) == 2 * 300
    assert value(got, tok, direction="output", **std) == 2 * 200
    assert value(got, tok, direction="input", model="other", pricing_tier="standard") == 10
    assert (tok, frozenset({"variant": "canary", "direction": "cache_write", **std}.items())) \
        not in got
    cost = 2 * (700 * 0.6 + 200 * 2.2 + 300 * 0.11) / 1e6  # list prices per 1M tokens
    assert value(got, "zai_proxy_estimated_cost_usd_total", model="glm-4.6") == \
        pytest.approx(cost, rel=1e-12)
    assert ("zai_proxy_estimated_cost_usd_total",
            frozenset({"variant": "canary", "model": "other"}.items())) not in got  # unpriced
    assert value(got, "zai_proxy_upstream_errors_total", error_type="upstream_timeout") == 1
    assert value(got, "zai_proxy_rate_limit_rejections_total", limit="requests",
                 scope="global") == 2
    assert value(got, "zai_proxy_rate_limit_rejections_total", client=LOCALHOST) == 1
    assert value(got, "zai_proxy_rate_limit_rejections_total",
                 client=expected_bucket("10.0.0.1")) == 1
    assert value(got, "zai_proxy_zai_errors_total", **{"class": "frequency", "code": "1302"}) == 1
    assert value(got, "zai_proxy_zai_errors_total", **{"class": "unknown", "code": "other"}) == 1
    assert value(got, "zai_proxy_retry_attempts_total", reason="frequency") == 1
    assert value(got, "zai_proxy_metrics_series_dropped_total") == 0
    assert value(got, "zai_proxy_ledger_info", implementation=host.mod.IMPLEMENTATION) == 1
    assert value(got, "zai_proxy_worker_processes") == 2
    # No concurrency cap configured: the original's cap and utilization have no series.
    assert not {"zai_proxy_max_workers", "zai_proxy_worker_utilization_ratio"} & {
        name for name, _ in got}
    for name, labels_ in got:
        assert dict(labels_).get("variant") == "canary", name


def test_a_restarted_worker_keeps_every_counter_and_zeroes_its_gauges(host: Host) -> None:
    w0, w1 = host.worker(0), host.worker(1)
    w0.request_started()
    w1.request_started()
    w1.stream_started()
    w1.observe(rec(usage=Usage(5, 5), model="glm-4.5"))
    w1.request_started()
    before = scrape(w0)
    assert value(before, "zai_proxy_concurrent_requests") == 3
    assert value(before, "zai_proxy_streams_in_flight") == 1
    assert value(before, "zai_proxy_worker_processes_busy_ratio") == 1.0
    # Worker 1 dies with two requests in flight; its replacement starts with the same index.
    w1 = host.worker(1)
    after = scrape(w0)
    assert value(after, "zai_proxy_concurrent_requests") == 1
    assert value(after, "zai_proxy_streams_in_flight") == 0
    assert value(after, "zai_proxy_worker_processes_busy_ratio") == 0.5
    counted = {k: v for k, v in before.items() if k[0].endswith(COUNTED)}
    assert counted and all(after[k] == v for k, v in counted.items())
    w1.observe(rec(usage=Usage(5, 5), model="glm-4.5"))
    again = scrape(w1)
    assert value(again, "zai_proxy_requests_total", method="POST",
                 path="/v1/chat/completions", status="200") == 2
    w0.request_ended()
    assert value(scrape(w1), "zai_proxy_concurrent_requests") == 0


def test_gauges_sum_over_workers(host: Host) -> None:
    pools = [(3, 1), (2, 5)]
    w0 = host.worker(0, pool_stats=lambda: pools[0])
    w1 = host.worker(1, pool_stats=lambda: pools[1])
    w1.observe(rec())  # a worker publishes its pool with each finished request...
    got = scrape(w0)  # ...and when it is scraped
    assert value(got, "zai_proxy_upstream_pool_connections", state="active") == 5
    assert value(got, "zai_proxy_upstream_pool_connections", state="idle") == 6
    host.segment.scalar_set(0, 2500)  # SC_ADAPTIVE_MRPS, written by the supervisor
    host.segment.scalar_set(3, 4)  # SC_ADJUST_UP
    host.segment.scalar_set(4, 7)  # SC_ADJUST_DOWN
    host.segment.scalar_set(2, 3570)  # SC_ADAPTIVE_CEILING_MRPS
    host.segment.scalar_set(5, 1_700_000_000_250)  # SC_ADAPTIVE_THROTTLED_AT_MS
    got = scrape(w1)
    assert value(got, "zai_proxy_rate_limit_requests_per_second") == 2.5
    assert value(got, "zai_proxy_rate_limit_ceiling_requests_per_second") == 3.57
    assert value(got, "zai_proxy_rate_limit_last_throttle_timestamp_seconds") == 1_700_000_000.25
    assert value(got, "zai_proxy_rate_limit_adjustments_total", direction="up") == 4
    assert value(got, "zai_proxy_rate_limit_adjustments_total", direction="down") == 7
    w0.request_started()
    w0.stream_started()
    got = scrape(w1)
    assert value(got, "zai_proxy_concurrent_requests") == 1
    assert value(got, "zai_proxy_streams_in_flight") == 1
    w0.request_ended(stream=True)
    got = scrape(w1)
    assert value(got, "zai_proxy_streams_in_flight") == 0


def _limit_series(samples: Samples) -> dict[str, float]:
    return {dict(labels)["scope"]: v for (name, labels), v in samples.items()
            if name == "zai_proxy_concurrency_limit"}


@pytest.mark.parametrize(("proxy", "upstream", "expected"), [
    (None, None, {}),
    (32, None, {"proxy": 32}),
    (None, 4, {"upstream": 4}),
    (32, 4, {"proxy": 32, "upstream": 4}),
])
def test_concurrency_limit_gauge_only_for_configured_limits(
        host: Host, proxy: int | None, upstream: int | None, expected: dict[str, float]) -> None:
    w = host.worker(0, concurrency_limit=proxy, upstream_concurrency_limit=upstream)
    body, _ = w.render()
    got = parse(body)
    assert _limit_series(got) == expected
    assert ({dict(labels)["variant"] for (name, labels) in got
             if name == "zai_proxy_concurrency_limit"} == ({"canary"} if expected else set()))
    assert (b"zai_proxy_concurrency_limit" in body) == bool(expected)


@pytest.mark.parametrize(("proxy", "upstream", "cap"), [
    (8, None, 8),
    (None, 4, 4),  # MAX_WORKERS sets upstream_concurrency (core/original_env.py)
    (8, 4, 8),  # the proxy's own cap is what the in-flight count runs into first
])
def test_max_workers_is_the_cap_and_utilization_the_requests_in_flight_over_it(
        host: Host, proxy: int | None, upstream: int | None, cap: int) -> None:
    """The original's meaning: MAX_WORKERS and concurrent requests / MAX_WORKERS."""
    w0 = host.worker(0, concurrency_limit=proxy, upstream_concurrency_limit=upstream)
    w1 = host.worker(1, concurrency_limit=proxy, upstream_concurrency_limit=upstream)
    got = scrape(w0)
    assert value(got, "zai_proxy_max_workers") == cap
    assert value(got, "zai_proxy_worker_utilization_ratio") == 0
    for _ in range(2):
        w0.request_started()
    w1.request_started()  # 3 in flight, on two workers
    got = scrape(w1)
    assert value(got, "zai_proxy_concurrent_requests") == 3
    assert value(got, "zai_proxy_worker_utilization_ratio") == 3 / cap
    assert value(got, "zai_proxy_worker_processes") == 2
    assert value(got, "zai_proxy_worker_processes_busy_ratio") == 1.0
    for _ in range(cap):  # queued or refused requests are in flight too: past 1
        w1.request_started()
    assert value(scrape(w0), "zai_proxy_worker_utilization_ratio") == (3 + cap) / cap
    w0.request_ended()
    w0.request_ended()
    got = scrape(w0)
    assert value(got, "zai_proxy_worker_utilization_ratio") == (1 + cap) / cap
    assert value(got, "zai_proxy_worker_processes_busy_ratio") == 0.5


def test_no_cap_no_max_workers_and_no_utilization(host: Host) -> None:
    w = host.worker(0)
    w.request_started()
    body, _ = w.render()
    got = parse(body)
    assert value(got, "zai_proxy_concurrent_requests") == 1
    assert b"zai_proxy_max_workers" not in body
    assert b"zai_proxy_worker_utilization_ratio" not in body
    assert value(got, "zai_proxy_worker_processes_busy_ratio") == 0.5


def test_the_original_services_label_sets(host: Host) -> None:
    # Its dashboards and the canary runbook query status_code on these families; requests
    # keep our status beside it (the same value: no extra series).
    w = host.worker(0)
    for status, n in ((200, 7), (502, 2), (429, 1)):
        for _ in range(n):
            w.observe(rec(status=status, bytes_out=1200))
    got = scrape(w)
    label_sets = {name: set(labels) for (name, labels) in
                  ((n, frozenset(k for k, _ in ls)) for n, ls in got)}
    assert label_sets["zai_proxy_requests_total"] == {"method", "path", "status", "status_code",
                                                      "variant"}
    assert label_sets["zai_proxy_request_duration_seconds_bucket"] == {
        "method", "path", "status_code", "variant", "le"}
    assert label_sets["zai_proxy_response_size_bytes_sum"] == {"method", "path", "status_code",
                                                               "variant"}
    assert label_sets["zai_proxy_request_size_bytes_sum"] == {"method", "path", "variant"}
    requests = [dict(labels) for (name, labels) in got if name == "zai_proxy_requests_total"]
    assert all(r["status"] == r["status_code"] for r in requests) and len(requests) == 3
    # The runbook's 5xx share, as its PromQL computes it.
    five = sum(v for (n, ls), v in got.items() if n == "zai_proxy_requests_total"
               and dict(ls)["status_code"].startswith("5"))
    assert five / value(got, "zai_proxy_requests_total") == pytest.approx(0.2)
    assert value(got, "zai_proxy_request_duration_seconds_count", status_code="502") == 2


def test_the_rate_limit_families_carry_the_original_client_label(host: Host) -> None:
    # Its dashboards split waits and rejections by client (source-00..63); ours keep limit
    # and scope beside it, and anything summing over client gets the old totals.
    w = host.worker(0)
    w.observe(rec(queue_wait_s=0.02, client="127.0.0.1"))
    w.observe(rec(queue_wait_s=0.0, client="::1"))
    w.rejection("concurrency", "global", "127.0.0.1")
    w.rejection("concurrency", "global", "")
    got = scrape(w)
    label_sets = {n: {k for k, _ in ls} for n, ls in got}
    assert label_sets["zai_proxy_rate_limit_wait_seconds_bucket"] == {"client", "variant", "le"}
    assert label_sets["zai_proxy_rate_limit_rejections_total"] == {"limit", "scope", "client",
                                                                   "variant"}
    wait = "zai_proxy_rate_limit_wait_seconds"
    assert {dict(ls)["client"]: v for (n, ls), v in got.items() if n == wait + "_count"} == {
        LOCALHOST: 1, expected_bucket("::1"): 1}
    assert value(got, wait + "_count") == 2
    assert value(got, wait + "_bucket", le="0.05") == 2
    refused = {dict(ls)["client"]: v for (n, ls), v in got.items()
               if n == "zai_proxy_rate_limit_rejections_total"}
    assert refused == {LOCALHOST: 1, expected_bucket("unknown"): 1}  # what "" is hashed as


def test_histogram_edges(host: Host) -> None:
    w = host.worker(0)
    for d in (0.0, -1.0, math.nan, 300.0, 300.0000001, math.inf):
        w.observe(rec(duration_s=d))
    got = scrape(w)
    labels = {"method": "POST", "path": "/v1/chat/completions"}
    hist = "zai_proxy_request_duration_seconds"
    assert value(got, hist + "_bucket", le="0.005", **labels) == 3  # 0, negative, NaN
    assert value(got, hist + "_bucket", le="300.0", **labels) == 4  # le is inclusive
    assert value(got, hist + "_bucket", le="+Inf", **labels) == 6
    # inf adds a bounded amount (2**53 units) to the sum instead of poisoning it.
    assert value(got, hist + "_sum", **labels) == pytest.approx(600.0000001 + 2**53 / 1e9)


# ---- API traffic, by the record's API -------------------------------------------------------


def test_control_routes_are_counted_apart_from_api_traffic(host: Host) -> None:
    """A record without an API (a control route) is no API request: not in
    zai_proxy_requests_total nor the latency histogram (what snapshots read), only in the
    control families, whatever its route says."""
    w0, w1 = host.worker(0), host.worker(1)
    w0.observe(rec(duration_s=0.2))
    w1.observe(rec(method="GET", route="/admin/events", api=None, duration_s=694.907,
                   bytes_out=None))
    w1.observe(rec(method="GET", route="/metrics", api=None, duration_s=0.003))
    # The API decides, not the route: an API request under any template is API traffic.
    w0.observe(rec(method="GET", route="other", api="anthropic", status=404, duration_s=0.001))
    got = scrape(w0)
    requests = {dict(labels)["path"]: v for (name, labels), v in got.items()
                if name == "zai_proxy_requests_total"}
    assert requests == {"/v1/chat/completions": 1, "other": 1}
    hist = "zai_proxy_request_duration_seconds"
    assert sum(v for (name, _), v in got.items() if name == hist + "_count") == 2
    assert sum(v for (name, _), v in got.items() if name == hist + "_sum") == \
        pytest.approx(0.201)
    assert not any(dict(labels).get("path", "").startswith(("/admin", "/metrics"))
                   for name, labels in got if not name.startswith("zai_proxy_control_"))
    control = "zai_proxy_control_requests_total"
    assert value(got, control, method="GET", path="/admin/events", status="200") == 1
    assert value(got, control, method="GET", path="/metrics", status="200") == 1
    events = {"method": "GET", "path": "/admin/events"}
    cd = "zai_proxy_control_request_duration_seconds"
    assert value(got, cd + "_bucket", le="300.0", **events) == 0
    assert value(got, cd + "_bucket", le="+Inf", **events) == 1
    assert value(got, cd + "_sum", **events) == pytest.approx(694.907)


def test_cached_tokens_are_split_by_the_record_s_api_not_its_route(host: Host) -> None:
    w = host.worker(0)
    usage = Usage(input_tokens=1000, output_tokens=10, cache_read_tokens=300)
    # OpenAI usage counts the cached tokens inside the input; Anthropic's does not. The
    # route template (here the same for both) says nothing about it.
    w.observe(rec(model="glm-4.6", usage=usage, route="/api/coding/paas/v4/*", api="openai"))
    w.observe(rec(model="glm-4.5", usage=usage, route="/api/coding/paas/v4/*", api="anthropic"))
    got = scrape(w)
    tok = "zai_proxy_tokens_total"
    assert value(got, tok, direction="input", model="glm-4.6", pricing_tier="standard") == 700
    assert value(got, tok, direction="input", model="glm-4.5", pricing_tier="standard") == 1000
    assert value(got, tok, direction="cache_read", model="glm-4.5",
                 pricing_tier="standard") == 300


# ---- bounded series ------------------------------------------------------------------------


def test_client_chosen_values_add_no_series(host: Host) -> None:
    w = host.worker(0)
    w.observe(rec(model="first-unknown", usage=Usage(1, 1), ttft_s=0.1, method="M0",
                  route="other", status=404))
    before = series_of(scrape(w))
    for i in range(10_000):
        w.observe(rec(model=f"client-model-{i}", usage=Usage(1, 1), ttft_s=0.1, method=f"M{i}",
                      route="other", status=404, key_alias=f"alias-{i}"))
    after = scrape(w)
    assert series_of(after) == before
    assert value(after, "zai_proxy_requests_total", method="other", path="other",
                 status="404") == 10_001
    assert value(after, "zai_proxy_tokens_total", direction="input", model="other",
                 pricing_tier="standard") == 10_001
    assert not any(name.startswith("zai_proxy_key_requests") for name, _ in after)


def test_key_alias_series_only_when_opted_in(host: Host) -> None:
    w = host.worker(0, alias_metrics=True)
    w.observe(rec(key_alias="alice", status=429))
    w.observe(rec(key_alias="alice", status=429))
    w.observe(rec(key_alias=None))
    got = scrape(w)
    assert value(got, "zai_proxy_key_requests_total", key="alice", status="429") == 2
    assert sum(1 for name, _ in got if name == "zai_proxy_key_requests_total") == 1


def test_series_over_the_budget_are_dropped_and_counted(host: Host) -> None:
    # requests (1 row) + duration (17 cells: 3 rows) fit in 5; the request size (2 rows) not.
    assert (REQUESTS.rows, DURATION.rows, REQUEST_SIZE.rows) == (1, 3, 2)
    w0, w1 = host.worker(0, series_budget=5), host.worker(1, series_budget=5)
    for _ in range(3):
        w0.observe(rec())
    w1.observe(rec())  # existing series bind without a reservation; the size is refused again
    got = scrape(w0)
    assert value(got, "zai_proxy_requests_total", method="POST", path="/v1/chat/completions",
                 status="200") == 4
    assert value(got, "zai_proxy_request_duration_seconds_count", method="POST",
                 path="/v1/chat/completions") == 4
    assert not any(name.startswith("zai_proxy_request_size_bytes_") for name, _ in got)
    assert value(got, "zai_proxy_metrics_series_dropped_total") == 2  # once per worker
    assert w0.store.reserved() == 4


def test_every_client_bucket_fits_the_default_series_budget(host: Host, shm_dir: Path) -> None:
    """64 client buckets of the wait histogram (3 rows each) and of the rejections of two
    limits (1 row each) take 320 of the 2048 rows a default ledger (4096 rows) lets series
    reserve."""
    big = Host(host.mod.IMPLEMENTATION, shm_dir / "default", rows=4096)
    try:
        w = big.worker(0)
        assert w.store.budget == 2048
        assert (len(WAIT.buckets), WAIT.rows, REJECTIONS.rows) == (13, 3, 1)  # 15 cells: 3 rows
        peers: dict[str, str] = {}
        for i in range(4096):
            ip = f"10.2.{i // 256}.{i % 256}"
            peers.setdefault(expected_bucket(ip), ip)
        assert len(peers) == 64
        for ip in peers.values():
            w.observe(rec(client=ip, queue_wait_s=0.5, route="other", status=429))
            for limit in ("requests_per_minute", "concurrency"):
                w.rejection(limit, "global", ip)
        got = scrape(w)
        assert value(got, "zai_proxy_metrics_series_dropped_total") == 0
        assert len({dict(ls)["client"] for (n, ls) in got
                    if n == "zai_proxy_rate_limit_wait_seconds_count"}) == 64
        assert value(got, "zai_proxy_rate_limit_rejections_total") == 128
        # The request families of the one (method, route, status) add 1 + 3 + 2 rows.
        assert w.store.reserved() == 64 * 3 + 2 * 64 + 1 + 3 + 2
    finally:
        big.close()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_full_ledger_table_never_fails_a_request(impl: str, shm_dir: Path) -> None:
    host = Host(impl, shm_dir / "seg", rows=64)
    try:
        w = host.worker(0)
        i = 0
        with pytest.raises(host.mod.LedgerFull):
            while True:  # the limits' keys take every row left
                host.segment.row(b"limit-%d" % i)
                i += 1
        w.observe(rec(usage=Usage(1, 1), model="glm-4.6"))
        w.upstream_error("upstream_timeout")
        got = scrape(w)
        assert value(got, "zai_proxy_metrics_series_dropped_total") >= 5
    finally:
        host.close()


def test_long_label_values_are_dropped(host: Host) -> None:
    w = host.worker(0, known_models=frozenset({"m" * 300}))
    w.observe(rec(model="m" * 300, usage=Usage(1, 1)))
    got = scrape(w)
    assert value(got, "zai_proxy_metrics_series_dropped_total") == 2  # tokens input + output
    assert not any(name == "zai_proxy_tokens_total" for name, _ in got)


# ---- the names table -------------------------------------------------------------------------


def test_names_live_in_the_segment_file_and_bad_slots_are_skipped(host: Host) -> None:
    w0 = host.worker(0)
    w0.observe(rec())
    layout = host.mod.segment_size(512, 4, 2)
    assert os.path.getsize(host.path) == names_offset(layout) + 512 * SLOT_BYTES
    row = host.segment.row_find(REQUESTS.key(("POST", "/v1/chat/completions", "200"), 0))
    assert row >= 0
    names = NamesFile(host.path, 512, layout)
    key = names.read(row)
    assert key == REQUESTS.key(("POST", "/v1/chat/completions", "200"), 0)
    # A torn slot (half a write, or garbage) fails the hash check: the series is skipped...
    names.write(row, key[:-3] + b"xyz")
    w1 = host.worker(1)
    got = scrape(w1)
    assert not any(n == "zai_proxy_requests_total" for n, _ in got)
    # ...until a process that binds the series writes its name again (w1 has not yet).
    w1.observe(rec())
    got = scrape(w0)
    assert value(got, "zai_proxy_requests_total", method="POST", path="/v1/chat/completions",
                 status="200") == 2
    # A well-formed key in the slot of a row that holds something else is not believed.
    limit_row = host.segment.row(b"some limit")
    names.write(limit_row, REQUESTS.key(("GET", "/forged", "200"), 0))
    assert not any(dict(labels).get("path") == "/forged" for _, labels in scrape(w0))
    with pytest.raises(ValueError):
        names.write(0, b"x" * (KEY_MAX + 1))
    names.close()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_private_segment_has_private_names(impl: str, shm_dir: Path) -> None:
    mod = load(impl)
    led = mod.Ledger(str(shm_dir / "private"), create=True, rows=128, windows=4, workers=1)
    led.unlink()  # what worker.open_ledger does with a private segment
    try:
        w = WorkerMetrics(variant="canary", ledger=impl, workers=1, segment=led, shared=False)
        w.observe(rec())
        assert value(scrape(w), "zai_proxy_requests_total", method="POST",
                     path="/v1/chat/completions", status="200") == 1
    finally:
        led.close()


def test_recorder_families_appear_once_used(host: Host) -> None:
    w0, w1 = host.worker(0), host.worker(1)
    assert not any(n.startswith("zai_proxy_recorder") for n, _ in scrape(w0))
    w0.set_recorder_queue_depth(3)
    w1.set_recorder_queue_depth(4)
    w1.recorder_dropped(2)
    recorder_segment = host.mod.Ledger(host.path, create=False)  # the recorder process's
    host.attached.append(recorder_segment)
    other = RecorderCells(recorder_segment)
    other.set_queue_depth(10)
    other.dropped()
    got = scrape(w0)
    assert value(got, "zai_proxy_recorder_queue_depth") == 17
    assert value(got, "zai_proxy_recorder_dropped_records_total") == 3
    # A RecordSink's stats(): (depth now, dropped since this worker started).
    stats = [(5, 4)]
    w0.set_recorder_stats(lambda: stats[0])
    w0.observe(rec())
    got = scrape(w1)
    assert value(got, "zai_proxy_recorder_queue_depth") == 19
    assert value(got, "zai_proxy_recorder_dropped_records_total") == 7
    stats[0] = (0, 6)
    got = scrape(w0)  # a scrape reads the scraping worker's stats too
    assert value(got, "zai_proxy_recorder_queue_depth") == 14
    assert value(got, "zai_proxy_recorder_dropped_records_total") == 9
    w0 = host.worker(0)  # restarted: its sink counts from 0 again; the total stays
    w0.set_recorder_stats(lambda: (0, 1))
    got = scrape(w0)
    assert value(got, "zai_proxy_recorder_queue_depth") == 14
    assert value(got, "zai_proxy_recorder_dropped_records_total") == 10


# ---- pricing -------------------------------------------------------------------------------


def test_default_prices_and_tiers() -> None:
    usage = Usage(input_tokens=1000, output_tokens=1000, cache_read_tokens=1000,
                  cache_write_tokens=1000)
    # Anthropic-style: input excludes the cache; cache writes are free in Z.AI's list.
    assert DEFAULT_PRICES.cost("glm-4.6", usage, NOON_BEIJING) == \
        pytest.approx(0.0006 + 0.0022 + 0.00011)
    assert DEFAULT_PRICES.cost("glm-4.6", usage, NOON_BEIJING, input_includes_cache=True) == \
        pytest.approx(0.0022 + 0.00011)
    assert DEFAULT_PRICES.cost("glm-4.5-flash", usage, NOON_BEIJING) == 0.0
    assert DEFAULT_PRICES.cost("not-priced", usage, NOON_BEIJING) == 0.0
    assert DEFAULT_PRICES.tier("glm-4.6", PEAK_BEIJING) == "standard"


def test_a_price_file_with_tiers(tmp_path: Path, host: Host) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('''
peak_hours = "14:00-18:00"
[models."glm-4.6"]
input = 0.001
output = 0.002
cache_read = 0.0001
cache_write = 0.0
[models."glm-4.6".peak]
input = 0.003
[models."*"]
input = 0.01
output = 0.01
cache_read = 0.01
cache_write = 0.01
''')
    table = load_prices(str(path))
    usage = Usage(1000, 1000)
    assert table.quote("glm-4.6", PEAK_BEIJING)[0] == "peak"
    assert table.cost("glm-4.6", usage, PEAK_BEIJING) == pytest.approx(0.003 + 0.002)
    assert table.quote("glm-4.6", NOON_BEIJING)[0] == "off_peak"
    assert table.cost("glm-4.6", usage, NOON_BEIJING) == pytest.approx(0.001 + 0.002)
    assert table.cost("anything", usage, NOON_BEIJING) == pytest.approx(0.02)
    assert table.tier("anything", PEAK_BEIJING) == "standard"
    # 17:59 is peak, 18:00 is not (the window is [start, end) in Beijing time).
    day = NOON_BEIJING - 12 * 3600
    assert table.in_peak(day + 17 * 3600 + 59 * 60) and not table.in_peak(day + 18 * 3600)
    wrap = parse_prices({"peak_hours": "22:00-02:00", "models": {"m": {
        "input": 0, "output": 0, "cache_read": 0, "cache_write": 0}}})
    assert wrap.in_peak(day + 23 * 3600) and wrap.in_peak(day + 3600)
    assert not wrap.in_peak(day + 12 * 3600)
    json_path = tmp_path / "prices.json"
    json_path.write_text(orjson.dumps({"models": {"glm-4.6": {
        "input": 1, "output": 1, "cache_read": 1, "cache_write": 1}}}).decode())
    assert load_prices(str(json_path)).cost("glm-4.6", usage, NOON_BEIJING) == 2.0
    # Through the metrics: the tier is a label, the cost follows the tier's prices.
    w = host.worker(0, prices=table, wall=lambda: PEAK_BEIJING)
    w.observe(rec(model="glm-4.6", usage=usage, route="/v1/messages", api="anthropic"))
    got = scrape(w)
    assert value(got, "zai_proxy_tokens_total", direction="input", model="glm-4.6",
                 pricing_tier="peak") == 1000
    assert value(got, "zai_proxy_estimated_cost_usd_total", model="glm-4.6") == \
        pytest.approx(0.005)


@pytest.mark.parametrize(("doc", "problem"), [
    ({}, "models: must be a non-empty table"),
    ({"models": {"m": {"input": 1, "output": 1, "cache_read": 1}}}, "missing cache_write"),
    ({"models": {"m": {"input": -1, "output": 1, "cache_read": 1, "cache_write": 1}}},
     "models.m.input: must be between 0"),
    ({"models": {"m": {"input": "1", "output": 1, "cache_read": 1, "cache_write": 1}}},
     "models.m.input: must be a number"),
    ({"models": {"m": {"input": 1, "output": 1, "cache_read": 1, "cache_write": 1,
                       "peak": {"inptu": 1}}}}, "models.m.peak.inptu: unknown key"),
    ({"peak_hours": "14-18", "models": {"m": {"input": 1, "output": 1, "cache_read": 1,
                                              "cache_write": 1}}}, "peak_hours: must be"),
    ({"peak_hours": "14:00-14:00", "models": {"m": {"input": 1, "output": 1,
                                                    "cache_read": 1, "cache_write": 1}}},
     "non-empty window"),
    ({"currency": "EUR", "models": {"m": {"input": 1, "output": 1, "cache_read": 1,
                                          "cache_write": 1}}}, "currency: unknown key"),
])
def test_bad_price_files_list_every_problem(doc: dict[str, object], problem: str) -> None:
    with pytest.raises(PriceFileError) as info:
        parse_prices(doc)
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_unreadable_price_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("models = [")
    with pytest.raises(PriceFileError, match="not valid TOML"):
        load_prices(str(bad))
    with pytest.raises(PriceFileError, match="cannot read"):
        load_prices(str(tmp_path / "missing.toml"))


# ---- real worker processes ---------------------------------------------------------------------

CHAT_SIZES = (80, 500, 5000)  # request bodies in three different size buckets
JSON = ("content-type", "application/json")


def chat_body(size: int, model: str = "glm-4.6", stream: bool = False) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": ""}]}
    if stream:
        body["stream"] = True
    pad = size - len(orjson.dumps(body))
    body["messages"] = [{"role": "user", "content": "x" * pad}]
    out = orjson.dumps(body)
    assert len(out) == size
    return out


@pytest.fixture
def proxy(mock: ProcessServer, tmp_path: Path) -> Iterator[ProcessServer]:
    server = start_process(["serve", "--port", "0"], env={
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
        "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
        "ZAIPROXY_NATIVE_BASE_URL": mock.url,
        "ZAIPROXY_WORKERS": "2",
        "ZAIPROXY_ADAPTIVE_RATE": "false",
        "ZAIPROXY_ACCESS_LOG": "false",
        "ZAIPROXY_DRAIN_TIMEOUT": "5",
        "DEPLOYMENT_VARIANT": "canary",
    }, stderr_path=tmp_path / "proxy.log")
    yield server
    assert server.stop() == 0, server.logs()[-3000:]


async def clients_by_worker(port: int, want: int = 2, tries: int = 200) -> dict[int, RawClient]:
    """One keep-alive connection to each of ``want`` workers (SO_REUSEPORT spreads them)."""
    found: dict[int, RawClient] = {}
    for _ in range(tries):
        client = await RawClient.connect("127.0.0.1", port)
        pid = int((await client.request("GET", "/health")).json()["pid"])
        if pid in found:
            await client.aclose()
        else:
            found[pid] = client
        if len(found) == want:
            return found
    raise AssertionError(f"reached only workers {sorted(found)}")


async def scrape_via(client: RawClient) -> Samples:
    resp = await client.request("GET", "/metrics")
    assert resp.status == 200
    return parse(resp.body)


async def settled(*clients: RawClient) -> None:
    """Wait until every request sent on these connections has been counted.

    A worker counts a request after its response went out, so a scrape on another
    connection could run first; a connection serves its requests one at a time, so once
    one more request on it is answered, everything before it has been counted.
    """
    for client in clients:
        assert (await client.request("GET", "/health")).status == 200


def counters(samples: Samples) -> Samples:
    """The counters and histograms, except the series of /metrics and /health requests (the
    scrapes and probes themselves, each counted after its response); no gauges (a gauge
    such as the recorder's queue depth moves between two scrapes)."""
    return {k: v for k, v in samples.items() if k[0].endswith(COUNTED)
            and dict(k[1]).get("path") not in ("/metrics", "/health")}


async def not_found(port: int, path: str) -> None:
    """One request for an unknown route, followed on the same keep-alive connection by a
    ``/health`` that is answered only after the 404 was counted (see :func:`pipeline`)."""
    frame = f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
    assert await pipeline(port, [frame]) == [404]


async def pipeline(port: int, frames: list[bytes]) -> list[int]:
    """Send every request on one connection without waiting; the statuses, in order.

    A last ``/health`` request (not in the result) is answered only after the others
    were counted (see :func:`settled`).
    """
    frames = [*frames, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    statuses: list[int] = []
    buf = b""

    async def send() -> None:
        for i in range(0, len(frames), 200):
            await stream.send_all(b"".join(frames[i:i + 200]))

    async def receive() -> None:
        nonlocal buf
        while len(statuses) < len(frames):
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                assert data, "the proxy closed the connection"
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            statuses.append(int(lines[0].split()[1]))
            length = next(int(line.split(b":")[1]) for line in lines[1:]
                          if line.lower().startswith(b"content-length:"))
            while len(buf) < length:
                data = await stream.receive_some(65536)
                assert data
                buf += data
            buf = buf[length:]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
    await stream.aclose()
    assert statuses.pop() == 200
    return statuses


async def test_one_scrape_of_any_worker_shows_all_and_survives_a_sigkill(
        proxy: ProcessServer) -> None:
    clients = await clients_by_worker(proxy.port)
    (pid_a, a), (pid_b, b) = clients.items()
    sent = {size: 0 for size in CHAT_SIZES}
    usage = {"in": 0, "out": 0}
    out_bytes = 0

    async def chats(client: RawClient, n: int) -> None:
        nonlocal out_bytes
        for i in range(n):
            size = CHAT_SIZES[i % 3]
            resp = await client.request("POST", "/v1/chat/completions", [JSON], chat_body(size))
            assert resp.status == 200
            sent[size] += 1
            u = resp.json()["usage"]
            usage["in"] += u["prompt_tokens"]
            usage["out"] += u["completion_tokens"]
            out_bytes += len(resp.body)

    await chats(a, 9)
    await chats(b, 6)
    for _ in range(2):
        await not_found(proxy.port, "/no/such/path")
    await settled(a, b)

    def check(got: Samples, chats_total: int, not_found: int) -> None:
        path = {"path": "/v1/chat/completions"}
        assert value(got, "zai_proxy_requests_total", method="POST", status="200",
                     **path) == chats_total
        assert value(got, "zai_proxy_requests_total", method="GET", path="other",
                     status="404") == not_found
        assert value(got, "zai_proxy_request_duration_seconds_count", method="POST",
                     **path) == chats_total
        size = "zai_proxy_request_size_bytes"
        assert [value(got, size + "_bucket", le=le, **path)
                for le in ("100.0", "1000.0", "10000.0", "+Inf")] == [
            sent[80], sent[80] + sent[500], chats_total, chats_total]
        assert value(got, size + "_sum", **path) == sum(s * n for s, n in sent.items())
        assert value(got, "zai_proxy_response_size_bytes_sum", **path) == out_bytes
        tier = {"model": "glm-4.6", "pricing_tier": "standard"}
        assert value(got, "zai_proxy_tokens_total", direction="input", **tier) == usage["in"]
        assert value(got, "zai_proxy_tokens_total", direction="output", **tier) == usage["out"]
        assert value(got, "zai_proxy_estimated_cost_usd_total", model="glm-4.6") == \
            pytest.approx((usage["in"] * 0.6 + usage["out"] * 2.2) / 1e6, rel=1e-9)
        assert value(got, "zai_proxy_concurrent_requests") == 0
        assert value(got, "zai_proxy_worker_processes") == 2
        for name, labels in got:
            assert dict(labels).get("variant") == "canary", name

    from_a, from_b = await scrape_via(a), await scrape_via(b)
    check(from_a, 15, 2)
    assert counters(from_a) == counters(from_b)

    # A stream in flight on worker A is seen by a scrape of worker B.
    stream = await RawClient.connect("127.0.0.1", proxy.port)
    while int((await stream.request("GET", "/health")).json()["pid"]) != pid_a:
        await stream.aclose()
        stream = await RawClient.connect("127.0.0.1", proxy.port)
    await stream.stream.send_all(stream.conn.send(h11.Request(
        method="POST", target="/v1/chat/completions",
        headers=[("host", "x"), JSON, ("x-mock-chunks", "400"), ("x-mock-chunk-delay", "0.05"),
                 ("content-length", "77")])) + chat_body(77, stream=True))
    first = await stream.stream.receive_some(65536)
    assert b" 200 " in first
    during = await scrape_via(b)
    assert value(during, "zai_proxy_concurrent_requests") == 1
    assert value(during, "zai_proxy_streams_in_flight") == 1
    assert value(during, "zai_proxy_worker_processes_busy_ratio") == 0.5

    # SIGKILL worker A mid-stream: its replacement zeroes A's gauges; no counter goes back.
    os.kill(pid_a, signal.SIGKILL)
    await stream.aclose()
    with trio.fail_after(20):
        while True:
            clients2 = await clients_by_worker(proxy.port)
            if pid_a not in clients2:
                break
            for c in clients2.values():
                await c.aclose()
            await trio.sleep(0.05)
    after = await scrape_via(clients2[pid_b])
    for key, v in from_a.items():
        if key[0].endswith(COUNTED):
            assert after[key] >= v, key
    assert value(after, "zai_proxy_concurrent_requests") == 0
    assert value(after, "zai_proxy_streams_in_flight") == 0
    # The dead worker's requests are still counted; new traffic through both adds to them.
    new_pid = next(p for p in clients2 if p != pid_b)
    await chats(clients2[new_pid], 9)
    await chats(clients2[pid_b], 6)
    for _ in range(2):
        await not_found(proxy.port, "/no/such/path")
    await settled(*clients2.values())
    check(await scrape_via(clients2[new_pid]), 30, 4)
    for client in (a, b, *clients2.values()):
        await client.aclose()


@pytest.mark.parametrize("n", [1_000, pytest.param(10_000, marks=pytest.mark.slow)])
async def test_client_chosen_paths_and_models_add_no_series(proxy: ProcessServer, n: int) -> None:
    """n distinct unknown routes (404 from the proxy), n distinct paths under a pass-through
    prefix (404 from upstream) and n distinct model names, through two workers.

    (The in-process test above does 10,000 of each at the observe() level against both
    ledgers in under a second.)
    """
    def get(path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()

    def chat(model: str) -> bytes:
        body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)

    # Every series these requests can touch exists first (and the scrapes' own).
    await not_found(proxy.port, "/first")
    assert await pipeline(proxy.port, [chat("first-model"), get("/api/paas/v4/first")]) == \
        [200, 404]
    for _ in range(2):
        assert (await request(proxy.port, "GET", "/metrics")).status == 200
    before = series_of(parse((await request(proxy.port, "GET", "/metrics")).body))
    tasks = 8
    async with trio.open_nursery() as nursery:
        for t in range(tasks):  # the kernel spreads the connections over both workers
            async def routes(t: int = t) -> None:
                for i in range(t, n, tasks):
                    await not_found(proxy.port, f"/client/{i}/path?q={i}")

            async def upstream(t: int = t) -> None:
                frames = [get(f"/api/paas/v4/client/{i}") for i in range(t, n, tasks)]
                frames += [chat(f"client-model-{i}") for i in range(t, n, tasks)]
                statuses = await pipeline(proxy.port, frames)
                assert statuses == [404] * (len(frames) // 2) + [200] * (len(frames) // 2)

            nursery.start_soon(routes)
            nursery.start_soon(upstream)
    after = parse((await request(proxy.port, "GET", "/metrics")).body)
    assert series_of(after) == before
    assert value(after, "zai_proxy_requests_total", method="GET", path="other",
                 status="404") == n + 1
    assert value(after, "zai_proxy_requests_total", method="GET", path="/api/paas/v4/*",
                 status="404") == n + 1
    assert value(after, "zai_proxy_requests_total", method="POST", path="/v1/chat/completions",
                 status="200") == n + 1
    assert value(after, "zai_proxy_tokens_total", direction="input", model="other",
                 pricing_tier="standard") > n
    assert value(after, "zai_proxy_metrics_series_dropped_total") == 0


# ---- zai_proxy_quota_used_ratio: the configured rolling windows, through a real worker -----

from tests.harness import make_config, start_mock, start_proxy  # noqa: E402
from zaiproxy.observe.metrics import QuotaUse  # noqa: E402

JSON_HEADERS = [("content-type", "application/json")]
CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
WINDOW_LIMITS = {"requests_per_5h": 10, "tokens_per_week": 1_000_000,
                 "upstream_requests_per_week": 4}
# Limits that are not rolling windows: they must add no quota series.
OTHER_LIMITS = {"requests_per_minute": 100, "concurrency": 8, "upstream_concurrency": 4}
FIVE_HOURS_S = 5 * 3600
T0_NS = (1000 * FIVE_HOURS_S // 60 + 120) * 10**9  # 2 minutes into a 5 h window's bucket


class AdmitterClock:
    """The admitter's monotonic clock, moved by the test (windows counted exactly)."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


async def quota_ratios(port: int) -> dict[tuple[str, str], float]:
    resp = await request(port, "GET", "/metrics")
    assert resp.status == 200
    return {(dict(labels)["scope"], dict(labels)["limit"]): v
            for (name, labels), v in parse(resp.body).items()
            if name == "zai_proxy_quota_used_ratio" and dict(labels)["variant"] == "production"}


async def test_quota_used_ratio_reads_the_configured_windows_like_admin_keys(
        nursery: trio.Nursery) -> None:
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream, **WINDOW_LIMITS, **OTHER_LIMITS))
    clock = proxy.worker.ctx.admitter.clock = AdmitterClock(T0_NS)
    keys = ("global", "requests_per_5h"), ("global", "tokens_per_week"), \
        ("upstream", "upstream_requests_per_week")
    # Configured and unused: one series each at 0, none for the other limits.
    assert await quota_ratios(proxy.port) == dict.fromkeys(keys, 0.0)
    for _ in range(3):
        assert (await request(proxy.port, "POST", "/v1/chat/completions", JSON_HEADERS,
                              CHAT)).status == 200
    report = (await request(proxy.port, "GET", "/admin/keys")).json()["global"]
    tokens = report["tokens_per_week"]["used"]
    assert tokens > 0  # the mock's usage, settled into the window
    assert await quota_ratios(proxy.port) == {
        ("global", "requests_per_5h"): 3 / 10, ("global", "tokens_per_week"): tokens / 1e6,
        ("upstream", "upstream_requests_per_week"): 3 / 4}
    # The upstream key's weekly window fills up: 1.0, and the next request is refused.
    statuses = [(await request(proxy.port, "POST", "/v1/chat/completions", JSON_HEADERS,
                               CHAT)).status for _ in range(2)]
    assert statuses == [200, 429]
    ratios = await quota_ratios(proxy.port)
    assert ratios[("upstream", "upstream_requests_per_week")] == 1.0
    assert ratios[("global", "requests_per_5h")] == 4 / 10  # the refused one took nothing
    # Five hours later the 5 h window is empty again; the week still counts.
    clock.ns += FIVE_HOURS_S * 10**9
    later = await quota_ratios(proxy.port)
    assert later[("global", "requests_per_5h")] == 0.0
    assert later[("upstream", "upstream_requests_per_week")] == 1.0


async def test_no_quota_series_without_a_configured_window(nursery: trio.Nursery) -> None:
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream, **OTHER_LIMITS))
    assert (await request(proxy.port, "POST", "/v1/chat/completions", JSON_HEADERS,
                          CHAT)).status == 200
    body = (await request(proxy.port, "GET", "/metrics")).body
    assert b"zai_proxy_quota_used_ratio" not in body
    assert b"zai_proxy_concurrency_limit{" in body  # the other limits are there


def test_quota_ratio_is_capped_at_one() -> None:
    # Settling real tokens may charge a window past its limit; /admin/keys then says
    # remaining 0, and the gauge says all of it is used (not 1.2).
    assert QuotaUse("global", "tokens_per_5h", 1_200, 1_000).ratio == 1.0
    assert QuotaUse("upstream", "upstream_tokens_per_5h", 250, 1_000).ratio == 0.25
