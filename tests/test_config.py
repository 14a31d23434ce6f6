"""zaiproxy.core.config: layering, validation messages, secrets, rendering.

Every test passes ``env=`` explicitly so the real environment never leaks in.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import fields
from pathlib import Path

import certifi
import pytest

from zaiproxy.core.config import (
    CHECK_COMMENT_COLUMN,
    DEMO_HISTORY_FILE,
    KNOWN_ENV,
    OTHER_ENV,
    Config,
    ConfigError,
    load_config,
    render_check,
    state_dir,
)
from zaiproxy.core.limitspec import Limits

SECRET = "sk-live-0123456789abcdef"
DEMO = {"ZAIPROXY_DEMO": "1"}


def demo_config() -> Config:
    """``Config(demo=True)`` as loaded: demo traffic has a history file of its own."""
    return Config(demo=True, history_path=os.path.join(state_dir(), DEMO_HISTORY_FILE))
MISSING_KEY = (
    "upstream.api_key: missing: set ZAI_API_KEY, or run with --demo to use the built-in mock upstream"
)


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "zaiproxy.toml"
    path.write_text(text)
    return str(path)


def problems_of(**kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)  # type: ignore[arg-type]
    return info.value.problems


# --- defaults and precedence ---------------------------------------------------------------


def test_defaults() -> None:
    config, sources = load_config(env=DEMO)
    assert config == demo_config()
    assert config.port == 8080
    assert config.max_body_bytes == 32 * 1024 * 1024
    assert config.max_header_bytes == 64 * 1024
    assert 1 <= config.workers <= 256
    assert config.api_key is None
    assert sources["server.demo"] == "env:ZAIPROXY_DEMO"
    assert {k for k, v in sources.items() if v != "default"} == {"server.demo"}
    assert len(sources) == len(fields(Config))


# (section, field, TOML literal, env name, env value, cli value, file/env/cli expected values)
PRECEDENCE = [
    ("server", "host", '"10.0.0.1"', "ZAIPROXY_HOST", "10.0.0.2", "10.0.0.3",
     ("10.0.0.1", "10.0.0.2", "10.0.0.3")),
    ("server", "port", "9001", "PORT", "9002", 0, (9001, 9002, 0)),
    ("server", "workers", "3", "ZAIPROXY_WORKERS", "4", 5, (3, 4, 5)),
    ("server", "drain_timeout", "5", "ZAIPROXY_DRAIN_TIMEOUT", "6.5", 7.25, (5.0, 6.5, 7.25)),
    ("server", "max_body_bytes", '"1MiB"', "ZAIPROXY_MAX_BODY_BYTES", "2M", 3000,
     (1 << 20, 2 << 20, 3000)),
    ("server", "deployment_variant", '"canary"', "DEPLOYMENT_VARIANT", "canary-2", "blue",
     ("canary", "canary-2", "blue")),
    ("log", "level", '"warning"', "LOG_LEVEL", "ERROR", "debug", ("warning", "error", "debug")),
    ("log", "access_log", "false", "ZAIPROXY_ACCESS_LOG", "on", False, (False, True, False)),
    ("upstream", "max_retries", "0", "MAX_RETRIES", "5", 10, (0, 5, 10)),
    ("history", "history", "false", "ZAIPROXY_HISTORY", "yes", False, (False, True, False)),
    ("history", "history_path", '"/tmp/a.duckdb"', "ZAIPROXY_HISTORY_PATH", "/tmp/b.duckdb",
     "/tmp/c.duckdb", ("/tmp/a.duckdb", "/tmp/b.duckdb", "/tmp/c.duckdb")),
    ("history", "history_raw_days", "3", "ZAIPROXY_HISTORY_RAW_DAYS", "0.5", 2.5, (3.0, 0.5, 2.5)),
    ("history", "history_rollup_days", "30", "ZAIPROXY_HISTORY_ROLLUP_DAYS", "365", 90,
     (30.0, 365.0, 90.0)),
    ("upstream", "openai_base_url", '"http://a.test/v1/"', "ZAIPROXY_OPENAI_BASE_URL",
     "http://b.test:8443/v4", "https://c.test",
     ("http://a.test/v1", "http://b.test:8443/v4", "https://c.test")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("section", "name", "toml", "env_name", "env_value", "cli_value", "expected"),
    PRECEDENCE,
    ids=[row[1] for row in PRECEDENCE],
)
def test_each_layer_overrides_the_one_below(
    tmp_path: Path,
    section: str,
    name: str,
    toml: str,
    env_name: str,
    env_value: str,
    cli_value: object,
    expected: tuple[object, object, object],
) -> None:
    key = f"{section}.{name}"
    path = write_toml(tmp_path, f"[{section}]\n{name} = {toml}\n")
    default = getattr(demo_config(), name)

    config, sources = load_config(env=DEMO)
    assert (getattr(config, name), sources[key]) == (default, "default")

    config, sources = load_config(env=DEMO, path=path)
    assert (getattr(config, name), sources[key]) == (expected[0], "file")

    env = {**DEMO, env_name: env_value}
    config, sources = load_config(env=env, path=path)
    assert (getattr(config, name), sources[key]) == (expected[1], f"env:{env_name}")

    config, sources = load_config(cli={name: cli_value}, env=env, path=path)
    assert (getattr(config, name), sources[key]) == (expected[2], "cli")


def test_demo_bool_layers(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\ndemo = true\n")
    assert load_config(env={}, path=path)[0].demo is True
    config, sources = load_config(env={"ZAIPROXY_DEMO": "no", "ZAI_API_KEY": SECRET}, path=path)
    assert (config.demo, sources["server.demo"]) == (False, "env:ZAIPROXY_DEMO")
    config, sources = load_config(cli={"demo": True}, env={"ZAIPROXY_DEMO": "0"}, path=path)
    assert (config.demo, sources["server.demo"]) == (True, "cli")


def test_cli_none_values_are_ignored() -> None:
    config, sources = load_config(
        cli={"port": None, "workers": None, "demo": None}, env={**DEMO, "PORT": "9000"}
    )
    assert (config.port, sources["server.port"]) == (9000, "env:PORT")
    assert sources["server.workers"] == "default"


def test_cli_strings_are_parsed_like_env() -> None:
    config, _ = load_config(cli={"port": "9100", "demo": "yes"}, env={})
    assert (config.port, config.demo) == (9100, True)


@pytest.mark.parametrize(
    ("env", "name", "expected", "source"),
    [
        ({"ZAIPROXY_PORT": "1", "PORT": "2"}, "port", 1, "env:ZAIPROXY_PORT"),
        ({"PORT": "2"}, "port", 2, "env:PORT"),
        ({"ZAIPROXY_HOST": "::1", "HOST": "0.0.0.0"}, "host", "::1", "env:ZAIPROXY_HOST"),
        ({"HOST": "0.0.0.0"}, "host", "0.0.0.0", "env:HOST"),
        ({"HOST": "[::1]"}, "host", "::1", "env:HOST"),
        # LOG_LEVEL is listed first in the original, but ZAIPROXY_LOG_LEVEL wins when both exist.
        ({"LOG_LEVEL": "error", "ZAIPROXY_LOG_LEVEL": "debug"}, "level", "debug",
         "env:ZAIPROXY_LOG_LEVEL"),
        ({"LOG_LEVEL": "Warning"}, "level", "warning", "env:LOG_LEVEL"),
        ({"ZAIPROXY_LEDGER": "Python"}, "ledger", "python", "env:ZAIPROXY_LEDGER"),
    ],
)  # fmt: skip
def test_env_aliases_in_order_of_preference(
    env: dict[str, str], name: str, expected: object, source: str
) -> None:
    config, sources = load_config(env={**DEMO, **env})
    assert getattr(config, name) == expected
    section = "log" if name == "level" else "server"
    assert sources[f"{section}.{name}"] == source


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nport = 9999\n")
    config, sources = load_config(env={**DEMO, "ZAIPROXY_CONFIG": path})
    assert (config.port, sources["server.port"]) == (9999, "file")
    # An explicit path wins over ZAIPROXY_CONFIG.
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 7777\n")
    config, _ = load_config(env={**DEMO, "ZAIPROXY_CONFIG": path}, path=str(other))
    assert config.port == 7777


def test_full_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        f"""
[server]
host = "0.0.0.0"
port = 0
max_header_bytes = 16384
keepalive_timeout = 5
ledger = "python"

