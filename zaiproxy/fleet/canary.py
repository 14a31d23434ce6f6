"""``zaiproxy canary-check``: promote the canary, wait for more data, or roll it back.

The decision is the rollback runbook of the system we replace (its rollback decisions
compared canary vs production error rate and p95 latency), with its numbers as
defaults, every one a flag:

- roll back when the canary answers more than 10 % of API requests with a 5xx; when its p95
  latency or p95 time to first token is more than 2x production's ("up more than 100 %");
  when more than half of its targets are down; when its 429 share exceeds production's by
  more than 5 points; or when its token counting broke: more than half of its successful
  requests came without usage from upstream (tokens only estimated,
  ``zai_proxy_usage_missing_total``) while production's share is not that high;
- wait while either variant has fewer than ``--min-requests`` requests in the window, or
  there is no canary target at all (a bad signal still rolls back: pods that crash get no
  traffic);
- promote otherwise.

The canary is the variant ``--canary`` names or, without it, the one variant besides
production that the source has (``canary``; ``test`` in the original's runbook; ``v2`` ...):
:func:`~zaiproxy.fleet.canary_sources.variant_names`.

Three layers, so the decision is tested without a socket: :func:`decide` is pure (two
:class:`~zaiproxy.fleet.canary_sources.Window` aggregates in, a :class:`Decision` out); the
source adapters in :mod:`zaiproxy.fleet.canary_sources` reduce what a fleet collector's admin
API, the two proxies' admin APIs or a Prometheus server answered to those aggregates
(pure) and do the blocking HTTP (urllib, a timeout per request: this is a CLI, not the
trio hot path); :func:`run` maps every failure to reach or read a source (``SourceError``)
to a message on stderr and exit 2 (inconclusive), never a traceback. A proxy ``--url``
that does not answer at all is not a failure to read: it is a down target (ROLL BACK on
``targets`` when it is the canary's), see :mod:`zaiproxy.fleet.canary_sources` for which
variant it is counted for.

The sources differ in exactness. Prometheus answers ``increase`` and ``histogram_quantile``
over the window (a series born inside the window loses its first scrape's increment, as in
any alert rule). The collector's history carries rates and quantiles per step, not
buckets: counts are the rates times the part of each step inside the window, and a p95 is
the request-weighted mean of the steps' p95s (the recorder's rollups do the same). A
proxy's history (its recorder's) carries exact counts per bucket (1/60 of the range): a
bucket counts when most of it lies in the window, and p95s are weighted as the
collector's.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from zaiproxy.fleet.canary_sources import (
    Reading,
    SourceError,
    Window,
    read_admin,
    read_prometheus,
)

EXIT_PROMOTE, EXIT_ROLL_BACK, EXIT_WAIT = 0, 1, 2
_EPSILON = 1e-9  # shares are ratios of floats: 15 % - 10 % must not read as > 5 points


# ---- the decision (pure) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_error_rate: float = 0.10  # 5xx share of API requests
    max_latency_ratio: float = 2.0  # canary p95 / production p95
    max_ttft_ratio: float = 2.0
    max_429_increase: float = 0.05  # canary 429 share - production's (5 points)
    max_targets_down: float = 0.5  # share of canary targets down
    max_usage_missing: float = 0.5  # share of 2xx without upstream usage
    min_requests: float = 50  # per variant, else wait


class Verdict(enum.Enum):
    PROMOTE = "PROMOTE"
    ROLL_BACK = "ROLL BACK"
    WAIT = "WAIT"

    @property
    def exit_code(self) -> int:
        return {Verdict.PROMOTE: EXIT_PROMOTE, Verdict.ROLL_BACK: EXIT_ROLL_BACK,
                Verdict.WAIT: EXIT_WAIT}[self]


class Status(enum.Enum):
    OK = "ok"
    BAD = "bad"
    NO_DATA = "no-data"


@dataclass(frozen=True, slots=True)
class Signal:
    """One compared signal: values, the threshold it was held to, and why it is what it is."""

    name: str
    status: Status
    reason: str
    canary: float | None = None
    production: float | None = None
    limit: float | None = None  # the threshold's number; ``threshold`` says what it means
    threshold: str = ""
    shown: tuple[str, str] = ("-", "-")  # (canary, production) as printed

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "canary": self.canary,
                "production": self.production, "threshold": self.threshold,
                "limit": self.limit, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str
    signals: tuple[Signal, ...]


def _share(part: float | None, whole: float) -> float | None:
    return part / whole if part is not None and whole > 0 else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def decide(canary: Window, production: Window, t: Thresholds) -> Decision:
    """The verdict and one signal per rule: any bad signal rolls back; too little traffic
    or no canary target waits; otherwise promote."""
    enough = canary.requests >= t.min_requests and production.requests >= t.min_requests
    signals = (
        _targets(canary, production, t),
        _traffic(canary, production, t, enough),
        _error_rate(canary, production, t, enough),
        _ratio("latency_p95", "p95 latency", canary.latency_p95, production.latency_p95,
               t.max_latency_ratio, enough),
        _ratio("ttft_p95", "p95 time to first token", canary.ttft_p95, production.ttft_p95,
               t.max_ttft_ratio, enough),
        _rate_limited(canary, production, t, enough),
        _usage_missing(canary, production, t, enough),
    )
    bad = [s for s in signals if s.status is Status.BAD]
    if bad:
        return Decision(Verdict.ROLL_BACK, "bad: " + ", ".join(s.name for s in bad), signals)
    waiting = [s for s in signals[:2] if s.status is Status.NO_DATA]
    if waiting:
        return Decision(Verdict.WAIT, waiting[0].reason, signals)
    unknown = [s.name for s in signals if s.status is Status.NO_DATA]
    reason = "every signal is within its threshold"
    if unknown:
        reason += f" (no data for {', '.join(unknown)})"
    return Decision(Verdict.PROMOTE, reason, signals)


def _targets(c: Window, p: Window, t: Thresholds) -> Signal:
    shown = (f"{c.targets_down}/{c.targets} down" if c.targets else "none",
             f"{p.targets_down}/{p.targets} down" if p.targets else "none")
    args = (float(c.targets_down), float(p.targets_down), t.max_targets_down,
            f"> {_pct(t.max_targets_down)} down", shown)
    if not c.targets:
        return Signal("targets", Status.NO_DATA, "no canary targets: is the canary deployed "
                      "and scraped?", *args)
    down = c.targets_down / c.targets
    if down > t.max_targets_down + _EPSILON:
        return Signal("targets", Status.BAD, f"{c.targets_down} of {c.targets} canary targets "
                      f"down ({_pct(down)}), more than {_pct(t.max_targets_down)}", *args)
    what = (f"all {c.targets} canary targets up" if not c.targets_down else
            f"{c.targets_down} of {c.targets} canary targets down, "
            f"not more than {_pct(t.max_targets_down)}")
    return Signal("targets", Status.OK, what, *args)


def _traffic(c: Window, p: Window, t: Thresholds, enough: bool) -> Signal:
    short = [f"{name} has {w.requests:.0f}" for name, w in (("canary", c), ("production", p))
             if w.requests < t.min_requests]
    reason = ("enough requests in both variants" if enough else
              f"not enough traffic: {' and '.join(short)} requests in the window, "
              f"fewer than --min-requests {t.min_requests:g}")
    return Signal("requests", Status.OK if enough else Status.NO_DATA, reason, c.requests,
                  p.requests, t.min_requests, f">= {t.min_requests:g} each",
                  (f"{c.requests:.0f}", f"{p.requests:.0f}"))


_NOT_ENOUGH = "not enough requests to judge (see requests)"


def _error_rate(c: Window, p: Window, t: Thresholds, enough: bool) -> Signal:
    cs, ps = _share(c.server_errors, c.requests), _share(p.server_errors, p.requests)
    args = (cs, ps, t.max_error_rate, f"> {_pct(t.max_error_rate)}", (_pct(cs), _pct(ps)))
    if not enough or cs is None:
        return Signal("error_rate", Status.NO_DATA, _NOT_ENOUGH, *args)
    if cs > t.max_error_rate + _EPSILON:
        return Signal("error_rate", Status.BAD, f"canary answered {_pct(cs)} of API requests "
                      f"with 5xx, above {_pct(t.max_error_rate)} (production {_pct(ps)})", *args)
    return Signal("error_rate", Status.OK, f"canary 5xx share {_pct(cs)}, not above "
                  f"{_pct(t.max_error_rate)}", *args)


def _ratio(name: str, what: str, c: float | None, p: float | None, limit: float,
           enough: bool) -> Signal:
    args = (c, p, limit, f"> {limit:g}x production", (_secs(c), _secs(p)))
    if not enough:
        return Signal(name, Status.NO_DATA, _NOT_ENOUGH, *args)
    if c is None or p is None:
        missing = " and ".join(v for v, x in (("canary", c), ("production", p)) if x is None)
        return Signal(name, Status.NO_DATA, f"no {what} observed for {missing}", *args)
    ratio = c / p if p > 0 else (math.inf if c > 0 else 1.0)
    told = f"canary {what} {_secs(c)} is {ratio:.2f}x production's {_secs(p)}"
    if c > limit * p + _EPSILON:
        return Signal(name, Status.BAD, f"{told}, above {limit:g}x", *args)
    return Signal(name, Status.OK, f"{told}, within {limit:g}x", *args)


def _rate_limited(c: Window, p: Window, t: Thresholds, enough: bool) -> Signal:
    cs, ps = _share(c.rate_limited, c.requests), _share(p.rate_limited, p.requests)
    points = t.max_429_increase * 100
    args = (cs, ps, t.max_429_increase, f"> production + {points:g} pts", (_pct(cs), _pct(ps)))
    if not enough or cs is None or ps is None:
        return Signal("rate_limited", Status.NO_DATA, _NOT_ENOUGH, *args)
    told = f"canary 429 share {_pct(cs)} vs production's {_pct(ps)}"
    if cs - ps > t.max_429_increase + _EPSILON:
        return Signal("rate_limited", Status.BAD, f"{told}: {(cs - ps) * 100:.1f} points "
                      f"higher, more than {points:g}", *args)
    return Signal("rate_limited", Status.OK, f"{told}: not more than {points:g} points higher",
                  *args)


def _usage_missing(c: Window, p: Window, t: Thresholds, enough: bool) -> Signal:
    cs, ps = _share(c.usage_missing, c.ok), _share(p.usage_missing, p.ok)
    limit = t.max_usage_missing
    args = (cs, ps, limit, f"> {_pct(limit)} (production not)", (_pct(cs), _pct(ps)))
    if not enough:
        return Signal("usage_missing", Status.NO_DATA, _NOT_ENOUGH, *args)
    if c.usage_missing is None or p.usage_missing is None:
        return Signal("usage_missing", Status.NO_DATA, "the source does not report "
                      "usage_missing (a collector or proxy older than this check, or a "
                      "proxy's history from 1-minute rollups)", *args)
    if cs is None or ps is None:
        none = " and ".join(n for n, w in (("canary", c), ("production", p)) if w.ok <= 0)
        return Signal("usage_missing", Status.NO_DATA, f"no successful requests for {none}",
                      *args)
    told = (f"{_pct(cs)} of canary's successful requests came without usage from upstream "
            f"(production {_pct(ps)})")
    if cs > limit + _EPSILON and ps > limit + _EPSILON:
        return Signal("usage_missing", Status.OK, f"{told}: production too, so upstream sends "
                      "none to either (not the canary's doing)", *args)
    if cs > limit + _EPSILON:
        return Signal("usage_missing", Status.BAD, f"{told}: token counting is broken, "
                      f"above {_pct(limit)}", *args)
    return Signal("usage_missing", Status.OK, f"{told}: not above {_pct(limit)}", *args)


# ---- output ------------------------------------------------------------------------------


_COLUMNS = ("signal", "canary", "production", "threshold", "status", "reason")


def render_text(decision: Decision, header: str) -> str:
    """The verdict line, what was compared, then one aligned line per signal."""
    rows = [_COLUMNS, *((s.name, *s.shown, s.threshold, s.status.value, s.reason)
                        for s in decision.signals)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS) - 1)]
    lines = [f"{decision.verdict.value}: {decision.reason}", header]
    for row in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False))
                     + "  " + row[-1])
    return "\n".join(lines) + "\n"


def render_json(decision: Decision, meta: Mapping[str, Any],
                windows: Mapping[str, Window]) -> str:
    return json.dumps({
        "verdict": decision.verdict.value, "exit_code": decision.verdict.exit_code,
        "reason": decision.reason, **meta,
        "signals": [s.to_json() for s in decision.signals],
        "variants": {name: asdict(w) for name, w in windows.items()},
    }, indent=2) + "\n"


# ---- command line ------------------------------------------------------------------------

EPILOG = """\
exit codes:
  0  PROMOTE    every signal is within its threshold
  1  ROLL BACK  at least one signal is bad
  2  WAIT       not enough data (too few requests, no canary target), or inconclusive:
                the source could not be reached or read, or a bad argument

