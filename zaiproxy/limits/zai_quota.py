"""Z.AI's own quota: polled once per host (or fleet), shown everywhere, and optionally paced.

The proxy counts its own rolling windows (``*_per_5h``, ``*_per_week``), but only Z.AI knows
how much of the account's 5-hour and weekly quota is spent: other clients share the account,
and Z.AI's unit (tokens by its own count, or credits) is not ours. Its quota API
(``upstream/quota.py``: the request, the payload, the parser) is the truth; this module polls
it, shares the sample with every worker, and paces admission so the quota lasts.

Who polls
---------
- One poller per host, in a thread of the supervisor with its own trio loop (the supervisor's
  loop is synchronous and never waits on the network): N workers do not poll N times.
- With ``limits_backend = "redis"``, one poller per fleet: only the pod holding the adaptive
  rate's leader lease (``limits/fleet_rate.py``) calls Z.AI; it writes the sample to Redis
  (``{prefix}:quota:<upstream id>``) and every pod, itself included, copies it into its ledger
  from there about once a second. A new leader continues within a poll interval.
- The original's contract: ``GET {base}/api/monitor/usage/quota/limit`` with the raw key,
  polled at start and then every ``quota_interval``, each poll bounded by ``quota_timeout``
  and ``quota_max_response_bytes``. A failure keeps the last good sample; outcomes
  ``success | error | malformed | stale`` are counted (``stale``: once per transition into
  staleness, a poller that never succeeded being stale at its first failure).

Where workers read it
---------------------
The ledger (the host's shared memory), rows keyed ``quota\\0<alias>\\0…`` written by
:class:`QuotaBoard`: a state row (sample time, last attempt, last outcome, outcome counts), a
meta row (plan tier, sample sequence) and one row per window (limit type, used share in ppm,
reset time in ms). ``/metrics`` (``zai_proxy_quota_*``, the original's names and labels),
``/health`` (the original's ``quota`` object), ``/admin/keys`` (``zai_quota``, what the TUI
shows) and the recorder (a ``zai_quota`` history row per key and window for each new sample:
observe/recorder/quota.py) read them through :meth:`QuotaBoard.view`. Rows are read at
scrape/report time only; per request only the pacing gate (one word) and, with a pool of
keys, each key's used share (:meth:`QuotaBoard.used_max`).

Pacing (``quota_pacing``)
-------------------------
What the original planned and never built: admission is paced so each window's remaining
quota, less a reserve, lasts until the window resets.

- **Cost per request**, per window: the share of the window one upstream answer spends,
  measured between samples (delta  used share ÷ delta  upstream answers of the host, or of the fleet
  with Redis) and averaged (EWMA, weight ``quota_cost_alpha``). Z.AI reports token windows in
  whole percent, so a measurement is taken only when the share moved; the answers between
  two moves all count (an anchor is kept until then), which keeps the integer steps unbiased.
- **Projected use**: the sample's share plus the measured cost times the answers since the
  sample, so the hour between two polls is not spent blind.
- **The rate**: per window, (1 - projected - reserve) ÷ seconds to reset ÷ cost; the paced
  rate is the lowest over the windows, published as a cap on the adaptive rate's GCRA
  (effective rate = min(adaptive max, adaptive congestion rate, quota rate)): one admission
  op, exact across workers, and fleet-wide with Redis because the leader publishes the
  effective rate there. It falls at once and rises by at most ``quota_max_increase`` per
  new sample.
- **The reserve**: when a window's projected share reaches ``1 - reserve``, every request is
  answered 429 at once, ``Retry-After`` = the window's reset, in the caller's API shape
  ("quota reserve reached"), instead of letting the fleet spend the last of the quota and
  then meet Z.AI's 1308s.
- **A stale sample never tightens**: once the sample is older than ``quota_stale_after``, no
  new cap or closed gate comes from it (no projection on old data). The last cap decided on
  fresh data is held as it was, and a gate already closed stays closed, each only until its
  window's reset: a quota API that goes down neither tightens pacing nor lets a fleet burn
  the quota it was pacing. A window whose reset time has passed no longer constrains until
  a sample says where it stands.
- Until a cost has been measured only the reserve gate applies (no rate from a guess).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson
import trio

from zaiproxy.core import logs
from zaiproxy.http import client as http_client
from zaiproxy.limits.cells import upstream_key_id
from zaiproxy.limits.loop_thread import LoopThread
from zaiproxy.upstream import quota as zai

if TYPE_CHECKING:
    from zaiproxy.core.config import Config
    from zaiproxy.limits.segment import Segment

OUTCOMES: Final = ("success", "error", "malformed", "stale")
WINDOWS: Final = ("five_hour", "weekly")
LIMIT_TYPES: Final = ("TOKENS_LIMIT", "CREDIT_LIMIT")
TIERS: Final = ("lite", "pro", "max")
PPM: Final = 1_000_000
DEFAULT_ALIAS: Final = "default"
# Followers (and the leader) read the fleet's sample from Redis this often.
FLEET_READ_S: Final = 1.0

# Row words (1..7).
_W_SAMPLE_MS, _W_ATTEMPT_MS, _W_OUTCOME = 1, 2, 3
_W_COUNT0 = 4  # 4..7: success, error, malformed, stale
_W_TIER, _W_SEQ = 1, 2
_W_TYPE, _W_USED_PPM, _W_RESET_MS = 1, 2, 3
# The pacing row (one per host): closed-until, its window, the paced rate, the costs.
_W_GATE_UNTIL_MS, _W_GATE_WINDOW, _W_PACE_MRPS, _W_COST5_PPB, _W_COSTW_PPB, _W_PACE_SEQ = (
    1, 2, 3, 4, 5, 6)
PACE_KEY: Final = b"quota\0pace"


def _key(alias: str, *parts: str) -> bytes:
    return b"\0".join([b"quota", alias.encode(), *(p.encode() for p in parts)])


def _ms(t: float | None) -> int:
    return 0 if t is None else round(t * 1000)


# ---- what is shown -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowView:
    window: str
    limit_type: str
    used_fraction: float
    reset_at: float | None


@dataclass(frozen=True, slots=True)
class QuotaView:
    """One upstream key's quota as the workers see it (``view``), for every report."""

    alias: str
    enabled: bool
    interval_s: float
    stale_after_s: float
    last_success_at: float | None  # unix seconds of the sample
    last_attempt_at: float | None
    last_outcome: str | None
    counts: dict[str, int]
    plan_tier: str | None
    windows: tuple[WindowView, ...]

    def age(self, now: float) -> float | None:
        return None if self.last_success_at is None else max(0.0, now - self.last_success_at)

    def fresh(self, now: float) -> bool:
        age = self.age(now)
        return age is not None and age <= self.stale_after_s

    def health(self, now: float) -> dict[str, Any]:
        """The original's ``/health`` ``quota`` object (its field names, RFC 3339 times)."""
        if not self.enabled:
            return {"enabled": False, "fresh": False}
        out: dict[str, Any] = {"enabled": True, "fresh": self.fresh(now),
                               "interval": _go(self.interval_s),
                               "stale_after": _go(self.stale_after_s)}
        if self.last_success_at is not None:
            out["last_success_at"] = _rfc3339(self.last_success_at)
            out["sample_age_seconds"] = round(self.age(now) or 0.0, 3)
        if self.last_outcome is not None:
            out["last_outcome"] = self.last_outcome
        if self.plan_tier is not None:
            out["plan_tier"] = self.plan_tier
        if self.windows:
            out["windows"] = [
                {"window": w.window, "limit_type": w.limit_type,
                 "used_fraction": w.used_fraction,
                 **({"reset_at": _rfc3339(w.reset_at)} if w.reset_at is not None else {})}
                for w in self.windows]
        return out

    def report(self, now: float, pace: PaceView | None) -> dict[str, Any]:
        """``/admin/keys``' ``zai_quota`` entry: what the TUI's quota panel shows."""
        age = self.age(now)
        stale = self.enabled and not self.fresh(now)
        return {
            "upstream": self.alias, "enabled": self.enabled, "fresh": self.fresh(now),
            "stale": stale, "plan_tier": self.plan_tier, "last_outcome": self.last_outcome,
            "last_success_at": self.last_success_at,
            "sample_age_s": None if age is None else round(age, 3),
            "interval_s": self.interval_s, "stale_after_s": self.stale_after_s,
            "polls": dict(self.counts),
            "windows": [
                {"window": w.window, "limit_type": w.limit_type,
                 "used_fraction": w.used_fraction, "used_pct": round(w.used_fraction * 100, 2),
                 "reset_at": w.reset_at,
                 "reset_in_s": None if w.reset_at is None else round(max(0.0, w.reset_at - now), 3)}
                for w in self.windows],
            "pacing": None if pace is None else pace.report(now),
        }


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _go(seconds: float) -> str:
    """A duration as Go prints it (``1m0s``, ``15m0s``, ``1h0m0s``, ``2.5s``): the original's
    ``/health`` shape."""
    if seconds < 60:
        return f"{seconds:g}s"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return (f"{int(h)}h" if h else "") + f"{int(m)}m{s:g}s"


