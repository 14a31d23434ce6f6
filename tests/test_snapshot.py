"""snapshot.py: exposition -> per-variant snapshots, deltas with counter resets, quantiles."""

from __future__ import annotations

import math
from dataclasses import replace

import orjson
import pytest

from tests.harness import make_config, request, start_mock, start_proxy
from zaiproxy.observe import snapshot
from zaiproxy.observe.snapshot import Counts, Histogram, Rates, VariantSnapshot

EXPOSITION = """\
# HELP zai_proxy_build_info Build information.
# TYPE zai_proxy_build_info gauge
zai_proxy_build_info{commit="abc123",variant="production",version="0.1.0"} 1.0
zai_proxy_build_info{commit="def456",variant="canary",version="0.2.0"} 1.0
# TYPE zai_proxy_requests_total counter
zai_proxy_requests_total{method="POST",path="/v1/chat/completions",status="200",variant="production"} 90.0
zai_proxy_requests_total{method="POST",path="/v1/messages",status="200",variant="production"} 5.0
zai_proxy_requests_total{method="POST",path="/v1/chat/completions",status="429",variant="production"} 3.0
zai_proxy_requests_total{method="POST",path="/v1/chat/completions",status="499",variant="production"} 1.0
zai_proxy_requests_total{method="POST",path="/v1/chat/completions",status="502",variant="production"} 2.0
zai_proxy_requests_total{method="GET",path="/health",status="200",variant="canary"} 7.0
zai_proxy_requests_total{method="GET",path="/nope",status="302",variant="canary"} 1.0
# TYPE zai_proxy_upstream_errors_total counter
zai_proxy_upstream_errors_total{error_type="connect",variant="production"} 2.0
# TYPE zai_proxy_rate_limit_rejections_total counter
zai_proxy_rate_limit_rejections_total{limit="requests_per_minute",scope="key",variant="production"} 3.0
# TYPE zai_proxy_zai_errors_total counter
zai_proxy_zai_errors_total{class="frequency",code="1303",variant="production"} 4.0
# TYPE zai_proxy_tokens_total counter
zai_proxy_tokens_total{direction="input",model="glm-4.6",pricing_tier="standard",variant="production"} 1000.0
zai_proxy_tokens_total{direction="output",model="glm-4.6",pricing_tier="standard",variant="production"} 250.0
zai_proxy_tokens_total{direction="cache_read",model="glm-4.6",pricing_tier="standard",variant="production"} 40.0
zai_proxy_tokens_total{direction="cache_write",model="glm-4.6",pricing_tier="standard",variant="production"} 2.0
zai_proxy_tokens_total{direction="input",model="other",pricing_tier="long",variant="canary"} 11.0
# TYPE zai_proxy_estimated_cost_usd_total counter
zai_proxy_estimated_cost_usd_total{model="glm-4.6",variant="production"} 0.5
zai_proxy_estimated_cost_usd_total{model="other",variant="production"} 0.25
# TYPE zai_proxy_concurrent_requests gauge
zai_proxy_concurrent_requests{variant="production"} 3.0
# TYPE zai_proxy_streams_in_flight gauge
zai_proxy_streams_in_flight 2.0
# TYPE zai_proxy_rate_limit_requests_per_second gauge
zai_proxy_rate_limit_requests_per_second{variant="production"} 12.5
zai_proxy_rate_limit_requests_per_second{variant="canary"} 0.0
# TYPE zai_proxy_request_duration_seconds histogram
zai_proxy_request_duration_seconds_bucket{le="0.1",method="POST",path="/v1/chat/completions",variant="production"} 10.0
zai_proxy_request_duration_seconds_bucket{le="0.5",method="POST",path="/v1/chat/completions",variant="production"} 50.0
zai_proxy_request_duration_seconds_bucket{le="1.0",method="POST",path="/v1/chat/completions",variant="production"} 80.0
zai_proxy_request_duration_seconds_bucket{le="+Inf",method="POST",path="/v1/chat/completions",variant="production"} 90.0
zai_proxy_request_duration_seconds_sum{method="POST",path="/v1/chat/completions",variant="production"} 40.0
zai_proxy_request_duration_seconds_count{method="POST",path="/v1/chat/completions",variant="production"} 90.0
zai_proxy_request_duration_seconds_bucket{le="0.1",method="POST",path="/v1/messages",variant="production"} 0.0
zai_proxy_request_duration_seconds_bucket{le="0.5",method="POST",path="/v1/messages",variant="production"} 0.0
zai_proxy_request_duration_seconds_bucket{le="1.0",method="POST",path="/v1/messages",variant="production"} 0.0
zai_proxy_request_duration_seconds_bucket{le="+Inf",method="POST",path="/v1/messages",variant="production"} 10.0
zai_proxy_request_duration_seconds_sum{method="POST",path="/v1/messages",variant="production"} 30.0
zai_proxy_request_duration_seconds_count{method="POST",path="/v1/messages",variant="production"} 10.0
# TYPE zai_proxy_time_to_first_token_seconds histogram
zai_proxy_time_to_first_token_seconds_bucket{le="0.25",model="glm-4.6",variant="production"} 4.0
zai_proxy_time_to_first_token_seconds_bucket{le="+Inf",model="glm-4.6",variant="production"} 4.0
zai_proxy_time_to_first_token_seconds_sum{model="glm-4.6",variant="production"} 0.4
zai_proxy_time_to_first_token_seconds_count{model="glm-4.6",variant="production"} 4.0
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 99.0
"""