[upstream]
api_key = "{SECRET}"
ca_file = "{certifi.where()}"
connect_timeout = 2.5
pool_max_connections = 100000

[log]
level = "DEBUG"
""",
    )
    config, sources = load_config(env={}, path=path)
    assert config.api_key == SECRET
    assert config.ca_file == certifi.where()
    assert config.keepalive_timeout == 5.0 and isinstance(config.keepalive_timeout, float)
    assert (config.port, config.max_header_bytes, config.level) == (0, 16384, "debug")
    assert sources["upstream.api_key"] == "file"


# --- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("1024", 1024),
        ("1K", 1024),
        ("1k", 1024),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("2M", 2 << 20),
        ("2MB", 2_000_000),
        ("2MiB", 2 << 20),
        ("1G", 1 << 30),
        ("1GB", 10**9),
        ("1GiB", 1 << 30),
        ("16 KiB", 16 << 10),
        (" 3mib ", 3 << 20),
    ],
)
def test_size_suffixes(tmp_path: Path, text: str, expected: int) -> None:
    config, _ = load_config(env={**DEMO, "ZAIPROXY_MAX_BODY_BYTES": text})
    assert config.max_body_bytes == expected
    path = write_toml(tmp_path, f'[server]\nmax_body_bytes = "{text}"\n')
    assert load_config(env=DEMO, path=path)[0].max_body_bytes == expected


# --- validation: one row per rule, the exact message ----------------------------------------

SIZE_REASON = (
    "not a size (an integer with an optional K, KB, KiB, M, MB, MiB, G, GB or GiB suffix)"
)
ENV_CASES = [
    ("PORT", "80a", "server.port (env:PORT): '80a': not an integer"),
    ("ZAIPROXY_PORT", "70000",
     "server.port (env:ZAIPROXY_PORT): '70000': must be between 0 and 65535"),
    ("ZAIPROXY_PORT", "-1", "server.port (env:ZAIPROXY_PORT): '-1': must be between 0 and 65535"),
    ("ZAIPROXY_PORT", "", "server.port (env:ZAIPROXY_PORT): '': empty (unset the variable to use "
     "the default)"),
    ("ZAIPROXY_HOST", "a b", "server.host (env:ZAIPROXY_HOST): 'a b': must be a host name or IP "
     "address (non-empty, no whitespace)"),
    ("ZAIPROXY_WORKERS", "0", "server.workers (env:ZAIPROXY_WORKERS): '0': must be between 1 and 256"),
    ("ZAIPROXY_WORKERS", "257",
     "server.workers (env:ZAIPROXY_WORKERS): '257': must be between 1 and 256"),
    ("ZAIPROXY_WORKERS", "2.5", "server.workers (env:ZAIPROXY_WORKERS): '2.5': not an integer"),
    ("ZAIPROXY_DRAIN_TIMEOUT", "0",
     "server.drain_timeout (env:ZAIPROXY_DRAIN_TIMEOUT): '0': must be greater than 0"),
    ("ZAIPROXY_DRAIN_TIMEOUT", "30s", "server.drain_timeout (env:ZAIPROXY_DRAIN_TIMEOUT): '30s': "
     "not a number of seconds (write e.g. 30 or 2.5, without a unit)"),
    ("ZAIPROXY_KEEPALIVE_TIMEOUT", "inf",
     "server.keepalive_timeout (env:ZAIPROXY_KEEPALIVE_TIMEOUT): 'inf': must be a finite number"),
    ("ZAIPROXY_HEADER_TIMEOUT", "nan",
     "server.header_timeout (env:ZAIPROXY_HEADER_TIMEOUT): 'nan': must be a finite number"),
    ("ZAIPROXY_MAX_BODY_BYTES", "0",
     "server.max_body_bytes (env:ZAIPROXY_MAX_BODY_BYTES): '0': must be at least 1 bytes"),
    ("ZAIPROXY_MAX_BODY_BYTES", "1.5M",
     f"server.max_body_bytes (env:ZAIPROXY_MAX_BODY_BYTES): '1.5M': {SIZE_REASON}"),
    ("ZAIPROXY_MAX_BODY_BYTES", "12XB",
     f"server.max_body_bytes (env:ZAIPROXY_MAX_BODY_BYTES): '12XB': {SIZE_REASON}"),
    ("ZAIPROXY_MAX_HEADER_BYTES", "1023", "server.max_header_bytes (env:ZAIPROXY_MAX_HEADER_BYTES): "
     "'1023': must be between 1 KiB and 1 MiB"),
    ("ZAIPROXY_MAX_HEADER_BYTES", "2MiB", "server.max_header_bytes (env:ZAIPROXY_MAX_HEADER_BYTES): "
     "'2MiB': must be between 1 KiB and 1 MiB"),
    ("DEPLOYMENT_VARIANT", "Canary", "server.deployment_variant (env:DEPLOYMENT_VARIANT): 'Canary': "
     "must match ^[a-z0-9][a-z0-9_-]{0,31}$ (it is a metric label value: lower case, digits, '_' "
     "or '-', at most 32 characters)"),
    ("ZAIPROXY_LEDGER", "cython",
     "server.ledger (env:ZAIPROXY_LEDGER): 'cython': must be one of: native, python"),
    ("ZAIPROXY_OPENAI_BASE_URL", "ftp://x.test",
     "upstream.openai_base_url (env:ZAIPROXY_OPENAI_BASE_URL): 'ftp://x.test': scheme must be "
     "http or https"),
    ("ZAIPROXY_ANTHROPIC_BASE_URL", "https:///path",
     "upstream.anthropic_base_url (env:ZAIPROXY_ANTHROPIC_BASE_URL): 'https:///path': has no host"),
    ("ZAIPROXY_NATIVE_BASE_URL", "https://x.test/?a=1",
     "upstream.native_base_url (env:ZAIPROXY_NATIVE_BASE_URL): 'https://x.test/?a=1': must not "
     "contain a query string ('?...')"),
    ("ZAIPROXY_NATIVE_BASE_URL", "https://x.test/p#top",
     "upstream.native_base_url (env:ZAIPROXY_NATIVE_BASE_URL): 'https://x.test/p#top': must not "
     "contain a fragment ('#...')"),
    ("ZAIPROXY_NATIVE_BASE_URL", "https://x.test:99999",
     "upstream.native_base_url (env:ZAIPROXY_NATIVE_BASE_URL): 'https://x.test:99999': not a valid "
     "URL (Port out of range 0-65535)"),
    # User info may be a credential: the value is not echoed.
    ("ZAIPROXY_OPENAI_BASE_URL", "https://me:hunter2@x.test",
     "upstream.openai_base_url (env:ZAIPROXY_OPENAI_BASE_URL): <redacted>: must not contain user "
     "info (user:password@)"),
    ("ZAIPROXY_CONNECT_TIMEOUT", "0",
     "upstream.connect_timeout (env:ZAIPROXY_CONNECT_TIMEOUT): '0': must be greater than 0"),
    ("ZAIPROXY_RESPONSE_HEADER_TIMEOUT", "-5", "upstream.response_header_timeout "
     "(env:ZAIPROXY_RESPONSE_HEADER_TIMEOUT): '-5': must be greater than 0"),
    ("ZAIPROXY_BODY_IDLE_TIMEOUT", "x", "upstream.body_idle_timeout (env:ZAIPROXY_BODY_IDLE_TIMEOUT):"
     " 'x': not a number of seconds (write e.g. 30 or 2.5, without a unit)"),
    ("ZAIPROXY_POOL_MAX_CONNECTIONS", "100001", "upstream.pool_max_connections "
     "(env:ZAIPROXY_POOL_MAX_CONNECTIONS): '100001': must be between 1 and 100000"),
    ("ZAIPROXY_POOL_IDLE_TIMEOUT", "0",
     "upstream.pool_idle_timeout (env:ZAIPROXY_POOL_IDLE_TIMEOUT): '0': must be greater than 0"),
    ("MAX_RETRIES", "11", "upstream.max_retries (env:MAX_RETRIES): '11': must be between 0 and 10"),
    ("LOG_LEVEL", "verbose",
     "log.level (env:LOG_LEVEL): 'verbose': must be one of: debug, info, warning, error"),
    ("ZAIPROXY_ACCESS_LOG", "2", "log.access_log (env:ZAIPROXY_ACCESS_LOG): '2': not a boolean "
     "(use 1/0, true/false, yes/no or on/off)"),
    ("ZAIPROXY_UPSTREAM_CA_FILE", "/nonexistent/ca.pem", "upstream.ca_file "
     "(env:ZAIPROXY_UPSTREAM_CA_FILE): '/nonexistent/ca.pem': not an existing file"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value", "expected"), ENV_CASES)
def test_env_validation_names_key_value_and_reason(name: str, value: str, expected: str) -> None:
    assert problems_of(env={**DEMO, name: value}) == [expected]


def test_demo_flag_validation() -> None:
    assert problems_of(env={"ZAIPROXY_DEMO": "maybe", "ZAI_API_KEY": SECRET}) == [
        "server.demo (env:ZAIPROXY_DEMO): 'maybe': not a boolean "
        "(use 1/0, true/false, yes/no or on/off)"
    ]


def test_ca_file_must_be_pem(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    [problem] = problems_of(env={**DEMO, "ZAIPROXY_UPSTREAM_CA_FILE": str(bogus)})
    assert problem.startswith(
        f"upstream.ca_file (env:ZAIPROXY_UPSTREAM_CA_FILE): {str(bogus)!r}: not a PEM CA bundle ("
    )
    [problem] = problems_of(env={**DEMO, "ZAIPROXY_UPSTREAM_CA_FILE": str(tmp_path)})
    assert problem.endswith(": not an existing file")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('port = "8080"', "server.port (file {}): '8080': not an integer (got string)"),
        ("port = true", "server.port (file {}): True: not an integer (got boolean)"),
        ("port = 80.0", "server.port (file {}): 80.0: not an integer (got float)"),
        ('demo = "true"', "server.demo (file {}): 'true': not a boolean (got string; write true "
         "or false without quotes)"),
        ("drain_timeout = true", "server.drain_timeout (file {}): True: not a number (got boolean)"),
        ("host = 1", "server.host (file {}): 1: not a string (got integer)"),
        ("max_body_bytes = 1.5", "server.max_body_bytes (file {}): 1.5: not a size (got float)"),
        ('deployment_variant = ""', "server.deployment_variant (file {}): '': must match "
         "^[a-z0-9][a-z0-9_-]{{0,31}}$ (it is a metric label value: lower case, digits, '_' or "
         "'-', at most 32 characters)"),
    ],
)  # fmt: skip
def test_toml_values_need_the_right_type(tmp_path: Path, line: str, expected: str) -> None:
    path = write_toml(tmp_path, f"[server]\n{line}\n")
    assert problems_of(env=DEMO, path=path) == [expected.format(path)]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nport = 99999\nbogus = 1\n")
    problems = problems_of(
        cli={"workers": 0},
        env={"PORT": "1", "MAX_RETRIES": "x", "ZAIPROXY_TYPO": "1"},
        path=path,
    )
    assert problems == [
        f"server.port (file {path}): 99999: must be between 0 and 65535",
        f"server.bogus (file {path}): 1: unknown key in [server] (known: host, port, workers, "
        "demo, drain_timeout, keepalive_timeout, header_timeout, max_body_bytes, max_header_bytes, "
        "deployment_variant, ledger, http_impl)",
        "upstream.max_retries (env:MAX_RETRIES): 'x': not an integer",
        "ZAIPROXY_TYPO (env): '1': unknown variable",
        "server.workers (cli): 0: must be between 1 and 256",
        MISSING_KEY,
    ]
    # str() lists each problem on its own line.
    with pytest.raises(ConfigError) as info:
        load_config(cli={"workers": 0}, env={"PORT": "1", "MAX_RETRIES": "x"}, path=path)
    assert str(info.value).splitlines() == info.value.problems


def test_a_bad_value_hidden_by_a_higher_layer_is_still_reported(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nport = 99999\n")
    assert problems_of(cli={"port": 8000}, env=DEMO, path=path) == [
        f"server.port (file {path}): 99999: must be between 0 and 65535"
    ]


def test_unknown_cli_setting() -> None:
    assert problems_of(cli={"prot": 1}, env=DEMO) == ["prot (cli): 1: unknown setting"]


# --- required key and demo -----------------------------------------------------------------


def test_missing_api_key_without_demo() -> None:
    assert problems_of(env={}) == [MISSING_KEY]
    assert problems_of(env={"ZAIPROXY_DEMO": "false"}) == [MISSING_KEY]


def test_demo_needs_no_key() -> None:
    assert load_config(cli={"demo": True}, env={})[0].api_key is None


def test_api_key_from_env() -> None:
    config, sources = load_config(env={"ZAI_API_KEY": SECRET})
    assert (config.api_key, config.demo) == (SECRET, False)
    assert sources["upstream.api_key"] == "env:ZAI_API_KEY"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (SECRET + "\n", "contains whitespace or control characters"),
        ("sk live", "contains whitespace or control characters"),
        ("", "empty (unset the variable to use the default)"),
    ],
)
def test_bad_api_key_is_reported_without_its_value(value: str, reason: str) -> None:
    # One problem, not also "missing": the key was given, it is just unusable.
    assert problems_of(env={"ZAI_API_KEY": value}) == [
        f"upstream.api_key (env:ZAI_API_KEY): <redacted>: {reason}"
    ]


# --- unknown names -------------------------------------------------------------------------


def test_unknown_section_and_keys(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
port = 1
[serverr]
host = "x"
[server]
prot = 1
level = "debug"
[upstream]
apikey = "sk-top-secret"
""",
    )
    assert problems_of(env=DEMO, path=path) == [
        f"port (file {path}): 1: settings go in a section: put it under [server]",
        f"serverr (file {path}): <table>: unknown section (known: server, upstream, limits, quota, auth, tokens, log, history)",
        f"server.prot (file {path}): 1: unknown key in [server]; did you mean port?",
        f"server.level (file {path}): 'debug': unknown key in [server]; it belongs in [log]",
        f"upstream.apikey (file {path}): <redacted>: unknown key in [upstream]; did you mean "
        "api_key?",
    ]


