"""zaiproxy_tui.views over a Dashboard fed with the fixture fleet (and one real proxy history).

The fixture fleet at ``NOW``: production at 20 + 8·sin(NOW/900) = 25.28 req/s (1 % 5xx,
p50 666 ms, 1380 tokens per request, 20.2 in flight of 64), canary at 2.33 req/s (6 % 5xx,
16 slots). Its history is the collector's: 15 s steps over 15 min = 61 points per variant,
the last ending at NOW.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from tests.tui.fixtures import (
    NOW,
    history_doc,
    keys_doc,
    metrics_doc,
    pool_keys_doc,
    upstream_doc,
    zai_quota_doc,
)
from zaiproxy_tui.headline import quota_segments
from zaiproxy_tui.model import LimitState, parse_history, parse_keys, parse_snapshot
from zaiproxy_tui.quota_view import NOT_POLLED, NOT_REPORTED, QuotaRow, zai_quota_view
from zaiproxy_tui.source import AuthRequired, Connected, Connecting, Reconnecting
from zaiproxy_tui.state import Dashboard
from zaiproxy_tui.views import (
    KEY_COLUMNS,
    Segment,
    error_rows,
    fmt_count,
    fmt_duration,
    fmt_pct,
    fmt_rate,
    fmt_seconds,
    fmt_short_count,
    fmt_si,
    fmt_usd,
    fmt_usd_axis,
    key_lines,
    limit_rows,
    limiter_view,
    panel_views,
    status_view,
)
from zaiproxy_tui.widgets import palette

DATA = Path(__file__).parent / "data"
PANELS = ["rate", "latency", "ttft", "tokens", "cost", "concurrency"]


def dashboard(mode: str = "production", range_: str = "15m", *,
              variants: tuple[str, ...] = ("production", "canary"), history: bool = True,
              snapshot: bool = True) -> Dashboard:
    d = Dashboard("http://fleet:9100", range_=range_, mode=mode)
    d.apply(Connected(2.0, None), NOW)
    if snapshot:
        d.apply(parse_snapshot(metrics_doc(NOW, variants)), NOW)
    if history:
        d.set_history(parse_history(history_doc(range_, variants), range_, NOW))
    return d


def texts(segments: list[Segment] | tuple[Segment, ...]) -> list[str]:
    return [text for text, _ in segments]


def after(segments: list[Segment] | tuple[Segment, ...], label: str) -> Segment:
    """The segment that follows the one whose text is ``label``."""
    i = texts(segments).index(label)
    return segments[i + 1]


# ---- status line -------------------------------------------------------------------------


def test_status_connected_shows_the_newest_rates() -> None:
    seg = status_view(dashboard(), NOW)
    assert seg[0] == ("● connected", "ok")
    assert ("  production", "accent") in seg and (" 15m", "accent") in seg
    assert after(seg, "  req ") == ("25.3/s", None)
    assert after(seg, "  5xx ") == ("1.0%", None)
    assert after(seg, "  p50 ") == ("666ms", None)
    assert after(seg, "  tok ") == ("34.9k/s", None)
    assert after(seg, "  in-flight ") == ("20/64", None)
    assert not any("STALE" in t or "PAUSED" in t for t in texts(seg))


def test_status_both_variants_are_combined() -> None:
    seg = status_view(dashboard("both"), NOW)
    assert ("  prod+canary", "accent") in seg
    assert after(seg, "  req ") == ("27.6/s", None)  # 25.28 + 2.33
    assert after(seg, "  5xx ") == ("1.4%", None)  # (0.253 + 0.140) / 27.6
    assert after(seg, "  in-flight ") == ("22/80", None)


def test_status_canary_error_rate_over_5_percent_is_an_error() -> None:
    seg = status_view(dashboard("canary"), NOW)
    assert after(seg, "  5xx ") == ("6.0%", "error")
    assert after(seg, "  in-flight ") == ("2/16", None)


# ---- variants by any name -------------------------------------------------------------
# The original service's canary runbook names the canary "test"; deployments used "canary",
# "v2", "stable". The screen shows whatever the source reports.


def test_a_canary_named_test_is_shown_under_its_name() -> None:
    d = dashboard("both", variants=("production", "test"))
    assert d.variants() == ("production", "test")
    seg = status_view(d, NOW)
    assert ("  prod+test", "accent") in seg
    assert after(seg, "  req ") == ("27.6/s", None)  # the canary's numbers, as "canary"'s
    rate = panel_views(d, NOW)[0]
    assert [(s.label, s.role) for s in rate.series] == [("production", "production"),
                                                        ("test", "canary")]
    assert rate.legend == (("prod", "production"), ("test", "canary"))
    assert after(rate.summary, "test ") == ("2.33/s", None)
    d.mode = "test"
    assert d.variants() == ("test",)
    assert ("  test", "accent") in status_view(d, NOW)
    assert all(v.message is None for v in panel_views(d, NOW))


def test_mode_canary_is_the_only_other_variant_whatever_its_name() -> None:
    assert dashboard("canary", variants=("production", "test")).variants() == ("test",)
    assert dashboard("canary").variants() == ("canary",)
    # Several others and none named canary: "canary" is no guess, its panels say no data.
    several = dashboard("canary", variants=("production", "test", "v2"))
    assert several.variants() == ("canary",)
    assert panel_views(several, NOW)[0].message == "no data for canary in the last 15m"
    # Nothing but production: the canary slot keeps its name.
    assert dashboard("canary", variants=("production",)).variants() == ("canary",)


@pytest.mark.parametrize(("variants", "cycle"), [
    (("production", "canary"), ["canary", "both", "production"]),
    (("production", "test"), ["test", "both", "production"]),
    (("production",), ["canary", "both", "production"]),  # no other: "no data for canary"
    (("production", "canary", "test", "v2"), ["canary", "test", "v2", "both", "production"]),
])
def test_v_cycles_production_each_other_variant_then_both(variants: tuple[str, ...],
                                                           cycle: list[str]) -> None:
    d = dashboard(variants=variants)
    assert [d.cycle_mode() for _ in cycle] == cycle


def test_cycling_from_canary_and_from_a_named_variant() -> None:
    d = dashboard("canary", variants=("production", "test"))
    assert d.cycle_mode() == "both"  # "canary" stood for test: both comes next
    assert d.variants() == ("production", "test")
    # --variant nightly before the source reports it: in the cycle, where its name sorts.
    d = dashboard("nightly", variants=("production", "test"))
    assert d.mode_cycle() == ("production", "nightly", "test", "both")
    assert d.cycle_mode() == "test"


def test_several_other_variants_overlaid_each_with_its_own_colour() -> None:
    d = dashboard("both", variants=("production", "test", "v2"))
    assert d.variants() == ("production", "test", "v2")
    assert ("  prod+test+v2", "accent") in status_view(d, NOW)
    legend = panel_views(d, NOW)[1].legend
    assert legend == (("prod", "production"), ("test", "canary"), ("v2", "variant-2"))
    assert all(palette.color(role, dark) for _, role in legend for dark in (True, False))
    assert len({palette.color(role, True) for _, role in legend}) == 3


def test_status_reconnecting_counts_down() -> None:
    d = dashboard()
    d.apply(Reconnecting("cannot connect to http://fleet:9100", NOW + 2.4, 3), NOW)
    d.apply(Connecting(3), NOW)  # the attempt itself keeps the countdown and its reason
    seg = status_view(d, NOW)
    assert seg[0] == ("◌ reconnecting in 3s", "warn")
    assert seg[1] == (" (cannot connect to http://fleet:9100)", "muted")
    assert status_view(d, NOW + 2.0)[0] == ("◌ reconnecting in 1s", "warn")
    assert status_view(d, NOW + 9.0)[0] == ("◌ reconnecting in 0s", "warn")


def test_status_connecting_before_anything() -> None:
    d = Dashboard("http://fleet:9100")
    seg = status_view(d, NOW)
    assert seg[0] == ("◌ connecting", "warn")
    assert "  req " not in texts(seg) and "  in-flight " not in texts(seg)


def test_status_auth_required() -> None:
    d = dashboard()
    d.apply(AuthRequired("wrong admin token"), NOW)
    assert status_view(d, NOW)[0] == ("✖ 401: press a to enter the admin token", "error")


def test_status_stale_after_three_intervals_without_snapshots() -> None:
    d = dashboard()  # interval 2 s, the last snapshot at NOW
    assert not any("STALE" in t for t in texts(status_view(d, NOW + 6.0)))
    assert (" STALE 7s", "error") in status_view(d, NOW + 7.0)
    assert (" STALE 2m 5s", "error") in status_view(d, NOW + 125.0)
    d.apply(parse_snapshot(metrics_doc(NOW + 125.0)), NOW + 125.0)
    assert not any("STALE" in t for t in texts(status_view(d, NOW + 126.0)))


def test_status_stale_follows_the_announced_interval() -> None:
    d = Dashboard("http://fleet:9100")
    d.apply(parse_snapshot(metrics_doc(NOW, interval=10.0)), NOW)
    assert not any("STALE" in t for t in texts(status_view(d, NOW + 29.0)))
    assert (" STALE 31s", "error") in status_view(d, NOW + 31.0)


def test_status_paused() -> None:
    d = dashboard()
    d.paused = True
    assert (" ⏸ PAUSED", "warn") in status_view(d, NOW)


def test_status_warns_when_the_proxy_admin_api_is_open() -> None:
    d = dashboard()
    assert not any("ADMIN" in t for t in texts(status_view(d, NOW)))
    d.apply(parse_snapshot({**metrics_doc(NOW), "warnings": ["admin_api_open", 3]}), NOW)
    assert (" ⚠ ADMIN API OPEN (no token)", "error") in status_view(d, NOW)


# ---- plot panels --------------------------------------------------------------------------


def test_panels_production_one_series_per_part() -> None:
    doc = history_doc("15m")
    raw = doc["series"]["production"]
    views = panel_views(dashboard(), NOW)
    assert [v.key for v in views] == PANELS
    rate = views[0]
    assert (rate.start, rate.end, rate.y_format, rate.message) == (NOW - 900, NOW, "rate", None)
    assert [(s.label, s.role) for s in rate.series] == [("2xx", "2xx"), ("4xx", "4xx"),
                                                         ("429", "429"), ("5xx", "5xx")]
    assert rate.legend == (("2xx", "2xx"), ("4xx", "4xx"), ("429", "429"), ("5xx", "5xx"))
    r2xx, r4xx, r429, r5xx = (s.points for s in rate.series)
    assert len(r2xx) == 61  # the history; the live point at NOW is what it already covers
    assert r429[0] == (raw[0]["t"] + 15, raw[0]["rate_limited_per_s"])
    assert r5xx[0][1] == raw[0]["errors_per_s"]
    # "4xx" is the 4xx that is not 429: 4 % − 2 % of the requests.
    assert r4xx[0][1] == pytest.approx(raw[0]["requests_per_s"] * 0.02)
    assert after(rate.summary, "now ") == ("25.3/s", None)
    assert after(rate.summary, "  5xx ") == ("1.0%", None)
    latency = views[1]
    assert [s.label for s in latency.series] == ["p50", "p95", "p99"]
    assert latency.series[1].points[-1][1] == raw[-1]["latency_p95_s"]
    assert after(latency.summary, "p50 ") == ("666ms", "p50")
    cost = views[4]
    assert cost.series[0].points[0][1] == pytest.approx(raw[0]["cost_usd_per_s"] * 3600)
    concurrency = views[5]
    assert after(concurrency.summary, " / max ") == ("64.0", "limit")


def test_panels_live_points_after_the_history() -> None:
    d = dashboard()
    for i in (1, 2, 3):
        d.apply(parse_snapshot(metrics_doc(NOW + 2 * i)), NOW + 2 * i)
    rate = panel_views(d, NOW + 6)[0]
    times = [t for t, _ in rate.series[0].points]
    assert times[-3:] == [NOW + 2, NOW + 4, NOW + 6]
    assert all(t >= NOW + 6 - 900 for t in times)
    assert len(times) == 61 + 3 - 1  # the oldest history point left the range


def test_panels_canary_mode() -> None:
    views = panel_views(dashboard("canary"), NOW)
    latency = views[1]
    assert latency.message is None
    raw = history_doc("15m")["series"]["canary"]
    assert latency.series[1].points[0][1] == raw[0]["latency_p95_s"]
    assert after(views[0].summary, "  5xx ") == ("6.0%", "error")


def test_panels_both_modes_one_series_per_variant() -> None:
    views = panel_views(dashboard("both"), NOW)
    assert [v.key for v in views] == PANELS
    prod = history_doc("15m")["series"]["production"]
    canary = history_doc("15m")["series"]["canary"]
    for v in views:
        assert [(s.label, s.role) for s in v.series] == [("production", "production"),
                                                         ("canary", "canary")]
        assert [role for _, role in v.legend] == ["production", "canary"]
        assert v.message is None
    rate, latency = views[0], views[1]
    assert rate.title == "Requests/s"
    assert rate.series[0].points[0][1] == prod[0]["requests_per_s"]
    assert rate.series[1].points[0][1] == canary[0]["requests_per_s"]
    assert latency.title == "Latency · p95"
    assert latency.series[1].points[0][1] == canary[0]["latency_p95_s"]
    assert ("cana ", "canary") in rate.summary
    assert after(rate.summary, "cana ") == ("2.33/s", None)


def test_panels_no_data_for_a_variant() -> None:
    d = dashboard("canary", variants=("production",))
    for v in panel_views(d, NOW):
        assert v.message == "no data for canary in the last 15m"
        assert all(s.points == () for s in v.series)
    d.mode = "both"
    views = panel_views(d, NOW)
    assert all(v.message is None for v in views)
    assert len(views[0].series[0].points) == 61 and views[0].series[1].points == ()
    assert any("no data" in t for t in texts(views[0].summary[2:]))


def test_panels_waiting_for_data_before_anything_arrived() -> None:
    d = Dashboard("http://fleet:9100")
    assert [v.message for v in panel_views(d, NOW)] == ["waiting for data…"] * 6
    d.apply(AuthRequired("wrong admin token"), NOW)
    assert {v.message for v in panel_views(d, NOW)} == {"waiting for the admin token (press a)"}


def test_panels_history_only() -> None:
    d = dashboard(snapshot=False)
    rate = panel_views(d, NOW)[0]
    assert rate.message is None and len(rate.series[0].points) == 61
    assert after(rate.summary, "now ")[0] != "–"  # the newest history point


# ---- limits, keys, errors -------------------------------------------------------------------


def test_limit_rows_of_the_global_limits() -> None:
    rows = {r.label: r for r in limit_rows(parse_keys(keys_doc()).limits)}
    assert list(rows) == ["req/min", "concurrency", "req/5h", "upstream tok/week"]
    rpm = rows["req/min"]  # GCRA 1900 of 3000 left, full again in 22 s
    assert (rpm.used, rpm.left, rpm.resets, rpm.limited) == ("1,100/3,000", "63%", "22s", False)
    assert rpm.used_share == pytest.approx(1100 / 3000)
    conc = rows["concurrency"]
    assert (conc.used, conc.left, conc.resets) == ("17/64", "73%", "–")
    five_h = rows["req/5h"]
    assert (five_h.used, five_h.left, five_h.resets) == ("161.0k/400.0k", "60%", "2h 13m")
    week = rows["upstream tok/week"]
    assert (week.used, week.left, week.resets) == ("830.0M/900.0M", "7.8%", "3d")


def test_limiter_names_the_throttle_class_behind_a_cap_and_when_it_is_gone() -> None:
    d = dashboard(snapshot=False)
    doc = keys_doc()
    doc["adaptive"] = {**doc["adaptive"], "rate_rps": 7.0, "reason": "frequency",
                       "free_in_s": 252.0}
    d.set_keys(parse_keys(doc))
    assert texts(limiter_view(d).adaptive) == ["adaptive ", "7.00 req/s", "  (frequency, gone ≤ 4m 12s)"]
    doc["adaptive"] = {**doc["adaptive"], "rate_rps": None}
    d.set_keys(parse_keys(doc))
    assert limiter_view(d).adaptive == []


def test_limit_rows_limited_and_unused() -> None:
    rows = limit_rows([LimitState("requests_per_minute", 60, 0, None, 42.0),
                       LimitState("tokens_per_week", 1000, 1000, 0.0, None),
                       LimitState("upstream_concurrency", 8, 0, 8.0, None)])
    assert [(r.label, r.left, r.resets, r.limited) for r in rows] == [
        ("req/min", "0%", "42s", True), ("tok/week", "100%", "now", False),
        ("upstream concurrency", "0%", "–", True)]


def test_limit_rows_of_a_real_proxy() -> None:
    report = parse_keys(json.loads((DATA / "proxy_keys.json").read_text()))
    rows = {r.label: r for r in limit_rows(report.limits)}
    assert rows["upstream tok/5h"].resets == "4h 58m"  # 17927.273 s
    assert rows["upstream tok/5h"].used == "195/1.0M"


def keys_dashboard() -> Dashboard:
    d = dashboard()
    d.set_keys(parse_keys(keys_doc()))
    return d


def test_key_lines_show_state_and_the_tightest_limit() -> None:
    lines = {k.alias: k for k in key_lines(keys_dashboard())}
    agent = lines["agent-fleet-a"]
    assert (agent.state, agent.state_role, agent.requests) == ("ok", "ok", 48_211)
    # Of every request: refused by the proxy, other 4xx (Z.AI's 429s with them), 5xx.
    assert (agent.refused, agent.r4xx, agent.r5xx) == (210, 12 + 31, 8)
    assert (agent.left, agent.resets, agent.resets_s) == ("38% tok/5h", "2h 13m", 7980.0)
    ci = lines["ci-bot"]
    assert ci.state.startswith("limited") and ci.state_role == "error"
    assert (ci.left, ci.resets) == ("0% req/min", "42s")
    assert (lines["alice"].left, lines["alice"].resets) == ("88% req/week", "3d 14h")
    old = lines["old-laptop"]
    assert (old.state, old.state_role, old.left, old.resets) == ("disabled", "muted",
                                                                 "no limits", "–")


@pytest.mark.parametrize(("column", "ascending"), [
    ("key", ["agent-fleet-a", "alice", "ci-bot", "old-laptop"]),
    ("requests", ["old-laptop", "alice", "ci-bot", "agent-fleet-a"]),
    ("refused", ["alice", "old-laptop", "agent-fleet-a", "ci-bot"]),  # ties: by alias
    ("4xx", ["old-laptop", "ci-bot", "alice", "agent-fleet-a"]),
    ("5xx", ["ci-bot", "old-laptop", "alice", "agent-fleet-a"]),
    ("in", ["old-laptop", "alice", "ci-bot", "agent-fleet-a"]),
    ("out", ["old-laptop", "alice", "ci-bot", "agent-fleet-a"]),
    ("left", ["ci-bot", "agent-fleet-a", "alice", "old-laptop"]),  # no limits: last
    ("resets", ["ci-bot", "agent-fleet-a", "alice", "old-laptop"]),
    ("state", ["old-laptop", "ci-bot", "agent-fleet-a", "alice"]),
])
def test_key_lines_sort_by_each_column_and_reverse(column: str, ascending: list[str]) -> None:
    d = keys_dashboard()
    assert [k.alias for k in key_lines(d, column, reverse=False)] == ascending
    assert [k.alias for k in key_lines(d, column, reverse=True)] == ascending[::-1]


def test_key_cells_fill_every_column_and_fit_80_columns() -> None:
    """One cell per column, the state in the colour of "left"; and the table as the panel
    draws it (each column as wide as its widest text plus one space each side) fits the
    76 columns an 80-column terminal leaves inside the panel's border."""
    lines = key_lines(keys_dashboard(), "key", reverse=False)
    rows = {line.alias: line.cells() for line in lines}
    assert all(len(cells) == len(KEY_COLUMNS) for cells in rows.values())
    headers = [label for label, _ in KEY_COLUMNS]
    assert headers[:5] == ["alias", "req", "refused", "4xx", "5xx"]
    assert [text for text, _ in rows["ci-bot"]] == [
        "ci-bot", "9870", "4120", "2", "0", "6.9M", "1.0M", "0% req/min", "42s"]
    assert [text for text, _ in rows["agent-fleet-a"]][:7] == [
        "agent-fleet-a", "48k", "210", "43", "8", "58M", "8.6M"]
    roles = {alias: dict(zip(headers, (role for _, role in cells), strict=True))
             for alias, cells in rows.items()}
    assert roles["ci-bot"]["left"] == "error" and roles["agent-fleet-a"]["left"] is None
    assert rows["old-laptop"][7] == ("disabled", "muted")
    assert all(role is None for alias in rows for column, role in roles[alias].items()
               if column != "left")
    widths = [max(len(header), *(len(cells[i][0]) for cells in rows.values())) + 2
              for i, header in enumerate(headers)]
    assert sum(widths) <= 76, dict(zip(headers, widths, strict=True))