def test_parse_hand_written_exposition() -> None:
    snaps = snapshot.parse(EXPOSITION)
    # The unlabelled streams gauge, with two variants present, belongs to neither.
    assert list(snaps) == ["canary", "production", "unknown"]
    assert snaps["unknown"].streams_in_flight == 2
    prod, canary = snaps["production"], snaps["canary"]
    assert prod.counts == Counts(
        requests=101, responses_2xx=95, responses_4xx=4, responses_5xx=2, responses_429=3,
        upstream_errors=2, rejections=3, zai_errors=4, tokens_in=1000, tokens_out=250,
        tokens_cache=42, cost_usd=0.75)
    assert (prod.in_flight, prod.adaptive_rate) == (3, 12.5)
    # Merged over paths: the two series' cumulative buckets add up.
    assert prod.latency == Histogram((0.1, 0.5, 1.0, math.inf), (10, 50, 80, 100), 70.0)
    assert prod.ttft == Histogram((0.25, math.inf), (4, 4), 0.4)
    assert (prod.versions, prod.commits) == (("0.1.0",), ("abc123",))
    # /health is a control route: only the 302 on an API route is a request.
    assert canary.counts == Counts(requests=1, tokens_in=11)
    assert canary.breakdown["status"] == {"302": 1}
    assert (canary.versions, canary.latency, canary.adaptive_rate) == (("0.2.0",), Histogram(), 0)
    assert prod.streams_in_flight == canary.streams_in_flight == 0
    one = snapshot.parse(EXPOSITION.replace('variant="canary"', 'variant="production"'))
    assert list(one) == ["production"]
    assert one["production"].streams_in_flight == 2


def test_unlabelled_series_join_the_only_variant() -> None:
    text = ('zai_proxy_requests_total{status="200",variant="canary"} 2\n'
            "zai_proxy_streams_in_flight 5\n")
    assert snapshot.parse(text)["canary"].streams_in_flight == 5
    assert snapshot.parse("zai_proxy_streams_in_flight 5\n")["unknown"].streams_in_flight == 5


def test_missing_families_read_as_zeros() -> None:
    assert snapshot.parse("") == {}
    only = snapshot.parse('zai_proxy_build_info{variant="production",version="1",commit="x"} 1\n')
    snap = only["production"]
    assert snap.counts == Counts()
    assert snap.latency.quantile(0.5) is None
    assert (snap.concurrency_limit, snap.workers) == (0, 0)
    empty: dict[str, dict[str, float]] = {c: {} for c in snapshot.BREAKDOWNS}
    assert snap.to_json()["breakdown"] == empty
    rates = snapshot.delta(snap, snap, 5.0)
    body = rates.to_json()
    assert body["requests_per_s"] == 0 and body["error_rate"] == 0
    assert body["latency_p95_s"] is None
    assert body["breakdown_per_s"] == empty
    assert (body["concurrency_limit"], body["workers"]) == (0, 0)
    orjson.dumps(snap.to_json())  # no inf/nan anywhere


