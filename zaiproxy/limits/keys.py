"""The client keys file: who may use the proxy, for which models, under which limits.

Format (TOML)::

    # One [[keys]] table per client. keys = [] is valid: the proxy then admits no client.
    [[keys]]
    alias = "alice-laptop"        # required, unique, 1-64 of A-Z a-z 0-9 _ . -
                                  # (appears in logs, metrics and history; the key never does)
    key = "zp-live-..."           # the secret the client presents, OR
    # key_sha256 = "<64 hex>"     # its SHA-256 in hex, so the file need not hold the secret
                                  # (exactly one of key / key_sha256;
                                  #  make one with: printf %s "$KEY" | sha256sum)
    enabled = true                # optional, default true
    models = ["glm-4.6", "glm-4.5-air"]   # optional; absent or [] = every model allowed
    [keys.limits]                 # optional; any field of zaiproxy.core.limitspec.Limits
    requests_per_minute = 60
    concurrency = 4

Decisions
---------
* Strict, like the main config: :func:`load_keys` checks every entry and raises one
  :class:`KeysFileError` listing every problem (entries are named ``keys[0]`` for the first
  ``[[keys]]`` table, plus the alias when it is valid). No message ever contains a key value:
  bad keys, bad aliases and bad hashes are described, not echoed, and the two tomllib messages
  that quote a character of the file have that character removed.
* A key must be printable ASCII without spaces (anything else cannot arrive intact in an HTTP
  header, so it could never match). There is no minimum length; choose long random keys.
* Only SHA-256 digests are kept after loading; the parsed document (the only holder of plaintext
  keys) is dropped when :func:`load_keys` returns. ``repr`` shows neither key nor digest.
* ``models`` is compared case-insensitively (``GLM-4.6`` is ``glm-4.6`` to Z.AI).
* :meth:`KeyTable.lookup` also returns *disabled* keys: the caller answers 401 saying the key is
  disabled (the client holds that key, so this tells it nothing new) instead of "unknown key",
  which would send an operator looking for a typo.
* :func:`client_credential` takes ``x-api-key`` over ``Authorization: Bearer`` when both are sent:
  ``x-api-key`` is set only by API clients (Claude Code / the Anthropic SDK), while an
  ``Authorization`` header may come from a gateway in between (or from ``ANTHROPIC_AUTH_TOKEN``
  set next to ``ANTHROPIC_API_KEY``, where the API key is the more specific setting).
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

from zaiproxy.core.config import ConfigError
from zaiproxy.core.limitspec import Limits, parse_limits

ALIAS_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY_RE: Final = re.compile(r"[\x21-\x7e]+")
_HEX64_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
ENTRY_FIELDS: Final = ("alias", "key", "key_sha256", "enabled", "models", "limits")
# tomllib's "Illegal character 'x'" / "Found invalid character 'x'" quote one character of the
# file, which may be a character of a key.
_TOML_QUOTED_CHAR: Final = re.compile(r"""(character) (?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
# problem(where-in-entry, reason): records one problem of the entry being parsed.
_Problem = Callable[[str, str], None]


class KeysFileError(ConfigError):
    """One or more problems in the keys file; str() lists them, one per line.

    A :class:`ConfigError`, so start-up reports it the same way as a bad main config.
    """


def key_digest(key: str | bytes) -> bytes:
    """The 32-byte SHA-256 of a client key (what the table stores and looks up)."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


@dataclass(frozen=True, slots=True)
class ClientKey:
    alias: str
    digest: bytes = field(repr=False)  # sha256 of the key; kept out of repr and logs
    enabled: bool = True
    models: frozenset[str] | None = None  # lower-case; None = every model
    limits: Limits = field(default_factory=Limits)

    def allows_model(self, model: str | None) -> bool:
        """Whether this key may use ``model`` (a request without a model is not refused here)."""
        return model is None or self.models is None or model.lower() in self.models


@dataclass(frozen=True, slots=True)
class KeySource:
    """Which file a table came from, for the "keys reloaded" log line and change detection."""

    path: str
    mtime: float
    sha256: str  # hex digest of the file's bytes

    def __str__(self) -> str:
        return f"{self.path} (sha256 {self.sha256[:12]}, mtime {self.mtime:.0f})"


class KeyTable:
    """Client keys by digest; immutable once built (a reload builds a new table)."""

    __slots__ = ("_by_digest", "_entries", "_source")

    def __init__(self, entries: Iterable[ClientKey], source: KeySource | None = None) -> None:
        self._entries = tuple(entries)
        self._by_digest = {entry.digest: entry for entry in self._entries}
        if len(self._by_digest) != len(self._entries):
            raise ValueError("two client keys have the same digest")
        if len({entry.alias for entry in self._entries}) != len(self._entries):
            raise ValueError("two client keys have the same alias")
        self._source = source

    def lookup(self, presented: bytes) -> ClientKey | None:
        """The entry for the key a client presented (disabled ones too), or None."""
        digest = hashlib.sha256(presented).digest()
        # The dict lookup hashes and compares *digests*, never the secret: its timing can only
        # tell a prober how close sha256(guess) came to a stored digest, which says nothing about
        # any key (finding a preimage is the hard part). compare_digest then confirms the match
        # in constant time, so the accept decision does not rest on dict/bytes equality internals.
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ClientKey]:
        return iter(self._entries)

    @property
    def aliases(self) -> tuple[str, ...]:
        """Aliases in file order (the bounded label values for metrics)."""
        return tuple(entry.alias for entry in self._entries)

    @property
    def source(self) -> KeySource | None:
        return self._source

    def __repr__(self) -> str:
        return f"KeyTable({len(self)} keys, source={self._source})"


def load_keys(path: str | os.PathLike[str]) -> KeyTable:
    """Read and validate the keys file; raises :class:`KeysFileError` listing every problem."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
            mtime = os.fstat(fh.fileno()).st_mtime
    except OSError as exc:
        raise KeysFileError([f"{path}: cannot read keys file: {exc.strerror or exc}"]) from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise KeysFileError([f"{path}: not UTF-8 (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries the line and column.
        message = _TOML_QUOTED_CHAR.sub(r"\1", str(exc))
        raise KeysFileError([f"{path}: invalid TOML: {message}"]) from None
    source = KeySource(path, mtime, hashlib.sha256(data).hexdigest())
    entries, problems = _parse_document(doc)
    if problems:
        raise KeysFileError(problems)
    return KeyTable(entries, source)


def _parse_document(doc: dict[str, object]) -> tuple[list[ClientKey], list[str]]:
    problems = [
        f"{name}: unknown top-level key (the file holds only [[keys]] tables)"
        for name in doc
        if name != "keys"
    ]
    raw_entries = doc.get("keys")
    if raw_entries is None:
        problems.append("keys: missing; add [[keys]] tables (or keys = [] to admit no client)")
        return [], problems
    if not isinstance(raw_entries, list):
        problems.append("keys: must be an array of tables ([[keys]])")
        return [], problems
    entries: list[ClientKey] = []
    alias_at: dict[str, int] = {}
    digest_at: dict[bytes, str] = {}  # digest -> how the first entry with it is named
    for i, raw in enumerate(raw_entries):
        # Duplicates are checked on every valid alias and key, also of entries with other
        # problems, so one run reports them all.
        alias, digest, entry = _parse_entry(i, raw, problems)
        here = f"keys[{i}]" if alias is None else f"keys[{i}] ({alias})"
        duplicate = False
        if alias is not None:
            if alias in alias_at:
                problems.append(f"{here}: duplicate alias (keys[{alias_at[alias]}])")
                duplicate = True
            else:
                alias_at[alias] = i
        if digest is not None:
            if digest in digest_at:
                problems.append(
                    f"{here}: same key as {digest_at[digest]}; each client needs its own key"
                )
                duplicate = True
            else:
                digest_at[digest] = here
        if entry is not None and not duplicate:
            entries.append(entry)
    return entries, problems


def _parse_entry(
    i: int, raw: object, problems: list[str]
) -> tuple[str | None, bytes | None, ClientKey | None]:
    """One ``[[keys]]`` table: (its alias, its digest, the entry), each None if not valid.

    Appends the entry's problems; the entry is None if there are any.
    """
    if not isinstance(raw, dict):
        problems.append(f"keys[{i}]: must be a table ([[keys]])")
        return None, None, None
    start = len(problems)

    alias = raw.get("alias")
    valid_alias: str | None = None
    name = ""  # the alias in messages, once it is known to be valid
    if alias is None:
        problems.append(f"keys[{i}].alias: missing")
    elif not isinstance(alias, str):
        problems.append(f"keys[{i}].alias: must be a string")
    elif not ALIAS_RE.fullmatch(alias):
        # Not echoed: a string in the wrong place may be a key.
        problems.append(f"keys[{i}].alias: must be 1-64 characters of A-Z a-z 0-9 _ . -")
    else:
        valid_alias = alias
        name = f" ({alias})"

    def problem(where: str, reason: str) -> None:
        problems.append(f"keys[{i}]{where}{name}: {reason}")

    for unknown in [k for k in raw if k not in ENTRY_FIELDS]:
        close = difflib.get_close_matches(unknown, ENTRY_FIELDS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(ENTRY_FIELDS)}"
        problem(f".{unknown}", f"unknown field ({hint})")

    digest = _parse_secret(raw, problem)

    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        problem(".enabled", "must be true or false")

    models = raw.get("models")
    allowed: frozenset[str] | None = None
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            problem(".models", "must be a list of model names")
        elif models:
            allowed = frozenset(m.lower() for m in models)

    limits, limit_problems = parse_limits(raw.get("limits"), f"keys[{i}].limits")
    for p in limit_problems:
        # "keys[2].limits.x: reason" -> "keys[2].limits.x (alias): reason"
        where, sep, reason = p.partition(": ")
        problems.append(f"{where}{name}{sep}{reason}")

    if len(problems) > start or digest is None or valid_alias is None:
        return valid_alias, digest, None
    return valid_alias, digest, ClientKey(valid_alias, digest, bool(enabled), allowed, limits)


def _parse_secret(raw: dict[str, object], problem: _Problem) -> bytes | None:
    """The digest from ``key`` or ``key_sha256``; neither value ever reaches a message."""
    key, key_sha256 = raw.get("key"), raw.get("key_sha256")
    if key is None and key_sha256 is None:
        problem("", "needs key or key_sha256")
        return None
    if key is not None and key_sha256 is not None:
        problem("", "has both key and key_sha256; keep one")
        return None
    if key is not None:
        if not isinstance(key, str):
            problem(".key", "must be a string")
            return None
        if not _KEY_RE.fullmatch(key):
            problem(".key", "must be printable ASCII without spaces (it travels in a header)")
            return None
        return key_digest(key)
    if not isinstance(key_sha256, str):
        problem(".key_sha256", "must be a string")
        return None
    if not _HEX64_RE.fullmatch(key_sha256):
        problem(".key_sha256", "must be 64 hex digits (the SHA-256 of the key)")
        return None
    return bytes.fromhex(key_sha256)


def client_credential(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key a client presented: ``x-api-key``, else ``Authorization: Bearer``; empty = None.

    ``headers`` are (name, value) pairs with lower-case names, e.g. ``h11.Request.headers``.
    The first occurrence of each header counts. Other ``Authorization`` schemes (Basic, ...)
    are not credentials here.
    """
    api_key: bytes | None = None
    bearer: bytes | None = None
    for name, value in headers:
        if name == b"x-api-key" and api_key is None:
            api_key = value.strip(b" \t")
        elif name == b"authorization" and bearer is None:
            parts = value.split(None, 1)
            bearer = parts[1].strip() if len(parts) == 2 and parts[0].lower() == b"bearer" else b""
    return api_key or bearer or None
