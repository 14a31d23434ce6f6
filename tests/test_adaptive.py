"""zaiproxy.adaptive: the adaptive upstream rate, on a virtual clock, with exact numbers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from zaiproxy.adaptive import AdaptiveRate, AdaptiveSettings

S = AdaptiveSettings(initial_rps=10.0, max_rps=20.0)


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=0)


class Driver:
    """Ticks an AdaptiveRate on a virtual clock."""

    def __init__(self, settings: AdaptiveSettings = S) -> None:
        self.ar = AdaptiveRate(settings)
        self.now = 0.0
        assert not self.ar.on_tick(self.now, 0, 0)  # the first tick opens the first window

    def throttle(self, after: float = 1.0, requests: int = 10, throttled: int = 1) -> bool:
        self.now += after
        return self.ar.on_tick(self.now, requests, throttled)

    def window(self, rps: float | None = None) -> bool:
        """One clean window in one tick; by default the traffic uses the whole rate."""
        seconds = self.ar.settings.clean_window_s
        self.now += seconds
        sent = math.floor((self.ar.rate if rps is None else rps) * seconds)
        return self.ar.on_tick(self.now, sent, 0)


# --- down -----------------------------------------------------------------------------------


def test_backoff_on_throttling_with_exact_rates() -> None:
    d = Driver()
    assert d.throttle()
    assert d.ar.rate == approx(7.0)  # min(10*0.7, 10*0.9)
    assert d.ar.ceiling == approx(10.0)  # the first sample is taken as is
    assert d.ar.hold_line == approx(9.0)
    # Within a second of the decrease: those 429s answer requests admitted at the old rate.
    assert not d.throttle(after=0.5, throttled=3)
    assert d.ar.rate == approx(7.0)
    assert d.ar.ceiling == approx(10.0)
    assert d.throttle(after=0.5)
    assert d.ar.ceiling == approx(0.3 * 7.0 + 0.7 * 10.0)  # 9.1
    assert d.ar.rate == approx(7.0 * 0.7)  # 4.9 < 9.1*0.9
    assert d.ar.adjustments == {"up": 0, "down": 2}


def test_ewma_ceiling_and_hold_line_cap_the_decrease() -> None:
    # A gentle backoff makes the hold line the binding term near the ceiling.
    d = Driver(AdaptiveSettings(initial_rps=10.0, max_rps=20.0, backoff=0.95))
    assert d.throttle()
    assert d.ar.rate == approx(9.0)  # min(10*0.95, 10*0.9)
    assert d.window()  # at the hold line: one clean window, then one step beyond it
    assert d.ar.rate == approx(9.0 * 1.05)  # 9.45
    assert d.throttle()
    assert d.ar.ceiling == approx(0.3 * 9.45 + 0.7 * 10.0)  # 9.835
    assert d.ar.rate == approx(9.835 * 0.9)  # 8.8515 < 9.45*0.95 = 8.9775
    assert d.throttle()
    assert d.ar.ceiling == approx(0.3 * 8.8515 + 0.7 * 9.835)  # 9.53995
    assert d.ar.rate == approx(8.8515 * 0.95)  # 8.408925 < 9.53995*0.9 = 8.585955
    assert d.ar.adjustments == {"up": 1, "down": 3}


def test_throttle_restarts_the_clean_window() -> None:
    d = Driver()
    assert not d.ar.on_tick(20.0, 200, 0)
    assert d.ar.on_tick(25.0, 50, 1)  # 10 -> 7; the window restarts at 25
    assert not d.ar.on_tick(50.0, 175, 0)  # only 25 s clean
    assert d.ar.on_tick(55.0, 35, 0)  # 30 s clean, 210 requests = 7/s
    assert d.ar.rate == approx(7.0 * 1.05)


def test_throttle_inside_the_decrease_interval_still_spoils_the_window() -> None:
    d = Driver()
    assert d.ar.on_tick(1.0, 10, 1)  # 10 -> 7
    assert not d.ar.on_tick(1.5, 10, 2)  # no second decrease, but not clean either
    assert d.ar.rate == approx(7.0)
    assert not d.ar.on_tick(31.0, 300, 0)  # 29.5 s clean
    assert d.ar.on_tick(31.5, 0, 0)  # 30 s clean, 300 requests = 10/s
    assert d.ar.rate == approx(7.35)
    assert d.ar.on_tick(32.5, 10, 1)  # a second after the decrease: a new decrease
    assert d.ar.adjustments == {"up": 1, "down": 2}


# --- up -------------------------------------------------------------------------------------


def test_probe_after_clean_windows_up_to_the_max() -> None:
    d = Driver(AdaptiveSettings(initial_rps=10.0, max_rps=11.0))
    assert not d.ar.on_tick(29.0, 290, 0)
    assert d.ar.on_tick(30.0, 10, 0)  # 300 requests in 30 s
    assert d.ar.rate == approx(10.5)
    d.now = 30.0
    assert d.window()
    assert d.ar.rate == approx(11.0)  # min(11.025, max_rps)
    assert not d.window()
    assert d.ar.rate == approx(11.0)
    assert d.ar.adjustments == {"up": 2, "down": 0}


def test_first_tick_counts_are_not_in_the_window() -> None:
    ar = AdaptiveRate(S)
    assert not ar.on_tick(100.0, 10_000, 0)  # unknown interval: opens the window only
    assert not ar.on_tick(130.0, 149, 0)  # 149/30 < 0.5 * 10
    assert ar.rate == approx(10.0)


def test_no_probe_without_traffic_or_with_little() -> None:
    d = Driver()
    for _ in range(10):
        assert not d.window(rps=0)
    assert not d.window(rps=4.9)  # below min_utilization * rate = 5/s: application-limited
    assert d.ar.rate == approx(10.0)
    assert d.window(rps=5.0)
    assert d.ar.rate == approx(10.5)
    assert d.ar.adjustments == {"up": 1, "down": 0}


def test_min_clamp() -> None:
    d = Driver(AdaptiveSettings(initial_rps=0.6, max_rps=20.0))
    assert d.throttle()
    assert d.ar.rate == approx(0.5)  # max(min_rps, 0.42)
    assert not d.throttle()  # already at the floor
    assert d.ar.rate == approx(0.5)
    assert d.ar.ceiling == approx(0.3 * 0.5 + 0.7 * 0.6)  # learned all the same
    assert d.ar.adjustments == {"up": 0, "down": 1}


def test_hold_below_the_ceiling_then_probe_slowly_and_back_off_probing() -> None:
    d = Driver()
    assert d.throttle()  # 10 -> 7, ceiling 10, hold line 9
    # Normal steps below the hold line...
    for k in range(1, 6):
        assert d.window()
        assert d.ar.rate == approx(7.0 * 1.05**k)  # 7.35 ... 8.9339709375
    # ...but never past it.
    assert d.window()
    assert d.ar.rate == approx(9.0)
    # At the hold line: one more clean window, then one step per clean window.
    assert d.window()
    assert d.ar.rate == approx(9.45)
    assert d.window()
    assert d.ar.rate == approx(9.9225)
    assert d.window()  # observed 9.9/s < ceiling 10: still just a probe
    assert d.ar.rate == approx(10.418625)
    assert d.ar.ceiling == approx(10.0)
    assert d.ar.hold_windows == 1

    # The probe beyond the hold line failed: the next probes wait twice as long.
    assert d.throttle()
    ceiling = 0.3 * 10.418625 + 0.7 * 10.0  # 10.1255875
    assert d.ar.ceiling == approx(ceiling)
    assert d.ar.rate == approx(10.418625 * 0.7)  # 7.2930375
    assert d.ar.hold_windows == 2
    for k in range(1, 5):
        assert d.window()
        assert d.ar.rate == approx(10.418625 * 0.7 * 1.05**k)
    assert d.window()
    assert d.ar.rate == approx(ceiling * 0.9)  # 9.11302875
    assert not d.window()  # holding
    assert d.window()
    assert d.ar.rate == approx(ceiling * 0.9 * 1.05)
    assert not d.window()
    assert d.window()
    assert d.ar.rate == approx(ceiling * 0.9 * 1.05**2)  # 10.047..., observed 10.03 < ceiling
    assert not d.window()
    assert d.ar.ceiling == approx(ceiling)

    # A second failure beyond the hold line doubles again; throttles below it do not.
    assert d.throttle()
    assert d.ar.hold_windows == 4
    for _ in range(3):
        assert d.throttle()
    assert d.ar.hold_windows == 4


def test_hold_windows_double_up_to_the_max() -> None:
    d = Driver(AdaptiveSettings(initial_rps=10.0, max_rps=20.0, max_hold_windows=2))
    for expected in (1, 2, 2):
        d.throttle()
        assert d.ar.hold_windows == expected
        while d.ar.rate < d.ar.hold_line:  # type: ignore[operator]
            assert d.window()


def test_a_raised_limit_is_discovered() -> None:
    d = Driver()
    assert d.throttle()  # ceiling 10, rate 7
    for _ in range(9):
        d.window()
    assert d.ar.rate == approx(10.418625)  # as in the test above
    # This window sends 10.4/s, faster than the ceiling, without a 429: the limit was raised.
    assert d.window()
    assert d.ar.ceiling is None
    assert d.ar.hold_line is None
    assert d.ar.rate == approx(10.418625 * 1.05)
    # From here, full-speed probing every window until Z.AI throttles again.
    for k in range(2, 6):
        assert d.window()
        assert d.ar.rate == approx(10.418625 * 1.05**k)
    assert d.ar.adjustments == {"up": 14, "down": 1}


def test_a_forgotten_ceiling_resets_the_hold() -> None:
    d = Driver()
    d.throttle()
    for _ in range(9):
        d.window()
    d.throttle()  # failed probe: hold_windows 2
    assert d.ar.hold_windows == 2
    for _ in range(20):
        d.window()
        if d.ar.ceiling is None:
            break
    assert d.ar.ceiling is None
    assert d.ar.hold_windows == 1


# --- reset, repr, settings ------------------------------------------------------------------


def test_reset_forgets_all_but_the_counters() -> None:
    d = Driver()
    d.throttle()
    d.window()
    assert repr(d.ar) == "AdaptiveRate(rate=7.350, ceiling=10.000, hold_windows=1, up=1, down=1)"
    d.ar.reset()
    assert d.ar.rate == approx(10.0)
    assert d.ar.ceiling is None
    assert d.ar.adjustments == {"up": 1, "down": 1}
    assert repr(d.ar) == "AdaptiveRate(rate=10.000, ceiling=None, hold_windows=1, up=1, down=1)"
    # The window reopens at the next tick; a throttle right away is a fresh decrease.
    assert d.ar.on_tick(d.now + 0.1, 1, 1)
    assert d.ar.rate == approx(7.0)


def test_clock_going_back_reopens_the_window() -> None:
    d = Driver()
    assert not d.ar.on_tick(-100.0, 3000, 0)
    assert not d.ar.on_tick(-71.0, 290, 0)
    assert d.ar.on_tick(-70.0, 10, 0)
    assert d.ar.rate == approx(10.5)


def test_negative_counts_are_a_bug() -> None:
    with pytest.raises(ValueError):
        AdaptiveRate(S).on_tick(0.0, -1, 0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"initial_rps": 0.1},
        {"initial_rps": 30.0},
        {"min_rps": 0.0},
        {"backoff": 1.0},
        {"probe_step": 0.0},
        {"clean_window_s": 0.0},
        {"ewma_alpha": 0.0},
        {"hold_fraction": 1.5},
        {"state_max_age_s": 0.0},
        {"decrease_interval_s": -1.0},
        {"min_utilization": 2.0},
        {"hold_windows": 0},
        {"hold_windows": 20},
        {"max_rps": math.inf},
        {"backoff": math.nan},
    ],
)
def test_bad_settings(overrides: dict[str, float]) -> None:
    kwargs: dict[str, float] = {"initial_rps": 10.0, "max_rps": 20.0, **overrides}
    with pytest.raises(ValueError):
        AdaptiveSettings(**kwargs)  # type: ignore[arg-type]


# --- persistence ----------------------------------------------------------------------------

SAVED_AT = 1_700_000_000.0


def learned() -> AdaptiveRate:
    d = Driver()
    d.throttle()  # rate 7, ceiling 10
    return d.ar


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    learned().save(path, SAVED_AT)
    assert json.loads(path.read_text()) == {
        "version": 1, "rate": 7.0, "ceiling": 10.0, "saved_at": SAVED_AT,
    }
    ar, reason = AdaptiveRate.load(path, S, SAVED_AT + 120)
    assert (ar.rate, ar.ceiling) == (7.0, 10.0)
    assert reason == "restored adaptive rate 7 rps (ceiling 10 rps) saved 120 s ago"
    # The restored object behaves like the saved one from here on.
    assert ar.on_tick(0.0, 1, 1)
    assert ar.ceiling == approx(0.3 * 7.0 + 0.7 * 10.0)


def test_round_trip_without_ceiling(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    AdaptiveRate(S).save(path, SAVED_AT)
    ar, reason = AdaptiveRate.load(path, S, SAVED_AT)
    assert (ar.rate, ar.ceiling) == (10.0, None)
    assert reason == "restored adaptive rate 10 rps (ceiling none) saved 0 s ago"


def test_loaded_state_is_clamped(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    path.write_text(json.dumps({"version": 1, "rate": 100, "ceiling": 0.1, "saved_at": SAVED_AT}))
    ar, _ = AdaptiveRate.load(path, S, SAVED_AT + 1)
    assert (ar.rate, ar.ceiling) == (20.0, 0.5)


def test_too_old_state_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    learned().save(path, SAVED_AT)
    ar, reason = AdaptiveRate.load(path, S, SAVED_AT + 6 * 3600 - 1)
    assert ar.rate == 7.0
    ar, reason = AdaptiveRate.load(path, S, SAVED_AT + 6 * 3600)
    assert (ar.rate, ar.ceiling) == (10.0, None)
    assert reason == (
        "saved adaptive state ignored (too old: 21600 s, max 21600 s); starting at 10 rps"
    )
    ar, reason = AdaptiveRate.load(path, S, SAVED_AT - 5)
    assert (ar.rate, ar.ceiling) == (10.0, None)
    assert reason == "saved adaptive state ignored (saved in the future); starting at 10 rps"


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    ar, reason = AdaptiveRate.load(tmp_path / "nope.json", S, SAVED_AT)
    assert (ar.rate, ar.ceiling) == (10.0, None)
    assert reason == "no saved adaptive state; starting at 10 rps"
    ar, reason = AdaptiveRate.load(tmp_path, S, SAVED_AT)  # a directory
    assert (ar.rate, ar.ceiling) == (10.0, None)
    assert reason == "saved adaptive state unreadable (Is a directory); starting at 10 rps"


GOOD = {"version": 1, "rate": 7.0, "ceiling": 10.0, "saved_at": SAVED_AT}

CORRUPT = [
    (b"", "not JSON"),
    (b'{"version": 1, "rate":', "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "file too large"),
    (b"[" * 30_000 + b"]" * 30_000, "not JSON"),  # deep nesting: RecursionError
    (b"[]", "not a JSON object"),
    (json.dumps({**GOOD, "version": 2}).encode(), "version is not 1"),
    (json.dumps({**GOOD, "version": True}).encode(), "version is not 1"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "version"}).encode(), "version is not 1"),
    (json.dumps({**GOOD, "rate": "7"}).encode(), "rate is not a positive number"),
    (json.dumps({**GOOD, "rate": True}).encode(), "rate is not a positive number"),
    (json.dumps({**GOOD, "rate": -1}).encode(), "rate is not a positive number"),
    (json.dumps({**GOOD, "rate": 0}).encode(), "rate is not a positive number"),
    (b'{"version": 1, "rate": NaN, "ceiling": null, "saved_at": 1}', "rate is not a positive number"),
    (b'{"version": 1, "rate": Infinity, "ceiling": null, "saved_at": 1}',
     "rate is not a positive number"),
    (json.dumps({**GOOD, "ceiling": "x"}).encode(), "ceiling is not a positive number or null"),
    (json.dumps({**GOOD, "saved_at": None}).encode(), "saved_at is not a positive number"),
]


@pytest.mark.parametrize(("content", "problem"), CORRUPT)
def test_corrupt_state_is_ignored(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "adaptive.json"
    path.write_bytes(content)
    ar, reason = AdaptiveRate.load(path, S, SAVED_AT)
    assert (ar.rate, ar.ceiling) == (10.0, None)
    assert reason == f"saved adaptive state ignored ({problem}); starting at 10 rps"


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    ar = learned()
    ar.save(path, SAVED_AT)
    ar.save(str(path), SAVED_AT + 1)  # replaces
    assert os.listdir(tmp_path) == ["adaptive.json"]
    assert json.loads(path.read_text())["saved_at"] == SAVED_AT + 1


def test_failed_save_keeps_the_old_file_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "adaptive.json"
    learned().save(path, SAVED_AT)
    before = path.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        AdaptiveRate(S).save(path, SAVED_AT + 1)
    assert os.listdir(tmp_path) == ["adaptive.json"]
    assert path.read_bytes() == before


def test_save_into_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        learned().save(tmp_path / "no" / "adaptive.json", SAVED_AT)
