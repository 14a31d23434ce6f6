"""Value parsers for the settings table in ``zaiproxy.core.config``.

Each parser is a pure function ``(raw, arrived_as_text) -> value`` that raises
:class:`Invalid` with a reason (never containing the value: the caller shows
it, redacted when it may hold a secret). Text (env vars, CLI strings) is
parsed; typed values (TOML, CLI ints/bools) must already have the right type.
"""

from __future__ import annotations

import math
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from zaiproxy.core.durations import DurationError, Problem, parse_duration, positive_seconds


class Invalid(Exception):
    """A raw value was rejected. The reason never contains the value (the caller shows it)."""

    def __init__(self, reason: str, *, redact: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.redact = redact  # the value itself may hold a secret (URL user info)


# (raw value, arrived as text?) -> stored value, or raise Invalid.
Parser = Callable[[object, bool], object]


def type_name(raw: object) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string"}.get(
        type(raw), "table" if isinstance(raw, dict) else type(raw).__name__
    )


def string(raw: object) -> str:
    if not isinstance(raw, str):
        raise Invalid(f"not a string (got {type_name(raw)})")
    return raw


_INT_RE = re.compile(r"[+-]?[0-9]+")


def integer(lo: int, hi: int) -> Parser:
    def parse(raw: object, text: bool) -> int:
        if text:
            s = str(raw).strip()
            if not _INT_RE.fullmatch(s):
                raise Invalid("not an integer")
            value = int(s)
        elif isinstance(raw, int) and not isinstance(raw, bool):  # bool is an int subclass
            value = raw
        else:
            raise Invalid(f"not an integer (got {type_name(raw)})")
        if not lo <= value <= hi:
            raise Invalid(f"must be between {lo} and {hi}")
        return value

    return parse


# The config's wording of core.durations' refusals (the reason never holds the value).
_SECONDS_REASONS: Final[dict[Problem, str]] = {
    "syntax": "not a number of seconds (write e.g. 30 or 2.5, without a unit)",
    "not_finite": "must be a finite number",
    "not_positive": "must be greater than 0",
}


def seconds(raw: object, text: bool) -> float:
    """A positive, finite number of seconds: ``core.durations``' grammar without a unit."""
    try:
        if text:
            return parse_duration(str(raw), units=False)
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return positive_seconds(float(raw), str(raw))
    except DurationError as exc:
        raise Invalid(_SECONDS_REASONS[exc.problem]) from None
    raise Invalid(f"not a number (got {type_name(raw)})")


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def boolean(raw: object, text: bool) -> bool:
    if text:
        s = str(raw).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise Invalid("not a boolean (use 1/0, true/false, yes/no or on/off)")
    if isinstance(raw, bool):
        return raw
    raise Invalid(f"not a boolean (got {type_name(raw)}; write true or false without quotes)")


# K/M/G are binary, as in nginx's client_max_body_size; KB/MB/GB are SI; KiB/MiB/GiB are binary.
_SIZE_RE = re.compile(r"([0-9]+)\s*([kmg](?:i?b)?)?", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
}  # fmt: skip


def human_size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


def size(lo: int, hi: int | None) -> Parser:
    def parse(raw: object, text: bool) -> int:
        # Strings are sizes in both env and TOML (`max_body_bytes = "32MiB"`), so `text` is moot.
        if isinstance(raw, str):
            m = _SIZE_RE.fullmatch(raw.strip())
            if m is None:
                raise Invalid(
                    "not a size (an integer with an optional K, KB, KiB, M, MB, MiB, G, GB "
                    "or GiB suffix)"
                )
            value = int(m[1]) * _SIZE_UNITS[(m[2] or "").lower()]
        elif isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        else:
            raise Invalid(f"not a size (got {type_name(raw)})")
        if hi is None and value < lo:
            raise Invalid(f"must be at least {human_size(lo)}")
        if hi is not None and not lo <= value <= hi:
            raise Invalid(f"must be between {human_size(lo)} and {human_size(hi)}")
        return value

    return parse


def choice(*options: str) -> Parser:
    def parse(raw: object, text: bool) -> str:
        value = string(raw).strip().lower()
        if value not in options:
            raise Invalid(f"must be one of: {', '.join(options)}")
        return value

    return parse


