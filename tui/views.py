"""What each part of the screen shows, computed from the :class:`~zaiproxy_tui.state.Dashboard` (no Textual).

Views are plain data: text as ``(text, role)`` segments and plot series as
``(t, value)`` points with a colour *role* (``"2xx"``, ``"p95"``,
``"canary"`` ...). The widgets turn roles into the current theme's colours,
so this module decides *what* is shown and the widgets only *how*.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zaiproxy_tui.model import PRODUCTION, RANGES, LimitState, Point, timeline, total, weighted
from zaiproxy_tui.state import Dashboard

Segment = tuple[str, str | None]  # (text, role); role None = normal text
# The colour roles of the variants besides production, in order of their names (the
# palette has one colour for each; a fourth variant takes the first's again).
OTHER_VARIANT_ROLES = ("canary", "variant-2", "variant-3")


def variant_role(d: Dashboard, variant: str) -> str:
    """A variant's colour: production's, else that of its place among the others."""
    if variant == PRODUCTION:
        return PRODUCTION
    others = d.canaries()
    i = others.index(variant) if variant in others else 0
    return OTHER_VARIANT_ROLES[i % len(OTHER_VARIANT_ROLES)]


def variants_label(d: Dashboard) -> str:
    """The status line's word for what is shown: a variant, or ``prod+…`` overlaid."""
    shown = d.variants()
    if len(shown) == 1:
        return shown[0]
    return "+".join("prod" if v == PRODUCTION else v for v in shown)


# ---- formatting ------------------------------------------------------------------------


def fmt_si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    # Round first, so 999,960 reads "1.0M", not "1000.0k".
    a = abs(float(f"{value:.3g}"))
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale * 0.9995:
            return f"{value / scale:.1f}{suffix}{unit}"
    if a >= 99.95 or value == 0:
        return f"{value:.0f}{unit}"
    if a >= 9.995:
        return f"{value:.1f}{unit}"
    return f"{value:.2f}{unit}"


def fmt_rate(value: float | None) -> str:
    return fmt_si(value, "/s")


def fmt_seconds(value: float | None) -> str:
    """A latency: 850µs, 12ms, 1.2s."""
    if value is None:
        return "–"
    if value == 0:
        return "0"
    if value < 0.9995e-3:
        return f"{value * 1e6:.0f}µs"
    if value < 0.9995:
        return f"{value * 1e3:.0f}ms"
    if value < 99.95:
        return f"{value:.1f}s"
    return f"{value:.0f}s"


def fmt_pct(value: float | None) -> str:
    if value is None:
        return "–"
    pct = value * 100
    return f"{pct:.0f}%" if pct >= 10 or pct == 0 else f"{pct:.1f}%"