def test_section_must_be_a_table(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'log = "debug"\n')
    assert problems_of(env=DEMO, path=path) == [
        f"log (file {path}): 'debug': must be a table ([section])"
    ]


def test_unknown_zaiproxy_env_var() -> None:
    assert problems_of(env={**DEMO, "ZAIPROXY_PROT": "9000"}) == [
        "ZAIPROXY_PROT (env): '9000': unknown variable; did you mean ZAIPROXY_PORT?"
    ]
    # A likely mistake for ZAI_API_KEY: its value is a key, so it is not echoed.
    [problem] = problems_of(env={**DEMO, "ZAIPROXY_API_KEY": SECRET})
    assert problem == "ZAIPROXY_API_KEY (env): <redacted>: unknown variable; did you mean ZAI_API_KEY?"
    # Other prefixes belong to other programs; ZAIPROXY_CONFIG is the file path.
    config, _ = load_config(env={**DEMO, "OTHERAPP_PORT": "x", "NOTZAIPROXY_X": "1"})
    assert config.port == 8080


def test_variables_of_other_commands_are_not_unknown() -> None:
    # Read by zaiproxy collect, the TUI, the image, the project's scripts: one environment
    # serves every command, so none of them refuses another's variable.
    others = {name: "x" for name in OTHER_ENV}
    assert {"ZAIPROXY_TARGET_ADMIN_TOKEN", "ZAIPROXY_URL", "ZAIPROXY_COMMIT"} <= others.keys()
    config, sources = load_config(env={**DEMO, **others})
    assert config == demo_config()
    assert {k for k, v in sources.items() if v != "default"} == {"server.demo"}
    # A typo of one is still a typo, with the hint (and a token is never echoed).
    assert problems_of(env={**DEMO, "ZAIPROXY_TARGET_ADMIN_TOKENS": SECRET}) == [
        "ZAIPROXY_TARGET_ADMIN_TOKENS (env): <redacted>: unknown variable; did you mean "
        "ZAIPROXY_TARGET_ADMIN_TOKEN?"]


