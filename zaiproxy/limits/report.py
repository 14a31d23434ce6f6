"""The limit state that ``GET /admin/keys`` reports: every limit read from the ledger at one instant.

One state object per limit, by kind (what a terminal UI needs for "used %, left %, resets in
2h 13m" without knowing the ledger's algorithms):

- a rate (GCRA: ``requests_per_minute``, ``tokens_per_minute``):
  ``{"limit", "remaining", "reset_s"}``; ``reset_s`` = until the row is fully reset;
- ``concurrency``: ``{"limit", "in_use", "remaining"}``;
- a rolling window (``requests_per_5h`` … ``tokens_per_week``):
  ``{"limit", "used", "remaining", "reset_s", "releases"}``; ``reset_s`` = until the oldest
  live bucket leaves the window, when ``used`` drops by ``releases`` (0.0 and 0 when nothing
  is live). A window is bucketed (60 buckets, ``_native/README.md``), so a 5 h window releases
  in 5-minute steps and a week in 2.8-hour steps: "resets in" is the next step, not the last.

Reads only, apart from the sweep of expired buckets that ``window_used`` always does (the
same sweep any admission would do). The proxy-wide and upstream-key limits come from the
plan of a caller without a client key: the ops every plan shares.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from zaiproxy.limits.admission import (
    KEY_SCOPES,
    SHARED_SCOPES,
    LimitOp,
    limit_state,
    report_name,
)
from zaiproxy.limits.cells import (
    ADAPTIVE_REASONS,
    SC_ADAPTIVE_CEILING_MRPS,
    SC_ADAPTIVE_MRPS,
    SC_ADAPTIVE_REASON,
    SC_ADAPTIVE_THROTTLED_AT_MS,
    SC_ADJUST_DOWN,
    SC_ADJUST_UP,
    SC_FLEET_SINCE_MS,
)
from zaiproxy.limits.fleet import degraded_workers, fleet_counters
from zaiproxy.limits.segment import Segment

if TYPE_CHECKING:
    from zaiproxy.core.config import Config
    from zaiproxy.limits.admission import Admitter

# The state objects live beside the ledger's algorithms (admission.py); re-exported here.
__all__ = ["KEY_SCOPES", "SHARED_SCOPES", "limit_state", "report_name"]


def limit_states(admitter: Admitter, ops: Iterable[LimitOp], now: int,
                 scopes: frozenset[str]) -> dict[str, dict[str, Any]]:
    """State objects of the ``ops`` in ``scopes``, by config name (the adaptive op excluded)."""
    return {report_name(op): limit_state(admitter, op, now) for op in ops
            if op.scope in scopes and not op.adaptive}


def global_states(admitter: Admitter, now: int) -> dict[str, dict[str, Any]]:
    """The proxy-wide and upstream-key limits: the ops of the plan without a client key."""
    return limit_states(admitter, admitter.plan(None, None).ops, now, SHARED_SCOPES)


def limited_by(states: dict[str, dict[str, Any]]) -> list[str]:
    """Names of the limits with nothing left right now (a request of cost 1 would wait)."""
    return [name for name, state in states.items() if state["remaining"] == 0]


def key_state(enabled: bool, limited: list[str]) -> str:
    """``disabled`` (refused whatever its limits say), ``limited`` or ``ok``."""
    if not enabled:
        return "disabled"
    return "limited" if limited else "ok"


def backend_state(config: Config, ledger: Segment) -> dict[str, Any]:
    """Where the limits live and whether that works now (``/health``, ``/admin/status``).

    ``backend``: ``shm`` (this host) or ``redis`` (the fleet). With Redis: ``state`` is ``ok``
    or ``degraded`` (some worker of this host cannot reach it and decides by ``fail``),
    ``degraded_workers``, ``since`` (unix s of the current spell, else None), and counters:
    ``switches`` (times a worker lost Redis), ``errors`` (failed calls), ``local`` /
    ``open`` / ``closed`` (requests decided by the fail policy), ``dropped`` (settles lost
    to the bounded queue)."""
    if config.limits_backend != "redis":
        return {"backend": "shm", "state": "ok"}
    degraded = degraded_workers(ledger, ledger.workers)
    since = ledger.scalar_get(SC_FLEET_SINCE_MS)
    return {
        "backend": "redis", "state": "degraded" if degraded else "ok", "fail": config.limits_fail,
        "local_share": config.limits_local_share, "degraded_workers": degraded,
        "since": since / 1000 if degraded and since else None,
        **fleet_counters(ledger),
    }


def adaptive_state(config: Config, ledger: Segment, now_wall: float | None = None) -> dict[str, Any]:
    """The adaptive upstream rate as the supervisor published it in the ledger's scalars.

    ``rate_rps`` is None while it does not limit (nothing learned yet, at the maximum, or
    after ``POST /admin/reset-rate-limit``), as in ``/health``; ``ceiling_rps`` is the
    observed send rate at which Z.AI throttled the account (None until the first evidence).
    ``throttled_at`` (unix seconds) and ``reason`` (``concurrency`` | ``frequency`` |
    ``unknown``) describe the last throttle evidence; ``free_in_s`` is the time left until
    every learned cap is forgotten at the latest (``forget_after_s`` after that evidence,
    traffic or not); all three None when nothing is learned.
    """
    now_wall = time.time() if now_wall is None else now_wall
    mrps = ledger.scalar_get(SC_ADAPTIVE_MRPS)
    ceiling = ledger.scalar_get(SC_ADAPTIVE_CEILING_MRPS)
    at_ms = ledger.scalar_get(SC_ADAPTIVE_THROTTLED_AT_MS)
    reason = ledger.scalar_get(SC_ADAPTIVE_REASON)
    throttled_at = at_ms / 1000 if at_ms > 0 else None
    free_in = (None if throttled_at is None
               else round(max(0.0, throttled_at + config.adaptive_forget_after - now_wall), 3))
    return {
        "enabled": config.adaptive_rate,
        "rate_rps": mrps / 1000 if mrps > 0 else None,
        "min_rps": config.adaptive_min_rps, "max_rps": config.adaptive_max_rps,
        "ceiling_rps": ceiling / 1000 if ceiling > 0 else None,
        "adjustments": {"up": ledger.scalar_get(SC_ADJUST_UP),
                        "down": ledger.scalar_get(SC_ADJUST_DOWN)},
        "throttled_at": throttled_at,
        "reason": ADAPTIVE_REASONS[reason] if 0 <= reason < len(ADAPTIVE_REASONS) else None,
        "forget_after_s": config.adaptive_forget_after,
        "free_in_s": free_in,
    }