@dataclass(frozen=True, slots=True)
class PaceView:
    enabled: bool
    rate_rps: float | None
    closed_until: float | None
    window: str | None
    cost: dict[str, float]  # window -> share of the window one upstream answer spends

    def closed(self, now: float) -> bool:
        return self.closed_until is not None and self.closed_until > now

    def report(self, now: float) -> dict[str, Any]:
        return {"enabled": self.enabled, "rate_rps": self.rate_rps,
                "reserve_reached": self.closed(now), "window": self.window,
                "closed_until": self.closed_until if self.closed(now) else None,
                "cost_per_request": self.cost}


# ---- the shared rows -----------------------------------------------------------------------


class QuotaBoard:
    """One upstream key's quota rows in the ledger: written by the poller, read by workers."""

    def __init__(self, segment: Segment, alias: str = DEFAULT_ALIAS) -> None:
        self.segment = segment
        self.alias = alias
        self.state = segment.row(_key(alias, "state"))
        self.meta = segment.row(_key(alias, "meta"))
        self.windows = {w: segment.row(_key(alias, "w", w)) for w in WINDOWS}

    def record(self, outcome: str, wall: float, sample: zai.QuotaSample | None = None, *,
               count: bool = True) -> None:
        """One poll's outcome (``count=False``: a fleet follower showing the leader's poll,
        counted where it was made); ``sample`` with a success (the sequence is written last:
        a reader that sees the new sequence sees the sample)."""
        seg = self.segment
        if count:
            seg.counter_add(self.state, _W_COUNT0 + OUTCOMES.index(outcome), 1)
        if outcome == "stale":
            return  # a transition, not a poll: the last poll's outcome stays what it was
        seg.counter_set(self.state, _W_ATTEMPT_MS, _ms(wall))
        seg.counter_set(self.state, _W_OUTCOME, OUTCOMES.index(outcome) + 1)
        if sample is not None:
            self.write_sample(sample, wall)

    def write_sample(self, sample: zai.QuotaSample, sampled_at: float) -> None:
        seg = self.segment
        for name, row in self.windows.items():
            w = sample.window(name)
            if w is None:
                seg.counter_set(row, _W_TYPE, 0)
                continue
            seg.counter_set(row, _W_USED_PPM, round(w.used_fraction * PPM))
            seg.counter_set(row, _W_RESET_MS, _ms(w.reset_at))
            seg.counter_set(row, _W_TYPE, _index(LIMIT_TYPES, w.limit_type) + 1)
        seg.counter_set(self.meta, _W_TIER, _index(TIERS, sample.plan_tier) + 1
                        if sample.plan_tier is not None else 0)
        seg.counter_set(self.state, _W_SAMPLE_MS, _ms(sampled_at))
        seg.counter_add(self.meta, _W_SEQ, 1)

    def sequence(self) -> int:
        return self.segment.counter_get(self.meta, _W_SEQ)

    def used_max(self) -> float:
        """The highest used share among the key's windows (0 before a first sample): a
        request's choice of key reads this, two words per window."""
        get = self.segment.counter_get
        return max((get(row, _W_USED_PPM) for row in self.windows.values()
                    if get(row, _W_TYPE) > 0), default=0) / PPM

    def view(self, config: Config) -> QuotaView:
        get = self.segment.counter_get
        sample_ms = get(self.state, _W_SAMPLE_MS)
        attempt_ms = get(self.state, _W_ATTEMPT_MS)
        outcome = get(self.state, _W_OUTCOME)
        tier = get(self.meta, _W_TIER)
        windows = []
        if sample_ms > 0:
            for name, row in self.windows.items():
                kind = get(row, _W_TYPE)
                if kind <= 0:
                    continue
                reset_ms = get(row, _W_RESET_MS)
                windows.append(WindowView(
                    name, LIMIT_TYPES[kind - 1] if kind <= len(LIMIT_TYPES) else "unknown",
                    min(1.0, max(0.0, get(row, _W_USED_PPM) / PPM)),
                    reset_ms / 1000 if reset_ms > 0 else None))
        return QuotaView(
            self.alias, config.quota_poll, config.quota_interval, config.quota_stale_after,
            sample_ms / 1000 if sample_ms > 0 else None,
            attempt_ms / 1000 if attempt_ms > 0 else None,
            OUTCOMES[outcome - 1] if 0 < outcome <= len(OUTCOMES) else None,
            {name: get(self.state, _W_COUNT0 + i) for i, name in enumerate(OUTCOMES)},
            (TIERS[tier - 1] if tier <= len(TIERS) else "other") if tier > 0 else None,
            tuple(windows))

    def sample(self) -> tuple[zai.QuotaSample, float] | None:
        """The last good sample as the rows hold it, with its time (None before the first)."""
        sample_ms = self.segment.counter_get(self.state, _W_SAMPLE_MS)
        if sample_ms <= 0:
            return None
        view = self.view_raw()
        return view, sample_ms / 1000

    def view_raw(self) -> zai.QuotaSample:
        get = self.segment.counter_get
        windows = []
        for name, row in self.windows.items():
            kind = get(row, _W_TYPE)
            if kind <= 0:
                continue
            reset_ms = get(row, _W_RESET_MS)
            windows.append(zai.QuotaWindow(
                name, LIMIT_TYPES[kind - 1] if kind <= len(LIMIT_TYPES) else "unknown",
                min(1.0, max(0.0, get(row, _W_USED_PPM) / PPM)),
                reset_ms / 1000 if reset_ms > 0 else None))
        tier = get(self.meta, _W_TIER)
        return zai.QuotaSample((TIERS[tier - 1] if tier <= len(TIERS) else "other")
                               if tier > 0 else None, tuple(windows))