CONTROL = """\
zai_proxy_requests_total{method="POST",path="/v1/chat/completions",status="200",variant="p"} 5
zai_proxy_requests_total{method="POST",path="other",status="404",variant="p"} 1
zai_proxy_requests_total{method="GET",path="/metrics",status="200",variant="p"} 100
zai_proxy_requests_total{method="GET",path="/health",status="200",variant="p"} 3
zai_proxy_requests_total{method="GET",path="/ready",status="503",variant="p"} 2
zai_proxy_requests_total{method="GET",path="/admin/status",status="200",variant="p"} 4
zai_proxy_requests_total{method="GET",path="/admin/events",status="429",variant="p"} 6
zai_proxy_requests_total{method="POST",path="/admin/reset-rate-limit",status="401",variant="p"} 1
zai_proxy_request_duration_seconds_bucket{le="0.1",method="POST",path="/v1/chat/completions",variant="p"} 0
zai_proxy_request_duration_seconds_bucket{le="+Inf",method="POST",path="/v1/chat/completions",variant="p"} 5
zai_proxy_request_duration_seconds_sum{method="POST",path="/v1/chat/completions",variant="p"} 2.5
zai_proxy_request_duration_seconds_bucket{le="0.1",method="GET",path="/metrics",variant="p"} 100
zai_proxy_request_duration_seconds_bucket{le="+Inf",method="GET",path="/metrics",variant="p"} 100
zai_proxy_request_duration_seconds_sum{method="GET",path="/metrics",variant="p"} 0.1
zai_proxy_request_duration_seconds_bucket{le="0.1",method="GET",path="/admin/status",variant="p"} 4
zai_proxy_request_duration_seconds_bucket{le="+Inf",method="GET",path="/admin/status",variant="p"} 4
zai_proxy_request_duration_seconds_sum{method="GET",path="/admin/status",variant="p"} 0.01
"""


def test_control_routes_of_an_older_build_are_told_apart_by_path() -> None:
    """An exposition without zai_proxy_control_* mixed control routes into the request
    families (a build before them, still scraped by a collector during a rollout)."""
    p = snapshot.parse(CONTROL)["p"]
    assert p.counts == Counts(requests=6, responses_2xx=5, responses_4xx=1)
    assert p.breakdown["status"] == {"200": 5, "404": 1}
    # Only the API requests are timed: all 5 above 0.1 s, so p50 is not a scrape's 0.05.
    assert p.latency == Histogram((0.1, math.inf), (0, 5), 2.5)
    assert p.latency.quantile(0.5) == 0.1


# A current proxy's exposition: the request families hold API requests only (by each
# record's API), control routes have their own. An /admin/events stream that lasted 694.9 s
# is in zai_proxy_control_request_duration_seconds, never in the latency.
CURRENT = """\
# TYPE zai_proxy_requests_total counter
zai_proxy_requests_total{method="POST",path="/v1/chat/completions",status="200",variant="p"} 5
zai_proxy_requests_total{method="GET",path="other",status="404",variant="p"} 1
# TYPE zai_proxy_request_duration_seconds histogram
zai_proxy_request_duration_seconds_bucket{le="1.0",method="POST",path="/v1/chat/completions",variant="p"} 5
zai_proxy_request_duration_seconds_bucket{le="+Inf",method="POST",path="/v1/chat/completions",variant="p"} 5
zai_proxy_request_duration_seconds_sum{method="POST",path="/v1/chat/completions",variant="p"} 2.5
zai_proxy_request_duration_seconds_bucket{le="1.0",method="GET",path="other",variant="p"} 1
zai_proxy_request_duration_seconds_bucket{le="+Inf",method="GET",path="other",variant="p"} 1
zai_proxy_request_duration_seconds_sum{method="GET",path="other",variant="p"} 0.001
# TYPE zai_proxy_control_requests_total counter
zai_proxy_control_requests_total{method="GET",path="/admin/events",status="200",variant="p"} 1
zai_proxy_control_requests_total{method="GET",path="/metrics",status="200",variant="p"} 40
# TYPE zai_proxy_control_request_duration_seconds histogram
zai_proxy_control_request_duration_seconds_bucket{le="1.0",method="GET",path="/admin/events",variant="p"} 0
zai_proxy_control_request_duration_seconds_bucket{le="+Inf",method="GET",path="/admin/events",variant="p"} 1
zai_proxy_control_request_duration_seconds_sum{method="GET",path="/admin/events",variant="p"} 694.907
"""


