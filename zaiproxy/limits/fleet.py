"""Limits shared by a fleet of proxies: the Redis backend of :class:`~zaiproxy.limits.api.Limiter`.

Every proxy (every worker of every pod) with the same ``redis_key_prefix`` takes from one
budget. ``docs/decisions/fleet-limits.md`` has the reasoning and the numbers; in short:

- **One round trip to admit.** :meth:`FleetLimiter.admit` makes one ``EVALSHA`` of
  ``fleet.lua``, which checks every limit of the request (client key, upstream key, global;
  requests/min and tokens/min as GCRA, concurrency leases, 5-hour and weekly windows, the
  adaptive upstream rate) on the server's clock and takes all of them or none. The answer
  carries the refusing limit and its exact wait, or the window epochs and the fleet-wide
  ``x-ratelimit-*`` values.
- **Settles are batched.** :meth:`FleetLimiter.settle` is synchronous (it runs in a
  ``finally``): it queues the lease release and the token difference, and the worker's
  flusher sends everything queued in one call, at once when idle, batched under load. The
  totals per client key (tokens, requests by outcome: ``key_usage.py``) ride in the same
  calls.
- **Leases expire unless renewed.** A concurrency lease is a sorted-set member scored by its
  expiry (``redis_lease_ttl``, default 15 s); each worker renews all of its live leases in
  one call every third of that. A SIGKILLed pod's slots come back within the TTL.
- **Redis unavailable or slow.** A call that fails (connection refused, reset) switches the
  worker to ``limits_fail`` at once; a call unanswered within ``redis_command_timeout`` is
  decided by the policy, and the worker switches when a PING confirms (no answer within
  max(0.25 s, 5 x the timeout): a lagging event loop alone does not switch a host). Away,
  it probes Redis twice a second. ``local`` decides with this host's ledger, every limit scaled by
  ``limits_local_share``; ``closed`` answers 503; ``open`` admits. What was admitted without
  Redis is charged to the fleet's counters when Redis answers again (reconcile). The switch
  and the return are logged once per host (cells ``SC_FLEET_*``), counted, and shown in
  ``/health``, ``/admin/status`` and ``/metrics``.

Nothing secret reaches Redis: a limit's key names its scope by the client key's alias or by
a digest of the upstream key; values are numbers and lease ids (pod, worker, counter).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from zaiproxy.core import logs
from zaiproxy.core.errors import LimitsUnavailable
from zaiproxy.core.limitspec import Limits
from zaiproxy.core.record import Usage
from zaiproxy.limits.admission import (
    LIMIT_SPECS,
    Admission,
    Admitter,
    LimitKind,
    LimitOp,
    Plan,
    QuotaUse,
    RateState,
    Refusal,
    report_name,
)
from zaiproxy.limits.cells import (
    SC_FLEET_CLOSED,
    SC_FLEET_DROPPED,
    SC_FLEET_ERRORS,
    SC_FLEET_LOCAL,
    SC_FLEET_OPEN,
    SC_FLEET_SINCE_MS,
    SC_FLEET_STATE,
    SC_FLEET_SWITCHES,
    W_FLEET_DOWN,
    activity_key,
)
from zaiproxy.limits.key_usage import OUTCOMES, TOKEN_FIELDS, usage_report
from zaiproxy.limits.segment import Segment

if TYPE_CHECKING:
    from zaiproxy.core.config import Config

SCRIPT: Final = (Path(__file__).with_name("fleet.lua")).read_text()

# Op kinds of fleet.lua.
GCRA: Final = 1
CONC: Final = 2
WINDOW: Final = 3
ADAPTIVE: Final = 4
COUNTERS: Final = 5

US_PER_NS: Final = 1000
SECOND_US: Final = 1_000_000
# The fields of a key's usage hash ({p}:usage:<alias>), numbered from 1 in this order (fleet.lua's
# COUNTER_FIELDS, the same list): the token totals (key_usage.TOKEN_FIELDS; the hash calls the
# charged requests "requests", its name from before the outcomes were counted, so the totals a
# fleet already has keep counting), then the requests by outcome (key_usage.OUTCOMES).
_COUNTER_FIELDS: Final = ("requests", "input_tokens", "output_tokens", "cache_read_tokens",
                          "cache_write_tokens", *OUTCOMES)
_OUTCOME_FIELD: Final = 1 + len(TOKEN_FIELDS)  # the field number of OUTCOMES[0]

# The ledger's table of limits (admission.LIMIT_SPECS) with periods in µs and script kinds.
_SCRIPT_KINDS: Final = {"gcra": GCRA, "concurrency": CONC, "window": WINDOW}
_SPECS: Final = tuple((name, what, period // US_PER_NS, weighted, _SCRIPT_KINDS[algorithm])
                      for name, what, period, weighted, algorithm in LIMIT_SPECS)

# Settles and reconcile charges waiting for Redis: bounded (when full the oldest go, counted
# in SC_FLEET_DROPPED; their leases still expire). One call carries at most this many.
MAX_PENDING: Final = 50_000
MAX_BATCH: Final = 512
# Admissions of one worker waiting for Redis at once; more are decided by the fail policy
# (a slow Redis never grows a queue).
MAX_IN_FLIGHT: Final = 1024
PROBE_S: Final = 0.5
# How long queued settles wait for an admission to carry them before the flusher sends them.
SETTLE_LINGER_S: Final = 0.002
# A call that timed out makes Redis *suspect*: this request is decided by the fail policy,
# and a PING must answer within max(CONFIRM_MIN_S, CONFIRM_FACTOR x redis_command_timeout)
# or the worker switches; the same bound decides the return. A timeout alone can be the
# worker's own loop lagging under load (measured: 50 ms is exceeded at c=64 on 2 busy cores),
# which must not send a whole host to the fail policy; a Redis that needs longer than that
# for a PING is as good as away.
CONFIRM_MIN_S: Final = 0.25
CONFIRM_FACTOR: Final = 5


class FleetKeys:
    """The Redis key names of one deployment: every name carries the hash tag ``{prefix}``,
    so all of a deployment's keys live in one Redis Cluster slot (one call = one slot)."""

    def __init__(self, prefix: str, upstream_id: str) -> None:
        self.tag = "{" + prefix + "}"
        self.upstream_id = upstream_id

    def limit(self, scope: str, alias: str | None, name: str) -> str:
        if scope == "key":
            return f"{self.tag}:limit:key:{alias}:{name}"
        if scope == "upstream":
            return f"{self.tag}:limit:upstream:{self.upstream_id}:{name}"
        return f"{self.tag}:limit:global:{name}"

    @property
    def adaptive_gcra(self) -> str:
        return f"{self.tag}:adaptive:{self.upstream_id}:gcra"

    @property
    def adaptive_state(self) -> str:
        """The fleet's published adaptive rate (``mrps``…), written by the rate's leader."""
        return f"{self.tag}:adaptive:{self.upstream_id}"

    def usage(self, alias: str) -> str:
        return f"{self.tag}:usage:{alias}"

    @property
    def activity(self) -> str:
        """Every pod's upstream answers and Z.AI throttles, summed (limits/fleet_rate.py)."""
        return f"{self.tag}:adaptive:{self.upstream_id}:activity"

    @property
    def leader(self) -> str:
        """Which pod decides the fleet's adaptive rate (a lease renewed every tick)."""
        return f"{self.tag}:adaptive:{self.upstream_id}:leader"