def host(raw: object, text: bool) -> str:
    s = string(raw)
    if s.startswith("[") and s.endswith("]"):  # "[::1]" as written in URLs; getaddrinfo wants ::1
        s = s[1:-1]
    if not s or any(c.isspace() or not c.isprintable() for c in s):
        raise Invalid("must be a host name or IP address (non-empty, no whitespace)")
    return s


# The variant is a label value on every metric series: bounded and Prometheus-friendly.
_VARIANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def variant(raw: object, text: bool) -> str:
    s = string(raw)
    if not _VARIANT_RE.fullmatch(s):
        raise Invalid(
            "must match ^[a-z0-9][a-z0-9_-]{0,31}$ (it is a metric label value: lower case, "
            "digits, '_' or '-', at most 32 characters)"
        )
    return s


def url(raw: object, text: bool) -> str:
    s = string(raw)
    if not s or any(c.isspace() or not c.isprintable() for c in s):
        raise Invalid("must be a URL without whitespace or control characters")
    try:
        parts = urlsplit(s)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise Invalid(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise Invalid("scheme must be http or https")
    if not parts.hostname:
        raise Invalid("has no host")
    if "@" in parts.netloc:
        # user:password@ could hold a credential, so the value is not echoed back.
        raise Invalid("must not contain user info (user:password@)", redact=True)
    if "#" in s:
        raise Invalid("must not contain a fragment ('#...')")
    if "?" in s:
        raise Invalid("must not contain a query string ('?...')")
    return s.rstrip("/")


def redis_url(raw: object, text: bool) -> str:
    """``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS) or ``unix:///path``.

    A password in the URL is accepted (the field is secret: never shown, never logged)."""
    s = string(raw)
    if not s or any(c.isspace() or not c.isprintable() for c in s):
        raise Invalid("must be a URL without whitespace or control characters", redact=True)
    try:
        parts = urlsplit(s)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise Invalid("not a valid URL", redact=True) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise Invalid("scheme must be redis, rediss or unix", redact=True)
    if parts.scheme == "unix":
        if not parts.path:
            raise Invalid("unix:// needs a socket path (unix:///run/redis.sock)", redact=True)
    else:
        if not parts.hostname:
            raise Invalid("has no host", redact=True)
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise Invalid("the path must be a database number (/0)", redact=True)
    return s


def key_prefix(raw: object, text: bool) -> str:
    s = string(raw)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", s):
        raise Invalid("must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$ (no braces: it is the "
                      "Redis Cluster hash tag)")
    return s


def share(raw: object, text: bool) -> float:
    """A fraction in (0, 1]: ``0.25`` or ``1/4``."""
    if text and isinstance(raw, str) and "/" in raw:
        num, _, den = raw.partition("/")
        try:
            value = float(num.strip()) / float(den.strip())
        except (ValueError, ZeroDivisionError):
            raise Invalid("not a fraction (e.g. 0.25 or 1/4)") from None
    else:
        value = float(number(0.0, 1.0)(raw, text))  # type: ignore[arg-type]
    if not 0.0 < value <= 1.0:
        raise Invalid("must be in (0, 1]")
    return value


def ca_file(raw: object, text: bool) -> str:
    path = os.path.expanduser(string(raw))
    if not path:
        raise Invalid("empty path")
    if not os.path.isfile(path):
        raise Invalid("not an existing file")
    if not os.access(path, os.R_OK):
        raise Invalid("file is not readable")
    # Load it the way the upstream client will, so a non-PEM file fails here, not on the first
    # request to the private upstream.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise Invalid(f"not a PEM CA bundle ({exc})") from None
    return path


def secret(raw: object, text: bool) -> str:
    s = string(raw)
    if not s:
        raise Invalid("empty")
    if any(c.isspace() or not c.isprintable() for c in s):
        # Most often a trailing newline from a mounted secret file.
        raise Invalid("contains whitespace or control characters")
    return s


def seconds_or_zero(raw: object, text: bool) -> float:
    """A finite number of seconds >= 0 (0 switches the feature off)."""
    if (text and str(raw).strip() in ("0", "0.0")) or (not text and raw == 0 and type(raw) is not bool):
        return 0.0
    return seconds(raw, text)


def number(lo: float, hi: float) -> Parser:
    """A finite number in [lo, hi] (ints accepted)."""

    def parse(raw: object, text: bool) -> float:
        if text:
            try:
                value = float(str(raw).strip())
            except ValueError:
                raise Invalid("not a number") from None
        elif isinstance(raw, int | float) and not isinstance(raw, bool):
            value = float(raw)
        else:
            raise Invalid(f"not a number (got {type_name(raw)})")
        if not math.isfinite(value) or not lo <= value <= hi:
            raise Invalid(f"must be between {lo:g} and {hi:g}")
        return value

    return parse


def file_path(must_exist: bool) -> Parser:
    def parse(raw: object, text: bool) -> str:
        path = os.path.expanduser(string(raw))
        if not path or any(c in path for c in "\0\n"):
            raise Invalid("not a usable path")
        if must_exist and not os.path.isfile(path):
            raise Invalid("not an existing file")
        return path

    return parse


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def name_list(raw: object, text: bool) -> tuple[str, ...]:
    """A list of names: comma-separated text, or a TOML array of strings."""
    if isinstance(raw, str):
        items = [s.strip() for s in raw.split(",") if s.strip()]
    elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        items = [s.strip() for s in raw]
    else:
        raise Invalid(f"not a list of names (got {type_name(raw)})")
    for item in items:
        if not _NAME_RE.fullmatch(item):
            raise Invalid("names must match ^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True, slots=True)
class ModelFallback:
    """``upstream.model_fallback``: per requested model, the models to send a request to, in
    order, when Z.AI answers 1312 (model congestion); see ``zaiproxy/request/fallback.py``.

    Names compare case-insensitively, as Z.AI (and the keys file) compare them. Each list is
    the whole route for a request that asked for its model: a fallback model's own list is
    never followed, so lists may name each other (4.6 -> 4.5 and 4.5 -> 4.6) without a loop.
    A tuple of pairs, not a dict: the Config stays hashable and picklable.
    """

    routes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def lookup(self, model: str) -> tuple[str, tuple[str, ...]] | None:
        """(``model`` as configured, the models after it in order), or None: it has none."""
        wanted = model.lower()
        for route in self.routes:
            if route[0].lower() == wanted:
                return route
        return None

    def toml(self) -> str:
        """The value as a TOML inline table (``config check`` prints it)."""
        # Names match _NAME_RE: nothing in them needs escaping in a TOML string.
        entries = (f'"{name}" = [' + ", ".join(f'"{m}"' for m in chain) + "]"
                   for name, chain in self.routes)
        return "{" + ", ".join(entries) + "}"


def model_fallback(raw: object, text: bool) -> ModelFallback:
    """``MODEL=FALLBACK|FALLBACK,MODEL=FALLBACK`` as text (env), a table of arrays in TOML
    (``{"glm-4.6" = ["glm-4.5"]}``). Every name is a model name (``name_list``'s grammar);
    a list is not empty, does not name its own model or one model twice; no model has two
    lists. A reason names the model whose list is wrong (once its name is known to be a
    model name): a TOML table is shown as ``<table>``, so the reason is all the reader gets."""
    pairs: list[tuple[object, object]]
    if text:
        pairs = []
        for entry in str(raw).split(","):
            if not entry.strip():
                continue  # a trailing comma
            name, sep, names = entry.partition("=")
            if not sep:
                raise Invalid("write MODEL=FALLBACK[|FALLBACK...], entries separated by ','")
            pairs.append((name.strip(), [m.strip() for m in names.split("|")] if names.strip()
                          else []))
    elif isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        raise Invalid(f'not a table (got {type_name(raw)}): write {{"glm-4.6" = ["glm-4.5"]}}')
    routes: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for model, chain in pairs:
        if not isinstance(model, str) or not _NAME_RE.fullmatch(model):
            raise Invalid(f"a model name must match ^{_NAME_RE.pattern}$")
        if not isinstance(chain, list):
            raise Invalid(f"{model}: not an array of model names (got {type_name(chain)})")
        if not chain:
            raise Invalid(f"{model}: no fallback model (leave the model out instead)")
        for m in chain:
            if not isinstance(m, str) or not _NAME_RE.fullmatch(m):
                raise Invalid(f"{model}: a model name must match ^{_NAME_RE.pattern}$")
        lowered = [m.lower() for m in chain]
        if model.lower() in lowered:
            raise Invalid(f"{model}: falls back to itself")
        if len(set(lowered)) != len(lowered):
            raise Invalid(f"{model}: names a fallback model twice")
        if model.lower() in seen:
            raise Invalid(f"{model}: has two fallback lists")
        seen.add(model.lower())
        routes.append((model, tuple(chain)))
    return ModelFallback(tuple(routes))
