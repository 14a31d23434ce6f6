"""zaiproxy.limits.keys: the client keys file, lookup by digest, and the credential headers."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from zaiproxy.core.config import ConfigError
from zaiproxy.core.limitspec import Limits
from zaiproxy.limits.keys import (
    ClientKey,
    KeysFileError,
    KeyTable,
    client_credential,
    key_digest,
    load_keys,
)

ALICE = "zp-live-alice-0123456789abcdef"
BOB = "zp-live-bob-fedcba9876543210"
CAROL = "zp-live-carol-5555aaaa5555aaaa"
CAROL_SHA = hashlib.sha256(CAROL.encode()).hexdigest()

FULL = f"""
[[keys]]
alias = "alice-laptop"
key = "{ALICE}"
enabled = true
models = ["glm-4.6", "GLM-4.5-Air"]
[keys.limits]
requests_per_minute = 60
concurrency = 4

[[keys]]
alias = "bob.ci_runner"
key = "{BOB}"
enabled = false

[[keys]]
alias = "carol"
key_sha256 = "{CAROL_SHA.upper()}"
models = []
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return str(path)


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(KeysFileError) as info:
        load_keys(write(tmp_path, text))
    return info.value.problems


# --- a valid file ---------------------------------------------------------------------------


def test_valid_file_with_every_field(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    table = load_keys(path)
    assert len(table) == 3
    assert table.aliases == ("alice-laptop", "bob.ci_runner", "carol")
    alice, bob, carol = table
    assert alice == ClientKey(
        "alice-laptop",
        key_digest(ALICE),
        True,
        frozenset({"glm-4.6", "glm-4.5-air"}),
        Limits(requests_per_minute=60, concurrency=4),
    )
    assert bob == ClientKey("bob.ci_runner", key_digest(BOB), False, None, Limits())
    assert carol == ClientKey("carol", bytes.fromhex(CAROL_SHA), True, None, Limits())
    assert len(alice.digest) == 32

    source = table.source
    assert source is not None
    assert source.path == path
    assert source.mtime == os.stat(path).st_mtime
    assert source.sha256 == hashlib.sha256(FULL.encode()).hexdigest()
    assert str(source) == f"{path} (sha256 {source.sha256[:12]}, mtime {source.mtime:.0f})"


def test_repr_shows_neither_key_nor_digest(tmp_path: Path) -> None:
    entry = ClientKey("alice-laptop", key_digest(ALICE), models=frozenset({"glm-4.6"}),
                      limits=Limits(concurrency=4))
    assert repr(entry) == (
        "ClientKey(alias='alice-laptop', enabled=True, models=frozenset({'glm-4.6'}), "
        "limits=Limits(requests_per_minute=None, tokens_per_minute=None, concurrency=4, "
        "requests_per_5h=None, tokens_per_5h=None, requests_per_week=None, tokens_per_week=None))"
    )
    table = load_keys(write(tmp_path, FULL))
    text = repr(table) + repr(list(table))
    for secret in (ALICE, BOB, CAROL):
        for form in (secret, key_digest(secret).hex(), repr(key_digest(secret))):
            assert form not in text
    assert repr(table) == f"KeyTable(3 keys, source={table.source})"


def test_empty_keys_list_is_valid_and_admits_nobody(tmp_path: Path) -> None:
    table = load_keys(write(tmp_path, "keys = []\n"))
    assert len(table) == 0
    assert table.aliases == ()
    assert table.lookup(ALICE.encode()) is None


def test_allows_model() -> None:
    anything = ClientKey("a", key_digest("k"))
    assert anything.allows_model("glm-4.6")
    assert anything.allows_model(None)
    limited = ClientKey("b", key_digest("l"), models=frozenset({"glm-4.6"}))
    assert limited.allows_model("glm-4.6")
    assert limited.allows_model("GLM-4.6")
    assert not limited.allows_model("glm-4.5")
    assert limited.allows_model(None)


# --- lookup ---------------------------------------------------------------------------------


def test_lookup_hit_miss_disabled_and_sha256_form(tmp_path: Path) -> None:
    table = load_keys(write(tmp_path, FULL))
    alice = table.lookup(ALICE.encode())
    assert alice is not None and alice.alias == "alice-laptop" and alice.enabled
    # Disabled keys are returned; the caller answers "disabled" rather than "unknown".
    bob = table.lookup(BOB.encode())
    assert bob is not None and bob.alias == "bob.ci_runner" and not bob.enabled
    # The file held only the hash, the client presents the key.
    carol = table.lookup(CAROL.encode())
    assert carol is not None and carol.alias == "carol"
    assert table.lookup(CAROL_SHA.encode()) is None
    assert table.lookup(b"zp-live-nobody") is None
    assert table.lookup(b"") is None
    assert table.lookup(ALICE.encode() + b" ") is None


def test_lookup_confirms_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    table = KeyTable([ClientKey("a", key_digest(ALICE))])
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert table.lookup(ALICE.encode()) is not None
    assert calls == [(key_digest(ALICE), key_digest(ALICE))]

    # Whatever the dict says, compare_digest has the last word.
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    assert table.lookup(ALICE.encode()) is None


def test_table_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="digest"):
        KeyTable([ClientKey("a", key_digest("k")), ClientKey("b", key_digest("k"))])
    with pytest.raises(ValueError, match="alias"):
        KeyTable([ClientKey("a", key_digest("k")), ClientKey("a", key_digest("l"))])