def test_key_lines_of_an_older_proxy_show_unknown_outcomes_and_sort_them_last() -> None:
    doc = keys_doc()
    for key in doc["keys"][1:]:
        for name in ("ok", "proxy_429", "zai_429", "other_4xx", "5xx"):
            del key["usage"][name]
    d = dashboard()
    d.set_keys(parse_keys(doc))
    lines = key_lines(d, "refused")
    assert [k.alias for k in lines] == ["agent-fleet-a", "old-laptop", "ci-bot", "alice"]
    unknown = {k.alias: k.cells() for k in lines}["ci-bot"]
    assert [text for text, _ in unknown[2:5]] == ["–", "–", "–"]
    assert unknown[1][0] == "9870"  # the requests it did count


@pytest.mark.parametrize(("value", "text"), [
    (None, "–"), (0, "0"), (999, "999"), (9_999, "9999"), (10_000, "10k"), (431_300, "431k"),
    (999_499, "999k"), (999_500, "1.0M"), (9_949_999, "9.9M"), (9_950_000, "10M"),
    (57_540_000, "58M"), (2_000_000_000, "2.0G"), (5 * 10**12, "5.0T"),
])
def test_key_counts_take_four_characters_at_most(value: int | None, text: str) -> None:
    assert fmt_short_count(value) == text and len(text) <= 4