def scaled(limits: Limits, share: float) -> Limits:
    """Each set limit times ``share`` (rounded up, at least 1): a host's part of the fleet's."""
    if share >= 1.0:
        return limits
    values = {name: (None if getattr(limits, name) is None
                     else max(1, math.ceil(getattr(limits, name) * share)))
              for name in limits.__dataclass_fields__}
    return replace(limits, **values)


@dataclass(eq=False, slots=True)
class FleetPlan:
    """What a fleet plan adds to :class:`Plan`: the script's keys and argument template."""

    keys: list[str]
    args: list[Any]  # ["admit", "", lease id, ttl, n, n * (kind, limit, period, cost)]
    weighted_args: tuple[int, ...]  # positions in args of the weighted ops' cost
    conc_keys: tuple[str, ...]
    local: Plan | None  # the same caller's plan in the host's ledger (fail = "local")
    states: tuple[RateState | None, RateState | None] = (None, None)


@dataclass(slots=True)
class FleetHold:
    """What an admitted request holds: a lease id in Redis, or a local admission."""

    member: str  # "" = no lease in Redis
    local: Admission | None = None
    remote: bool = True  # admitted by Redis (else: by the fail policy)


@dataclass(slots=True)
class _Entry:
    """One settle, reconcile charge or count: a lease to drop and (key, kind, limit, period,
    delta, epoch) ops, sent in the next batch. Never changed once queued (a failed batch is
    put back as it was, or as new entries): one entry may be queued several times."""

    member: str
    ops: list[tuple[str, int, int, int, int, int]] = field(default_factory=list)


