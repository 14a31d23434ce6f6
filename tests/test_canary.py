"""``zaiproxy canary-check``: the pure verdict, the sources' reductions (a collector, the
proxies' own admin APIs, Prometheus), the command.

The decision is tested without a socket (``decide`` on ``Window`` aggregates); the command
is tested against a scripted HTTP source on port 0 (the seam is HTTP, never our classes);
the usage-missing counter through the real shared-memory metrics. Real proxies, a real
Prometheus and a real collector are in ``test_canary_procs.py``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import duckdb
import pytest

from tests.test_metrics import IMPLEMENTATIONS, Host, rec, scrape
from zaiproxy.cli import build_parser
from zaiproxy.core.record import Usage
from zaiproxy.fleet import promql
from zaiproxy.fleet.canary import (
    EXIT_PROMOTE,
    EXIT_ROLL_BACK,
    EXIT_WAIT,
    Decision,
    Status,
    Thresholds,
    Verdict,
    decide,
    render_text,
    run,
    thresholds_of,
)
from zaiproxy.fleet.canary_sources import (
    ProxyAnswer,
    SourceError,
    Window,
    from_collector,
    from_prometheus,
    from_proxies,
    prometheus_queries,
    proxy_variant,
    variant_names,
)
from zaiproxy.fleet.collector_store import _SCHEMA, Store, row_of
from zaiproxy.observe import snapshot
from zaiproxy.observe.snapshot import Counts, Rates

T = Thresholds()
PROD = Window(requests=1000, ok=990, server_errors=10, rate_limited=20, usage_missing=0,
              latency_p95=0.2, ttft_p95=0.1, targets=3)
GOOD = Window(requests=100, ok=99, server_errors=1, rate_limited=2, usage_missing=0,
              latency_p95=0.25, ttft_p95=0.12, targets=2)


def statuses(d: Decision) -> dict[str, Status]:
    return {s.name: s.status for s in d.signals}


def signal(d: Decision, name: str) -> Any:
    (found,) = [s for s in d.signals if s.name == name]
    return found


# ---- the verdict (pure) ----------------------------------------------------------------


def test_a_good_canary_is_promoted() -> None:
    d = decide(GOOD, PROD, T)
    assert d.verdict is Verdict.PROMOTE and d.verdict.exit_code == EXIT_PROMOTE == 0
    assert d.reason == "every signal is within its threshold"
    assert list(statuses(d)) == ["targets", "requests", "error_rate", "latency_p95",
                                 "ttft_p95", "rate_limited", "usage_missing"]
    assert set(statuses(d).values()) == {Status.OK}


# Each signal alone, just over its threshold, rolls back; just at it, does not.
BAD_ALONE = [
    ("error_rate", dict(server_errors=11), "canary answered 11.0% of API requests with 5xx, "
     "above 10.0% (production 1.0%)"),
    ("latency_p95", dict(latency_p95=0.41), "canary p95 latency 0.410s is 2.05x production's "
     "0.200s, above 2x"),
    ("ttft_p95", dict(ttft_p95=0.201), "canary p95 time to first token 0.201s is 2.01x "
     "production's 0.100s, above 2x"),
    ("rate_limited", dict(rate_limited=8), "canary 429 share 8.0% vs production's 2.0%: "
     "6.0 points higher, more than 5"),
    ("usage_missing", dict(usage_missing=50), "50.5% of canary's successful requests came "
     "without usage from upstream (production 0.0%): token counting is broken, above 50.0%"),
    ("targets", dict(targets=3, targets_down=2), "2 of 3 canary targets down (66.7%), more "
     "than 50.0%"),
]
AT_THRESHOLD = [
    ("error_rate", dict(server_errors=10)),
    ("latency_p95", dict(latency_p95=0.4)),
    ("ttft_p95", dict(ttft_p95=0.2)),
    ("rate_limited", dict(rate_limited=7)),  # 7 % - 2 % = exactly 5 points
    ("usage_missing", dict(usage_missing=49.5)),  # exactly 50 % of 99
    ("targets", dict(targets=2, targets_down=1)),  # exactly half
]


@pytest.mark.parametrize(("name", "change", "reason"), BAD_ALONE,
                         ids=[b[0] for b in BAD_ALONE])
def test_each_signal_alone_rolls_back(name: str, change: dict[str, Any], reason: str) -> None:
    d = decide(replace(GOOD, **change), PROD, T)
    assert d.verdict is Verdict.ROLL_BACK and d.verdict.exit_code == EXIT_ROLL_BACK == 1
    assert d.reason == f"bad: {name}"
    assert {n for n, s in statuses(d).items() if s is not Status.OK} == {name}
    assert signal(d, name).reason == reason


@pytest.mark.parametrize(("name", "change"), AT_THRESHOLD, ids=[a[0] for a in AT_THRESHOLD])
def test_at_the_threshold_is_still_ok(name: str, change: dict[str, Any]) -> None:
    d = decide(replace(GOOD, **change), PROD, T)
    assert d.verdict is Verdict.PROMOTE, signal(d, name)
    assert signal(d, name).status is Status.OK


def test_several_bad_signals_are_all_named() -> None:
    d = decide(replace(GOOD, server_errors=50, latency_p95=5.0, targets_down=2), PROD, T)
    assert d.verdict is Verdict.ROLL_BACK
    assert d.reason == "bad: targets, error_rate, latency_p95"


@pytest.mark.parametrize(("canary", "production", "reason"), [
    (replace(GOOD, requests=49), PROD, "not enough traffic: canary has 49 requests in the "
     "window, fewer than --min-requests 50"),
    (GOOD, replace(PROD, requests=3), "not enough traffic: production has 3 requests in the "
     "window, fewer than --min-requests 50"),
    (replace(GOOD, requests=0, ok=0), replace(PROD, requests=0), "not enough traffic: canary "
     "has 0 and production has 0 requests in the window, fewer than --min-requests 50"),
    (replace(GOOD, targets=0), PROD, "no canary targets: is the canary deployed and scraped?"),
])
def test_wait_for_data(canary: Window, production: Window, reason: str) -> None:
    d = decide(canary, production, T)
    assert d.verdict is Verdict.WAIT and d.verdict.exit_code == EXIT_WAIT == 2
    assert d.reason == reason


def test_too_little_traffic_makes_every_request_signal_no_data() -> None:
    # 3 requests, all 5xx: a bad share of nothing is not evidence yet.
    d = decide(Window(requests=3, server_errors=3, latency_p95=9.0, targets=1), PROD, T)
    assert d.verdict is Verdict.WAIT
    assert statuses(d) == {"targets": Status.OK, **dict.fromkeys(
        ["requests", "error_rate", "latency_p95", "ttft_p95", "rate_limited", "usage_missing"],
        Status.NO_DATA)}
    assert signal(d, "error_rate").reason == "not enough requests to judge (see requests)"


def test_targets_down_roll_back_even_without_traffic() -> None:
    # Pods that crash get no traffic: waiting for requests would wait forever.
    d = decide(Window(targets=2, targets_down=2), PROD, T)
    assert d.verdict is Verdict.ROLL_BACK and d.reason == "bad: targets"


def test_usage_missing_everywhere_is_not_the_canarys_doing() -> None:
    d = decide(replace(GOOD, usage_missing=99), replace(PROD, usage_missing=900), T)
    assert d.verdict is Verdict.PROMOTE
    assert signal(d, "usage_missing").reason.endswith(
        "production too, so upstream sends none to either (not the canary's doing)")


def test_signals_without_data_are_shown_but_do_not_block() -> None:
    d = decide(replace(GOOD, usage_missing=None, ttft_p95=None), PROD, T)
    assert d.verdict is Verdict.PROMOTE
    assert d.reason == ("every signal is within its threshold "
                        "(no data for ttft_p95, usage_missing)")
    assert signal(d, "ttft_p95").reason == "no p95 time to first token observed for canary"
    assert signal(d, "usage_missing").status is Status.NO_DATA
    d = decide(replace(GOOD, ok=0, usage_missing=0), PROD, T)
    assert signal(d, "usage_missing").reason == "no successful requests for canary"


def test_a_production_p95_of_zero() -> None:
    zero = replace(PROD, latency_p95=0.0)
    assert signal(decide(replace(GOOD, latency_p95=0.0), zero, T), "latency_p95").status \
        is Status.OK
    assert signal(decide(GOOD, zero, T), "latency_p95").status is Status.BAD


# ---- thresholds from flags ---------------------------------------------------------------


def args(*extra: str) -> Any:
    return build_parser().parse_args(["canary-check", "--prometheus", "http://p:9090", *extra])


def test_defaults_are_the_runbooks() -> None:
    ns = args()
    assert thresholds_of(ns) == Thresholds(max_error_rate=0.10, max_latency_ratio=2.0,
                                           max_ttft_ratio=2.0, max_429_increase=0.05,
                                           max_targets_down=0.5, max_usage_missing=0.5,
                                           min_requests=50)
    # canary None: the one variant besides production that the source has (variant_names).
    assert (ns.window, ns.production, ns.canary, ns.json, ns.timeout) == \
        (600.0, "production", None, False, 10.0)


@pytest.mark.parametrize(("flag", "value", "field", "expected", "flips"), [
    ("--max-error-rate", "20%", "max_error_rate", 0.2, dict(server_errors=15)),
    ("--max-error-rate", "0.2", "max_error_rate", 0.2, dict(server_errors=15)),
    ("--max-latency-ratio", "3", "max_latency_ratio", 3.0, dict(latency_p95=0.5)),
    ("--max-ttft-ratio", "1.5", "max_ttft_ratio", 1.5, dict(ttft_p95=0.16)),
    ("--max-429-increase", "10%", "max_429_increase", 0.1, dict(rate_limited=10)),
    ("--max-targets-down", "1", "max_targets_down", 1.0, dict(targets_down=2)),
    ("--max-usage-missing", "0.9", "max_usage_missing", 0.9, dict(usage_missing=80)),
    ("--min-requests", "200", "min_requests", 200, dict()),
])
def test_each_threshold_comes_from_its_flag(flag: str, value: str, field: str, expected: float,
                                            flips: dict[str, Any]) -> None:
    t = thresholds_of(args(flag, value))
    assert getattr(t, field) == expected
    assert replace(T, **{field: expected}) == t  # that flag and no other
    # The flag changes the verdict: bad (or wait) with the default, not with the flag
    # (--max-ttft-ratio and --min-requests are stricter, so the other way round).
    canary = replace(GOOD, **flips)
    default, flagged = decide(canary, PROD, T).verdict, decide(canary, PROD, t).verdict
    if flag == "--max-ttft-ratio":
        assert (default, flagged) == (Verdict.PROMOTE, Verdict.ROLL_BACK)
    elif flag == "--min-requests":
        assert (default, flagged) == (Verdict.PROMOTE, Verdict.WAIT)
    else:
        assert (default, flagged) == (Verdict.ROLL_BACK, Verdict.PROMOTE)


@pytest.mark.parametrize("extra", [
    ["--max-error-rate", "150%"], ["--max-error-rate", "lots"], ["--max-latency-ratio", "0"],
    ["--max-ttft-ratio", "inf"], ["--min-requests", "-1"], ["--window", "soon"],
    ["--canary", "Canary!"], ["--url", "http://c:9100"],
])
def test_bad_flags_exit_2(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        args(*extra)
    assert exc.value.code == 2
    assert "canary-check: error:" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["canary-check", "--help"])
    out = capsys.readouterr().out
    for line in ("0  PROMOTE", "1  ROLL BACK", "2  WAIT"):
        assert line in out


# ---- output -------------------------------------------------------------------------------


def test_text_output_has_one_line_per_signal() -> None:
    d = decide(replace(GOOD, server_errors=30, targets_down=1), PROD, T)
    lines = render_text(d, "canary 'canary' vs production 'production' over 60s").splitlines()
    assert lines[:2] == ["ROLL BACK: bad: error_rate",
                         "canary 'canary' vs production 'production' over 60s"]
    table = [line.split("  ") for line in lines[2:]]
    cells = [[c.strip() for c in row if c.strip()] for row in table]
    assert cells[0] == ["signal", "canary", "production", "threshold", "status", "reason"]
    assert [c[0] for c in cells[1:]] == ["targets", "requests", "error_rate", "latency_p95",
                                         "ttft_p95", "rate_limited", "usage_missing"]
    by_name = {c[0]: c[1:] for c in cells[1:]}
    assert by_name["error_rate"] == ["30.0%", "1.0%", "> 10.0%", "bad",
                                     "canary answered 30.0% of API requests with 5xx, above "
                                     "10.0% (production 1.0%)"]
    assert by_name["targets"] == ["1/2 down", "0/3 down", "> 50.0% down", "ok",
                                  "1 of 2 canary targets down, not more than 50.0%"]
    assert by_name["latency_p95"][:4] == ["0.250s", "0.200s", "> 2x production", "ok"]
    assert by_name["requests"][:4] == ["100", "1000", ">= 50 each", "ok"]
    # The columns line up: every status starts where the header's does.
    column = lines[2].index("status")
    assert {line[column:].split()[0] for line in lines[3:]} <= {"ok", "bad", "no-data"}


# ---- the collector's answer -> Window ---------------------------------------------------


def point(t: float, rps: float, **kw: Any) -> dict[str, Any]:
    base = {"t": t, "targets": 1, "requests_per_s": rps, "ok_per_s": rps, "errors_per_s": 0.0,
            "rate_limited_per_s": 0.0, "usage_missing_per_s": 0.0, "latency_p95_s": 0.1,
            "ttft_p95_s": 0.05}
    base.update(kw)
    return base


def test_from_collector_counts_the_part_of_each_step_inside_the_window() -> None:
    status = {"variants": {"canary": {"targets": 4, "stale_targets": 1},
                           "production": {"targets": 2, "stale_targets": 0}}}
    history = {"source": "collector", "step_s": 5, "from": 0, "to": 1000, "series": {
        "canary": [
            point(980, 100),  # before the window (ends at 985 <= 990): left out
            point(985, 10, errors_per_s=5, latency_p95_s=1.0),  # 5 s of 985-990: 0
            point(988, 2, errors_per_s=2, latency_p95_s=9.0),  # only 988-993 exists: 3 s in
            point(990, 4, rate_limited_per_s=1, usage_missing_per_s=2, latency_p95_s=0.2,
                  ttft_p95_s=None),
            point(995, 8, latency_p95_s=0.5, ttft_p95_s=0.3),
        ],
        "production": [point(995, 20, ok_per_s=19, errors_per_s=1)],
    }}
    w = from_collector(status, history, 10, ("production", "canary"))
    c, p = w["canary"], w["production"]
    assert c.requests == pytest.approx(2 * 3 + 4 * 5 + 8 * 5)
    assert c.server_errors == pytest.approx(2 * 3)
    assert c.rate_limited == pytest.approx(5) and c.usage_missing == pytest.approx(10)
    assert c.ok == pytest.approx(c.requests)
    # The request-weighted mean of the steps' p95s.
    assert c.latency_p95 == pytest.approx((9.0 * 6 + 0.2 * 20 + 0.5 * 40) / 66)
    assert c.ttft_p95 == pytest.approx((0.05 * 6 + 0.3 * 40) / 46)
    assert (c.targets, c.targets_down, p.targets, p.targets_down) == (4, 1, 2, 0)
    assert p.requests == pytest.approx(100) and p.server_errors == pytest.approx(5)


def test_from_collector_without_the_variant_or_the_counter() -> None:
    history = {"source": "collector", "step_s": 5, "to": 100, "series": {
        "production": [{k: v for k, v in point(95, 10).items() if k != "usage_missing_per_s"}]}}
    w = from_collector({"variants": {}}, history, 60, ("production", "canary"))
    assert w["canary"] == Window(latency_p95=None, ttft_p95=None)
    assert w["production"].usage_missing is None  # an older collector: not reported


def test_from_collector_refuses_a_single_proxys_history() -> None:
    with pytest.raises(SourceError, match="not a fleet collector"):
        from_collector({"variants": {}}, {"source": "recorder", "series": {}}, 60, ("a", "b"))


# ---- Prometheus' answers -> Window --------------------------------------------------------


def vec(**by_variant: str) -> list[dict[str, Any]]:
    return [{"metric": {"variant": v}, "value": [1.0, x]} for v, x in by_variant.items()]


def prom_answers(**overrides: Any) -> dict[str, Any]:
    answers: dict[str, Any] = {
        "requests": vec(production="1000", canary="99.5"), "ok": vec(production="990"),
        "server_errors": vec(canary="20.1"), "rate_limited": [],
        "usage_missing": vec(canary="3"),
        "latency_p95": vec(production="0.2", canary="NaN"), "ttft_p95": vec(canary="0.5"),
        "up": [], "targets": [
            {"metric": {"variant": "canary", "instance": "a:1", "job": "z"}, "value": [1, "1"]},
            {"metric": {"variant": "canary", "instance": "b:1", "job": "z"}, "value": [1, "0"]},
            {"metric": {"variant": "production", "instance": "c:1", "job": "z"},
             "value": [1, "1"]},
            {"metric": {"variant": "nightly", "instance": "d:1", "job": "z"}, "value": [1, "1"]},
        ]}
    answers.update(overrides)
    return answers


def test_from_prometheus() -> None:
    w = from_prometheus(prom_answers(), ("production", "canary"))
    assert w["canary"] == Window(requests=99.5, server_errors=20.1, usage_missing=3.0,
                                 latency_p95=None, ttft_p95=0.5, targets=2, targets_down=1)
    assert w["production"] == Window(requests=1000, ok=990, latency_p95=0.2, targets=1)


def test_from_prometheus_prefers_up_labelled_with_the_variant() -> None:
    up = [{"metric": {"variant": "canary", "instance": f"p{i}"}, "value": [1, v]}
          for i, v in enumerate("1000")]
    w = from_prometheus(prom_answers(up=up), ("production", "canary"))
    assert (w["canary"].targets, w["canary"].targets_down) == (4, 3)
    assert w["production"].targets == 0


def test_prometheus_queries_use_the_real_metric_names() -> None:
    q = prometheus_queries(90, ("production", "canary-2"))
    api = 'variant=~"production|canary-2",path!~"/metrics|/health|/ready|/admin.*"'
    assert q["requests"] == f"sum by (variant) (increase(zai_proxy_requests_total{{{api}}}[90000ms]))"
    assert q["server_errors"].endswith(f'{{{api},status=~"5.."}}[90000ms]))')
    assert q["rate_limited"].endswith(f'{{{api},status="429"}}[90000ms]))')
    assert q["latency_p95"] == ("histogram_quantile(0.95, sum by (variant, le) (rate("
                                f"zai_proxy_request_duration_seconds_bucket{{{api}}}[90000ms])))")
    assert "zai_proxy_time_to_first_token_seconds_bucket" in q["ttft_p95"]
    assert "zai_proxy_usage_missing_total" in q["usage_missing"]
    assert "last_over_time(zai_proxy_build_info" in q["targets"]


# ---- a proxy's answers -> Window ------------------------------------------------------------

END = "2027-01-15T08:10:00Z"  # the history's range end (1_800_000_600)
T_END = 1_800_000_600.0


def proxy_status(variant: str) -> dict[str, Any]:
    """A proxy's /admin/status as it answers (captured, shortened): its one variant."""
    return {"time": T_END, "source": "proxy", "worker": 0, "ledger": "native",
            "variants": {variant: {"variant": variant, "requests": 0.0, "responses_2xx": 0.0,
                                   "responses_5xx": 0.0, "usage_missing": 0.0}}}