def fmt_usd(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"${value:,.0f}"
    if value >= 1:
        return f"${value:.2f}"
    return f"${value:.4f}" if value else "$0"


def fmt_usd_axis(value: float) -> str:
    """An axis label: as few digits as tell the ticks apart ($0, $0.40, $2.50, $90)."""
    if value == 0:
        return "$0"
    if value >= 10:
        return f"${value:,.0f}"
    if value >= 0.01:
        return f"${value:.2f}"
    return f"${value:.4f}"


def fmt_duration(seconds: float | None) -> str:
    """"45s", "12m 5s", "2h 13m", "3d 4h": two units at most."""
    if seconds is None:
        return "–"
    s = max(0, math.ceil(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m {s}s" if s else f"{minutes}m"
    return f"{s}s"


def fmt_count(value: float | None) -> str:
    if value is None:
        return "–"
    return fmt_si(value) if value >= 10_000 else f"{value:,.0f}"


Y_FORMATS: dict[str, Callable[[float], str]] = {
    "rate": lambda v: fmt_si(v), "seconds": fmt_seconds, "tokens": lambda v: fmt_si(v),
    "usd": fmt_usd_axis, "count": lambda v: fmt_si(v),
}


# ---- status line --------------------------------------------------------------------


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# What the proxy's warning codes mean, short enough for the status line.
WARNINGS = {"admin_api_open": "ADMIN API OPEN (no token)",
            "limits_redis_unavailable": "LIMITS: REDIS UNREACHABLE (fail policy in force)"}


def freshness(d: Dashboard, variant: str) -> str | None:
    """A collector's (or Prometheus') word on one variant's targets: ``DOWN`` (none answers),
    ``STALE 1/3`` (some stopped answering), or None (all fresh, or a proxy: it reports only
    itself)."""
    latest = d.latest
    if latest is None or latest.source not in ("collector", "prometheus"):
        return None
    v = latest.variants.get(variant)
    if v is None or v.stale_targets <= 0:
        return None
    total = max(v.targets or 0, v.stale_targets)  # the variant's targets, fresh or not
    if v.stale_targets >= total:
        return "DOWN"
    return f"STALE {v.stale_targets}/{total}"


def status_view(d: Dashboard, now: float) -> list[Segment]:
    c = d.connection
    out: list[Segment] = []
    if c.kind == "connected":
        out.append(("● connected", "ok"))
        if d.source_kind == "prometheus":  # the fleet as Prometheus scraped it
            out.append((" via Prometheus", "muted"))
    elif c.kind == "connecting":
        out.append(("◌ connecting", "warn"))
    elif c.kind == "reconnecting":
        wait = max(0.0, c.retry_at - now)
        out.append((f"◌ reconnecting in {math.ceil(wait)}s", "warn"))
        out.append((f" ({_short(c.error, 40)})", "muted"))
    else:
        out.append(("✖ 401: press a to enter the admin token", "error"))
    if d.stale(now) and d.received_at is not None:
        out.append((f" STALE {fmt_duration(now - d.received_at)}", "error"))
    if d.paused:
        out.append((" ⏸ PAUSED", "warn"))
    if d.latest is not None:
        for warning in d.latest.warnings:
            out.append((f" ⚠ {WARNINGS.get(warning, warning)}", "error"))
    out.append((f"  {variants_label(d)}", "accent"))
    for variant in d.variants():
        badge = freshness(d, variant)
        if badge is not None:  # a dead canary must not look like an idle one
            out.append((f" {'prod' if variant == PRODUCTION else variant} {badge}", "error"))
    out.append((f" {d.range}", "accent"))
    p = latest_point(d)
    if p is not None:
        out.append(("  req ", "muted"))
        out.append((fmt_rate(p.requests), None))
        out.append(("  5xx ", "muted"))
        rate = p.error_rate
        out.append((fmt_pct(rate), "error" if rate and rate > 0.05 else None))
        # The other ways a request failed for its client, when they happen: the proxy's own
        # refusals (limits, the adaptive rate), Z.AI's 429s, other 4xx. A proxy refusing most
        # requests must not read as "5xx 0%".
        for label, value in (("refused", p.proxy_429), ("z.ai 429", p.zai_429),
                             ("4xx", p.other_4xx)):
            if value and p.requests:
                share = value / p.requests
                out.append((f"  {label} ", "muted"))
                out.append((fmt_pct(share), "error" if share > 0.05 else "warn"))
        out.append(("  p50 ", "muted"))
        out.append((fmt_seconds(p.latency_p50), None))
        out.append(("  tok ", "muted"))
        tokens = None if p.tokens_in is None and p.tokens_out is None else \
            (p.tokens_in or 0.0) + (p.tokens_out or 0.0)
        out.append((fmt_rate(tokens), None))
    in_flight, limit = concurrency_now(d)
    if in_flight is not None:
        out.append(("  in-flight ", "muted"))
        out.append((f"{in_flight:.0f}/{limit:.0f}" if limit else f"{in_flight:.0f}/∞", None))
    return out


def latest_point(d: Dashboard) -> Point | None:
    """The shown variants' newest rates, combined (sums; p50 request-weighted)."""
    points = [pts[-1] for v in d.variants() if (pts := d.live.get(v))]
    if not points:
        return None
    if len(points) == 1:
        return points[0]
    combined: dict[str, Any] = {}
    for name in ("requests", "r2xx", "r4xx", "r429", "r5xx", "tokens_in", "tokens_out",
                 "cost", "in_flight", "proxy_429", "zai_429", "other_4xx"):
        values = [getattr(p, name) for p in points if getattr(p, name) is not None]
        combined[name] = sum(values) if values else None
    return Point(t=max(p.t for p in points), seconds=points[0].seconds,
                 latency_p50=weighted(points, "latency_p50"), **combined)


def concurrency_now(d: Dashboard) -> tuple[float | None, float]:
    if d.latest is None:
        return None, 0.0
    shown = [d.latest.variants[v] for v in d.variants() if v in d.latest.variants]
    if not shown:
        return None, 0.0
    return sum(v.in_flight for v in shown), sum(v.concurrency_limit for v in shown)


# ---- plot panels --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeriesView:
    label: str
    role: str
    points: tuple[tuple[float, float | None], ...]


@dataclass(frozen=True, slots=True)
class PanelView:
    key: str
    title: str
    series: tuple[SeriesView, ...]
    start: float
    end: float
    y_format: str
    summary: tuple[Segment, ...]
    message: str | None = None
    legend: tuple[tuple[str, str], ...] = field(default=())


def _series(points: Sequence[Point], fn: Callable[[Point], float | None]) \
        -> tuple[tuple[float, float | None], ...]:
    return tuple((p.t, fn(p)) for p in points)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None else max(0.0, a - (b or 0.0))


@dataclass(frozen=True, slots=True)
class _Metric:
    """One thing a panel plots: its sub-series for one variant, and its one-line summary."""

    key: str
    title: str
    y_format: str
    parts: tuple[tuple[str, str, Callable[[Point], float | None]], ...]  # label, role, value
    main: int  # the part that stands for the variant when both are overlaid
    summary: Callable[[Sequence[Point], Point | None], list[Segment]]


def _sum_rate(points: Sequence[Point], name: str) -> str:
    return fmt_count(total(points, name))


def _rate_summary(points: Sequence[Point], last: Point | None) -> list[Segment]:
    req = total(points, "requests")
    err = total(points, "r5xx")
    return [("now ", "muted"), (fmt_rate(last.requests if last else None), None),
            ("  range ", "muted"), (fmt_count(req), None),
            ("  5xx ", "muted"), (fmt_pct(err / req if req and err is not None else None),
                                  "error" if req and err and err / req > 0.05 else None)]


def _pct_summary(prefix: str) -> Callable[[Sequence[Point], Point | None], list[Segment]]:
    def summary(points: Sequence[Point], last: Point | None) -> list[Segment]:
        out: list[Segment] = []
        for q in ("p50", "p95", "p99"):
            out += [(f"{q} ", "muted"),
                    (fmt_seconds(getattr(last, f"{prefix}_{q}") if last else None), q),
                    ("  ", None)]
        out += [("range p95≈", "muted"), (fmt_seconds(weighted(points, f"{prefix}_p95")), None)]
        return out
    return summary


def _tokens_summary(points: Sequence[Point], last: Point | None) -> list[Segment]:
    return [("in ", "muted"), (fmt_rate(last.tokens_in if last else None), "in"),
            ("  out ", "muted"), (fmt_rate(last.tokens_out if last else None), "out"),
            ("  range ", "muted"), (_sum_rate(points, "tokens_in"), "in"), (" / ", "muted"),
            (_sum_rate(points, "tokens_out"), "out")]


def _cost_summary(points: Sequence[Point], last: Point | None) -> list[Segment]:
    per_h = last.cost * 3600 if last and last.cost is not None else None
    return [("range ", "muted"), (fmt_usd(total(points, "cost")), "cost"),
            ("  now ", "muted"), (fmt_usd(per_h) + "/h" if per_h is not None else "–", None)]


def _concurrency_summary(points: Sequence[Point], last: Point | None) -> list[Segment]:
    peak = max((p.in_flight for p in points if p.in_flight is not None), default=None)
    limit = last.concurrency_limit if last else None
    return [("now ", "muted"), (fmt_si(last.in_flight if last else None), "in_flight"),
            (" / max ", "muted"), (fmt_si(limit) if limit else "∞", "limit"),
            ("  peak ", "muted"), (fmt_si(peak), None)]


METRICS: tuple[_Metric, ...] = (
    _Metric("rate", "Requests/s", "rate", (
        ("2xx", "2xx", lambda p: p.r2xx),
        ("4xx", "4xx", lambda p: _minus(p.r4xx, p.r429)),
        ("429", "429", lambda p: p.r429),
        ("5xx", "5xx", lambda p: p.r5xx),
    ), -1, _rate_summary),
    _Metric("latency", "Latency", "seconds", (
        ("p50", "p50", lambda p: p.latency_p50), ("p95", "p95", lambda p: p.latency_p95),
        ("p99", "p99", lambda p: p.latency_p99)), 1, _pct_summary("latency")),
    _Metric("ttft", "First token", "seconds", (
        ("p50", "p50", lambda p: p.ttft_p50), ("p95", "p95", lambda p: p.ttft_p95),
        ("p99", "p99", lambda p: p.ttft_p99)), 1, _pct_summary("ttft")),
    _Metric("tokens", "Tokens/s", "tokens", (
        ("in", "in", lambda p: p.tokens_in), ("out", "out", lambda p: p.tokens_out)), 1,
        _tokens_summary),
    _Metric("cost", "Estimated cost $/h", "usd", (
        ("$/h", "cost", lambda p: None if p.cost is None else p.cost * 3600),), 0, _cost_summary),
    _Metric("concurrency", "Concurrency", "count", (
        ("in flight", "in_flight", lambda p: p.in_flight),
        ("max", "limit", lambda p: p.concurrency_limit or None)), 0, _concurrency_summary),
)


def _main_value(metric: _Metric) -> Callable[[Point], float | None]:
    if metric.main >= 0:
        return metric.parts[metric.main][2]
    return lambda p: p.requests  # the rate panel overlays total requests/s


def panel_views(d: Dashboard, now: float) -> list[PanelView]:
    end = now
    start = end - RANGES[d.range]
    shown = d.variants()
    lines = {v: timeline(d.history, v, d.live.get(v, ()), start, end) for v in shown}
    known = d.known_variants()
    views = []
    for m in METRICS:
        message = None
        missing = [v for v in shown if v not in known]
        if len(missing) == len(shown):
            message = _no_data(d, missing)
        if len(shown) == 1:
            pts = lines[shown[0]]
            series = tuple(SeriesView(label, role, _series(pts, fn)) for label, role, fn in m.parts)
            last = _last(pts, d, shown[0])
            summary = tuple(m.summary(pts, last))
            legend = tuple((label, role) for label, role, _ in m.parts)
            title = m.title
        else:
            fn = _main_value(m)
            roles = {v: variant_role(d, v) for v in shown}
            series = tuple(SeriesView(v, roles[v], _series(lines[v], fn)) for v in shown)
            if m.key == "rate":
                title = "Requests/s"
            elif len(m.parts) > 1:
                title = f"{m.title} · {m.parts[m.main][0]}"
            else:
                title = m.title
            legend = tuple(("prod" if v == PRODUCTION else v, roles[v]) for v in shown)
            summary_parts: list[Segment] = []
            for v in shown:
                last = _last(lines[v], d, v)
                badge = freshness(d, v)
                name = (f"{v[:4]} ", roles[v])
                if badge is not None:
                    summary_parts += [name, (f"{badge}  ", "error")]
                    continue
                if last is None:
                    summary_parts += [name, ("no data  ", "muted")]
                    continue
                summary_parts += [name, (_fmt_main(m, last), None)]
                if m.key == "rate":
                    rate = last.error_rate if last else None
                    summary_parts.append((f" 5xx {fmt_pct(rate)}",
                                          "error" if rate and rate > 0.05 else "muted"))
                summary_parts.append(("  ", None))
            summary = tuple(summary_parts)
        views.append(PanelView(m.key, title, series, start, end, m.y_format, summary, message,
                               legend))
    return views


def _fmt_main(m: _Metric, last: Point | None) -> str:
    value = _main_value(m)(last) if last is not None else None
    if m.y_format == "seconds":
        return fmt_seconds(value)
    if m.y_format == "usd":
        return fmt_usd(value) + ("/h" if value is not None else "")
    if m.y_format in ("rate", "tokens"):
        return fmt_rate(value)
    return fmt_si(value)


def _last(points: Sequence[Point], d: Dashboard, variant: str) -> Point | None:
    live = d.live.get(variant)
    if live:
        return live[-1]
    return points[-1] if points else None


def _no_data(d: Dashboard, missing: Sequence[str]) -> str:
    if d.connection.kind == "auth":
        return "waiting for the admin token (press a)"
    if d.latest is None and d.history is None:
        return "waiting for data…"
    names = " and ".join(missing)
    return f"no data for {names} in the last {d.range}"


# ---- limits, errors, keys -------------------------------------------------------------------

LIMIT_LABELS = {"requests_per_minute": "req/min", "tokens_per_minute": "tok/min",
                "concurrency": "concurrency", "requests_per_5h": "req/5h",
                "tokens_per_5h": "tok/5h", "requests_per_week": "req/week",
                "tokens_per_week": "tok/week",
                # The proxy's refusals by the rate it learned from Z.AI's throttling.
                "adaptive_rate": "adaptive upstream rate"}


def limit_label(name: str) -> str:
    upstream = name.startswith("upstream_")
    base = LIMIT_LABELS.get(name.removeprefix("upstream_"), name)
    return f"upstream {base}" if upstream else base


@dataclass(frozen=True, slots=True)
class LimitRow:
    label: str
    used_share: float
    used: str  # "161.0k/400.0k"
    used_pct: str
    left: str
    resets: str
    limited: bool


def limit_rows(limits: Sequence[LimitState], tz: dt.tzinfo | None = None) -> list[LimitRow]:
    rows = []
    for s in limits:
        used = s.used if s.used is not None else s.limit - s.remaining
        share = s.used_share
        if s.since is not None:
            # The window restarted with its host: say what it covers, not a confident 0 %.
            clock = dt.datetime.fromtimestamp(s.since, tz).strftime("%H:%M")
            resets = f"since {clock} (restart)"
        elif s.name.endswith("concurrency"):
            resets = "–"
        elif s.reset_s:
            resets = fmt_duration(s.reset_s)
        else:
            resets = "now" if used == 0 else "–"
        rows.append(LimitRow(limit_label(s.name), share,
                             f"{fmt_count(used)}/{fmt_count(s.limit)}", fmt_pct(share),
                             fmt_pct(1 - share), resets, s.remaining <= 0))
    return rows


@dataclass(frozen=True, slots=True)
class LimiterView:
    message: str | None
    adaptive: list[Segment]
    rows: list[LimitRow]


def limiter_view(d: Dashboard, tz: dt.tzinfo | None = None) -> LimiterView:
    adaptive: list[Segment] = []
    if d.latest is not None:
        rates = [v.adaptive_rate for name, v in d.latest.variants.items() if name in d.variants()]
        adj = {k: 0.0 for k in ("down", "up")}
        for name in d.variants():
            v = d.latest.variants.get(name)
            if v is not None:
                for k, n in v.breakdown.get("adjustments", {}).items():
                    adj[k] = adj.get(k, 0.0) + n
        rate = max(rates, default=0.0)
        adaptive = [("adaptive ", "muted"),
                    (f"{fmt_si(rate)} req/s" if rate > 0 else "not limiting",
                     "warn" if rate > 0 else "ok"),
                    ("  ↓", "muted"), (fmt_count(adj["down"]), None),
                    (" ↑", "muted"), (fmt_count(adj["up"]), None)]
    if d.keys is None:
        msg = d.keys_error or "waiting for /admin/keys…"
        return LimiterView(msg, adaptive, [])
    a = d.keys.adaptive
    if a is not None and a.rate_rps and not adaptive:
        adaptive = [("adaptive ", "muted"), (f"{fmt_si(a.rate_rps)} req/s", "warn")]
    if a is not None and a.rate_rps and a.reason:
        # Why it is capped and the latest time the cap is gone (adaptive_forget_after).
        why = a.reason if a.free_in_s is None else \
            f"{a.reason}, gone ≤ {fmt_duration(a.free_in_s)}"
        adaptive.append((f"  ({why})", "muted"))
    rows = limit_rows(d.keys.limits, tz)
    message = None if rows else "no proxy-wide limits configured"
    return LimiterView(message, adaptive, rows)


@dataclass(frozen=True, slots=True)
class ErrorRow:
    label: str
    role: str | None
    now: float | None  # per second, the newest interval
    total: float | None  # over the range (history) or since the proxy started (live)


ZAI_CLASSES = {"1302": "concurrency", "1303": "frequency", "1305": "overloaded",
               "1308": "quota 5h", "1310": "quota weekly", "1113": "balance"}


def error_rows(d: Dashboard, now: float) -> tuple[list[ErrorRow], str]:
    """Errors and retries by class; the range totals come from history + live points."""
    end = now
    start = end - RANGES[d.range]
    pts = [p for v in d.variants()
           for p in timeline(d.history, v, d.live.get(v, ()), start, end)]
    last = latest_point_per(d)
    rows = [
        ErrorRow("5xx", "5xx", _sum_attr(last, "r5xx"), total(pts, "r5xx")),
        ErrorRow("429 (all)", "429", _sum_attr(last, "r429"), total(pts, "r429")),
        ErrorRow("4xx other", "4xx", _minus(_sum_attr(last, "r4xx"), _sum_attr(last, "r429")),
                 _minus(total(pts, "r4xx"), total(pts, "r429"))),
        ErrorRow("upstream errors", "5xx", _sum_attr(last, "upstream_errors"),
                 total(pts, "upstream_errors")),
        ErrorRow("rejected by limits", "429", _sum_attr(last, "rejections"),
                 total(pts, "rejections")),
        ErrorRow("Z.AI errors", "429", _sum_attr(last, "zai_errors"), total(pts, "zai_errors")),
        ErrorRow("retries", "warn", _sum_attr(last, "retries"), total(pts, "retries")),
    ]
    # By class and code: per second now, and totals since the proxy started.
    if d.latest is not None:
        rows.append(ErrorRow("by code, since start", "header", None, None))
        labellers: tuple[tuple[str, Callable[[str], str], str], ...] = (
                ("zai_errors", lambda k: f"  Z.AI {k} {ZAI_CLASSES.get(k, '')}".rstrip(), "429"),
                ("upstream_errors", lambda k: f"  upstream {k}", "5xx"),
                ("rejections", lambda k: f"  limit {_rejection_label(k)}", "429"),
                ("retries", lambda k: f"  retry {k}", "warn"))
        for cat, label_of, role in labellers:
            merged: dict[str, tuple[float, float]] = {}
            for v in d.variants():
                snap = d.latest.variants.get(v)
                if snap is None:
                    continue
                for k, n in snap.breakdown.get(cat, {}).items():
                    per_s = snap.breakdown_per_s.get(cat, {}).get(k, 0.0)
                    a, b = merged.get(k, (0.0, 0.0))
                    merged[k] = (a + per_s, b + n)
            for k in sorted(merged):
                if merged[k][1] > 0:
                    rows.append(ErrorRow(label_of(k), role, merged[k][0], merged[k][1]))
    if rows[-1].role == "header":
        rows.pop()
    return rows, d.range


def _rejection_label(name: str) -> str:
    """``key:requests_per_minute`` -> ``key req/min``; the adaptive rate by its own name."""
    scope, _, limit = name.partition(":")
    if limit == "adaptive_rate":
        return limit_label(limit)
    return f"{scope} {limit_label(limit)}" if limit else limit_label(scope)


def latest_point_per(d: Dashboard) -> list[Point]:
    return [pts[-1] for v in d.variants() if (pts := d.live.get(v))]


def _sum_attr(points: Sequence[Point], name: str) -> float | None:
    values = [getattr(p, name) for p in points if getattr(p, name) is not None]
    return sum(values) if values else None


# The keys table: (header, sort key) per column. Nine columns fit the 76 an 80-column
# terminal leaves inside the panel (each column is its widest text plus a space each side)
# with aliases of 13 characters: counts take at most four (fmt_short_count), and the key's
# state is the colour of its "left" cell (a disabled key's says so), not a column.
KEY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("alias", "key"), ("req", "requests"), ("refused", "refused"), ("4xx", "4xx"),
    ("5xx", "5xx"), ("in", "in"), ("out", "out"), ("left", "left"), ("resets", "resets"))


@dataclass(frozen=True, slots=True)
class KeyLine:
    alias: str
    state: str
    state_role: str
    requests: int  # every request the key sent
    tokens_in: int
    tokens_out: int
    left_share: float | None
    left: str
    resets: str
    resets_s: float | None
    # Of the requests: refused by the proxy's limits (its 429s), the other 4xx (Z.AI's 429s
    # relayed, 499s), the 5xx. None: not known (a proxy older than these counts).
    refused: int | None = None
    r4xx: int | None = None
    r5xx: int | None = None

    def sort_key(self, column: str) -> tuple[float | str, str]:
        values: dict[str, float | str] = {
            "key": self.alias, "state": self.state, "requests": self.requests,
            "refused": _known(self.refused), "4xx": _known(self.r4xx), "5xx": _known(self.r5xx),
            "in": self.tokens_in, "out": self.tokens_out,
            "left": self.left_share if self.left_share is not None else 2.0,
            "resets": self.resets_s if self.resets_s is not None else math.inf,
        }
        return values[column], self.alias

    def cells(self) -> tuple[tuple[str, str | None], ...]:
        """The row's text per column of KEY_COLUMNS, each with its palette role (None =
        plain): the "left" cell carries the key's state (limited: the error colour)."""
        disabled = self.state == "disabled"
        return ((self.alias, None), (fmt_short_count(self.requests), None),
                (fmt_short_count(self.refused), None), (fmt_short_count(self.r4xx), None),
                (fmt_short_count(self.r5xx), None), (fmt_short_count(self.tokens_in), None),
                (fmt_short_count(self.tokens_out), None),
                ("disabled" if disabled else self.left,
                 None if self.state_role == "ok" else self.state_role),
                (self.resets, None))


def _known(count: int | None) -> float:
    """A count to sort by: an unknown one below every known one (0 included)."""
    return -1.0 if count is None else float(count)


def fmt_short_count(value: int | None) -> str:
    """A count in at most four characters, for the keys table's six count columns: exact
    below 10,000 (``9870``), then two or three digits and a unit (``48k``, ``431k``,
    ``1.2M``, ``58M``); "–" when unknown."""
    if value is None:
        return "–"
    if value < 10_000:
        return str(value)
    for scale, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        x = value / scale
        if x < 9.95:
            return f"{x:.1f}{suffix}"
        if round(x) < 1000:  # else 999.6k reads 1.0M, not 1000k
            return f"{x:.0f}{suffix}"
    return f"{value:.0e}"


def key_lines(d: Dashboard, sort: str = "requests", reverse: bool = True) -> list[KeyLine]:
    if d.keys is None:
        return []
    out = []
    for k in d.keys.keys:
        tight = k.tightest
        if k.state == "limited":
            state, role = "limited", "error"  # by what: the "quota left" column
        elif k.state == "disabled":
            state, role = "disabled", "muted"
        else:
            state, role = "ok", "ok"
        if tight is None:
            left, share, resets, resets_s = "no limits", None, "–", None
        else:
            share = 1 - tight.used_share
            left = f"{fmt_pct(share)} {limit_label(tight.name)}"
            resets_s = tight.reset_s if tight.reset_s else None
            resets = fmt_duration(resets_s) if resets_s else "–"
        out.append(KeyLine(k.alias, state, role, k.requests, k.input_tokens, k.output_tokens,
                           share, left, resets, resets_s, refused=k.refused, r4xx=k.r4xx,
                           r5xx=k.r5xx))
    out.sort(key=lambda line: line.sort_key(sort), reverse=reverse)
    return out


def keys_message(d: Dashboard) -> str | None:
    """The keys panel's note: why there are no rows, or what a fleet's rows are made of."""
    if d.keys is None:
        return d.keys_error
    if d.keys.mode == "open":
        text = "open mode: no keys file, every client key is accepted"
        return text + "; limits fleet-wide (Redis)" if d.keys.scope == "fleet" else text
    if d.keys.mode == "fleet":
        if d.keys.scope == "fleet":
            text = f"fleet: {d.keys.targets} targets sharing one budget (Redis): fleet-wide"
        else:
            text = f"fleet: {d.keys.targets} targets, usage summed, tightest limit shown"
            if d.keys.scope == "mixed":
                text += " (some targets share a Redis budget)"
        if d.keys.targets_failed:
            text += f"; {len(d.keys.targets_failed)} failed: {d.keys.targets_failed[0]}"
        return text
    if d.keys.scope == "fleet":
        return "limits shared by the fleet (Redis): every number is fleet-wide"
    return None