# Where the project documents or reads a ZAIPROXY_ variable: the code of every command (a
# string literal naming one), the shell scripts (``${NAME:-default}``), the docs (`NAME`).
_DOCUMENTED = (
    ("zaiproxy", "**/*.py", re.compile(r'"(ZAIPROXY_[A-Z0-9_]*[A-Z0-9])"')),
    ("tui", "**/*.py", re.compile(r'"(ZAIPROXY_[A-Z0-9_]*[A-Z0-9])"')),
    ("k8s/scripts", "*.sh", re.compile(r"\$\{(ZAIPROXY_[A-Z0-9_]*[A-Z0-9])")),
    (".", "README.md", re.compile(r"`(ZAIPROXY_[A-Z0-9_]*[A-Z0-9])`")),
    ("docs", "**/*.md", re.compile(r"`(ZAIPROXY_[A-Z0-9_]*[A-Z0-9])`")),
    ("zaiproxy", "**/README.md", re.compile(r"`(ZAIPROXY_[A-Z0-9_]*[A-Z0-9])`")),
)


def documented_variables() -> set[str]:
    repo = Path(__file__).resolve().parent.parent
    found: set[str] = set()
    for folder, pattern, regex in _DOCUMENTED:
        for path in (repo / folder).glob(pattern):
            found |= set(regex.findall(path.read_text(errors="replace")))
    return found


