"""Runs the adaptive upstream rate for all workers (in the supervisor).

Workers count their upstream answers and the Z.AI account throttles among them
(1302, 1303, a 429 without a code: ``zai.feeds_adaptive``), by class and as
distinct requests, in their own ledger row (one cache line each). About once a
second the supervisor sums them, lets :class:`~zaiproxy.limits.adaptive.AdaptiveRate`
decide, and publishes the rate in a ledger scalar that every worker's admission
reads. One decider for the whole host: the original proxy learned per process,
so N workers sent N times the rate Z.AI tolerated.

Scope: the rate belongs to the upstream key (Z.AI's 1302/1303 limits are per
account). There is one upstream key per proxy today (``ZAI_API_KEY``), so there
is one :class:`KeyRate` and one set of published scalars; the state file is
already keyed by a digest of the key (never the key), so a proxy started with
another key does not inherit a cap learned for the old one, and a key pool only
needs a row of scalars per key.

The learned state is saved (atomically) whenever it changes and on exit, and
loaded at start only while its last evidence is younger than the recovery
horizon (``adaptive_forget_after``): a restart does not relearn a live limit
with a burst of 429s, and a stale file never caps a fresh start.
``POST /admin/reset-rate-limit`` bumps a generation scalar; the next tick resets
the rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zaiproxy.core import logs
from zaiproxy.limits.adaptive import AdaptiveRate, AdaptiveSettings, Tick, save_state
from zaiproxy.limits.cells import (
    ADAPTIVE_REASONS,
    SC_ADAPTIVE_CEILING_MRPS,
    SC_ADAPTIVE_EPOCH,
    SC_ADAPTIVE_MRPS,
    SC_ADAPTIVE_REASON,
    SC_ADAPTIVE_RESET,
    SC_ADAPTIVE_THROTTLED_AT_MS,
    SC_ADJUST_DOWN,
    SC_ADJUST_UP,
    W_THROTTLED_CONCURRENCY,
    W_THROTTLED_FREQUENCY,
    W_THROTTLED_REQUESTS,
    W_THROTTLED_UNKNOWN,
    W_UPSTREAM_REQUESTS,
    activity_key,
    upstream_key_id,
)
from zaiproxy.limits.segment import Segment
from zaiproxy.limits.zai_quota import PaceBoard, PaceSettings, QuotaPacer, QuotaPoller

if TYPE_CHECKING:
    from zaiproxy.core.config import Config

TICK_S = 1.0
# The activity-row words summed into a Tick, in Tick's field order.
_WORDS = (W_UPSTREAM_REQUESTS, W_THROTTLED_CONCURRENCY, W_THROTTLED_FREQUENCY,
          W_THROTTLED_UNKNOWN, W_THROTTLED_REQUESTS)


def settings_from(config: Config) -> AdaptiveSettings:
    return AdaptiveSettings(
        initial_rps=config.adaptive_max_rps, min_rps=config.adaptive_min_rps,
        max_rps=config.adaptive_max_rps, forget_after_s=config.adaptive_forget_after,
        state_max_age_s=config.state_max_age,
    )


@dataclass(eq=False)
class KeyRate:
    """One upstream key's rate and the activity-row sums last seen for it."""

    key: str
    rate: AdaptiveRate
    sums: tuple[int, ...]