def test_control_routes_are_counted_in_their_own_families_not_as_api_traffic() -> None:
    p = snapshot.parse(CURRENT)["p"]
    assert p.counts == Counts(requests=6, responses_2xx=5, responses_4xx=1)
    assert p.breakdown["status"] == {"200": 5, "404": 1}
    assert p.latency == Histogram((1.0, math.inf), (6, 6), 2.501)
    assert p.latency.quantile(0.95) is not None and p.latency.quantile(0.95) <= 1.0
    # The request families of a current build are taken whole: the route decides nothing.
    odd = CURRENT.replace('path="other"', 'path="/admin/like-an-api-route"')
    assert snapshot.parse(odd)["p"].counts == p.counts


BREAKDOWN = """\
zai_proxy_requests_total{method="POST",path="/v1/messages",status="200",variant="p"} 7
zai_proxy_requests_total{method="POST",path="/v1/chat/completions",status="200",variant="p"} 3
zai_proxy_requests_total{method="POST",path="/v1/chat/completions",status="429",variant="p"} 2
zai_proxy_zai_errors_total{class="frequency",code="1302",variant="p"} 2
zai_proxy_zai_errors_total{class="frequency",code="1303",variant="p"} 1
zai_proxy_zai_errors_total{class="quota",code="other",variant="p"} 4
zai_proxy_upstream_errors_total{error_type="upstream_timeout",variant="p"} 3
zai_proxy_upstream_errors_total{error_type="connect",variant="p"} 1
zai_proxy_rate_limit_rejections_total{limit="requests_per_minute",scope="key",client="source-30",variant="p"} 3
zai_proxy_rate_limit_rejections_total{limit="requests_per_minute",scope="key",client="source-07",variant="p"} 2
zai_proxy_rate_limit_rejections_total{limit="concurrency",scope="global",client="source-30",variant="p"} 2
zai_proxy_retry_attempts_total{reason="frequency",variant="p"} 6
zai_proxy_rate_limit_adjustments_total{direction="up",variant="p"} 8
zai_proxy_rate_limit_adjustments_total{direction="down",variant="p"} 0
zai_proxy_worker_processes{variant="p"} 4
zai_proxy_max_workers{variant="p"} 64
zai_proxy_worker_utilization_ratio{variant="p"} 0.5
zai_proxy_concurrency_limit{scope="proxy",variant="p"} 64
zai_proxy_concurrency_limit{scope="upstream",variant="p"} 16
"""


def test_breakdown_of_every_category() -> None:
    p = snapshot.parse(BREAKDOWN)["p"]
    expected = {
        "status": {"200": 10, "429": 2},
        "zai_errors": {"1302": 2, "1303": 1, "other": 4},
        "zai_error_classes": {"frequency": 3, "quota": 4},
        "upstream_errors": {"connect": 1, "upstream_timeout": 3},
        "rejections": {"global:concurrency": 2, "key:requests_per_minute": 5},
        "retries": {"frequency": 6},
        "adjustments": {"down": 0, "up": 8},
    }
    # Rejections by client (the original's source-NN) are summed per scope:limit.
    assert p.breakdown == expected
    assert list(p.breakdown) == list(snapshot.BREAKDOWNS)
    assert (p.counts.zai_errors, p.counts.upstream_errors, p.counts.rejections) == (7, 4, 7)
    assert (p.workers, p.concurrency_limit) == (4, 64)  # max_workers is the cap, not workers
    body = orjson.loads(orjson.dumps(p.to_json()))
    assert body["breakdown"] == expected
    assert (body["workers"], body["concurrency_limit"]) == (4, 64)
    with pytest.raises(TypeError):
        p.breakdown["status"]["200"] = 0  # type: ignore[index]
    hash(p)  # still usable as a value


@pytest.mark.parametrize(("lines", "workers"), [
    # A current build: worker processes by their own name; max_workers is the cap.
    (['zai_proxy_worker_processes{variant="p"} 2', 'zai_proxy_max_workers{variant="p"} 8',
      'zai_proxy_ledger_info{implementation="native",variant="p"} 1'], 2),
    # An older zaiproxy (ledger_info, no worker_processes) counted its workers as max_workers.
    (['zai_proxy_max_workers{variant="p"} 3',
      'zai_proxy_ledger_info{implementation="native",variant="p"} 1'], 3),
    # The original service (no ledger_info): max_workers is its MAX_WORKERS, never workers.
    (['zai_proxy_max_workers{variant="p"} 10'], 0),
])
def test_workers_are_the_worker_processes(lines: list[str], workers: float) -> None:
    assert snapshot.parse("\n".join(lines) + "\n")["p"].workers == workers


