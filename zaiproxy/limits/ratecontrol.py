"""Runs the adaptive upstream rate for all workers (in the supervisor).

Workers count their upstream answers and the Z.AI account throttles among them
(1302, 1303, a 429 without a code: ``zai.feeds_adaptive``), by class and as
distinct requests, in their own ledger row (one cache line each). About once a
second the supervisor sums them, lets :class:`~zaiproxy.limits.adaptive.AdaptiveRate`
decide, and publishes the rate in a ledger scalar that every worker's admission
reads. One decider for the whole host: the original proxy learned per process,
so N workers sent N times the rate Z.AI tolerated.

Scope: the rate belongs to the upstream key (Z.AI's 1302/1303 limits are per
account): one :class:`KeyRate` per key of the pool (limits/upstream_keys.py), each
summed from its own activity rows and published in its own row (key 0's also in the
SC_* scalars the reports read); the state file is keyed by a digest of each key
(never the key), so a proxy started with another key does not inherit a cap learned
for the old one. With ``quota_pacing`` each key is also paced on its own quota.

The learned state is saved (atomically) whenever it changes and on exit, and
loaded at start only while its last evidence is younger than the recovery
horizon (``adaptive_forget_after``): a restart does not relearn a live limit
with a burst of 429s, and a stale file never caps a fresh start.
``POST /admin/reset-rate-limit`` bumps a generation scalar; the next tick resets
the rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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
    W_KEY_ADJUST_DOWN,
    W_KEY_ADJUST_UP,
    W_KEY_CEILING_MRPS,
    W_KEY_MRPS,
    W_KEY_REASON,
    W_KEY_THROTTLED_AT_MS,
    W_THROTTLED_CONCURRENCY,
    W_THROTTLED_FREQUENCY,
    W_THROTTLED_REQUESTS,
    W_THROTTLED_UNKNOWN,
    W_UPSTREAM_REQUESTS,
    activity_key,
    upstream_key_id,
    upstream_state_key,
)
from zaiproxy.limits.segment import Segment
from zaiproxy.limits.upstream_keys import DEFAULT_ALIAS, PoolSpec, single
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
    """One upstream key's rate, the activity-row sums last seen for it, and its pacing."""

    key: str  # the key's digest (the state file's name for it)
    rate: AdaptiveRate
    sums: tuple[int, ...]
    alias: str = DEFAULT_ALIAS
    index: int = 0
    rows: list[int] = field(default_factory=list)  # the workers' activity rows of this key
    state_row: int = 0  # where its published state lives (key 0: also the SC_* scalars)
    pacer: QuotaPacer | None = None
    pace_board: PaceBoard | None = None
    pace_rate: float | None = None
    pace_closed: tuple[float, str | None] | None = None
    seen_sample: int = 0


