"""The one-line status bar (connection, staleness, what is shown, the numbers now) and the
headline under it (quota left, what failed over the range)."""

from __future__ import annotations

from rich.console import Group
from textual.widgets import Static

from zaiproxy_tui.headline import HeadlineView
from zaiproxy_tui.views import Segment
from zaiproxy_tui.widgets.palette import segments


class StatusLine(Static):
    DEFAULT_CSS = """
    StatusLine { height: 1; padding: 0 1; background: $panel; }
    """

    _shown: tuple[object, ...] = ()

    def show(self, parts: list[Segment]) -> None:
        dark = self.app.current_theme.dark
        key = (dark, *parts)
        if key != self._shown:  # an unchanged line costs no repaint
            self._shown = key
            self.update(segments(parts, dark))


class Headline(Static):
    """Quota left and what failed, two compact rows (``zaiproxy_tui.headline``); shown on
    short terminals, where the full panels are below the fold."""

    DEFAULT_CSS = """
    Headline { height: 2; padding: 0 1; }
    """

    _shown: tuple[object, ...] = ()

    def show(self, view: HeadlineView) -> None:
        dark = self.app.current_theme.dark
        key = (dark, view)
        if key != self._shown:
            self._shown = key
            self.update(Group(segments(list(view.quota), dark), segments(list(view.failed), dark)))
