"""TimePlot: the pure renderer by exact rows and columns, the widget through App.run_test().

Tests are sync on purpose: the repo runs pytest-trio in trio_mode, which would take
over an ``async def`` test, and Textual needs asyncio, so the one App test wraps
``asyncio.run``. Expected tick columns are worked out in the comments; with a 60-wide
area and y labels "100"/"50"/"0" the gutter is 4 cells, the plot 56 cells = 112 dot
columns, and time t sits on dot round((t - start) / span * 111), cell = dot // 2.
"""

from __future__ import annotations

import asyncio
import datetime
import re

import pytest
from rich.console import Console
from rich.text import Text
from textual.app import App, ComposeResult

from zaiproxy_tui.widgets.timeplot import PlotSeries, TimePlot, default_format, render_plot

UTC = datetime.UTC
T0 = 1_699_999_800.0  # 2023-11-14 22:10:00 UTC
NOON = 1_699_963_200.0  # 2023-11-14 12:00:00 UTC
MONDAY = 1_704_067_200.0  # 2024-01-01 00:00:00 UTC, a Monday
BLANK = " "


def plain(rows: list[Text]) -> list[str]:
    return [row.plain for row in rows]


def plot_cells(rows: list[Text], gutter: int) -> list[str]:
    """The braille area: every row but the x axis, without the y gutter."""
    return [row.plain[gutter:] for row in rows[:-1]]


def ticks(axis_row: str) -> dict[int, str]:
    return {m.start(): m.group() for m in re.finditer(r"[A-Z][a-z]{2} \d+|\S+", axis_row)}


def series(*points: tuple[float, float | None], color: str = "red") -> PlotSeries:
    return PlotSeries("s", points, color)


RAMP = series((T0, 0.0), (T0 + 300, 100.0))


# -- sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1, 2, 5, 20, 37, 60, 200])
@pytest.mark.parametrize("height", [1, 2, 3, 4, 5, 12, 60])
def test_every_size_is_exactly_width_by_height(width: int, height: int) -> None:
    data = [RAMP, series((T0, 5.0), (T0 + 10, None), (T0 + 90, 1e9), color="blue")]
    rows = render_plot(data, T0, T0 + 300, width, height, y_format=default_format, tz=UTC)
    assert len(rows) == height
    assert [row.cell_len for row in rows] == [width] * height


def test_degenerate_sizes() -> None:
    assert render_plot([RAMP], T0, T0 + 300, 10, 0, y_format=default_format, tz=UTC) == []
    assert plain(render_plot([RAMP], T0, T0 + 300, 0, 2, y_format=default_format, tz=UTC)) == ["", ""]


# -- lines ------------------------------------------------------------------------------

def test_rising_line_goes_from_bottom_left_to_top_right() -> None:
    rows = render_plot([RAMP], T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC,
                       y_max=100)
    cells = plot_cells(rows, 4)
    assert len(cells) == 11 and all(len(r) == 56 for r in cells)
    # (T0, 0) is dot (0, 43), (T0+300, 100) is dot (111, 0); the slope is 43/111 < 1/2, so
    # Bresenham's second dot stays on the end's dot row: both bottom dots bottom-left
    # (U+28C0), both top dots top-right (U+2809).
    assert cells[-1][0] == "⣀"
    assert cells[0][-1] == "⠉"
    assert cells[0][:40].strip() == "" and cells[-1][16:].strip() == ""
    # Monotone: the first drawn column of each row moves right as the rows go up.
    firsts = [len(r) - len(r.lstrip()) for r in cells]
    assert firsts == sorted(firsts, reverse=True) and firsts[0] > firsts[-1]


def test_none_breaks_the_line() -> None:
    # Value 50 of 0..100 is dot row round(43 / 2) = 22, i.e. terminal row 5.
    # t=100 is dot 37 (cell 18), t=200 is dot 74 (cell 37).
    gap = series((T0, 50.0), (T0 + 100, 50.0), (T0 + 150, None), (T0 + 200, 50.0),
                 (T0 + 300, 50.0))
    rows = render_plot([gap], T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC,
                       y_max=100)
    row = plot_cells(rows, 4)[5]
    drawn = [i for i, ch in enumerate(row) if ch != BLANK]
    assert drawn == [*range(0, 19), *range(37, 56)]
    assert all(r.strip() == "" for i, r in enumerate(plot_cells(rows, 4)) if i != 5)

    solid = series((T0, 50.0), (T0 + 300, 50.0))
    rows = render_plot([solid], T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC,
                       y_max=100)
    assert BLANK not in plot_cells(rows, 4)[5]


