"""Limit settings of one scope (the global scope, one client key, one upstream key).

Every field is optional: ``None`` means "no limit of this kind in this scope".
The same dataclass is read from the main config (global limits) and from each
entry of the client keys file, so both are validated by one function.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

MINUTE_NS = 60 * 1_000_000_000
FIVE_HOURS_NS = 5 * 3600 * 1_000_000_000
WEEK_NS = 7 * 24 * 3600 * 1_000_000_000


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrency: int | None = None
    # Z.AI's coding-plan windows: rolling 5 hours and rolling week.
    requests_per_5h: int | None = None
    tokens_per_5h: int | None = None
    requests_per_week: int | None = None
    tokens_per_week: int | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


LIMIT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Limits))
# Upper bound of every limit value: keeps ledger arithmetic inside 64 bits.
LIMIT_MAX = 1_000_000_000_000


def parse_limits(raw: object, where: str) -> tuple[Limits, list[str]]:
    """``Limits`` from a TOML table; problems are returned (all of them), never raised.

    Each problem names ``where`` (e.g. ``keys[2].limits``), the key and the reason.
    """
    problems: list[str] = []
    if raw is None:
        return Limits(), problems
    if not isinstance(raw, dict):
        return Limits(), [f"{where}: must be a table"]
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in LIMIT_NAMES:
            problems.append(f"{where}.{name}: unknown limit (expected one of {', '.join(LIMIT_NAMES)})")
            continue
        if type(value) is not int:
            problems.append(f"{where}.{name}: must be an integer")
            continue
        if not 1 <= value <= LIMIT_MAX:
            problems.append(f"{where}.{name}: must be between 1 and {LIMIT_MAX}")
            continue
        values[name] = value
    return Limits(**values), problems