def _index(names: Sequence[str], value: str | None) -> int:
    """Position of ``value`` in ``names``; one past the end for anything else."""
    try:
        return names.index(value or "")
    except ValueError:
        return len(names)


class PaceBoard:
    """The host's pacing decision in the ledger: the gate every request checks, and what
    reports show. Written by whoever paces (the supervisor, or a fleet pod copying the
    leader's decision)."""

    def __init__(self, segment: Segment, alias: str = DEFAULT_ALIAS) -> None:
        self.segment = segment
        self.row = segment.row(PACE_KEY if alias == DEFAULT_ALIAS
                               else PACE_KEY + b"\0" + alias.encode())

    def write(self, decision: Decision, cost: dict[str, float]) -> None:
        seg, row = self.segment, self.row
        seg.counter_set(row, _W_PACE_MRPS, 0 if decision.rate_rps is None
                        else max(1, round(decision.rate_rps * 1000)))
        seg.counter_set(row, _W_COST5_PPB, round(cost.get("five_hour", 0.0) * 1e9))
        seg.counter_set(row, _W_COSTW_PPB, round(cost.get("weekly", 0.0) * 1e9))
        seg.counter_set(row, _W_GATE_WINDOW, _index(WINDOWS, decision.window) + 1
                        if decision.window is not None else 0)
        # Last: a request that sees the gate sees its window.
        seg.counter_set(row, _W_GATE_UNTIL_MS, _ms(decision.closed_until))
        seg.counter_add(row, _W_PACE_SEQ, 1)

    def closed_until_ms(self) -> int:
        """Per request: 0 = open, else the unix ms the gate opens (compare with the clock)."""
        return self.segment.counter_get(self.row, _W_GATE_UNTIL_MS)

    def gate_window(self) -> str | None:
        w = self.segment.counter_get(self.row, _W_GATE_WINDOW)
        return WINDOWS[w - 1] if 0 < w <= len(WINDOWS) else None

    def view(self, enabled: bool) -> PaceView:
        get = self.segment.counter_get
        mrps = get(self.row, _W_PACE_MRPS)
        until = get(self.row, _W_GATE_UNTIL_MS)
        cost = {name: get(self.row, word) / 1e9
                for name, word in (("five_hour", _W_COST5_PPB), ("weekly", _W_COSTW_PPB))
                if get(self.row, word) > 0}
        return PaceView(enabled, mrps / 1000 if mrps > 0 else None,
                        until / 1000 if until > 0 else None, self.gate_window(), cost)

    def raw(self) -> tuple[int, int, int, int, int]:
        get = self.segment.counter_get
        return (get(self.row, _W_GATE_UNTIL_MS), get(self.row, _W_GATE_WINDOW),
                get(self.row, _W_PACE_MRPS), get(self.row, _W_COST5_PPB),
                get(self.row, _W_COSTW_PPB))

    def copy(self, raw: Sequence[int]) -> None:
        """A fleet follower: the leader's decision, as :meth:`raw` gave it."""
        seg, row = self.segment, self.row
        until, window, mrps, c5, cw = (int(v) for v in raw)
        seg.counter_set(row, _W_PACE_MRPS, mrps)
        seg.counter_set(row, _W_COST5_PPB, c5)
        seg.counter_set(row, _W_COSTW_PPB, cw)
        seg.counter_set(row, _W_GATE_WINDOW, window if 0 <= window <= len(WINDOWS) else 0)
        seg.counter_set(row, _W_GATE_UNTIL_MS, until)