def test_every_documented_variable_is_known() -> None:
    found = documented_variables()
    assert {"ZAIPROXY_TARGET_ADMIN_TOKEN", "ZAIPROXY_URL", "ZAIPROXY_ADMIN_TOKEN",
            "ZAIPROXY_HTTP_IMPL", "ZAIPROXY_LEDGER", "ZAIPROXY_CONFIG"} <= found
    assert found - KNOWN_ENV == set()


def test_zaiproxy_config_is_not_an_unknown_variable(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "")
    config, _ = load_config(env={**DEMO, "ZAIPROXY_CONFIG": path})
    assert config == demo_config()


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nport = 80\nhost = \n")
    [problem] = problems_of(env=DEMO, path=path)
    assert problem.startswith(f"{path} (config file): invalid TOML: ")
    assert "line 3" in problem


def test_missing_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    assert problems_of(env=DEMO, path=path) == [
        f"{path} (config file): cannot read: No such file or directory"
    ]
    assert problems_of(env={**DEMO, "ZAIPROXY_CONFIG": ""}) == [
        "ZAIPROXY_CONFIG (env): '': empty path"
    ]


# --- secrets, rendering, pickling ------------------------------------------------------------


def test_secret_never_shown() -> None:
    config, sources = load_config(env={"ZAI_API_KEY": SECRET})
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert config.masked()["upstream"]["api_key"] == "********"
    assert SECRET not in repr(config.masked())
    assert SECRET not in render_check(config, sources)


