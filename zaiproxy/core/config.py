"""Start-up configuration: defaults < TOML file < environment < command line.

Design
------
* One table in one place. Every setting is a field of the frozen :class:`Config` dataclass; the
  field's metadata names its TOML section, the environment variables that set it (in order of
  preference) and the parser that turns a raw value into the stored one. The loader, the
  unknown-key checks, :meth:`Config.masked` and :func:`render_check` all read that table, so a new
  setting is one line here and cannot be forgotten by one of them.
* Strict. The system this replaces fell back to defaults when a value did not parse, so a typo ran
  a production proxy with settings nobody chose. Here every value from every layer is checked
  (also one that a higher layer overrides: a broken file is broken even while an env var hides
  it), every problem is collected, and start-up stops with one :class:`ConfigError` that lists
  each as ``<key> (<source>): <value!r>: <reason>``.
* Parsers are pure functions of the raw value and of whether it arrived as text (an env var, a CLI
  string) or typed (TOML, a CLI int/bool). Text is parsed; typed values must already have the right
  type, so ``port = "8080"`` in TOML is an error rather than a guess.
* Secrets (``upstream.api_key``) never leave this module in clear text except as the field value
  itself: ``repr=False``, ``<redacted>`` in errors, ``********`` in :meth:`Config.masked` and
  :func:`render_check`.
* :class:`Config` is picklable (plain values only): the supervisor spawns workers and sends it.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Final

from zaiproxy.core import config_values as values
from zaiproxy.core import original_env, pricing
from zaiproxy.core.limitspec import LIMIT_MAX, LIMIT_NAMES, Limits

# One recovery step of the adaptive upstream rate per this long without throttling
# (limits/adaptive.py); adaptive_forget_after must be longer than one step.
ADAPTIVE_RECOVERY_STEP_S: Final = 10.0

MASK: Final = "********"
REDACTED: Final = "<redacted>"
SECTIONS: Final = ("server", "upstream", "limits", "quota", "auth", "tokens", "log", "history")
CONFIG_ENV: Final = "ZAIPROXY_CONFIG"
_ENV_PREFIX: Final = "ZAIPROXY_"
_MISSING_KEY: Final = (
    "upstream.api_key: missing: set ZAI_API_KEY, or run with --demo to use the built-in mock upstream"
)


class ConfigError(Exception):
    """One or more problems; str() lists each as ``<key> (<source>): <value!r>: <reason>``."""

    problems: list[str]

    def __init__(self, problems: list[str]) -> None:
        # args=(problems,) keeps the exception picklable (it may cross a process boundary).
        super().__init__(list(problems))
        self.problems = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


HISTORY_FILE: Final = "history.duckdb"
DEMO_HISTORY_FILE: Final = "demo-history.duckdb"


def state_dir(env: Mapping[str, str] | None = None) -> str:
    """Where a user's zaiproxy keeps state: ``$XDG_STATE_HOME/zaiproxy`` (default
    ``~/.local/state/zaiproxy``). The container sets its paths to ``/var/lib/zaiproxy``."""
    env = os.environ if env is None else env
    home = env.get("HOME") or os.path.expanduser("~")
    base = env.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return os.path.join(base, "zaiproxy")


def _default_history_path() -> str:
    return os.path.join(state_dir(), HISTORY_FILE)


def _default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 256))


def _setting(
    default: object,
    section: str,
    env: tuple[str, ...],
    parse: values.Parser,
    *,
    secret: bool = False,
    factory: Callable[[], object] | None = None,
) -> Any:
    """A Config field plus its row of the settings table (section, env names, parser)."""
    meta = {"section": section, "env": env, "parse": parse, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, repr=not secret, metadata=meta)


_LIMIT = values.integer(1, LIMIT_MAX)
_KNOWN_MODELS = (
    "glm-4.6", "glm-4.5", "glm-4.5-air", "glm-4.5-x", "glm-4.5-airx", "glm-4.5-flash", "glm-4.5v",
    "glm-4.6v", "glm-4-32b-0414-128k", "glm-4-plus", "glm-z1-air", "embedding-3",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Config:
    """Effective settings. Build with :func:`load_config`; ``Config()`` is all defaults."""

    # [server]
    host: str = _setting("127.0.0.1", "server", ("ZAIPROXY_HOST", "HOST"), values.host)
    port: int = _setting(8080, "server", ("ZAIPROXY_PORT", "PORT"), values.integer(0, 65535))
    # os.cpu_count() clamped to the 1..256 the validator accepts, so the default is always valid.
    workers: int = _setting(
        None, "server", ("ZAIPROXY_WORKERS",), values.integer(1, 256), factory=_default_workers
    )
    demo: bool = _setting(False, "server", ("ZAIPROXY_DEMO",), values.boolean)
    drain_timeout: float = _setting(30.0, "server", ("ZAIPROXY_DRAIN_TIMEOUT",), values.seconds)
    # nginx's keepalive_timeout default.
    keepalive_timeout: float = _setting(75.0, "server", ("ZAIPROXY_KEEPALIVE_TIMEOUT",), values.seconds)
    # Slowloris guard: the whole request head must arrive within this time.
    header_timeout: float = _setting(30.0, "server", ("ZAIPROXY_HEADER_TIMEOUT",), values.seconds)
    max_body_bytes: int = _setting(
        32 << 20, "server", ("ZAIPROXY_MAX_BODY_BYTES",), values.size(1, None)
    )
    max_header_bytes: int = _setting(
        64 << 10, "server", ("ZAIPROXY_MAX_HEADER_BYTES",), values.size(1 << 10, 1 << 20)
    )
    deployment_variant: str = _setting("production", "server", ("DEPLOYMENT_VARIANT",), values.variant)
    ledger: str = _setting("native", "server", ("ZAIPROXY_LEDGER",), values.choice("native", "python"))
    http_impl: str = _setting(
        "h11", "server", ("ZAIPROXY_HTTP_IMPL",), values.choice("h11", "h11-mypyc")
    )
    # [upstream]
    api_key: str | None = _setting(None, "upstream", ("ZAI_API_KEY",), values.secret, secret=True)
    openai_base_url: str = _setting(
        "https://api.z.ai/api/paas/v4", "upstream", ("ZAIPROXY_OPENAI_BASE_URL",), values.url
    )
    anthropic_base_url: str = _setting(
        "https://api.z.ai/api/anthropic", "upstream", ("ZAIPROXY_ANTHROPIC_BASE_URL",), values.url
    )
    # Origin for the Z.AI native pass-through prefixes.
    native_base_url: str = _setting(
        "https://api.z.ai", "upstream", ("ZAIPROXY_NATIVE_BASE_URL",), values.url
    )
    ca_file: str | None = _setting(None, "upstream", ("ZAIPROXY_UPSTREAM_CA_FILE",), values.ca_file)
    connect_timeout: float = _setting(10.0, "upstream", ("ZAIPROXY_CONNECT_TIMEOUT",), values.seconds)
    response_header_timeout: float = _setting(
        300.0, "upstream", ("ZAIPROXY_RESPONSE_HEADER_TIMEOUT",), values.seconds
    )
    # Idle time between body bytes, NOT a total: the old 5-minute total cut long generations.
    body_idle_timeout: float = _setting(
        300.0, "upstream", ("ZAIPROXY_BODY_IDLE_TIMEOUT",), values.seconds
    )
    # Per worker, per upstream origin.
    pool_max_connections: int = _setting(
        256, "upstream", ("ZAIPROXY_POOL_MAX_CONNECTIONS",), values.integer(1, 100_000)
    )
    pool_idle_timeout: float = _setting(30.0, "upstream", ("ZAIPROXY_POOL_IDLE_TIMEOUT",), values.seconds)
    max_retries: int = _setting(3, "upstream", ("MAX_RETRIES",), values.integer(0, 10))
    # Per requested model, the models a request is sent to, in order, when Z.AI answers 1312
    # (model congestion; request/fallback.py). Each one is a retry of max_retries. Empty = none.
    model_fallback: values.ModelFallback = _setting(  # noqa: RUF009 - a frozen value
        values.ModelFallback(), "upstream", ("ZAIPROXY_MODEL_FALLBACK",), values.model_fallback
    )
    # Several upstream keys (accounts), each with its own limits, quota and adaptive rate, and
    # which key a request goes out with (limits/upstream_keys.py). Unset: ZAI_API_KEY alone.
    upstream_keys_file: str | None = _setting(
        None, "upstream", ("ZAIPROXY_UPSTREAM_KEYS_FILE",), values.file_path(must_exist=True)
    )
    # [limits]  Global limits (all traffic of this host), then per upstream key. Unset = no limit.
    requests_per_minute: int | None = _setting(None, "limits", ("ZAIPROXY_REQUESTS_PER_MINUTE",), _LIMIT)
    tokens_per_minute: int | None = _setting(None, "limits", ("ZAIPROXY_TOKENS_PER_MINUTE",), _LIMIT)
    concurrency: int | None = _setting(None, "limits", ("ZAIPROXY_CONCURRENCY",), _LIMIT)
    requests_per_5h: int | None = _setting(None, "limits", ("ZAIPROXY_REQUESTS_PER_5H",), _LIMIT)
    tokens_per_5h: int | None = _setting(None, "limits", ("ZAIPROXY_TOKENS_PER_5H",), _LIMIT)
    requests_per_week: int | None = _setting(None, "limits", ("ZAIPROXY_REQUESTS_PER_WEEK",), _LIMIT)
    tokens_per_week: int | None = _setting(None, "limits", ("ZAIPROXY_TOKENS_PER_WEEK",), _LIMIT)
    upstream_requests_per_minute: int | None = _setting(None, "limits", ("ZAIPROXY_UPSTREAM_REQUESTS_PER_MINUTE",), _LIMIT)
    upstream_tokens_per_minute: int | None = _setting(None, "limits", ("ZAIPROXY_UPSTREAM_TOKENS_PER_MINUTE",), _LIMIT)
    upstream_concurrency: int | None = _setting(None, "limits", ("ZAIPROXY_UPSTREAM_CONCURRENCY",), _LIMIT)
    upstream_requests_per_5h: int | None = _setting(None, "limits", ("ZAIPROXY_UPSTREAM_REQUESTS_PER_5H",), _LIMIT)
    upstream_tokens_per_5h: int | None = _setting(None, "limits", ("ZAIPROXY_UPSTREAM_TOKENS_PER_5H",), _LIMIT)
    upstream_requests_per_week: int | None = _setting(None, "limits", ("ZAIPROXY_UPSTREAM_REQUESTS_PER_WEEK",), _LIMIT)
    upstream_tokens_per_week: int | None = _setting(None, "limits", ("ZAIPROXY_UPSTREAM_TOKENS_PER_WEEK",), _LIMIT)
    # Wait up to this long for a limit instead of answering 429 at once (0 = never wait).
    queue_timeout: float = _setting(0.0, "limits", ("ZAIPROXY_QUEUE_TIMEOUT",), values.seconds_or_zero)
    # Waiting requests per worker beyond which a request is refused at once.
    queue_max: int = _setting(1024, "limits", ("ZAIPROXY_QUEUE_MAX",), values.integer(1, 1_000_000))
    # The adaptive upstream rate: backs off on Z.AI account throttles (1302, 1303, a 429
    # without a code) and recovers by itself (docs/decisions/adaptive-rate.md).
    adaptive_rate: bool = _setting(True, "limits", ("ZAIPROXY_ADAPTIVE_RATE",), values.boolean)
    adaptive_max_rps: float = _setting(
        1000.0, "limits", ("ZAIPROXY_ADAPTIVE_MAX_RPS",), values.number(0.01, 1e6)
    )
    adaptive_min_rps: float = _setting(
        0.5, "limits", ("ZAIPROXY_ADAPTIVE_MIN_RPS",), values.number(0.01, 1e6)
    )
    # A cap is forgotten this long after the last throttle evidence, traffic or not; a saved
    # state whose evidence is older is not restored.
    adaptive_forget_after: float = _setting(
        300.0, "limits", ("ZAIPROXY_ADAPTIVE_FORGET_AFTER",), values.seconds
    )
    # Where the learned rate survives restarts (default: <tmpdir>/zaiproxy-adaptive-<port>.json).
    state_file: str | None = _setting(
        None, "limits", ("ZAIPROXY_STATE_FILE",), values.file_path(must_exist=False)
    )
    # A state file written longer ago than this is not read at all (the throttle time in it
    # decides first: see adaptive_forget_after).
    state_max_age: float = _setting(21600.0, "limits", ("ZAIPROXY_STATE_MAX_AGE",), values.seconds)
    # The shared-memory segment (default: /dev/shm/zaiproxy-<port>).
    ledger_path: str | None = _setting(
        None, "limits", ("ZAIPROXY_LEDGER_PATH",), values.file_path(must_exist=False)
    )
    ledger_rows: int = _setting(4096, "limits", ("ZAIPROXY_LEDGER_ROWS",), values.integer(64, 1 << 20))
    # Where the limits live: "shm" (this host's shared memory, the default) or "redis" (one
    # budget for every proxy sharing the server: docs/decisions/fleet-limits.md).
    limits_backend: str = _setting(
        "shm", "limits", ("ZAIPROXY_LIMITS_BACKEND",), values.choice("shm", "redis")
    )
    redis_url: str | None = _setting(
        None, "limits", ("ZAIPROXY_REDIS_URL",), values.redis_url, secret=True
    )
    # Overrides a password in the URL; the file (a mounted Secret, its first line) is read at
    # start when no redis_password is set.
    redis_password: str | None = _setting(
        None, "limits", ("ZAIPROXY_REDIS_PASSWORD",), values.secret, secret=True
    )
    redis_password_file: str | None = _setting(
        None, "limits", ("ZAIPROXY_REDIS_PASSWORD_FILE",), values.file_path(must_exist=True)
    )
    # Every proxy with the same prefix shares one budget: production and canary spend the same
    # Z.AI account, so the default is the same for both.
    redis_key_prefix: str = _setting(
        "zaiproxy", "limits", ("ZAIPROXY_REDIS_KEY_PREFIX",), values.key_prefix
    )
    redis_connect_timeout: float = _setting(
        0.05, "limits", ("ZAIPROXY_REDIS_CONNECT_TIMEOUT",), values.seconds
    )
    redis_command_timeout: float = _setting(
        0.05, "limits", ("ZAIPROXY_REDIS_COMMAND_TIMEOUT",), values.seconds
    )
    # A concurrency lease lives this long unless its holder renews it (every third of it):
    # the bound on how long a dead pod's slots stay taken.
    redis_lease_ttl: float = _setting(
        15.0, "limits", ("ZAIPROXY_REDIS_LEASE_TTL",), values.number(1.0, 3600.0)
    )
    # Redis unreachable or slow: "local" (this host's ledger with every limit scaled by
    # limits_local_share), "closed" (503) or "open" (no limits).
    limits_fail: str = _setting(
        "local", "limits", ("ZAIPROXY_LIMITS_FAIL",), values.choice("local", "closed", "open")
    )
    limits_local_share: float = _setting(
        1.0, "limits", ("ZAIPROXY_LIMITS_LOCAL_SHARE",), values.share
    )
    # [quota]  Z.AI's own 5-hour and weekly quota, polled (limits/quota.py; the original's
    # QUOTA_* variables map here: docs/migration.md). Off by default (zero-burn, but it is a
    # call to Z.AI the operator did not ask for); --demo and the k8s base turn it on.
    quota_poll: bool = _setting(False, "quota", ("ZAIPROXY_QUOTA_POLL",), values.boolean)
    # The origin of Z.AI's quota API (default: native_base_url's origin).
    quota_base_url: str | None = _setting(None, "quota", ("ZAIPROXY_QUOTA_BASE_URL",), values.url)
    quota_interval: float = _setting(60.0, "quota", ("ZAIPROXY_QUOTA_INTERVAL",), values.seconds)
    quota_timeout: float = _setting(5.0, "quota", ("ZAIPROXY_QUOTA_TIMEOUT",), values.seconds)
    # A sample older than this is shown as stale and never tightens pacing.
    quota_stale_after: float = _setting(900.0, "quota", ("ZAIPROXY_QUOTA_STALE_AFTER",), values.seconds)
    quota_max_response_bytes: int = _setting(
        65536, "quota", ("ZAIPROXY_QUOTA_MAX_RESPONSE_BYTES",), values.integer(1024, 16 << 20)
    )
    # Pace admission so the remaining quota lasts until its reset (limits/quota.py).
    quota_pacing: bool = _setting(False, "quota", ("ZAIPROXY_QUOTA_PACING",), values.boolean)
    # The share of each window kept back: at it, requests get 429 until the window resets.
    quota_reserve: float = _setting(0.05, "quota", ("ZAIPROXY_QUOTA_RESERVE",), values.number(0.0, 0.9))
    # Weight of the newest measurement in the cost-per-request average.
    quota_cost_alpha: float = _setting(0.2, "quota", ("ZAIPROXY_QUOTA_COST_ALPHA",), values.number(0.01, 1.0))
    # The paced rate rises by at most this share per new sample (it falls at once).
    quota_max_increase: float = _setting(
        0.2, "quota", ("ZAIPROXY_QUOTA_MAX_INCREASE",), values.number(0.01, 10.0)
    )
    # [auth]
    keys_file: str | None = _setting(
        None, "auth", ("ZAIPROXY_KEYS_FILE",), values.file_path(must_exist=True)
    )
    admin_token: str | None = _setting(
        None, "auth", ("ZAIPROXY_ADMIN_TOKEN",), values.secret, secret=True
    )
    # Key aliases as a metric label (opt-in: one series per alias).
    alias_metrics: bool = _setting(False, "auth", ("ZAIPROXY_ALIAS_METRICS",), values.boolean)
    # [tokens]  TOKEN_COUNTING_ENABLED / ENABLE_TOKEN_COUNTING are the original's switches.
    token_counting: bool = _setting(
        True, "tokens", ("ZAIPROXY_TOKEN_COUNTING", "TOKEN_COUNTING_ENABLED", "ENABLE_TOKEN_COUNTING"),
        values.boolean,
    )
    # Output reservation when a request gives no max_tokens.
    default_max_output_tokens: int = _setting(
        4096, "tokens", ("ZAIPROXY_DEFAULT_MAX_OUTPUT_TOKENS",), values.integer(1, 10_000_000)
    )
    # Answer POST /v1/messages/count_tokens from the local estimate instead of forwarding it.
    count_tokens_locally: bool = _setting(
        False, "tokens", ("ZAIPROXY_COUNT_TOKENS_LOCALLY",), values.boolean
    )
    # Ask the OpenAI-style upstream for usage on streams (stream_options.include_usage) and strip
    # the extra chunk from clients that did not ask for it.
    openai_include_usage: bool = _setting(
        False, "tokens", ("ZAIPROXY_OPENAI_INCLUDE_USAGE",), values.boolean
    )
    # Model names kept as metric/ledger labels; any other model counts as "other".
    known_models: tuple[str, ...] = _setting(
        _KNOWN_MODELS, "tokens", ("ZAIPROXY_KNOWN_MODELS",), values.name_list
    )
    # Prices for zai_proxy_estimated_cost_usd (TOML/JSON, see zaiproxy/core/pricing.py); unset = the
    # built-in Z.AI list prices.
    price_file: str | None = _setting(None, "tokens", ("ZAIPROXY_PRICE_FILE",), pricing.price_file)
    # [log]  LOG_LEVEL is the original's name; ZAIPROXY_LOG_LEVEL wins when both are set.
    level: str = _setting(
        "info",
        "log",
        ("ZAIPROXY_LOG_LEVEL", "LOG_LEVEL"),
        values.choice("debug", "info", "warning", "error"),
    )
    access_log: bool = _setting(True, "log", ("ZAIPROXY_ACCESS_LOG",), values.boolean)
    # [history]  The DuckDB request history (zaiproxy/recorder): one recorder process writes
    # it; workers hand it one record per request and drop (and count) when it falls behind.
    history: bool = _setting(True, "history", ("ZAIPROXY_HISTORY",), values.boolean)
    # Default: the user's state directory (state_dir()), demo-history.duckdb in demo mode so
    # demo and real traffic never share a file; the image sets /var/lib/zaiproxy/.
    history_path: str = _setting(
        None, "history", ("ZAIPROXY_HISTORY_PATH",), values.file_path(must_exist=False),
        factory=_default_history_path,
    )
    # Raw rows (one per request) and snapshots are kept this many days, 1-minute rollups longer.
    history_raw_days: float = _setting(
        7.0, "history", ("ZAIPROXY_HISTORY_RAW_DAYS",), values.number(0.01, 36500)
    )
    history_rollup_days: float = _setting(
        90.0, "history", ("ZAIPROXY_HISTORY_ROLLUP_DAYS",), values.number(0.01, 36500)
    )

    def global_limits(self) -> Limits:
        return Limits(**{name: getattr(self, name) for name in LIMIT_NAMES})

    def upstream_limits(self) -> Limits:
        return Limits(**{name: getattr(self, "upstream_" + name) for name in LIMIT_NAMES})

    def masked(self) -> dict[str, dict[str, object]]:
        """Every value grouped by section; a set secret is ``"********"``, an unset one None."""
        out: dict[str, dict[str, object]] = {s: {} for s in SECTIONS}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value is not None:
                value = MASK
            out[f.metadata["section"]][f.name] = value
        return out


_FIELDS: Final[tuple[Field[Any], ...]] = fields(Config)
_BY_NAME: Final = {f.name: f for f in _FIELDS}
# The variables that set a Config field (every alias).
SETTING_ENV: Final = frozenset(name for f in _FIELDS for name in f.metadata["env"])

# ZAIPROXY_ variables that something other than the settings table reads: another command, the
# image, the project's scripts. Unknown ZAIPROXY_ variables are refused so that a typo never
# passes silently, but one environment (a shell profile, a container spec, a CI job) serves
# every command: a variable meant for another one is not a typo. Whoever reads one of these
# names it here (the value says who), and every command accepts all of them.
TARGET_ADMIN_TOKEN_ENV: Final = "ZAIPROXY_TARGET_ADMIN_TOKEN"
URL_ENV: Final = "ZAIPROXY_URL"
COMMIT_ENV: Final = "ZAIPROXY_COMMIT"
OTHER_ENV: Final[Mapping[str, str]] = MappingProxyType({
    TARGET_ADMIN_TOKEN_ENV: "zaiproxy collect (--target-token)",
    URL_ENV: "zaiproxy tui (--url)",
    COMMIT_ENV: "zaiproxy serve: the commit label of zai_proxy_build_info",
    # Read when the relay's modules are imported (request/scanner.py), before any config:
    # native or python, anything else stops the worker at start-up with the variable named.
    "ZAIPROXY_RELAY": "zaiproxy serve: the stream scanner and body framing (native, python)",
    "ZAIPROXY_NAMESPACE": "k8s/scripts/rollback-readiness.sh",
    "ZAIPROXY_PRODUCTION_DEPLOYMENT": "k8s/scripts/rollback-readiness.sh",
    "ZAIPROXY_CANARY_DEPLOYMENT": "k8s/scripts/rollback-readiness.sh",
    "ZAIPROXY_SPLIT_SERVICE": "k8s/scripts/rollback-readiness.sh",
})
# Every ZAIPROXY_ variable any command accepts (settings, the config file's path, the others).
KNOWN_ENV: Final = SETTING_ENV | {CONFIG_ENV} | frozenset(OTHER_ENV)


def _key(f: Field[Any]) -> str:
    return f"{f.metadata['section']}.{f.name}"


def _looks_secret(name: str) -> bool:
    n = name.lower()
    return any(word in n for word in ("key", "token", "secret", "password", "auth"))


def _show(value: object, *, redact: bool = False) -> str:
    if redact:
        return REDACTED
    if isinstance(value, dict):
        return "<table>"  # may be large, may hold anything
    shown = repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


def _problem(key: str, source: str, value: object, reason: str, *, redact: bool = False) -> str:
    return f"{key} ({source}): {_show(value, redact=redact)}: {reason}"


class _Layers:
    """Accumulates parsed values (later layers override earlier ones) and problems."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self.problems: list[str] = []
        self.failed: set[str] = set()  # fields with a rejected value in some layer

    def offer(self, f: Field[Any], raw: object, text: bool, source: str, label: str) -> None:
        """Parse one raw value for field ``f``; ``source`` goes to sources, ``label`` to errors."""
        secret: bool = f.metadata["secret"]
        try:
            if text and raw == "":
                # Empty is a value, not "unset": treating it as unset is exactly the silent
                # fallback to defaults this module exists to prevent.
                raise values.Invalid("empty (unset the variable to use the default)")
            value = f.metadata["parse"](raw, text)
        except values.Invalid as exc:
            self.problems.append(
                _problem(_key(f), label, raw, exc.reason, redact=secret or exc.redact)
            )
            self.failed.add(f.name)
            return
        self.values[f.name] = value
        self.sources[_key(f)] = source


