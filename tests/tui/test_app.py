"""Pilot tests: the app's key bindings and bad states, against the fixture source.

Textual runs on asyncio and pytest-trio's ``trio_mode`` would capture an
``async def`` test, so every test here is synchronous and runs its own loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

from textual.geometry import Region
from textual.pilot import Pilot
from textual.widget import Widget
from textual.widgets import DataTable, Input, Static

from tests.tui.fixtures import (
    NOW,
    FixtureSource,
    history_doc,
    keys_doc,
    metrics_doc,
    pool_keys_doc,
    zai_quota_doc,
)
from zaiproxy_tui.app import ZaiproxyTui
from zaiproxy_tui.source import NotServed, Unreachable
from zaiproxy_tui.widgets.panels import ErrorsPanel, KeysPanel, LimiterPanel, PlotPanel
from zaiproxy_tui.widgets.screens import HelpScreen, TokenScreen
from zaiproxy_tui.widgets.status import Headline, StatusLine
from zaiproxy_tui.widgets.timeplot import TimePlot

UTC = dt.UTC


def make_app(source: FixtureSource | None = None, **kw: Any) -> ZaiproxyTui:
    return ZaiproxyTui(source or FixtureSource(), url="http://fleet:9090", clock=lambda: NOW,
                       tz=UTC, **kw)


def run(app: ZaiproxyTui, body: Callable[[Pilot[None], ZaiproxyTui], Awaitable[None]],
        size: tuple[int, int] = (160, 48)) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await body(pilot, app)

    asyncio.run(main())


def text(widget: Widget) -> str:
    """What the widget shows, as plain text (its rendered lines)."""
    width, height = widget.outer_size
    return "\n".join(strip.text for strip in widget.render_lines(Region(0, 0, width, height)))


def status(app: ZaiproxyTui) -> str:
    return text(app.screen_stack[0].query_one(StatusLine))  # also under a modal screen


def summary(app: ZaiproxyTui, key: str) -> str:
    return text(app.query_one(f"#panel-{key} .summary", Static))


def plot_lines(app: ZaiproxyTui, key: str) -> list[str]:
    plot = app.query_one(f"#panel-{key}", PlotPanel).query_one(TimePlot)
    return [plot.render_line(y).text for y in range(plot.size.height)]


def legend(app: ZaiproxyTui, key: str) -> str:
    return str(app.query_one(f"#panel-{key}", PlotPanel).border_title)


async def settle(pilot: Pilot[None]) -> None:
    for _ in range(3):
        await pilot.pause()


def test_starts_connected_showing_production_numbers() -> None:
    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        line = status(app)
        assert "● connected" in line
        assert "production" in line and "15m" in line
        # 20 + 8 sin(NOW / 900) = 25.3 req/s in the fixture; in flight 0.8 × that, of 64.
        assert "req 25.3/s" in line
        assert "in-flight 20/64" in line
        assert "━2xx" in legend(app, "rate") and "━5xx" in legend(app, "rate")
        assert any(ch not in " │┤" and ch not in "0123456789.k" for ch in
                   "".join(plot_lines(app, "rate")))  # braille drawn
        assert "now 25.3/s" in summary(app, "rate")

    run(make_app(), body)


def test_variant_key_cycles_production_canary_both() -> None:
    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await pilot.press("v")
        assert "canary" in status(app) and "req 2.33/s" in status(app)
        assert "━2xx" in legend(app, "rate")
        await pilot.press("v")
        assert "prod+canary" in status(app)
        assert "━prod" in legend(app, "latency") and "━canary" in legend(app, "latency")
        both = summary(app, "rate")
        assert "prod 25.3/s" in both and "cana 2.33/s" in both and "5xx 6.0%" in both
        await pilot.press("v")
        assert "production" in status(app) and "canary" not in status(app)

    run(make_app(), body)


def test_a_canary_named_test_the_variant_key_and_the_flag() -> None:
    """The original service's runbook calls its canary "test": the key cycles through the
    variants the source has, and --variant canary finds the canary by any name."""
    test_fleet = ("production", "test")

    def source() -> FixtureSource:
        return FixtureSource(events=[metrics_doc(variants=test_fleet)],
                             history=lambda r, v: history_doc(r, variants=test_fleet))

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await pilot.press("v")
        assert "  test 15m" in status(app) and "req 2.33/s" in status(app)
        await pilot.press("v")
        assert "prod+test" in status(app)
        assert "━prod" in legend(app, "latency") and "━test" in legend(app, "latency")
        assert "prod 25.3/s" in summary(app, "rate") and "test 2.33/s" in summary(app, "rate")
        await pilot.press("v")
        assert "production" in status(app) and "test" not in status(app)

    run(make_app(source()), body)

    async def canary(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        assert "  test 15m" in status(app) and "req 2.33/s" in status(app)
        assert "no data" not in "".join(plot_lines(app, "latency"))

    run(make_app(source(), mode="canary"), canary)
    run(make_app(source(), mode="test"), canary)


def test_range_keys_requery_history_for_the_new_range() -> None:
    source = FixtureSource()

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        assert source.history_calls == [("15m", "all")]
        await pilot.press("r")
        await settle(pilot)
        assert "1h" in status(app)
        await pilot.press("6")
        await settle(pilot)
        assert " 7d" in status(app)
        await pilot.press("R")
        await settle(pilot)
        assert "24h" in status(app)
        await pilot.press("1")
        await settle(pilot)
        assert [c[0] for c in source.history_calls] == ["15m", "1h", "7d", "24h", "5m"]
        # The x axis follows: a 5 min range is labelled in minutes ending at NOW (01:06:40 UTC).
        assert "01:06" in plot_lines(app, "rate")[-1]

    run(make_app(source), body)


def test_pause_freezes_the_panels_and_says_so() -> None:
    source = FixtureSource()

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        before = summary(app, "rate")
        await pilot.press("p")
        assert "PAUSED" in status(app)
        await pilot.press("v")  # would switch the panels to canary
        assert summary(app, "rate") == before
        await pilot.press("p")
        assert "PAUSED" not in status(app)
        assert summary(app, "rate") != before  # canary now

    run(make_app(source), body)


def test_help_overlay_lists_every_binding_and_closes() -> None:
    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await pilot.press("question_mark")
        await settle(pilot)
        assert isinstance(app.screen, HelpScreen)
        shown = "\n".join(text(w) for w in app.screen.query(Static))
        for words in ("v  variant: production → each other variant → both", "r  longer time range",
                      "R  shorter", "1-6  range 5m / 15m / 1h / 6h / 24h / 7d", "p  pause",
                      "s  sort the keys", "t  light / dark", "a  enter the admin token",
                      "?  this help", "q  quit"):
            key, what = words.split("  ")
            assert any(line.split()[:1] == [key] and what in line for line in shown.splitlines()), words
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

    run(make_app(), body)


def test_theme_key_switches_light_and_dark() -> None:
    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        assert app.current_theme.dark
        await pilot.press("t")
        assert not app.current_theme.dark
        await pilot.press("t")
        assert app.current_theme.dark

    run(make_app(), body)


def test_keys_table_sorts_by_column() -> None:
    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        table = app.query_one(KeysPanel).query_one(DataTable)

        def aliases() -> list[str]:
            return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]

        assert aliases() == ["agent-fleet-a", "ci-bot", "alice", "old-laptop"]  # requests ↓
        await pilot.press("s")  # -> refused ↓
        await settle(pilot)
        assert aliases()[0] == "ci-bot"  # 4120 refused by the proxy's limits
        await pilot.press("s", "s", "s", "s", "s", "s")  # 4xx, 5xx, in, out, left, resets
        await settle(pilot)
        assert "resets" in str(app.query_one(KeysPanel).border_title)
        assert aliases()[0] == "ci-bot"  # 42 s: the soonest reset
        await pilot.press("s")  # -> alias (ascending)
        await settle(pilot)
        assert aliases() == ["agent-fleet-a", "alice", "ci-bot", "old-laptop"]
        ci_bot = [str(cell) for cell in table.get_row_at(2)]
        assert ci_bot[1:5] == ["9870", "4120", "2", "0"]  # requests, refused, 4xx, 5xx
        assert ci_bot[7] == "0% req/min" and ci_bot[8] == "42s"  # the state is its colour

    run(make_app(), body)


def test_limits_panel_shows_used_left_and_reset_times() -> None:
    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        limiter = text(app.query_one(LimiterPanel))
        assert "req/5h" in limiter and "2h 13m" in limiter  # 7980 s
        assert "upstream tok/week" in limiter and "3d" in limiter
        req_5h = next(line for line in limiter.splitlines() if "req/5h" in line)
        assert "40%" in req_5h and "60%" in req_5h  # used, left
        assert "↓8 ↑6" in limiter  # adaptive adjustments of both variants
        errors = text(app.query_one(ErrorsPanel))
        assert "Z.AI 1302 concurrency" in errors
        assert "1,800" in errors  # 900 per variant, both shown

    run(make_app(mode="both"), body)


def test_unreachable_proxy_shows_reconnecting_countdown() -> None:
    source = FixtureSource(events_error=Unreachable("cannot connect to http://fleet:9090"),
                           history_error=Unreachable("cannot connect"),
                           keys_error=Unreachable("cannot connect"))

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await settle(pilot)
        line = status(app)
        assert "reconnecting in" in line and "cannot connect" in line
        assert "waiting for data" in "".join(plot_lines(app, "rate"))
        assert "cannot connect" in text(app.query_one(LimiterPanel))

    run(make_app(source), body)


def test_401_asks_for_the_token_and_reconnects_with_it() -> None:
    source = FixtureSource(token="s3cret")

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await settle(pilot)
        assert isinstance(app.screen, TokenScreen)
        assert "401" in status(app)
        field = app.screen.query_one(Input)
        assert field.password  # never shown
        await pilot.press(*"s3cret", "enter")
        await settle(pilot)
        assert source.token == "s3cret"
        assert not isinstance(app.screen, TokenScreen)
        assert "● connected" in status(app)
        assert source.events_calls == 2

    run(make_app(source), body)


def test_empty_history_and_a_variant_without_data() -> None:
    source = FixtureSource(events=[metrics_doc(variants=("production",))],
                           history=lambda r, v: history_doc(r, variants=("production",)))

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await pilot.press("v")  # canary: nothing anywhere
        assert "no data for canary in the last 15m" in "".join(plot_lines(app, "latency"))
        await pilot.press("v")  # both: production drawn, canary named as missing
        assert "cana no data" in summary(app, "rate")
        assert "prod 25.3/s" in summary(app, "rate")

    run(make_app(source), body)


def test_history_off_is_a_notice_not_a_crash() -> None:
    source = FixtureSource(history_error=NotServed(
        "history is not recorded by this proxy (history recording is off)"), events=[])

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await settle(pilot)
        assert any("history recording is off" in str(n.message)
                   for n in app._notifications)
        assert "waiting for data" in "".join(plot_lines(app, "rate"))

    run(make_app(source), body)


def test_collector_without_keys_route_says_why() -> None:
    source = FixtureSource(keys_error=NotServed("/admin/keys is not served here"))

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await settle(pilot)
        panel = app.query_one(KeysPanel)
        assert "keys and limits are per proxy" in text(panel.query_one(".message", Static))

    run(make_app(source), body)


def test_works_at_80x24_and_every_panel_is_reachable() -> None:
    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        assert "-narrow" in app.screen.classes
        assert app.query_one("#panel-rate").region.height >= 6
        await pilot.press("k")  # jump to the keys table
        await settle(pilot)
        keys = app.query_one(KeysPanel)
        assert keys.region.y < 24 and keys.query_one(DataTable).has_focus

    run(make_app(), body, size=(80, 24))


def test_the_first_80x24_screen_shows_quota_left_and_what_failed() -> None:
    """Above the plots: the proxy-wide limits, least left first, and the range's failures by
    kind (the limiter and errors panels are below the fold at this size)."""
    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        headline = app.query_one(Headline)
        assert headline.display and headline.region.y == 1  # under the status line
        assert headline.region.bottom <= app.query_one("#panel-rate").region.y
        quota, failed = text(headline).splitlines()
        # tok/week is the tightest (7.8 % left), then req/5h (60 % left, resets in 2h 13m).
        assert quota.index("upstream tok/week 7.8% left 3d") < quota.index("req/5h 60% left")
        assert "2h 13m" in quota
        assert failed.split() == ["failed", "15m", "5xx", "1.0%", "refused", "1.5%", "z.ai",
                                  "429", "0.5%", "4xx", "2.0%", "retried", "–"]
        assert app.query_one(LimiterPanel).region.y >= 24  # the full panel: below the fold

    run(make_app(), body, size=(80, 24))


def test_a_tall_screen_shows_the_panels_instead_of_the_headline() -> None:
    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        assert not app.query_one(Headline).display
        assert app.query_one(LimiterPanel).region.y < 48

    run(make_app(), body, size=(160, 48))


def test_the_keys_table_fits_every_layout() -> None:
    """The keys table (74 columns: counts by outcome) is never cut: the whole width below
    120 columns, its own row from 120, beside limits and errors from 180, where the limits
    keep room for their labels."""
    for size, same_row in (((80, 24), False), ((160, 48), False), ((200, 50), True)):
        async def body(pilot: Pilot[None], app: ZaiproxyTui, same_row: bool = same_row) -> None:
            keys, limiter = app.query_one(KeysPanel), app.query_one(LimiterPanel)
            table = keys.query_one(DataTable)
            assert table.virtual_size.width <= table.size.width  # no horizontal scroll
            assert (keys.region.y == limiter.region.y) is same_row
            assert "upstream tok/week" in text(limiter)

        run(make_app(), body, size=size)


def test_the_tick_keeps_running_under_the_help_and_token_screens() -> None:
    """The 1 s tick updates the main screen's status line while a modal screen is active."""
    source = FixtureSource(token="s3cret")

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await settle(pilot)
        assert isinstance(app.screen, TokenScreen)
        await pilot.pause(2.5)  # two ticks and more under the token prompt
        assert app.is_running and "401" in status(app)
        await pilot.press("escape")
        await pilot.press("question_mark")
        await pilot.pause(2.5)  # and under the help overlay
        assert app.is_running and isinstance(app.screen, HelpScreen)

    run(make_app(source), body)


