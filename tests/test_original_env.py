"""The original service's environment (core/original_env.py, docs/migration.md): every variable
honoured or accepted with its difference said, bad values refused by name, zaiproxy's own
variables winning, and the migration table in step with the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.harness import start_process
from zaiproxy.core import original_env
from zaiproxy.core.config import ConfigError, load_config, original_notes, render_check
from zaiproxy.core.original_env import ORIGINAL, go_duration

# `make test` runs the suite twice (h11, then h11-mypyc); configuration is independent of the
# HTTP implementation: run once.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="independent of the HTTP implementation")

ROOT = Path(__file__).resolve().parent.parent

# Every variable of the original's configuration table, as a production manifest set them.
ALL = {
    "ZAI_API_KEY": "sk-upstream",
    "ZAI_TARGET_URL": "https://gateway.example/api/anthropic",
    "DEPLOYMENT_VARIANT": "test",
    "TOKEN_COUNTING_ENABLED": "true",
    "TOKENIZER_MODEL": "glm-4",
    "MAX_WORKERS": "12",
    "MAX_RETRIES": "2",
    "RATE_LIMIT_INITIAL": "5",
    "RATE_LIMIT_MIN": "0.5",
    "RATE_LIMIT_MAX": "7",
    "RATE_LIMIT_CEILING_ALPHA": "0.3",
    "RATE_LIMIT_HOLD_MARGIN": "0.02",
    "RATE_LIMIT_PROBE_INTERVAL": "10",
    "RATE_LIMIT_STATE_FILE": "/var/lib/zai-proxy/ceiling.json",
    "RATE_LIMIT_STATE_MAX_AGE": "1h30m",
    "QUOTA_POLL_ENABLED": "true",
    "QUOTA_POLL_INTERVAL": "1m",
    "QUOTA_POLL_TIMEOUT": "5s",
    "QUOTA_STALE_AFTER": "15m",
    "ZAI_QUOTA_BASE_URL": "https://api.z.ai",
    "QUOTA_MAX_RESPONSE_BYTES": "65536",
    "QUOTA_ENFORCEMENT_ENABLED": "true",
    "QUOTA_RESERVE_FRACTION": "0.1",
    "QUOTA_RATE_ALPHA": "0.3",
    "QUOTA_RATE_MAX_INCREASE": "0.25",
    "ZAI_PROXY_VERSION": "1.4.2",
    "ZAI_PROXY_COMMIT": "abc1234",
    "ZAI_PROXY_BUILD_TIME": "2026-01-02T03:04:05Z",
}


def test_the_table_covers_every_variable_of_the_original() -> None:
    assert set(ALL) == {v.name for v in ORIGINAL}


def test_every_original_variable_sets_what_it_means() -> None:
    config, sources = load_config(env=ALL)
    assert config.api_key == "sk-upstream" and sources["upstream.api_key"] == "env:ZAI_API_KEY"
    assert config.anthropic_base_url == "https://gateway.example/api/anthropic"
    assert sources["upstream.anthropic_base_url"] == "env:ZAI_TARGET_URL"
    assert config.deployment_variant == "test"
    assert config.token_counting is True
    assert (config.upstream_concurrency, sources["limits.upstream_concurrency"]) == (
        12, "env:MAX_WORKERS")
    assert config.max_retries == 2
    assert (config.adaptive_min_rps, config.adaptive_max_rps) == (0.5, 7.0)
    assert sources["limits.adaptive_max_rps"] == "env:RATE_LIMIT_MAX"
    assert config.state_file == "/var/lib/zai-proxy/ceiling.json"
    assert (config.state_max_age, sources["limits.state_max_age"]) == (
        5400.0, "env:RATE_LIMIT_STATE_MAX_AGE")
    assert (config.quota_poll, sources["quota.quota_poll"]) == (True, "env:QUOTA_POLL_ENABLED")
    assert (config.quota_interval, config.quota_timeout, config.quota_stale_after) == (
        60.0, 5.0, 900.0)
    assert config.quota_base_url == "https://api.z.ai"
    assert config.quota_max_response_bytes == 65536
    assert (config.quota_pacing, sources["quota.quota_pacing"]) == (
        True, "env:QUOTA_ENFORCEMENT_ENABLED")
    assert (config.quota_reserve, config.quota_cost_alpha, config.quota_max_increase) == (
        0.1, 0.3, 0.25)
    # Nothing else moved: the OpenAI base and the limits keep their defaults.
    defaults, _ = load_config(env={"ZAI_API_KEY": "x"})
    assert config.openai_base_url == defaults.openai_base_url
    assert config.requests_per_minute is None


def test_each_difference_is_said_once() -> None:
    notes = dict(original_notes(ALL))
    # The same meaning says nothing; every other variable set has its note.
    assert set(notes) == {v.name for v in ORIGINAL if v.note}
    assert "starts at RATE_LIMIT_MAX" in notes["RATE_LIMIT_INITIAL"]
    assert "one pod polls for the fleet" in notes["QUOTA_POLL_ENABLED"]
    assert "never built" in notes["QUOTA_ENFORCEMENT_ENABLED"]
    assert "QUOTA_POLL_INTERVAL" not in notes
    assert "ZAIPROXY_OPENAI_BASE_URL" in notes["ZAI_TARGET_URL"]
    assert "RATE_LIMIT_MIN" not in notes
    text = render_check(*load_config(env=ALL), original_notes(ALL))
    tail = text.split("# Variables of the original service", 1)[1]
    assert all(f"#   {name}: " in tail for name in notes)


def test_zaiproxys_own_variable_wins_and_says_so() -> None:
    env = {**ALL, "ZAIPROXY_ADAPTIVE_MAX_RPS": "20", "ZAIPROXY_TOKEN_COUNTING": "false",
           "TOKEN_COUNTING_ENABLED": "true"}
    config, sources = load_config(env=env)
    assert config.adaptive_max_rps == 20.0
    assert sources["limits.adaptive_max_rps"] == "env:ZAIPROXY_ADAPTIVE_MAX_RPS"
    assert config.token_counting is False
    notes = dict(original_notes(env))
    assert notes["RATE_LIMIT_MAX"] == "ignored: ZAIPROXY_ADAPTIVE_MAX_RPS is set too and wins"
    assert notes["TOKEN_COUNTING_ENABLED"] == "ignored: ZAIPROXY_TOKEN_COUNTING is set too and wins"


@pytest.mark.parametrize(("name", "bad", "why"), [
    ("RATE_LIMIT_MAX", "fast", "not a number"),
    ("RATE_LIMIT_MIN", "0", "must be"),
    ("RATE_LIMIT_CEILING_ALPHA", "0", "must be in (0, 1]"),
    ("RATE_LIMIT_CEILING_ALPHA", "1.5", "must be in (0, 1]"),
    ("RATE_LIMIT_HOLD_MARGIN", "1", "must be in (0, 1)"),
    ("RATE_LIMIT_PROBE_INTERVAL", "0", "must be"),
    ("RATE_LIMIT_STATE_MAX_AGE", "6 hours", "not a Go duration"),
    ("QUOTA_POLL_INTERVAL", "90", "not a Go duration"),
    ("QUOTA_POLL_ENABLED", "maybe", ""),
    ("QUOTA_RESERVE_FRACTION", "1.5", "must be between"),
    ("QUOTA_STALE_AFTER", "15", "not a Go duration"),
    ("ZAI_QUOTA_BASE_URL", "api.z.ai", ""),
    ("MAX_WORKERS", "-1", ""),
    ("ZAI_TARGET_URL", "not a url", ""),
    ("TOKENIZER_MODEL", "", "empty"),
])
def test_a_bad_value_is_an_error_naming_the_variable(name: str, bad: str, why: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(env={**ALL, name: bad})
    (line,) = str(refused.value).splitlines()  # that one problem, nothing else
    assert line.startswith(f"{name} (a variable of the original service): ")
    assert why in line


@pytest.mark.parametrize(("text", "seconds"), [
    ("6h", 21600.0), ("1h30m", 5400.0), ("90s", 90.0), ("1.5h", 5400.0), ("500ms", 0.5),
    ("2m3.5s", 123.5), ("1h0m0s", 3600.0), ("100us", 1e-4), ("3µs", 3e-6),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert go_duration(text, True) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "90", "1d", "h", "1h 30m", "-1h", "0s", "1hh"])
def test_not_go_durations(text: str) -> None:
    with pytest.raises(original_env.values.Invalid):
        go_duration(text, True)


@pytest.mark.parametrize("doc_path", ["docs/migration.md", "README.md"])
def test_the_migration_table_is_the_code(doc_path: str) -> None:
    doc = (ROOT / doc_path).read_text()
    rows = re.findall(r"^\| `([A-Z_]+)` \| (.*?) \| (.*) \|$", doc, re.M)
    assert [r[0] for r in rows] == [v.name for v in ORIGINAL]
    for (name, setting, diff), var in zip(rows, ORIGINAL, strict=True):
        if var.field is None:
            assert setting == "—", name
        else:
            assert f".{var.field}`" in setting, name
        assert (var.note or "same meaning") in diff, name


def test_config_check_lists_them_and_serve_would_log_them(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZAIPROXY_", "ZAI_"))}
    env |= {"ZAI_API_KEY": "sk-x", "RATE_LIMIT_MAX": "7", "QUOTA_POLL_ENABLED": "true",
            "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "zaiproxy", "config", "check"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "adaptive_max_rps = 7.0" in out and "# env:RATE_LIMIT_MAX" in out
    assert "#   QUOTA_POLL_ENABLED: as in the original" in out
    assert "quota_poll = true" in out and "# env:QUOTA_POLL_ENABLED" in out
    assert "sk-x" not in out
    bad = subprocess.run([sys.executable, "-m", "zaiproxy", "config", "check"],
                         env={**env, "RATE_LIMIT_MAX": "seven"}, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2
    assert "RATE_LIMIT_MAX (a variable of the original service): not a number" in bad.stderr


def test_serve_logs_each_difference_once(tmp_path: Path) -> None:
    env = {"ZAI_API_KEY": "sk-serve", "ZAIPROXY_PORT": "0", "ZAIPROXY_WORKERS": "2",
           "ZAIPROXY_STATE_FILE": str(tmp_path / "state.json"),
           "ZAIPROXY_LEDGER_PATH": f"/dev/shm/zaiproxy-test-original-{os.getpid()}",
           "RATE_LIMIT_INITIAL": "3", "RATE_LIMIT_MAX": "7", "RATE_LIMIT_MIN": "0.5"}
    serve = start_process(["serve"], env=env, stderr_path=tmp_path / "serve.log")
    assert serve.stop() == 0, serve.logs()[-3000:]
    lines = [orjson.loads(line) for line in serve.logs().splitlines()
             if '"original_variable"' in line]
    assert sorted(line["variable"] for line in lines) == ["RATE_LIMIT_INITIAL", "RATE_LIMIT_MAX"]
    assert {line["proc"] for line in lines} == {"supervisor"}
    assert "sk-serve" not in serve.logs()
