"""Durations as operators write them: ``90``, ``30s``, ``15m``, ``1.5h``, ``7d``, ``2w``.

One grammar for every place that reads a duration (the config's timeouts, ``zaiproxy
collect``'s ``--interval``/``--retention``/..., ``canary-check --window``, ``zaiproxy
history --range``, the recorder's ``range=``/``resolution=``, the admin API's ``range=``
names)::

    duration := number [unit]        spaces allowed around and between the two
    number   := a decimal number as Python's float() reads it
                (90, 2.5, .5, 2., 1e3, +5, 1_000)
    unit     := s | m | h | d | w     seconds, minutes, hours, days, weeks; either case;
                                      none = seconds

and the value must be finite and greater than 0. ``units=False`` takes the number alone
(seconds): the config's settings are written that way (``drain_timeout = 30``), and a
unit there has always been refused, so a file stays readable by an older proxy.

The grammar is the union of what the three parsers it replaces accepted (the collector's
``float()`` numbers and upper-case units, the recorder's ``w``), so nothing accepted
before is refused now. Every refusal is a :class:`DurationError` whose message names the
input; its ``problem`` lets a caller with its own wording (the config) say it its way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal

UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800})
EXAMPLES: Final = "examples: 15m, 1h, 24h, 7d"

Problem = Literal["syntax", "not_finite", "not_positive"]


class DurationError(ValueError):
    """A refused duration. ``str()`` names the input (and ``what``, when given); ``problem``
    says which rule it broke, for callers that word it themselves."""

    def __init__(self, text: str, problem: Problem, what: str | None = None, *,
                 units: bool = True) -> None:
        self.text = text
        self.problem: Problem = problem
        self.what = what
        if problem == "syntax":
            hint = EXAMPLES if units else "a number of seconds, without a unit: e.g. 30 or 2.5"
            message = f"bad duration {text!r} ({hint})"
        elif problem == "not_finite":
            message = f"duration must be finite, got {text!r}"
        else:
            message = f"duration must be positive, got {text!r}"
        super().__init__(f"{what}: {message}" if what else message)


def parse_duration(text: str, what: str | None = None, *, units: bool = True) -> float:
    """Seconds in ``text`` (the grammar above); ``what`` (e.g. ``--interval``) prefixes the
    message of the :class:`DurationError` raised for a refused input."""
    body = text.strip()
    scale = UNITS.get(body[-1:].lower(), 0) if units else 0
    try:
        # The number as float() reads it (its own spaces stripped): "5 m" is 5 minutes.
        value = float(body[:-1] if scale else body)
    except ValueError:
        raise DurationError(text, "syntax", what, units=units) from None
    return positive_seconds(value * (scale or 1), text, what)


def positive_seconds(value: float, text: str, what: str | None = None) -> float:
    """``value`` if it is a duration (finite, > 0), else the :class:`DurationError` naming
    ``text``; the check of :func:`parse_duration`, for numbers that arrived typed (TOML)."""
    if not math.isfinite(value):  # first: "nan" is neither > 0 nor <= 0
        raise DurationError(text, "not_finite", what)
    if value <= 0:
        raise DurationError(text, "not_positive", what)
    return value
