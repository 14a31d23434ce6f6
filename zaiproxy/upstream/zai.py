"""Z.AI 429 handling, decided in pure functions: classify the body, choose the wait, build headers.

Z.AI answers HTTP 429 with a *business code* that says why, and the codes need
different handling (lessons of the Go proxy this one replaces):

==========  ===============================  ==============  ==========================
code        meaning                          class           retry? / adaptive rate?
==========  ===============================  ==============  ==========================
1302        too many concurrent requests     CONCURRENCY     yes / account throttle
1303        too many requests per window     FREQUENCY       yes / account throttle
1305        service temporarily overloaded   OVERLOAD        yes, slower / no
1308/1310   five-hour / weekly quota spent   QUOTA           NEVER (hours away) / no
1312        model congestion                 CONGESTION      yes, slower / no
other/none  anything else                    UNKNOWN         yes / account throttle
==========  ===============================  ==============  ==========================

The class names are the values of the ``X-Zai-Error-Class`` header and of the
``class``/``reason`` labels of the Z.AI error and retry metrics (a closed set).
An *account throttle* says "this account sends too fast" and is evidence for
the adaptive upstream rate (``zaiproxy/limits/adaptive.py``); OVERLOAD and CONGESTION
are about Z.AI's capacity (the whole service, or one model), which the proxy's
own rate cannot fix: they back off that request's retries and nothing else
(docs/decisions/adaptive-rate.md).

Nothing here touches a socket or a clock: the caller reads at most
:data:`MAX_BODY` bytes of the upstream 429 body, passes ``now`` (unix seconds)
and does the sleeping. The flow in the caller is::

    err = classify(body, now=now)
    wait = policy.next_wait(err, attempt, parse_retry_after(header, now=now), now=now,
                            rand=random.random())    # or 1.0 for no jitter
    if wait is None:   # relay the 429, plus final_headers(err, upstream_headers, now=now)
    else:              # sleep(wait), retry; feeds_adaptive(err.cls) says whether the
                       # answer is evidence for the adaptive upstream rate

Body shapes tolerated by :func:`classify` (all seen in front of Z.AI or its
Anthropic-compatible endpoint):

- OpenAI-style ``{"error": {"code": "1302", "message": "..."}}`` (code str or int);
- Z.AI native ``{"code": 1302, "msg": "...", "success": false}``;
- Anthropic-style ``{"type": "error", "error": {"type": "...", "message": "..."}}``,
  where the code may only be inside the message text (``"[1302] ..."``,
  ``"code 1302"``, or a JSON error quoted in the message).

A body that is empty, not JSON or cut short is UNKNOWN (never an exception):
guessing the code from half a document is not worth a wrong QUOTA/no-retry.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import enum
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "MAX_BODY",
    "ErrorClass",
    "RetryPolicy",
    "ZaiError",
    "classify",
    "feeds_adaptive",
    "final_headers",
    "parse_retry_after",
]

# Z.AI's 429 bodies are a few hundred bytes; 32 KiB leaves room for a proxy or
# WAF in between that wraps them, and bounds what one bad upstream can make us buffer.
MAX_BODY = 32 * 1024


class ErrorClass(enum.StrEnum):  # a str Enum: compares and formats as its value
    CONCURRENCY = "concurrency"
    FREQUENCY = "frequency"
    OVERLOAD = "overload"
    QUOTA = "quota"
    CONGESTION = "congestion"
    UNKNOWN = "unknown"


_CLASSES = {
    "1302": ErrorClass.CONCURRENCY,
    "1303": ErrorClass.FREQUENCY,
    # "The service may be temporarily overloaded": Z.AI's capacity, not our account's rate.
    "1305": ErrorClass.OVERLOAD,
    "1308": ErrorClass.QUOTA,
    "1310": ErrorClass.QUOTA,
    "1312": ErrorClass.CONGESTION,
}


@dataclass(frozen=True, slots=True)
class ZaiError:
    """What an upstream 429 body says.

    ``code`` is the business code as decimal digits (never free text: it goes
    into a response header). ``reset_at`` is unix epoch seconds and may lie in
    the past (clock skew, a stale message); it is kept as sent and the users
    of it clamp "time left" at zero. ``retry_after`` is seconds, from the body.
    """

    cls: ErrorClass
    code: str | None = None
    message: str | None = None
    reset_at: float | None = None
    retry_after: float | None = None


# --- classify -----------------------------------------------------------------------------

# Field names are compared after lowercasing and dropping "_"/"-", so
# reset_at, resetAt, next_reset_time and nextResetTime (Z.AI's quota API) all match.
_RESET_FIELDS = ("resetat", "resetsat", "resettime", "nextresettime")
_RETRY_FIELDS = ("retryafter",)
_MESSAGE_FIELDS = ("message", "msg")

# A 13xx code in message text. With context ("[1302]", "code 1302", 'code":"1302',
# "error 1302") any 13xx counts; a bare number only when it is a known code, so
# "reduce to 1300 requests" does not become code 1300.
_CODE_IN_CONTEXT = re.compile(
    r"\[\s*(13\d\d)\s*\]|\b(?:code|error)\W{0,4}(13\d\d)(?!\d)", re.IGNORECASE
)
_BARE_CODE = re.compile(r"(?<![\d.:-])(13\d\d)(?![\d:.-])")

# RFC 3339 (T or space, optional fraction, Z / offset) and Z.AI's naive
# "2026-11-27 23:00:00", which is Beijing time: Z.AI (Zhipu) runs on UTC+8 and
# its 1308/1310 texts give the local reset time without a zone.
_DATETIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r"(?:\s?(?P<tz>[Zz]|(?:UTC|GMT)?\s?[+-]\d{1,2}(?::?\d{2})?|UTC|GMT))?"
)
_OFFSET = re.compile(r"(?:UTC|GMT)?\s?([+-])(\d{1,2})(?::?(\d{2}))?", re.IGNORECASE)
_BEIJING = dt.timezone(dt.timedelta(hours=8))
_NUMBER = re.compile(r"[+]?(?:\d+(?:\.\d*)?|\.\d+)")
_RESET_WORD = re.compile(r"reset|重置", re.IGNORECASE)
_EPOCH_IN_TEXT = re.compile(r"(?<![\d.])(\d{13}|\d{10}(?:\.\d+)?)(?![\d.])")
_RESET_WINDOW = 64  # characters after "reset" searched for its time

# Epoch magnitudes: 1e11 s is the year 5138 and 1e11 ms is 1973, so anything at or
# above it is milliseconds. Below 1e9 (2001-09-09) a value cannot be an absolute
# reset time of a live API; it is read as seconds from ``now`` (a duration field).
_MILLIS_FROM = 1e11
_ABSOLUTE_FROM = 1e9
_MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z, the end of datetime's range


def classify(body: bytes, *, now: float) -> ZaiError:
    """Classify an upstream 429 body. Never raises; looks at most :data:`MAX_BODY` bytes.

    The code comes from (first found): ``error.code``, top-level ``code``, an
    all-digits ``error.type``, then the message text. A structured code that is
    not a known one (an HTTP-style ``429``, say) yields to a 13xx code in the text.
    The reset time comes from a reset field in ``error``, then at the top level,
    then the message text ("... will reset at 2026-11-27 23:00:00").
    ``now`` only anchors reset values too small to be epochs (see ``_epoch``);
    a reset time in the past is kept as sent (the users of ``reset_at`` clamp).
    """
    try:
        doc = orjson.loads(body[:MAX_BODY])
    except orjson.JSONDecodeError:
        return ZaiError(ErrorClass.UNKNOWN, message=_snippet(body))
    if not isinstance(doc, dict):
        return ZaiError(ErrorClass.UNKNOWN)
    error = doc.get("error")
    levels = [error, doc] if isinstance(error, dict) else [doc]
    texts = [m for level in levels if (m := _message(level)) is not None]
    if isinstance(error, str):  # {"error": "text"}
        texts.append(error)

    structured = None
    if isinstance(error, dict):
        structured = _code(error.get("code")) or _digits_only(error.get("type"))
    structured = structured or _code(doc.get("code"))
    code = structured if structured in _CLASSES else (_code_in_text(texts) or structured)

    reset_at = _first(
        (_epoch(v, now) for level in levels for v in _fields(level, _RESET_FIELDS)),
    )
    if reset_at is None:
        reset_at = _reset_in_text(texts)
    retry_after = _first(
        (_seconds(v) for level in levels for v in _fields(level, _RETRY_FIELDS)),
    )
    return ZaiError(
        _CLASSES.get(code or "", ErrorClass.UNKNOWN),
        code,
        texts[0] if texts else None,
        reset_at,
        retry_after,
    )


def _snippet(body: bytes) -> str | None:
    """The start of a non-JSON body, for logs (a WAF page, a proxy's text)."""
    text = body[:256].decode("utf-8", "replace").strip()
    return text or None


def _message(level: dict[str, Any]) -> str | None:
    for name in _MESSAGE_FIELDS:
        value = level.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _fields(level: dict[str, Any], names: tuple[str, ...]) -> list[Any]:
    return [v for k, v in level.items() if k.lower().replace("_", "").replace("-", "") in names]


def _first(values: Any) -> float | None:
    for value in values:
        if value is not None:
            return float(value)
    return None


def _code(value: Any) -> str | None:
    """A business code as decimal digits, or None (free text never becomes a code)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return str(value) if 0 <= value < 10**6 else None
    return _digits_only(value)


def _digits_only(value: Any) -> str | None:
    if isinstance(value, str):
        text = value.strip()
        if 1 <= len(text) <= 6 and text.isascii() and text.isdigit():
            return text
    return None


def _code_in_text(texts: list[str]) -> str | None:
    for text in texts:
        match = _CODE_IN_CONTEXT.search(text)
        if match:
            return match[1] or match[2]
    for text in texts:
        for match in _BARE_CODE.finditer(text):
            if match[1] in _CLASSES:
                return match[1]
    return None


def _seconds(value: Any) -> float | None:
    """A non-negative duration from a number or a numeric string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not _NUMBER.fullmatch(value):
            return None
        value = float(value)
    if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _epoch(value: Any, now: float) -> float | None:
    """Epoch seconds from a number / numeric string (s or ms) or a date-time string."""
    if isinstance(value, str):
        text = value.strip()
        if not _NUMBER.fullmatch(text):
            match = _DATETIME.fullmatch(text)
            return _datetime(match) if match else None
        value = text
    seconds = _seconds(value)
    if seconds is None or seconds == 0:
        return None
    if seconds >= _MILLIS_FROM:
        seconds /= 1000
    elif seconds < _ABSOLUTE_FROM:
        seconds += now
    return seconds if seconds <= _MAX_EPOCH else None


def _datetime(match: re.Match[str]) -> float | None:
    year, month, day, hour, minute = (int(match[i]) for i in range(1, 6))
    second = int(match[6] or 0)
    micro = int((match[7] or "0")[:6].ljust(6, "0"))
    tz_text = (match["tz"] or "").strip().upper()
    try:
        if not tz_text:
            tz: dt.tzinfo = _BEIJING
        elif tz_text in ("Z", "UTC", "GMT"):
            tz = dt.UTC
        else:
            offset = _OFFSET.fullmatch(tz_text)
            if offset is None:
                return None
            delta = dt.timedelta(hours=int(offset[2]), minutes=int(offset[3] or 0))
            tz = dt.timezone(-delta if offset[1] == "-" else delta)
        when = dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
        return when.timestamp()
    except (ValueError, OverflowError):
        return None  # month 13, hour 25, offset of a day or more, ...


def _reset_in_text(texts: list[str]) -> float | None:
    """A reset time in message text: the first date-time or 10/13-digit epoch within
    :data:`_RESET_WINDOW` characters after "reset" ("重置" follows the time in
    Chinese texts, so as a fallback any date-time in the text counts)."""
    for text in texts:
        for word in _RESET_WORD.finditer(text):
            window = text[word.end() : word.end() + _RESET_WINDOW]
            match = _DATETIME.search(window)
            if match and (value := _datetime(match)) is not None:
                return value
            number = _EPOCH_IN_TEXT.search(window)
            if number and (value := _epoch(number[1], 0.0)) is not None:
                return value
    for text in texts:
        for match in _DATETIME.finditer(text):
            if (value := _datetime(match)) is not None:
                return value
    return None


# --- retry --------------------------------------------------------------------------------


def feeds_adaptive(cls: ErrorClass) -> bool:
    """Whether a 429 of this class is an *account throttle*: evidence for the adaptive rate.

    CONCURRENCY (1302) and FREQUENCY (1303) are Z.AI's limits on this account:
    sending slower is the cure (at a given latency, concurrency = rate x latency,
    Little's law, so a lower rate also means fewer requests in flight). UNKNOWN is
    a 429 without a Z.AI code: from a generic OpenAI-compatible upstream that is a
    rate limit on the key (RFC 6585: "too many requests"), so it counts too.
    OVERLOAD (1305) and CONGESTION (1312) are Z.AI's capacity for everybody (1312
    per model): one proxy sending slower does not end them, and capping the host
    for minutes on them refused clients Z.AI would have served; they only back
    off the retry. QUOTA is not a rate at all (hours until the reset).
    """
    return cls in (ErrorClass.CONCURRENCY, ErrorClass.FREQUENCY, ErrorClass.UNKNOWN)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to wait before retrying a Z.AI 429, per class.

    Three terms (docs/decisions/adaptive-rate.md compares them with the Go
    original, the OpenAI/Anthropic SDKs and AWS's jitter variants):

    - the *floor* ``F``: every hint the upstream gave, the ``Retry-After``
      header, the body's ``retry_after`` and the time left until ``reset_at``
      (for every retryable class: retrying before an announced time only earns
      another 429). Like the SDKs and the original, a hint is obeyed, never cut;
    - the *curve* ``B = min(cap, base * 2**attempt)`` per class (exponential);
    - the *jitter* ``j`` in [0, 1] (``rand``; the worker passes ``0.5 + u/2``,
      1.0 means none and keeps tests exact).

    ``wait = max(B*j, F + B*(1 - j))``: one random amount ``d = B*(1 - j)`` is
    taken off the curve or added to the floor, whichever gives the later time.
    Without a floor this is the curve with "equal jitter" (``B/2 .. B``, the
    original's jittered curve). With a floor at or above the curve the spread
    lies *above* the floor (``F .. F + B/2``): Z.AI answers every throttled
    request of a burst with the same ``Retry-After: 1``, and jitter under the
    floor is erased by it, so the whole burst used to come back in the same
    instant. With ``j = 1`` (no jitter) it is ``max(B, F)``. A wait over ``max_wait`` is not taken: the 429 goes to the
    client with its ``Retry-After``, since the agent (Claude Code, an OpenAI SDK)
    retries on its own and a proxy holding a request for minutes only looks hung.
    The caller sleeps inside the exchange's cancel scope: a client that leaves
    ends the wait.

    Base delays:

    - concurrency 0.5 s: 1302 clears as soon as one in-flight request of the
      account ends, and with many agents one ends every fraction of a second;
    - frequency 1.0 s: Z.AI's own Retry-After for 1303 is about a second (the
      mock's default models it) and rate windows refill per second;
    - overload 2.0 s and congestion 2.0 s: 1305 and 1312 are Z.AI's capacity (all
      of it, or one model's); quick retries from every client make the herd that
      keeps it overloaded;
    - unknown 1.0 s: a plain rate limit, like frequency.
    """

    max_retries: int = 3
    concurrency_delay: float = 0.5
    frequency_delay: float = 1.0
    overload_delay: float = 2.0
    congestion_delay: float = 2.0
    unknown_delay: float = 1.0
    cap: float = 30.0  # the backoff term alone never exceeds this
    max_wait: float = 60.0  # a wait beyond this is not taken: no retry

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("concurrency_delay", "frequency_delay", "overload_delay",
                     "congestion_delay", "unknown_delay", "cap", "max_wait"):  # fmt: skip
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    def base_delay(self, cls: ErrorClass) -> float | None:
        """The first wait for ``cls``; None for QUOTA, which is never retried."""
        if cls is ErrorClass.CONCURRENCY:
            return self.concurrency_delay
        if cls is ErrorClass.FREQUENCY:
            return self.frequency_delay
        if cls is ErrorClass.OVERLOAD:
            return self.overload_delay
        if cls is ErrorClass.CONGESTION:
            return self.congestion_delay
        if cls is ErrorClass.UNKNOWN:
            return self.unknown_delay
        return None

    def next_wait(
        self,
        err: ZaiError,
        attempt: int,
        header_retry_after: float | None,
        *,
        now: float,
        rand: float = 1.0,
    ) -> float | None:
        """Seconds to wait before retry number ``attempt + 1`` (``attempt`` = retries
        already done, from 0), or None: do not retry (QUOTA, retries used up, or a
        wait over ``max_wait``)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        base = self.base_delay(err.cls)
        if base is None or attempt >= self.max_retries:
            return None
        jitter = min(1.0, max(0.0, rand)) if math.isfinite(rand) else 1.0
        curve = min(self.cap, base * 2.0 ** min(attempt, 64))
        floor = 0.0
        if header_retry_after is not None and not math.isnan(header_retry_after):
            floor = max(floor, header_retry_after)
        if err.retry_after is not None:
            floor = max(floor, err.retry_after)
        if err.reset_at is not None:
            floor = max(floor, err.reset_at - now)  # a reset in the past adds nothing
        wait = max(curve * jitter, floor + curve * (1.0 - jitter)) if floor > 0 else curve * jitter
        return wait if wait <= self.max_wait else None


# --- HTTP ---------------------------------------------------------------------------------

_DELTA = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(value: bytes | None, *, now: float) -> float | None:
    """An HTTP ``Retry-After`` value in seconds from ``now``: delta-seconds or an
    HTTP-date (RFC 9110 10.2.3). A date in the past is 0; garbage is None.

    Fractional seconds ("1.5") are accepted although the RFC says integer:
    being lenient costs nothing and some gateways send them.
    """
    if value is None or len(value) > 64:
        return None
    text = value.decode("latin-1").strip()
    if _DELTA.fullmatch(text):
        return float(text)
    if not any(c.isalpha() for c in text):  # every HTTP-date form names a day or month
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": the RFC's dates are all GMT
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now)


_MAX_RETRY_AFTER = 2**31 - 1
_SAFE_CODE = re.compile(r"[0-9A-Za-z._-]{1,32}")


def final_headers(
    err: ZaiError, upstream_headers: list[tuple[bytes, bytes]], *, now: float
) -> list[tuple[bytes, bytes]]:
    """Headers to ADD to the 429 relayed to the client after the last attempt.

    ``x-zai-error-class`` always; ``x-zai-error-code`` when known;
    ``x-zai-rate-limit-reset`` (RFC 3339 UTC, rounded up to the second) when the
    body named a reset time; ``retry-after`` only when upstream sent none, in
    whole seconds >= 1, the later of the body's ``retry_after`` and the reset time
    (clients retry on it: retrying before either is known to fail).
    """
    headers = [(b"x-zai-error-class", err.cls.value.encode())]
    if err.code is not None and _SAFE_CODE.fullmatch(err.code):
        headers.append((b"x-zai-error-code", err.code.encode()))
    reset = _rfc3339(err.reset_at)
    if reset is not None:
        headers.append((b"x-zai-rate-limit-reset", reset))
    if not any(name.lower() == b"retry-after" for name, _ in upstream_headers):
        hints = [s for s in (err.retry_after, _left(err.reset_at, now)) if s is not None]
        # Past 2**31-1 s (68 years) a value is garbage, and clients that parse the
        # header into an int32 would choke on it: then say nothing.
        if hints and max(hints) <= _MAX_RETRY_AFTER:
            headers.append((b"retry-after", b"%d" % max(1, math.ceil(max(hints)))))
    return headers


def _left(reset_at: float | None, now: float) -> float | None:
    return None if reset_at is None else reset_at - now


def _rfc3339(epoch: float | None) -> bytes | None:
    if epoch is None or not math.isfinite(epoch):
        return None
    try:
        when = dt.datetime.fromtimestamp(math.ceil(epoch), dt.UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return when.strftime("%Y-%m-%dT%H:%M:%SZ").encode()
