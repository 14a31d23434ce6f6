"""The zaiproxy command line, run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
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