def test_masked_shape() -> None:
    masked = Config(demo=True).masked()
    assert list(masked) == ["server", "upstream", "limits", "quota", "auth", "tokens", "log", "history"]
    assert masked["upstream"]["api_key"] is None
    assert masked["server"]["port"] == 8080
    assert masked["log"] == {"level": "info", "access_log": True}


def test_render_check() -> None:
    config, sources = load_config(
        cli={"port": 0}, env={"ZAI_API_KEY": SECRET, "LOG_LEVEL": "debug"}
    )
    text = render_check(config, sources)
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("[")] == ["[server]", "[upstream]", "[limits]", "[quota]", "[auth]", "[tokens]", "[log]", "[history]"]
    # One line per field, each with its source.
    assert len([line for line in lines if " = " in line]) == len(fields(Config))

    assert row_of(text, "upstream.connect_timeout") == ("connect_timeout = 10.0", "default")
    assert row_of(text, "upstream.api_key") == ('# api_key = "********"', "env:ZAI_API_KEY")
    assert row_of(text, "upstream.ca_file") == ("# ca_file = (unset)", "default")
    assert row_of(text, "server.port") == ("port = 0", "cli")
    assert row_of(text, "server.host") == ('host = "127.0.0.1"', "default")
    assert row_of(text, "log.level") == ('level = "debug"', "env:LOG_LEVEL")
    assert row_of(text, "log.access_log") == ("access_log = true", "default")

    demo, demo_sources = load_config(env=DEMO)
    assert row_of(render_check(demo, demo_sources), "upstream.api_key") == (
        "# api_key = (unset)", "default")


def test_render_check_is_a_valid_config_file(tmp_path: Path) -> None:
    config, sources = load_config(env={"ZAI_API_KEY": SECRET, "DEPLOYMENT_VARIANT": "canary"})
    path = tmp_path / "out.toml"
    path.write_text(render_check(config, sources))
    assert SECRET not in path.read_text()
    again, again_sources = load_config(env={"ZAI_API_KEY": SECRET}, path=str(path))
    assert again == config
    assert again_sources["server.deployment_variant"] == "file"


