"""Admission: every limit that applies to a request, taken in ONE ledger step.

A :class:`Plan` lists the limits of one caller (global scope, the upstream
key, the client key when keys are configured, and the adaptive upstream
rate) as ledger operations, built once per key and reused: the hot path only
writes the request's token cost into a preallocated int64 buffer and makes a
single ``Ledger.admit`` call, which either takes every reservation or none.

After the response, :meth:`Admitter.settle` releases the concurrency lease
and reconciles the token reservation with what was really used (charging or
refunding the difference). It is called from a ``finally``: a cancelled or
failed request settles too.

Decisions here are pure bookkeeping over the ledger; the HTTP side (429
bodies, ``Retry-After``, the ``x-ratelimit-*`` headers) is in ``request/gate.py``
using the values computed here.
"""

from __future__ import annotations

import enum
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from zaiproxy.core.limitspec import FIVE_HOURS_NS, MINUTE_NS, WEEK_NS, Limits
from zaiproxy.core.record import Usage
from zaiproxy.limits.cells import (
    SC_ADAPTIVE_EPOCH,
    SC_ADAPTIVE_MRPS,
    THROTTLE_WORDS,
    W_KEY_MRPS,
    W_THROTTLED_REQUESTS,
    W_THROTTLED_UNKNOWN,
    W_UPSTREAM_REQUESTS,
    W_UPSTREAM_THROTTLED,
    activity_key,
    adaptive_limit_key,
    limit_key,
    started_s,
    upstream_state_key,
)
from zaiproxy.limits.key_usage import KeyUsage
from zaiproxy.limits.segment import LedgerImpl, Segment

SECOND_NS = 1_000_000_000

