"""zaiproxy.limits.adaptive: the adaptive upstream rate, on a virtual clock, with exact numbers.

Ticks are explicit (``now`` in seconds, one tick per second like the supervisor's); every
expected rate is written out from the rules in the module docstring: decrease to
``max(min_rps, min(min(rate, sent) * 0.7, ceiling * 0.9))``, recovery every 10 s of quiet
(x2 below the hold line, x1.1 at it), everything forgotten 300 s after the last evidence.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from zaiproxy.limits.adaptive import AdaptiveRate, AdaptiveSettings, SavedRate, Tick, save_state

S = AdaptiveSettings(initial_rps=1000.0, max_rps=1000.0)  # the proxy's: unlimited at start
KEY = "sha256:0123456789abcdef"


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=0)


def throttles(n: int, *, answers: int | None = None, cls: str = "frequency") -> Tick:
    """n throttled answers of n distinct requests (``answers`` in all, default n)."""
    return Tick(answers=n if answers is None else answers, throttled_requests=n, **{cls: n})


class Driver:
    """Ticks an AdaptiveRate once per virtual second."""

    def __init__(self, settings: AdaptiveSettings = S, ar: AdaptiveRate | None = None,
                 start: float = 0.0) -> None:
        self.ar = AdaptiveRate(settings) if ar is None else ar
        self.now = start
        self.first = self.ar.on_tick(self.now, Tick())  # the first tick opens the window
        self.credit = 0.0

    def tick(self, tick: Tick | None = None) -> bool:
        self.now += 1.0
        return self.ar.on_tick(self.now, tick or Tick())

    def clean(self, seconds: int, rps: float = 0.0) -> None:
        """``seconds`` ticks of clean traffic at ``rps``, never more than the rate admits."""
        for _ in range(seconds):
            self.credit += min(rps, self.ar.rate)
            answers = int(self.credit + 1e-9)
            self.credit -= answers
            self.tick(Tick(answers=answers))

    def rates_every_10s(self, seconds: int, rps: float = 0.0) -> list[float | None]:
        """The rate after every 10 s of clean traffic (None = not limiting)."""
        out: list[float | None] = []
        for _ in range(seconds // 10):
            self.clean(10, rps)
            out.append(self.ar.rate if self.ar.limiting else None)
        return out


def decreased_at_21rps() -> Driver:
    """10 s of 20 rps, then a tick with 30 answers of which 15 throttled requests (1303):
    the window (1, 11] holds 210 answers in 10 s (7 % throttled): sent 21 rps, ceiling 21,
    rate 14.7."""
    d = Driver()
    d.clean(10, 20.0)
    assert d.tick(throttles(15, answers=30))
    return d


# --- evidence: what lowers the rate and what does not ---------------------------------------


def test_one_requests_retries_cap_nothing() -> None:
    # The case: one request, four attempts all throttled (0, 1, 3, 7 s), at 2 rps
    # of other traffic. The worker counts the request once (W_THROTTLED_REQUESTS).
    d = Driver()
    d.clean(10, 2.0)
    for second in range(1, 11):
        attempt = second in (1, 2, 4, 8)
        tick = Tick(answers=2 + attempt, frequency=int(attempt),
                    throttled_requests=int(second == 1))
        assert not d.tick(tick)
    assert not d.ar.limiting
    assert d.ar.rate == 1000.0
    assert d.ar.adjustments == {"up": 0, "down": 0}


def test_three_throttled_requests_are_evidence_two_are_not() -> None:
    d = Driver()
    d.clean(5, 2.0)
    assert not d.tick(throttles(2, answers=3))
    assert not d.ar.limiting
    assert d.tick(throttles(1, answers=2))  # the third distinct request within 10 s
    # Window (0, 7]: 5*2 + 3 + 2 = 15 answers over 7 s (it starts at the first tick).
    assert d.ar.ceiling == approx(15 / 7)
    assert d.ar.rate == approx(15 / 7 * 0.7)
    assert d.ar.reason == "frequency"


def test_throttles_below_five_percent_of_answers_are_not_evidence() -> None:
    d = Driver()
    d.clean(10, 100.0)  # 1000 answers in the window
    assert not d.tick(throttles(5, answers=100))  # 5 of 1000 answers: 0.5 %
    assert not d.tick(throttles(5, answers=100))
    assert not d.ar.limiting
    # Throttles that were not evidence leave the window with their tick.
    d2 = Driver()
    d2.clean(10, 10.0)  # 100 answers in the window
    assert d2.tick(throttles(5, answers=10))  # 5 of 100 answers: 5 %
    assert d2.ar.limiting


@pytest.mark.parametrize("cls", ["concurrency", "frequency", "unknown"])
def test_every_account_throttle_class_is_evidence_and_names_the_reason(cls: str) -> None:
    d = Driver()
    d.clean(10, 20.0)
    assert d.tick(throttles(15, answers=30, cls=cls))
    assert d.ar.rate == approx(14.7)
    assert d.ar.reason == cls


def test_the_reason_is_the_class_with_most_throttles() -> None:
    d = Driver()
    d.clean(10, 20.0)
    assert d.tick(Tick(answers=30, concurrency=9, frequency=4, unknown=2, throttled_requests=15))
    assert d.ar.reason == "concurrency"
    d = Driver()
    d.clean(10, 20.0)
    assert d.tick(Tick(answers=30, concurrency=6, frequency=6, throttled_requests=12))
    assert d.ar.reason == "frequency"  # a tie names frequency


# --- down: from the observed send rate ------------------------------------------------------


def test_decrease_is_from_the_observed_send_rate_not_the_nominal_one() -> None:
    d = decreased_at_21rps()
    # The old rule "learned" the nominal 1000 rps and set 700; nobody had sent at that.
    assert d.ar.ceiling == approx(21.0)
    assert d.ar.rate == approx(21.0 * 0.7)  # 14.7 < 21*0.9
    assert d.ar.hold_line == approx(18.9)
    assert d.ar.limiting
    assert d.ar.evidence_count == 1
    assert d.ar.adjustments == {"up": 0, "down": 1}


def test_each_decrease_needs_fresh_evidence_at_the_new_rate() -> None:
    d = decreased_at_21rps()
    # The throttles that made the decrease are spent: the same window is not counted twice.
    assert not d.tick(Tick(answers=14))
    assert d.ar.rate == approx(14.7)
    # New evidence at the new rate: the window starts at the decrease (t=11): 14 + 14
    # answers over 2 s = 14 rps sent; ceiling 0.3*14 + 0.7*21 = 18.9; 14*0.7 = 9.8.
    assert d.tick(throttles(3, answers=14))
    assert d.ar.ceiling == approx(0.3 * 14 + 0.7 * 21)
    assert d.ar.rate == approx(14 * 0.7)
    assert d.ar.evidence_count == 2
    assert d.ar.adjustments == {"up": 0, "down": 2}


def test_a_burst_is_averaged_over_at_least_one_tick() -> None:
    # A fresh proxy: 100 concurrent requests throttled in its first second.
    d = Driver()
    assert d.tick(throttles(100))
    assert d.ar.ceiling == approx(100.0)
    assert d.ar.rate == approx(70.0)
    # The same burst after 10 s of watching is 10 rps over the window.
    d = Driver()
    d.clean(9)
    assert d.tick(throttles(100))
    assert d.ar.rate == approx(7.0)


def test_the_floor_and_evidence_there() -> None:
    d = Driver(AdaptiveSettings(initial_rps=1000.0, max_rps=1000.0, min_rps=2.0))
    d.clean(9)
    assert d.tick(throttles(5))  # 0.5 rps sent
    assert d.ar.rate == 2.0  # the floor
    assert d.ar.ceiling == 2.0  # clamped like the rate
    assert d.tick(throttles(5))  # evidence again: nothing lower, but it renews the evidence
    assert d.ar.rate == 2.0
    assert d.ar.evidence_age(d.now) == 0.0
    assert d.ar.adjustments == {"up": 0, "down": 1}


# --- up: recovery by time and by traffic ----------------------------------------------------


def test_recovery_by_time_without_any_traffic() -> None:
    d = decreased_at_21rps()  # evidence at t=11: rate 14.7, hold line 18.9
    rates = d.rates_every_10s(300)
    # +10 s: x2, stopped at the hold line; then +10 % per 10 s; gone at +300 s.
    assert rates[0] == approx(18.9)
    for k in range(1, 29):
        assert rates[k] == approx(18.9 * 1.1**k)
    assert rates[29] is None  # 300 s after the evidence: nothing learned is kept
    assert d.ar.ceiling is None
    assert d.ar.rate == 1000.0
    assert d.ar.evidence_age(d.now) is None
    assert d.ar.adjustments == {"up": 30, "down": 1}


def test_steps_fall_exactly_on_the_ten_second_grid() -> None:
    d = decreased_at_21rps()
    d.clean(9)
    assert d.ar.rate == approx(14.7)  # t = 20: 9 s of quiet
    assert d.tick()  # t = 21: 10 s
    assert d.ar.rate == approx(18.9)
    d.clean(9)
    assert d.tick()  # t = 31: at the hold line, a probe
    assert d.ar.rate == approx(18.9 * 1.1)
    d.clean(268)  # t = 299: quiet 288
    assert d.ar.limiting
    d.clean(11)  # t = 310: quiet 299
    assert d.ar.limiting
    assert d.tick()  # t = 311: quiet 300
    assert not d.ar.limiting


def test_after_a_storm_pinned_at_the_floor_light_traffic_recovers_in_40s_none_in_150s() -> None:
    """The stated bounds (docs/decisions/adaptive-rate.md): sustained throttling at the floor
    (0.5 rps), then 2 rps of clean demand: the rate admits it fully 40 s after the last
    evidence and the cap is gone at 130 s; without any traffic 2 rps fits after 150 s and
    the cap is gone at 300 s."""
    def pinned() -> Driver:
        d = Driver()
        d.clean(9)
        assert d.tick(throttles(5))  # 5 answers in 10 s, all throttled: 0.5 rps
        assert (d.ar.rate, d.ar.ceiling) == (0.5, 0.5)
        return d

    d = pinned()
    rates = d.rates_every_10s(140, rps=2.0)
    # At the hold line (0.45) already: probes of +10 %; the second one's clean traffic
    # (0.55 rps) beat the 0.5 ceiling, so it is forgotten and the rate doubles per step.
    assert rates[:5] == [approx(0.55), approx(0.605), approx(1.21), approx(2.42), approx(4.84)]
    assert min(r for r in rates if r is not None) < 2 <= rates[3]  # type: ignore[operator]
    assert rates[12] is None  # 130 s
    assert rates[11] is not None

    d = pinned()
    rates = d.rates_every_10s(300)
    assert rates[13] == approx(0.5 * 1.1**14) and rates[13] < 2  # type: ignore[operator]
    assert rates[14] == approx(0.5 * 1.1**15) and rates[14] >= 2  # type: ignore[operator]
    assert rates[28] is not None and rates[29] is None


def test_a_failed_probe_doubles_the_steps_per_probe() -> None:
    d = decreased_at_21rps()
    d.clean(20)  # t = 31: 18.9 * 1.1 = 20.79, at/above the hold line
    assert d.ar.rate == approx(20.79)
    # Evidence while probing: hold_steps 1 -> 2. Window (11, 32]: 20 s of nothing, then 30.
    assert d.tick(throttles(10, answers=30))
    assert d.ar.hold_steps == 2
    sent = 30 / 10
    ceiling = 0.3 * sent + 0.7 * 21
    assert d.ar.ceiling == approx(ceiling)
    assert d.ar.rate == approx(sent * 0.7)
    hold = ceiling * 0.9
    rates = d.rates_every_10s(60)
    assert rates[:3] == [approx(sent * 0.7 * 2), approx(sent * 0.7 * 4), approx(hold)]
    assert rates[3] == approx(hold)  # one step held
    assert rates[4] == approx(hold * 1.1)
    assert rates[5] == approx(hold * 1.1)
    # Evidence below the hold line does not double it again.
    d2 = decreased_at_21rps()
    assert d2.tick(throttles(3, answers=14))
    assert d2.ar.hold_steps == 1


def test_clean_traffic_faster_than_the_ceiling_forgets_it() -> None:
    d = decreased_at_21rps()
    d.clean(20, rps=30.0)  # admitted at the rate: 14.7 then 18.9 < ceiling 21
    assert d.ar.ceiling == approx(21.0)
    d.clean(10, rps=30.0)  # 20.79/s admitted: still below 21
    assert d.ar.ceiling == approx(21.0)
    d.clean(10, rps=30.0)  # 22.869/s admitted: faster than 21 without a 429
    assert d.ar.ceiling is None
    assert d.ar.hold_line is None
    rate = d.ar.rate
    d.clean(10, rps=30.0)
    assert d.ar.rate == approx(rate * 2)


def test_throttles_that_are_not_evidence_do_not_stop_recovery() -> None:
    d = decreased_at_21rps()
    d.clean(9)
    assert d.tick(Tick(answers=10, frequency=1, throttled_requests=1))  # t = 21: a step
    assert d.ar.rate == approx(18.9)


# --- reset, restore, clock, repr, settings --------------------------------------------------


def test_reset_forgets_all_but_the_counters() -> None:
    d = decreased_at_21rps()
    d.clean(10)
    assert repr(d.ar) == "AdaptiveRate(rate=18.900, ceiling=21.000, hold_steps=1, up=1, down=1)"
    d.ar.reset()
    assert not d.ar.limiting
    assert d.ar.ceiling is None
    assert d.ar.evidence_age(d.now) is None
    assert d.ar.adjustments == {"up": 1, "down": 1}
    # The next tick opens a new window (what it counted was before the reset) ...
    assert not d.tick(throttles(3))
    assert not d.ar.limiting
    # ... and throttles after it are fresh evidence.
    assert d.tick(throttles(3))
    assert d.ar.rate == approx(2.1)  # 3 answers over one tick


def test_clock_going_back_keeps_the_quiet_time_served() -> None:
    d = decreased_at_21rps()  # evidence at 11
    d.clean(5)  # t = 16
    assert not d.ar.on_tick(-100.0, Tick(answers=1000, frequency=1000, throttled_requests=1000))
    assert d.ar.rate == approx(14.7)  # the tick's counts are from an unknown interval
    assert d.ar.evidence_age(-100.0) == 5.0
    assert d.ar.on_tick(-95.0, Tick())  # 10 s of quiet in all
    assert d.ar.rate == approx(18.9)


def test_bad_ticks() -> None:
    with pytest.raises(ValueError):
        Tick(answers=-1)
    with pytest.raises(ValueError):
        Tick(frequency=-1)
    assert (Tick(1, 2, 3, 4, 5) + Tick(1, 1, 1, 1, 1)) == Tick(2, 3, 4, 5, 6)
    assert Tick(10, 1, 2, 3, 4).throttled == 6


@pytest.mark.parametrize(
    "overrides",
    [
        {"initial_rps": 0.1},
        {"initial_rps": 2000.0},
        {"min_rps": 0.0},
        {"backoff": 1.0},
        {"evidence_s": 0.0},
        {"min_throttled_requests": 0},
        {"min_throttle_share": 1.5},
        {"ewma_alpha": 0.0},
        {"hold_fraction": 1.5},
        {"recovery_step_s": 0.0},
        {"recovery_growth": 1.0},
        {"probe_step": 0.0},
        {"hold_steps": 0},
        {"hold_steps": 20},
        {"forget_after_s": 10.0},
        {"state_max_age_s": 0.0},
        {"max_rps": math.inf},
        {"backoff": math.nan},
    ],
)
def test_bad_settings(overrides: dict[str, float]) -> None:
    kwargs: dict[str, float] = {"initial_rps": 1000.0, "max_rps": 1000.0, **overrides}
    with pytest.raises(ValueError):
        AdaptiveSettings(**kwargs)  # type: ignore[arg-type]


# --- persistence ----------------------------------------------------------------------------

WALL = 1_700_000_000.0  # the wall clock at the driver's t = 0


def saved_after_decrease() -> tuple[Driver, SavedRate]:
    d = decreased_at_21rps()  # evidence at t = 11 = WALL + 11
    d.clean(5)  # t = 16
    saved = d.ar.saved(d.now, WALL + d.now)
    assert saved == SavedRate(14.7, 21.0, WALL + 11, 1, "frequency")
    return d, saved


def test_save_load_round_trip_owes_the_recovery_of_the_time_down(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    _, saved = saved_after_decrease()
    save_state(path, {KEY: saved}, WALL + 16)
    assert json.loads(path.read_text()) == {
        "version": 2, "saved_at": WALL + 16,
        "keys": {KEY: {"rate": 14.7, "ceiling": 21.0, "throttled_at": WALL + 11,
                       "hold_steps": 1, "reason": "frequency"}},
    }
    # Restarted 4 s later: 9 s after the evidence, nothing owed yet.
    ar, reason = AdaptiveRate.load(path, S, WALL + 20, KEY)
    assert reason == ("restored adaptive rate 14.7 rps (ceiling 21 rps) from a throttle 9 s "
                      "ago; forgotten in 291 s at the latest")
    assert (ar.rate, ar.ceiling, ar.reason, ar.free_in(0.0)) == (14.7, 21.0, "frequency", 291.0)
    d = Driver(ar=ar, start=500.0)  # a new process: another monotonic clock
    assert not d.first
    assert d.tick()  # 10 s after the evidence: the same step as if it had kept running
    assert d.ar.rate == approx(18.9)
    # Restarted 35 s after the evidence: three steps owed, taken at the first tick.
    ar, _ = AdaptiveRate.load(path, S, WALL + 46, KEY)
    d = Driver(ar=ar, start=500.0)
    assert d.first
    assert d.ar.rate == approx(18.9 * 1.1**2)
    d.clean(264)  # 299 s after the evidence
    assert d.ar.limiting
    assert d.tick()
    assert not d.ar.limiting  # 300 s after it, as if the proxy had never stopped


def test_a_state_older_than_its_evidence_horizon_does_not_cap_a_fresh_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "adaptive.json"
    _, saved = saved_after_decrease()
    save_state(path, {KEY: saved}, WALL + 16)
    ar, _ = AdaptiveRate.load(path, S, WALL + 11 + 299, KEY)
    assert ar.limiting
    ar, reason = AdaptiveRate.load(path, S, WALL + 11 + 300, KEY)
    assert not ar.limiting
    assert ar.ceiling is None
    assert reason == ("saved adaptive state not restored (last throttle 300 s ago, forgotten "
                      "after 300 s); starting at 1000 rps")
    # The file: saved 5 h ago, a cap of 1.2 rps. Not restored, whatever its age limit.
    path.write_text(json.dumps({"version": 2, "saved_at": WALL - 5 * 3600, "keys": {KEY: {
        "rate": 1.2, "ceiling": 1.7, "throttled_at": WALL - 5 * 3600, "hold_steps": 1,
        "reason": "frequency"}}}))
    ar, reason = AdaptiveRate.load(path, S, WALL, KEY)
    assert not ar.limiting
    assert reason == ("saved adaptive state not restored (last throttle 18000 s ago, "
                      "forgotten after 300 s); starting at 1000 rps")


def test_a_format_1_state_is_read_and_not_restored_as_a_cap(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    path.write_text(json.dumps({"version": 1, "rate": 1.2, "ceiling": 1.7, "saved_at": WALL - 60}))
    ar, reason = AdaptiveRate.load(path, S, WALL, KEY)
    assert not ar.limiting
    assert reason == ("saved adaptive state ignored (format 1 has no throttle time: a cap of "
                      "unknown age is not restored); starting at 1000 rps")


def test_a_state_of_another_upstream_key_is_not_restored(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    _, saved = saved_after_decrease()
    save_state(path, {KEY: saved}, WALL + 16)
    ar, reason = AdaptiveRate.load(path, S, WALL + 20, "sha256:ffffffffffffffff")
    assert not ar.limiting
    assert reason == "no saved adaptive state for this upstream key; starting at 1000 rps"


def test_nothing_learned_saves_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    ar = AdaptiveRate(S)
    assert ar.saved(0.0, WALL) is None
    save_state(path, {KEY: None}, WALL)
    assert json.loads(path.read_text()) == {"version": 2, "saved_at": WALL, "keys": {}}
    ar, reason = AdaptiveRate.load(path, S, WALL, KEY)
    assert reason == "no saved adaptive state for this upstream key; starting at 1000 rps"


def test_loaded_state_is_clamped(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    path.write_text(json.dumps({"version": 2, "saved_at": WALL, "keys": {KEY: {
        "rate": 5000, "ceiling": 0.1, "throttled_at": WALL, "hold_steps": 99,
        "reason": "made up"}}}))
    ar, _ = AdaptiveRate.load(path, S, WALL + 1, KEY)
    assert (ar.rate, ar.ceiling, ar.hold_steps, ar.reason) == (1000.0, 0.5, 8, None)


def test_file_too_old_or_from_the_future(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    _, saved = saved_after_decrease()
    save_state(path, {KEY: saved}, WALL + 16)
    short = AdaptiveSettings(initial_rps=1000.0, max_rps=1000.0, state_max_age_s=5.0)
    ar, reason = AdaptiveRate.load(path, short, WALL + 21, KEY)
    assert not ar.limiting
    assert reason == ("saved adaptive state ignored (too old: 5 s, max 5 s); "
                      "starting at 1000 rps")
    ar, reason = AdaptiveRate.load(path, S, WALL + 15, KEY)
    assert reason == "saved adaptive state ignored (saved in the future); starting at 1000 rps"
    save_state(path, {KEY: saved}, WALL + 5)
    ar, reason = AdaptiveRate.load(path, S, WALL + 6, KEY)
    assert reason == ("saved adaptive state ignored (last throttle in the future); "
                      "starting at 1000 rps")


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    ar, reason = AdaptiveRate.load(tmp_path / "nope.json", S, WALL, KEY)
    assert not ar.limiting
    assert reason == "no saved adaptive state; starting at 1000 rps"
    ar, reason = AdaptiveRate.load(tmp_path, S, WALL, KEY)  # a directory
    assert not ar.limiting
    assert reason == "saved adaptive state unreadable (Is a directory); starting at 1000 rps"


ENTRY = {"rate": 7.0, "ceiling": 10.0, "throttled_at": WALL, "hold_steps": 1,
         "reason": "frequency"}
GOOD = {"version": 2, "saved_at": WALL, "keys": {KEY: ENTRY}}


def with_entry(**changes: object) -> bytes:
    return json.dumps({**GOOD, "keys": {KEY: {**ENTRY, **changes}}}).encode()


CORRUPT = [
    (b"", "not JSON"),
    (b'{"version": 2, "rate":', "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "file too large"),
    (b"[" * 30_000 + b"]" * 30_000, "not JSON"),  # deep nesting: RecursionError
    (b"[]", "not a JSON object"),
    (json.dumps({**GOOD, "version": 3}).encode(), "version is not 2"),
    (json.dumps({**GOOD, "version": True}).encode(), "version is not 2"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "version"}).encode(), "version is not 2"),
    (json.dumps({**GOOD, "saved_at": None}).encode(), "saved_at is not a positive number"),
    (json.dumps({**GOOD, "keys": []}).encode(), "keys is not an object"),
    (json.dumps({**GOOD, "keys": {KEY: 7}}).encode(), f"key {KEY!r}: not an object"),
    (with_entry(rate="7"), f"key {KEY!r}: rate is not a positive number"),
    (with_entry(rate=True), f"key {KEY!r}: rate is not a positive number"),
    (with_entry(rate=0), f"key {KEY!r}: rate is not a positive number"),
    (with_entry(ceiling="x"), f"key {KEY!r}: ceiling is not a positive number or null"),
    (with_entry(throttled_at=None), f"key {KEY!r}: throttled_at is not a positive number"),
    (with_entry(hold_steps=0), f"key {KEY!r}: hold_steps is not a positive integer"),
    (with_entry(hold_steps=1.5), f"key {KEY!r}: hold_steps is not a positive integer"),
    (b'{"version": 2, "saved_at": NaN, "keys": {}}', "saved_at is not a positive number"),
]


@pytest.mark.parametrize(("content", "problem"), CORRUPT)
def test_corrupt_state_is_ignored(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "adaptive.json"
    path.write_bytes(content)
    ar, reason = AdaptiveRate.load(path, S, WALL, KEY)
    assert not ar.limiting
    assert reason == f"saved adaptive state ignored ({problem}); starting at 1000 rps"


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.json"
    _, saved = saved_after_decrease()
    save_state(path, {KEY: saved}, WALL + 16)
    save_state(str(path), {KEY: saved}, WALL + 17)  # replaces
    assert os.listdir(tmp_path) == ["adaptive.json"]
    assert json.loads(path.read_text())["saved_at"] == WALL + 17


def test_failed_save_keeps_the_old_file_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "adaptive.json"
    _, saved = saved_after_decrease()
    save_state(path, {KEY: saved}, WALL + 16)
    before = path.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        save_state(path, {KEY: None}, WALL + 17)
    assert os.listdir(tmp_path) == ["adaptive.json"]
    assert path.read_bytes() == before


def test_save_into_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        save_state(tmp_path / "no" / "adaptive.json", {KEY: None}, WALL)