def test_render_check_aligns_comments_without_padding_to_the_longest_value(
        tmp_path: Path) -> None:
    long_url = "https://" + "a" * 60 + ".example/v4"
    config, sources = load_config(env={"ZAI_API_KEY": SECRET, "ZAIPROXY_ADMIN_TOKEN": "adm-tok",
                                       "ZAIPROXY_OPENAI_BASE_URL": long_url})
    text = render_check(config, sources)
    lines = text.splitlines()
    # The default known_models alone made every line ~200 columns wide.
    assert max(len(line) for line in lines if long_url not in line) <= 100
    firsts = [line for line in lines if "  # " in line]
    assert len(firsts) == len(fields(Config))  # one source comment per setting
    columns = {line.index("  # ") for line in firsts if len(line.split("  # ")[0].rstrip())
               <= CHECK_COMMENT_COLUMN}
    assert len(columns) == 1 and columns.pop() <= CHECK_COMMENT_COLUMN  # one column
    # A single value past the column keeps its comment two spaces after it.
    assert f'openai_base_url = "{long_url}"  # env:ZAIPROXY_OPENAI_BASE_URL' in lines
    # A list past the column is wrapped, the comment on its first line.
    assert row_of(text, "tokens.known_models") == ("known_models = [", "default")
    start = lines.index(next(line for line in lines if line.startswith("known_models = [")))
    end = lines.index("]", start)
    assert all(line.startswith("    ") and len(line) <= 88 for line in lines[start + 1:end])
    # Still a config file: the same values come back, secrets stay out.
    assert SECRET not in text and "adm-tok" not in text
    path = tmp_path / "out.toml"
    path.write_text(text)
    again, _ = load_config(env={"ZAI_API_KEY": SECRET, "ZAIPROXY_ADMIN_TOKEN": "adm-tok"},
                           path=str(path))
    assert again == config


def row_of(text: str, key: str) -> tuple[str, str]:
    """(assignment, source) of ``section.field`` in render_check's output."""
    section, name = key.split(".")
    current = None
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
            continue
        left, _, source = line.rpartition("  # ")
        left = left.strip()
        if current == section and left.lstrip("# ").startswith(name + " = "):
            return re.sub(r"\s+", " ", left), source.strip()
    raise AssertionError(f"{key} not found")


def test_config_pickles() -> None:
    config, _ = load_config(cli={"workers": 3}, env={"ZAI_API_KEY": SECRET, "PORT": "0"})
    clone = pickle.loads(pickle.dumps(config))
    assert clone == config
    assert clone.api_key == SECRET and clone.workers == 3


def test_config_error_pickles() -> None:
    error = ConfigError(["a (env): 'x': bad", "b (cli): 1: worse"])
    clone = pickle.loads(pickle.dumps(error))
    assert clone.problems == error.problems
    assert str(clone) == "a (env): 'x': bad\nb (cli): 1: worse"


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


# --- limits, auth and tokens ----------------------------------------------------------------


def test_limits_from_env_and_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[limits]\nrequests_per_minute = 100\nupstream_tokens_per_5h = 500000\n'
                    'queue_timeout = 0\n[tokens]\nknown_models = ["glm-4.6", "glm-x"]\n')
    config, _ = load_config(env={**DEMO, "ZAIPROXY_CONCURRENCY": "8",
                                 "TOKEN_COUNTING_ENABLED": "true"}, path=str(path))
    assert config.global_limits() == Limits(requests_per_minute=100, concurrency=8)
    assert config.upstream_limits() == Limits(tokens_per_5h=500000)
    assert config.queue_timeout == 0.0
    assert config.known_models == ("glm-4.6", "glm-x")
    config, _ = load_config(env={**DEMO, "ZAIPROXY_KNOWN_MODELS": "a, b,a"})
    assert config.known_models == ("a", "b")


def test_token_limits_need_token_counting() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={**DEMO, "ENABLE_TOKEN_COUNTING": "false",
                         "ZAIPROXY_UPSTREAM_TOKENS_PER_MINUTE": "1000"})
    assert "limits.upstream_tokens_per_minute: token limits need token counting" in str(info.value)
    config, _ = load_config(env={**DEMO, "ENABLE_TOKEN_COUNTING": "false"})
    assert config.token_counting is False


@pytest.mark.parametrize(("env", "reason"), [
    ({"ZAIPROXY_REQUESTS_PER_MINUTE": "0"}, "must be between 1 and"),
    ({"ZAIPROXY_QUEUE_TIMEOUT": "-1"}, "must be greater than 0"),
    ({"ZAIPROXY_ADAPTIVE_MIN_RPS": "50", "ZAIPROXY_ADAPTIVE_MAX_RPS": "10"},
     "must not be greater than limits.adaptive_max_rps"),
    ({"ZAIPROXY_ADAPTIVE_FORGET_AFTER": "10"},
     "limits.adaptive_forget_after: must be longer than the 10 s recovery step"),
    ({"ZAIPROXY_ADAPTIVE_FORGET_AFTER": "0"}, "must be greater than 0"),
    ({"ZAIPROXY_KNOWN_MODELS": "ok, bad model"}, "names must match"),
    ({"ZAIPROXY_KEYS_FILE": "/nonexistent/keys.toml"}, "not an existing file"),
])
def test_limit_settings_rejected(env: dict[str, str], reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={**DEMO, **env})
    assert reason in str(info.value)