class RateController:
    def __init__(self, ledger: Segment, config: Config, state_file: str | None, *,
                 wall: Any = time.time, quota: QuotaPoller | None = None) -> None:
        """``state_file`` None: nothing is loaded or saved here (the fleet's rate lives in
        Redis: limits/fleet_rate.py uses this controller for the host's bookkeeping).
        ``quota``: the Z.AI quota poller whose samples pace admission (``quota_pacing``)."""
        self.ledger = ledger
        self.adaptive_on = config.adaptive_rate
        self.max_rps = config.adaptive_max_rps
        self.quota = quota
        self.pacer = (QuotaPacer(PaceSettings.of(config))
                      if config.quota_pacing and quota is not None else None)
        self.pace_board = PaceBoard(ledger) if self.pacer is not None else None
        self.pace_rate: float | None = None
        self.pace_closed: tuple[float, str | None] | None = None
        self.seen_sample = 0
        self.state_file = state_file
        self.wall = wall
        self.log = logs.get_logger()
        key = upstream_key_id(config.api_key)
        if state_file is None:
            rate = AdaptiveRate(settings_from(config))
        else:
            rate, reason = AdaptiveRate.load(state_file, settings_from(config), wall(), key)
            self.log.info("adaptive_rate_loaded", state_file=state_file, reason=reason)
        self.rows = [ledger.row(activity_key(i)) for i in range(config.workers)]
        self.upstream = KeyRate(key, rate, self._sums())
        self.reset_generation = ledger.scalar_get(SC_ADAPTIVE_RESET)
        self.last_tick: float | None = None  # the supervisor's monotonic clock
        self.last_wall = wall()  # the wall clock at the last tick (or at start)
        # Before the first tick only a restored evidence age is known: `now` is not read.
        self.publish(0.0, self.last_wall)

    @property
    def rate(self) -> AdaptiveRate:
        """The rate of the (one) upstream key."""
        return self.upstream.rate

    def _sums(self) -> tuple[int, ...]:
        get = self.ledger.counter_get
        return tuple(sum(get(r, word) for r in self.rows) for word in _WORDS)

    def publish(self, now: float, wall: float) -> None:
        """Write the state where workers (admission) and /health, /metrics, /admin/keys read it.

        ``SC_ADAPTIVE_MRPS`` 0 = not limiting (nothing learned, at max)."""
        rate = self.rate
        ledger = self.ledger
        ledger.scalar_set(SC_ADAPTIVE_MRPS, self.effective_mrps())
        ceiling = rate.ceiling
        ledger.scalar_set(SC_ADAPTIVE_CEILING_MRPS, 0 if ceiling is None else round(ceiling * 1000))
        adjustments = rate.adjustments
        ledger.scalar_set(SC_ADJUST_UP, adjustments.get("up", 0))
        ledger.scalar_set(SC_ADJUST_DOWN, adjustments.get("down", 0))
        age = rate.evidence_age(now)
        ledger.scalar_set(SC_ADAPTIVE_THROTTLED_AT_MS,
                          0 if age is None else round((wall - age) * 1000))
        ledger.scalar_set(SC_ADAPTIVE_REASON, ADAPTIVE_REASONS.index(rate.reason))
        # Last: a worker that sees the new epoch counts its requests again against it.
        ledger.scalar_set(SC_ADAPTIVE_EPOCH, rate.evidence_count)

    def effective_mrps(self) -> int:
        """What admission's rate op enforces: min(the adaptive rate while it limits, the
        quota's paced rate capped at the configured maximum); 0 = no limit."""
        rate = self.rate
        adaptive = (max(1, round(rate.rate * 1000))
                    if self.adaptive_on and rate.limiting else 0)
        if self.pace_rate is None:
            return adaptive
        paced = max(1, round(min(self.pace_rate, self.max_rps) * 1000))
        return paced if adaptive == 0 else min(adaptive, paced)

    def pace(self, wall: float, answers: int) -> bool:
        """One pacing decision from the newest quota sample (``answers``: upstream answers so
        far, this host's or the fleet's); True when the paced rate changed."""
        if self.pacer is None or self.quota is None or self.pace_board is None:
            return False
        latest = self.quota.latest  # written by the poller's thread: one reference read
        if latest is not None and latest.sequence != self.seen_sample:
            self.seen_sample = latest.sequence
            self.pacer.on_sample(latest.sample, latest.sampled_at, answers)
        decision = self.pacer.decide(wall, answers)
        self.pace_board.write(decision, self.pacer.cost)
        closed = ((decision.closed_until, decision.window)
                  if decision.closed_until is not None else None)
        if closed != self.pace_closed:
            if closed is not None:
                self.log.warning("zai_quota_reserve_reached", window=closed[1],
                                 reopens_at=round(closed[0], 3),
                                 reserve=self.pacer.settings.reserve)
            else:
                self.log.info("zai_quota_reserve_released")
            self.pace_closed = closed
        old, self.pace_rate = self.pace_rate, decision.rate_rps
        if (old is None) != (decision.rate_rps is None) or (
                old is not None and decision.rate_rps is not None
                and abs(decision.rate_rps - old) > 0.1 * old):
            self.log.info("zai_quota_paced", rate_rps=None if decision.rate_rps is None
                          else round(decision.rate_rps, 4), window=decision.window,
                          cost_per_request=self.pacer.cost)
        return old != decision.rate_rps

    def tick(self, now: float) -> None:
        if self.last_tick is not None and now - self.last_tick < TICK_S:
            return
        self.last_tick = now
        self.last_wall = wall = self.wall()
        generation = self.ledger.scalar_get(SC_ADAPTIVE_RESET)
        if generation != self.reset_generation:
            self.reset_generation = generation
            self.rate.reset()
            self.log.warning("adaptive_rate_reset", rate_rps=self.rate.rate)
            self.publish(now, wall)
            self.save(now, wall)
        upstream = self.upstream
        sums = self._sums()
        # Rows outlive workers and only grow; max(0, ...) keeps a bug from making a negative.
        delta = [max(0, new - old) for new, old in zip(sums, upstream.sums, strict=True)]
        upstream.sums = sums
        paced = self.pace(wall, sums[0])
        before, ceiling_before = self.rate.rate, self.rate.ceiling
        if self.rate.on_tick(now, Tick(*delta)):
            rate = self.rate
            if rate.rate != before or rate.ceiling != ceiling_before:
                log = self.log.warning if rate.rate < before else self.log.info
                log("adaptive_rate_changed", from_rps=round(before, 3),
                    to_rps=round(rate.rate, 3), limiting=rate.limiting,
                    ceiling_rps=rate.ceiling, reason=rate.reason,
                    throttled=delta[1] + delta[2] + delta[3],
                    throttled_requests=delta[4], answers=delta[0])
            self.publish(now, wall)
            self.save(now, wall)
        elif paced:  # the quota's rate moved: nothing of the adaptive state to save
            self.publish(now, wall)

    def save(self, now: float | None = None, wall: float | None = None) -> None:
        """Persist the state: on change, and on exit (no arguments: as of the last tick)."""
        if self.state_file is None:
            return
        if now is None or wall is None:
            now = self.last_tick if self.last_tick is not None else 0.0
            wall = self.last_wall
        try:
            save_state(self.state_file, {self.upstream.key: self.rate.saved(now, wall)}, wall)
        except OSError as exc:
            # Losing the state costs a re-learn after a restart; never worth stopping for.
            self.log.error("adaptive_state_save_failed", state_file=self.state_file,
                           error=exc.strerror or str(exc))
