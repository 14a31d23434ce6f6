"""A braille line chart with a real time axis, for the monitoring panels.

Drawing is a pure function, :func:`render_plot` (series in, one ``rich.text.Text``
per terminal row out, no Textual), and :class:`TimePlot` is a thin widget that
caches its output until the data, the size or the theme changes.

Layout of a ``width`` x ``height`` area::

    120┤      ⡠⠊⠉⠢⡀      <- top label = y max; ┤ marks a labelled row
       │    ⡠⠊    ⠈⠢
     60┤  ⡠⠊              <- middle label when height >= 5
       │⢀⠔⠁
      0┤⠁                 <- bottom label = y min
      12:00    12:10      <- x tick labels, centred on their tick; colliding ones skipped

Each terminal cell holds a 2x4 braille dot matrix (U+2800 block), the resolution
plotille/drawille and the Unicode plots in btop use. Segments are rasterised
with Bresenham, so the cost is linear in points plus dots drawn, never in
points x columns (about 1.5 µs a visible point; 1800 points x 3 series at
60x12 render in ~10 ms).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Final

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

__all__ = ["PlotSeries", "TimePlot", "default_format", "render_plot"]


@dataclass(frozen=True, slots=True)
class PlotSeries:
    """One line: ``points`` are (unix seconds, value) in time order; a ``None`` value is a gap."""

    label: str
    points: Sequence[tuple[float, float | None]]
    color: str  # a Rich colour: "#3b82f6", "red", ...


_SMALL_SI: Final = ((1e-3, "m"), (1e-6, "µ"), (1e-9, "n"))
_LARGE_SI: Final = ("", "k", "M", "G", "T", "P", "E")


def _mantissa(x: float) -> str:
    """One decimal below 10 ("1.2", "3"), whole numbers above ("12", "340")."""
    s = f"{x:.1f}" if x < 9.95 else f"{x:.0f}"
    return s[:-2] if s.endswith(".0") else s


def default_format(value: float) -> str:
    """Compact SI: 0, 0.5, 12, 1.2k, 3.4M (and 5m, 20µ below 0.01)."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    sign, a = ("-" if value < 0 else ""), abs(value)
    if a < 0.01:
        for scale, prefix in _SMALL_SI:
            if a >= scale or prefix == "n":
                return f"{sign}{_mantissa(a / scale)}{prefix}"
    if a < 1:
        return f"{sign}{a:.2g}"
    exp = min(int(math.log10(a) // 3), len(_LARGE_SI) - 1)
    text = _mantissa(a / 1000**exp)
    if float(text) >= 1000 and exp + 1 < len(_LARGE_SI):  # 999.7 rounds to "1000": say "1k"
        exp += 1
        text = _mantissa(a / 1000**exp)
    return f"{sign}{text}{_LARGE_SI[exp]}"


# Braille dot bits by (row within cell, column within cell): U+2800 + OR of bits.
_BRAILLE_BITS: Final = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))

# "Nice" tick steps in seconds; larger spans keep doubling the last one.
_TICK_STEPS: Final = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800,
                      3600, 7200, 10800, 21600, 43200, 86400, 2 * 86400, 7 * 86400,
                      14 * 86400)
_DAY: Final = 86400
_WEEK_PHASE: Final = 4 * _DAY  # 1970-01-01 was a Thursday; weekly ticks fall on Mondays