def test_adaptive_forget_after() -> None:
    # The recovery horizon: a cap is gone this long after its last evidence (default 5 min).
    config, sources = load_config(env=DEMO)
    assert (config.adaptive_forget_after, config.state_max_age) == (300.0, 21600.0)
    config, sources = load_config(env={**DEMO, "ZAIPROXY_ADAPTIVE_FORGET_AFTER": "90"})
    assert config.adaptive_forget_after == 90.0
    assert sources["limits.adaptive_forget_after"] == "env:ZAIPROXY_ADAPTIVE_FORGET_AFTER"


def test_admin_token_is_secret() -> None:
    config, sources = load_config(env={**DEMO, "ZAIPROXY_ADMIN_TOKEN": "adm-s3cret"})
    assert config.admin_token == "adm-s3cret"
    assert "adm-s3cret" not in render_check(config, sources)
    assert "adm-s3cret" not in repr(config)


# --- history (the recorder) ------------------------------------------------------------------


def test_history_defaults() -> None:
    config, _ = load_config(env=DEMO)
    assert config.history is True
    # DEMO: demo traffic has a file of its own, in the user's state directory.
    home = os.path.expanduser("~")
    assert config.history_path == f"{home}/.local/state/zaiproxy/demo-history.duckdb"
    assert (config.history_raw_days, config.history_rollup_days) == (7.0, 90.0)


def test_history_values_are_checked() -> None:
    problems = problems_of(env={**DEMO, "ZAIPROXY_HISTORY_RAW_DAYS": "0",
                                "ZAIPROXY_HISTORY": "maybe"})
    assert any(p.startswith("history.history_raw_days (env:ZAIPROXY_HISTORY_RAW_DAYS): '0': "
                            "must be between") for p in problems)
    assert any(p.startswith("history.history (env:ZAIPROXY_HISTORY): 'maybe'") for p in problems)


def test_history_rollups_must_outlive_raw_rows() -> None:
    assert problems_of(env={**DEMO, "ZAIPROXY_HISTORY_RAW_DAYS": "30",
                            "ZAIPROXY_HISTORY_ROLLUP_DAYS": "7"}) == [
        "history.history_rollup_days: must not be less than history.history_raw_days "
        "(the rollups are made from the raw rows)"]


def test_history_command_needs_no_upstream_key() -> None:
    with pytest.raises(ConfigError):
        load_config(env={})
    config, _ = load_config(env={}, require_api_key=False)
    assert config.api_key is None


def test_price_file_is_checked_when_the_config_loads(tmp_path: Path) -> None:
    good = tmp_path / "prices.toml"
    good.write_text('[models."glm-4.6"]\ninput = 0.0006\noutput = 0.0022\n'
                    'cache_read = 0.00011\ncache_write = 0\n')
    config, sources = load_config(env={**DEMO, "ZAIPROXY_PRICE_FILE": str(good)})
    assert config.price_file == str(good)
    assert sources["tokens.price_file"] == "env:ZAIPROXY_PRICE_FILE"
    assert Config().price_file is None  # the built-in list prices
    bad = tmp_path / "bad.toml"
    bad.write_text('[models."glm-4.6"]\ninput = "cheap"\noutput = 1\n')
    problems = problems_of(env=DEMO, path=write_toml(tmp_path, f'[tokens]\nprice_file = "{bad}"\n'))
    assert len(problems) == 1
    assert problems[0].startswith(f"tokens.price_file (file {tmp_path / 'zaiproxy.toml'}): ")
    assert "models.glm-4.6.input: must be a number" in problems[0]
    assert "missing cache_read, cache_write" in problems[0]
    assert problems_of(env={**DEMO, "ZAIPROXY_PRICE_FILE": str(tmp_path / "none.toml")}) == [
        f"tokens.price_file (env:ZAIPROXY_PRICE_FILE): '{tmp_path / 'none.toml'}': "
        "not an existing file"]


def test_the_history_lives_in_a_state_directory_never_the_current_one() -> None:
    """$XDG_STATE_HOME/zaiproxy (default ~/.local/state/zaiproxy); demo traffic apart; an
    explicit path wins (the image sets /var/lib/zaiproxy/history.duckdb)."""
    real, _ = load_config(env={"ZAI_API_KEY": "k" * 20, "XDG_STATE_HOME": "/srv/state"})
    assert real.history_path == "/srv/state/zaiproxy/history.duckdb"
    demo, _ = load_config(env={"ZAIPROXY_DEMO": "true", "HOME": "/home/ann"})
    assert demo.history_path == "/home/ann/.local/state/zaiproxy/demo-history.duckdb"
    explicit, sources = load_config(env={**DEMO, "ZAIPROXY_HISTORY_PATH": "/data/h.duckdb"})
    assert explicit.history_path == "/data/h.duckdb"
    assert sources["history.history_path"] == "env:ZAIPROXY_HISTORY_PATH"
