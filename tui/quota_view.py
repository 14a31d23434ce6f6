"""What the screen shows of Z.AI's own quota (no Textual): the "Z.AI quota" part of the
"Rate limiter & quotas" panel, and the headline's first words.

The proxy polls Z.AI's quota API per upstream key (``limits/zai_quota.py``): its 5-hour and
weekly windows, each with Z.AI's used share and its reset. Z.AI's number is the truth (other
clients share the account, and Z.AI's unit is not ours); beside it the panel shows the
proxy's own count of the same window where it keeps one (``global``'s ``upstream_*_per_5h``
and ``upstream_*_per_week``: "local"), so an operator sees how far the two drift apart.

Where the entries come from: ``/admin/keys`` (every field, and the pool of keys with their
rest state), else the newest ``/admin/status`` snapshot (Prometheus and a collector's status
read the ``zai_proxy_quota_*`` gauges: no pool, and staleness judged by the sample's age).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from zaiproxy_tui.model import (
    LOCAL_WINDOWS,
    LimitState,
    QuotaWindow,
    UpstreamKey,
    ZaiQuota,
)
from zaiproxy_tui.state import Dashboard
from zaiproxy_tui.views import Segment, fmt_duration, fmt_pct, fmt_si

WINDOW_LABELS = {"five_hour": "5h", "weekly": "week"}
NOT_POLLED = "Z.AI quota: not polled (ZAIPROXY_QUOTA_POLL)"
NOT_REPORTED = "Z.AI quota: not reported by this source (an older proxy or collector)"
# A used share from which a window is shown in the warning / error colour (the local limits'
# 80 %; the pacing's default reserve is 5 %: past 95 % requests may be refused).
WARN_SHARE = 0.8
ERROR_SHARE = 0.95


@dataclass(frozen=True, slots=True)
class QuotaRow:
    """One of Z.AI's windows of one key: ``5h  ████···  Z.AI 42%  · local 38%  resets in …``."""

    label: str  # "5h", "week"
    used_share: float  # the bar (0 when unknown)
    zai: str  # "Z.AI 42%"
    local: str  # "· local 38%", or "" where the proxy counts no such window for this key
    resets: str  # "resets in 2h 13m", or ""
    role: str  # ok | warn | error, or muted: the sample is stale


@dataclass(frozen=True, slots=True)
class QuotaGroup:
    """One upstream key: a line about it (pool: alias, rest, headroom; the sample's age and
    the last poll), its windows, and the pacing lines."""

    head: tuple[Segment, ...]
    rows: tuple[QuotaRow, ...]
    notes: tuple[tuple[Segment, ...], ...]


@dataclass(frozen=True, slots=True)
class ZaiQuotaView:
    head: tuple[Segment, ...]  # "Z.AI quota …", or the one muted line saying why there is none
    groups: tuple[QuotaGroup, ...]


def quota_entries(d: Dashboard) -> tuple[ZaiQuota, ...] | None:
    """Z.AI's quota as the newest answers say: /admin/keys' (every field), else the live
    snapshot's; None when neither says anything (an older proxy or collector)."""
    if d.keys is not None and d.keys.zai_quota is not None:
        return d.keys.zai_quota
    if d.latest is not None:
        return d.latest.zai_quota
    return None


def _upstreams(d: Dashboard) -> dict[str, UpstreamKey]:
    ups = d.keys.upstreams if d.keys is not None else None
    return {u.alias: u for u in ups or ()}


def pooled(d: Dashboard, entries: Sequence[ZaiQuota]) -> bool:
    """A pool of upstream keys (from a pool file): more than one key, or one by another
    name than ``default``."""
    names = {e.upstream for e in entries} | set(_upstreams(d))
    return len(names) > 1 or bool(names - {"default"})


def local_alias(d: Dashboard, entries: Sequence[ZaiQuota]) -> str | None:
    """The key whose windows /admin/keys' ``global`` counts: the proxy reports the
    upstream_* windows of its first upstream key (index 0); without a pool, the one key."""
    ups = _upstreams(d)
    first = next((u.alias for u in ups.values() if u.index == 0), None)
    if first is not None:
        return first
    return entries[0].upstream if len(entries) == 1 and not ups else None


def local_state(limits: Sequence[LimitState], window: QuotaWindow) -> LimitState | None:
    """The proxy's own count of ``window`` (the tokens one for a token quota, else the one
    with the highest used share)."""
    by_name = {s.name: s for s in limits}
    names = LOCAL_WINDOWS.get(window.window, ())
    found = [by_name[n] for n in names if n in by_name]
    if window.limit_type == "TOKENS_LIMIT" and names and names[0] in by_name:
        return by_name[names[0]]
    return max(found, key=lambda s: s.used_share, default=None)


def _clock(t: float, now: float, tz: dt.tzinfo | None) -> str:
    """A wall-clock time: ``14:05`` today, ``Mon 14:05`` beyond the next 20 hours."""
    when = dt.datetime.fromtimestamp(t, tz)
    return when.strftime("%a %H:%M" if t - now > 20 * 3600 else "%H:%M")


def _share_role(share: float | None) -> str:
    if share is None:
        return "muted"
    return "error" if share >= ERROR_SHARE else "warn" if share >= WARN_SHARE else "ok"