def bucket(t: float, requests: int, **kw: Any) -> dict[str, Any]:
    """One history point as the recorder answers it (captured, the fields canary-check
    reads and a few it does not)."""
    p = {"t": t, "time": "-", "requests": requests, "errors": 0, "latency_ms_avg": 80.0,
         "latency_ms_p95": 100.0, "latency_ms_max": 150.0, "input_tokens": 8 * requests,
         "output_tokens": 5 * requests, "cost_usd": 0.0, "error_rate": 0.0,
         "responses_2xx": requests, "responses_4xx": 0, "responses_5xx": 0,
         "responses_429": 0, "latency_ms_p50": 50.0, "latency_ms_p99": 150.0,
         "ttft_ms_p50": 20.0, "ttft_ms_p95": 40.0, "ttft_ms_p99": 45.0, "retries": 0,
         "zai_errors": 0, "upstream_errors": 0, "rejections": 0, "usage_missing": 0}
    p.update(kw)
    return p


def proxy_history(variant: str, points: list[dict[str, Any]], *, resolution: float = 5.0,
                  range_: str = "5m", source: str = "raw") -> dict[str, Any]:
    """A proxy's /admin/history?range=..&variant=NAME: the recorder's series and summary."""
    series = {"range": {"start": "2027-01-15T08:05:00Z", "end": END, "seconds": 300.0},
              "variant": variant, "resolution_s": resolution, "source": source,
              "p95": "exact", "p50_p99": "exact",
              "fields_null_in_rollup": ["latency_ms_p50", "usage_missing"],
              "series": {variant: points} if points else {}}
    return {"range": range_, "variant": variant, "series": series,
            "summary": {"rows": [], "total": {}}}


