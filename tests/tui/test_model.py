"""zaiproxy_tui.model: both history shapes, snapshots, keys, and the time series arithmetic.

The ``data/proxy_*.json`` documents were captured from a real ``zaiproxy serve --demo
--workers 1`` (open mode for the metrics events, a keys file plus global limits for
``/admin/keys`` and the history with 429s). The proxy's history answer was fetched at
``PROXY_FETCHED_AT`` (its ``series.range.end``); its three 5 s buckets hold 8, 4 and 1
requests. ``proxy_keys_pool.json`` is a real proxy's ``/admin/keys`` with a pool file of two
upstream keys against the mock's quota endpoint (``team-plan`` at 43 % of its 5 hours, then
answered Z.AI's 1308 and rests; ``backup`` at 97 %, its quota API malformed and the sample
stale after 3 s, its reserve reached).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.tui.fixtures import NOW, history_doc, keys_doc, metrics_doc
from zaiproxy_tui.__main__ import parse_args
from zaiproxy_tui.model import (
    VARIANT_NAME,
    AnswerError,
    History,
    LimitState,
    Point,
    QuotaPacing,
    QuotaWindow,
    UpstreamKey,
    ZaiQuota,
    parse_history,
    parse_keys,
    parse_snapshot,
    parse_upstreams,
    parse_zai_quota,
    timeline,
    total,
    variant_mode,
    weighted,
)

DATA = Path(__file__).parent / "data"
PROXY_FETCHED_AT = 1795828592.234757  # 2026-11-28T01:16:32.234757Z
BUCKETS = (1795828575.0, 1795828580.0, 1795828585.0)


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


# ---- history: the collector's shape ------------------------------------------------------


def test_collector_history_points_are_its_rates_at_the_end_of_each_step() -> None:
    doc = history_doc("15m")
    h = parse_history(doc, "15m", NOW)
    assert (h.range, h.source, h.step, h.note) == ("15m", "collector", 15.0, "")
    assert (h.start, h.end) == (NOW - 900, NOW)
    assert set(h.series) == {"production", "canary"}
    raw = doc["series"]["production"]
    pts = h.series["production"]
    assert len(pts) == len(raw) == 61
    first = pts[0]
    assert first.t == raw[0]["t"] + 15
    assert first.seconds == 15.0
    assert first.requests == raw[0]["requests_per_s"]
    assert first.r429 == raw[0]["rate_limited_per_s"]
    assert first.r5xx == raw[0]["errors_per_s"]
    assert first.latency_p95 == raw[0]["latency_p95_s"]  # seconds already
    assert first.cost == raw[0]["cost_usd_per_s"]
    # No 2xx column: what is neither 4xx nor 5xx.
    assert first.r2xx == pytest.approx(raw[0]["requests_per_s"] * (1 - 0.04 - 0.01))
    # The step still filling ends now, not in the future.
    assert raw[-1]["t"] + 15 > NOW
    assert pts[-1].t == NOW


def test_collector_history_keeps_variants_apart() -> None:
    h = parse_history(history_doc("5m"), "5m", NOW)
    prod, canary = h.series["production"][-1], h.series["canary"][-1]
    assert prod.requests is not None and canary.requests is not None
    assert prod.requests > 5 * canary.requests
    assert canary.error_rate == pytest.approx(0.06)
    assert prod.error_rate == pytest.approx(0.01)


def test_collector_history_skips_points_without_time_and_tolerates_extra_fields() -> None:
    doc = history_doc("5m", variants=("production",))
    doc["series"]["production"][0].pop("t")
    doc["series"]["production"].append("not a point")
    doc["series"]["production"][1]["a_new_field"] = {"x": 1}
    doc["series"]["canary"] = "not a list"
    doc["something_new"] = [1, 2]
    h = parse_history(doc, "5m", NOW)
    assert len(h.series["production"]) == len(history_doc("5m")["series"]["production"]) - 1
    assert "canary" not in h.series


# ---- history: the proxy's recorder shape --------------------------------------------------


def test_proxy_history_counts_become_rates_per_bucket() -> None:
    h = parse_history(load("proxy_history_5m.json"), "5m", PROXY_FETCHED_AT)
    assert (h.source, h.step, h.note) == ("raw", 5.0, "")
    assert (h.start, h.end) == (PROXY_FETCHED_AT - 300, PROXY_FETCHED_AT)
    pts = h.series["production"]
    assert [p.t for p in pts] == [b + 5 for b in BUCKETS]
    assert [p.seconds for p in pts] == [5.0, 5.0, 5.0]
    first = pts[0]  # 8 requests: 6 × 2xx, 2 × 429 (rejected by a key limit), 75 + 120 tokens
    assert first.requests == pytest.approx(8 / 5)
    assert first.r2xx == pytest.approx(6 / 5)
    assert first.r4xx == pytest.approx(2 / 5)
    assert first.r429 == pytest.approx(2 / 5)
    assert first.r5xx == 0.0
    assert first.rejections == pytest.approx(2 / 5)
    assert first.tokens_in == pytest.approx(75 / 5)
    assert first.tokens_out == pytest.approx(120 / 5)
    assert first.cost == pytest.approx(0.000309 / 5)
    assert first.latency_p50 == pytest.approx(0.004068)  # ms → s
    assert first.latency_p95 == pytest.approx(0.018528)
    assert first.latency_p99 == pytest.approx(0.018847)
    assert first.ttft_p95 == pytest.approx(0.015378)
    assert pts[1].ttft_p50 is None  # null in the answer: unknown, not 0
    assert total(pts, "requests") == pytest.approx(13)
    assert total(pts, "r429") == pytest.approx(6)


def test_proxy_history_last_partial_bucket_is_divided_by_its_elapsed_part() -> None:
    h = parse_history(load("proxy_history_5m.json"), "5m", BUCKETS[2] + 2.0)
    *full, last = h.series["production"]
    assert [p.seconds for p in full] == [5.0, 5.0]
    assert last.seconds == pytest.approx(2.0)
    assert last.t == BUCKETS[2] + 2.0
    assert last.requests == pytest.approx(1 / 2.0)
    assert total(h.series["production"], "requests") == pytest.approx(13)


def test_proxy_history_rollup_answer_gets_a_note() -> None:
    doc = load("proxy_history_5m.json")
    doc["series"]["source"] = "rollup"
    doc["series"]["resolution_s"] = 60.0
    points = doc["series"]["series"]["production"]
    for i, p in enumerate(points):
        p["t"] = 1795828440.0 - 60 * (len(points) - 1 - i)  # whole minutes, all complete
        for name in doc["series"]["fields_null_in_rollup"]:
            p[name] = None
    h = parse_history(doc, "6h", PROXY_FETCHED_AT)
    assert h.source == "rollup"
    assert "rollup" in h.note and "p50" in h.note
    assert h.start == PROXY_FETCHED_AT - 21600
    p = h.series["production"][0]
    assert p.seconds == 60.0
    assert (p.latency_p50, p.latency_p99, p.ttft_p95, p.rejections) == (None, None, None, None)
    assert p.latency_p95 == pytest.approx(0.018528)
    assert p.requests == pytest.approx(8 / 60)


def test_proxy_history_of_an_older_recorder_takes_errors_as_5xx() -> None:
    doc = {"range": "5m", "series": {"resolution_s": 10, "source": "raw", "series": {
        "production": [{"t": 1000.0, "requests": 20, "errors": 3}]}}}
    p = parse_history(doc, "5m", 2000.0).series["production"][0]
    assert p.requests == 2.0
    assert p.r5xx == pytest.approx(0.3)
    assert (p.r2xx, p.r4xx, p.r429, p.latency_p95) == (None, None, None, None)


def test_proxy_history_responses_5xx_wins_over_errors() -> None:
    doc = {"series": {"resolution_s": 10, "series": {
        "production": [{"t": 1000.0, "requests": 20, "errors": 5, "responses_5xx": 2}]}}}
    assert parse_history(doc, "5m", 2000.0).series["production"][0].r5xx == pytest.approx(0.2)


def test_proxy_history_tolerates_extra_fields_and_bad_points() -> None:
    doc = load("proxy_history_5m.json")
    doc["series"]["series"]["production"][0]["latency_ms_p999"] = 12.0
    doc["series"]["series"]["production"].insert(0, {"time": "no t"})
    doc["series"]["series"]["production"].insert(0, 7)
    doc["series"]["new_top_field"] = {"a": 1}
    pts = parse_history(doc, "5m", PROXY_FETCHED_AT).series["production"]
    assert [p.t for p in pts] == [b + 5 for b in BUCKETS]


@pytest.mark.parametrize("doc", [[], "history", 3, None, {"range": "5m"},
                                 {"series": [1, 2]}])
def test_history_that_is_not_the_admin_apis_is_an_answer_error(doc: Any) -> None:
    with pytest.raises(AnswerError):
        parse_history(doc, "5m", NOW)


# ---- live snapshots -------------------------------------------------------------------------


def test_proxy_first_metrics_event_has_no_rates() -> None:
    snap = parse_snapshot(load("proxy_metrics_first.json"))
    assert (snap.source, snap.interval, snap.stale_targets) == ("proxy", None, ())
    assert snap.time == pytest.approx(1795828546.0743055)
    v = snap.variants["production"]
    assert v.rates is None
    assert v.totals["requests"] == 14.0
    assert v.totals["responses_4xx"] == 1.0
    assert "breakdown" not in v.totals and "versions" not in v.totals
    assert v.breakdown["status"] == {"200": 13.0, "400": 1.0}
    assert v.breakdown["zai_errors"] == {}
    assert v.breakdown_per_s == {}
    assert v.versions == ("0.1.0",)
    assert (v.targets, v.stale_targets) == (None, 0)
    assert (v.in_flight, v.concurrency_limit) == (0.0, 0.0)


def test_proxy_metrics_event_rates_are_a_point_at_the_event_time() -> None:
    doc = load("proxy_metrics.json")
    snap = parse_snapshot(doc)
    v = snap.variants["production"]
    p = v.rates
    assert p is not None
    assert p.t == doc["time"]
    assert p.seconds == pytest.approx(2.005999813991366)
    assert p.requests == pytest.approx(4.486540794883013)
    assert p.r2xx == pytest.approx(4.486540794883013)  # the 2xx statuses of breakdown_per_s
    assert (p.r4xx, p.r429, p.r5xx) == (0.0, 0.0, 0.0)
    assert p.latency_p50 == 0.0025
    assert p.ttft_p99 == 0.0495
    assert p.tokens_out == pytest.approx(107.67697907719231)
    assert p.retries == 0.0  # an empty breakdown: none, not unknown
    assert v.breakdown_per_s["status"] == {"200": pytest.approx(4.486540794883013), "400": 0.0}
    assert total([p], "requests") == pytest.approx(9.0)


def test_rates_2xx_sums_every_2xx_status() -> None:
    doc = metrics_doc()
    rates = doc["variants"]["production"]["rates"]
    rates["breakdown_per_s"]["status"] = {"200": 3.0, "201": 0.5, "204": 0.25, "429": 9.0}
    p = parse_snapshot(doc).variants["production"].rates
    assert p is not None and p.r2xx == 3.75
    assert p.retries == pytest.approx(rates["requests_per_s"] * 0.003)


def test_collector_status_with_stale_targets() -> None:
    doc = metrics_doc(interval=5.0)
    doc["targets"] = [{"target": "http://10.0.0.1:8080", "stale": True, "age_s": 31.0},
                      {"target": "http://10.0.0.2:8080", "stale": False},
                      "not a target"]
    doc["variants"]["canary"].update(targets=2, stale_targets=1, stale=True)
    snap = parse_snapshot(doc)
    assert (snap.source, snap.interval) == ("collector", 5.0)
    assert snap.stale_targets == ("http://10.0.0.1:8080",)
    assert (snap.variants["production"].targets, snap.variants["production"].stale_targets) \
        == (1, 0)
    assert (snap.variants["canary"].targets, snap.variants["canary"].stale_targets) == (2, 1)
    assert snap.variants["canary"].concurrency_limit == 16.0
    assert snap.variants["production"].breakdown["zai_errors"] == {"1302": 900.0, "1308": 12.0}
    assert snap.variants["canary"].breakdown_per_s["retries"]["concurrency"] == pytest.approx(
        doc["variants"]["canary"]["rates"]["requests_per_s"] * 0.003)


def test_snapshot_missing_fields_are_blanks_not_crashes() -> None:
    snap = parse_snapshot({"time": 5, "variants": {
        "production": {}, "canary": "not an object",
        "x": {"rates": {"seconds": 2.0}, "in_flight": "many", "targets": "two",
              "breakdown": {"status": {"200": "lots", "500": 1}, "odd": 3},
              "versions": "0.1.0"}}})
    assert snap.source == "proxy"
    assert set(snap.variants) == {"production", "x"}
    empty = snap.variants["production"]
    assert (empty.rates, empty.totals, empty.breakdown, empty.versions) == (None, {}, {}, ())
    assert (empty.in_flight, empty.adaptive_rate, empty.targets) == (0.0, 0.0, None)
    x = snap.variants["x"]
    assert x.rates is not None
    assert (x.rates.requests, x.rates.r2xx, x.rates.latency_p50) == (None, None, None)
    assert x.in_flight == 0.0 and x.targets is None
    assert x.breakdown == {"status": {"500": 1.0}}
    assert x.versions == ()  # a string is not a list of versions
    assert parse_snapshot({"time": 5.0}).variants == {}
    assert parse_snapshot({"time": 5.0, "targets": 3, "variants": []}).stale_targets == ()


@pytest.mark.parametrize("doc", [[], "metrics", None, 3, {}, {"time": "now"}, {"time": True}])
def test_snapshot_that_is_not_the_admin_apis_is_an_answer_error(doc: Any) -> None:
    with pytest.raises(AnswerError):
        parse_snapshot(doc)


# ---- keys -----------------------------------------------------------------------------------


def test_proxy_keys_answer() -> None:
    report = parse_keys(load("proxy_keys.json"))
    assert report.mode == "keys"
    alice, bob = report.keys
    assert (alice.alias, alice.enabled, alice.state) == ("alice", True, "limited")
    assert alice.limited_by == ("requests_per_minute",)
    assert (alice.requests, alice.input_tokens, alice.output_tokens) == (5, 75, 120)
    by_name = {s.name: s for s in alice.limits}
    assert by_name["requests_per_minute"] == LimitState("requests_per_minute", 5, 0, None, 59.796)
    assert by_name["concurrency"] == LimitState("concurrency", 4, 4, 0, None)  # in_use → used
    assert by_name["tokens_per_5h"].used == 195
    assert alice.tightest is not None and alice.tightest.name == "requests_per_minute"
    assert (bob.enabled, bob.state, bob.limits, bob.tightest) == (False, "disabled", (), None)
    glob = {s.name: s for s in report.limits}
    assert set(glob) == {"requests_per_minute", "upstream_tokens_per_5h"}
    assert glob["requests_per_minute"].used_share == pytest.approx(3 / 600)
    assert glob["upstream_tokens_per_5h"].reset_s == 17927.273
    assert report.adaptive is not None
    assert (report.adaptive.enabled, report.adaptive.rate_rps, report.adaptive.min_rps,
            report.adaptive.max_rps) == (True, None, 0.5, 1000.0)
    assert report.adaptive.adjustments == {"up": 0.0, "down": 0.0}


def test_keys_answer_with_every_request_by_outcome() -> None:
    """A proxy that counts every request of a key by outcome (captured from a real worker
    against the mock, the tests' harness: alice, allowed 5 requests a minute, got 3 answers,
    a 503, a relayed Z.AI 1308 and 2 refusals; bob is disabled)."""
    alice, bob = parse_keys(load("proxy_keys_outcomes.json")).keys
    assert (alice.requests, alice.ok, alice.refused, alice.zai_429, alice.other_4xx,
            alice.r5xx) == (7, 3, 2, 1, 0, 1)
    assert alice.r4xx == 1  # Z.AI's 429 is a 4xx the client got, not a refusal
    assert (alice.input_tokens, alice.output_tokens) == (69, 30)
    assert (bob.requests, bob.refused, bob.r4xx, bob.r5xx) == (0, 0, 0, 0)


def test_keys_answer_of_an_older_proxy_has_no_outcomes() -> None:
    """Before the outcomes a proxy counted only the charged requests: they stay "requests",
    the outcomes are unknown (None, shown "–"), never 0."""
    alice, _ = parse_keys(load("proxy_keys.json")).keys
    assert alice.requests == 5
    assert (alice.ok, alice.refused, alice.zai_429, alice.other_4xx, alice.r5xx,
            alice.r4xx) == (None,) * 6
    partial = load("proxy_keys_outcomes.json")
    usage = partial["keys"][0]["usage"]
    del usage["zai_429"]
    usage["5xx"] = "many"  # not a number: unknown, not a crash
    alice = parse_keys(partial).keys[0]
    assert (alice.refused, alice.other_4xx, alice.r4xx, alice.r5xx) == (2, 0, None, None)


def test_open_mode_keys_answer() -> None:
    doc = {"mode": "open", "keys": [], "global": {},
           "adaptive": {"enabled": True, "rate_rps": 12.5, "min_rps": 0.5, "max_rps": 1000.0,
                        "ceiling_rps": None, "adjustments": {"up": 2, "down": 5}}}
    report = parse_keys(doc)
    assert (report.mode, report.keys, report.limits) == ("open", (), ())
    assert report.adaptive is not None and report.adaptive.rate_rps == 12.5
    assert report.adaptive.adjustments == {"up": 2.0, "down": 5.0}
    assert parse_keys({}) == parse_keys({"keys": None, "global": None}) \
        and parse_keys({}).adaptive is None and parse_keys({}).mode == "open"


def test_keys_states_and_limited_by_derived_when_absent() -> None:
    doc = keys_doc()
    for k in doc["keys"]:
        del k["state"], k["limited_by"]
    keys = {k.alias: k for k in parse_keys(doc).keys}
    assert keys["ci-bot"].state == "limited"
    assert keys["ci-bot"].limited_by == ("requests_per_minute", "concurrency")
    assert (keys["agent-fleet-a"].state, keys["agent-fleet-a"].limited_by) == ("ok", ())
    assert keys["old-laptop"].state == "disabled"


def test_keys_state_given_wins_and_limited_by_string_is_not_characters() -> None:
    doc = {"keys": [{"alias": "a", "state": "limited", "limited_by": "requests_per_minute"},
                    {"alias": "b", "enabled": False,
                     "now": {"requests_per_minute": {"limit": 5, "remaining": 0}}},
                    {"alias": 7}, "not a key", {"enabled": True}]}
    a, b = parse_keys(doc).keys
    assert (a.state, a.limited_by) == ("limited", ())
    # A disabled key stays "disabled" even when a limit is exhausted.
    assert (b.state, b.limited_by) == ("disabled", ("requests_per_minute",))


def test_tightest_limit_is_the_one_with_least_share_left() -> None:
    keys = {k.alias: k for k in parse_keys(keys_doc()).keys}
    # agent-fleet-a: 188/600 per minute (31 %) vs 3.1M/5M tokens per 5 h (62 %).
    tight = keys["agent-fleet-a"].tightest
    assert tight is not None and tight.name == "tokens_per_5h"
    assert tight.used_share == pytest.approx(0.62)
    assert tight.reset_s == 7980.0
    alice = keys["alice"].tightest
    assert alice is not None and alice.used_share == pytest.approx(2400 / 20000)


def test_global_limits_and_adaptive_of_the_fixture() -> None:
    report = parse_keys(keys_doc())
    glob = {s.name: s for s in report.limits}
    assert list(glob) == ["requests_per_minute", "concurrency", "requests_per_5h",
                          "upstream_tokens_per_week"]
    assert glob["concurrency"].used == 17 and glob["concurrency"].remaining == 47
    assert glob["requests_per_minute"].used is None
    assert glob["requests_per_minute"].used_share == pytest.approx(1100 / 3000)
    assert glob["upstream_tokens_per_week"].used_share == pytest.approx(830 / 900)
    assert report.adaptive is not None and report.adaptive.adjustments == {}


def test_limits_without_a_limit_are_skipped_and_remaining_is_derived() -> None:
    doc = {"global": {"a": {"remaining": 3}, "b": "x",
                      "c": {"limit": 10, "used": 4}, "d": {"limit": 10}}}
    limits = {s.name: s for s in parse_keys(doc).limits}
    assert set(limits) == {"c", "d"}
    assert limits["c"].remaining == 6.0
    assert limits["d"].remaining == 10.0 and limits["d"].used_share == 0.0
    assert LimitState("zero", 0, 0).used_share == 0.0
    assert LimitState("over", 10, 0, used=15).used_share == 1.0


@pytest.mark.parametrize("doc", [[], "keys", None, 1.5])
def test_keys_that_are_not_the_admin_apis_are_an_answer_error(doc: Any) -> None:
    with pytest.raises(AnswerError):
        parse_keys(doc)


def test_keys_wrong_types_are_blanks_not_crashes() -> None:
    report = parse_keys({"keys": 5, "global": [1], "adaptive": "on"})
    assert (report.keys, report.limits, report.adaptive) == ((), (), None)


# ---- Z.AI's quota and the pool of upstream keys ------------------------------------------------


def test_a_pool_of_two_keys_from_a_real_proxy() -> None:
    report = parse_keys(load("proxy_keys_pool.json"))
    assert report.zai_quota is not None and report.upstreams is not None
    team, backup = report.zai_quota
    assert (team.upstream, team.enabled, team.fresh, team.stale, team.plan_tier,
            team.last_outcome) == ("team-plan", True, True, False, "pro", "success")
    assert not team.is_stale and not team.failing
    assert team.window("five_hour") == QuotaWindow("five_hour", 0.43, "TOKENS_LIMIT",
                                                   1796633384.08, 17968.725)
    weekly = team.window("weekly")
    assert weekly is not None and weekly.used_share == 0.18
    assert team.pacing == QuotaPacing(True, 0.017, False, "five_hour", None)
    assert team.polls["success"] > 0 and team.interval_s == 1.0 and team.stale_after_s == 3.0
    assert (backup.stale, backup.is_stale, backup.last_outcome, backup.failing) == (
        True, True, "malformed", True)
    assert backup.polls["stale"] == 1.0
    assert backup.pacing is not None and backup.pacing.reserve_reached
    assert backup.pacing.closed_until == 1796633384.061
    first, second = report.upstreams
    assert first == UpstreamKey("team-plan", 0, True, 1796619014.342, "quota", 1, 1, (), 0.57)
    assert (second.alias, second.resting, second.resting_until, second.pinned_clients,
            second.headroom) == ("backup", False, None, ("ci-runner",), 0.03)
    # The proxy's own count of the first key's 5-hour window, beside Z.AI's.
    assert {s.name for s in report.limits} == {"upstream_tokens_per_5h"}


def test_zai_quota_absent_is_unknown_and_empty_is_not_polled() -> None:
    """An older proxy says nothing (None: "not available"); a proxy that does not poll says
    [] (and has one upstream key, ``default``)."""
    older = parse_keys(load("proxy_keys.json"))
    assert (older.zai_quota, older.upstreams) == (None, None)
    current = parse_keys(keys_doc())
    assert current.zai_quota == ()
    assert current.upstreams == (UpstreamKey("default", 0, headroom=0.078, rests=0,
                                             switched_away=0),)
    assert parse_snapshot(metrics_doc(NOW)).zai_quota is None
    assert parse_snapshot(metrics_doc(NOW) | {"zai_quota": []}).zai_quota == ()


def test_the_status_carries_zai_quota_too() -> None:
    """``/admin/status`` (and each ``metrics`` event) has the same entries."""
    entries = load("proxy_keys_pool.json")["zai_quota"]
    snap = parse_snapshot(metrics_doc(NOW) | {"zai_quota": entries})
    assert snap.zai_quota == parse_keys(load("proxy_keys_pool.json")).zai_quota


def test_zai_quota_wrong_types_are_not_shown_never_a_crash() -> None:
    assert parse_zai_quota("on") is None and parse_zai_quota({"upstream": "a"}) is None
    entries = parse_zai_quota([
        "not an entry", {"upstream": 7}, {},  # no alias: the one key, "default"
        {"upstream": "a", "enabled": "yes", "fresh": "no", "stale": 1, "plan_tier": 3,
         "last_outcome": None, "sample_age_s": "old", "polls": [1, 2],
         "windows": [{"window": "five_hour", "used_fraction": "42%"},
                     {"window": "weekly", "used_pct": 250.0, "reset_in_s": math.inf},
                     {"used_fraction": 0.5}, "five_hour"],
         "pacing": {"enabled": 1, "rate_rps": "fast", "reserve_reached": "yes"}},
        {"upstream": "b", "windows": "five_hour", "pacing": [], "enabled": False},
    ])
    assert entries is not None
    default, a, b = entries
    assert default == ZaiQuota("default")
    assert (a.enabled, a.fresh, a.stale, a.plan_tier, a.sample_age_s, a.polls) == (
        True, None, None, None, None, {})
    assert a.windows == (QuotaWindow("five_hour", None), QuotaWindow("weekly", 1.0))
    assert a.pacing == QuotaPacing(False)  # only JSON true counts
    assert a.is_stale  # no sample, and nothing said: not trusted
    assert (b.enabled, b.windows, b.pacing) == (False, (), None)
    assert parse_upstreams(None) is None
    assert parse_upstreams([{"alias": "x", "index": "0", "resting": "true",
                             "pinned_clients": "ci", "headroom": 7}, {"alias": None}]) == (
        UpstreamKey("x", headroom=1.0),)


@pytest.mark.parametrize(("entry", "stale"), [
    (ZaiQuota("a", sample_age_s=899.0), False),  # the proxy's default stale_after: 900 s
    (ZaiQuota("a", sample_age_s=901.0), True),
    (ZaiQuota("a", sample_age_s=61.0, stale_after_s=60.0), True),
    (ZaiQuota("a", sample_age_s=5000.0, stale=False), False),  # the proxy's word wins
    (ZaiQuota("a", sample_age_s=1.0, fresh=False), True),
    (ZaiQuota("a"), True),  # never sampled
])
def test_a_sample_is_stale_by_the_proxys_word_else_by_its_age(entry: ZaiQuota,
                                                              stale: bool) -> None:
    """Prometheus and a collector's status carry no staleness: the sample's age decides."""
    assert entry.is_stale is stale


# ---- timeline, total, weighted ----------------------------------------------------------------


def pt(t: float, requests: float | None = 1.0, seconds: float = 10.0, **kw: Any) -> Point:
    return Point(t=t, seconds=seconds, requests=requests, **kw)


def history_of(series: dict[str, tuple[Point, ...]], end: float) -> History:
    return History("5m", end - 300, end, 10.0, series, "raw")


def test_timeline_is_history_then_live_points_after_its_end() -> None:
    h = history_of({"production": (pt(80), pt(90), pt(100)), "canary": (pt(95),)}, end=100)
    live = [pt(96, 7.0), pt(100, 7.0), pt(102, 7.0), pt(104, 7.0)]
    got = timeline(h, "production", live, start=0, end=200)
    assert [(p.t, p.requests) for p in got] == [(80, 1.0), (90, 1.0), (100, 1.0), (102, 7.0),
                                                (104, 7.0)]


def test_timeline_clips_to_the_range() -> None:
    h = history_of({"production": (pt(80), pt(90), pt(100))}, end=100)
    live = [pt(102), pt(104), pt(106)]
    assert [p.t for p in timeline(h, "production", live, start=90, end=104)] == [90, 100, 102,
                                                                                   104]


def test_timeline_per_variant_and_without_history() -> None:
    h = history_of({"production": (pt(80),), "canary": (pt(85),)}, end=100)
    assert [p.t for p in timeline(h, "canary", [pt(101)], 0, 200)] == [85, 101]
    assert [p.t for p in timeline(h, "unknown", [pt(99), pt(101)], 0, 200)] == [101]
    assert [p.t for p in timeline(None, "production", [pt(50), pt(99)], 60, 200)] == [99]


def test_total_is_rate_times_interval_and_none_when_unknown() -> None:
    points = [pt(10, 2.0, seconds=5.0), pt(12, None, seconds=2.0), pt(14, 4.0, seconds=2.0)]
    assert total(points, "requests") == 18.0
    assert total(points, "r5xx") is None
    assert total([], "requests") is None
    assert total([pt(1, 0.0)], "requests") == 0.0


def test_weighted_mean_by_requests() -> None:
    points = [pt(10, 1.0, seconds=10.0, latency_p95=1.0),
              pt(20, 3.0, seconds=10.0, latency_p95=2.0),
              pt(30, 0.0, seconds=10.0, latency_p95=9.0),  # no requests: no weight
              pt(40, None, seconds=10.0, latency_p95=9.0),
              pt(50, 5.0, seconds=10.0)]  # unknown value: no weight
    assert weighted(points, "latency_p95") == pytest.approx((1 * 1 + 3 * 2) / 4)
    assert weighted(points[2:], "latency_p95") is None


def test_error_rate() -> None:
    assert pt(0, 10.0, r5xx=1.0).error_rate == pytest.approx(0.1)
    assert pt(0, 0.0, r5xx=0.0).error_rate == 0.0
    assert pt(0, None, r5xx=1.0).error_rate is None
    assert pt(0, 4.0).error_rate is None


def test_non_finite_numbers_are_unknown() -> None:
    doc = copy.deepcopy(metrics_doc())
    doc["variants"]["production"]["rates"]["requests_per_s"] = math.inf
    doc["variants"]["production"]["rates"]["latency_p50_s"] = math.nan
    doc["variants"]["production"]["rates"]["errors_per_s"] = True
    p = parse_snapshot(doc).variants["production"].rates
    assert p is not None
    assert (p.requests, p.latency_p50, p.r5xx) == (None, None, None)


def test_fleet_keys_answer_lists_failed_targets() -> None:
    doc = {"mode": "fleet", "source": "collector", "adaptive": None,
           "targets": [{"target": "http://a:1", "ok": True, "error": None},
                       {"target": "http://b:1", "ok": False, "error": "HTTP 401: wrong token"},
                       {"target": "http://c:1", "ok": False, "error": "timed out after 5s"}],
           "keys": [{"alias": "alice", "enabled": True, "state": "limited",
                     "limited_by": ["requests_per_minute"],
                     "now": {"requests_per_minute": {"limit": 3, "remaining": 0,
                                                     "reset_s": 20.0}},
                     "usage": {"requests": 5, "input_tokens": 40, "output_tokens": 9}}],
           "global": {"concurrency": {"limit": 8, "in_use": 2, "remaining": 6}}}
    report = parse_keys(doc)
    assert (report.mode, report.adaptive, report.targets) == ("fleet", None, 3)
    assert report.targets_failed == ("http://b:1: HTTP 401: wrong token",
                                     "http://c:1: timed out after 5s")
    (alice,) = report.keys
    assert (alice.alias, alice.state, alice.limited_by, alice.requests, alice.input_tokens) \
        == ("alice", "limited", ("requests_per_minute",), 5, 40)
    assert alice.limits == (LimitState("requests_per_minute", 3, 0, None, 20.0),)
    assert report.limits == (LimitState("concurrency", 8, 6, 2, None),)
    # A proxy's answer has no targets; a fleet whose targets all answered has none failed.
    assert parse_keys(keys_doc()).targets_failed == ()
    doc["targets"] = doc["targets"][:1]
    assert (parse_keys(doc).targets, parse_keys(doc).targets_failed) == (1, ())


# ---- variant names ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["production", "canary", "both", "test", "v2", "stable",
                                  "canary-2", "a_b", "x" * 32])
def test_variant_mode_takes_the_keywords_and_any_variant_name(text: str) -> None:
    assert variant_mode(text) == text


@pytest.mark.parametrize("text", ["", "Test", "-canary", "canary!", "a b", "x" * 33, ".+"])
def test_variant_mode_refuses_what_is_no_label_value(text: str) -> None:
    with pytest.raises(ValueError, match="neither production, canary, both nor a variant name"):
        variant_mode(text)


def test_variant_names_are_the_proxys_deployment_variants() -> None:
    """The UI may not import the proxy (pyproject.toml's contracts): its copy of the rule
    must stay the one DEPLOYMENT_VARIANT is checked with."""
    from zaiproxy.core import config_values

    assert VARIANT_NAME.pattern == config_values._VARIANT_RE.pattern
    for text in ("test", "Test", "v2", "-x", "x" * 32, "x" * 33, "a.b"):
        try:
            config_values.variant(text, True)
        except config_values.Invalid:
            assert VARIANT_NAME.fullmatch(text) is None, text
        else:
            assert VARIANT_NAME.fullmatch(text), text


def test_the_variant_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args([]).variant == "production"
    for text in ("both", "canary", "test"):
        assert parse_args(["--variant", text]).variant == text
    with pytest.raises(SystemExit) as exited:
        parse_args(["--variant", "Canary!"])
    assert exited.value.code == 2
    assert "argument --variant: 'Canary!' is neither production, canary, both nor a variant " \
        "name" in capsys.readouterr().err
