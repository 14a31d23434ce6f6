"""The one-line status bar: connection, staleness, what is shown, the headline numbers."""

from __future__ import annotations

from textual.widgets import Static

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