def up(url: str, variant: str, points: list[dict[str, Any]], **kw: Any) -> ProxyAnswer:
    return ProxyAnswer(url, variant, proxy_history(variant, points, **kw))


def test_from_proxies_sums_each_variants_proxies_inside_the_window() -> None:
    start = T_END - 60
    answers = [
        up("http://p1", "production", [
            bucket(start - 10, 500),  # before the window: left out
            bucket(start - 3, 400),  # 2 of its 5 s inside: most of it outside, left out
            bucket(start - 2, 2, responses_2xx=1, responses_5xx=1,  # 3 of 5 s: in
                   latency_ms_p95=900.0),
            bucket(T_END - 5, 10, responses_2xx=8, responses_429=2, usage_missing=3,
                   ttft_ms_p95=None),
        ]),
        ProxyAnswer("http://c1", "canary", proxy_history("canary", [
            bucket(T_END - 30, 20, responses_5xx=5, responses_2xx=15, latency_ms_p95=300.0,
                   ttft_ms_p95=80.0)])),
        up("http://p2", "production", [bucket(T_END - 10, 8, latency_ms_p95=200.0)]),
    ]
    w = from_proxies(answers, 60, ("production", "canary"))
    p, c = w["production"], w["canary"]
    assert (p.requests, p.ok, p.server_errors, p.rate_limited, p.usage_missing) == (
        20, 17, 1, 2, 3)
    # Request-weighted mean of the buckets' p95s, in seconds, over both proxies.
    assert p.latency_p95 == pytest.approx((0.9 * 2 + 0.1 * 10 + 0.2 * 8) / 20)
    assert p.ttft_p95 == pytest.approx((0.04 * 2 + 0.04 * 8) / 10)
    assert (p.targets, p.targets_down) == (2, 0)
    assert c == Window(requests=20, ok=15, server_errors=5, usage_missing=0,
                       latency_p95=0.3, ttft_p95=0.08, targets=1)
    assert decide(c, p, replace(T, min_requests=10)).reason == "bad: error_rate"