def _nice_step(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= x (x > 0)."""
    base = 10.0 ** math.floor(math.log10(x))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * base >= x * (1 - 1e-9):
            return m * base
    return 10 * base


def _y_range(values: list[float], y_min: float | None, y_max: float | None) -> tuple[float, float]:
    """Fixed ends as given; auto ends from the data with ~10% headroom, rounded to a nice step."""
    lo = y_min if y_min is not None else (min(values) if values else 0.0)
    hi = y_max if y_max is not None else (max(values) if values else 1.0)
    if hi <= lo:  # constant data, all zeros, no data, or a fixed end beyond the data
        d = max(abs(lo), abs(hi)) * 0.1 or 1.0
        if y_max is not None and y_min is None:
            lo = hi - d
        elif y_min is not None and y_max is None and lo == 0:
            hi = 1.0  # all zeros: 0..1
        elif y_min is not None or y_max is not None:
            hi = lo + d
        else:
            lo, hi = lo - d, hi + d
    elif values:
        pad = (hi - lo) * 0.1
        if y_max is None:
            hi += pad
        if y_min is None:
            lo = lo - pad if lo < 0 or lo - pad >= 0 else 0.0  # positive data stays positive
    step = _nice_step((hi - lo) / 10)
    if y_max is None:
        hi = math.ceil(hi / step - 1e-9) * step
    if y_min is None:
        lo = math.floor(lo / step + 1e-9) * step
    return lo, hi


def _local(t: float, tz: datetime.tzinfo | None) -> datetime.datetime:
    """``t`` in ``tz``; ``None`` = the machine's local zone (with its DST rules)."""
    if tz is None:
        return datetime.datetime.fromtimestamp(t).astimezone()
    return datetime.datetime.fromtimestamp(t, tz)


def _x_axis(start: float, end: float, width: int, plot_x: int, plot_w: int,
            tz: datetime.tzinfo | None) -> str:
    """The bottom row: labels at nice times, centred on their tick, skipped if they collide."""
    span = end - start
    if span < 120:
        label_w, min_step = 8, 1
        def fmt(d: datetime.datetime) -> str:
            return f"{d:%H:%M:%S}"
    elif span < 2 * _DAY:
        label_w, min_step = 5, 60
        def fmt(d: datetime.datetime) -> str:
            return f"{d:%H:%M}"
    else:
        label_w, min_step = 6, _DAY
        def fmt(d: datetime.datetime) -> str:
            return f"{d:%a} {d.day}"
    row = [" "] * width
    if plot_w < 1:
        return "".join(row)
    # Two blank cells between neighbouring labels at least.
    need = span * (label_w + 2) / plot_w
    step = next((s for s in _TICK_STEPS if s >= need and s >= min_step), _TICK_STEPS[-1])
    while step < need:
        step *= 2
    offset = (_local(start, tz).utcoffset() or datetime.timedelta()).total_seconds()
    phase = _WEEK_PHASE if step % (7 * _DAY) == 0 else 0
    t = math.ceil((start + offset - phase) / step) * step - offset + phase
    last_end = -1
    dots = 2 * plot_w - 1
    while t <= end:
        col = plot_x + int((t - start) / span * dots + 0.5) // 2
        label = fmt(_local(t, tz))
        left = col - len(label) // 2
        if left >= 0 and left + len(label) <= width and left > last_end:
            row[left:left + len(label)] = label
            last_end = left + len(label)
        t += step
    return "".join(row)


class _Canvas:
    """A braille grid: per cell the dot bits and the index of the last series that drew there."""

    __slots__ = ("bits", "dot_h", "dot_w", "owner", "width")

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.dot_w, self.dot_h = 2 * width, 4 * height
        self.bits = [0] * (width * height)
        self.owner = [-1] * (width * height)

    def dot(self, x: int, y: int, owner: int) -> None:
        if 0 <= x < self.dot_w and 0 <= y < self.dot_h:
            cell = (y >> 2) * self.width + (x >> 1)
            self.bits[cell] |= _BRAILLE_BITS[y & 3][x & 1]
            self.owner[cell] = owner

    def line(self, x0: int, y0: int, x1: int, y1: int, owner: int) -> None:
        """Bresenham, all octants."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, owner)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy


def _draw(canvas: _Canvas, points: Sequence[tuple[float, float | None]], owner: int,
          start: float, end: float, lo: float, hi: float) -> None:
    x_scale = (canvas.dot_w - 1) / (end - start)
    y_dots = canvas.dot_h - 1
    y_scale = y_dots / (hi - lo)
    isfinite = math.isfinite

    def to_dot(t: float, v: float) -> tuple[int, int]:
        y = min(max((hi - v) * y_scale, 0.0), y_dots)  # clamp to the frame
        return int((t - start) * x_scale + 0.5), int(y + 0.5)

    prev: tuple[float, float] | None = None
    prev_dot: tuple[int, int] | None = None  # prev's dot when prev is inside [start, end]
    for t, v in points:
        if v is None or not isfinite(v):
            prev = prev_dot = None
            continue
        inside = start <= t <= end
        dot = to_dot(t, v) if inside else None
        if prev is None:
            if dot is not None:
                canvas.dot(*dot, owner)  # a lone point shows as one dot
        elif prev_dot is not None and dot is not None:
            # The common case, both ends visible; dense data often repeats a dot.
            if dot != prev_dot:
                canvas.line(*prev_dot, *dot, owner)
        else:
            (t0, v0), (t1, v1) = sorted((prev, (t, v)))
            if t1 >= start and t0 <= end:  # clip the segment to [start, end]
                if t0 < start:
                    v0 += (v1 - v0) * (start - t0) / (t1 - t0)
                    t0 = start
                if t1 > end:
                    v1 -= (v1 - v0) * (t1 - end) / (t1 - t0)
                    t1 = end
                canvas.line(*to_dot(t0, v0), *to_dot(t1, v1), owner)
        prev, prev_dot = (t, v), dot


def render_plot(series: Sequence[PlotSeries], start: float, end: float, width: int, height: int,
                *, y_format: Callable[[float], str] = default_format,
                tz: datetime.tzinfo | None = None, y_min: float | None = 0.0,
                y_max: float | None = None, axis_style: Style | str = "dim") -> list[Text]:
    """Draw ``series`` over ``[start, end]``: ``height`` rows, each exactly ``width`` cells.

    The y range is ``y_min``..``y_max``; an end given as ``None`` comes from the data
    (with headroom, rounded to a nice number). Values outside it are clamped to the frame.
    """
    if height <= 0:
        return []
    if width <= 0:
        return [Text() for _ in range(height)]
    if not end > start:
        end = start + 1.0
    plot_h = height - 1 if height >= 2 else height
    values = [v for s in series for t, v in s.points
              if v is not None and math.isfinite(v) and start <= t <= end]
    lo, hi = _y_range(values, y_min, y_max)

    labels: dict[int, str] = {0: y_format(hi)}
    if plot_h >= 2:
        labels[plot_h - 1] = y_format(lo)
    if plot_h >= 4:
        labels[int((4 * plot_h - 1) / 2 / 4)] = y_format((lo + hi) / 2)
    gutter = max(len(s) for s in labels.values()) + 1
    if width - gutter < 2:
        gutter = 0  # too narrow for labels: the plot matters more
    plot_w = width - gutter

    canvas = _Canvas(plot_w, plot_h)
    for index, s in enumerate(series):
        _draw(canvas, s.points, index, start, end, lo, hi)
    styles = [Style(color=s.color) for s in series]

    rows: list[Text] = []
    for r in range(plot_h):
        text = Text(no_wrap=True, end="")
        if gutter:
            mark = "┤" if r in labels else "│"
            text.append(labels.get(r, "").rjust(gutter - 1)[-(gutter - 1):] + mark, axis_style)
        base = r * plot_w
        run_owner = -1
        run: list[str] = []
        for cell in range(base, base + plot_w):
            bits = canvas.bits[cell]
            owner = canvas.owner[cell] if bits else -1
            if owner != run_owner and run:
                text.append("".join(run), styles[run_owner] if run_owner >= 0 else None)
                run = []
            run_owner = owner
            run.append(chr(0x2800 + bits) if bits else " ")
        if run:
            text.append("".join(run), styles[run_owner] if run_owner >= 0 else None)
        rows.append(text)
    if height >= 2:
        # Styles go on spans, not Text.style: Text.render() ignores the latter.
        axis = Text(no_wrap=True, end="")
        axis.append(_x_axis(start, end, width, gutter, plot_w, tz), axis_style)
        rows.append(axis)
    return rows


def _message_rows(message: str, width: int, height: int, style: Style) -> list[Text]:
    rows = [Text(" " * width, end="") for _ in range(height)]
    if height > 0 and width > 0:
        shown = message[:width]
        left = (width - len(shown)) // 2
        row = rows[(height - 1) // 2] = Text(" " * left, end="")
        row.append(shown, style)
        row.append(" " * (width - left - len(shown)))
    return rows


class TimePlot(Widget):
    """A braille time-series chart; feed it with :meth:`set_data`.

    Axis labels use the ``timeplot--axis`` component class (``$text-muted``), the
    lines their series' colours. The rendered rows are cached until the data, the
    size or the styles change, so a repaint with nothing new costs a dict lookup.
    """

    COMPONENT_CLASSES = {"timeplot--axis"}
    DEFAULT_CSS = """
    TimePlot {
        height: 10;
    }
    TimePlot > .timeplot--axis {
        color: $text-muted;
    }
    """

    def __init__(self, *, y_format: Callable[[float], str] = default_format,
                 tz: datetime.tzinfo | None = None, name: str | None = None,
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self._y_format = y_format
        self._tz = tz
        self._series: tuple[PlotSeries, ...] = ()
        self._start = 0.0
        self._end = 1.0
        self._y_min: float | None = 0.0
        self._y_max: float | None = None
        self._message: str | None = ""  # blank until the first set_data
        self._generation = 0
        self._cache_key: Hashable = None
        self._strips: list[Strip] = []

    def set_data(self, series: Sequence[PlotSeries], start: float, end: float, *,
                 y_min: float | None = 0.0, y_max: float | None = None,
                 message: str | None = None) -> None:
        """Show ``series`` over ``[start, end]``, or ``message`` centred instead when given."""
        self._series = tuple(series)
        self._start, self._end = start, end
        self._y_min, self._y_max = y_min, y_max
        self._message = message
        self._generation += 1
        self.refresh()

    def _lines(self) -> list[Strip]:
        width, height = self.size
        base = self.visual_style.rich_style
        # The full component style: a partial one would drop $text-muted's alpha blend.
        axis = self.get_component_rich_style("timeplot--axis")
        key = (width, height, self._generation, base, axis)
        if key != self._cache_key:
            if self._message is not None:
                texts = _message_rows(self._message, width, height, axis)
            else:
                texts = render_plot(self._series, self._start, self._end, width, height,
                                    y_format=self._y_format, tz=self._tz, y_min=self._y_min,
                                    y_max=self._y_max, axis_style=axis)
            console = self.app.console
            self._strips = [
                Strip(Segment.apply_style(text.render(console), base), width) for text in texts
            ]
            self._cache_key = key
        return self._strips

    def render_line(self, y: int) -> Strip:
        lines = self._lines()
        if 0 <= y < len(lines):
            return lines[y]
        return Strip.blank(self.size.width, self.visual_style.rich_style)
