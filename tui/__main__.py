"""``python -m zaiproxy_tui`` (what ``zaiproxy tui`` runs): the terminal UI of a proxy, a
collector, or a fleet's metrics in Prometheus (README.md says which to use when)."""

from __future__ import annotations

import argparse
import os
import sys

from zaiproxy_tui.model import RANGES, variant_mode

DEFAULT_URL = "http://127.0.0.1:8080"


def _variant(text: str) -> str:
    try:
        return variant_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zaiproxy tui",
        description="Live and historical monitoring of a zaiproxy or a fleet collector "
                    "(reads only its admin API), or of a fleet's metrics in Prometheus.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--url", default=os.environ.get("ZAIPROXY_URL", DEFAULT_URL),
                        help=f"proxy or collector (default {DEFAULT_URL}, env ZAIPROXY_URL)")
    source.add_argument("--prometheus", metavar="URL", default=None,
                        help="a Prometheus that scrapes the fleet (both variants), e.g. "
                             "http://prometheus-operated.monitoring:9090")
    p.add_argument("--token", default=None,
                   help="admin token (default: env ZAIPROXY_ADMIN_TOKEN; asked for on a 401); "
                        "with --prometheus, the bearer token Prometheus wants, if any (the "
                        "admin token is never sent there)")
    p.add_argument("--range", default="15m", choices=list(RANGES), help="initial time range")
    p.add_argument("--variant", default="production", type=_variant, metavar="VARIANT",
                   help="initial variant view: production, canary (the variant named canary, "
                        "else the only one besides production), both (production overlaid "
                        "with the others), or a variant's name, e.g. test (default production)")
    p.add_argument("--light", action="store_true", help="start with the light theme")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        from zaiproxy_tui.app import ZaiproxyTui
        from zaiproxy_tui.prometheus_source import PrometheusSource
        from zaiproxy_tui.source import AdminApi
    except ImportError as exc:  # textual or httpx missing
        print(f"zaiproxy tui needs the 'tui' extra: pip install 'zaiproxy[tui]' ({exc})",
              file=sys.stderr)
        return 2
    source: AdminApi | PrometheusSource
    if ns.prometheus:
        source = PrometheusSource(ns.prometheus, ns.token)
    else:
        source = AdminApi(ns.url, ns.token or os.environ.get("ZAIPROXY_ADMIN_TOKEN") or None)
    app = ZaiproxyTui(source, url=source.url, range_=ns.range, mode=ns.variant,
                      dark=not ns.light)
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
