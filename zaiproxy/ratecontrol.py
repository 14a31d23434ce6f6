"""Runs the adaptive upstream rate for all workers (in the supervisor).

Workers count their upstream answers and the Z.AI 429s that feed the
adaptive rate (frequency and unknown classes) in their own ledger row (one
cache line each). About once a second the supervisor sums them, lets
:class:`~zaiproxy.adaptive.AdaptiveRate` decide, and publishes the rate in a
ledger scalar that every worker's admission reads. One decider for the whole
host: the original proxy learned per process, so N workers sent N times the
rate Z.AI tolerated.

The learned state is saved (atomically) whenever it changes and on exit, and
loaded at start when younger than ``state_max_age``: a restart does not
relearn the limit with a burst of 429s. ``POST /admin/reset-rate-limit`` bumps
a generation scalar; the next tick resets the rate.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from zaiproxy import logs
from zaiproxy.adaptive import AdaptiveRate, AdaptiveSettings
from zaiproxy.admission import (
    SC_ADAPTIVE_CEILING_MRPS,
    SC_ADAPTIVE_MRPS,
    SC_ADAPTIVE_RESET,
    SC_ADJUST_DOWN,
    SC_ADJUST_UP,
    W_UPSTREAM_REQUESTS,
    W_UPSTREAM_THROTTLED,
)

if TYPE_CHECKING:
    from zaiproxy.config import Config

TICK_S = 1.0


def activity_key(worker: int) -> bytes:
    return b"activity\0worker\0%d" % worker


class RateController:
    def __init__(self, ledger: Any, config: Config, state_file: str, *,
                 wall: Any = time.time) -> None:
        self.ledger = ledger
        self.state_file = state_file
        self.wall = wall
        self.log = logs.get_logger()
        settings = AdaptiveSettings(
            initial_rps=config.adaptive_max_rps, min_rps=config.adaptive_min_rps,
            max_rps=config.adaptive_max_rps, state_max_age_s=config.state_max_age,
        )
        self.rate, reason = AdaptiveRate.load(state_file, settings, wall())
        self.log.info("adaptive_rate_loaded", state_file=state_file, reason=reason)
        self.rows = [ledger.row(activity_key(i)) for i in range(config.workers)]
        self.requests, self.throttled = self._sums()
        self.reset_generation = ledger.scalar_get(SC_ADAPTIVE_RESET)
        self.last_tick: float | None = None
        self.publish()

    def _sums(self) -> tuple[int, int]:
        get = self.ledger.counter_get
        return (sum(get(r, W_UPSTREAM_REQUESTS) for r in self.rows),
                sum(get(r, W_UPSTREAM_THROTTLED) for r in self.rows))

    def publish(self) -> None:
        """Write the rate where workers read it (0 = not limiting: nothing learned, at max)."""
        rate = self.rate
        s = rate.settings
        unlimited = rate.ceiling is None and rate.rate >= s.max_rps
        ledger = self.ledger
        ledger.scalar_set(SC_ADAPTIVE_MRPS, 0 if unlimited else max(1, round(rate.rate * 1000)))
        ceiling = rate.ceiling
        ledger.scalar_set(SC_ADAPTIVE_CEILING_MRPS, 0 if ceiling is None else round(ceiling * 1000))
        adjustments = rate.adjustments
        ledger.scalar_set(SC_ADJUST_UP, adjustments.get("up", 0))
        ledger.scalar_set(SC_ADJUST_DOWN, adjustments.get("down", 0))

    def tick(self, now: float) -> None:
        if self.last_tick is not None and now - self.last_tick < TICK_S:
            return
        self.last_tick = now
        generation = self.ledger.scalar_get(SC_ADAPTIVE_RESET)
        if generation != self.reset_generation:
            self.reset_generation = generation
            self.rate.reset()
            self.log.warning("adaptive_rate_reset", rate_rps=self.rate.rate)
            self.publish()
            self.save()
        requests, throttled = self._sums()
        d_requests, d_throttled = requests - self.requests, throttled - self.throttled
        self.requests, self.throttled = requests, throttled
        before = self.rate.rate
        if self.rate.on_tick(now, d_requests, d_throttled):
            self.log.warning("adaptive_rate_changed", from_rps=round(before, 3),
                             to_rps=round(self.rate.rate, 3), throttled=d_throttled,
                             ceiling_rps=self.rate.ceiling)
            self.publish()
            self.save()

    def save(self) -> None:
        try:
            self.rate.save(self.state_file, self.wall())
        except OSError as exc:
            # Losing the state costs a re-learn after a restart; never worth stopping for.
            self.log.error("adaptive_state_save_failed", state_file=self.state_file,
                           error=exc.strerror or str(exc))