def _read_file(path: str, layers: _Layers) -> None:
    label = f"file {path}"
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        layers.problems.append(f"{path} (config file): cannot read: {exc.strerror or exc}")
        return
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries the line and column.
        layers.problems.append(f"{path} (config file): invalid TOML: {exc}")
        return
    for section, table in doc.items():
        if section not in SECTIONS:
            if section in _BY_NAME:
                home = _BY_NAME[section].metadata["section"]
                reason = f"settings go in a section: put it under [{home}]"
            else:
                reason = f"unknown section (known: {', '.join(SECTIONS)})"
            layers.problems.append(
                _problem(section, label, table, reason, redact=_looks_secret(section))
            )
            continue
        if not isinstance(table, dict):
            layers.problems.append(_problem(section, label, table, "must be a table ([section])"))
            continue
        for name, raw in table.items():
            f = _BY_NAME.get(name)
            if f is None or f.metadata["section"] != section:
                layers.problems.append(
                    _problem(
                        f"{section}.{name}",
                        label,
                        raw,
                        _unknown_key_reason(section, name),
                        redact=_looks_secret(name),
                    )
                )
                continue
            layers.offer(f, raw, False, "file", label)


def _unknown_key_reason(section: str, name: str) -> str:
    if name in _BY_NAME:
        return f"unknown key in [{section}]; it belongs in [{_BY_NAME[name].metadata['section']}]"
    known = [f.name for f in _FIELDS if f.metadata["section"] == section]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(known)})"
    return f"unknown key in [{section}]{hint}"