def test_isolated_point_is_one_dot() -> None:
    lone = series((T0 + 100, None), (T0 + 150, 50.0), (T0 + 200, None))
    rows = render_plot([lone], T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC,
                       y_max=100)
    cells = plot_cells(rows, 4)
    drawn = [(r, c, ch) for r, line in enumerate(cells) for c, ch in enumerate(line) if ch != BLANK]
    # t=150 is dot 55.5 -> 56 (cell 28, left column); dot row 22 is row 5, dot 2 -> U+2804.
    assert drawn == [(5, 28, "⠄")]


def test_points_outside_the_range_are_clipped() -> None:
    # From (T0-300, 0) to (T0+300, 100): at T0 the line is at 50, and nothing lies outside.
    wide = series((T0 - 300, 0.0), (T0 + 300, 100.0), (T0 + 900, 0.0))
    rows = render_plot([wide], T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC,
                       y_max=100)
    cells = plot_cells(rows, 4)
    assert cells[5][0] != BLANK  # enters at mid-height on the left edge
    assert all(line[0] == BLANK for i, line in enumerate(cells) if i != 5)
    assert cells[0][-1] != BLANK
    outside_only = series((T0 - 100, 5.0), (T0 + 400, None), (T0 + 500, 5.0))
    rows = render_plot([outside_only], T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC)
    assert all(line.strip() == "" for line in plot_cells(rows, 4))


def test_values_beyond_the_range_are_clamped_to_the_frame() -> None:
    high = series((T0, 50.0), (T0 + 300, 50.0))
    rows = render_plot([high], T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC,
                       y_max=10)
    cells = plot_cells(rows, 3)  # labels "10", "5", "0"
    assert cells[0] == "⠉" * 57  # both top dots of every cell
    assert all(line.strip() == "" for line in cells[1:])
    low = series((T0, -5.0), (T0 + 300, -5.0))
    rows = render_plot([low], T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC,
                       y_max=10)
    assert plot_cells(rows, 3)[-1] == "⣀" * 57


# -- colours ----------------------------------------------------------------------------

def span_colors(rows: list[Text]) -> set[str]:
    names = set()
    for row in rows:
        for span in row.spans:
            style = span.style
            if not isinstance(style, str) and style.color is not None and not style.dim:
                names.add(style.color.name)
    return names


def test_each_series_keeps_its_colour() -> None:
    prod = series((T0, 20.0), (T0 + 300, 20.0), color="#3b82f6")
    canary = series((T0, 80.0), (T0 + 300, 80.0), color="red")
    rows = render_plot([prod, canary], T0, T0 + 300, 60, 12, y_format=default_format,
                       tz=UTC, y_max=100)
    assert span_colors(rows) == {"#3b82f6", "red"}
    assert span_colors(rows[:3]) == {"red"}  # 80 is near the top
    # The same line twice: the later series owns every shared cell.
    rows = render_plot([prod, series(*prod.points, color="green")], T0, T0 + 300, 60, 12,
                       y_format=default_format, tz=UTC, y_max=100)
    assert span_colors(rows) == {"green"}


def test_axis_uses_the_axis_style() -> None:
    rows = render_plot([RAMP], T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC,
                       axis_style="italic")
    console = Console(width=60)
    axis = list(rows[-1].render(console))
    assert "".join(s.text for s in axis) == rows[-1].plain
    assert all(s.style is not None and s.style.italic for s in axis)
    gutter = next(iter(rows[0].render(console)))
    assert gutter.text == "120┤" and gutter.style is not None and gutter.style.italic


# -- axes -------------------------------------------------------------------------------

