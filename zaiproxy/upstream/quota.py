"""Z.AI's quota endpoint, decided in pure functions: the request to send, the answer parsed.

Z.AI reports how much of an account's plan is spent at
``GET {base}/api/monitor/usage/quota/limit``. The poller (which owns the socket,
the timeout and the schedule) sends :func:`request_headers`, reads at most
:data:`MAX_BODY` + 1 bytes and hands the status and the bytes to :func:`parse_quota`,
which returns a :class:`QuotaSample` or raises :class:`QuotaError`. Nothing here
touches a socket or a clock. The rules are the Go proxy's this one replaces (teams'
dashboards and alerts are built on them), written down here:

Request
    ``Authorization: <raw key>`` (no ``Bearer``: that is what Z.AI's own clients
    send on this endpoint), ``Accept: application/json``,
    ``Accept-Language: en-US,en;q=0.9`` (English ``msg`` texts in errors).

Answer::

    {"code": 200, "msg": "Operation successful", "success": true,
     "data": {"level": "pro",
              "limits": [{"type": "TOKENS_LIMIT", "unit": 3, "number": 5,
                          "percentage": 12, "nextResetTime": 1767225600000},
                         {"type": "TIME_LIMIT", "unit": 5, ...}, ...]}}

Outcomes (:class:`QuotaError`'s ``outcome``; the poller's ``result`` label)
    - ``error``: the provider said no. HTTP status outside 2xx; ``success`` is
      ``false``; or no boolean ``success`` and a ``code`` outside {0, 200}. Checked
      in that order, before anything else is required of the body.
    - ``malformed``: the provider said yes but the body cannot be read: longer than
      :data:`MAX_BODY`, not JSON, not an object, or ``data.limits`` is not a list.
    - A success whose ``limits`` hold no recognised window is still a
      :class:`QuotaSample`, with empty ``windows``: the poll worked and Z.AI simply
      reports no five-hour or weekly token limit for this account (a plan without
      them, or a future limit type). Calling that ``malformed`` would page someone
      about an account that is fine; the poller exports no window gauges for it.

Windows
    Chosen by ``unit``, not by ``type`` or ``number``: 3 is the five-hour window
    (``"five_hour"``), 6 the weekly one (``"weekly"``); other units (``TIME_LIMIT``,
    unit 5, counts tool calls per month) are ignored. ``type`` is compared
    case-insensitively and kept upper-cased (``/health`` shows it so; metric labels
    go through :func:`label_value` and come out lower-cased):

    - ``TOKENS_LIMIT``: ``percentage`` only (Z.AI sends no token counts for it); an
      entry without a numeric percentage is skipped;
    - ``CREDIT_LIMIT``: ``used_fraction = currentValue / usage`` when ``usage``
      (the allowance) is > 0, else ``percentage / 100``; ``remaining`` is taken as
      sent, else derived as ``usage - currentValue`` (never below 0);
    - other types are skipped.

    ``used_fraction`` is clamped to [0, 1]. The first *usable* entry of a window
    wins; a skipped entry (no percentage, unknown type) does not claim its window.
    ``nextResetTime`` is epoch milliseconds; values below 1e11 are taken as seconds
    (1e11 ms is 1973 and 1e11 s the year 5138, so the two cannot be confused), and a
    time outside 2001..2603 is no reset time (``None``).

Tolerance
    Numbers may arrive as JSON numbers or as numeric strings (``"12"``, ``"12.5"``):
    JSON from PHP- and Java-backed APIs does both, and a string must not turn a
    good sample into an outage. Booleans are not numbers. Non-finite values
    (``1e999``) are dropped like absent ones. ``data.level`` becomes ``plan_tier``
    through :func:`label_value` (``None`` when absent, not a string, or blank).

Errors never carry the key or the body: at most a :data:`MSG_EXCERPT`-character
excerpt of Z.AI's ``msg`` (control characters replaced), so a message is safe to log.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = [
    "ERROR",
    "FIVE_HOUR",
    "MALFORMED",
    "MAX_BODY",
    "MSG_EXCERPT",
    "QUOTA_PATH",
    "WEEKLY",
    "QuotaError",
    "QuotaSample",
    "QuotaWindow",
    "label_value",
    "parse_quota",
    "request_headers",
]

QUOTA_PATH: Final = "/api/monitor/usage/quota/limit"
# Z.AI's answer is well under 2 KiB; 64 KiB is the original's bound, room for a
# wrapping gateway, and all one bad upstream can make a poller buffer.
MAX_BODY: Final = 64 * 1024
MSG_EXCERPT: Final = 200  # characters of Z.AI's msg that an error message may quote

ERROR: Final = "error"
MALFORMED: Final = "malformed"
FIVE_HOUR: Final = "five_hour"
WEEKLY: Final = "weekly"

_WINDOWS: Final = {3: FIVE_HOUR, 6: WEEKLY}
_TOKENS: Final = "TOKENS_LIMIT"
_CREDIT: Final = "CREDIT_LIMIT"
_OK_CODES: Final = frozenset({0, 200})

# Epoch magnitudes (as in zaiproxy.upstream.zai): at or above 1e11 a value is milliseconds.
_MILLIS_FROM: Final = 1e11
_EARLIEST: Final = 1e9  # 2001-09-09: no live account resets before that
_LATEST: Final = 2e10  # the year 2603: anything later is garbage, not a reset time

_NUMERIC = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_LABEL_DISALLOWED = re.compile(r"[^a-z0-9_-]")
_LABEL_MAX: Final = 32
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def request_headers(api_key: str) -> list[tuple[bytes, bytes]]:
    """The headers of a quota poll (the caller adds Host and framing)."""
    return [
        (b"authorization", api_key.encode()),
        (b"accept", b"application/json"),
        (b"accept-language", b"en-US,en;q=0.9"),
    ]


@dataclass(frozen=True, slots=True)
class QuotaWindow:
    """One window of an account's plan, as Z.AI last reported it.

    ``reset_at`` is unix seconds (``None`` when Z.AI sent none or an invalid one).
    ``used``, ``allowance`` and ``remaining`` are only known for ``CREDIT_LIMIT``
    entries (Z.AI's ``currentValue``, ``usage`` and ``remaining``).
    """

    window: str
    limit_type: str
    used_fraction: float
    reset_at: float | None
    used: float | None = None
    allowance: float | None = None
    remaining: float | None = None


@dataclass(frozen=True, slots=True)
class QuotaSample:
    """One successful poll: the plan tier and at most one window per window name."""

    plan_tier: str | None
    windows: tuple[QuotaWindow, ...]

    def window(self, name: str) -> QuotaWindow | None:
        """The window called ``name`` (``"five_hour"``, ``"weekly"``), if Z.AI reported it."""
        for window in self.windows:
            if window.window == name:
                return window
        return None


class QuotaError(Exception):
    """A poll that yielded no sample. ``outcome`` is ``"error"`` (Z.AI said no) or
    ``"malformed"`` (Z.AI's answer could not be read); see the module docstring."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message

    def __repr__(self) -> str:
        return f"QuotaError({self.outcome!r}, {self.message!r})"


def parse_quota(status: int, body: bytes) -> QuotaSample:
    """Parse one answer of the quota endpoint. Raises :class:`QuotaError` and nothing else."""
    if not 200 <= status <= 299:
        raise QuotaError(ERROR, _with_msg(f"HTTP {status}", _try_object(body)))
    if len(body) > MAX_BODY:
        raise QuotaError(MALFORMED, f"body exceeds {MAX_BODY} bytes")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise QuotaError(MALFORMED, "body is not JSON") from None
    if not isinstance(doc, dict):
        raise QuotaError(MALFORMED, f"body is a JSON {_kind(doc)}, not an object")
    success = doc.get("success")
    if success is False:
        raise QuotaError(ERROR, _with_msg(f"success false{_code_text(doc)}", doc))
    code = doc.get("code")
    if success is not True and code is not None and _number(code) not in _OK_CODES:
        raise QuotaError(ERROR, _with_msg(f"code {_code_repr(code)}", doc))
    data = doc.get("data")
    if not isinstance(data, dict):
        raise QuotaError(MALFORMED, "no data object")
    limits = data.get("limits")
    if not isinstance(limits, list):
        raise QuotaError(MALFORMED, "no data.limits list")
    windows: dict[str, QuotaWindow] = {}
    for entry in limits:
        window = _window(entry)
        if window is not None and window.window not in windows:
            windows[window.window] = window
    return QuotaSample(_plan_tier(data.get("level")), tuple(windows.values()))


def label_value(value: str) -> str:
    """A quota metric label value: lower-cased, characters outside ``[a-z0-9_-]`` as
    ``_``, at most 32 characters, ``"unknown"`` when empty (the original's rule, which
    keeps whatever Z.AI sends from becoming a new series per typo or a label injection)."""
    cleaned = _LABEL_DISALLOWED.sub("_", value.lower())[:_LABEL_MAX]
    return cleaned or "unknown"


# --- entries ------------------------------------------------------------------------------


def _window(entry: Any) -> QuotaWindow | None:
    if not isinstance(entry, dict):
        return None
    unit = _number(entry.get("unit"))
    name = _WINDOWS.get(int(unit)) if unit is not None and unit.is_integer() else None
    kind = entry.get("type")
    if name is None or not isinstance(kind, str):
        return None
    kind = kind.strip().upper()
    percentage = _number(entry.get("percentage"))
    reset_at = _reset_at(entry.get("nextResetTime"))
    if kind == _TOKENS:
        if percentage is None:
            return None
        return QuotaWindow(name, kind, _clamp(percentage / 100), reset_at)
    if kind == _CREDIT:
        allowance = _number(entry.get("usage"))
        used = _number(entry.get("currentValue"))
        remaining = _number(entry.get("remaining"))
        if allowance is not None and allowance > 0 and used is not None:
            fraction = used / allowance
        elif percentage is not None:
            fraction = percentage / 100
        else:
            return None
        if remaining is None and allowance is not None and used is not None:
            remaining = max(0.0, allowance - used)
        return QuotaWindow(name, kind, _clamp(fraction), reset_at, used, allowance, remaining)
    return None


def _number(value: object) -> float | None:
    """A finite number from a JSON number or a numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            return None
    elif isinstance(value, str) and len(value) <= 64 and _NUMERIC.fullmatch(value.strip()):
        number = float(value.strip())
    else:
        return None
    return number if math.isfinite(number) else None


def _reset_at(value: object) -> float | None:
    number = _number(value)
    if number is None:
        return None
    seconds = number / 1000 if number >= _MILLIS_FROM else number
    return seconds if _EARLIEST <= seconds <= _LATEST else None


def _clamp(fraction: float) -> float:
    return min(1.0, max(0.0, fraction))


def _plan_tier(level: object) -> str | None:
    if not isinstance(level, str) or not level.strip():
        return None
    return label_value(level.strip())


# --- error messages -----------------------------------------------------------------------


def _try_object(body: bytes) -> dict[str, Any] | None:
    if len(body) > MAX_BODY:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _with_msg(head: str, doc: dict[str, Any] | None) -> str:
    msg = doc.get("msg") if doc is not None else None
    excerpt = _CONTROL.sub(" ", msg).strip() if isinstance(msg, str) else ""
    if not excerpt:
        return head
    if len(excerpt) > MSG_EXCERPT:
        excerpt = excerpt[: MSG_EXCERPT - 3] + "..."
    return f"{head}: {excerpt}"


def _code_text(doc: dict[str, Any]) -> str:
    return f", code {_code_repr(doc['code'])}" if doc.get("code") is not None else ""


def _code_repr(code: object) -> str:
    number = _number(code)
    if number is not None and number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return "(not a number)"


def _kind(doc: object) -> str:
    if isinstance(doc, list):
        return "array"
    if isinstance(doc, str):
        return "string"
    if doc is None:
        return "null"
    if isinstance(doc, bool):
        return "boolean"
    return "number"
