"""The dashboard's panels: small widgets that draw one view each (see :mod:`zaiproxy_tui.views`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from zaiproxy_tui.quota_view import ZaiQuotaView
from zaiproxy_tui.views import (
    KEY_COLUMNS,
    ErrorRow,
    KeyLine,
    LimiterView,
    PanelView,
    fmt_count,
    fmt_rate,
)
from zaiproxy_tui.widgets.palette import color, segments, style
from zaiproxy_tui.widgets.timeplot import PlotSeries, TimePlot


def _title(title: str, legend: tuple[tuple[str, str], ...], dark: bool) -> Text:
    text = Text(title)
    for label, role in legend:
        text.append(" ")
        text.append("━" + label, style=style(role, dark))
    return text


class PlotPanel(Vertical):
    """A titled plot with a legend and a one-line summary under the title."""

    DEFAULT_CSS = """
    PlotPanel { border: round $primary 40%; border-title-color: $foreground;
                border-title-style: bold; padding: 0 0; }
    PlotPanel > .summary { height: 1; padding: 0 1; }
    PlotPanel > TimePlot { height: 1fr; }
    """

    def __init__(self, key: str, *, y_format: Callable[[float], str],
                 tz: dt.tzinfo | None = None) -> None:
        super().__init__(id=f"panel-{key}", classes="panel")
        self.key = key
        self._tz = tz
        self._y_format = y_format
        self._shown: tuple[bool, PanelView] | None = None

    def compose(self) -> ComposeResult:
        yield Static(classes="summary")
        yield TimePlot(y_format=self._y_format, tz=self._tz)

    def show(self, view: PanelView) -> None:
        dark = self.app.current_theme.dark
        if (dark, view) == self._shown:
            return  # nothing new: no repaint
        self._shown = (dark, view)
        self.border_title = _title(view.title, view.legend, dark)
        self.query_one(".summary", Static).update(segments(view.summary, dark))
        series = [PlotSeries(s.label, s.points, color(s.role, dark) or "white")
                  for s in view.series]
        self.query_one(TimePlot).set_data(series, view.start, view.end, message=view.message)


class TablePanel(Static):
    """A titled panel whose content is one Rich renderable (tables, text)."""

    DEFAULT_CSS = """
    TablePanel { border: round $primary 40%; border-title-color: $foreground;
                  border-title-style: bold; padding: 0 1; height: auto; }
    """
    TITLE = ""
    _shown: tuple[object, ...] = ()

    def on_mount(self) -> None:
        self.border_title = self.TITLE

    def changed(self, *view: object) -> bool:
        """False when ``view`` is what is shown already (no repaint, no layout)."""
        if view == self._shown:
            return False
        self._shown = view
        return True


class LimiterPanel(TablePanel):
    """The adaptive upstream rate, every proxy-wide limit (used %, left %, resets in), and
    Z.AI's own quota per upstream key (``zaiproxy_tui.quota_view``)."""

    TITLE = "Rate limiter & quotas"

    def show(self, view: LimiterView, quota: ZaiQuotaView | None = None) -> None:
        dark = self.app.current_theme.dark
        if not self.changed(dark, view, quota):
            return
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column("limit", no_wrap=True, overflow="ellipsis")
        table.add_column("bar", ratio=1, no_wrap=True)
        table.add_column("used", justify="right", no_wrap=True)
        table.add_column("left", justify="right", no_wrap=True)
        table.add_column("resets", justify="right", no_wrap=True)
        if view.rows:
            table.add_row(*(Text(h, style="dim") for h in ("", "", "used", "left", "resets")))
        for row in view.rows:
            role = "error" if row.limited else "warn" if row.used_share >= 0.8 else "ok"
            table.add_row(row.label, _Bar(row.used_share, color(role, dark) or "green"),
                          row.used_pct, Text(row.left, style=style(role, dark)), row.resets)
        parts: list[RenderableType] = []
        if view.adaptive:
            parts.append(segments(view.adaptive, dark))
        parts.append(table)
        if view.message:
            parts.append(Text(view.message, style="dim"))
        if quota is not None:
            parts += _quota_parts(quota, dark)
        self.update(Group(*parts))