def test_key_lines_default_is_most_requests_first_and_empty_without_keys() -> None:
    assert key_lines(keys_dashboard())[0].alias == "agent-fleet-a"
    assert key_lines(dashboard()) == []


def test_error_rows_total_over_the_range_of_a_real_proxy_history() -> None:
    fetched_at = 1795828592.234757
    doc = json.loads((DATA / "proxy_history_5m.json").read_text())
    d = Dashboard("http://127.0.0.1:42231", range_="5m")
    d.set_history(parse_history(doc, "5m", fetched_at))
    rows, range_ = error_rows(d, fetched_at)
    assert range_ == "5m"
    got = {r.label: r.total for r in rows}
    assert all(r.now is None for r in rows)  # no live point yet
    # Three buckets: 8 requests (2 × 429), 4 (4 × 429), 1; every 429 a key-limit rejection.
    assert got["429 (all)"] == pytest.approx(6.0)
    assert got["rejected by limits"] == pytest.approx(6.0)
    assert got["4xx other"] == pytest.approx(0.0)
    assert (got["5xx"], got["retries"]) == (0.0, 0.0)
    assert len(rows) == 7  # no snapshot yet: no "by code" rows
    # The range ends later: only what is still within 5 min counts.
    rows, _ = error_rows(d, 1795828580.5 + 300.0)  # the first bucket ended at …580
    assert {r.label: r.total for r in rows}["429 (all)"] == pytest.approx(4.0)