def _env_stem(name: str) -> str:
    return name.removeprefix(_ENV_PREFIX).removeprefix("ZAI_")


def _read_env(env: Mapping[str, str], layers: _Layers) -> None:
    for f in _FIELDS:
        for name in f.metadata["env"]:
            if name in env:  # the first set name wins; shadowed aliases are not looked at
                layers.offer(f, env[name], True, f"env:{name}", f"env:{name}")
                break
    # A misspelt ZAIPROXY_ variable would otherwise be silently ignored. Suggestions compare
    # names without their ZAIPROXY_/ZAI_ prefix, or every typo would look close to every name.
    by_stem = {_env_stem(n): n for n in sorted(KNOWN_ENV)}
    for name in sorted(env):
        if name.startswith(_ENV_PREFIX) and name not in KNOWN_ENV:
            close = difflib.get_close_matches(_env_stem(name), list(by_stem), n=1)
            hint = f"; did you mean {by_stem[close[0]]}?" if close else ""
            layers.problems.append(
                _problem(
                    name, "env", env[name], f"unknown variable{hint}", redact=_looks_secret(name)
                )
            )


def _read_original(env: Mapping[str, str], layers: _Layers) -> None:
    """The original service's variables (core/original_env.py): checked by its rules, and those
    with a setting here set it unless zaiproxy's own variable for it is set too."""
    found, problems = original_env.parsed(env)
    layers.problems.extend(problems)
    for name, (var, value) in found.items():
        if var.field is None:
            continue
        f = _BY_NAME[var.field]
        if not layers.sources.get(_key(f), "").startswith("env:"):
            layers.values[f.name] = value
            layers.sources[_key(f)] = f"env:{name}"


