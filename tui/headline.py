"""The headline: two compact rows under the status line, so the first screen of a small
terminal (80×24) shows how much quota is left and what failed, before any plot.

* quota: Z.AI's own tightest window per upstream key when its sample is fresh ("Z.AI 5h 42%
  used": the account's truth, ``zaiproxy_tui.quota_view``), then the proxy-wide limits and
  windows the proxy counts itself, least left first (``used %`` of the tightest reads at
  once), the adaptive upstream rate when it limits, and how many client keys are refused by
  their own limits now;
* failed: the shares of the range's requests that failed for their clients, by kind (the
  same kinds as ``/admin/status``'s ``failures``: 5xx, the proxy's own 429s, Z.AI's 429s,
  other 4xx), and the Z.AI 429s retried.

A tall terminal shows the whole "Rate limiter & quotas" and "Errors & retries" panels on its
first screen, so the headline is hidden there (``tui.tcss``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from zaiproxy_tui.model import RANGES, Point, timeline, total
from zaiproxy_tui.quota_view import headline_segments
from zaiproxy_tui.state import Dashboard
from zaiproxy_tui.views import Segment, fmt_count, fmt_pct, fmt_si, limit_rows


@dataclass(frozen=True, slots=True)
class HeadlineView:
    quota: tuple[Segment, ...]
    failed: tuple[Segment, ...]


def headline_view(d: Dashboard, now: float, tz: dt.tzinfo | None = None) -> HeadlineView:
    return HeadlineView(tuple(quota_segments(d, tz)), tuple(failed_segments(d, now)))


def quota_segments(d: Dashboard, tz: dt.tzinfo | None = None) -> list[Segment]:
    out: list[Segment] = [("quota ", "accent"), *headline_segments(d)]
    if d.keys is None:
        out.append((d.keys_error or "waiting for /admin/keys…", "muted"))
        return out
    a = d.keys.adaptive
    if a is not None and a.rate_rps:
        out += [("adaptive ", "muted"), (f"{fmt_si(a.rate_rps)} req/s", "warn"), ("  ", None)]
    rows = sorted(limit_rows(d.keys.limits, tz), key=lambda r: -r.used_share)
    for row in rows:
        role = "error" if row.limited else "warn" if row.used_share >= 0.8 else "ok"
        out += [(f"{row.label} ", "muted"), (f"{row.left} left", role)]
        if row.resets not in ("–", "now"):
            out.append((f" {row.resets}", "muted"))
        out.append(("  ", None))
    if not rows:
        out.append(("no proxy-wide limits  ", "muted"))
    limited = sum(1 for k in d.keys.keys if k.state == "limited")
    if limited:
        out.append((f"{limited} key{'s' if limited > 1 else ''} limited", "error"))
    while out and out[-1] == ("  ", None):
        out.pop()
    return out


def failed_segments(d: Dashboard, now: float) -> list[Segment]:
    """What failed over the range (history and live points of the shown variants)."""
    start = now - RANGES[d.range]
    points: list[Point] = [p for v in d.variants()
                           for p in timeline(d.history, v, d.live.get(v, ()), start, now)]
    out: list[Segment] = [(f"failed {d.range} ", "accent")]
    requests = total(points, "requests")
    if not requests:
        out.append(("no requests", "muted"))
        return out
    r429, rejections = total(points, "r429"), total(points, "rejections")
    r4xx = total(points, "r4xx")
    kinds = (
        ("5xx", total(points, "r5xx")),
        ("refused", rejections),
        # Z.AI's 429s relayed: every 429 that was not the proxy's own.
        ("z.ai 429", None if r429 is None or rejections is None
         else max(0.0, r429 - rejections)),
        ("4xx", None if r4xx is None or r429 is None else max(0.0, r4xx - r429)),
    )
    for label, count in kinds:
        share = None if count is None else count / requests
        role = None if not share else "error" if share > 0.05 else "warn"
        out += [(f"{label} ", "muted"), (fmt_pct(share), role), ("  ", None)]
    retries = total(points, "retries")
    out += [("retried ", "muted"), (fmt_count(retries), "warn" if retries else None)]
    return out
