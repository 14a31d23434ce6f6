"""The Textual app: composes the screen and routes messages (no data logic here).

What happens where:
- the source (:mod:`zaiproxy_tui.source`) talks HTTP and follows the live feed; its
  reports arrive as messages (:mod:`zaiproxy_tui.messages`) posted from workers;
- the :class:`~zaiproxy_tui.state.Dashboard` keeps what was received and the
  operator's choices;
- :mod:`zaiproxy_tui.views` turns that into what each widget shows;
- this module wires key bindings to the dashboard and pushes fresh views to the
  widgets (every message, plus a 1 s tick for countdowns and the stale badge).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, VerticalScroll
from textual.timer import Timer
from textual.widgets import Footer

from zaiproxy_tui.headline import headline_view
from zaiproxy_tui.messages import FeedReported, HistoryFailed, HistoryLoaded, KeysFailed, KeysLoaded
from zaiproxy_tui.model import RANGES
from zaiproxy_tui.quota_view import zai_quota_view
from zaiproxy_tui.source import (
    AuthRequired,
    FeedEvent,
    NotServed,
    Source,
    SourceError,
    Unauthorized,
    follow,
)
from zaiproxy_tui.state import Dashboard
from zaiproxy_tui.views import (
    METRICS,
    Y_FORMATS,
    error_rows,
    key_lines,
    keys_message,
    limiter_view,
    panel_views,
    status_view,
)
from zaiproxy_tui.widgets.panels import ErrorsPanel, KeysPanel, LimiterPanel, PlotPanel
from zaiproxy_tui.widgets.screens import HelpScreen, TokenScreen
from zaiproxy_tui.widgets.status import Headline, StatusLine

KEYS_REFRESH_S = 5.0
HELP = {
    "cycle_variant": "variant: production → each other variant → both (overlaid)",
    "step_range(1)": "longer time range (re-queries history)",
    "step_range(-1)": "shorter time range",
    "toggle_pause": "pause / resume the display (data keeps arriving)",
    "sort_keys": "sort the keys table by the next column (or click a header)",
    "focus_keys": "jump to the keys table",
    "toggle_theme": "light / dark theme",
    "ask_token": "enter the admin token",
    "help": "this help",
    "quit": "quit",
}


class ZaiproxyTui(App[None]):
    """``zaiproxy tui``: live and historical monitoring of a proxy or a fleet."""

    TITLE = "zaiproxy"
    ENABLE_COMMAND_PALETTE = False
    CSS_PATH = "tui.tcss"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide"), (180, "-xwide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("v", "cycle_variant", "Variant"),
        Binding("r", "step_range(1)", "Range+"),
        Binding("R", "step_range(-1)", "Range-"),
        *(Binding(str(i + 1), f"set_range('{name}')", f"Range {name}", show=False)
          for i, name in enumerate(RANGES)),
        Binding("p", "toggle_pause", "Pause"),
        Binding("s", "sort_keys", "Sort"),
        Binding("k", "focus_keys", "Keys"),
        Binding("t", "toggle_theme", "Theme"),
        Binding("a", "ask_token", "Token"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, source: Source, *, url: str, clock: Callable[[], float] = time.time,
                 tz: dt.tzinfo | None = None, range_: str = "15m", mode: str = "production",
                 dark: bool = True) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.tz = tz
        self.dashboard = Dashboard(url, range_=range_, mode=mode)
        self.theme = "textual-dark" if dark else "textual-light"
        self._history_timer: Timer | None = None
        self._sort = ("requests", True)

    # ---- composition -----------------------------------------------------------------

    def compose(self) -> ComposeResult:
        # Held, not queried on every tick: a timer or message that comes in while the app
        # closes finds its widget detached (and does nothing) instead of raising NoMatches.
        self._status = StatusLine(id="status")
        self._headline = Headline(id="headline")
        self._plots = {m.key: PlotPanel(m.key, y_format=Y_FORMATS[m.y_format], tz=self.tz)
                       for m in METRICS}
        self._limiter = LimiterPanel(id="limiter")
        self._errors = ErrorsPanel(id="errors")
        self._keys = KeysPanel()
        yield self._status
        yield self._headline
        with VerticalScroll(id="main"):
            with Grid(id="plots"):
                yield from self._plots.values()
            with Grid(id="tables"):
                yield self._limiter
                yield self._errors
                yield self._keys
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = self.dashboard.url
        self._start_feed()
        self._load_history()
        self._load_keys()
        self.set_interval(1.0, self._tick)
        self.set_interval(KEYS_REFRESH_S, self._load_keys)
        self._history_timer = self.set_interval(self.dashboard.history_refresh_s(),
                                                self._load_history)
        self._refresh()

    # ---- workers: they only post messages ----------------------------------------------

    def _start_feed(self) -> None:
        def emit(event: FeedEvent) -> None:
            self.post_message(FeedReported(event))

        self.run_worker(follow(self.source, emit, clock=self.clock), group="feed",
                        exclusive=True, exit_on_error=False)

    @work(group="history", exclusive=True, exit_on_error=False)
    async def _load_history(self) -> None:
        range_ = self.dashboard.range
        try:
            history = await self.source.history(range_, "all")
        except Unauthorized as exc:
            self.post_message(FeedReported(AuthRequired(str(exc))))
        except SourceError as exc:
            self.post_message(HistoryFailed(range_, str(exc)))
        else:
            self.post_message(HistoryLoaded(history))

    @work(group="keys", exclusive=True, exit_on_error=False)
    async def _load_keys(self) -> None:
        try:
            report = await self.source.keys()
        except Unauthorized as exc:
            self.post_message(FeedReported(AuthRequired(str(exc))))
        except NotServed as exc:
            # Collectors answer /admin/keys since the fleet merge; an older one does not.
            self.post_message(KeysFailed(f"keys and limits are per proxy on this (older) "
                                         f"collector: upgrade it or point the TUI at a "
                                         f"proxy ({exc})"))
        except SourceError as exc:
            self.post_message(KeysFailed(str(exc)))
        else:
            self.post_message(KeysLoaded(report))

    # ---- messages -------------------------------------------------------------------------

    def on_feed_reported(self, message: FeedReported) -> None:
        was = self.dashboard.connection.kind
        self.dashboard.apply(message.event, self.clock())
        if isinstance(message.event, AuthRequired) and was != "auth":
            self.action_ask_token()
        self._refresh()

    def on_history_loaded(self, message: HistoryLoaded) -> None:
        self.dashboard.set_history(message.history)
        self._reschedule_history()
        self._refresh()

    def on_history_failed(self, message: HistoryFailed) -> None:
        if message.range == self.dashboard.range:
            self.dashboard.set_history_error(message.message)
            self._refresh()

    def on_keys_loaded(self, message: KeysLoaded) -> None:
        self.dashboard.set_keys(message.report)
        self._refresh()

    def on_keys_failed(self, message: KeysFailed) -> None:
        self.dashboard.set_keys_error(message.message)
        self._refresh()

    def on_keys_panel_sort_changed(self, message: KeysPanel.SortChanged) -> None:
        self._sort = (message.column, message.reverse)
        self._refresh()

    # ---- pushing views into widgets -------------------------------------------------------

    def _tick(self) -> None:
        """Countdowns and the stale badge; the panels move when data arrives."""
        if not self._status.is_attached:
            return  # the app is closing: its widgets are gone, a late timer is not an error
        self._status.show(status_view(self.dashboard, self.clock()))

    def _refresh(self) -> None:
        if not self._status.is_attached:
            return
        d, now = self.dashboard, self.clock()
        self._status.show(status_view(d, now))
        if d.paused:
            return
        self._headline.show(headline_view(d, now, self.tz))
        for view in panel_views(d, now):
            self._plots[view.key].show(view)
        self._limiter.show(limiter_view(d, self.tz), zai_quota_view(d, now, self.tz))
        rows, note = error_rows(d, now)
        self._errors.show(rows, note)
        self._keys.show(key_lines(d, *self._sort), keys_message(d))
        if d.history_error:
            self.notify(d.history_error, title="history", severity="warning", timeout=6)
            d.history_error = None

    def _reschedule_history(self) -> None:
        if self._history_timer is not None:
            self._history_timer.stop()
        self._history_timer = self.set_interval(self.dashboard.history_refresh_s(),
                                                self._load_history)

    # ---- actions ---------------------------------------------------------------------------

    def action_cycle_variant(self) -> None:
        self.dashboard.cycle_mode()
        self._refresh()

    def action_step_range(self, step: int) -> None:
        if self.dashboard.step_range(step):
            self._range_changed()

    def action_set_range(self, range_: str) -> None:
        if self.dashboard.set_range(range_):
            self._range_changed()

    def _range_changed(self) -> None:
        self._load_history()
        self._refresh()

    def action_toggle_pause(self) -> None:
        self.dashboard.paused = not self.dashboard.paused
        self._refresh()

    def action_sort_keys(self) -> None:
        self._keys.cycle_sort()

    def action_focus_keys(self) -> None:
        panel = self._keys
        panel.scroll_visible()
        panel.query_one("DataTable").focus()

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"
        self._refresh()

    def action_help(self) -> None:
        shown = [(self.get_key_display(b), HELP.get(b.action, b.description))
                 for b in self._help_bindings()]
        shown.insert(3, ("1-6", "range " + " / ".join(RANGES)))
        self.push_screen(HelpScreen(shown))

    def _help_bindings(self) -> list[Binding]:
        out = []
        for b in self.BINDINGS:
            if isinstance(b, Binding) and b.description and not b.key.isdigit():
                out.append(b)
        return out

    def action_ask_token(self) -> None:
        if isinstance(self.screen, TokenScreen):
            return
        message = self.dashboard.connection.error or "enter the admin token"
        self.push_screen(TokenScreen(self.dashboard.url, message), self._token_entered)

    def _token_entered(self, token: str | None) -> None:
        if not token:
            return
        setter = getattr(self.source, "set_token", None)
        if setter is not None:
            setter(token)
        self.dashboard.connection = self.dashboard.connection.__class__("connecting")
        self._start_feed()
        self._load_history()
        self._load_keys()
        self._refresh()
