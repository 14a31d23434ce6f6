"""What do limits and token counting cost? Two proxies, same mock, wrk against each.

    python -m bench.limits_overhead [--duration 10] [--repeat 3] [--proxy-workers 2]

Both proxies run the product's defaults (access log on). They differ only in:

- ``off``: ``TOKEN_COUNTING_ENABLED=false``, no keys file, no limits, no adaptive rate;
- ``on``:  token counting on (tiktoken estimate of every prompt, reservation, settle,
  ledger token counters), a keys file (the client's key is looked up per request), the
  adaptive rate, and every kind of limit set high enough never to refuse, at both
  scopes: requests/tokens per minute, concurrency, 5-hour and weekly request/token
  windows (global), and requests/tokens per minute + concurrency per key. That is
  12 ledger operations in one admission, the worst case a deployment can configure.

The runs are interleaved (off, on, off, on, ...) so drift on this shared machine hits
both alike; the report gives requests/s and the proxy's CPU per request for each, and
the ratio on/off. Run from the repository root; needs ``wrk``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.wrk_compare import (
    API_KEY,
    PROXY_PATH,
    SCENARIOS,
    BenchError,
    Child,
    TreeSampler,
    check_sample,
    child_env,
    log,
    run_wrk,
)

HIGH = "1000000000"
KEYS_FILE = f"""
[[keys]]
alias = "bench"
key = "{API_KEY}"
[keys.limits]
requests_per_minute = {HIGH}
tokens_per_minute = {HIGH}000
concurrency = 100000
"""


def proxy_env(mock_url: str, on: bool, keys_path: str) -> dict[str, str]:
    env = {
        "ZAI_API_KEY": API_KEY,
        "ZAIPROXY_OPENAI_BASE_URL": f"{mock_url}/api/paas/v4",
        "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock_url}/api/anthropic",
        "ZAIPROXY_NATIVE_BASE_URL": mock_url,
        "ZAIPROXY_ACCESS_LOG": "true",
        "ZAIPROXY_DRAIN_TIMEOUT": "5",
        "LOG_LEVEL": "info",
    }
    if not on:
        env |= {"TOKEN_COUNTING_ENABLED": "false", "ZAIPROXY_ADAPTIVE_RATE": "false"}
        return env
    env |= {
        "TOKEN_COUNTING_ENABLED": "true",
        "ZAIPROXY_ADAPTIVE_RATE": "true",
        "ZAIPROXY_KEYS_FILE": keys_path,
        "ZAIPROXY_REQUESTS_PER_MINUTE": HIGH,
        "ZAIPROXY_TOKENS_PER_MINUTE": HIGH + "000",
        "ZAIPROXY_CONCURRENCY": "100000",
        "ZAIPROXY_REQUESTS_PER_5H": HIGH,
        "ZAIPROXY_TOKENS_PER_5H": HIGH + "000",
        "ZAIPROXY_REQUESTS_PER_WEEK": HIGH,
        "ZAIPROXY_TOKENS_PER_WEEK": HIGH + "000",
    }
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--proxy-workers", type=int, default=2)
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS])
    args = parser.parse_args(argv)
    scenarios = [s for s in SCENARIOS if s.name in (args.scenario or ["json-c64", "sse50-c64"])]
    out_dir = Path(tempfile.mkdtemp(prefix="zaiproxy-limits-bench-"))
    keys_path = out_dir / "keys.toml"
    keys_path.write_text(KEYS_FILE)
    python = sys.executable
    mock = Child("mock", [python, "-m", "zaiproxy", "mock-upstream", "--host", "127.0.0.1",
                          "--port", "0", "--workers", "2", "--api-key", API_KEY],
                 child_env({}), out_dir)
    proxies: dict[str, Child] = {}
    try:
        mock_url = mock.wait_listening()
        for name in ("off", "on"):
            proxies[name] = Child(
                f"proxy-{name}",
                [python, "-m", "zaiproxy", "serve", "--host", "127.0.0.1", "--port", "0",
                 "--workers", str(args.proxy_workers)],
                child_env(proxy_env(mock_url, name == "on", str(keys_path))), out_dir)
            proxies[name].wait_listening()
        results: dict[str, dict[str, list[dict[str, float]]]] = {}
        for scenario in scenarios:
            results[scenario.name] = {"off": [], "on": []}
            for child in proxies.values():
                check_sample(child.url + PROXY_PATH, scenario)
                run_wrk(child.url + PROXY_PATH, scenario, 2, None)  # warm-up
            for repeat in range(args.repeat):
                for name, child in proxies.items():
                    with TreeSampler(child.pid) as tree:
                        run = run_wrk(child.url + PROXY_PATH, scenario, args.duration, None)
                    cpu_us = tree.cpu_seconds() * 1e6 / max(1, run["requests"])
                    results[scenario.name][name].append(
                        {"rps": run["rps"], "cpu_us": cpu_us, "errors": run["errors_total"]})
                    log(f"{scenario.name} {name:3} #{repeat + 1}: {run['rps']:8.0f} req/s  "
                        f"{cpu_us:6.0f} us CPU/req  errors {run['errors_total']}")
                    time.sleep(0.5)
        print(report(results))
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        log(f"results in {out_dir}")
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in proxies.values():
            child.stop()
        mock.stop()
    return 0


def report(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    lines = ["| scenario | req/s off | req/s on | on/off | CPU µs/req off | on | on/off |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, by in results.items():
        rps_off = statistics.median(r["rps"] for r in by["off"])
        rps_on = statistics.median(r["rps"] for r in by["on"])
        cpu_off = statistics.median(r["cpu_us"] for r in by["off"])
        cpu_on = statistics.median(r["cpu_us"] for r in by["on"])
        lines.append(f"| {name} | {rps_off:,.0f} | {rps_on:,.0f} | {rps_on / rps_off:.3f} | "
                     f"{cpu_off:,.0f} | {cpu_on:,.0f} | {cpu_on / cpu_off:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