def test_error_rows_now_and_by_code() -> None:
    d = dashboard()
    rows, _ = error_rows(d, NOW)
    got = {r.label: r for r in rows}
    req = 25.275515266731304
    assert got["5xx"].now == pytest.approx(req * 0.01)
    assert got["Z.AI errors"].now == pytest.approx(req * 0.005)
    assert got["retries"].now == pytest.approx(req * 0.003)
    h = d.history
    assert h is not None
    assert got["5xx"].total == pytest.approx(
        sum(p.r5xx * p.seconds for p in h.series["production"] if p.r5xx is not None))
    codes = [r for r in rows if r.label.startswith("  ")]
    assert [r.label for r in codes][:2] == ["  Z.AI 1302 concurrency", "  Z.AI 1308 quota 5h"]
    assert got["  Z.AI 1302 concurrency"].total == 900.0
    assert got["  Z.AI 1302 concurrency"].now == pytest.approx(req * 0.004)
    assert got["  upstream connect"].total == 40.0
    assert got["  retry concurrency"].total == 300.0
    # Both variants: the totals of both.
    both = {r.label: r for r in error_rows(dashboard("both"), NOW)[0]}
    assert both["  Z.AI 1302 concurrency"].total == 1800.0
    assert both["5xx"].now == pytest.approx(req * 0.01 + 2.3297197041707065 * 0.06)