def original_notes(env: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """How zaiproxy reads each of the original service's variables set in ``env`` (where its
    meaning differs, or zaiproxy's own variable wins): logged once at start-up, shown by
    ``config check``."""
    env = os.environ if env is None else env
    return original_env.notes(env, {f.name: f.metadata["env"] for f in _FIELDS})


def _read_cli(cli: Mapping[str, object], layers: _Layers) -> None:
    for name, raw in cli.items():
        if raw is None:  # argparse default: the option was not given
            continue
        f = _BY_NAME.get(name)
        if f is None:
            layers.problems.append(_problem(name, "cli", raw, "unknown setting"))
            continue
        # Strings are parsed like env values; typed values (int, float, bool) are checked.
        layers.offer(f, raw, isinstance(raw, str), "cli", "cli")


def load_config(
    cli: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    path: str | None = None,
    *,
    require_api_key: bool = True,
) -> tuple[Config, dict[str, str]]:
    """Build the effective config: CLI > env > file > defaults.

    Returns the config and the source of each field ("cli" | "env:NAME" | "file" | "default"),
    keyed by "section.field". ``env`` defaults to ``os.environ``; the file path defaults to
    ``$ZAIPROXY_CONFIG``. Raises :class:`ConfigError` listing every problem found.
    ``require_api_key=False``: for commands that never call upstream (``zaiproxy history``).
    """
    env = os.environ if env is None else env
    layers = _Layers()
    if path is None and CONFIG_ENV in env:
        path = env[CONFIG_ENV]
        if not path:
            layers.problems.append(_problem(CONFIG_ENV, "env", path, "empty path"))
            path = None
    if path is not None:
        _read_file(path, layers)
    _read_env(env, layers)
    _read_original(env, layers)
    _read_cli(cli or {}, layers)

    defaults = Config()
    merged = {f.name: layers.values.get(f.name, getattr(defaults, f.name)) for f in _FIELDS}
    sources = {_key(f): layers.sources.get(_key(f), "default") for f in _FIELDS}
    # Only when neither value was rejected: a bad key or a bad demo flag is already reported.
    if (
        require_api_key
        and merged["api_key"] is None
        and merged["upstream_keys_file"] is None
        and not merged["demo"]
        and not {"api_key", "demo"} & layers.failed
    ):
        layers.problems.append(_MISSING_KEY)
    if not merged["token_counting"] and not layers.failed & {"token_counting"}:
        for name in _TOKEN_LIMITS:
            if merged[name] is not None:
                layers.problems.append(
                    f"limits.{name}: token limits need token counting; "
                    "unset it or enable tokens.token_counting"
                )
    if merged["history_rollup_days"] < merged["history_raw_days"]:
        layers.problems.append(
            "history.history_rollup_days: must not be less than history.history_raw_days "
            "(the rollups are made from the raw rows)"
        )
    if merged["upstream_keys_file"] is not None and merged["limits_backend"] == "redis":
        layers.problems.append(
            "upstream.upstream_keys_file: a pool of upstream keys works with "
            "limits_backend = \"shm\": with Redis the fleet's limits, adaptive rate and quota "
            "poll belong to one upstream key; use one key per deployment with Redis"
        )
    if merged["adaptive_min_rps"] > merged["adaptive_max_rps"]:
        layers.problems.append(
            "limits.adaptive_min_rps: must not be greater than limits.adaptive_max_rps"
        )
    if merged["adaptive_forget_after"] <= ADAPTIVE_RECOVERY_STEP_S:
        # A horizon within one recovery step would forget a cap before it ever recovered.
        layers.problems.append(
            f"limits.adaptive_forget_after: must be longer than the {ADAPTIVE_RECOVERY_STEP_S:g} s "
            "recovery step"
        )
    if not layers.failed & {"model_fallback", "max_retries"}:
        for model, chain in merged["model_fallback"].routes:
            if len(chain) > merged["max_retries"]:
                # Each fallback is one retry of the request: the list's tail could never be sent.
                layers.problems.append(
                    f"upstream.model_fallback: {model} lists {len(chain)} fallback "
                    f"model{'s' if len(chain) > 1 else ''} but upstream.max_retries is "
                    f"{merged['max_retries']} (each fallback is one retry): shorten the list "
                    "or raise max_retries"
                )
    if (merged["limits_backend"] == "redis" and merged["redis_url"] is None
            and not layers.failed & {"limits_backend", "redis_url"}):
        layers.problems.append(
            "limits.redis_url: missing: limits.limits_backend is \"redis\"; set "
            "ZAIPROXY_REDIS_URL (redis://host:6379/0, rediss://… or unix:///path)"
        )
    if layers.problems:
        raise ConfigError(layers.problems)
    if sources["history.history_path"] == "default":
        # Computed from the environment given (tests pass their own), demo traffic apart.
        merged["history_path"] = os.path.join(
            state_dir(env), DEMO_HISTORY_FILE if merged["demo"] else HISTORY_FILE)
    return Config(**merged), sources


_TOKEN_LIMITS: Final = tuple(
    prefix + name for prefix in ("", "upstream_") for name in LIMIT_NAMES if name.startswith("tokens_")
)


def _render_value(value: object, secret: bool) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_render_value(v, False) for v in value) + "]"
    if value is None:
        return "(unset)"
    if secret:
        return f'"{MASK}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, values.ModelFallback):
        return value.toml()
    return repr(value)