def _sample(entry: ZaiQuota) -> list[Segment]:
    """The sample's age (stale: in the warning colour) and a failing poller's last outcome."""
    out: list[Segment] = []
    if not entry.enabled:
        return [("  not polled", "muted")]
    if entry.plan_tier:
        out.append((f"  {entry.plan_tier}", "muted"))
    age = entry.sample_age_s
    if age is None:
        out.append(("  no sample yet", "warn"))
    elif entry.is_stale:
        out.append((f"  STALE: sampled {fmt_duration(age)} ago", "warn"))
    else:
        out.append((f"  sampled {fmt_duration(age)} ago", "muted"))
    if entry.failing:
        out.append((f"  last poll: {entry.last_outcome}", "error"))
    return out


def _rest(key: UpstreamKey | None, now: float, tz: dt.tzinfo | None, *,
          pool: bool) -> list[Segment]:
    """A key that rests (left out of the choice of key) and, in a pool, its headroom."""
    if key is None:
        return []
    out: list[Segment] = []
    if key.resting:
        until = "" if key.resting_until is None else f" until {_clock(key.resting_until, now, tz)}"
        why = f" ({key.rest_reason})" if key.rest_reason else ""
        out.append((f"  resting{until}{why}", "warn"))
    if pool and key.headroom is not None:
        out += [("  headroom ", "muted"), (fmt_pct(key.headroom), _share_role(1 - key.headroom))]
    return out


def _pacing(entry: ZaiQuota, now: float, tz: dt.tzinfo | None) -> list[tuple[Segment, ...]]:
    p = entry.pacing
    if p is None or not p.enabled:
        return []
    window = f" ({WINDOW_LABELS.get(p.window, p.window)})" if p.window else ""
    if p.reserve_reached:
        until = (f"until {_clock(p.closed_until, now, tz)}" if p.closed_until is not None
                 else "until the window resets")
        return [(("  reserve reached — 429 ", "error"), (until, "error"), (window, "muted"))]
    if p.rate_rps is not None:
        return [(("  paced ", "muted"), (f"{fmt_si(p.rate_rps)} req/s", "warn"),
                 (window, "muted"))]
    return [(("  paced: not limiting", "muted"),)]


def _row(w: QuotaWindow, stale: bool, local: LimitState | None) -> QuotaRow:
    local_text = ""
    if local is not None:
        # A window younger than its length (the host restarted inside it) counts at least
        # this much.
        local_text = f"· local {'≥' if local.since is not None else ''}{fmt_pct(local.used_share)}"
    return QuotaRow(
        label=WINDOW_LABELS.get(w.window, w.window), used_share=w.used_share or 0.0,
        zai=f"Z.AI {fmt_pct(w.used_share)}", local=local_text,
        resets=f"resets in {fmt_duration(w.reset_in_s)}" if w.reset_in_s is not None else "",
        role="muted" if stale else _share_role(w.used_share))


def zai_quota_view(d: Dashboard, now: float, tz: dt.tzinfo | None = None) -> ZaiQuotaView:
    entries = quota_entries(d)
    if entries is None:
        if d.keys is None and d.latest is None:
            return ZaiQuotaView((), ())  # nothing arrived yet: the panel says it waits
        return ZaiQuotaView(((NOT_REPORTED, "muted"),), ())
    if not entries or not any(e.enabled for e in entries):
        return ZaiQuotaView(((NOT_POLLED, "muted"),), ())
    pool = pooled(d, entries)
    ups = _upstreams(d)
    local_of = local_alias(d, entries)
    limits = d.keys.limits if d.keys is not None else ()
    groups = []
    for entry in entries:
        stale = entry.is_stale
        local = limits if entry.upstream == local_of else ()
        rows = tuple(_row(w, stale, local_state(local, w)) for w in entry.windows)
        info = _rest(ups.get(entry.upstream), now, tz, pool=pool) + _sample(entry)
        head: tuple[Segment, ...] = ((entry.upstream, "accent"), *info) if pool else ()
        groups.append(QuotaGroup(head, rows, tuple(_pacing(entry, now, tz))))
    if pool:
        return ZaiQuotaView((("Z.AI quota", "accent"),
                             (f" · {len(entries)} upstream keys", "muted")), tuple(groups))
    # One key: its sample and rest state on the title line.
    entry = entries[0]
    info = _rest(ups.get(entry.upstream), now, tz, pool=False) + _sample(entry)
    return ZaiQuotaView((("Z.AI quota", "accent"), *info), tuple(groups))


def headline_segments(d: Dashboard) -> list[Segment]:
    """The headline's Z.AI part: each fresh key's tightest window ("Z.AI 5h 42% used"),
    fullest first; a word when every sample is stale; nothing when not polled."""
    entries = [e for e in quota_entries(d) or () if e.enabled]
    if not entries:
        return []
    pool = pooled(d, entries)
    tightest = []
    for e in entries:
        if e.is_stale:
            continue
        w = max((w for w in e.windows if w.used_share is not None),
                key=lambda w: w.used_share or 0.0, default=None)
        if w is not None:
            tightest.append((e, w))
    if not tightest:
        return [("Z.AI sample stale", "warn"), ("  ", None)]
    out: list[Segment] = []
    for e, w in sorted(tightest, key=lambda ew: -(ew[1].used_share or 0.0)):
        name = f"Z.AI {e.upstream} " if pool else "Z.AI "
        out += [(f"{name}{WINDOW_LABELS.get(w.window, w.window)} ", "muted"),
                (f"{fmt_pct(w.used_share)} used", _share_role(w.used_share))]
        if w.reset_in_s is not None:
            out.append((f" {fmt_duration(w.reset_in_s)}", "muted"))
        out.append(("  ", None))
    return out