# ---- formatting ------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (45, "45s"), (44.2, "45s"), (0, "0s"), (-3, "0s"), (60, "1m"), (725, "12m 5s"),
    (3600, "1h"), (7980, "2h 13m"), (86400, "1d"), (273600, "3d 4h"), (None, "–")])
def test_fmt_duration(seconds: float | None, text: str) -> None:
    assert fmt_duration(seconds) == text


@pytest.mark.parametrize(("value", "text"), [
    (None, "–"), (0, "0"), (0.00085, "850µs"), (0.012, "12ms"), (0.6659, "666ms"),
    (1.23, "1.2s"), (250, "250s")])
def test_fmt_seconds(value: float | None, text: str) -> None:
    assert fmt_seconds(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (None, "–"), (0, "0%"), (0.01, "1.0%"), (0.0625, "6.2%"), (0.123, "12%"), (1, "100%")])
def test_fmt_pct(value: float | None, text: str) -> None:
    assert fmt_pct(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (None, "–"), (0, "0"), (0.5, "0.50"), (12.34, "12.3"), (250, "250"), (1234, "1.2k"),
    (161_000, "161.0k"), (2.5e6, "2.5M"), (3e9, "3.0G"), (-1500, "-1.5k")])
def test_fmt_si(value: float | None, text: str) -> None:
    assert fmt_si(value) == text