# --- problems -------------------------------------------------------------------------------

ENTRY = '[[keys]]\nalias = "{alias}"\nkey = "{key}"\n'

PROBLEMS = [
    # (file text, the one expected problem)
    ("", "keys: missing; add [[keys]] tables (or keys = [] to admit no client)"),
    ('keys = "x"\n', "keys: must be an array of tables ([[keys]])"),
    ("keys = [1]\n", "keys[0]: must be a table ([[keys]])"),
    (f'other = 1\n{ENTRY.format(alias="a", key=ALICE)}',
     "other: unknown top-level key (the file holds only [[keys]] tables)"),
    (f'[[keys]]\nkey = "{ALICE}"\n', "keys[0].alias: missing"),
    (f'[[keys]]\nalias = 7\nkey = "{ALICE}"\n', "keys[0].alias: must be a string"),
    (ENTRY.format(alias="has space", key=ALICE),
     "keys[0].alias: must be 1-64 characters of A-Z a-z 0-9 _ . -"),
    (ENTRY.format(alias="a" * 65, key=ALICE),
     "keys[0].alias: must be 1-64 characters of A-Z a-z 0-9 _ . -"),
    (ENTRY.format(alias="", key=ALICE),
     "keys[0].alias: must be 1-64 characters of A-Z a-z 0-9 _ . -"),
    ('[[keys]]\nalias = "a"\n', "keys[0] (a): needs key or key_sha256"),
    (f'{ENTRY.format(alias="a", key=ALICE)}key_sha256 = "{CAROL_SHA}"\n',
     "keys[0] (a): has both key and key_sha256; keep one"),
    ('[[keys]]\nalias = "a"\nkey = 12345\n', "keys[0].key (a): must be a string"),
    (ENTRY.format(alias="a", key=""),
     "keys[0].key (a): must be printable ASCII without spaces (it travels in a header)"),
    (ENTRY.format(alias="a", key="zp live"),
     "keys[0].key (a): must be printable ASCII without spaces (it travels in a header)"),
    (ENTRY.format(alias="a", key="zp-clé"),
     "keys[0].key (a): must be printable ASCII without spaces (it travels in a header)"),
    ('[[keys]]\nalias = "a"\nkey_sha256 = 5\n', "keys[0].key_sha256 (a): must be a string"),
    (f'[[keys]]\nalias = "a"\nkey_sha256 = "{CAROL_SHA[:-1]}"\n',
     "keys[0].key_sha256 (a): must be 64 hex digits (the SHA-256 of the key)"),
    (f'[[keys]]\nalias = "a"\nkey_sha256 = "{CAROL_SHA[:-1]}g"\n',
     "keys[0].key_sha256 (a): must be 64 hex digits (the SHA-256 of the key)"),
    (f'{ENTRY.format(alias="a", key=ALICE)}enabled = "yes"\n',
     "keys[0].enabled (a): must be true or false"),
    (f'{ENTRY.format(alias="a", key=ALICE)}models = "glm-4.6"\n',
     "keys[0].models (a): must be a list of model names"),
    (f'{ENTRY.format(alias="a", key=ALICE)}models = ["glm-4.6", 4]\n',
     "keys[0].models (a): must be a list of model names"),
    (f'{ENTRY.format(alias="a", key=ALICE)}models = [""]\n',
     "keys[0].models (a): must be a list of model names"),
    (f'{ENTRY.format(alias="a", key=ALICE)}keyy = "x"\n',
     "keys[0].keyy (a): unknown field (did you mean key?)"),
    (f'{ENTRY.format(alias="a", key=ALICE)}colour = "x"\n',
     "keys[0].colour (a): unknown field (known: alias, key, key_sha256, enabled, models, limits)"),
    (f'{ENTRY.format(alias="a", key=ALICE)}limits = 5\n', "keys[0].limits (a): must be a table"),
    (f'{ENTRY.format(alias="a", key=ALICE)}[keys.limits]\nconcurrency = "4"\n',
     "keys[0].limits.concurrency (a): must be an integer"),
    (f'{ENTRY.format(alias="a", key=ALICE)}[keys.limits]\nrpm = 4\n',
     "keys[0].limits.rpm (a): unknown limit (expected one of requests_per_minute, "
     "tokens_per_minute, concurrency, requests_per_5h, tokens_per_5h, requests_per_week, "
     "tokens_per_week)"),
    (ENTRY.format(alias="a", key=ALICE) + ENTRY.format(alias="a", key=BOB),
     "keys[1] (a): duplicate alias (keys[0])"),
    (ENTRY.format(alias="a", key=ALICE) + ENTRY.format(alias="b", key=ALICE),
     "keys[1] (b): same key as keys[0] (a); each client needs its own key"),
    # The same key once in clear and once hashed is still the same key.
    (ENTRY.format(alias="c", key=CAROL) + f'[[keys]]\nalias = "d"\nkey_sha256 = "{CAROL_SHA}"\n',
     "keys[1] (d): same key as keys[0] (c); each client needs its own key"),
]