@pytest.mark.parametrize(("lines", "limit"), [
    (['zai_proxy_concurrency_limit{scope="upstream",variant="p"} 16'], 16),
    (['zai_proxy_concurrency_limit{scope="upstream",variant="p"} 16',
      'zai_proxy_concurrency_limit{scope="proxy",variant="p"} 64'], 64),
    (['zai_proxy_max_workers{variant="p"} 2'], 0),
])
def test_concurrency_limit_prefers_the_proxy_scope(lines: list[str], limit: float) -> None:
    assert snapshot.parse("\n".join(lines) + "\n")["p"].concurrency_limit == limit


def test_breakdown_labels_are_bounded() -> None:
    n = snapshot.MAX_BREAKDOWN_LABELS + 10
    text = "".join(f'zai_proxy_retry_attempts_total{{reason="r{i:03d}",variant="p"}} 1\n'
                   for i in range(n))
    retries = snapshot.parse(text)["p"].breakdown["retries"]
    assert len(retries) == snapshot.MAX_BREAKDOWN_LABELS
    assert sum(retries.values()) == n  # nothing lost: the rest is summed as "other"
    assert retries["other"] == n - (snapshot.MAX_BREAKDOWN_LABELS - 1)


@pytest.mark.parametrize("text", ["zai_proxy_requests_total{status=\"200\" 1\n",
                                  "zai_proxy_requests_total not-a-number\n",
                                  "<html>502 Bad Gateway</html>\n"])
def test_garbage_is_a_parse_error(text: str) -> None:
    with pytest.raises(snapshot.ParseError):
        snapshot.parse(text)


# ---- quantiles ------------------------------------------------------------------


BUCKETS = Histogram.from_buckets({0.1: 10, 0.5: 60, 1.0: 90, math.inf: 100})


@pytest.mark.parametrize(("q", "expected"), [
    (0.05, 0.05),       # first bucket: lower bound 0, 5 of 10 -> halfway
    (0.1, 0.1),         # exactly the first bucket's count
    (0.5, 0.42),        # (0.1, 0.5]: rank 50 is the 40th of 50 -> 0.1 + 0.4 * 40/50
    (0.9, 1.0),         # rank 90 = count at le=1.0 -> its upper bound
    (0.95, 1.0),        # in +Inf: the highest finite bound
    (0.99, 1.0),
])
def test_quantiles_like_histogram_quantile(q: float, expected: float) -> None:
    assert BUCKETS.quantile(q) == pytest.approx(expected, abs=1e-12)


def test_quantile_edges() -> None:
    assert Histogram().quantile(0.5) is None
    assert Histogram.from_buckets({0.1: 0, math.inf: 0}).quantile(0.5) is None
    assert Histogram.from_buckets({math.inf: 5}).quantile(0.5) is None  # one bucket: NaN
    assert Histogram.from_buckets({-1.0: 4, math.inf: 4}).quantile(0.5) == -1.0
    # Non-monotonic input (series scraped mid-update) is forced monotonic.
    assert Histogram.from_buckets({0.1: 5, 0.5: 3, math.inf: 5}).counts == (5, 5, 5)
    # A missing +Inf bucket is added from the other counts.
    assert Histogram.from_buckets({0.1: 2, 0.5: 4}, count=6).bounds[-1] == math.inf


def test_histograms_with_different_layouts_merge_as_step_functions() -> None:
    a = Histogram.from_buckets({0.1: 1, 1.0: 3, math.inf: 4})
    b = Histogram.from_buckets({0.5: 2, math.inf: 2})
    merged = a.plus(b)
    assert merged.bounds == (0.1, 0.5, 1.0, math.inf)
    assert merged.counts == (1, 1 + 2, 3 + 2, 6)
    assert a.plus(Histogram()) == a and Histogram().plus(a) == a


# ---- deltas ---------------------------------------------------------------------


def snap(requests: float, errors: float = 0, lat: dict[float, float] | None = None,
         tokens_out: float = 0, in_flight: float = 0) -> VariantSnapshot:
    latency = Histogram.from_buckets(lat) if lat else Histogram()
    return VariantSnapshot("production", Counts(requests=requests, responses_5xx=errors,
                                                responses_2xx=requests - errors,
                                                tokens_out=tokens_out),
                           in_flight=in_flight, latency=latency)