def test_fmt_si_units_rates_and_counts() -> None:
    assert fmt_si(2.5e9, "B") == "2.5GB"
    assert fmt_rate(25.28) == "25.3/s"
    assert fmt_rate(None) == "–"
    assert (fmt_count(9_999), fmt_count(12_345), fmt_count(None)) == ("9,999", "12.3k", "–")


@pytest.mark.parametrize(("fn", "value", "text"), [
    (fmt_si, 999_960, "1.0M"), (fmt_seconds, 0.9996, "1.0s")])
def test_fmt_rounding_moves_to_the_next_unit(fn: object, value: float, text: str) -> None:
    assert callable(fn)
    assert fn(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (None, "–"), (0, "$0"), (0.00123, "$0.0012"), (12.5, "$12.50"), (1234.6, "$1,235")])
def test_fmt_usd(value: float | None, text: str) -> None:
    assert fmt_usd(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (0, "$0"), (0.004, "$0.0040"), (0.4, "$0.40"), (2.5, "$2.50"), (90.0, "$90"),
    (1234.0, "$1,234")])
def test_fmt_usd_axis(value: float, text: str) -> None:
    assert fmt_usd_axis(value) == text


def stale_canary(targets: int, stale: int) -> Dashboard:
    """Both variants through a collector whose canary targets stopped answering."""
    d = Dashboard("http://fleet:9100", range_="15m", mode="both")
    d.apply(Connected(2.0, None), NOW)
    doc = metrics_doc(NOW)
    doc["variants"]["canary"].update(targets=targets, stale_targets=stale,
                                     stale=stale == targets)
    d.apply(parse_snapshot(doc), NOW)
    d.set_history(parse_history(history_doc("15m", ("production", "canary")), "15m", NOW))
    return d