@pytest.mark.parametrize(("text", "expected"), PROBLEMS)
def test_each_problem(tmp_path: Path, text: str, expected: str) -> None:
    assert problems_of(tmp_path, text) == [expected]


def test_every_problem_at_once_and_no_key_in_any_message(tmp_path: Path) -> None:
    # Every single-entry case in one file (renumbered, with its own alias and key): each is
    # reported and none hides another.
    single = PROBLEMS[4:-3]
    text, expected = "other = 1\n", [PROBLEMS[3][1]]
    for i, (snippet, problem) in enumerate(single):
        text += snippet.replace('alias = "a"', f'alias = "a{i}"').replace(ALICE, f"{ALICE}-{i}")
        expected.append(problem.replace("keys[0]", f"keys[{i}]").replace("(a)", f"(a{i})"))
    problems = problems_of(tmp_path, text)
    assert problems == expected
    message = str(KeysFileError(problems))
    assert message == "\n".join(expected)
    for secret in (ALICE, BOB, CAROL, "zp live", "zp-clé", "12345"):
        assert secret not in message


def test_duplicates_of_broken_entries_are_reported_too(tmp_path: Path) -> None:
    text = (
        f'[[keys]]\nalias = "a"\nkey = "{ALICE}"\nenabled = 1\n'
        f'[[keys]]\nalias = "bad alias"\nkey = "{BOB}"\n'
        f'[[keys]]\nalias = "a"\nkey = "{BOB}"\n'
    )
    assert problems_of(tmp_path, text) == [
        "keys[0].enabled (a): must be true or false",
        "keys[1].alias: must be 1-64 characters of A-Z a-z 0-9 _ . -",
        "keys[2] (a): duplicate alias (keys[0])",
        "keys[2] (a): same key as keys[1]; each client needs its own key",
    ]


