"""A pool of upstream keys (Z.AI accounts): the file, and which key a request goes out with.

Format (TOML, ``upstream.upstream_keys_file`` / ``ZAIPROXY_UPSTREAM_KEYS_FILE``)::

    selection = "headroom"   # optional: "headroom" (the default) or "order"
    cooldown = 30            # optional: seconds a key rests after Z.AI throttled it (1302,
                             # 1303) when Z.AI gave no time; a quota hit (1308, 1310) rests
                             # it until the reset Z.AI names (else 1 hour)

    [[upstream]]
    alias = "team-plan"      # required, unique, 1-64 of A-Z a-z 0-9 _ . - (the only name
                             # logs, metrics, headers and history ever show)
    key = "..."              # the Z.AI key, OR
    # key_env = "ZAI_KEY_TEAM"  # the environment variable holding it (a mounted Secret), OR
    # key_file = "/run/secrets/zai-team"  # a file holding it (first line)
    [upstream.limits]        # optional: this account's own limits (any field of Limits;
                             # limits.upstream_* are every key's defaults)
    requests_per_minute = 120
    tokens_per_5h = 40000000

    [[upstream]]
    alias = "backup"
    key_env = "ZAI_KEY_BACKUP"

    [pin]                    # optional: client key alias -> the upstream alias it always uses
    ci-runner = "backup"

Without the file the pool is the one key of ``ZAI_API_KEY`` under the alias ``default``, with
``limits.upstream_*`` as its limits: exactly the proxy without a pool.

Choosing (per request, :meth:`KeyPool.candidates`)
--------------------------------------------------
- A pinned client key goes out only with its upstream key: it stays pinned when that key
  rests or is refused (the answer is then the key's own 429), never spills to another
  account.
- ``order``: the keys in file order, resting ones left out (all resting: the one that is
  free soonest).
- ``headroom``: the key with the most quota left first: 1 - the highest used share among
  Z.AI's windows for that key (its own quota poller's sample) and its own rolling windows
  in the ledger; ties (e.g. nothing known yet) go round-robin, so equal accounts share the
  load.
- The request is admitted against the first candidate's limits; if they refuse it, the next
  candidate is tried before the caller waits or gets the 429.
- A key answered with 1302/1303 or 1308/1310 rests (a ledger row per key, so every worker
  sees it at once) and the request moves to the next candidate at once, with no
  client-visible error; the last candidate's answer is relayed as it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from zaiproxy.core.config import ConfigError
from zaiproxy.core.limitspec import LIMIT_NAMES, Limits, parse_limits

if TYPE_CHECKING:
    from zaiproxy.core.config import Config

ALIAS_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY_RE: Final = re.compile(r"[\x21-\x7e]+")
DEFAULT_ALIAS: Final = "default"
SELECTIONS: Final = ("headroom", "order")
TOP_FIELDS: Final = ("selection", "cooldown", "upstream", "pin")
ENTRY_FIELDS: Final = ("alias", "key", "key_env", "key_file", "limits")
DEFAULT_COOLDOWN_S: Final = 30.0
MAX_KEYS: Final = 64


class UpstreamKeysError(ConfigError):
    """One or more problems in the upstream keys file (never quoting a key)."""


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    alias: str
    key: str = field(repr=False)
    limits: Limits = field(default_factory=Limits)
    index: int = 0  # position in the file: the key's ledger cells


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The pool as configured (picklable: the supervisor sends it to workers)."""

    keys: tuple[UpstreamKey, ...]
    selection: str = "headroom"
    cooldown_s: float = DEFAULT_COOLDOWN_S
    pins: Mapping[str, str] = field(default_factory=dict)
    from_file: bool = False

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a pool needs at least one key")

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(k.alias for k in self.keys)

    def api_key_bytes(self, index: int) -> bytes | None:
        """The key to send (None: no key, e.g. a demo or test without one)."""
        key = self.keys[index].key
        return key.encode() if key else None

    def by_alias(self, alias: str) -> UpstreamKey | None:
        return next((k for k in self.keys if k.alias == alias), None)


def single(config: Config) -> PoolSpec:
    """The pool of one: ``ZAI_API_KEY`` as ``default`` with ``limits.upstream_*``."""
    return PoolSpec((UpstreamKey(DEFAULT_ALIAS, config.api_key or "", config.upstream_limits(), 0),))


def pool_of(config: Config, env: Mapping[str, str] | None = None) -> PoolSpec:
    """The configured pool: the file's, or the pool of one."""
    if config.upstream_keys_file is None:
        return single(config)
    spec = load_upstream_keys(config.upstream_keys_file, os.environ if env is None else env)
    # limits.upstream_* are every key's defaults; a key's own [upstream.limits] wins per limit.
    defaults = config.upstream_limits()
    keys = tuple(dataclasses.replace(k, limits=Limits(**{
        name: getattr(k.limits, name) if getattr(k.limits, name) is not None
        else getattr(defaults, name) for name in LIMIT_NAMES})) for k in spec.keys)
    return dataclasses.replace(spec, keys=keys)