class RedisUnavailable(Exception):
    """A Redis call failed or timed out (the message never holds the URL or a password)."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class FleetLimiter:
    """One worker's side of the fleet limits (see the module docstring)."""

    fleet = True

    def __init__(self, *, client: Any, local: Admitter, keys: FleetKeys, segment: Segment,
                 global_limits: Limits, upstream_limits: Limits, adaptive: bool, worker: int,
                 lease_ttl_s: float, command_timeout_s: float, fail: str, share: float,
                 wall: Callable[[], float] = time.time) -> None:
        self.client = client
        self.local = local
        self.keys = keys
        self.segment = segment
        self.worker = worker
        self.fail = fail
        self.share = share
        self.wall = wall
        self._global = global_limits
        self._upstream = upstream_limits
        self._adaptive = adaptive
        self._ttl_us = int(lease_ttl_s * SECOND_US)
        self._renew_s = lease_ttl_s / 3
        # The bound on one call: past it, the fail policy decides that request (and a PING
        # decides whether the worker switches: CONFIRM_MIN_S).
        self._deadline = command_timeout_s
        self._confirm = max(CONFIRM_MIN_S, CONFIRM_FACTOR * command_timeout_s)
        self._plans: dict[str | None, Plan] = {}
        # Per alias, per outcome: the one queued entry that counts a request (built once and
        # queued as often as needed: an entry is never changed once queued).
        self._outcomes: dict[str, tuple[_Entry, ...]] = {}
        self._script: Any = client.register_script(SCRIPT) if client is not None else None
        self._lease_prefix = f"{socket.gethostname()[:32]}:{os.getpid()}:{worker}:"
        self._lease_seq = 0
        self._leases: dict[str, tuple[str, ...]] = {}
        self._pending: deque[_Entry] = deque()
        self._wake = trio.Event()
        self._suspect = trio.Event()
        self._in_flight = 0
        self.up = True
        self._row = segment.row(activity_key(worker))
        segment.counter_set(self._row, W_FLEET_DOWN, 0)
        if self._degraded_workers() == 0:
            # A worker that died while it could not reach Redis left the host's state at
            # "degraded": nobody is now, so the next loss is logged again.
            segment.scalar_cas(SC_FLEET_STATE, 1, 0)
        self._quota: list[QuotaUse] = []
        self.log = logs.get_logger()
        # Tests only: the script's `now` in microseconds from this clock instead of Redis's
        # TIME (a virtual clock shared with a reference model). The product never sets it.
        self.test_clock: Callable[[], int] | None = None

    # ---- plans --------------------------------------------------------------------------

    def plan(self, alias: str | None, key_limits: Limits | None, upstream: int = 0) -> Plan:
        # One upstream key per fleet for now: config refuses a pool with the Redis backend.
        assert upstream == 0, "a pool of upstream keys needs limits_backend = shm"
        plan = self._plans.get(alias)
        if plan is None:
            plan = self._plans[alias] = self._build(alias, key_limits)
        return plan

    def forget_plans(self) -> None:
        self._plans.clear()
        self.local.forget_plans()

    def _build(self, alias: str | None, key_limits: Limits | None) -> Plan:
        ops: list[LimitOp] = []
        scopes: list[tuple[str, Limits]] = [("global", self._global), ("upstream", self._upstream)]
        if alias is not None and key_limits is not None:
            scopes.insert(0, ("key", key_limits))
        args: list[Any] = ["admit", "", "", self._ttl_us, 0]
        keys: list[str] = []
        weighted: list[int] = []
        for scope, limits in scopes:
            for name, what, period_us, is_weighted, kind in _SPECS:
                value = getattr(limits, name)
                if value is None:
                    continue
                key = self.keys.limit(scope, alias, name)
                ops.append(LimitOp(kind, len(ops), value, period_us * US_PER_NS, is_weighted,
                                   what, scope, name, key=key))
                keys.append(key)
                if is_weighted:
                    weighted.append(len(args) + 3)
                args.extend((kind, value, period_us, 1))
        adaptive: int | None = None
        if self._adaptive:
            adaptive = len(ops)
            ops.append(LimitOp(ADAPTIVE, adaptive, 1, SECOND_US * US_PER_NS, False,
                               LimitKind.REQUESTS, "global", "adaptive_rate", adaptive=True,
                               key=self.keys.adaptive_gcra))
            keys.append(self.keys.adaptive_gcra)
            args.extend((ADAPTIVE, 0, 0, 1))
            keys.append(self.keys.adaptive_state)  # KEYS[n + 1]
        args[4] = len(ops)
        local = None
        if self.fail == "local":
            local = self.local.plan(alias, None if key_limits is None
                                    else scaled(key_limits, self.share))
        backend = FleetPlan(keys=keys, args=args, weighted_args=tuple(weighted),
                            conc_keys=tuple(op.key for op in ops if op.kind == CONC),
                            local=local)
        return Plan(
            ops=tuple(ops), buf=None,
            weighted=tuple(i for i, op in enumerate(ops) if op.weighted),
            has_concurrency=bool(backend.conc_keys), adaptive=adaptive, alias=alias,
            reported=tuple((op.index, op.limit, op.period_ns, op.weighted) for op in ops
                           if op.kind == GCRA),
            backend=backend,
        )

    # ---- admit ---------------------------------------------------------------------------

    async def admit(self, plan: Plan, tokens: int) -> Admission | Refusal:
        fp: FleetPlan = plan.backend
        n = len(plan.ops)
        if n == 0:
            return Admission(plan, tokens, (), backend=FleetHold(""))
        if not self.up or self._in_flight >= MAX_IN_FLIGHT:
            return self._without_redis(plan, tokens)
        args = fp.args.copy()
        for pos in fp.weighted_args:
            args[pos] = tokens
        member = ""
        if fp.conc_keys:
            self._lease_seq += 1
            member = args[2] = f"{self._lease_prefix}{self._lease_seq}"
        keys = fp.keys
        carried: list[_Entry] = []
        # Queued settles ride along (applied first, in the same call), unless Redis is suspect:
        # a call that times out is never resent, so it should carry as little as possible.
        if self._pending and not self._suspect.is_set():
            carried = self._take_batch()
            keys = fp.keys.copy()
            args.append(len(fp.keys))
            args.extend(encode_settles(carried, keys))
        self._in_flight += 1
        try:
            # Shielded and bounded: a client that leaves must not leave a lease behind that
            # nobody knows of (it would still expire, but only after the TTL).
            with trio.CancelScope(shield=True):
                result = await self._call(keys, args)
        except RedisUnavailable as exc:
            self._put_back(carried, exc)
            self._failed(exc)
            return self._without_redis(plan, tokens)
        finally:
            self._in_flight -= 1
        failed, retry = int(result[0]), int(result[1])
        fp.states = self._rate_states(plan, result)
        if failed >= 0:
            op = plan.ops[failed]
            return Refusal(op, retry * US_PER_NS if retry > 0 else retry,
                           tokens if op.weighted else 1)
        epochs = tuple(int(result[2 + 3 * i]) for i in range(n))
        admission = Admission(plan, tokens, epochs, backend=FleetHold(member))
        if member:
            self._leases[member] = fp.conc_keys
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:
            self.settle(admission, 0)  # taken for a request that is gone: give it back
            raise
        return admission

    def _rate_states(self, plan: Plan,
                     result: Sequence[Any]) -> tuple[RateState | None, RateState | None]:
        requests: RateState | None = None
        toks: RateState | None = None
        for index, limit, _period, weighted in plan.reported:
            base = 2 + 3 * index
            state = RateState(limit, int(result[base + 1]), int(result[base + 2]) * US_PER_NS)
            if weighted:
                if toks is None or state.remaining < toks.remaining:
                    toks = state
            elif requests is None or state.remaining < requests.remaining:
                requests = state
        return requests, toks

    def _without_redis(self, plan: Plan, tokens: int) -> Admission | Refusal:
        """The fail policy decides (Redis is unreachable, slow, or this worker is saturated)."""
        if self.fail == "closed":
            self.segment.scalar_add(SC_FLEET_CLOSED, 1)
            raise LimitsUnavailable(
                "the proxy's fleet rate limiter (Redis) is unavailable and the proxy is "
                "configured to refuse requests it cannot count (limits_fail = \"closed\"); "
                "retry shortly")
        if self.fail == "open":
            self.segment.scalar_add(SC_FLEET_OPEN, 1)
            return Admission(plan, tokens, (), backend=FleetHold("", None, remote=False))
        self.segment.scalar_add(SC_FLEET_LOCAL, 1)
        fp: FleetPlan = plan.backend
        assert fp.local is not None
        result = self.local.admit_now(fp.local, tokens)
        if isinstance(result, Refusal):
            return result
        return Admission(plan, tokens, result.epochs,
                         backend=FleetHold("", result, remote=False))

    # ---- settle ----------------------------------------------------------------------------

    def settle(self, admission: Admission, used_tokens: int | None) -> None:
        if admission.settled:
            return
        admission.settled = True
        hold: FleetHold | None = admission.backend
        if hold is None or not admission.plan.ops:
            return
        plan = admission.plan
        if not hold.remote:
            if hold.local is not None:
                self.local.settle(hold.local, used_tokens)
            self._reconcile(plan, admission.tokens if used_tokens is None else used_tokens)
            return
        entry = _Entry(hold.member)
        if hold.member:
            self._leases.pop(hold.member, None)
            entry.ops.extend((key, CONC, 0, 0, 0, 0) for key in plan.backend.conc_keys)
        if used_tokens is not None and used_tokens != admission.tokens:
            delta = used_tokens - admission.tokens
            for i in plan.weighted:
                op = plan.ops[i]
                entry.ops.append((op.key, op.kind, op.limit, op.period_ns // US_PER_NS, delta,
                                  admission.epochs[i]))
        if entry.ops:
            self._queue(entry)

    def _reconcile(self, plan: Plan, used: int) -> None:
        """Charge the fleet with a request admitted without Redis (sent when it answers)."""
        entry = _Entry("")
        for op in plan.ops:
            if op.kind in (GCRA, WINDOW):
                cost = used if op.weighted else 1
                if cost > 0:
                    entry.ops.append((op.key, op.kind, op.limit, op.period_ns // US_PER_NS,
                                      cost, 0))
        if entry.ops:
            self._queue(entry)

    def add_usage(self, alias: str, usage: Usage) -> None:
        """Add a settled request's usage to the client key's fleet-wide totals."""
        key = self.keys.usage(alias)
        values = (1, usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
                  usage.cache_write_tokens)
        self._queue(_Entry("", [(key, COUNTERS, i + 1, 0, v, 0)
                                for i, v in enumerate(values) if v]))

    def count_outcome(self, alias: str, outcome: int) -> None:
        """Count one ended request of ``alias`` fleet-wide (queued like a settle; nothing is
        allocated per request: the entry of each outcome is made once per alias)."""
        entries = self._outcomes.get(alias)
        if entries is None:
            key = self.keys.usage(alias)
            entries = self._outcomes[alias] = tuple(
                _Entry("", [(key, COUNTERS, _OUTCOME_FIELD + i, 0, 1, 0)])
                for i in range(len(OUTCOMES)))
        self._queue(entries[outcome])

    def _queue(self, entry: _Entry) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self.segment.scalar_add(SC_FLEET_DROPPED, 1)
        self._pending.append(entry)
        if self.up:
            self._wake.set()

    # ---- what the request path reads --------------------------------------------------------

    def rate_states(self, plan: Plan) -> tuple[RateState | None, RateState | None]:
        """The fleet-wide values the last admission of this plan (in this worker) saw."""
        fp: FleetPlan = plan.backend
        return fp.states

    def note_upstream(self, throttle: str | None = None, counted_epoch: int = -1,
                      upstream: int = 0) -> int:
        # Counted on this host; the supervisor adds the host's counts to the fleet's.
        return self.local.note_upstream(throttle, counted_epoch, upstream)

    def quota_use(self) -> list[QuotaUse]:
        """The fleet's windows as of the last refresh (every renew interval)."""
        return self._quota

    # ---- reports ---------------------------------------------------------------------------

    async def limit_states(self, ops: Sequence[LimitOp]) -> list[dict[str, Any]]:
        """Fleet-wide state objects of ``ops`` at one instant of the server's clock."""
        ops = [op for op in ops if not op.adaptive]
        if not ops:
            return []
        args: list[Any] = ["state", "", len(ops)]
        for op in ops:
            args.extend((op.kind, op.limit, op.period_ns // US_PER_NS))
        result = await self._report_call([op.key for op in ops], args)
        out = []
        for i, op in enumerate(ops):
            a, b, c = (int(v) for v in result[1 + 3 * i:4 + 3 * i])
            if op.kind == GCRA:
                out.append({"limit": op.limit, "remaining": a, "reset_s": round(b / 1e6, 3)})
            elif op.kind == CONC:
                out.append({"limit": op.limit, "in_use": a, "remaining": max(0, op.limit - a)})
            else:
                out.append({"limit": op.limit, "used": a, "remaining": max(0, op.limit - a),
                            "reset_s": round(b / 1e6, 3), "releases": c})
        return out

    async def usage_totals(self, aliases: Sequence[str]) -> list[dict[str, int]]:
        if not aliases:
            return []
        args: list[Any] = ["state", "", len(aliases)]
        for _ in aliases:
            args.extend((COUNTERS, 0, 0))
        result = await self._report_call([self.keys.usage(a) for a in aliases], args)
        out = []
        n = len(_COUNTER_FIELDS)
        for pos in range(1, 1 + n * len(aliases), n):
            values = [int(v) for v in result[pos:pos + n]]
            out.append(usage_report(values[_OUTCOME_FIELD - 1:], values[:_OUTCOME_FIELD - 1]))
        return out

    async def _report_call(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._call(keys, args)
        except RedisUnavailable as exc:
            self._failed(exc)
            raise LimitsUnavailable(
                "the fleet's limits live in Redis, which does not answer now; this host "
                f"decides by limits_fail = \"{self.fail}\" until it does") from None

    async def _refresh_quota(self) -> None:
        ops = [op for op in self.plan(None, None).ops if op.kind == WINDOW]
        if not ops:
            return
        states = await self.limit_states(ops)
        self._quota = [QuotaUse(op.scope, report_name(op), s["used"], s["limit"])
                       for op, s in zip(ops, states, strict=True)]

    # ---- Redis calls, health ---------------------------------------------------------------

    async def _call(self, keys: list[str], args: list[Any]) -> Any:
        """One script call, bounded in time; raises :class:`RedisUnavailable`."""
        if self.test_clock is not None:
            args[1] = self.test_clock()
        try:
            with trio.fail_after(self._deadline):
                return await self._script(keys=keys, args=args)
        except trio.TooSlowError:
            self.segment.scalar_add(SC_FLEET_ERRORS, 1)
            raise RedisUnavailable(f"no answer within {self._deadline:g} s",
                                   timeout=True) from None
        except Exception as exc:
            if type(exc).__name__ in ("ResponseError",) and "zaiproxy fleet script" in str(exc):
                raise  # our own bug, not an outage
            self.segment.scalar_add(SC_FLEET_ERRORS, 1)
            # The client's own response timeout (stream_timeout) is a timeout like ours.
            raise RedisUnavailable(_describe(exc), timeout=isinstance(exc, TimeoutError)) from None

    def _failed(self, exc: RedisUnavailable) -> None:
        """A call failed: an error means Redis is away (switch now); a timeout makes it
        suspect (the maintenance task confirms with a PING within self._confirm)."""
        if exc.timeout:
            self._suspect.set()
        else:
            self._lost(exc)

    def _lost(self, exc: Exception) -> None:
        if not self.up:
            return
        self.up = False
        segment = self.segment
        segment.counter_set(self._row, W_FLEET_DOWN, 1)
        segment.scalar_add(SC_FLEET_SWITCHES, 1)
        if segment.scalar_cas(SC_FLEET_STATE, 0, 1):  # the first worker to notice says it
            segment.scalar_set(SC_FLEET_SINCE_MS, int(self.wall() * 1000))
            self.log.error("limits_redis_unavailable", error=str(exc), fail=self.fail,
                           local_share=self.share if self.fail == "local" else None)

    def _back(self) -> None:
        if self.up:
            return
        self.up = True
        segment = self.segment
        segment.counter_set(self._row, W_FLEET_DOWN, 0)
        self._wake.set()
        if self._degraded_workers() == 0 and segment.scalar_cas(SC_FLEET_STATE, 1, 0):
            since = segment.scalar_get(SC_FLEET_SINCE_MS)
            segment.scalar_set(SC_FLEET_SINCE_MS, 0)
            self.log.warning("limits_redis_recovered",
                             down_s=round(self.wall() - since / 1000, 3) if since else None,
                             reconcile=len(self._pending))

    def _degraded_workers(self) -> int:
        return degraded_workers(self.segment, self.segment.workers)

    # ---- the worker's background tasks ------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the client open; flush settles; renew leases; probe Redis while it is away."""
        async with self.client, trio.open_nursery() as nursery:
            nursery.start_soon(self._flusher)
            nursery.start_soon(self._maintain)
            task_status.started()

    async def aclose(self) -> None:
        """Send what is queued (a draining worker's last settles), within a second."""
        with trio.move_on_after(1.0):
            await self.flush()

    async def flush(self) -> None:
        """Send every queued settle now (while Redis answers)."""
        while self._pending and self.up:
            await self._flush_once()

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            # A moment for the next admission to carry them (one round trip for both); an
            # idle worker sends them itself, SETTLE_LINGER_S after the request ended.
            await trio.sleep(SETTLE_LINGER_S)
            await self.flush()

    def _take_batch(self) -> list[_Entry]:
        return [self._pending.popleft() for _ in range(min(MAX_BATCH, len(self._pending)))]

    def _put_back(self, batch: list[_Entry], exc: RedisUnavailable) -> None:
        """A call carrying ``batch`` failed. An error (refused, reset): first in line again,
        sent when Redis answers. A timeout: the call was sent and Redis may still run it, so
        only what is idempotent is sent again, the lease releases (a second ``ZREM`` does
        nothing); the charges and refunds are dropped and counted (at most once, like an
        admission: applied twice they would charge or refund twice)."""
        if exc.timeout:
            dropped = 0
            again = []
            for entry in batch:
                releases = [op for op in entry.ops if op[1] == CONC]
                if len(releases) < len(entry.ops):
                    dropped += 1
                if releases:
                    again.append(_Entry(entry.member, releases))
            if dropped:
                self.segment.scalar_add(SC_FLEET_DROPPED, dropped)
            batch = again
        self._pending.extendleft(reversed(batch))

    async def _flush_once(self) -> None:
        batch = self._take_batch()
        keys: list[str] = []
        args: list[Any] = ["settle", "", *encode_settles(batch, keys)]
        try:
            await self._call(keys, args)
        except RedisUnavailable as exc:
            self._put_back(batch, exc)
            self._failed(exc)

    async def _maintain(self) -> None:
        while True:
            if not self.up:
                await trio.sleep(PROBE_S)
                if await self._ping(self._confirm):
                    self._back()
                continue
            with trio.move_on_after(self._renew_s):
                await self._suspect.wait()
            if self._suspect.is_set():
                self._suspect = trio.Event()
                if not await self._ping(self._confirm):
                    self._lost(RedisUnavailable(
                        f"calls timed out and a PING got no answer within {self._confirm:g} s"))
                continue
            try:
                await self._renew()
                await self._refresh_quota()
            except RedisUnavailable as exc:
                self._failed(exc)
            except LimitsUnavailable:
                pass  # _report_call already said so

    async def _ping(self, within: float) -> bool:
        try:
            with trio.fail_after(within):
                await self.client.ping()
        except Exception:  # any failure: not answering
            return False
        return True

    async def _renew(self) -> None:
        if not self._leases:
            return
        index: dict[str, int] = {}
        args: list[Any] = ["renew", "", self._ttl_us]
        for member, keys in list(self._leases.items()):
            for key in keys:
                args.extend((index.setdefault(key, len(index) + 1), member))
        await self._call(list(index), args)


def encode_settles(entries: Iterable[_Entry], keys: list[str]) -> list[Any]:
    """The script's arguments for ``entries`` (``apply_settles`` in fleet.lua): their keys are
    appended to ``keys`` (each once) and named by index from the end of what it held."""
    base = len(keys)
    index: dict[str, int] = {}
    args: list[Any] = [0]
    count = 0
    for entry in entries:
        count += 1
        args.append(entry.member)
        args.append(len(entry.ops))
        for key, kind, limit, period, delta, epoch in entry.ops:
            position = index.get(key)
            if position is None:
                position = index[key] = len(index) + 1
                keys.append(key)
            args.extend((position, kind, limit, period, delta, epoch))
    args[0] = count
    assert len(keys) == base + len(index)
    return args


_COUNTER_CELLS: Final = (("switches", SC_FLEET_SWITCHES), ("errors", SC_FLEET_ERRORS),
                         ("local", SC_FLEET_LOCAL), ("open", SC_FLEET_OPEN),
                         ("closed", SC_FLEET_CLOSED), ("dropped", SC_FLEET_DROPPED))


def fleet_counters(segment: Segment) -> dict[str, int]:
    """This host's counts of the fleet backend (cells SC_FLEET_*): ``switches`` (times a
    worker lost Redis), ``errors`` (failed calls), ``local`` / ``open`` / ``closed``
    (requests the fail policy decided), ``dropped`` (settles the bounded queue lost)."""
    return {name: segment.scalar_get(cell) for name, cell in _COUNTER_CELLS}


def degraded_workers(segment: Segment, workers: int) -> int:
    """Workers of this host that cannot reach Redis now."""
    get = segment.counter_get
    return sum(get(segment.row(activity_key(w)), W_FLEET_DOWN) for w in range(workers))


def _describe(exc: BaseException) -> str:
    """An error for the log: its class and message, cut short (no URL, no password: the
    client's messages name host:port at most)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def resolve_password(config: Config) -> str | None:
    """The Redis password: ``redis_password``, else the file's first line, else the URL's."""
    if config.redis_password is not None:
        return config.redis_password
    if config.redis_password_file is not None:
        with open(config.redis_password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n") or None
    return None


def make_client(config: Config) -> Any:
    """A coredis client for ``redis_url`` (imported here: the shm backend never loads it)."""
    import coredis
    from coredis.retry import NoRetryPolicy

    assert config.redis_url is not None
    kwargs: dict[str, Any] = {
        "connect_timeout": config.redis_connect_timeout,
        # The client's own response timeout only backs up ours (FleetLimiter._call): long
        # enough for the confirming PING.
        "stream_timeout": max(CONFIRM_MIN_S, CONFIRM_FACTOR * config.redis_command_timeout),
        "decode_responses": False,
        # Never resend: an admission is not idempotent (coredis retries a timed-out command
        # twice by default, which would take the limits of one request three times).
        "retry_policy": NoRetryPolicy(),
    }
    password = resolve_password(config)
    if password is not None:
        kwargs["password"] = password
    return coredis.Redis.from_url(config.redis_url, **kwargs)
