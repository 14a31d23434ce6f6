"""SVG snapshots of the main screen (pytest-textual-snapshot): both variant views, both themes,
the smallest supported terminal (80×24) and a large one (160×48); the help overlay, a dead
canary, and Z.AI's own quota of a pool of two upstream keys.

The fixture fleet and the clock are fixed (``tests/tui/fixtures.py``), so a
changed SVG is a changed screen: look at the diff report pytest writes, then
accept with ``pytest tests/tui/test_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from textual.pilot import Pilot

from tests.tui.fixtures import NOW, FixtureSource, metrics_doc, pool_keys_doc
from zaiproxy_tui.app import ZaiproxyTui


def _app(mode: str, dark: bool) -> ZaiproxyTui:
    return ZaiproxyTui(FixtureSource(), url="http://fleet:9090", clock=lambda: NOW,
                       tz=dt.UTC, mode=mode, dark=dark)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
@pytest.mark.parametrize("dark", [True, False], ids=["dark", "light"])
@pytest.mark.parametrize("mode", ["production", "both"])
def test_main_screen(snap_compare: Any, mode: str, dark: bool, size: tuple[int, int]) -> None:
    assert snap_compare(_app(mode, dark), terminal_size=size)


def test_help_overlay(snap_compare: Any) -> None:
    assert snap_compare(_app("production", True), terminal_size=(80, 24), press=["?"])


def test_a_dead_canary(snap_compare: Any) -> None:
    """The canary's only target stopped answering (a collector's view): DOWN on the status
    line and in the canary's panel summaries, at the smallest size."""
    doc = metrics_doc(NOW)
    doc["variants"]["canary"].update(targets=1, stale_targets=1, stale=True)
    app = ZaiproxyTui(FixtureSource(events=[doc]), url="http://fleet:9090", clock=lambda: NOW,
                      tz=dt.UTC, mode="both", dark=True)
    assert snap_compare(app, terminal_size=(80, 24))


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_zai_quota_of_a_pool(snap_compare: Any, size: tuple[int, int]) -> None:
    """A pool of two upstream keys (tests/tui/fixtures.py ``pool_keys_doc``): team-plan fresh
    and paced, backup resting with a stale sample, its poller failing and its reserve
    reached. At 80×24 the headline leads with Z.AI's number and the screen is scrolled to
    the limits panel (below the plots at that size)."""
    app = ZaiproxyTui(FixtureSource(keys=pool_keys_doc()), url="http://fleet:9090",
                      clock=lambda: NOW, tz=dt.UTC, mode="production", dark=True)

    async def to_the_limits(pilot: Pilot[None]) -> None:
        await pilot.pause()
        if size == (80, 24):
            app.query_one("#limiter").scroll_visible(animate=False, top=True)
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=to_the_limits)