# ---- pacing (pure: the caller's clocks and counts) ----------------------------------------


@dataclass(frozen=True, slots=True)
class PaceSettings:
    reserve: float = 0.05
    alpha: float = 0.2
    max_increase: float = 0.2
    stale_after_s: float = 900.0

    @classmethod
    def of(cls, config: Config) -> PaceSettings:
        return cls(config.quota_reserve, config.quota_cost_alpha, config.quota_max_increase,
                   config.quota_stale_after)


@dataclass(frozen=True, slots=True)
class Decision:
    rate_rps: float | None  # the paced rate (None: the quota does not limit now)
    closed_until: float | None  # unix seconds the reserve gate opens (None: open)
    window: str | None  # the window that closed the gate, or that sets the rate


@dataclass(slots=True)
class _Anchor:
    used: float
    answers: int
    reset_at: float | None


@dataclass
class QuotaPacer:
    """Turns samples and the count of upstream answers into a :class:`Decision` (module
    docstring, "Pacing"). Pure: every clock and count is an argument."""

    settings: PaceSettings
    cost: dict[str, float] = field(default_factory=dict)
    anchors: dict[str, _Anchor] = field(default_factory=dict)
    sample: zai.QuotaSample | None = None
    sampled_at: float = 0.0
    answers_at_sample: int = 0
    cap: float | None = None  # the last paced rate
    rise_limit: float | None = None  # how high the cap may go until the next sample
    closed: tuple[float, str] | None = None
    held: tuple[float, str, float] | None = None  # the last fresh cap, its window, its reset

    def on_sample(self, sample: zai.QuotaSample, sampled_at: float, answers: int) -> None:
        """A new sample (``sampled_at``: wall seconds it was taken; ``answers``: upstream
        answers counted so far, host or fleet)."""
        for w in sample.windows:
            anchor = self.anchors.get(w.window)
            moved_reset = (anchor is not None and w.reset_at is not None
                           and anchor.reset_at is not None
                           and abs(w.reset_at - anchor.reset_at) > 60.0)
            if anchor is None or moved_reset or w.used_fraction < anchor.used:
                # First sight, or the window reset: measure from here.
                self.anchors[w.window] = _Anchor(w.used_fraction, answers, w.reset_at)
                continue
            spent, served = w.used_fraction - anchor.used, answers - anchor.answers
            if spent > 0 and served > 0:
                measured = spent / served
                old = self.cost.get(w.window)
                a = self.settings.alpha
                self.cost[w.window] = measured if old is None else a * measured + (1 - a) * old
                self.anchors[w.window] = _Anchor(w.used_fraction, answers, w.reset_at)
            elif served < 0:  # a counter went back (a restart): start again from here
                self.anchors[w.window] = _Anchor(w.used_fraction, answers, w.reset_at)
        self.sample = sample
        self.sampled_at = sampled_at
        self.answers_at_sample = answers
        self.rise_limit = (None if self.cap is None
                           else self.cap * (1.0 + self.settings.max_increase))

    def decide(self, now: float, answers: int) -> Decision:
        sample = self.sample
        if sample is None:
            return Decision(None, None, None)
        if self.closed is not None and self.closed[0] <= now:
            self.closed = None
        if now - self.sampled_at > self.settings.stale_after_s:
            # Old data never tightens: the last fresh cap is held as it was (not recomputed
            # from projections on old data) until its window resets; a closed gate likewise.
            held = self.held
            if held is not None and held[2] <= now:
                held = self.held = None
            kept, window = (held[0], held[1]) if held is not None else (None, None)
            self.cap = kept
            if self.closed is not None:
                return Decision(kept, *self.closed)
            return Decision(kept, None, window)
        reserve = self.settings.reserve
        rate: float | None = None
        rate_window: str | None = None
        closed: tuple[float, str] | None = None  # a fresh sample decides anew
        since = max(0, answers - self.answers_at_sample)
        for w in sample.windows:
            if w.reset_at is None or w.reset_at <= now:
                continue  # reset since the sample (or unknown): nothing to pace on
            cost = self.cost.get(w.window)
            used = w.used_fraction + (cost * since if cost is not None else 0.0)
            left = 1.0 - reserve - used
            if left <= 0.0:
                if closed is None or w.reset_at > closed[0]:
                    closed = (w.reset_at, w.window)
                continue
            if cost is not None and cost > 0:
                r = left / (w.reset_at - now) / cost
                if rate is None or r < rate:
                    rate, rate_window = r, w.window
        self.closed = closed
        if rate is not None and self.rise_limit is not None and rate > self.rise_limit:
            rate = self.rise_limit
        self.cap = rate
        reset_of = {w.window: w.reset_at for w in sample.windows}
        self.held = (None if rate is None or rate_window is None
                     else (rate, rate_window, reset_of.get(rate_window) or now))
        if closed is not None:
            return Decision(rate, closed[0], closed[1])
        return Decision(rate, None, rate_window)