def test_from_proxies_a_dead_proxy_is_down_for_the_variant_without_an_answer() -> None:
    answers = [up("http://p1", "production", [bucket(T_END - 5, 100)]),
               ProxyAnswer("http://c1", why="cannot reach http://c1/admin/status: refused")]
    w = from_proxies(answers, 60, ("production", "canary"))
    assert w["canary"] == Window(latency_p95=None, ttft_p95=None, targets=1, targets_down=1)
    assert (w["production"].targets, w["production"].targets_down) == (1, 0)
    d = decide(w["canary"], w["production"], T)
    assert (d.verdict, d.reason) == (Verdict.ROLL_BACK, "bad: targets")
    # The same with the canary answering and production's only proxy dead: production's.
    answers = [ProxyAnswer("http://p1", why="timed out"), up("http://c1", "canary", [])]
    w = from_proxies(answers, 60, ("production", "canary"))
    assert (w["production"].targets_down, w["canary"].targets_down) == (1, 0)


@pytest.mark.parametrize(("answers", "message"), [
    # Both variants answer: the dead third URL could be either's.
    ([up("http://p1", "production", []), up("http://c1", "canary", []),
      ProxyAnswer("http://x", why="refused")],
     "http://x did not answer (refused) and both variants have a proxy that did: cannot "
     "tell whose target it is"),
    ([ProxyAnswer("http://p1", why="refused"), ProxyAnswer("http://c1", why="timed out")],
     "no --url answered: refused; timed out"),
    ([up("http://p1", "production", []), up("http://n1", "nightly", [])],
     "http://n1 serves variant 'nightly', neither production 'production' nor canary "
     "'canary'"),
])
def test_from_proxies_inconclusive(answers: list[ProxyAnswer], message: str) -> None:
    with pytest.raises(SourceError) as exc:
        from_proxies(answers, 60, ("production", "canary"))
    assert str(exc.value).startswith(message), exc.value


