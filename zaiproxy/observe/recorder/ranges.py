"""Durations as operators write them ("15m", "24h", "7d"); no DuckDB import (workers use it)."""

from __future__ import annotations

import re
from typing import Final

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")


class QueryError(ValueError):
    """A bad argument (the endpoint answers 400 with the message)."""


def parse_duration(text: str) -> float:
    """'90s', '15m', '1h', '7d', '2w' or plain seconds -> seconds (> 0)."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise QueryError(f"bad duration {text!r} (examples: 15m, 1h, 24h, 7d)")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise QueryError(f"duration must be positive, got {text!r}")
    return seconds