# ``config check`` aligns its source comments on one column, just right of the longest
# assignment that fits within this many characters: one long value must not push every
# comment out to its width (``known_models`` alone made every line ~200 columns). A longer
# list is wrapped over lines of at most _CHECK_WRAP characters; a longer single value keeps its
# comment two spaces after it.
CHECK_COMMENT_COLUMN: Final = 56
_CHECK_WRAP: Final = 88
_CHECK_INDENT: Final = "    "


def _check_lines(name: str, value: object, secret: bool) -> list[str]:
    """One setting as TOML lines: unset values and secrets commented out, a list that does not
    fit before the comment column wrapped (the source comment goes on the first line)."""
    prefix = "# " if value is None or secret else ""
    left = f"{prefix}{name} = {_render_value(value, secret)}"
    if len(left) <= CHECK_COMMENT_COLUMN or not isinstance(value, tuple) or not value:
        return [left]
    lines = [f"{prefix}{name} = ["]
    line = ""
    for item in (_render_value(v, False) + "," for v in value):
        if line and len(_CHECK_INDENT) + len(line) + 1 + len(item) > _CHECK_WRAP:
            lines.append(f"{prefix}{_CHECK_INDENT}{line}")
            line = ""
        line = f"{line} {item}" if line else item
    lines.append(f"{prefix}{_CHECK_INDENT}{line}")
    return [*lines, f"{prefix}]"]


