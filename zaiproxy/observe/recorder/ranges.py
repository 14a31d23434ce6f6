"""History ranges ("15m", "24h", "7d"): ``core.durations``' grammar with the recorder's
error (no DuckDB import: workers use it)."""

from __future__ import annotations

from zaiproxy.core.durations import DurationError
from zaiproxy.core.durations import parse_duration as _parse_duration


class QueryError(ValueError):
    """A bad argument (the endpoint answers 400 with the message)."""


def parse_duration(text: str) -> float:
    """Seconds (> 0) in ``text``: '90s', '15m', '1h', '7d', '2w' or plain seconds
    (``zaiproxy.core.durations`` has the grammar); QueryError naming the input."""
    try:
        return _parse_duration(text)
    except DurationError as exc:
        raise QueryError(str(exc)) from None