def test_delta_rates_and_interval_quantiles() -> None:
    prev = snap(100, 2, {0.1: 50, 1.0: 90, math.inf: 100}, tokens_out=1000)
    cur = snap(150, 7, {0.1: 60, 1.0: 140, math.inf: 150}, tokens_out=3000, in_flight=4)
    r = snapshot.delta(prev, cur, 10.0)
    assert not r.reset
    assert r.increase.requests == 50
    body = r.to_json()
    assert body["requests_per_s"] == 5.0
    assert body["errors_per_s"] == 0.5
    assert body["error_rate"] == 0.1
    assert body["tokens_out_per_s"] == 200.0
    assert body["in_flight"] == 4
    # Interval buckets: 10 <= 0.1, 40 in (0.1, 1], 0 above: p50 = 0.1 + 0.9 * 15/40.
    assert r.latency.counts == (10, 50, 50)
    assert body["latency_p50_s"] == pytest.approx(0.1 + 0.9 * 15 / 40)
    assert body["latency_p99_s"] == pytest.approx(0.1 + 0.9 * 39.5 / 40)


def test_counter_reset_takes_the_new_value_as_the_increase() -> None:
    prev = snap(1000, 10, {0.1: 900, math.inf: 1000}, tokens_out=5000)
    cur = snap(30, 1, {0.1: 20, math.inf: 30}, tokens_out=6000)  # tokens grew past, still reset
    r = snapshot.delta(prev, cur, 5.0)
    assert r.reset
    assert r.increase == cur.counts
    assert r.increase.tokens_out == 6000
    assert r.latency == cur.latency
    assert all(v >= 0 for v in r.to_json().values() if isinstance(v, float))


def test_histogram_reset_alone_is_a_reset() -> None:
    prev = snap(10, 0, {0.1: 10, math.inf: 10})
    cur = snap(10, 0, {0.1: 2, math.inf: 2})
    assert snapshot.delta(prev, cur, 1.0).reset


def bsnap(requests: float, **breakdown: dict[str, float]) -> VariantSnapshot:
    return VariantSnapshot("production", Counts(requests=requests),
                           breakdown=snapshot.freeze_breakdown(breakdown), workers=2,
                           concurrency_limit=8)


def test_delta_of_breakdowns() -> None:
    prev = bsnap(10, status={"200": 9, "502": 1}, retries={"frequency": 2})
    cur = bsnap(16, status={"200": 14, "502": 1, "429": 1}, retries={"frequency": 5},
                adjustments={"down": 1})
    r = snapshot.delta(prev, cur, 2.0)
    assert not r.reset
    assert r.breakdown["status"] == {"200": 5, "429": 1, "502": 0}
    assert r.breakdown["retries"] == {"frequency": 3}
    assert r.breakdown["adjustments"] == {"down": 1}  # new label: all of it is new
    body = r.to_json()
    assert body["breakdown_per_s"]["status"] == {"200": 2.5, "429": 0.5, "502": 0}
    assert body["breakdown_per_s"]["zai_errors"] == {}
    assert (body["concurrency_limit"], body["workers"]) == (8, 2)
    assert list(body)[-3:] == ["concurrency_limit", "workers", "versions"]


def test_a_breakdown_label_that_went_down_is_a_reset() -> None:
    prev = bsnap(10, status={"200": 10}, retries={"frequency": 9})
    cur = bsnap(12, status={"200": 12}, retries={"frequency": 2})  # requests grew, retries not
    r = snapshot.delta(prev, cur, 1.0)
    assert r.reset
    assert r.increase == cur.counts  # every counter taken as reset, not just retries
    assert r.breakdown == cur.breakdown
    # A label that vanished is a series gone, not a restart.
    gone = snapshot.delta(prev, bsnap(12, status={"200": 12}), 1.0)
    assert not gone.reset and gone.breakdown["retries"] == {}