# ---- the poller ----------------------------------------------------------------------------


@dataclass
class _Latest:
    sample: zai.QuotaSample
    sampled_at: float
    sequence: int


class KeyPoller:
    """One upstream key's polls: the request, the outcome in its rows, its staleness."""

    def __init__(self, segment: Segment, config: Config, alias: str, api_key: str, url: str,
                 ssl_context: ssl.SSLContext | None, wall: Callable[[], float]) -> None:
        self.config = config
        self.alias = alias
        self._api_key = api_key
        self.url = url
        self.ssl_context = ssl_context
        self.wall = wall
        self.log = logs.get_logger()
        self.board = QuotaBoard(segment, alias)
        self.pace = PaceBoard(segment, alias)
        self.stale = True  # nothing succeeded yet: the first failure counts as stale
        self.last_success: float | None = None
        self.latest: _Latest | None = None
        self.polls = 0
        self._last_error: str | None = None

    async def poll_once(self) -> str:
        """Ask Z.AI once; record the outcome in the rows. Returns the outcome."""
        cfg = self.config
        wall = self.wall()
        headers = [(k.decode(), v.decode()) for k, v in zai.request_headers(self._api_key)]
        self.polls += 1
        try:
            with trio.fail_after(cfg.quota_timeout):
                answer = await http_client.get(self.url, headers=headers,
                                               max_body=cfg.quota_max_response_bytes,
                                               ssl_context=self.ssl_context)
            sample = zai.parse_quota(answer.status, answer.body)
        except zai.QuotaError as exc:
            return self._failed(exc.outcome, f"{exc.outcome}: {exc}", wall)
        except http_client.BadAnswer as exc:
            return self._failed("malformed", str(exc), wall)
        except (http_client.ClientError, trio.TooSlowError) as exc:
            what = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            return self._failed("error", what, wall)
        self.board.record("success", wall, sample)
        self._got(sample, wall)
        if self.stale or self._last_error is not None:
            self.log.info("zai_quota_polled", upstream=self.alias, windows=[
                f"{w.window}:{w.limit_type}:{round(w.used_fraction * 100, 1)}%"
                for w in sample.windows], plan_tier=sample.plan_tier)
        self.stale = False
        self._last_error = None
        return "success"

    def _got(self, sample: zai.QuotaSample, sampled_at: float) -> None:
        seq = (self.latest.sequence + 1) if self.latest is not None else 1
        self.latest = _Latest(sample, sampled_at, seq)
        self.last_success = sampled_at

    def _failed(self, outcome: str, why: str, wall: float) -> str:
        self.board.record(outcome, wall)
        if why != self._last_error:  # once per distinct failure, not every minute
            self.log.warning("zai_quota_poll_failed", upstream=self.alias, outcome=outcome,
                             error=why[:200], url=self.url)
            self._last_error = why
        self.check_stale(wall)
        return outcome

    def check_stale(self, wall: float) -> None:
        """Count ``stale`` once per transition into staleness."""
        old = self.last_success is None or wall - self.last_success > self.config.quota_stale_after
        if old and not self.stale:
            self.stale = True
            self.board.record("stale", wall)
            self.log.warning("zai_quota_stale", upstream=self.alias,
                             stale_after_s=self.config.quota_stale_after)
        elif old and self.last_success is None and self.polls == 1:
            self.board.record("stale", wall)  # never succeeded: stale at the first failure