def test_a_dead_canary_is_down_on_the_status_line_and_its_panels() -> None:
    """Its proxy stopped: the collector marks its only target stale; an idle canary must
    not be what the operator sees ("cana 0/s 5xx 0%")."""
    d = stale_canary(targets=1, stale=1)
    status = status_view(d, NOW)
    assert (" canary DOWN", "error") in status
    assert all("prod " not in text for text, _ in status)  # production is fresh: no badge
    for panel in panel_views(d, NOW):
        parts = texts(panel.summary)
        assert "cana " in parts and after(panel.summary, "cana ") == ("DOWN  ", "error")
        assert after(panel.summary, "prod ")[1] != "error"


def test_a_canary_with_some_stale_targets_says_how_many() -> None:
    d = stale_canary(targets=3, stale=1)
    assert (" canary STALE 1/3", "error") in status_view(d, NOW)
    fresh = stale_canary(targets=3, stale=0)
    assert not [text for text, role in status_view(fresh, NOW) if "STALE" in text
                or "DOWN" in text]


def test_the_status_line_splits_what_failed_for_the_clients() -> None:
    """Refusals are part of the headline: the proxy's own 429s, Z.AI's, other 4xx, beside
    the 5xx share the canary runbook watches."""
    seg = status_view(dashboard(), NOW)
    assert after(seg, "  5xx ") == ("1.0%", None)
    assert after(seg, "  refused ") == ("1.5%", "warn")
    assert after(seg, "  z.ai 429 ") == ("0.5%", "warn")
    assert after(seg, "  4xx ") == ("2.0%", "warn")
    # A proxy refusing 88 % of requests (the adaptive rate after Z.AI throttling) says so.
    d = Dashboard("http://proxy:8080", range_="15m", mode="production")
    d.apply(Connected(2.0, None), NOW)
    doc = metrics_doc(NOW, ("production",))
    doc["variants"]["production"]["rates"]["failure_shares"] = {
        "5xx": 0.0, "proxy_429": 0.88, "zai_429": 0.0, "other_4xx": 0.0}
    d.apply(parse_snapshot(doc), NOW)
    seg = status_view(d, NOW)
    assert after(seg, "  refused ") == ("88%", "error")
    assert "  z.ai 429 " not in texts(seg)  # a kind that did not happen takes no room


def test_a_refusal_by_the_adaptive_rate_is_labelled_as_such() -> None:
    d = dashboard()
    doc = metrics_doc(NOW, ("production",))
    variant = doc["variants"]["production"]
    variant["breakdown"]["rejections"] = {"global:adaptive_rate": 500.0,
                                          "key:requests_per_minute": 100.0}
    variant["rates"]["breakdown_per_s"]["rejections"] = {"global:adaptive_rate": 5.0,
                                                         "key:requests_per_minute": 1.0}
    d.apply(parse_snapshot(doc), NOW)
    labels = [row.label for row in error_rows(d, NOW)[0]]
    assert "  limit adaptive upstream rate" in labels
    assert "  limit key req/min" in labels
    assert not any("global requests" in label for label in labels)


# ---- Z.AI's own quota ------------------------------------------------------------------------


def with_keys(doc: dict[str, object]) -> Dashboard:
    d = dashboard()
    d.set_keys(parse_keys(doc))
    return d


def line(segments: tuple[Segment, ...] | list[Segment]) -> str:
    return "".join(texts(segments))


def test_a_pool_shows_one_group_per_upstream_key() -> None:
    """team-plan: fresh, 42 % of its 5 hours (the proxy counted 38 % itself), paced; backup:
    a stale sample in dim bars, its failing poller, its rest and its closed reserve gate."""
    view = zai_quota_view(with_keys(pool_keys_doc()), NOW, dt.UTC)
    assert line(view.head) == "Z.AI quota · 2 upstream keys"
    team, backup = view.groups
    assert line(team.head) == "team-plan  headroom 58%  pro  sampled 13s ago"
    assert team.rows == (
        QuotaRow("5h", 0.42, "Z.AI 42%", "· local 38%", "resets in 2h 13m", "ok"),
        QuotaRow("week", 0.18, "Z.AI 18%", "· local 17%", "resets in 3d 4h", "ok"))
    assert [line(n) for n in team.notes] == ["  paced 1.50 req/s (5h)"]
    assert line(backup.head) == ("backup  resting until 04:05 (quota)  headroom 3.0%  pro"
                                 "  STALE: sampled 25m 20s ago  last poll: error")
    assert ("  STALE: sampled 25m 20s ago", "warn") in backup.head
    assert ("  last poll: error", "error") in backup.head
    assert ("3.0%", "error") in backup.head  # headroom nearly gone
    # A stale sample's windows are muted; the local count is only the first key's.
    assert [(r.zai, r.local, r.role) for r in backup.rows] == [
        ("Z.AI 97%", "", "muted"), ("Z.AI 75%", "", "muted")]
    assert [line(n) for n in backup.notes] == ["  reserve reached — 429 until 04:06 (5h)"]
    assert backup.notes[0][1] == ("until 04:06", "error")


