"""The ``zaiproxy`` command: serve, mock-upstream, collect, canary-check, config check, version."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from zaiproxy import __version__


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on; 0 picks a free one (default 8080)")
    p.add_argument("--workers", type=int, help="worker processes (default: CPU count)")
    p.add_argument("--demo", action="store_true", default=None,
                   help="proxy to the built-in mock upstream instead of Z.AI")
    p.add_argument("--config", help="TOML config file (also ZAIPROXY_CONFIG)")
    p.add_argument("--drain-timeout", type=float, dest="drain_timeout",
                   help="seconds in-flight requests get on SIGTERM (default 30)")
    p.add_argument("--log-level", dest="level", help="debug, info, warning or error")


def _cli_overrides(ns: argparse.Namespace) -> dict[str, object]:
    keys = ("host", "port", "workers", "demo", "drain_timeout", "level")
    return {k: getattr(ns, k, None) for k in keys if getattr(ns, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zaiproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy (supervisor + workers)")
    _serve_args(serve)

    mock = sub.add_parser("mock-upstream", help="run the OpenAI/Anthropic-compatible mock upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8090, help="0 picks a free one")
    mock.add_argument("--workers", type=int, default=1)
    mock.add_argument("--certfile", help="serve TLS with this certificate (PEM)")
    mock.add_argument("--keyfile", help="private key for --certfile")
    mock.add_argument("--api-key", help="require this upstream key (Bearer / x-api-key like Z.AI)")
    mock.add_argument("--chunks", type=int, default=10, help="stream events per response")
    mock.add_argument("--chunk-size", type=int, default=16, help="text bytes per stream event")
    mock.add_argument("--first-byte-delay", type=float, default=0.0, help="seconds before headers")
    mock.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between events")
    mock.add_argument("--quota-five-hour", type=int, default=4_000_000, metavar="TOKENS",
                      help="each account's five-hour token allowance (the quota endpoint)")
    mock.add_argument("--quota-weekly", type=int, default=40_000_000, metavar="TOKENS",
                      help="each account's weekly token allowance (the quota endpoint)")
    mock.add_argument("--quota-level", default="pro",
                      help="the plan tier the quota endpoint reports")

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate and print the effective config")
    _serve_args(check)

    sub.add_parser("version", help="print the version and the ledger implementation")
    from zaiproxy.observe.recorder.cli import add_parser as add_history_parser

    add_history_parser(sub)
    _collect_parser(sub)
    from zaiproxy.fleet.canary import add_parser as add_canary_parser

    add_canary_parser(sub)
    sub.add_parser("tui", add_help=False,
                   help="the terminal UI of a proxy, a collector or a fleet's Prometheus "
                        "(zaiproxy tui --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["tui"]:
        return _tui(args[1:])
    ns = build_parser().parse_args(args)
    if ns.command == "version":
        return _version()
    if ns.command == "mock-upstream":
        return _mock(ns)
    if ns.command == "history":
        # A collector's database and a fleet's Prometheus are read by the fleet wing's code,
        # which the recorder's CLI (observe/, a lower wing) may not import: handed in here.
        from zaiproxy.fleet import prom_summary
        from zaiproxy.fleet.collector_store import read_summary
        from zaiproxy.observe.recorder.cli import run as history

        return history(ns, collector_summary=read_summary,
                       prometheus_summary=prom_summary.read_summary)
    if ns.command == "collect":
        from zaiproxy.fleet.collector import main as collect

        return collect(ns)
    if ns.command == "canary-check":
        from zaiproxy.fleet.canary import run as canary_check

        return canary_check(ns)
    from zaiproxy.core.config import ConfigError, load_config, original_notes, render_check

    try:
        config, sources = load_config(_cli_overrides(ns), path=ns.config)
    except ConfigError as exc:
        sys.stderr.write(f"zaiproxy: invalid configuration:\n{exc}\n")
        return 2
    notes = original_notes()
    if ns.command == "config":
        sys.stdout.write(render_check(config, sources, notes))
        return 0
    from zaiproxy.core import logs
    from zaiproxy.run.supervisor import Supervisor

    logs.configure(config.level, proc="supervisor")
    log = logs.get_logger()
    for name, note in notes:  # once, by the supervisor (workers do not repeat it)
        log.warning("original_variable", variable=name, note=note)
    return Supervisor(config).run()


def _tui(args: list[str]) -> int:
    """The TUI is its own process (Textual on asyncio; the proxy never imports it)."""
    os.execv(sys.executable, [sys.executable, "-m", "zaiproxy_tui", *args])


def _version() -> int:
    from zaiproxy.limits.ledger import LedgerUnavailable, load

    try:
        impl = load().IMPLEMENTATION
    except LedgerUnavailable as exc:
        impl = f"unavailable ({exc})"
    print(f"zaiproxy {__version__} (ledger: {impl}, Python {sys.version.split()[0]})")
    return 0


def _mock(ns: argparse.Namespace) -> int:
    from zaiproxy.mock.behaviour import MockOptions
    from zaiproxy.mock.run import run

    try:
        options = MockOptions(chunks=ns.chunks, chunk_size=ns.chunk_size,
                              first_byte_delay=ns.first_byte_delay, chunk_delay=ns.chunk_delay,
                              api_key=ns.api_key, quota_five_hour=ns.quota_five_hour,
                              quota_weekly=ns.quota_weekly, quota_level=ns.quota_level)
    except ValueError as exc:
        sys.stderr.write(f"zaiproxy mock-upstream: {exc}\n")
        return 2
    return run(options, ns.host, ns.port, workers=ns.workers, certfile=ns.certfile,
               keyfile=ns.keyfile)



def _collect_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zaiproxy collect``: values stay strings here; zaiproxy/fleet/collector.py validates them
    (so the CLI does not import DuckDB for the other commands)."""
    p = sub.add_parser("collect", help="scrape many proxies into a DuckDB file; serve the admin API")
    p.add_argument("--target", action="append", required=True, metavar="URL",
                   help="a proxy to scrape (http://host:port); repeat for each")
    p.add_argument("--interval", default="5s", help="time between scrapes (default 5s)")
    p.add_argument("--db", default="zaiproxy-collector.duckdb", help="the collector's DuckDB file")
    p.add_argument("--host", default="127.0.0.1", help="admin API address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="admin API port; 0 picks a free one")
    p.add_argument("--admin-token", help="require `Authorization: Bearer TOKEN` "
                   "(also ZAIPROXY_ADMIN_TOKEN)")
    p.add_argument("--target-token",
                   help="sent to the targets' /admin/keys for the fleet keys view "
                        "(also ZAIPROXY_TARGET_ADMIN_TOKEN)")
    p.add_argument("--retention", default="7d", help="how long rows are kept (default 7d)")
    p.add_argument("--scrape-timeout", default="5s", help="per scrape (default 5s, <= interval)")
    p.add_argument("--heartbeat", default="15s", help="between SSE heartbeat comments")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")

if __name__ == "__main__":
    raise SystemExit(main())
