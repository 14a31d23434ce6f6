"""core/durations.py: the one duration grammar, and everyone who reads durations uses it."""

from __future__ import annotations

import argparse

import pytest

from zaiproxy.core import config_values
from zaiproxy.core.durations import UNITS, DurationError, parse_duration
from zaiproxy.observe.recorder.ranges import QueryError
from zaiproxy.observe.recorder.ranges import parse_duration as recorder_duration

DAY = 86400.0

# Everything the three parsers it replaced accepted (the recorder's: digits, '.', s/m/h/d/w
# in lower case; the collector's: whatever float() reads, then s/m/h/d in either case).
ACCEPTED = [
    ("90", 90.0), ("90s", 90.0), ("0.5s", 0.5), ("15m", 900.0), ("1h", 3600.0),
    ("1.5h", 5400.0), ("6h", 21600.0), ("24h", DAY), ("7d", 7 * DAY), ("2w", 14 * DAY),
    (" 7d ", 7 * DAY), ("5 m", 300.0), ("5M", 300.0), ("1D", DAY), ("2W", 14 * DAY),
    (".5m", 30.0), ("2.", 2.0), ("1e3", 1000.0), ("1e3s", 1000.0), ("+5", 5.0),
    ("1_000", 1000.0), ("86400.0", DAY),
]
REFUSED = [
    ("", "syntax"), ("h", "syntax"), ("soon", "syntax"), ("1y", "syntax"),
    ("1 hour", "syntax"), ("5ms", "syntax"), ("0x10", "syntax"), ("1hh", "syntax"),
    ("0", "not_positive"), ("-1h", "not_positive"), ("0.0s", "not_positive"),
    ("inf", "not_finite"), ("nan", "not_finite"), ("infs", "not_finite"),
    ("1e400", "not_finite"), ("1e305w", "not_finite"),
]


@pytest.mark.parametrize(("text", "seconds"), ACCEPTED)
def test_accepted(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert recorder_duration(text) == seconds  # the recorder's ranges: the same grammar


@pytest.mark.parametrize(("text", "problem"), REFUSED)
def test_refused_with_a_message_naming_the_input(text: str, problem: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text, "--window")
    assert info.value.problem == problem and info.value.text == text
    assert str(info.value).startswith("--window: ") and repr(text) in str(info.value)
    with pytest.raises(QueryError, match="duration"):
        recorder_duration(text)


def test_the_messages() -> None:
    def message(text: str, what: str | None = None, *, units: bool = True) -> str:
        with pytest.raises(DurationError) as info:
            parse_duration(text, what, units=units)
        return str(info.value)

    assert message("soon") == "bad duration 'soon' (examples: 15m, 1h, 24h, 7d)"
    assert message("0", "--interval") == "--interval: duration must be positive, got '0'"
    assert message("nan") == "duration must be finite, got 'nan'"
    assert message("30s", units=False) == (
        "bad duration '30s' (a number of seconds, without a unit: e.g. 30 or 2.5)")


def test_without_units_only_the_number() -> None:
    assert parse_duration(" 2.5 ", units=False) == 2.5
    for text in ("30s", "1m", "2w"):
        with pytest.raises(DurationError) as info:
            parse_duration(text, units=False)
        assert info.value.problem == "syntax"


def test_the_config_reads_seconds_with_the_grammar_and_its_own_words() -> None:
    assert config_values.seconds("2.5", True) == 2.5
    assert config_values.seconds(3, False) == 3.0
    for raw, text, reason in (
            ("30s", True, "not a number of seconds (write e.g. 30 or 2.5, without a unit)"),
            ("inf", True, "must be a finite number"), ("-1", True, "must be greater than 0"),
            (0, False, "must be greater than 0"), (float("nan"), False, "must be a finite number"),
            (True, False, "not a number (got boolean)")):
        with pytest.raises(config_values.Invalid) as info:
            config_values.seconds(raw, text)
        assert info.value.reason == reason


def test_every_range_name_is_a_duration() -> None:
    """The admin API's and the collector's fixed range names mean what the grammar says."""
    from zaiproxy.fleet.collector import STEPS
    from zaiproxy.request.admin import RANGES

    assert set(STEPS) == set(RANGES)
    for name, seconds in RANGES.items():
        assert parse_duration(name) == seconds


def test_units() -> None:
    assert dict(UNITS) == {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def test_canary_window_flag() -> None:
    from zaiproxy.fleet.canary import add_parser

    parser = argparse.ArgumentParser(prog="zaiproxy")
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["canary-check", "--url", "http://c", "--window", "2W"]).window \
        == 14 * DAY