def test_merge_sums_breakdowns_and_gauges() -> None:
    a = bsnap(10, status={"200": 9, "502": 1})
    b = bsnap(5, status={"200": 5}, zai_errors={"1302": 2})
    m = snapshot.merge("production", [a, b])
    assert m.breakdown["status"] == {"200": 14, "502": 1}
    assert m.breakdown["zai_errors"] == {"1302": 2}
    assert (m.workers, m.concurrency_limit) == (4, 16)  # each replica has its own limit
    unlimited = snapshot.merge("production", [a, replace(b, concurrency_limit=0.0)])
    assert unlimited.concurrency_limit == 0  # one replica without a limit: the fleet has none
    assert snapshot.merge("production", []).breakdown == {c: {} for c in snapshot.BREAKDOWNS}


def test_zero_interval_gives_zero_rates() -> None:
    r = snapshot.delta(snap(1), snap(5), 0.0)
    assert r.to_json()["requests_per_s"] == 0.0


def test_combine_sums_rates_across_targets() -> None:
    a = Rates("canary", 5.0, Counts(requests=50, responses_5xx=5),
              latency=Histogram.from_buckets({0.1: 50, math.inf: 50}), in_flight=2,
              workers=2, concurrency_limit=10,
              breakdown=snapshot.freeze_breakdown({"status": {"200": 45, "502": 5}}))
    b = Rates("canary", 10.0, Counts(requests=20),
              latency=Histogram.from_buckets({0.1: 0, math.inf: 20}), in_flight=1,
              workers=1, concurrency_limit=4,
              breakdown=snapshot.freeze_breakdown({"status": {"200": 20}}))
    c = snapshot.combine("canary", [a, b])
    body = c.to_json()
    assert body["requests_per_s"] == pytest.approx(10 + 2)
    assert body["error_rate"] == pytest.approx(1 / 12)
    assert body["in_flight"] == 3
    # b's 20 slow observations over 10 s weigh as 10 in a's 5 s... scaled to 10 s: 100 vs 20.
    assert c.latency.counts == (100, 120)
    # Breakdowns scale like the other counters: b's 20 in 10 s stay 20 over the 10 s window.
    assert c.breakdown["status"] == {"200": 90 + 20, "502": 10}
    assert body["breakdown_per_s"]["status"] == pytest.approx({"200": 9 + 2, "502": 1})
    assert (body["workers"], body["concurrency_limit"]) == (3, 14)
    assert snapshot.combine("canary", []).to_json()["requests_per_s"] == 0


# ---- a real exposition ------------------------------------------------------------


async def test_parse_a_real_proxy_exposition(nursery) -> None:
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream, deployment_variant="canary",
                                                   upstream_concurrency=9))
    body = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(3):
        resp = await request(proxy.port, "POST", "/v1/chat/completions",
                             [("content-type", "application/json")], body)
        assert resp.status == 200
    assert (await request(proxy.port, "GET", "/v1/nothing-here")).status == 404
    # Control routes are answered and counted by the proxy, but are not API traffic.
    for path in ("/health", "/ready", "/admin/status", "/metrics"):
        assert (await request(proxy.port, "GET", path)).status == 200
    resp = await request(proxy.port, "GET", "/metrics")
    assert resp.status == 200
    text = resp.body.decode()
    control = [line for line in text.splitlines() if 'path="/admin/status"' in line
               or 'path="/metrics"' in line]
    assert control and all(line.startswith("zai_proxy_control_") for line in control)
    snaps = snapshot.parse(text)
    assert list(snaps) == ["canary"]
    canary = snaps["canary"]
    assert canary.counts.requests == 4
    assert (canary.counts.responses_2xx, canary.counts.responses_4xx) == (3, 1)
    assert canary.breakdown["status"] == {"200": 3, "404": 1}
    assert canary.breakdown["adjustments"].keys() == {"up", "down"}
    # One worker process; upstream_concurrency is the cap (zai_proxy_max_workers), not workers.
    assert (canary.workers, canary.concurrency_limit) == (1, 9)
    assert "zai_proxy_max_workers{variant=\"canary\"} 9.0" in text
    assert canary.versions
    assert canary.latency.count == 4  # every answered API request is timed, merged over paths
    assert 0 < canary.latency.quantile(0.99) < 1  # type: ignore[operator]
    counts = canary.counts
    assert counts.tokens_in > 0 and counts.tokens_out > 0 and counts.cost_usd > 0
    orjson.dumps(canary.to_json())
    # The proxy's admin API parses the families without the text: the same snapshot.
    metrics = proxy.worker.ctx.metrics
    assert snapshot.parse_families(metrics.families()) == snapshot.parse(
        metrics.render()[0].decode())