# The cells admission uses (the map of every cell is limits/cells.py; the SC_* names are
# imported here too because the rate state is read through the admission's plan).
class LimitKind(enum.Enum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    CONCURRENCY = "concurrency"
    QUOTA = "quota"


@dataclass(frozen=True, slots=True)
class LimitOp:
    """One limit of a plan: what it is (for errors and headers) and how the ledger applies it."""

    kind: int  # ledger KIND_*
    index: int  # ledger row or window row
    limit: int
    period_ns: int
    weighted: bool  # cost = the request's tokens (else 1)
    what: LimitKind
    scope: str  # "global" | "upstream" | "key"
    name: str  # the setting, e.g. "requests_per_minute"
    adaptive: bool = False
    key: str = ""  # the fleet backend's Redis key of this limit ("" in the ledger's plans)


@dataclass(eq=False)
class Plan:
    """The limits of one caller as a reusable ledger operation buffer."""

    ops: tuple[LimitOp, ...]
    buf: Any  # array('q') of len(ops) * OP_WORDS
    weighted: tuple[int, ...]  # positions of the token-weighted ops
    has_concurrency: bool
    adaptive: int | None  # position of the adaptive-rate op
    alias: str | None = None
    upstream: int = 0  # the upstream key (pool index) whose scope and adaptive rate it holds
    # The per-minute GCRA ops reported in x-ratelimit-* headers: (index, limit, period, weighted).
    reported: tuple[tuple[int, int, int, bool], ...] = ()
    backend: Any = None  # what a backend other than the ledger keeps per plan (limits/fleet.py)
    # The ledger rows of its concurrency ops, found on the first settle: settling walks
    # these, not every op of the plan (13 with every limit set), once per request.
    leases: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        names = ", ".join(f"{op.scope}.{op.name}={op.limit}" for op in self.ops)
        return f"<Plan alias={self.alias!r} [{names}]>"


@dataclass(slots=True)
class Admission:
    """Reservations held by one admitted request until it settles."""

    plan: Plan
    tokens: int  # reserved tokens (the weighted ops' cost)
    epochs: tuple[int, ...]  # per op: the window bucket epoch of a quota reservation
    settled: bool = False
    backend: Any = None  # what a backend other than the ledger holds (limits/fleet.py)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The first limit that refused; ``retry_ns`` is exact (>= 1), or -1 = can never pass."""

    op: LimitOp
    retry_ns: int
    cost: int

    @property
    def retry_after_s(self) -> int:
        """Whole seconds for ``Retry-After``: rounded up, at least 1."""
        if self.retry_ns <= 0:
            return 1
        return max(1, -(-self.retry_ns // SECOND_NS))


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """One configured rolling-window limit now: ``used`` of ``limit``."""

    scope: str  # "global" | "upstream"
    name: str  # as the config spells it (``report.report_name``)
    used: int
    limit: int

    @property
    def ratio(self) -> float:
        # Capped at 1 as /admin/keys caps ``remaining`` at 0: settling a request's real
        # tokens may charge a window past its limit, and either way nothing is left.
        return min(1.0, self.used / self.limit)


@dataclass(frozen=True, slots=True)
class RateState:
    """The tightest applicable limit of one kind, for the ``x-ratelimit-*`` headers."""

    limit: int
    remaining: int
    reset_ns: int


# Every limit a scope can set, in plan order: the one table both backends build from.
LIMIT_SPECS: tuple[tuple[str, LimitKind, int, bool, str], ...] = (
    # (Limits field, kind, period, weighted, algorithm)
    ("requests_per_minute", LimitKind.REQUESTS, MINUTE_NS, False, "gcra"),
    ("tokens_per_minute", LimitKind.TOKENS, MINUTE_NS, True, "gcra"),
    ("concurrency", LimitKind.CONCURRENCY, 0, False, "concurrency"),
    ("requests_per_5h", LimitKind.QUOTA, FIVE_HOURS_NS, False, "window"),
    ("tokens_per_5h", LimitKind.QUOTA, FIVE_HOURS_NS, True, "window"),
    ("requests_per_week", LimitKind.QUOTA, WEEK_NS, False, "window"),
    ("tokens_per_week", LimitKind.QUOTA, WEEK_NS, True, "window"),
)


def adaptive_gcra(mrps: int) -> tuple[int, int]:
    """(limit, period_ns) of a GCRA admitting ``mrps``/1000 requests per second.

    The burst is about one second of traffic (at least one request): a rate
    learned from upstream throttling is not spent in one burst.
    """
    limit = max(1, mrps // 1000)
    return limit, limit * 1000 * SECOND_NS // mrps


class Admitter:
    """One worker's view of the ledger: plans per caller, admit, settle."""

    def __init__(self, ledger: Segment, impl: LedgerImpl, *, worker: int, global_limits: Limits,
                 upstream_limits: Limits, upstream_id: bytes, adaptive: bool,
                 clock: Callable[[], int] = time.monotonic_ns,
                 more_upstreams: Sequence[tuple[bytes, Limits]] = ()) -> None:
        """``upstream_limits``/``upstream_id``: upstream key 0's scope; ``more_upstreams``:
        (scope id, limits) of the pool's other keys, 1.. (limits/upstream_keys.py)."""
        self.ledger = ledger
        self.impl = impl  # the ledger module (constants)
        self.worker = worker
        self.clock = clock
        self._global = global_limits
        self._upstreams: list[tuple[bytes, Limits]] = [(upstream_id, upstream_limits),
                                                        *more_upstreams]
        self._adaptive = adaptive
        self._plans: dict[object, Plan] = {}
        self._upstream_windows: dict[int, tuple[LimitOp, ...]] = {}
        self._adaptive_mrps = -1
        self.activity_rows = [ledger.row(activity_key(worker, i))
                              for i in range(len(self._upstreams))]
        self.activity_row = self.activity_rows[0]
        # Keys 1..: the effective rate the supervisor publishes per key (key 0: the scalar).
        self._mrps_rows = [0] + [ledger.row(upstream_state_key(i))
                                 for i in range(1, len(self._upstreams))]
        self.key_usage = KeyUsage(ledger)

    # --- plans ---------------------------------------------------------------

    def plan(self, alias: str | None, key_limits: Limits | None, upstream: int = 0) -> Plan:
        """The plan of a caller (``alias`` None = open mode, no client key) going out with
        upstream key ``upstream``; cached."""
        cache_key: object = alias if upstream == 0 else (alias, upstream)
        plan = self._plans.get(cache_key)
        if plan is None:
            plan = self._build(alias, key_limits, upstream)
            self._plans[cache_key] = plan
        return plan

    def forget_plans(self) -> None:
        """Drop cached plans (the keys file was reloaded: limits may have changed)."""
        self._plans.clear()

    def _build(self, alias: str | None, key_limits: Limits | None, upstream: int = 0) -> Plan:
        ops: list[LimitOp] = []
        upstream_id, upstream_limits = self._upstreams[upstream]
        scopes: list[tuple[str, bytes, Limits]] = [("global", b"global", self._global),
                                                    ("upstream", upstream_id, upstream_limits)]
        if alias is not None and key_limits is not None:
            scopes.insert(0, ("key", b"key\0" + alias.encode(), key_limits))
        impl = self.impl
        for scope, ident, limits in scopes:
            for name, what, period, weighted, kind in LIMIT_SPECS:
                value = getattr(limits, name)
                if value is None:
                    continue
                key = limit_key(ident, name)
                if kind == "window":
                    ops.append(LimitOp(impl.KIND_WINDOW, self.ledger.window(key), value, period,
                                       weighted, what, scope, name))
                elif kind == "gcra":
                    ops.append(LimitOp(impl.KIND_GCRA, self.ledger.row(key), value, period,
                                       weighted, what, scope, name))
                else:
                    ops.append(LimitOp(impl.KIND_CONCURRENCY, self.ledger.row(key), value, 0,
                                       False, what, scope, name))
        adaptive: int | None = None
        if self._adaptive:
            adaptive = len(ops)
            ops.append(LimitOp(impl.KIND_GCRA, self.ledger.row(adaptive_limit_key(upstream)), 1,
                               SECOND_NS, False, LimitKind.REQUESTS, "global", "adaptive_rate",
                               adaptive=True))
        words = impl.OP_WORDS
        buf = array("q", bytes(8 * words * max(1, len(ops))))
        for i, op in enumerate(ops):
            base = i * words
            buf[base] = op.kind
            buf[base + 1] = op.index
            buf[base + 2] = 1
            buf[base + 3] = op.limit
            buf[base + 4] = op.period_ns
        return Plan(
            ops=tuple(ops), buf=buf,
            weighted=tuple(i for i, op in enumerate(ops) if op.weighted),
            has_concurrency=any(op.kind == impl.KIND_CONCURRENCY for op in ops),
            adaptive=adaptive, alias=alias, upstream=upstream,
            reported=tuple((op.index, op.limit, op.period_ns, op.weighted) for op in ops
                           if op.kind == impl.KIND_GCRA and not op.adaptive),
        )

    # --- admit / settle ------------------------------------------------------

    async def admit(self, plan: Plan, tokens: int) -> Admission | Refusal:
        """:meth:`admit_now` for the request path (the Limiter interface is async: a fleet
        backend waits for Redis; this one never waits)."""
        return self.admit_now(plan, tokens)

    def admit_now(self, plan: Plan, tokens: int) -> Admission | Refusal:
        """Take every limit of ``plan`` for one request reserving ``tokens``, or none of them."""
        n = len(plan.ops)
        if n == 0:
            return Admission(plan, tokens, ())
        buf = plan.buf
        words = self.impl.OP_WORDS
        for i in plan.weighted:
            buf[i * words + 2] = tokens
        if plan.adaptive is not None:
            mrps = (self.ledger.scalar_get(SC_ADAPTIVE_MRPS) if plan.upstream == 0
                    else self.ledger.counter_get(self._mrps_rows[plan.upstream], W_KEY_MRPS))
            base = plan.adaptive * words
            if mrps <= 0:
                # No learned rate: the op must not limit anything. A huge limit admits all.
                buf[base + 3], buf[base + 4] = 1 << 40, SECOND_NS
            else:
                buf[base + 3], buf[base + 4] = adaptive_gcra(mrps)
        failed = self.ledger.admit(buf, n, self.clock(), self.worker)
        if failed >= 0:
            base = failed * words
            return Refusal(plan.ops[failed], buf[base + 6], buf[base + 2])
        # Word 5 of each op: one strided slice in C instead of a generator over the ops
        # (the buffer holds exactly n ops).
        return Admission(plan, tokens, tuple(buf[5::words]))

    def settle(self, admission: Admission, used_tokens: int | None) -> None:
        """Release the lease and reconcile tokens; ``used_tokens`` None = keep the reservation.

        Idempotent: a second call does nothing.
        """
        if admission.settled:
            return
        admission.settled = True
        plan = admission.plan
        ledger = self.ledger
        impl = self.impl
        worker = self.worker
        leases = plan.leases
        if leases is None:
            leases = plan.leases = tuple(op.index for op in plan.ops
                                         if op.kind == impl.KIND_CONCURRENCY)
        for index in leases:
            ledger.release(index, worker)
        if used_tokens is None or used_tokens == admission.tokens:
            return
        delta = used_tokens - admission.tokens
        now = self.clock()
        for i in plan.weighted:
            op = plan.ops[i]
            if op.kind == impl.KIND_GCRA:
                if delta > 0:
                    ledger.gcra_charge(op.index, delta, op.limit, op.period_ns, now)
                else:
                    ledger.gcra_give(op.index, -delta, op.limit, op.period_ns)
            elif delta > 0:
                ledger.window_charge(op.index, delta, op.period_ns, now)
            else:
                ledger.window_give(op.index, -delta, admission.epochs[i], op.period_ns, now)

    # --- life and reports (the Limiter interface; nothing to run for the ledger) ---------

    fleet = False  # limits of this host only

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def aclose(self) -> None:
        return None

    async def limit_states(self, ops: Sequence[LimitOp]) -> list[dict[str, Any]]:
        """The state object of each op at one instant (limits/report.py has the shapes).

        A rolling window younger than its length (the segment began inside it: the host
        restarted) also says ``since`` (unix s): it counts nothing from before then."""
        now = self.clock()
        began = started_s(self.ledger)
        young = None if began is None else time.time() - began
        states = []
        for op in ops:
            state = limit_state(self, op, now)
            if (op.kind == self.impl.KIND_WINDOW and young is not None
                    and young < op.period_ns / 1e9):
                state["since"] = round(began or 0.0, 3)
            states.append(state)
        return states

    def add_usage(self, alias: str, usage: Usage) -> None:
        self.key_usage.add(alias, usage)

    def count_outcome(self, alias: str, outcome: int) -> None:
        self.key_usage.count(alias, outcome)

    async def usage_totals(self, aliases: Sequence[str]) -> list[dict[str, int]]:
        return [self.key_usage.totals(alias) for alias in aliases]

    def quota_use(self) -> list[QuotaUse]:
        """The proxy-wide and upstream-key rolling windows now (``zai_proxy_quota_used_ratio``)."""
        now = self.clock()
        uses = []
        for op in self.plan(None, None).ops:
            if op.kind == self.impl.KIND_WINDOW and op.scope in SHARED_SCOPES and not op.adaptive:
                state = limit_state(self, op, now)
                uses.append(QuotaUse(op.scope, report_name(op), state["used"], state["limit"]))
        return uses

    def upstream_used(self, upstream: int) -> float:
        """The highest used share of upstream key ``upstream``'s own rolling windows (0 when
        it has none): its local headroom, for the pool's choice of key."""
        windows = self._upstream_windows.get(upstream)
        if windows is None:
            windows = self._upstream_windows[upstream] = tuple(
                op for op in self.plan(None, None, upstream).ops
                if op.kind == self.impl.KIND_WINDOW and op.scope == "upstream")
        if not windows:
            return 0.0
        now = self.clock()
        used_of = self.ledger.window_used
        return float(max(used_of(op.index, op.period_ns, now) / op.limit for op in windows))

    # --- reporting -----------------------------------------------------------

    def rate_states(self, plan: Plan) -> tuple[RateState | None, RateState | None]:
        """(requests, tokens): the tightest per-minute limit of each kind, for headers."""
        requests: RateState | None = None
        tokens: RateState | None = None
        if not plan.reported:
            return None, None
        now = self.clock()
        state_of = self.ledger.gcra_state
        for index, limit, period_ns, weighted in plan.reported:
            remaining, reset_ns = state_of(index, limit, period_ns, now)
            if weighted:
                if tokens is None or remaining < tokens.remaining:
                    tokens = RateState(limit, remaining, reset_ns)
            elif requests is None or remaining < requests.remaining:
                requests = RateState(limit, remaining, reset_ns)
        return requests, tokens

    def note_upstream(self, throttle: str | None = None, counted_epoch: int = -1,
                      upstream: int = 0) -> int:
        """Count one upstream answer for the adaptive rate.

        ``throttle`` is the class of an account-throttle 429 (``concurrency``,
        ``frequency``, ``unknown``; None for any other answer). ``counted_epoch`` is
        what this call returned for an earlier attempt of the same request (-1 for
        none): a request counts as a throttled *request* once per evidence epoch
        (``SC_ADAPTIVE_EPOCH``, bumped by the supervisor at each evidence event), so its
        retries count again only as evidence about the new rate.
        Returns the epoch the request is now counted in.
        """
        ledger = self.ledger
        row = self.activity_rows[upstream]
        ledger.counter_add(row, W_UPSTREAM_REQUESTS, 1)
        if throttle is None:
            return counted_epoch
        ledger.counter_add(row, W_UPSTREAM_THROTTLED, 1)
        ledger.counter_add(row, THROTTLE_WORDS.get(throttle, W_THROTTLED_UNKNOWN), 1)
        epoch: int = ledger.scalar_get(SC_ADAPTIVE_EPOCH)
        if epoch != counted_epoch:
            ledger.counter_add(row, W_THROTTLED_REQUESTS, 1)
        return epoch


KEY_SCOPES = frozenset(("key",))  # a key's own limits (the shared ones are in "global")
SHARED_SCOPES = frozenset(("global", "upstream"))  # every plan's: proxy-wide and upstream key


def limit_state(admitter: Admitter, op: LimitOp, now: int) -> dict[str, Any]:
    """The state object of one limit at ``now`` (see the module docstring for the shapes)."""
    ledger = admitter.ledger
    impl = admitter.impl
    if op.kind == impl.KIND_GCRA:
        remaining, reset_ns = ledger.gcra_state(op.index, op.limit, op.period_ns, now)
        return {"limit": op.limit, "remaining": remaining, "reset_s": round(reset_ns / 1e9, 3)}
    if op.kind == impl.KIND_CONCURRENCY:
        in_use = ledger.in_use(op.index)
        return {"limit": op.limit, "in_use": in_use, "remaining": max(0, op.limit - in_use)}
    used = ledger.window_used(op.index, op.period_ns, now)
    release_ns, releases = ledger.window_next_release(op.index, op.period_ns, now)
    return {"limit": op.limit, "used": used, "remaining": max(0, op.limit - used),
            "reset_s": round(release_ns / 1e9, 3), "releases": releases}


def report_name(op: LimitOp) -> str:
    """The limit's name as the config spells it: upstream-key limits are ``upstream_*``."""
    return "upstream_" + op.name if op.scope == "upstream" else op.name



def format_reset(ns: int) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``120ms``, ``6s``, ``1m30s``."""
    if ns <= 0:
        return "0s"
    ms = -(-ns // 1_000_000)
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    out = ""
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    out += f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    return out


def ratelimit_headers(requests: RateState | None, tokens: RateState | None,
                      out: list[tuple[bytes, bytes]]) -> None:
    """Append the ``x-ratelimit-*`` trios (OpenAI's names) for the limits that apply."""
    if requests is not None:
        out.append((b"x-ratelimit-limit-requests", b"%d" % requests.limit))
        out.append((b"x-ratelimit-remaining-requests", b"%d" % requests.remaining))
        out.append((b"x-ratelimit-reset-requests", format_reset(requests.reset_ns).encode()))
    if tokens is not None:
        out.append((b"x-ratelimit-limit-tokens", b"%d" % tokens.limit))
        out.append((b"x-ratelimit-remaining-tokens", b"%d" % tokens.remaining))
        out.append((b"x-ratelimit-reset-tokens", format_reset(tokens.reset_ns).encode()))


@dataclass
class WaitQueue:
    """Per-worker bound on requests waiting for a limit (``queue_timeout`` > 0)."""

    max_waiting: int
    waiting: int = field(default=0)

    def try_enter(self) -> bool:
        if self.waiting >= self.max_waiting:
            return False
        self.waiting += 1
        return True

    def leave(self) -> None:
        self.waiting -= 1