def test_a_late_tick_or_refresh_after_exit_is_not_an_error() -> None:
    """A timer firing while the app closes (seen once in CI: NoMatches 'StatusLine')."""
    app = make_app()

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await settle(pilot)

    run(app, body)
    app._tick()
    app._refresh()


def test_a_fleet_keys_report_says_what_it_merged_and_who_failed() -> None:
    doc = {**keys_doc(), "mode": "fleet", "targets": [
        {"target": "http://proxy-a:8080", "ok": True, "error": None},
        {"target": "http://proxy-b:8080", "ok": True, "error": None},
        {"target": "http://proxy-c:8080", "ok": False, "error": "HTTP 401: invalid token"}]}

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await settle(pilot)
        panel = app.query_one(KeysPanel)
        note = " ".join(text(panel.query_one(".message", Static)).split())  # wrapped
        assert "fleet: 3 targets" in note
        assert "1 failed: http://proxy-c:8080: HTTP 401: invalid token" in note
        assert panel.query_one(DataTable).row_count == 4

    run(make_app(FixtureSource(keys=doc)), body)


def test_a_dead_canary_shows_down_not_idle() -> None:
    """The canary's proxy stopped: the collector has its one target stale. On screen (both
    variants) the status line and the canary's panel summaries say DOWN."""
    doc = metrics_doc(NOW)
    doc["variants"]["canary"].update(targets=1, stale_targets=1, stale=True)

    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await pilot.press("v", "v")  # production -> canary -> both
        await settle(pilot)
        line = status(app)
        assert "prod+canary" in line and "canary DOWN" in line
        assert "cana DOWN" in summary(app, "rate")
        assert "prod 25.3/s" in summary(app, "rate")

    run(make_app(FixtureSource(events=[doc])), body)