def test_from_proxies_usage_missing_unknown_from_rollups_or_an_older_proxy() -> None:
    old = bucket(T_END - 5, 60)
    del old["usage_missing"]
    rollup = bucket(T_END - 60, 60, usage_missing=None, ttft_ms_p95=None)
    w = from_proxies([up("http://p", "production", [old]),
                      up("http://c", "canary", [rollup], resolution=60.0, source="rollup")],
                     60, ("production", "canary"))
    assert w["production"].usage_missing is None and w["canary"].usage_missing is None
    assert w["canary"].requests == 60 and w["canary"].ttft_p95 is None
    assert signal(decide(w["canary"], w["production"], T), "usage_missing").status is \
        Status.NO_DATA


def test_proxy_variant_is_the_one_its_status_names() -> None:
    assert proxy_variant("http://c", proxy_status("canary")) == "canary"
    for variants in ({}, {"a": {}, "b": {}}):
        with pytest.raises(SourceError, match="cannot tell which variant"):
            proxy_variant("http://c", {"source": "proxy", "variants": variants})


# ---- the command against a scripted source -------------------------------------------------


Answer = tuple[int, bytes] | Callable[[str], tuple[int, bytes]]


class Scripted(BaseHTTPRequestHandler):
    """Answers ``routes[path]``: (status, body), or a function of the full target giving
    them; records what it was asked and with which authorization."""

    routes: dict[str, Answer] = {}
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.seen.append((self.path, self.headers.get("authorization")))
        answer = self.routes.get(path, (404, b'{"error": {"message": "no route"}}'))
        status, body = answer(self.path) if callable(answer) else answer
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


Scripts = Callable[[], tuple[str, type[Scripted]]]