@pytest.mark.parametrize(("start", "span", "tz", "expected"), [
    # 60 s: HH:MM:SS, need 60*10/56 = 10.7 s -> 15 s steps; dots 0, 28, 56, 83, 111 ->
    # centres 4, 18, 32, 45 (59 would end past column 60).
    (T0, 60, UTC, {0: "22:10:00", 14: "22:10:15", 28: "22:10:30", 41: "22:10:45"}),
    # 5 min: HH:MM, need 300*7/56 = 37.5 s -> 1 min; dots 0, 22, 44, 67, 89, 111 ->
    # centres 4, 15, 26, 37, 48 (59 skipped), label starts 2 cells left of them.
    (T0, 300, UTC, {2: "22:10", 13: "22:11", 24: "22:12", 35: "22:13", 46: "22:14"}),
    # 1 h: need 450 s -> 10 min; dots 0, 19 (18.5), 37, 56 (55.5), 74, 93 (92.5).
    (NOON, 3600, UTC,
     {2: "12:00", 11: "12:10", 20: "12:20", 30: "12:30", 39: "12:40", 48: "12:50"}),
    # 1 h in UTC+05:45: local 17:45 start, ticks at local 17:50, 18:00... = 5, 15.. min
    # in; dots 9 (9.25), 28 (27.75), 46, 65, 83, 102.
    (NOON, 3600, datetime.timezone(datetime.timedelta(hours=5, minutes=45)),
     {6: "17:50", 16: "18:00", 25: "18:10", 34: "18:20", 43: "18:30", 53: "18:40"}),
    # 7 d: "Mon 1", need 7 d*8/56 = 1 d -> daily; dots 0, 16, 32, 48, 63, 79, 95, 111.
    (MONDAY, 7 * 86400, UTC, {2: "Mon 1", 10: "Tue 2", 18: "Wed 3", 26: "Thu 4",
                              33: "Fri 5", 41: "Sat 6", 49: "Sun 7"}),
])
def test_x_tick_labels(start: float, span: float, tz: datetime.tzinfo,
                       expected: dict[int, str]) -> None:
    rows = render_plot([RAMP], start, start + span, 60, 12, y_format=default_format, tz=tz,
                       y_max=100)
    assert rows[0].plain.startswith("100┤")
    assert ticks(rows[-1].plain) == expected


def test_x_tick_labels_never_overlap_when_narrow() -> None:
    for width in range(7, 120):
        axis = render_plot([RAMP], NOON, NOON + 3600, width, 3, y_format=default_format,
                           tz=UTC)[-1].plain
        found = ticks(axis)
        assert found and all(re.fullmatch(r"\d\d:\d\d", label) for label in found.values())
        assert all(b - a > 5 for a, b in zip(found, list(found)[1:], strict=False)), axis


def test_y_labels_with_y_format() -> None:
    rows = plain(render_plot([RAMP], T0, T0 + 300, 60, 12, y_format=lambda v: f"{v:.0f} ms",
                             tz=UTC, y_max=300))
    assert rows[0].startswith("300 ms┤")
    assert rows[5].startswith("150 ms┤")  # middle of 11 plot rows
    assert rows[10].startswith("  0 ms┤")
    assert {r[:7] for i, r in enumerate(rows[:-1]) if i not in (0, 5, 10)} == {"      │"}


def test_small_heights_keep_the_end_labels() -> None:
    rows = plain(render_plot([RAMP], T0, T0 + 300, 20, 3, y_format=default_format, tz=UTC,
                             y_max=100))
    assert rows[0].startswith("100┤") and rows[1].startswith("  0┤")
    assert rows[2].startswith("  22:10")
    rows = plain(render_plot([RAMP], T0, T0 + 300, 20, 4, y_format=default_format, tz=UTC,
                             y_max=100))
    assert [r[:4] for r in rows[:3]] == ["100┤", "   │", "  0┤"]  # no middle label below 5


def y_labels(rows: list[Text]) -> list[str]:
    return [r.plain.split("┤")[0].strip() for r in rows[:-1] if "┤" in r.plain]


