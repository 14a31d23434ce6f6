"""The adaptive upstream rate as one state for the whole fleet (``limits_backend = "redis"``).

On one host the supervisor's :class:`~zaiproxy.limits.ratecontrol.RateController` sums its
workers' upstream answers and Z.AI throttles and decides the rate. With the fleet backend Z.AI
sees every pod's traffic on one account, so the evidence and the decision must be the fleet's:

- every pod's supervisor adds its workers' counts since its last tick to the fleet's totals in
  Redis (one ``rate_tick`` script call per second, which also renews or takes the leader
  lease and reads the published state);
- the pod holding the leader lease (``SET NX PX``, renewed each tick, taken over by another
  pod within ``LEADER_TTL_S`` of its death) runs :class:`~zaiproxy.limits.adaptive.AdaptiveRate`
  on the fleet's totals and publishes the result (``rate_publish``, written only while it
  still holds the lease) with its saved state, so the next leader continues from it;
- every pod copies the published state into its own ledger scalars, where ``/health``,
  ``/metrics`` and ``/admin/keys`` read it; admission reads the rate in Redis itself (the
  admit script's adaptive op), so every pod admits against the same GCRA;
- ``POST /admin/reset-rate-limit`` on any pod resets the fleet's rate at once (the tick sets
  the published rate to 0 and bumps a reset generation the leader acts on).

It runs in a thread of the supervisor with its own trio loop and Redis client (the supervisor's
loop is synchronous and must never wait on the network). While Redis is away the last published
state stays in the scalars and each worker's ``limits_fail`` policy applies; the counts of the
ticks that failed are sent with the next one that works.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from zaiproxy.core import logs
from zaiproxy.limits.adaptive import AdaptiveRate, Tick, state_document
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
    upstream_key_id,
)
from zaiproxy.limits.fleet import SCRIPT, FleetKeys, make_client
from zaiproxy.limits.loop_thread import LoopThread
from zaiproxy.limits.ratecontrol import TICK_S, RateController, settings_from

if TYPE_CHECKING:
    from zaiproxy.core.config import Config
    from zaiproxy.limits.segment import Segment
    from zaiproxy.limits.zai_quota import QuotaPoller

LEADER_TTL_S: Final = 5.0


class FleetRate(LoopThread):
    """The supervisor's side of the fleet's adaptive rate (see the module docstring)."""

    thread_name = "fleet-rate"

    def __init__(self, segment: Segment, config: Config, *, client: Any = None,
                 wall: Callable[[], float] = time.time,
                 quota: QuotaPoller | None = None) -> None:
        super().__init__()
        self.segment = segment
        self.config = config
        self.wall = wall
        self.log = logs.get_logger()
        self.key = upstream_key_id(config.api_key)
        self.keys = FleetKeys(config.redis_key_prefix, self.key)
        self.client = client if client is not None else make_client(config)
        self.pod = f"{socket.gethostname()[:32]}:{os.getpid()}:{os.urandom(3).hex()}"
        # The host's bookkeeping as on one host: the activity rows' sums, publishing a rate
        # into the scalars, the reset generation (nothing saved to a file: Redis keeps it).
        # With quota_pacing the leader also paces on the fleet's answers (limits/zai_quota.py);
        # followers get the gate from the quota poller's copy of the leader's decision.
        self.local = RateController(segment, config, None, wall=wall, quota=quota)
        self.leader = False
        self.fleet_reset = -1  # the fleet's reset generation the leader has acted on
        self.baseline: tuple[int, ...] | None = None  # the fleet totals at the leader's last tick
        self.unsent = [0, 0, 0, 0, 0]  # counts of ticks Redis did not take, sent with the next
        self.down = False

    @property
    def rate(self) -> AdaptiveRate:
        return self.local.upstream.rate

    # ---- the thread ----------------------------------------------------------------------

    async def run_loop(self, started: threading.Event) -> None:
        script = self.client.register_script(SCRIPT)
        async with self.client:
            started.set()
            while not self.stopping:
                await self.pause(TICK_S)
                await self.tick(script, time.monotonic())

    # ---- one tick ------------------------------------------------------------------------

    async def tick(self, script: Any, now: float) -> None:
        local = self.local
        sums = local._sums()
        delta = [max(0, new - old) for new, old in zip(sums, local.upstream.sums, strict=True)]
        local.upstream.sums = sums
        self.unsent = [a + b for a, b in zip(self.unsent, delta, strict=True)]
        generation = self.segment.scalar_get(SC_ADAPTIVE_RESET)
        reset = generation != local.reset_generation
        keys = [self.keys.activity, self.keys.leader, self.keys.adaptive_state]
        try:
            with trio.fail_after(max(1.0, self.config.redis_command_timeout * 4)):
                out = await script(keys=keys, args=[
                    "rate_tick", "", self.pod, int(LEADER_TTL_S * 1000), int(reset),
                    *self.unsent])
        except Exception as exc:
            if not self.down:
                self.down = True
                self.log.error("fleet_rate_unavailable", error=type(exc).__name__)
            return
        if self.down:
            self.down = False
            self.log.info("fleet_rate_recovered")
        self.unsent = [0, 0, 0, 0, 0]
        if reset:
            local.reset_generation = generation
        leader = bool(int(out[0]))
        totals = tuple(int(v) for v in out[1:6])
        state = [int(v) for v in out[6:14]]
        saved = out[14]
        wall = self.wall()
        if leader and not self.leader:
            self._take_over(saved, wall, totals, state[0])
        self.leader = leader
        if not leader:
            self.baseline = None
            self._copy(state)
            return
        assert self.baseline is not None
        changed = False
        if state[0] != self.fleet_reset:
            self.fleet_reset = state[0]
            self.rate.reset()
            self.log.warning("adaptive_rate_reset", rate_rps=self.rate.rate, scope="fleet")
            changed = True
        changed = local.pace(wall, totals[0]) or changed
        before, ceiling_before = self.rate.rate, self.rate.ceiling
        step = Tick(*(max(0, t - b) for t, b in zip(totals, self.baseline, strict=True)))
        self.baseline = totals
        if self.rate.on_tick(now, step) or changed:
            rate = self.rate
            if rate.rate != before or rate.ceiling != ceiling_before:
                log = self.log.warning if rate.rate < before else self.log.info
                log("adaptive_rate_changed", from_rps=round(before, 3),
                    to_rps=round(rate.rate, 3), limiting=rate.limiting, ceiling_rps=rate.ceiling,
                    reason=rate.reason, throttled=step.throttled,
                    throttled_requests=step.throttled_requests, answers=step.answers,
                    scope="fleet")
            local.publish(now, wall)
            await self._publish(script, now, wall)

    def _take_over(self, saved: Any, wall: float, totals: tuple[int, ...], reset: int) -> None:
        """This pod became the leader: continue from the published state."""
        raw = saved if isinstance(saved, bytes) else str(saved).encode()
        settings = settings_from(self.config)
        rate, why = (AdaptiveRate.from_document(raw, settings, wall, self.key) if raw
                     else (AdaptiveRate(settings), "nothing published yet"))
        self.local.upstream.rate = rate
        self.baseline = totals
        self.fleet_reset = reset
        self.log.info("fleet_rate_leader", pod=self.pod, restored=why)

    async def _publish(self, script: Any, now: float, wall: float) -> None:
        rate = self.rate
        seg = self.segment
        doc = state_document({self.key: rate.saved(now, wall)}, wall)
        with contextlib.suppress(Exception), trio.move_on_after(1.0):
            await script(keys=[self.keys.activity, self.keys.leader, self.keys.adaptive_state],
                         args=["rate_publish", "", self.pod,
                               seg.scalar_get(SC_ADAPTIVE_MRPS),
                               seg.scalar_get(SC_ADAPTIVE_CEILING_MRPS),
                               seg.scalar_get(SC_ADJUST_UP), seg.scalar_get(SC_ADJUST_DOWN),
                               seg.scalar_get(SC_ADAPTIVE_THROTTLED_AT_MS),
                               seg.scalar_get(SC_ADAPTIVE_REASON),
                               seg.scalar_get(SC_ADAPTIVE_EPOCH), doc])

    def _copy(self, state: list[int]) -> None:
        """A follower: the leader's published state into this host's scalars."""
        _reset, mrps, ceiling, up, down, at_ms, reason, epoch = state
        seg = self.segment
        seg.scalar_set(SC_ADAPTIVE_MRPS, mrps)
        seg.scalar_set(SC_ADAPTIVE_CEILING_MRPS, ceiling)
        seg.scalar_set(SC_ADJUST_UP, up)
        seg.scalar_set(SC_ADJUST_DOWN, down)
        seg.scalar_set(SC_ADAPTIVE_THROTTLED_AT_MS, at_ms)
        seg.scalar_set(SC_ADAPTIVE_REASON, reason if 0 <= reason < len(ADAPTIVE_REASONS) else 0)
        seg.scalar_set(SC_ADAPTIVE_EPOCH, epoch)