def test_all_problems_listed_together(tmp_path: Path) -> None:
    text = (
        f'[[keys]]\nalias = "ok"\nkey = "{ALICE}"\n'
        f'[[keys]]\nalias = "bad alias"\nkey = "{BOB}"\nenabled = 1\n'
        f'[[keys]]\nalias = "ok"\nkey = "{ALICE}"\n'
        f'[[keys]]\nalias = "x"\n[keys.limits]\nconcurrency = 0\n'
    )
    problems = problems_of(tmp_path, text)
    assert problems == [
        "keys[1].alias: must be 1-64 characters of A-Z a-z 0-9 _ . -",
        "keys[1].enabled: must be true or false",
        "keys[2] (ok): duplicate alias (keys[0])",
        "keys[2] (ok): same key as keys[0] (ok); each client needs its own key",
        "keys[3] (x): needs key or key_sha256",
        "keys[3].limits.concurrency (x): must be between 1 and 1000000000000",
    ]
    for secret in (ALICE, BOB):
        assert all(secret not in p for p in problems)


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(KeysFileError) as info:
        load_keys(path)
    assert info.value.problems == [f"{path}: cannot read keys file: No such file or directory"]
    assert isinstance(info.value, ConfigError)


def test_toml_syntax_error_names_line_and_hides_the_key(tmp_path: Path) -> None:
    path = str(tmp_path / "keys.toml")
    cases = [
        # A control character inside the key: tomllib quotes it ('\\x01'); we must not.
        (f'[[keys]]\nalias = "a"\nkey = "{ALICE}\x01"\n', "Illegal character (at line 3, column 38)"),
        (f'[[keys]]\nalias = "a"\nkey = "{ALICE}\n', "Illegal character (at line 3, column 38)"),
        (f'[[keys]]\nalias = "a"\nkey = {ALICE}\n', "Invalid value (at line 3, column 7)"),
        (f'[[keys]]\nalias = "a"\nkey = "{ALICE}"\nkey = "{ALICE}"\n',
         "Cannot overwrite a value (at line 4, column 39)"),
        ("[[keys]\n", "Expected ']]' at the end of an array declaration (at line 1, column 7)"),
    ]
    for text, reason in cases:
        assert problems_of(tmp_path, text) == [f"{path}: invalid TOML: {reason}"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_bytes(b'keys = []\n# \xff\n')
    with pytest.raises(KeysFileError) as info:
        load_keys(path)
    assert info.value.problems == [f"{path}: not UTF-8 (byte 12)"]


# --- client_credential ----------------------------------------------------------------------

CREDENTIALS = [
    ([(b"authorization", b"Bearer k1")], b"k1"),
    ([(b"authorization", b"bearer k1")], b"k1"),
    ([(b"authorization", b"BEARER   k1 ")], b"k1"),
    ([(b"x-api-key", b"k2")], b"k2"),
    ([(b"x-api-key", b" k2 ")], b"k2"),
    # Both: x-api-key wins.
    ([(b"authorization", b"Bearer k1"), (b"x-api-key", b"k2")], b"k2"),
    ([(b"x-api-key", b"k2"), (b"authorization", b"Bearer k1")], b"k2"),
    # An empty x-api-key is no credential: the bearer one counts.
    ([(b"x-api-key", b""), (b"authorization", b"Bearer k1")], b"k1"),
    ([(b"authorization", b"Basic dXNlcjpwYXNz")], None),
    ([(b"authorization", b"Bearer")], None),
    ([(b"authorization", b"Bearer   ")], None),
    ([(b"authorization", b"")], None),
    ([(b"x-api-key", b"")], None),
    ([(b"content-type", b"application/json")], None),
    ([], None),
    # The first of repeated headers counts.
    ([(b"x-api-key", b"k2"), (b"x-api-key", b"k3")], b"k2"),
]


@pytest.mark.parametrize(("headers", "expected"), CREDENTIALS)
def test_client_credential(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> None:
    assert client_credential(headers) == expected


def test_credential_round_trip(tmp_path: Path) -> None:
    table = load_keys(write(tmp_path, FULL))
    for headers in ([(b"x-api-key", ALICE.encode())],
                    [(b"authorization", b"Bearer " + ALICE.encode())]):
        presented = client_credential(headers)
        assert presented is not None
        entry = table.lookup(presented)
        assert entry is not None and entry.alias == "alice-laptop"