def _quota_parts(view: ZaiQuotaView, dark: bool) -> list[RenderableType]:
    """Z.AI's quota: a title line, then per upstream key its line (wrapped when long: a
    resting key with a stale sample says a lot), a bar per window (Z.AI's used share; a stale
    sample's bars dim) and its pacing lines. The keys' tables share their column widths, so
    their bars line up."""
    parts: list[RenderableType] = []
    if view.head:
        head = segments(view.head, dark)
        head.no_wrap, head.overflow = False, "fold"
        parts.append(head)
    rows = [row for group in view.groups for row in group.rows]
    widths = {name: max((len(getattr(row, name)) for row in rows), default=0)
              for name in ("label", "zai", "local", "resets")}
    for group in view.groups:
        if group.head:
            head = segments(group.head, dark)
            head.no_wrap, head.overflow = False, "fold"
            parts.append(head)
        if group.rows:
            table = Table.grid(padding=(0, 1), expand=True)
            table.add_column("window", no_wrap=True, min_width=widths["label"] + 2)
            table.add_column("bar", ratio=1, no_wrap=True)
            table.add_column("zai", justify="right", no_wrap=True, min_width=widths["zai"])
            if widths["local"]:
                table.add_column("local", no_wrap=True, min_width=widths["local"])
            table.add_column("resets", justify="right", no_wrap=True,
                             min_width=widths["resets"])
            for row in group.rows:
                colour = "grey50" if row.role == "muted" else color(row.role, dark) or "green"
                cells: list[RenderableType] = [
                    f"  {row.label}", _Bar(row.used_share, colour),
                    Text(row.zai, style=style(row.role, dark))]
                if widths["local"]:
                    cells.append(Text(row.local, style="dim"))
                table.add_row(*cells, row.resets)
            parts.append(table)
        parts += [segments(note, dark) for note in group.notes]
    return parts


class _Bar:
    """A horizontal bar that fills the column it is given (Rich renderable)."""

    def __init__(self, share: float, colour: str) -> None:
        self.share, self.colour = share, colour

    def __rich_console__(self, console, options):  # type: ignore[no-untyped-def]
        width = max(1, options.max_width)
        eighths = round(self.share * width * 8)
        full, part = divmod(eighths, 8)
        bar = "█" * full + (" ▏▎▍▌▋▊▉"[part] if part and full < width else "")
        yield Text(bar.ljust(width, "·")[:width], style=self.colour)

    def __rich_measure__(self, console, options):  # type: ignore[no-untyped-def]
        from rich.measure import Measurement
        return Measurement(4, options.max_width)


class ErrorsPanel(TablePanel):
    """Errors and retries by class: per second now and the count over the range."""

    TITLE = "Errors & retries"

    def show(self, rows: list[ErrorRow], note: str) -> None:
        dark = self.app.current_theme.dark
        if not self.changed(dark, tuple(rows), note):
            return
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column("class", ratio=1, no_wrap=True, overflow="ellipsis")
        table.add_column("now", justify="right", no_wrap=True)
        table.add_column("count", justify="right", no_wrap=True)
        table.add_row(Text("class", style="dim"), Text("now", style="dim"),
                      Text(note, style="dim"))
        for row in rows:
            if row.role == "header":
                table.add_row(Text(row.label, style="dim"), "", "")
                continue
            active = bool(row.total) or bool(row.now)
            table.add_row(Text(row.label, style=style(row.role if active else "muted", dark)),
                          fmt_rate(row.now), fmt_count(row.total))
        self.update(table)


class KeysPanel(Vertical):
    """Per client key: state, usage and the quota it has least of. Sortable by any column."""

    DEFAULT_CSS = """
    KeysPanel { border: round $primary 40%; border-title-color: $foreground;
                border-title-style: bold; height: auto; max-height: 16; }
    KeysPanel > DataTable { height: auto; max-height: 13; }
    KeysPanel > .message { padding: 0 1; color: $text-muted; }
    """

    class SortChanged(Message):
        def __init__(self, column: str, reverse: bool) -> None:
            super().__init__()
            self.column, self.reverse = column, reverse

    def __init__(self) -> None:
        super().__init__(id="keys")
        self.sort_column = "requests"
        self.reverse = True
        self._shown: tuple[bool, list[KeyLine], str | None] | None = None

    def compose(self) -> ComposeResult:
        yield Static(classes="message")
        table: DataTable[Text | str] = DataTable(cursor_type="row", zebra_stripes=True)
        for label, key in KEY_COLUMNS:
            table.add_column(label, key=key)
        yield table

    def on_mount(self) -> None:
        self._set_title()

    def _set_title(self) -> None:
        label = next(lbl for lbl, key in KEY_COLUMNS if key == self.sort_column)
        self.border_title = f"Keys · sorted by {label} {'↓' if self.reverse else '↑'}"

    def cycle_sort(self) -> None:
        keys = [key for _, key in KEY_COLUMNS]
        self.sort_column = keys[(keys.index(self.sort_column) + 1) % len(keys)]
        self.reverse = self.sort_column not in ("key", "state", "left", "resets")
        self._set_title()
        self.post_message(self.SortChanged(self.sort_column, self.reverse))

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        column = str(event.column_key.value)
        if column == self.sort_column:
            self.reverse = not self.reverse
        else:
            self.sort_column = column
        self._set_title()
        self.post_message(self.SortChanged(self.sort_column, self.reverse))

    def show(self, lines: list[KeyLine], message: str | None) -> None:
        dark = self.app.current_theme.dark
        if (dark, lines, message) == self._shown:
            return
        self._shown = (dark, lines, message)
        self.query_one(".message", Static).update(message or "")
        self.query_one(".message", Static).display = bool(message)
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for line in lines:  # the cells of KEY_COLUMNS, as the view made them
            table.add_row(*(Text(text, style=style(role, dark)) if role else text
                            for text, role in line.cells()), key=line.alias)
        if lines:
            table.move_cursor(row=min(cursor, len(lines) - 1))