def test_zai_quota_of_a_pool_in_the_panel_and_the_headline() -> None:
    """Z.AI's own quota per upstream key in the limits panel (a tall screen), and on the
    first 80×24 screen the headline's "Z.AI team-plan 5h 42% used"; a new /admin/keys
    answer (backup's poller recovered) shows at the next refresh."""
    source = FixtureSource(keys=pool_keys_doc())

    async def tall(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await settle(pilot)
        lines = [" ".join(x.split()) for x in text(app.query_one(LimiterPanel)).splitlines()]
        panel = "\n".join(lines)
        assert "Z.AI quota · 2 upstream keys" in panel
        assert "team-plan headroom 58% pro sampled 13s ago" in panel
        five = next(x for x in lines if "Z.AI 42%" in x)
        assert "5h" in five and "· local 38%" in five and "resets in 2h 13m" in five
        assert "paced 1.50 req/s (5h)" in panel
        assert "backup resting until 04:05 (quota)" in panel
        assert "STALE: sampled" in panel and "last poll: error" in panel
        assert "reserve reached — 429 until 04:06 (5h)" in panel
        # backup's quota API answers again: a fresh sample, no longer failing.
        doc = pool_keys_doc()
        doc["zai_quota"][1] = zai_quota_doc("backup", 0.2, 0.3, age=2.0)
        source.keys_doc = doc
        app._load_keys()
        await settle(pilot)
        panel = " ".join(text(app.query_one(LimiterPanel)).split())
        assert "STALE" not in panel and "last poll" not in panel and "Z.AI 20%" in panel

    run(make_app(source), tall)

    async def small(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        quota = text(app.query_one(Headline)).splitlines()[0]
        assert quota.split()[:7] == ["quota", "Z.AI", "team-plan", "5h", "42%", "used",
                                     "2h"]

    run(make_app(FixtureSource(keys=pool_keys_doc())), small, size=(80, 24))


def test_zai_quota_not_polled_is_one_muted_line() -> None:
    async def body(pilot: Pilot[None], app: ZaiproxyTui) -> None:
        await settle(pilot)
        panel = text(app.query_one(LimiterPanel))
        assert "Z.AI quota: not polled (ZAIPROXY_QUOTA_POLL)" in panel
        quota = text(app.query_one(Headline)).splitlines()[0]
        assert quota.split()[:4] == ["quota", "upstream", "tok/week", "7.8%"]  # as before

    run(make_app(), body, size=(80, 24))
