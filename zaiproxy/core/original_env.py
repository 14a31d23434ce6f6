"""The environment of the service zaiproxy replaces (``jedarden/zai-proxy``, in Go), honoured or
refused loudly.

Teams migrating have the original's variables in their manifests. Each one is either mapped
onto the setting that means the same here (its value then shows in ``zaiproxy config check``
with the source ``env:<ORIGINAL_NAME>``), or accepted with no equivalent; wherever our meaning
differs, :func:`notes` says how, and the supervisor logs it once at start-up
(``original_variable``). Unlike the original, a value its own rules refuse is an error naming
the variable, never a silent default. zaiproxy's own variable wins when both are set (also
noted). The migration table in docs/migration.md is this module, in prose; a test keeps
them in step.

Variables the settings table reads under the original's own name (``ZAI_API_KEY``,
``DEPLOYMENT_VARIANT``, ``MAX_RETRIES``, ``TOKEN_COUNTING_ENABLED``) are listed here too, for
the table, with ``own=True``: the config reads them itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from zaiproxy.core import config_values as values

_GO_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
GO_DURATION: Final = re.compile(f"(?:{_GO_PART.pattern})+")
_GO_UNITS: Final[Mapping[str, float]] = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3,
                                          "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(raw: object, text: bool) -> float:
    """A Go ``time.ParseDuration`` string (``6h``, ``1m30s``, ``500ms``), > 0, in seconds."""
    s = values.string(raw).strip()
    if not GO_DURATION.fullmatch(s):
        raise values.Invalid(f"not a Go duration (examples: 1m, 15m, 6h, 1h30m): {s!r}")
    total = sum(float(n) * _GO_UNITS[u] for n, u in _GO_PART.findall(s))
    if total <= 0:
        raise values.Invalid("must be greater than 0")
    return total


def _open_interval(lo: float, hi: float, *, hi_closed: bool) -> values.Parser:
    def parse(raw: object, text: bool) -> float:
        try:
            x = float(values.string(raw)) if text else float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise values.Invalid(f"not a number: {raw!r}") from None
        if not (lo < x < hi or (hi_closed and x == hi)):
            raise values.Invalid(f"must be in ({lo:g}, {hi:g}{']' if hi_closed else ')'}")
        return x
    return parse


def _free(raw: object, text: bool) -> str:
    return values.string(raw)


_POSITIVE_FLOAT: Final = values.number(1e-9, 1e12)
_POSITIVE_INT: Final = values.integer(1, 1 << 62)


@dataclass(frozen=True, slots=True)
class OriginalVar:
    name: str
    field: str | None  # the Config field it sets; None: no equivalent here
    parse: values.Parser | Callable[[object, bool], object]
    note: str  # how zaiproxy's meaning differs ("" when it does not)
    own: bool = False  # the settings table reads this name itself


ORIGINAL: Final[tuple[OriginalVar, ...]] = (
    OriginalVar("ZAI_API_KEY", "api_key", values.secret, "", own=True),
    OriginalVar(
        "ZAI_TARGET_URL", "anthropic_base_url", values.url,
        "the base of the Anthropic-shaped routes (/v1/messages, …); the original sent every "
        "path to it, zaiproxy sends OpenAI-shaped routes to ZAIPROXY_OPENAI_BASE_URL"),
    OriginalVar("DEPLOYMENT_VARIANT", "deployment_variant", values.variant, "", own=True),
    OriginalVar("TOKEN_COUNTING_ENABLED", "token_counting", values.boolean, "", own=True),
    OriginalVar(
        "TOKENIZER_MODEL", None, _free,
        "no equivalent: the model label is each request's model (names outside "
        "ZAIPROXY_KNOWN_MODELS count as \"other\"); token estimates use cl100k_base"),
    OriginalVar(
        "MAX_WORKERS", "upstream_concurrency", values.integer(1, 1 << 30),
        "the concurrent upstream requests cap; the original applied 10 when unset, zaiproxy "
        "caps only when set, and a request above it waits in the admission queue "
        "(ZAIPROXY_QUEUE_TIMEOUT) or gets 429 at once, where the original answered 503"),
    OriginalVar("MAX_RETRIES", "max_retries", values.integer(0, 10), "", own=True),
    OriginalVar(
        "RATE_LIMIT_INITIAL", None, _POSITIVE_FLOAT,
        "no equivalent: zaiproxy's adaptive rate starts at RATE_LIMIT_MAX "
        "(ZAIPROXY_ADAPTIVE_MAX_RPS) and only Z.AI's throttling lowers it"),
    OriginalVar("RATE_LIMIT_MIN", "adaptive_min_rps", _POSITIVE_FLOAT, ""),
    OriginalVar(
        "RATE_LIMIT_MAX", "adaptive_max_rps", _POSITIVE_FLOAT,
        "the adaptive rate's ceiling, as in the original; zaiproxy also starts there"),
    OriginalVar(
        "RATE_LIMIT_CEILING_ALPHA", None, _open_interval(0, 1, hi_closed=True),
        "no equivalent: zaiproxy holds at 0.7 times the send rate Z.AI throttled, and forgets it "
        "ZAIPROXY_ADAPTIVE_FORGET_AFTER after the last throttle (docs/decisions/adaptive-rate.md)"),
    OriginalVar(
        "RATE_LIMIT_HOLD_MARGIN", None, _open_interval(0, 1, hi_closed=False),
        "no equivalent (see RATE_LIMIT_CEILING_ALPHA)"),
    OriginalVar(
        "RATE_LIMIT_PROBE_INTERVAL", None, _POSITIVE_INT,
        "no equivalent: zaiproxy recovers by time (the rate doubles every 10 s up to the hold "
        "line), not by counting clean windows"),
    OriginalVar(
        "RATE_LIMIT_STATE_FILE", "state_file", values.file_path(must_exist=False),
        "zaiproxy writes its own format there; a ceiling file the original wrote is not restored"),
    OriginalVar("RATE_LIMIT_STATE_MAX_AGE", "state_max_age", go_duration, ""),
    OriginalVar(
        "QUOTA_POLL_ENABLED", "quota_poll", values.boolean,
        "as in the original, plus: with ZAIPROXY_LIMITS_BACKEND=redis one pod polls for the "
        "fleet; the sample is also in /admin/keys, the TUI and ZAIPROXY_QUOTA_PACING"),
    OriginalVar("QUOTA_POLL_INTERVAL", "quota_interval", go_duration, ""),
    OriginalVar("QUOTA_POLL_TIMEOUT", "quota_timeout", go_duration, ""),
    OriginalVar("QUOTA_STALE_AFTER", "quota_stale_after", go_duration, ""),
    OriginalVar("ZAI_QUOTA_BASE_URL", "quota_base_url", values.url, ""),
    OriginalVar("QUOTA_MAX_RESPONSE_BYTES", "quota_max_response_bytes",
                values.integer(1024, 16 << 20),
                "honoured by the poller (the original's poller ignored it and kept 64 KiB)"),
    OriginalVar(
        "QUOTA_ENFORCEMENT_ENABLED", "quota_pacing", values.boolean,
        "planned by the original, never built: zaiproxy paces admission so the quota lasts "
        "to its reset and answers 429 at the reserve (docs/architecture.md, quota)"),
    OriginalVar("QUOTA_RESERVE_FRACTION", "quota_reserve", values.number(0.0, 0.9), ""),
    OriginalVar("QUOTA_RATE_ALPHA", "quota_cost_alpha", values.number(0.01, 1.0),
                "the weight of the newest cost-per-request measurement"),
    OriginalVar("QUOTA_RATE_MAX_INCREASE", "quota_max_increase", values.number(0.01, 10.0),
                "the paced rate's largest rise per new sample"),
    OriginalVar(
        "ZAI_PROXY_VERSION", None, _free,
        "no equivalent: zaiproxy reports its own version (zaiproxy version, zai_proxy_build_info)"),
    OriginalVar(
        "ZAI_PROXY_COMMIT", None, _free,
        "the commit label of zai_proxy_build_info when ZAIPROXY_COMMIT is not set"),
    OriginalVar("ZAI_PROXY_BUILD_TIME", None, _free,
                "no equivalent (see ZAI_PROXY_VERSION)"),
)
BY_NAME: Final[Mapping[str, OriginalVar]] = {v.name: v for v in ORIGINAL}
# Read by the settings table or by apply(): every command accepts them.
NAMES: Final = frozenset(BY_NAME)


def parsed(env: Mapping[str, str]) -> tuple[dict[str, tuple[OriginalVar, object]], list[str]]:
    """The original's variables set in ``env`` that the settings table does not read itself,
    parsed by the original's rules: (name -> (variable, value)), and the problems."""
    found: dict[str, tuple[OriginalVar, object]] = {}
    problems: list[str] = []
    for var in ORIGINAL:
        if var.own or var.name not in env:
            continue
        raw = env[var.name]
        try:
            if raw == "":
                raise values.Invalid("empty (unset the variable)")
            found[var.name] = (var, var.parse(raw, True))
        except values.Invalid as exc:
            problems.append(f"{var.name} (a variable of the original service): {exc.reason} "
                            f"(got {raw!r})")
    return found, problems


def notes(env: Mapping[str, str], own_names: Mapping[str, tuple[str, ...]] | None = None,
          ) -> list[tuple[str, str]]:
    """(variable, how zaiproxy reads it) for each of the original's variables set in ``env``
    whose meaning here differs, or which zaiproxy's own variable overrides. ``own_names``:
    field -> the settings table's env names (to say which one wins)."""
    out = []
    for var in ORIGINAL:
        if var.name not in env:
            continue
        names = own_names.get(var.field, ()) if own_names and var.field else ()
        if var.own:  # the settings table's order decides: names before this one win
            names = names[:names.index(var.name)] if var.name in names else ()
        winner = next((n for n in names if n in env), None)
        if winner is not None:
            out.append((var.name, f"ignored: {winner} is set too and wins"))
        elif var.note:
            out.append((var.name, var.note))
    return out