@pytest.fixture
def scripted() -> Iterator[Scripts]:
    """Start scripted HTTP sources on port 0, as many as a test asks for."""
    running: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start() -> tuple[str, type[Scripted]]:
        handler = type("Handler", (Scripted,), {"routes": {}, "seen": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        running.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}", handler

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def source(scripted: Scripts) -> tuple[str, type[Scripted]]:
    return scripted()


def collector_answers(canary_errors: float) -> dict[str, tuple[int, bytes]]:
    status = {"source": "collector", "variants": {
        "canary": {"targets": 1, "stale_targets": 0},
        "production": {"targets": 1, "stale_targets": 0}}}
    history = {"source": "collector", "step_s": 5, "to": 1000.0, "series": {
        "canary": [point(t, 2, errors_per_s=canary_errors) for t in range(940, 1000, 5)],
        "production": [point(t, 2) for t in range(940, 1000, 5)]}}
    return {"/admin/status": (200, json.dumps(status).encode()),
            "/admin/history": (200, json.dumps(history).encode())}


def command(*argv: str) -> tuple[int, str, str]:
    ns = build_parser().parse_args(["canary-check", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = run(ns, out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(("errors", "min_requests", "code", "verdict"), [
    (0.0, "50", 0, "PROMOTE"), (1.0, "50", 1, "ROLL BACK"), (0.0, "500", 2, "WAIT")])
def test_command_against_a_collector(source: tuple[str, type[Scripted]], errors: float,
                                     min_requests: str, code: int, verdict: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = source
    handler.routes.update(collector_answers(errors))
    monkeypatch.setenv("ZAIPROXY_ADMIN_TOKEN", "from-env")
    got, out, err = command("--url", url + "/", "--window", "1m", "--min-requests",
                            min_requests)
    assert (got, err) == (code, "")
    assert out.startswith(f"{verdict}: ")
    assert handler.seen == [("/admin/status", "Bearer from-env"),
                            ("/admin/history?range=5m&variant=all", "Bearer from-env")]


def test_command_json(source: tuple[str, type[Scripted]]) -> None:
    url, handler = source
    handler.routes.update(collector_answers(1.0))
    code, out, _ = command("--url", url, "--window", "1m", "--token", "t", "--json",
                           "--max-error-rate", "20%")
    doc = json.loads(out)
    assert code == doc["exit_code"] == 1 and doc["verdict"] == "ROLL BACK"
    assert doc["reason"] == "bad: error_rate"
    assert doc["source"] == {"kind": "collector", "url": url}
    assert (doc["window_s"], doc["canary"], doc["production"]) == (60, "canary", "production")
    assert doc["thresholds"]["max_error_rate"] == 0.2
    (err,) = [s for s in doc["signals"] if s["name"] == "error_rate"]
    assert err == {"name": "error_rate", "status": "bad", "canary": 0.5, "production": 0.0,
                   "threshold": "> 20.0%", "limit": 0.2, "reason": err["reason"]}
    assert doc["variants"]["canary"]["requests"] == pytest.approx(120)
    assert handler.seen[0][1] == "Bearer t"


def scripted_prometheus(handler: type[Scripted], answers: dict[str, Any],
                        names: tuple[str, str], window_s: float = 60) -> list[str]:
    """Prometheus' query API answering ``answers`` by query name: the variants it holds
    (``answers["variants"]``), then the queries of ``names``; the names asked, in order."""
    by_query = {q: k for k, q in prometheus_queries(window_s, names).items()}
    by_query[promql.present(window_s)] = "variants"
    asked: list[str] = []

    def query(target: str) -> tuple[int, bytes]:
        key = by_query[parse_qs(urlsplit(target).query)["query"][0]]
        asked.append(key)
        return 200, json.dumps({"status": "success", "data": {
            "resultType": "vector", "result": answers[key]}}).encode()

    handler.routes["/api/v1/query"] = query
    return asked


def renamed(answers: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """``answers`` with every series of variant ``old`` labelled ``new``."""
    return json.loads(json.dumps(answers).replace(f'"variant": "{old}"', f'"variant": "{new}"'))


def test_command_against_prometheus(source: tuple[str, type[Scripted]]) -> None:
    url, handler = source
    answers = prom_answers(ok=vec(production="990", canary="79"),
                           variants=vec(production="3", canary="2", nightly="1"))
    asked = scripted_prometheus(handler, answers, ("production", "canary"))
    code, out, err = command("--prometheus", url, "--window", "1m", "--token", "p",
                             "--canary", "canary")
    assert (code, err) == (1, "")
    assert out.splitlines()[0] == "ROLL BACK: bad: error_rate"
    assert out.splitlines()[1] == f"canary 'canary' vs production 'production' over 60s, " \
        f"from prometheus {url}"
    assert asked[0] == "variants" and sorted(asked[1:]) == sorted(prom_answers())
    assert {auth for _, auth in handler.seen} == {"Bearer p"}


# ---- variant names: the canary by any name ------------------------------------------------
# The original service's runbook calls its canary "test" (deployments also used "canary",
# "v2", "stable"); DEPLOYMENT_VARIANT takes any label value.


@pytest.mark.parametrize(("seen", "canary", "complete", "names"), [
    ({"production", "canary"}, None, True, ("production", "canary")),
    ({"production", "test"}, None, True, ("production", "test")),
    ({"production"}, None, True, ("production", "canary")),  # nothing deployed yet: WAIT
    (set(), None, True, ("production", "canary")),
    ({"production", "test"}, "test", True, ("production", "test")),
    # Others besides the two named are fine (a fleet runs several canaries at once).
    ({"production", "test", "v2"}, "test", True, ("production", "test")),
    # The named canary is not there and nothing else is: not deployed yet, or dead (WAIT,
    # or ROLL BACK on its dead proxy URL).
    ({"production"}, "test", True, ("production", "test")),
    # Part of the source did not answer: a missing name may be the dead URL's variant.
    ({"production", "canary"}, "test", False, ("production", "test")),
])
def test_variant_names(seen: set[str], canary: str | None, complete: bool,
                       names: tuple[str, str]) -> None:
    assert variant_names(seen, "production", canary, complete=complete) == names


@pytest.mark.parametrize(("seen", "production", "canary", "message"), [
    ({"production", "test", "v2"}, "production", None,
     "which is the canary? besides production 'production' the source has the variants "
     "'test', 'v2': name it with --canary"),
    ({"stable", "test"}, "production", None,
     "which is the canary? besides production 'production' the source has the variants 'stable', 'test': name it "
     "with --canary (none is 'production': name production's with --production too)"),
    ({"production", "test"}, "production", "canary",
     "the source has no variant 'canary' (it has 'production', 'test'): name the canary "
     "variant with --canary"),
    ({"stable", "test"}, "production", "test",
     "the source has no variant 'production' (it has 'stable', 'test'): name the production "
     "variant with --production"),
    ({"canary"}, "canary", None,
     "the source has no variant besides production 'canary': name the canary with --canary"),
])
def test_variant_names_that_cannot_be_right(seen: set[str], production: str,
                                            canary: str | None, message: str) -> None:
    with pytest.raises(SourceError) as failed:
        variant_names(seen, production, canary)
    assert str(failed.value) == message


def test_command_a_canary_named_test_against_prometheus(
        source: tuple[str, type[Scripted]]) -> None:
    url, handler = source
    answers = renamed(prom_answers(ok=vec(production="990", canary="79")), "canary", "test")
    answers["variants"] = vec(production="3", test="2")
    for extra in ([], ["--canary", "test"]):  # found, or named
        handler.seen.clear()
        asked = scripted_prometheus(handler, answers, ("production", "test"))
        code, out, err = command("--prometheus", url, "--window", "1m", "--json", *extra)
        doc = json.loads(out)
        assert (code, err, doc["verdict"], doc["reason"]) == (1, "", "ROLL BACK",
                                                             "bad: error_rate")
        assert (doc["canary"], doc["production"]) == ("test", "production")
        assert doc["variants"]["test"]["server_errors"] == pytest.approx(20.1)
        assert asked[0] == "variants" and len(asked) == len(prom_answers()) + 1
    # Asked as "canary" while Prometheus has it as "test": inconclusive, and says so.
    scripted_prometheus(handler, answers, ("production", "canary"))
    code, out, err = command("--prometheus", url, "--window", "1m", "--canary", "canary")
    assert (code, out) == (2, "")
    assert err == ("zaiproxy canary-check: inconclusive: the source has no variant 'canary' "
                   "(it has 'production', 'test'): name the canary variant with --canary\n")


def test_command_several_canaries_need_a_name(source: tuple[str, type[Scripted]]) -> None:
    url, handler = source
    answers = prom_answers(variants=vec(production="3", canary="1", test="1"))
    asked = scripted_prometheus(handler, answers, ("production", "canary"))
    code, out, err = command("--prometheus", url, "--window", "1m")
    assert (code, out, asked) == (2, "", ["variants"])
    assert err == ("zaiproxy canary-check: inconclusive: which is the canary? besides "
                   "production 'production' the source has the variants 'canary', 'test': "
                   "name it with --canary\n")
    code, out, err = command("--prometheus", url, "--canary", "canary", "--window", "1m")
    assert (code, err) == (1, "") and out.startswith("ROLL BACK: bad: error_rate")


@pytest.mark.parametrize("errors", [0.0, 1.0])
def test_command_a_canary_named_test_against_a_collector(
        source: tuple[str, type[Scripted]], errors: float) -> None:
    url, handler = source
    handler.routes.update({path: (code, body.replace(b'"canary"', b'"test"'))
                           for path, (code, body) in collector_answers(errors).items()})
    code, out, err = command("--url", url, "--window", "1m", "--token", "t", "--json")
    doc = json.loads(out)
    assert (code, err) == ((1, "") if errors else (0, ""))
    assert (doc["canary"], doc["verdict"]) == ("test", "ROLL BACK" if errors else "PROMOTE")
    assert doc["variants"]["test"]["requests"] == pytest.approx(120)
    assert set(doc["variants"]) == {"production", "test"}


def test_command_a_canary_named_test_against_two_proxies(scripted: Scripts) -> None:
    (prod, prod_h), (canary, canary_h) = scripted(), scripted()
    prod_h.routes.update(proxy_answers("production"))
    canary_h.routes.update(proxy_answers("test", errors=5))
    for extra in ([], ["--canary", "test"], ["--production", "production"]):
        code, out, err = command("--url", prod, "--url", canary, "--window", "1m", *extra)
        assert (code, err) == (1, ""), err
        assert out.splitlines()[:2] == [
            "ROLL BACK: bad: error_rate",
            f"canary 'test' vs production 'production' over 60s, from proxies {prod} "
            f"(production), {canary} (test)"]
    code, out, err = command("--url", prod, "--url", canary, "--canary", "canary")
    assert (code, out) == (2, "")
    assert err == ("zaiproxy canary-check: inconclusive: the source has no variant 'canary' "
                   "(it has 'production', 'test'): name the canary variant with --canary\n")


def test_command_names_are_label_values(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--canary", "--production"):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["canary-check", "--prometheus", "http://p", flag,
                                       'test"} or vector(1) #'])
        assert exited.value.code == 2
        assert f"argument {flag}: 'test\"}} or vector(1) #': must match " \
            "^[a-z0-9][a-z0-9_-]{0,31}$" in capsys.readouterr().err


@pytest.mark.parametrize(("route", "answer", "message"), [
    ("/admin/status", (401, b'{"error": {"message": "admin endpoint: missing or wrong admin '
                             b'token", "type": "x", "code": "unauthorized"}}'),
     "/admin/status: HTTP 401: admin endpoint: missing or wrong admin token "
     "(pass --token or set ZAIPROXY_ADMIN_TOKEN)"),
    ("/admin/status", (200, b"<html>hello</html>"), "/admin/status: the answer is not JSON"),
    ("/admin/history", (503, b'{"error": {"message": "history is unavailable"}}'),
     "HTTP 503: history is unavailable"),
    ("/admin/history", (200, b'{"source": "collector", "series": []}'), "unexpected answer"),
    ("/admin/history", (500, b"boom"), "HTTP 500: boom"),
])
def test_command_source_errors_are_inconclusive(source: tuple[str, type[Scripted]], route: str,
                                                answer: tuple[int, bytes],
                                                message: str) -> None:
    url, handler = source
    handler.routes.update(collector_answers(0.0))
    handler.routes[route] = answer
    code, out, err = command("--url", url, "--window", "1m")
    assert (code, out) == (2, "")
    assert err.startswith("zaiproxy canary-check: inconclusive: ") and message in err, err
    assert "Traceback" not in err


def test_command_prometheus_errors_are_inconclusive(source: tuple[str, type[Scripted]]) -> None:
    url, handler = source
    handler.routes["/api/v1/query"] = (400, b'{"status": "error", "errorType": "bad_data", '
                                            b'"error": "parse error at char 3"}')
    code, _, err = command("--prometheus", url)
    assert code == 2 and "HTTP 400: parse error at char 3" in err
    handler.routes["/api/v1/query"] = (200, b'{"status": "error", "error": "overloaded"}')
    code, _, err = command("--prometheus", url)
    assert code == 2 and "Prometheus did not answer the variants query: overloaded" in err
    answers = prom_answers(variants=vec(production="1", canary="1"))
    answers["requests"] = {"not": "a vector"}
    scripted_prometheus(handler, answers, ("production", "canary"), 600)
    code, _, err = command("--prometheus", url)
    assert code == 2 and "Prometheus did not answer the requests query: a vector whose " \
        "result is not a list of series" in err


def test_command_unreachable_and_same_names(unused_port: int) -> None:
    code, out, err = command("--url", f"http://127.0.0.1:{unused_port}", "--timeout", "2")
    assert (code, out) == (2, "")
    assert err.startswith(f"zaiproxy canary-check: inconclusive: cannot reach "
                          f"http://127.0.0.1:{unused_port}/admin/status:")
    code, _, err = command("--prometheus", "http://p", "--canary", "production")
    assert code == 2 and "must name two variants" in err


def proxy_answers(variant: str, errors: int = 0) -> dict[str, Answer]:
    """A proxy's admin API: its status, and its history for its own variant only."""
    points = [bucket(t, 10, responses_2xx=10 - errors, responses_5xx=errors)
              for t in range(int(T_END) - 60, int(T_END), 5)]

    def history(target: str) -> tuple[int, bytes]:
        asked = parse_qs(urlsplit(target).query)
        assert asked["variant"] == [variant]
        return 200, json.dumps(proxy_history(variant, points)).encode()

    return {"/admin/status": (200, json.dumps(proxy_status(variant)).encode()),
            "/admin/history": history}


def lines_of(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:]}


@pytest.mark.parametrize(("errors", "code", "verdict"), [
    (0, 0, "PROMOTE"), (5, 1, "ROLL BACK: bad: error_rate")])
def test_command_against_two_proxies(scripted: Scripts, errors: int, code: int,
                                     verdict: str) -> None:
    (prod, prod_h), (canary, canary_h) = scripted(), scripted()
    prod_h.routes.update(proxy_answers("production"))
    canary_h.routes.update(proxy_answers("canary", errors))
    got, out, err = command("--url", canary, "--url", prod + "/", "--window", "1m",
                            "--token", "t")
    assert (got, err) == (code, ""), err
    lines = out.splitlines()
    assert lines[0].startswith(verdict)
    assert lines[1] == (f"canary 'canary' vs production 'production' over 60s, from proxies "
                        f"{canary} (canary), {prod} (production)")
    assert "1/1 down" not in out and lines_of(out)["requests"][:2] == ["120", "120"]
    for handler, variant in ((prod_h, "production"), (canary_h, "canary")):
        assert handler.seen == [("/admin/status", "Bearer t"),
                                (f"/admin/history?range=5m&variant={variant}", "Bearer t")]


def test_command_a_dead_canary_proxy_is_rolled_back(scripted: Scripts, unused_port: int,
                                                    hanging_port: int) -> None:
    prod, handler = scripted()
    handler.routes.update(proxy_answers("production"))
    for dead in (unused_port, hanging_port):  # connection refused, no answer in time
        code, out, err = command("--url", prod, "--url", f"http://127.0.0.1:{dead}",
                                 "--window", "1m", "--timeout", "0.3", "--json")
        doc = json.loads(out)
        assert (code, err, doc["verdict"], doc["reason"]) == (1, "", "ROLL BACK", "bad: targets")
        why = doc["source"]["proxies"][1].pop("error")
        assert doc["source"] == {"kind": "proxies", "proxies": [
            {"url": prod, "variant": "production", "answered": True},
            {"url": f"http://127.0.0.1:{dead}", "variant": "canary", "answered": False}]}
        assert why.startswith("cannot re") and f"127.0.0.1:{dead}/admin/status: " in why
        assert (doc["variants"]["canary"]["targets"],
                doc["variants"]["canary"]["targets_down"]) == (1, 1)
    code, out, _ = command("--url", prod, "--url", f"http://127.0.0.1:{unused_port}")
    assert code == 1 and out.splitlines()[:2] == [
        "ROLL BACK: bad: targets", "canary 'canary' vs production 'production' over 600s, "
        f"from proxies {prod} (production), http://127.0.0.1:{unused_port} (canary: did not "
        "answer)"]
    assert lines_of(out)["targets"][:2] == ["1/1", "down"]


@pytest.mark.parametrize(("canary_answer", "message"), [
    ((401, b'{"error": {"message": "admin endpoint: missing or wrong admin token"}}'),
     "/admin/status: HTTP 401: admin endpoint: missing or wrong admin token (pass --token"),
    ((200, b'{"status": "ok"}'), '/admin/status: not a zaiproxy admin API ("source" is None'),
    ((200, b"<html>hi</html>"), "/admin/status: the answer is not JSON"),
    ((200, json.dumps({"source": "collector", "variants": {}}).encode()),
     "is a collector: give one fleet collector, or one --url per proxy (never both"),
])
def test_command_proxies_inconclusive(scripted: Scripts, canary_answer: tuple[int, bytes],
                                      message: str) -> None:
    (prod, prod_h), (canary, canary_h) = scripted(), scripted()
    prod_h.routes.update(proxy_answers("production"))
    canary_h.routes.update(proxy_answers("canary"))
    canary_h.routes["/admin/status"] = canary_answer
    code, out, err = command("--url", prod, "--url", canary, "--window", "1m")
    assert (code, out) == (2, "")
    assert err.startswith("zaiproxy canary-check: inconclusive: ") and message in err, err


def test_command_one_proxy_is_not_enough(source: tuple[str, type[Scripted]]) -> None:
    url, handler = source
    handler.routes.update(proxy_answers("canary"))
    code, out, err = command("--url", url)
    assert (code, out) == (2, "")
    assert err == (f"zaiproxy canary-check: inconclusive: {url} is a proxy, and a proxy "
                   "serves one variant (this one 'canary'): give both proxies (--url "
                   "PRODUCTION --url CANARY) or a fleet collector (zaiproxy collect) that "
                   "scrapes both\n")
    assert [path for path, _ in handler.seen] == ["/admin/status"]


def test_url_is_repeatable() -> None:
    ns = build_parser().parse_args(["canary-check", "--url", "http://a", "--url", "http://b"])
    assert ns.url == ["http://a", "http://b"]


@pytest.fixture
def hanging_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:  # listening, never accepting: connects, then no answer
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the counter behind usage_missing -------------------------------------------------------


@pytest.fixture(params=IMPLEMENTATIONS)
def metrics_host(request: pytest.FixtureRequest) -> Iterator[Host]:
    d = Path(tempfile.mkdtemp(prefix="zaiproxy-canary-", dir="/dev/shm"))
    h = Host(request.param, d / "seg")
    yield h
    h.close()
    shutil.rmtree(d, ignore_errors=True)


def test_usage_missing_counts_successful_estimated_requests(metrics_host: Host) -> None:
    w0, w1 = metrics_host.worker(0), metrics_host.worker(1)
    assert "zai_proxy_usage_missing_total" not in {n for n, _ in scrape(w0)}  # none yet
    est = Usage(10, 5)
    w0.observe(rec(usage=est, tokens_estimated=True))
    w1.observe(rec(usage=est, tokens_estimated=True, status=201))
    w1.observe(rec(usage=est, tokens_estimated=True, status=502))  # not a success
    w1.observe(rec(usage=est, tokens_estimated=True, status=499))  # client left
    w0.observe(rec(usage=Usage(10, 5)))  # upstream's usage
    w0.observe(rec())  # no usage at all (not proxied)
    for w in (w0, w1):  # any worker's scrape shows all of them
        assert scrape(w)[("zai_proxy_usage_missing_total",
                          frozenset({("variant", "canary")}))] == 2
    # What the collector and the admin API read from it.
    body, _ = w1.render()
    snaps = snapshot.parse(body.decode())
    assert snaps["canary"].counts.usage_missing == 2
    assert snaps["canary"].to_json()["usage_missing"] == 2


def test_rates_carry_usage_missing_and_ok() -> None:
    prev = snapshot.VariantSnapshot("canary", Counts(requests=10, responses_2xx=8))
    cur = snapshot.VariantSnapshot("canary", Counts(requests=30, responses_2xx=24,
                                                    usage_missing=6))
    body = snapshot.delta(prev, cur, 2.0).to_json()
    assert (body["ok_per_s"], body["usage_missing_per_s"]) == (8.0, 3.0)


def test_collector_store_keeps_usage_missing_and_migrates_an_old_file(tmp_path: Path) -> None:
    path = str(tmp_path / "old.duckdb")
    old_schema = _SCHEMA.replace("usage_missing DOUBLE NOT NULL, ", "")
    assert old_schema != _SCHEMA
    con = duckdb.connect(path)
    con.execute(old_schema)
    con.close()
    store = Store(path)
    rates = Rates("canary", 10, Counts(requests=100, responses_2xx=80, usage_missing=40),
                  latency=snapshot.Histogram.from_buckets({0.1: 100, math.inf: 100}))
    store.insert([row_of(1000.0, "http://a:1", rates)])
    (got,) = store.history(900, 60, "canary")["canary"]
    assert (got["usage_missing_per_s"], got["ok_per_s"]) == (4.0, 8.0)
    store.close()
    store = Store(path)  # opening it again is a no-op migration
    assert store.history(900, 60, "all")["canary"][0]["usage_missing_per_s"] == 4.0
    store.close()