def render_check(config: Config, sources: dict[str, str],
                 notes: list[tuple[str, str]] | None = None) -> str:
    """Text for ``zaiproxy config check``: each effective value by section with its source.

    The output is itself a valid TOML config file: unset values and secrets
    are written as comments, so ``config check > zaiproxy.toml`` never puts a
    key into a file. Each setting's first line ends with ``  # <source>``.
    """
    rows: dict[str, list[tuple[list[str], str]]] = {s: [] for s in SECTIONS}
    for f in _FIELDS:
        lines = _check_lines(f.name, getattr(config, f.name), f.metadata["secret"])
        rows[f.metadata["section"]].append((lines, sources.get(_key(f), "default")))
    firsts = [len(lines[0]) for section in rows.values() for lines, _ in section]
    width = max((n for n in firsts if n <= CHECK_COMMENT_COLUMN), default=0)
    blocks = []
    for section, section_rows in rows.items():
        out = [f"[{section}]"]
        for lines, source in section_rows:
            out.append(f"{lines[0].ljust(width)}  # {source}")
            out.extend(lines[1:])
        blocks.append("\n".join(out))
    if notes:
        # The original service's variables whose meaning differs here (docs/migration.md).
        out = ["# Variables of the original service (jedarden/zai-proxy), as zaiproxy reads them:"]
        out.extend(f"#   {name}: {note}" for name, note in notes)
        blocks.append("\n".join(out))
    return "\n\n".join(blocks) + "\n"