class RateController:
    def __init__(self, ledger: Segment, config: Config, state_file: str | None, *,
                 wall: Any = time.time, quota: QuotaPoller | None = None,
                 pool: PoolSpec | None = None) -> None:
        """``state_file`` None: nothing is loaded or saved here (the fleet's rate lives in
        Redis: limits/fleet_rate.py uses this controller for the host's bookkeeping).
        ``quota``: the Z.AI quota poller whose samples pace admission (``quota_pacing``);
        ``pool``: the upstream keys, each with its own rate (default: ``api_key`` alone)."""
        self.ledger = ledger
        self.adaptive_on = config.adaptive_rate
        self.max_rps = config.adaptive_max_rps
        self.quota = quota
        self.state_file = state_file
        self.wall = wall
        self.log = logs.get_logger()
        spec = pool if pool is not None else single(config)
        self.keys: list[KeyRate] = []
        for key in spec.keys:
            key_id = upstream_key_id(key.key)
            if state_file is None:
                rate = AdaptiveRate(settings_from(config))
            else:
                rate, reason = AdaptiveRate.load(state_file, settings_from(config), wall(), key_id)
                self.log.info("adaptive_rate_loaded", state_file=state_file, reason=reason,
                              upstream=key.alias)
            pacer = (QuotaPacer(PaceSettings.of(config))
                     if config.quota_pacing and quota is not None else None)
            k = KeyRate(key_id, rate, (), key.alias, key.index,
                        [ledger.row(activity_key(w, key.index)) for w in range(config.workers)],
                        ledger.row(upstream_state_key(key.index)), pacer,
                        PaceBoard(ledger, key.alias) if pacer is not None else None)
            k.sums = self._sums(k)
            self.keys.append(k)
        self.upstream = self.keys[0]
        self.reset_generation = ledger.scalar_get(SC_ADAPTIVE_RESET)
        self.last_tick: float | None = None  # the supervisor's monotonic clock
        self.last_wall = wall()  # the wall clock at the last tick (or at start)
        # Before the first tick only a restored evidence age is known: `now` is not read.
        self.publish(0.0, self.last_wall)

    @property
    def rate(self) -> AdaptiveRate:
        """The rate of the first upstream key (the only one without a pool)."""
        return self.upstream.rate

    @property
    def pace_rate(self) -> float | None:
        return self.upstream.pace_rate

    def _sums(self, key: KeyRate | None = None) -> tuple[int, ...]:
        rows = (key or self.upstream).rows
        get = self.ledger.counter_get
        return tuple(sum(get(r, word) for r in rows) for word in _WORDS)

    def publish(self, now: float, wall: float) -> None:
        """Write every key's state where workers (admission) and /health, /metrics,
        /admin/keys read it: its row, and key 0's also in the SC_* scalars.

        The rate 0 = not limiting (nothing learned, at max)."""
        ledger = self.ledger
        for key in self.keys:
            rate = key.rate
            ceiling = rate.ceiling
            adjustments = rate.adjustments
            age = rate.evidence_age(now)
            values = (self.effective_mrps(key),
                      0 if ceiling is None else round(ceiling * 1000),
                      adjustments.get("up", 0), adjustments.get("down", 0),
                      0 if age is None else round((wall - age) * 1000),
                      ADAPTIVE_REASONS.index(rate.reason))
            for word, value in zip((W_KEY_MRPS, W_KEY_CEILING_MRPS, W_KEY_ADJUST_UP,
                                    W_KEY_ADJUST_DOWN, W_KEY_THROTTLED_AT_MS, W_KEY_REASON),
                                   values, strict=True):
                ledger.counter_set(key.state_row, word, value)
            if key.index != 0:
                continue
            for scalar, value in zip((SC_ADAPTIVE_MRPS, SC_ADAPTIVE_CEILING_MRPS, SC_ADJUST_UP,
                                      SC_ADJUST_DOWN, SC_ADAPTIVE_THROTTLED_AT_MS,
                                      SC_ADAPTIVE_REASON), values, strict=True):
                ledger.scalar_set(scalar, value)
            # Last: a worker that sees the new epoch counts its requests again against it.
            ledger.scalar_set(SC_ADAPTIVE_EPOCH, rate.evidence_count)

    def effective_mrps(self, key: KeyRate | None = None) -> int:
        """What admission's rate op enforces for a key: min(the adaptive rate while it
        limits, the quota's paced rate capped at the configured maximum); 0 = no limit."""
        key = key or self.upstream
        rate = key.rate
        adaptive = (max(1, round(rate.rate * 1000))
                    if self.adaptive_on and rate.limiting else 0)
        if key.pace_rate is None:
            return adaptive
        paced = max(1, round(min(key.pace_rate, self.max_rps) * 1000))
        return paced if adaptive == 0 else min(adaptive, paced)

    def pace(self, wall: float, answers: int, key: KeyRate | None = None) -> bool:
        """One pacing decision for a key from its newest quota sample (``answers``: upstream
        answers of that key so far, this host's or the fleet's); True when the paced rate
        changed."""
        key = key or self.upstream
        if key.pacer is None or self.quota is None or key.pace_board is None:
            return False
        pacer = key.pacer
        latest = self.quota.latest_of(key.alias)  # the poller's thread writes it: one read
        if latest is not None and latest.sequence != key.seen_sample:
            key.seen_sample = latest.sequence
            pacer.on_sample(latest.sample, latest.sampled_at, answers)
        decision = pacer.decide(wall, answers)
        key.pace_board.write(decision, pacer.cost)
        closed = ((decision.closed_until, decision.window)
                  if decision.closed_until is not None else None)
        if closed != key.pace_closed:
            if closed is not None:
                self.log.warning("zai_quota_reserve_reached", upstream=key.alias,
                                 window=closed[1], reopens_at=round(closed[0], 3),
                                 reserve=pacer.settings.reserve)
            else:
                self.log.info("zai_quota_reserve_released", upstream=key.alias)
            key.pace_closed = closed
        old, key.pace_rate = key.pace_rate, decision.rate_rps
        if (old is None) != (decision.rate_rps is None) or (
                old is not None and decision.rate_rps is not None
                and abs(decision.rate_rps - old) > 0.1 * old):
            self.log.info("zai_quota_paced", upstream=key.alias,
                          rate_rps=None if decision.rate_rps is None
                          else round(decision.rate_rps, 4), window=decision.window,
                          cost_per_request=pacer.cost)
        return old != decision.rate_rps

    def tick(self, now: float) -> None:
        if self.last_tick is not None and now - self.last_tick < TICK_S:
            return
        self.last_tick = now
        self.last_wall = wall = self.wall()
        generation = self.ledger.scalar_get(SC_ADAPTIVE_RESET)
        if generation != self.reset_generation:
            self.reset_generation = generation
            for key in self.keys:
                key.rate.reset()
            self.log.warning("adaptive_rate_reset", rate_rps=self.rate.rate)
            self.publish(now, wall)
            self.save(now, wall)
        changed = paced = False
        for key in self.keys:
            sums = self._sums(key)
            # Rows outlive workers and only grow; max(0, ...) keeps a bug from going negative.
            delta = [max(0, new - old) for new, old in zip(sums, key.sums, strict=True)]
            key.sums = sums
            paced = self.pace(wall, sums[0], key) or paced
            rate = key.rate
            before, ceiling_before = rate.rate, rate.ceiling
            if rate.on_tick(now, Tick(*delta)):
                changed = True
                if rate.rate != before or rate.ceiling != ceiling_before:
                    log = self.log.warning if rate.rate < before else self.log.info
                    log("adaptive_rate_changed", from_rps=round(before, 3),
                        to_rps=round(rate.rate, 3), limiting=rate.limiting,
                        ceiling_rps=rate.ceiling, reason=rate.reason,
                        throttled=delta[1] + delta[2] + delta[3],
                        throttled_requests=delta[4], answers=delta[0],
                        **({"upstream": key.alias} if len(self.keys) > 1 else {}))
        if changed:
            self.publish(now, wall)
            self.save(now, wall)
        elif paced:  # a quota's rate moved: nothing of the adaptive state to save
            self.publish(now, wall)

    def save(self, now: float | None = None, wall: float | None = None) -> None:
        """Persist the state: on change, and on exit (no arguments: as of the last tick)."""
        if self.state_file is None:
            return
        if now is None or wall is None:
            now = self.last_tick if self.last_tick is not None else 0.0
            wall = self.last_wall
        try:
            save_state(self.state_file,
                       {key.key: key.rate.saved(now, wall) for key in self.keys}, wall)
        except OSError as exc:
            # Losing the state costs a re-learn after a restart; never worth stopping for.
            self.log.error("adaptive_state_save_failed", state_file=self.state_file,
                           error=exc.strerror or str(exc))