signals: targets, requests, error_rate (5xx share of API requests), latency_p95,
ttft_p95 (time to first token), rate_limited (429 share), usage_missing (share of 2xx
whose upstream sent no usage, so tokens were only estimated).
fractions are written 0.1 or 10%.

variants: the canary is the variant --canary names, or else the one variant besides
production (--production, default production) that the source has, whatever its name
(canary, test, v2 ...); with several, name it. A name the source does not have while it
has others (e.g. --canary canary when the canary is called test) is inconclusive.

--url: one fleet collector, or one URL per proxy (repeat --url; each proxy serves the
one variant its /admin/status names, and its history must be recorded). A proxy URL that
does not answer (refused, timeout) is a down target of the variant that has no answering
proxy (a dead canary: ROLL BACK on targets); when both variants have one, it is
inconclusive (exit 2): the dead URL could be either's.
"""


def _fraction(text: str) -> float:
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r} (e.g. 0.1 or 10%)") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (0% and 100%): {text!r}")
    return value


def _ratio_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _window(text: str) -> float:
    from zaiproxy.core.durations import DurationError, parse_duration

    try:
        return parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _variant(text: str) -> str:
    from zaiproxy.core.config_values import Invalid, variant

    try:
        return variant(text, True)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = Thresholds()
    p = sub.add_parser(
        "canary-check", help="compare the canary with production: PROMOTE, WAIT or ROLL BACK",
        description="Compare the canary variant with production over a window and print a "
                    "verdict with one line per signal.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", metavar="URL", action="append",
                        help="a fleet collector's admin API (zaiproxy collect), e.g. "
                             "http://collector:9100; or, repeated, each proxy's admin API, "
                             "e.g. --url http://prod-proxy:8080 --url http://canary-proxy:8080")
    source.add_argument("--prometheus", metavar="URL",
                        help="a Prometheus server scraping both variants, e.g. http://prom:9090")
    p.add_argument("--token", help="the admin token of --url (else ZAIPROXY_ADMIN_TOKEN); "
                   "sent to --prometheus too when given")
    p.add_argument("--window", type=_window, default=600.0, metavar="DURATION",
                   help="how far back to compare (default 10m)")
    p.add_argument("--production", type=_variant, default="production", metavar="NAME",
                   help="production's variant label (default production)")
    p.add_argument("--canary", type=_variant, default=None, metavar="NAME",
                   help="the canary's variant label, e.g. test (default: the one variant "
                        "besides production that the source has; 'canary' when it has none)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--timeout", type=_ratio_arg, default=10.0, metavar="SECONDS",
                   help="per HTTP request to the source (default 10)")
    t = p.add_argument_group("thresholds")
    t.add_argument("--min-requests", type=_count, default=int(d.min_requests), metavar="N",
                   help=f"wait below this many requests per variant (default {d.min_requests:g})")
    t.add_argument("--max-error-rate", type=_fraction, default=d.max_error_rate, metavar="F",
                   help="roll back above this canary 5xx share (default 10%%)")
    t.add_argument("--max-latency-ratio", type=_ratio_arg, default=d.max_latency_ratio,
                   metavar="X", help="roll back when canary p95 latency > X times production's "
                   "(default 2)")
    t.add_argument("--max-ttft-ratio", type=_ratio_arg, default=d.max_ttft_ratio, metavar="X",
                   help="the same for p95 time to first token (default 2)")
    t.add_argument("--max-429-increase", type=_fraction, default=d.max_429_increase,
                   metavar="F", help="roll back when the canary 429 share exceeds "
                   "production's by more than this (default 5%%: 5 points)")
    t.add_argument("--max-targets-down", type=_fraction, default=d.max_targets_down,
                   metavar="F", help="roll back above this share of canary targets down "
                   "(default 50%%)")
    t.add_argument("--max-usage-missing", type=_fraction, default=d.max_usage_missing,
                   metavar="F", help="roll back above this share of canary 2xx without upstream "
                   "usage while production's is not (default 50%%)")


def thresholds_of(ns: argparse.Namespace) -> Thresholds:
    return Thresholds(max_error_rate=ns.max_error_rate, max_latency_ratio=ns.max_latency_ratio,
                      max_ttft_ratio=ns.max_ttft_ratio, max_429_increase=ns.max_429_increase,
                      max_targets_down=ns.max_targets_down,
                      max_usage_missing=ns.max_usage_missing, min_requests=ns.min_requests)


def run(ns: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``zaiproxy canary-check``: read the source, decide, print; the verdict's exit code."""
    out = sys.stdout if out is None else out  # per call: a redirected stdout is obeyed
    err = sys.stderr if err is None else err
    if ns.production == ns.canary:
        err.write("zaiproxy canary-check: --production and --canary must name two variants\n")
        return EXIT_WAIT
    try:
        reading = _read(ns)
    except SourceError as exc:
        err.write(f"zaiproxy canary-check: inconclusive: {exc}\n")
        return EXIT_WAIT
    windows = reading.windows
    production, canary = reading.names
    thresholds = thresholds_of(ns)
    decision = decide(windows[canary], windows[production], thresholds)
    if ns.json:
        meta = {"source": reading.source, "window_s": ns.window,
                "canary": canary, "production": production,
                "thresholds": asdict(thresholds)}
        out.write(render_json(decision, meta, windows))
    else:
        out.write(render_text(decision, f"canary {canary!r} vs production "
                              f"{production!r} over {ns.window:g}s, from {reading.kind} "
                              f"{reading.where}"))
    return decision.verdict.exit_code


def _read(ns: argparse.Namespace) -> Reading:
    if ns.url:
        urls = list(dict.fromkeys(u.rstrip("/") for u in ns.url))  # a URL given twice: once
        token = ns.token or os.environ.get("ZAIPROXY_ADMIN_TOKEN") or None
        return read_admin(urls, ns.window, ns.production, ns.canary, token=token,
                          timeout=ns.timeout)
    return read_prometheus(ns.prometheus.rstrip("/"), ns.window, ns.production, ns.canary,
                           token=ns.token, timeout=ns.timeout)
