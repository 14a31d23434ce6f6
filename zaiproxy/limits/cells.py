"""The segment's cell map: every scalar, row key and counter word the proxy uses, in one place.

The ledger (``_native/README.md`` has the byte layout) offers scalars, rows of 7 counter
words keyed by bytes, and rolling windows. Which cell means what is decided here; the
modules that read or write them import the names (workers, the supervisor's rate
controller, metrics, the admin API).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from zaiproxy.limits.segment import Segment

# ---- scalars (Segment.scalar_*); the supervisor owns the adaptive rate ------------------
SC_ADAPTIVE_MRPS: Final = 0  # current adaptive rate in milli-requests/s; 0 = no adaptive limit
SC_ADAPTIVE_RESET: Final = 1  # generation counter: bumped by POST /admin/reset-rate-limit
SC_ADAPTIVE_CEILING_MRPS: Final = 2  # learned ceiling (for /metrics and /health), 0 = none
SC_ADJUST_UP: Final = 3
SC_ADJUST_DOWN: Final = 4
SC_ADAPTIVE_THROTTLED_AT_MS: Final = 5  # wall time (unix ms) of the last throttle evidence, 0 = none
SC_ADAPTIVE_REASON: Final = 6  # what the last evidence was mostly (ADAPTIVE_REASONS index), 0 = none
SC_ADAPTIVE_EPOCH: Final = 7  # evidence events so far: a request's throttle counts once per epoch

# The fleet backend (limits/fleet.py) on this host: whether Redis is reachable, and counts.
SC_FLEET_STATE: Final = 8  # 0 = Redis answers (or backend shm), 1 = some worker cannot reach it
SC_FLEET_SINCE_MS: Final = 9  # wall time (unix ms) the current degraded spell began, 0 = none
SC_FLEET_SWITCHES: Final = 10  # times a worker lost Redis (switched to the fail policy)
SC_FLEET_ERRORS: Final = 11  # Redis calls that failed or timed out
SC_FLEET_LOCAL: Final = 12  # requests decided by the host's ledger (fail = "local")
SC_FLEET_OPEN: Final = 13  # requests admitted without limits (fail = "open")
SC_FLEET_CLOSED: Final = 14  # requests refused with 503 (fail = "closed")
SC_FLEET_DROPPED: Final = 15  # settles / reconcile charges dropped (the bounded queue was full)

# SC_ADAPTIVE_REASON values: the class of Z.AI 429 behind the last decrease.
ADAPTIVE_REASONS: Final = (None, "concurrency", "frequency", "unknown")

# ---- a worker's upstream-activity row (one row per worker: its own cache line) ----------
W_UPSTREAM_REQUESTS: Final = 1  # every upstream answer (each attempt of a request)
W_UPSTREAM_THROTTLED: Final = 2  # account-throttle answers (zai.feeds_adaptive): 1302, 1303, unknown
# Requests among them, each counted once per evidence epoch however many of its attempts were
# throttled: one request's retries are not independent evidence (adaptive.py, "Evidence").
W_THROTTLED_REQUESTS: Final = 3
W_THROTTLED_CONCURRENCY: Final = 4  # the account-throttle answers by class (a decrease's reason)
W_THROTTLED_FREQUENCY: Final = 5
W_THROTTLED_UNKNOWN: Final = 6
W_FLEET_DOWN: Final = 7  # 1 while this worker cannot reach Redis (limits/fleet.py)
THROTTLE_WORDS: Final = {"concurrency": W_THROTTLED_CONCURRENCY,
                         "frequency": W_THROTTLED_FREQUENCY, "unknown": W_THROTTLED_UNKNOWN}


def activity_key(worker: int, upstream: int = 0) -> bytes:
    """The row of one worker's upstream activity with one upstream key (the rate controller
    sums them per key); key 0's row keeps its name from before key pools."""
    if upstream == 0:
        return b"activity\0worker\0%d" % worker
    return b"activity\0worker\0%d\0upstream\0%d" % (worker, upstream)


# ---- limit rows and windows ---------------------------------------------------------------
ADAPTIVE_LIMIT_KEY: Final = b"limit\0adaptive"  # the GCRA row of the adaptive rate (key 0)


def adaptive_limit_key(upstream: int) -> bytes:
    """The GCRA row of one upstream key's adaptive rate."""
    return ADAPTIVE_LIMIT_KEY if upstream == 0 else ADAPTIVE_LIMIT_KEY + b"\0%d" % upstream


# ---- per upstream key (a pool of Z.AI keys: limits/upstream_pool.py) ----------------------
# The adaptive state the supervisor publishes per key (key 0's is also in the SC_ADAPTIVE_*
# scalars, where the reports written before key pools read it).
W_KEY_MRPS: Final = 1  # the effective rate (adaptive and quota pacing), 0 = no limit
W_KEY_CEILING_MRPS: Final = 2
W_KEY_ADJUST_UP: Final = 3
W_KEY_ADJUST_DOWN: Final = 4
W_KEY_THROTTLED_AT_MS: Final = 5
W_KEY_REASON: Final = 6
# A key at rest: Z.AI throttled it or its quota is spent (the request path sets it).
W_REST_UNTIL_MS: Final = 1  # unix ms the key may be used again, 0 = not resting
W_REST_REASON: Final = 2  # REST_REASONS index
W_RESTS: Final = 3  # times it was put to rest
W_SWITCHED_AWAY: Final = 4  # requests moved from it to another key
REST_REASONS: Final = (None, "throttled", "quota")


def upstream_state_key(upstream: int) -> bytes:
    """The row of one upstream key's published adaptive state."""
    return b"upstream\0adaptive\0%d" % upstream


def upstream_rest_key(upstream: int) -> bytes:
    """The row saying whether one upstream key rests, and why."""
    return b"upstream\0rest\0%d" % upstream


def limit_key(scope_id: bytes, name: str) -> bytes:
    """The row (or window) of one limit of one scope, e.g. ``limit\\0key\\0alice\\0concurrency``."""
    return b"limit\0" + scope_id + b"\0" + name.encode()


# ---- per client key totals (limits/key_usage.py: what each word holds) ---------------------
def key_usage_key(alias: str) -> bytes:
    """The row of one key's token totals (added when a request is settled with usage)."""
    return b"keyusage\0" + alias.encode()


def key_outcome_key(alias: str) -> bytes:
    """The row of one key's requests by outcome (added when any of its requests ends)."""
    return b"keyoutcome\0" + alias.encode()


# ---- when this segment began (the windows it holds cover nothing before) ------------------
STARTED_KEY: Final = b"meta\0started"  # word 1: unix ms when the segment was created


def mark_started(segment: Segment, wall_s: float) -> None:
    """Record when the segment was created (by its creator: the supervisor, or a private one)."""
    segment.counter_set(segment.row(STARTED_KEY), 1, int(wall_s * 1000))


def started_s(segment: Segment) -> float | None:
    """When the segment was created (unix s), None when its creator did not say."""
    row = segment.row_find(STARTED_KEY)
    ms = segment.counter_get(row, 1) if row >= 0 else 0
    return ms / 1000 if ms > 0 else None


def upstream_key_id(api_key: str | None) -> str:
    """The name of an upstream key in state files and Redis keys: a digest, never the key."""
    return "sha256:" + hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