class QuotaPoller(LoopThread):
    """The supervisor's poller thread (module docstring, "Who polls"): every upstream key of
    the pool (``keys``: (alias, key) pairs; default: ``api_key`` as ``default``), polled in
    turn every interval.

    ``leader``: for the fleet, a callable saying whether this pod holds the leader lease (the
    adaptive rate's); None on a single host (always poll). The fleet has one key."""

    thread_name = "zai-quota"

    def __init__(self, segment: Segment, config: Config, *,
                 leader: Callable[[], bool] | None = None, redis: Any = None,
                 wall: Callable[[], float] = time.time,
                 keys: Sequence[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.segment = segment
        self.config = config
        self.wall = wall
        self.log = logs.get_logger()
        self.leader = leader
        self.redis = redis
        base = config.quota_base_url or _origin(config.native_base_url)
        url = base.rstrip("/") + zai.QUOTA_PATH
        context = (ssl.create_default_context(cafile=config.ca_file)
                   if config.ca_file else None)
        pairs = keys if keys is not None else [(DEFAULT_ALIAS, config.api_key or "")]
        self.keys = [KeyPoller(segment, config, alias, key, url, context, wall)
                     for alias, key in pairs]
        self.by_alias = {k.alias: k for k in self.keys}
        prefix = "{" + config.redis_key_prefix + "}"
        self.redis_key = f"{prefix}:quota:{upstream_key_id(pairs[0][1])}"
        self.pod = f"{socket.gethostname()[:32]}:{os.getpid()}"

    # The first key (the only one with the fleet backend), for the fleet's loop and tests.
    @property
    def first(self) -> KeyPoller:
        return self.keys[0]

    @property
    def board(self) -> QuotaBoard:
        return self.first.board

    @property
    def pace(self) -> PaceBoard:
        return self.first.pace

    @property
    def latest(self) -> _Latest | None:
        return self.first.latest

    def latest_of(self, alias: str) -> _Latest | None:
        """The newest sample of one key (read by the rate controller's thread: one
        reference read of an attribute the poller's thread replaces)."""
        key = self.by_alias.get(alias)
        return key.latest if key is not None else None

    async def poll_once(self) -> str:
        """Poll every key once; the first key's outcome."""
        outcomes = [await key.poll_once() for key in self.keys]
        return outcomes[0]

    # ---- the thread --------------------------------------------------------------------

    async def run_loop(self, started: threading.Event) -> None:
        started.set()
        if self.redis is None:
            while not self.stopping:  # the host: every key, every interval
                await self.poll_once()
                await self.pause(self.config.quota_interval)
        else:
            async with self.redis:
                await self._fleet_loop()

    async def _fleet_loop(self) -> None:
        """The leader polls every interval and publishes the sample and its pacing decision
        at every turn (the decision moves each second); the others copy them."""
        assert self.leader is not None
        next_poll = 0.0
        outcome = "success"
        while not self.stopping:
            now = trio.current_time()
            if self.leader():
                if now >= next_poll:
                    next_poll = now + self.config.quota_interval
                    outcome = await self.poll_once()
                await self._publish(outcome)
            else:
                next_poll = 0.0  # a pod that becomes the leader polls at once
                await self._follow()
            await self.pause(min(FLEET_READ_S, self.config.quota_interval))

    async def _publish(self, outcome: str) -> None:
        """The leader: the sample (and its own pacing decision) for the fleet."""
        latest = self.first.latest
        doc = {"outcome": outcome, "at": self.wall(), "pod": self.pod,
               "pace": list(self.pace.raw())}
        if latest is not None:
            doc["sample"] = _sample_doc(latest.sample)
            doc["sampled_at"] = latest.sampled_at
        with contextlib.suppress(Exception), trio.move_on_after(1.0):
            await self.redis.set(self.redis_key, orjson.dumps(doc),
                                 px=int(max(self.config.quota_stale_after, 60.0) * 4000))

    async def _follow(self) -> None:
        """A follower: the leader's sample and pacing decision from Redis into this host's
        rows (its polls are counted where they were made)."""
        raw = None
        with contextlib.suppress(Exception), trio.move_on_after(1.0):
            raw = await self.redis.get(self.redis_key)
        first = self.first
        if raw is None:
            first.check_stale(self.wall())
            return
        try:
            doc = orjson.loads(raw)
            sample = _sample_from(doc["sample"]) if "sample" in doc else None
            sampled_at = float(doc.get("sampled_at", 0.0))
            pace = [int(v) for v in doc.get("pace", ())]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        if sample is not None and (first.latest is None or sampled_at > first.latest.sampled_at):
            first.board.record("success", sampled_at, sample, count=False)
            first._got(sample, sampled_at)
            first.stale = False
        outcome = doc.get("outcome")
        if outcome in OUTCOMES and outcome != "success":
            first.board.record(outcome, float(doc.get("at", 0.0)), count=False)
        if len(pace) == 5:
            first.pace.copy(pace)
        first.check_stale(self.wall())


def _origin(url: str) -> str:
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _sample_doc(sample: zai.QuotaSample) -> dict[str, Any]:
    return {"level": sample.plan_tier,
            "windows": [[w.window, w.limit_type, w.used_fraction, w.reset_at]
                        for w in sample.windows]}


def _sample_from(doc: Any) -> zai.QuotaSample:
    windows = []
    for name, kind, used, reset in doc["windows"]:
        used = float(used)
        if name in WINDOWS and math.isfinite(used):
            windows.append(zai.QuotaWindow(str(name), str(kind), min(1.0, max(0.0, used)),
                                           None if reset is None else float(reset)))
    level = doc.get("level")
    return zai.QuotaSample(None if level is None else str(level), tuple(windows))