def test_one_key_without_a_pool_says_its_sample_on_the_title_line() -> None:
    doc = keys_doc()
    doc["global"]["upstream_tokens_per_5h"] = {"limit": 1000, "used": 380, "remaining": 620,
                                               "reset_s": 7980.0, "since": NOW - 600}
    doc["zai_quota"] = [zai_quota_doc("default", 0.85, 0.3, age=40.0)]
    view = zai_quota_view(with_keys(doc), NOW, dt.UTC)
    assert line(view.head) == "Z.AI quota  pro  sampled 40s ago"  # no headroom: no pool
    (group,) = view.groups
    assert group.head == () and group.notes == ()  # not pacing
    five, week = group.rows
    # The local window is younger than its length (the host restarted): at least 38 %.
    assert (five.zai, five.local, five.role) == ("Z.AI 85%", "· local ≥38%", "warn")
    assert (week.local, week.role) == ("· local 92%", "ok")  # upstream tok/week: 830M/900M


def test_a_key_that_rests_without_a_pool_says_so() -> None:
    doc = keys_doc()
    doc["zai_quota"] = [zai_quota_doc("default", 0.99, 0.5, age=3.0)]
    doc["upstreams"] = [upstream_doc("default", 0, headroom=0.01, resting_until=NOW + 2 * 86400,
                                     reason="throttled")]
    view = zai_quota_view(with_keys(doc), NOW, dt.UTC)
    assert line(view.head) == "Z.AI quota  resting until Mon 01:06 (throttled)  pro  sampled 3s ago"
    assert view.groups[0].rows[0].role == "error"  # 99 %: past the default reserve


def test_not_polled_not_reported_and_nothing_yet() -> None:
    assert zai_quota_view(with_keys(keys_doc()), NOW).head == ((NOT_POLLED, "muted"),)
    older = keys_doc()
    del older["zai_quota"], older["upstreams"]
    assert zai_quota_view(with_keys(older), NOW).head == ((NOT_REPORTED, "muted"),)
    off = keys_doc()
    off["zai_quota"] = [zai_quota_doc("default", 0.1, 0.1, age=1.0) | {"enabled": False}]
    assert zai_quota_view(with_keys(off), NOW).head == ((NOT_POLLED, "muted"),)
    nothing = Dashboard("http://proxy:8080")
    assert zai_quota_view(nothing, NOW).head == ()


def test_without_keys_the_live_snapshot_has_the_quota() -> None:
    """Prometheus answers no /admin/keys (its panels say why), and a collector's targets may
    all refuse its token: the snapshot's entries (read from the gauges: no staleness said,
    no pool state) are shown."""
    d = dashboard(snapshot=False)
    entries = [{"upstream": "default", "sample_age_s": 1000.0,
                "windows": [{"window": "five_hour", "used_fraction": 0.5,
                             "reset_in_s": 600.0}]}]
    d.apply(parse_snapshot(metrics_doc(NOW) | {"zai_quota": entries}), NOW)
    d.set_keys_error("per-key usage and limits are not in Prometheus")
    view = zai_quota_view(d, NOW, dt.UTC)
    assert line(view.head) == "Z.AI quota  STALE: sampled 16m 40s ago"  # > 900 s: stale
    assert view.groups[0].rows == (QuotaRow("5h", 0.5, "Z.AI 50%", "", "resets in 10m",
                                            "muted"),)
    # /admin/keys, once it says, wins (every field, and the pool).
    d.set_keys(parse_keys(pool_keys_doc()))
    assert len(zai_quota_view(d, NOW).groups) == 2


def test_the_headline_prefers_zais_tightest_window_when_fresh() -> None:
    doc = keys_doc()
    doc["zai_quota"] = [zai_quota_doc("default", 0.42, 0.6, age=12.0)]
    seg = quota_segments(with_keys(doc), dt.UTC)
    assert texts(seg)[:5] == ["quota ", "Z.AI week ", "60% used", " 3d 4h", "  "]
    assert "upstream tok/week " in texts(seg)  # then the local limits, as before
    # A pool: each fresh key's tightest window, fullest first, by alias; stale ones left out.
    seg = quota_segments(with_keys(pool_keys_doc()), dt.UTC)
    assert texts(seg)[1:4] == ["Z.AI team-plan 5h ", "42% used", " 2h 13m"]
    assert not any("backup" in t for t in texts(seg))
    # Every sample stale: said, then today's local limits.
    doc["zai_quota"] = [zai_quota_doc("default", 0.42, 0.6, age=5000.0)]
    seg = quota_segments(with_keys(doc), dt.UTC)
    assert seg[1] == ("Z.AI sample stale", "warn")
    assert after(seg, "upstream tok/week ") == ("7.8% left", "warn")
    # Not polled: the headline is what it was.
    assert texts(quota_segments(with_keys(keys_doc()), dt.UTC))[1] == "upstream tok/week "
