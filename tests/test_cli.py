"""The zaiproxy command line, run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from tests.harness import REPO


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("ZAIPROXY_") and k not in ("ZAI_API_KEY", "PORT", "HOST",
                                                           "LOG_LEVEL", "DEPLOYMENT_VARIANT")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "zaiproxy", *args], env=base, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_version() -> None:
    out = run("version")
    assert out.returncode == 0
    assert out.stdout.startswith("zaiproxy 0.1.0 (ledger: native")


def test_config_check_masks_the_key_and_names_sources(tmp_path: Path) -> None:
    cfg = tmp_path / "zaiproxy.toml"
    cfg.write_text('[server]\nport = 9999\nworkers = 3\n[upstream]\nconnect_timeout = 2.5\n')
    out = run("config", "check", "--config", str(cfg), "--workers", "5",
              env={"ZAI_API_KEY": "sk-very-secret-value", "DEPLOYMENT_VARIANT": "canary"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "sk-very-secret-value" not in text and "sk-very-secret-value" not in out.stderr
    assert "********" in text
    from tests.test_config import row_of

    assert row_of(text, "server.port") == ("port = 9999", "file")
    assert row_of(text, "server.workers") == ("workers = 5", "cli")
    assert row_of(text, "server.deployment_variant") == ('deployment_variant = "canary"',
                                                         "env:DEPLOYMENT_VARIANT")
    assert row_of(text, "upstream.connect_timeout") == ("connect_timeout = 2.5", "file")


def test_config_check_rejects_bad_values_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\nprot = 1\n[upstream]\nconnect_timeout = -1\n')
    out = run("config", "check", "--config", str(cfg),
              env={"ZAI_API_KEY": "k", "ZAIPROXY_WORKERS": "many"})
    assert out.returncode == 2
    assert "server.prot" in out.stderr
    assert "upstream.connect_timeout" in out.stderr
    assert "ZAIPROXY_WORKERS" in out.stderr and "'many'" in out.stderr


def test_mock_upstream_rejects_bad_flags() -> None:
    out = run("mock-upstream", "--port", "0", "--chunks", "-1")
    assert out.returncode == 2
    assert out.stderr.startswith("zaiproxy mock-upstream: chunks must be")
    assert "Traceback" not in out.stderr


def test_unknown_http_implementation_is_a_config_error() -> None:
    out = run("config", "check", env={"ZAI_API_KEY": "k", "ZAIPROXY_HTTP_IMPL": "picohttp"})
    assert out.returncode == 2
    assert "server.http_impl (env:ZAIPROXY_HTTP_IMPL): 'picohttp'" in out.stderr


# ---- one environment for every command --------------------------------------------------


def every_variable(tmp_path: Path) -> dict[str, str]:
    """A valid value for every variable any command reads: each setting's every name (aliases
    too), ZAIPROXY_CONFIG, and the variables of other commands and scripts."""
    import certifi

    from zaiproxy.core.config import CONFIG_ENV, KNOWN_ENV, OTHER_ENV, Config

    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nalias = "alice"\nkey = "zp-test-key-0123456789abcdef"\n')
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."glm-4.6"]\ninput = 1\noutput = 2\ncache_read = 0.1\n'
                      'cache_write = 0\n')
    config = tmp_path / "zaiproxy.toml"
    config.write_text("[server]\ndrain_timeout = 5\n")
    pool = tmp_path / "upstream.toml"
    pool.write_text('[[upstream]]\nalias = "main"\nkey = "upstream-key-0123456789"\n')
    values: dict[str, object] = {
        "host": "127.0.0.1", "port": 0, "workers": 1, "demo": True, "drain_timeout": 5,
        "deployment_variant": "canary", "api_key": "upstream-key-0123456789",
        "ledger": os.environ.get("ZAIPROXY_LEDGER", "native"),
        "http_impl": os.environ.get("ZAIPROXY_HTTP_IMPL", "h11"),
        "ca_file": certifi.where(), "state_file": str(tmp_path / "adaptive.json"),
        "ledger_path": str(tmp_path / "ledger"), "keys_file": str(keys),
        "admin_token": "admin-token-0123456789", "known_models": "glm-4.6,glm-4.5",
        "price_file": str(prices), "history_path": str(tmp_path / "history.duckdb"),
        "concurrency": 1000, "upstream_concurrency": 1000,
        "redis_url": "redis://127.0.0.1:6379/0", "redis_password": "redis-password-0123",
        "redis_password_file": str(keys),
        "quota_base_url": "http://127.0.0.1:9", "upstream_keys_file": str(pool),
        "model_fallback": "glm-4.6=glm-4.5",
    }
    env: dict[str, str] = {}
    for f in fields(Config):
        value = values.get(f.name, getattr(Config(), f.name))
        if value is None:  # an unset limit: a generous one
            value = 1_000_000
        if isinstance(value, bool):
            value = "true" if value else "false"
        for name in f.metadata["env"]:
            env[name] = str(value)
    env[CONFIG_ENV] = str(config)
    env.update({name: f"value-for-{name.lower()}" for name in OTHER_ENV})
    env["ZAIPROXY_URL"] = "http://127.0.0.1:9"
    env["ZAIPROXY_RELAY"] = "native"  # a choice: any other value stops serve (scanner.py)
    assert env.keys() == KNOWN_ENV
    return env


def test_every_command_accepts_every_documented_variable(tmp_path: Path) -> None:
    """A variable that belongs to another command (ZAIPROXY_TARGET_ADMIN_TOKEN is collect's)
    made serve, history and config check refuse to start."""
    import tomllib

    from tests.harness import start_process
    from tests.test_config import documented_variables

    env = every_variable(tmp_path)
    assert documented_variables() <= env.keys()

    check = run("config", "check", env=env)
    assert check.returncode == 0, check.stderr
    shown = tomllib.loads(check.stdout)
    assert shown["server"]["deployment_variant"] == "canary"
    for secret in (env["ZAI_API_KEY"], env["ZAIPROXY_ADMIN_TOKEN"]):
        assert secret not in check.stdout + check.stderr

    serve = start_process(["serve"], env=env, stderr_path=tmp_path / "serve.log")
    assert serve.stop() == 0, serve.logs()[-3000:]
    assert "unknown variable" not in serve.logs()

    history = run("history", "--range", "1h", env=env)
    assert history.returncode == 0, history.stderr
    assert "TOTAL" in history.stdout

    collect = start_process(["collect", "--target", "http://127.0.0.1:9",
                             "--db", str(tmp_path / "fleet.duckdb")],
                            env=env, stderr_path=tmp_path / "collect.log")
    assert collect.stop() == 0, collect.logs()[-3000:]