@pytest.mark.parametrize(("data", "y_min", "expected"), [
    ([], 0.0, ["1", "0.5", "0"]),  # no series
    ([series((T0, None), (T0 + 60, None))], 0.0, ["1", "0.5", "0"]),  # all None
    ([series((T0, 0.0), (T0 + 60, 0.0))], 0.0, ["1", "0.5", "0"]),  # all zeros
    ([series((T0, 90.0), (T0 + 60, 3.0))], 0.0, ["100", "50", "0"]),  # 90 + 10% -> 100
    ([series((T0, 1234.0))], 0.0, ["1.4k", "700", "0"]),  # 1357 -> step 200 -> 1400
    ([series((T0, -50.0), (T0 + 60, 50.0))], None, ["60", "0", "-60"]),  # negatives
    ([series((T0, 5.0), (T0 + 60, 5.0))], None, ["5.5", "5", "4.5"]),  # constant
    ([series((T0, 50.0), (T0 + 60, 100.0))], None, ["110", "75", "40"]),  # 45..105 -> 40..110
    ([series((T0 - 60, 1e6), (T0, 10.0))], 0.0, ["12", "6", "0"]),  # outside points ignored
])
def test_y_range(data: list[PlotSeries], y_min: float | None, expected: list[str]) -> None:
    rows = render_plot(data, T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC,
                       y_min=y_min)
    assert y_labels(rows) == expected


def test_empty_and_all_none_draw_no_dots() -> None:
    for data in ([], [series((T0, None), (T0 + 60, None))]):
        rows = render_plot(data, T0, T0 + 300, 60, 12, y_format=default_format, tz=UTC)
        assert all(line.strip() == "" for line in plot_cells(rows, 4))
        assert ticks(rows[-1].plain)  # the time axis is still there


@pytest.mark.parametrize(("value", "text"), [
    (0, "0"), (0.5, "0.5"), (0.123, "0.12"), (0.005, "5m"), (2e-5, "20µ"), (3, "3"),
    (2.5, "2.5"), (12, "12"), (999, "999"), (999.7, "1k"), (1234, "1.2k"), (12_345, "12k"),
    (3.4e6, "3.4M"), (-1500, "-1.5k"), (7.2e9, "7.2G"),
])
def test_default_format(value: float, text: str) -> None:
    assert default_format(value) == text


# -- the widget -------------------------------------------------------------------------

class PlotApp(App[None]):
    CSS = "TimePlot { width: 1fr; height: 1fr; }"

    def compose(self) -> ComposeResult:
        yield TimePlot(tz=UTC, id="plot")


def test_widget_renders_set_data_and_message() -> None:
    prod = series((T0, 20.0), (T0 + 150, 90.0), (T0 + 300, 40.0), color="#3b82f6")
    canary = series((T0, 10.0), (T0 + 100, None), (T0 + 200, 30.0), (T0 + 300, 35.0))

    async def main() -> None:
        app = PlotApp()
        async with app.run_test(size=(60, 12)) as pilot:
            plot = app.query_one("#plot", TimePlot)
            assert [plot.render_line(y).text.strip() for y in range(12)] == [""] * 12
            plot.set_data([prod, canary], T0, T0 + 300)
            await pilot.pause()
            lines = [plot.render_line(y).text for y in range(12)]
            expected = plain(render_plot([prod, canary], T0, T0 + 300, 60, 12,
                                         y_format=default_format, tz=UTC))
            assert lines == expected
            assert lines[0].startswith("100┤") and lines[10].startswith("  0┤")
            assert ticks(lines[11]) == {2: "22:10", 13: "22:11", 24: "22:12", 35: "22:13",
                                        46: "22:14"}
            assert plot.render_line(3) is plot.render_line(3)  # cached between repaints
            muted = plot.get_component_rich_style("timeplot--axis").color
            assert muted is not None and muted != plot.visual_style.rich_style.color
            assert {seg.style.color for seg in plot.render_line(11)
                    if seg.style is not None} == {muted}
            assert muted in {seg.style.color for seg in plot.render_line(0)
                             if seg.style is not None}

            await pilot.resize_terminal(80, 12)
            await pilot.pause()
            assert plot.size.width == 80
            assert [plot.render_line(y).cell_length for y in range(12)] == [80] * 12

            plot.set_data([], T0, T0 + 300, message="no data for canary")
            await pilot.pause()
            lines = [plot.render_line(y).text for y in range(12)]
            assert lines[5] == " " * 31 + "no data for canary" + " " * 31
            assert all(line == " " * 80 for i, line in enumerate(lines) if i != 5)

    asyncio.run(main())