def load_upstream_keys(path: str, env: Mapping[str, str]) -> PoolSpec:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise UpstreamKeysError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        # Not quoted: tomllib may quote a character of a key.
        where = f" (line {exc.lineno})" if isinstance(exc, tomllib.TOMLDecodeError) and hasattr(
            exc, "lineno") else ""
        raise UpstreamKeysError([f"{path}: not valid UTF-8 TOML{where}"]) from None
    problems: list[str] = []
    spec = _parse(doc, env, problems)
    if problems or spec is None:
        raise UpstreamKeysError([f"{path}: {p}" for p in problems])
    return spec


def _parse(doc: dict[str, object], env: Mapping[str, str], problems: list[str]) -> PoolSpec | None:
    for name in doc:
        if name not in TOP_FIELDS:
            close = difflib.get_close_matches(name, TOP_FIELDS, n=1)
            problems.append(f"{name}: unknown top-level key"
                            + (f" (did you mean {close[0]}?)" if close else ""))
    selection = doc.get("selection", "headroom")
    if selection not in SELECTIONS:
        problems.append(f"selection: must be one of {', '.join(SELECTIONS)}")
    cooldown = doc.get("cooldown", DEFAULT_COOLDOWN_S)
    if (not isinstance(cooldown, int | float) or isinstance(cooldown, bool)
            or not 0 < cooldown <= 86400):
        problems.append("cooldown: must be a number of seconds in (0, 86400]")
        cooldown = DEFAULT_COOLDOWN_S
    raw_keys = doc.get("upstream")
    if not isinstance(raw_keys, list) or not raw_keys:
        problems.append("upstream: missing; add one [[upstream]] table per Z.AI key")
        return None
    if len(raw_keys) > MAX_KEYS:
        problems.append(f"upstream: at most {MAX_KEYS} keys")
    keys: list[UpstreamKey] = []
    seen_alias: set[str] = set()
    seen_key: dict[str, str] = {}
    for i, raw in enumerate(raw_keys):
        entry = _entry(i, raw, env, problems)
        if entry is None:
            continue
        if entry.alias in seen_alias:
            problems.append(f"upstream[{i}] ({entry.alias}): duplicate alias")
            continue
        if entry.key in seen_key:
            problems.append(f"upstream[{i}] ({entry.alias}): same key as {seen_key[entry.key]}")
            continue
        seen_alias.add(entry.alias)
        seen_key[entry.key] = entry.alias
        keys.append(UpstreamKey(entry.alias, entry.key, entry.limits, len(keys)))
    pins: dict[str, str] = {}
    raw_pins = doc.get("pin", {})
    if not isinstance(raw_pins, dict):
        problems.append("pin: must be a table of client alias = upstream alias")
    else:
        for client, target in raw_pins.items():
            if not ALIAS_RE.fullmatch(client):
                problems.append("pin: a client alias must be 1-64 of A-Z a-z 0-9 _ . -")
            elif not isinstance(target, str) or target not in seen_alias:
                problems.append(f"pin.{client}: must name an [[upstream]] alias "
                                f"(known: {', '.join(sorted(seen_alias))})")
            else:
                pins[client] = target
    if problems or not keys:
        return None
    return PoolSpec(tuple(keys), str(selection), float(cooldown), pins, from_file=True)


def _entry(i: int, raw: object, env: Mapping[str, str],
           problems: list[str]) -> UpstreamKey | None:
    if not isinstance(raw, dict):
        problems.append(f"upstream[{i}]: must be a table ([[upstream]])")
        return None
    start = len(problems)
    alias = raw.get("alias")
    name = f"upstream[{i}]"
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias):
        problems.append(f"{name}.alias: required, 1-64 of A-Z a-z 0-9 _ . -")
    else:
        name = f"upstream[{i}] ({alias})"
    for unknown in [k for k in raw if k not in ENTRY_FIELDS]:
        close = difflib.get_close_matches(unknown, ENTRY_FIELDS, n=1)
        problems.append(f"{name}.{unknown}: unknown field"
                        + (f" (did you mean {close[0]}?)" if close else ""))
    sources = [f for f in ("key", "key_env", "key_file") if f in raw]
    key: str | None = None
    if len(sources) != 1:
        problems.append(f"{name}: needs exactly one of key, key_env, key_file")
    elif sources[0] == "key":
        key = raw["key"] if isinstance(raw["key"], str) else None
    elif sources[0] == "key_env":
        var = raw["key_env"]
        if not isinstance(var, str) or var not in env or not env[var]:
            problems.append(f"{name}.key_env: the variable is not set (or empty)")
        else:
            key = env[var].strip()
    else:
        path = raw["key_file"]
        try:
            with open(str(path), encoding="utf-8") as fh:
                key = fh.readline().strip()
        except (OSError, UnicodeDecodeError):
            problems.append(f"{name}.key_file: cannot read it")
    if sources and key is not None and not _KEY_RE.fullmatch(key):
        problems.append(f"{name}: the key must be printable ASCII without spaces")
        key = None
    elif len(sources) == 1 and key is None and not problems[start:]:
        problems.append(f"{name}.{sources[0]}: must be a string")
    limits, limit_problems = parse_limits(raw.get("limits"), f"{name}.limits")
    problems.extend(limit_problems)
    if len(problems) > start or key is None or not isinstance(alias, str):
        return None
    return UpstreamKey(alias, key, limits)
