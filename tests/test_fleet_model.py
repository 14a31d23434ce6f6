"""The fleet's limits (Redis, fleet.lua) against the host's ledger and a reference model.

A hypothesis state machine drives three implementations of the proxy's limits with the same
operations on one virtual clock and checks after every step that they agree:

- the shared-memory ledger through :class:`~zaiproxy.limits.admission.Admitter` (native
  module and pure-Python twin),
- :class:`~zaiproxy.limits.fleet.FleetLimiter` against a real redis-server (its script reads
  the virtual clock through ``test_clock``),
- :class:`Model` below: plain dicts (GCRA by theoretical arrival time, a concurrency
  counter, rolling windows of 60 buckets), written from the algorithms' description.

They must agree on every decision (admitted, or which limit refused and the exact wait), on
the ``x-ratelimit-*`` values an admission reports, and on the state objects of every limit
(``limit_states``). Limits per minute are chosen to divide a minute in microseconds, so GCRA
increments are exact in both units (Redis counts µs, the ledger ns) and waits compare equal.

Hypothesis' state machines are synchronous: the machine runs in a worker thread and reaches
the trio side (the limiter's client and background tasks) with ``trio.from_thread.run``.
Every example gets its own key prefix (a uuid) and its own ledgers, so none shares state.

Two things differ between the backends by design, and the machine accounts for them: a fleet
concurrency lease expires unless renewed (the clock's jumps renew held leases every third of
the TTL, as the limiter's maintenance task does), and a refusal by concurrency waits 1 ns in
the ledger and 1 µs in Redis (only the refusing limit is compared). One caveat of the
virtual clock: Redis expires a GCRA key in real time, ``(TAT - now)`` plus a minute after
it was written; an example runs in well under a second, so no key expires early.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import coredis
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from tests.redis_server import RedisServer
from zaiproxy.core.limitspec import LIMIT_NAMES, Limits
from zaiproxy.limits import ledger as ledger_choice
from zaiproxy.limits.admission import Admission, Admitter, RateState, Refusal
from zaiproxy.limits.fleet import FleetKeys, FleetLimiter
from zaiproxy.limits.segment import LedgerImpl, Segment

# No HTTP here at all: `make test`'s second run (h11-mypyc) has nothing new to find.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="no HTTP in this file: run once, with h11")

IMPLEMENTATIONS = ["native", "python"]

SECOND_US = 1_000_000
MINUTE_US = 60 * SECOND_US
FIVE_HOURS_US = 5 * 3600 * SECOND_US
WEEK_US = 7 * 24 * 3600 * SECOND_US
BUCKETS = 60
NS_PER_US = 1000
START_US = 1_700_000_000 * SECOND_US
LEASE_TTL_S = 3600.0  # the longest the product allows; leases are renewed as the product does
RENEW_US = int(LEASE_TTL_S * SECOND_US) // 3  # FleetLimiter renews every third of the TTL

# Every limit per minute divides 60_000_000 µs: increments are whole µs (and whole ns).
PER_MINUTE = [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20, 25, 30, 40, 50, 60, 100, 120, 1000]
assert all(MINUTE_US % v == 0 for v in PER_MINUTE)

# The setting -> (kind, period in µs, weighted by tokens), in the order plans list them.
SPECS: dict[str, tuple[str, int, bool]] = {
    "requests_per_minute": ("gcra", MINUTE_US, False),
    "tokens_per_minute": ("gcra", MINUTE_US, True),
    "concurrency": ("conc", 0, False),
    "requests_per_5h": ("window", FIVE_HOURS_US, False),
    "tokens_per_5h": ("window", FIVE_HOURS_US, True),
    "requests_per_week": ("window", WEEK_US, False),
    "tokens_per_week": ("window", WEEK_US, True),
}
assert tuple(SPECS) == LIMIT_NAMES

_ledger_ids = itertools.count()


# ---- the reference model ----------------------------------------------------------------------


@dataclass(frozen=True)
class MOp:
    """One limit of a model plan; ``key`` names its state (shared by every plan that has it)."""

    key: tuple[str, ...]
    scope: str
    name: str
    kind: str  # "gcra" | "conc" | "window"
    limit: int
    period: int  # µs
    weighted: bool


@dataclass
class MAdmission:
    ops: tuple[MOp, ...]
    tokens: int
    epochs: tuple[int, ...]  # per op: the window bucket taken (0 for the others)


@dataclass(frozen=True)
class MRefusal:
    index: int  # position of the refusing op in the plan
    retry_us: int  # exact wait in µs, -1 = can never pass (concurrency: 1, a placeholder)
    cost: int


def increment(cost: int, limit: int, period: int) -> int:
    """ceil(cost * period / limit)."""
    return -(-cost * period // limit)


class Model:
    """Every limit's state in plain dicts, times in µs."""

    def __init__(self) -> None:
        self.tat: dict[tuple[str, ...], int] = {}
        self.in_use: dict[tuple[str, ...], int] = {}
        self.buckets: dict[tuple[str, ...], dict[int, int]] = {}

    @staticmethod
    def plan(alias: str | None, key_limits: Limits | None, global_limits: Limits,
             upstream_limits: Limits) -> tuple[MOp, ...]:
        scopes: list[tuple[str, tuple[str, ...], Limits]] = [
            ("global", ("global",), global_limits), ("upstream", ("upstream",), upstream_limits)]
        if alias is not None and key_limits is not None:
            scopes.insert(0, ("key", ("key", alias), key_limits))
        ops = []
        for scope, ident, limits in scopes:
            for name, (kind, period, weighted) in SPECS.items():
                value = getattr(limits, name)
                if value is not None:
                    ops.append(MOp((*ident, name), scope, name, kind, value, period, weighted))
        return tuple(ops)

    # -- windows: a bucket is live while its epoch is within the last 60 of now's
    def _live(self, op: MOp, now: int) -> tuple[int, int, dict[int, int]]:
        bucket = op.period // BUCKETS
        epoch = now // bucket
        counts = self.buckets.setdefault(op.key, {})
        for e in [e for e in counts if e <= epoch - BUCKETS]:
            del counts[e]
        return bucket, epoch, counts

    def window_used(self, op: MOp, now: int) -> int:
        return sum(self._live(op, now)[2].values())

    def _check(self, op: MOp, cost: int, now: int) -> tuple[int, int]:
        """(0, epoch) if ``cost`` fits now, else (wait in µs or -1, 0); nothing changes."""
        if op.kind == "gcra":
            if cost > op.limit:
                return -1, 0
            new = max(self.tat.get(op.key, 0), now) + increment(cost, op.limit, op.period)
            return (new - op.period - now, 0) if new - now > op.period else (0, 0)
        if op.kind == "conc":
            return (1, 0) if self.in_use.get(op.key, 0) >= op.limit else (0, 0)
        if cost > op.limit:
            return -1, 0
        bucket, epoch, counts = self._live(op, now)
        used = sum(counts.values())
        if used <= op.limit - cost:
            return 0, epoch
        freed = 0
        for e in range(epoch - BUCKETS + 1, epoch + 1):  # the oldest bucket leaves first
            freed += counts.get(e, 0)
            if used - freed <= op.limit - cost:
                return (e + BUCKETS) * bucket - now, 0
        raise AssertionError("a cost within the quota always fits once every bucket left")

    def admit(self, ops: tuple[MOp, ...], tokens: int, now: int) -> MAdmission | MRefusal:
        """Every op or none (the ops of one plan have distinct keys: check all, then take)."""
        epochs = []
        for i, op in enumerate(ops):
            cost = tokens if op.weighted else 1
            retry, epoch = self._check(op, cost, now)
            if retry != 0:
                return MRefusal(i, retry, cost)
            epochs.append(epoch)
        for op, epoch in zip(ops, epochs, strict=True):
            cost = tokens if op.weighted else 1
            if op.kind == "gcra":
                self.tat[op.key] = (max(self.tat.get(op.key, 0), now)
                                    + increment(cost, op.limit, op.period))
            elif op.kind == "conc":
                self.in_use[op.key] = self.in_use.get(op.key, 0) + 1
            else:
                counts = self._live(op, now)[2]
                counts[epoch] = counts.get(epoch, 0) + cost
        return MAdmission(ops, tokens, tuple(epochs))

    def settle(self, adm: MAdmission, used: int | None, now: int) -> None:
        """Release the leases; charge (at now) or refund (into the admission's bucket) the
        difference between the tokens used and those reserved; None keeps the reservation."""
        for op in adm.ops:
            if op.kind == "conc":
                self.in_use[op.key] = max(self.in_use.get(op.key, 0) - 1, 0)
        if used is None or used == adm.tokens:
            return
        delta = used - adm.tokens
        for op, epoch in zip(adm.ops, adm.epochs, strict=True):
            if not op.weighted:
                continue
            if op.kind == "gcra":
                inc = increment(abs(delta), op.limit, op.period)
                tat = self.tat.get(op.key, 0)
                self.tat[op.key] = max(tat, now) + inc if delta > 0 else max(tat - inc, 0)
                continue
            _, now_epoch, counts = self._live(op, now)
            if delta > 0:
                counts[now_epoch] = counts.get(now_epoch, 0) + delta
            elif epoch > now_epoch - BUCKETS:  # a bucket that left the window is gone
                counts[epoch] = counts.get(epoch, 0) - min(counts.get(epoch, 0), -delta)

    def gcra_state(self, op: MOp, now: int) -> tuple[int, int]:
        used = max(self.tat.get(op.key, 0), now) - now
        room = op.period - used
        return (room * op.limit // op.period if room > 0 else 0), used

    def state(self, op: MOp, now: int) -> dict[str, Any]:
        """The state object ``limit_states`` reports (limits/report.py has the shapes)."""
        if op.kind == "gcra":
            remaining, used = self.gcra_state(op, now)
            return {"limit": op.limit, "remaining": remaining, "reset_s": round(used / 1e6, 3)}
        if op.kind == "conc":
            in_use = self.in_use.get(op.key, 0)
            return {"limit": op.limit, "in_use": in_use, "remaining": max(0, op.limit - in_use)}
        bucket, epoch, counts = self._live(op, now)
        used = sum(counts.values())
        release, releases = 0, 0
        for e in range(epoch - BUCKETS + 1, epoch + 1):
            if counts.get(e, 0) > 0:
                release, releases = (e + BUCKETS) * bucket - now, counts[e]
                break
        return {"limit": op.limit, "used": used, "remaining": max(0, op.limit - used),
                "reset_s": round(release / 1e6, 3), "releases": releases}

    def rate_states(self, ops: tuple[MOp, ...],
                    now: int) -> tuple[RateState | None, RateState | None]:
        """The tightest requests/min and tokens/min limit (the ``x-ratelimit-*`` headers)."""
        requests: RateState | None = None
        tokens: RateState | None = None
        for op in ops:
            if op.kind != "gcra":
                continue
            remaining, used = self.gcra_state(op, now)
            state = RateState(op.limit, remaining, used * NS_PER_US)
            if op.weighted:
                if tokens is None or remaining < tokens.remaining:
                    tokens = state
            elif requests is None or remaining < requests.remaining:
                requests = state
        return requests, tokens


# ---- building the two backends ------------------------------------------------------------------


def private_ledger(impl: LedgerImpl) -> Segment:
    """A private segment, as zaiproxy/run/worker.py ``open_ledger`` makes one (unlinked at once)."""
    path = f"/dev/shm/zaiproxy-test-fleet-model-{os.getpid()}-{next(_ledger_ids)}"
    segment = impl.Ledger(path, create=True, rows=512, windows=64, workers=1)
    segment.unlink()
    return segment


def make_admitter(impl: LedgerImpl, segment: Segment, global_limits: Limits,
                  upstream_limits: Limits, clock_ns: Any) -> Admitter:
    return Admitter(segment, impl, worker=0, global_limits=global_limits,
                    upstream_limits=upstream_limits, upstream_id=b"upstream\0x", adaptive=False,
                    clock=clock_ns)


def make_fleet(impl: LedgerImpl, url: str, prefix: str, global_limits: Limits,
               upstream_limits: Limits, clock_us: Any) -> tuple[FleetLimiter, Segment]:
    """A FleetLimiter with its own client and its own private ledger (the fail policy's)."""
    segment = private_ledger(impl)
    local = make_admitter(impl, segment, global_limits, upstream_limits,
                          lambda: clock_us() * NS_PER_US)
    client = coredis.Redis.from_url(url, decode_responses=False)
    limiter = FleetLimiter(client=client, local=local, keys=FleetKeys(prefix, "up0"),
                           segment=segment, global_limits=global_limits,
                           upstream_limits=upstream_limits, adaptive=False, worker=0,
                           lease_ttl_s=LEASE_TTL_S, command_timeout_s=1.0, fail="closed",
                           share=1.0)
    limiter.test_clock = clock_us
    return limiter, segment


async def start_limiter(nursery: trio.Nursery,
                        limiter: FleetLimiter) -> tuple[trio.CancelScope, trio.Event]:
    """``limiter.run`` in ``nursery`` until the returned scope is cancelled (the event is set
    once it has stopped and closed its client)."""
    scope = trio.CancelScope()
    done = trio.Event()

    async def runner(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await limiter.run(task_status=task_status)
        finally:
            done.set()

    await nursery.start(runner)
    return scope, done


async def stop_limiter(scope: trio.CancelScope, done: trio.Event) -> None:
    scope.cancel()
    await done.wait()


# ---- the state machine ------------------------------------------------------------------------


def optional(strategy: st.SearchStrategy[int]) -> st.SearchStrategy[int | None]:
    """Unset two times in three: a plan of four scopes still has a few limits, not twenty."""
    return st.one_of(st.none(), st.none(), strategy)


def limits_strategy() -> st.SearchStrategy[Limits]:
    """Limits small enough to refuse often (with a wait), in every field, each set or not."""
    return st.builds(
        Limits,
        requests_per_minute=optional(st.sampled_from(PER_MINUTE[:8]) | st.sampled_from(PER_MINUTE)),
        tokens_per_minute=optional(st.sampled_from([20, 30, 40, 50, 60, 100, 120, 1000])),
        concurrency=optional(st.integers(1, 3)),
        requests_per_5h=optional(st.integers(1, 6)),
        tokens_per_5h=optional(st.sampled_from([40, 60, 100, 250])),
        requests_per_week=optional(st.integers(1, 8)),
        tokens_per_week=optional(st.sampled_from([60, 150, 500])),
    )


ALIASES: tuple[str | None, ...] = (None, "k", "j")  # open mode, and two client keys


class FleetMachine(RuleBasedStateMachine):
    """Set per test run (a subclass per implementation): where and with what to run."""

    impl_name = "native"
    redis_url = ""
    nursery: trio.Nursery

    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.impl = ledger_choice.load(self.impl_name)
        self.now = START_US
        self.renewed = START_US  # when the lease renewer last ran (virtual time)
        self.model = Model()
        self.segments: list[Segment] = []
        self.running: tuple[trio.CancelScope, trio.Event] | None = None
        # Per alias: (the ledger's plan, the fleet's plan, the model's ops).
        self.plans: list[tuple[Any, Any, tuple[MOp, ...]]] = []

    def clock_us(self) -> int:
        return self.now

    @initialize(global_limits=limits_strategy(), upstream_limits=limits_strategy(),
                key_limits=st.lists(limits_strategy(), min_size=2, max_size=2),
                start=st.integers(0, WEEK_US))
    def setup(self, global_limits: Limits, upstream_limits: Limits, key_limits: list[Limits],
              start: int) -> None:
        self.now = self.renewed = START_US + start  # any phase of the windows' buckets
        shm_segment = private_ledger(self.impl)
        self.segments.append(shm_segment)
        self.shm = make_admitter(self.impl, shm_segment, global_limits, upstream_limits,
                                 lambda: self.now * NS_PER_US)
        self.fleet, fleet_segment = make_fleet(self.impl, self.redis_url, uuid.uuid4().hex,
                                               global_limits, upstream_limits, self.clock_us)
        self.segments.append(fleet_segment)
        self.running = trio.from_thread.run(start_limiter, self.nursery, self.fleet)
        per_alias = dict(zip(ALIASES[1:], key_limits, strict=True))
        for alias in ALIASES:
            limits = per_alias.get(alias)
            mops = self.model.plan(alias, limits, global_limits, upstream_limits)
            shm_plan = self.shm.plan(alias, limits)
            fleet_plan = self.fleet.plan(alias, limits)
            # The same limits in the same order in all three.
            described = [(op.scope, op.name, op.limit) for op in mops]
            assert [(op.scope, op.name, op.limit) for op in shm_plan.ops] == described
            assert [(op.scope, op.name, op.limit) for op in fleet_plan.ops] == described
            self.plans.append((shm_plan, fleet_plan, mops))

    def teardown(self) -> None:
        if self.running is not None:
            trio.from_thread.run(stop_limiter, *self.running)
            self.running = None
        for segment in self.segments:
            segment.close()

    # -- steps

    @rule(target=held, which=st.integers(0, len(ALIASES) - 1),
          tokens=st.one_of(*[st.integers(0, 30)] * 4, st.integers(31, 150)))
    def admit(self, which: int, tokens: int) -> Any:
        shm_plan, fleet_plan, mops = self.plans[which]

        async def both() -> tuple[Any, ...]:
            shm = self.shm.admit_now(shm_plan, tokens)
            shm_rates = self.shm.rate_states(shm_plan)
            fleet = await self.fleet.admit(fleet_plan, tokens)
            return shm, fleet, shm_rates, self.fleet.rate_states(fleet_plan)

        shm, fleet, shm_rates, fleet_rates = trio.from_thread.run(both)
        want = self.model.admit(mops, tokens, self.now)
        if isinstance(want, MAdmission):
            assert isinstance(shm, Admission), (want, shm)
            assert isinstance(fleet, Admission), (want, fleet)
            # The bucket each window reservation went into (its refund goes back there).
            for i, op in enumerate(mops):
                if op.kind == "window":
                    assert shm.epochs[i] == fleet.epochs[i] == want.epochs[i], (op, shm, fleet)
        else:
            op = mops[want.index]
            assert isinstance(shm, Refusal), (want, op, shm)
            assert isinstance(fleet, Refusal), (want, op, fleet)
            assert (shm.op.scope, shm.op.name) == (op.scope, op.name), (want, op, shm)
            assert (fleet.op.scope, fleet.op.name) == (op.scope, op.name), (want, op, fleet)
            assert shm.cost == fleet.cost == want.cost
            if op.kind == "conc":
                assert shm.retry_ns > 0 and fleet.retry_ns > 0, (shm, fleet)
            else:
                expected = want.retry_us * NS_PER_US if want.retry_us > 0 else want.retry_us
                assert shm.retry_ns == fleet.retry_ns == expected, (op, shm, fleet, expected)
        # The x-ratelimit-* values of this answer (after it: taken or not).
        model_rates = self.model.rate_states(mops, self.now)
        assert shm_rates == model_rates, (shm_rates, model_rates)
        assert fleet_rates == model_rates, (fleet_rates, model_rates)
        if isinstance(want, MAdmission):
            return multiple((want, shm, fleet))
        return multiple()

    @rule(admission=consumes(held), how=st.sampled_from(["less", "more", "any"]),
          amount=st.integers(0, 60))
    def settle(self, admission: tuple[MAdmission, Admission, Admission], how: str,
               amount: int) -> None:
        """Fewer tokens used than reserved (a refund), more (a charge), or anything."""
        tokens = admission[0].tokens
        used = {"less": max(0, tokens - 1 - amount), "more": tokens + 1 + amount,
                "any": amount * 25}[how]
        self.finish(admission, used)

    @rule(admission=consumes(held), keep=st.booleans())
    def settle_as_reserved(self, admission: tuple[MAdmission, Admission, Admission],
                           keep: bool) -> None:
        """Usage unknown (None: the reservation stands) or exactly what was reserved."""
        self.finish(admission, None if keep else admission[0].tokens)

    def finish(self, admission: tuple[MAdmission, Admission, Admission], used: int | None) -> None:
        want, shm, fleet = admission

        async def both() -> None:
            self.shm.settle(shm, used)
            self.fleet.settle(fleet, used)  # queued ...
            await self.fleet.flush()  # ... and sent
            assert not self.fleet._pending

        trio.from_thread.run(both)
        self.model.settle(want, used, self.now)

    @rule(dt=st.one_of(
        st.integers(0, 3 * SECOND_US),  # within a minute's GCRA
        st.integers(50 * SECOND_US, 70 * SECOND_US),  # about a minute: GCRA resets
        st.integers(4 * 60 * SECOND_US, 11 * 60 * SECOND_US),  # a 5 h bucket or two
        st.sampled_from([FIVE_HOURS_US - 1, FIVE_HOURS_US, FIVE_HOURS_US + 1, WEEK_US]),
        st.integers(FIVE_HOURS_US, 2 * WEEK_US),  # whole windows go
    ))
    def advance(self, dt: int) -> None:
        self.advance_to(self.now + dt)

    @rule(period=st.sampled_from([FIVE_HOURS_US, WEEK_US]), offset=st.integers(-2, 2))
    def to_bucket_edge(self, period: int, offset: int) -> None:
        """Land next to the next bucket boundary of a window (just before, on, just after)."""
        bucket = period // BUCKETS
        self.advance_to(max(self.now, (self.now // bucket + 1) * bucket + offset))

    def advance_to(self, target: int) -> None:
        """Move the clock; while leases are held, renew them every third of their TTL on the
        way, as FleetLimiter's maintenance task does (in the ledger a slot never expires)."""
        while self.fleet._leases and target - self.renewed > RENEW_US:
            self.now = self.renewed = max(self.now, self.renewed + RENEW_US)
            trio.from_thread.run(self.fleet._renew)
        self.now = target
        if not self.fleet._leases:
            self.renewed = target

    # -- what every step must leave equal

    @invariant()
    def states_agree(self) -> None:
        if not self.plans:
            return

        async def states() -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
            return [(await self.shm.limit_states(shm_plan.ops),
                     await self.fleet.limit_states(fleet_plan.ops))
                    for shm_plan, fleet_plan, _ in self.plans]

        got = trio.from_thread.run(states)
        for (shm, fleet), (_, _, mops) in zip(got, self.plans, strict=True):
            want = [self.model.state(op, self.now) for op in mops]
            for op, s, f, w in zip(mops, shm, fleet, want, strict=True):
                assert s == w, ("ledger", op, s, w)
                assert f == w, ("fleet", op, f, w)


MACHINE_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_fleet_ledger_and_model_agree(impl: str, redis_server: RedisServer) -> None:
    async with trio.open_nursery() as nursery:
        machine = type(f"FleetMachine_{impl}", (FleetMachine,),
                       {"impl_name": impl, "redis_url": redis_server.url, "nursery": nursery})
        await trio.to_thread.run_sync(
            lambda: run_state_machine_as_test(machine, settings=MACHINE_SETTINGS))
        nursery.cancel_scope.cancel()


# ---- the windows live in Redis ----------------------------------------------------------------


@asynccontextmanager
async def running(limiter: FleetLimiter) -> AsyncIterator[FleetLimiter]:
    async with trio.open_nursery() as nursery:
        await nursery.start(limiter.run)
        yield limiter
        nursery.cancel_scope.cancel()


async def test_fleet_windows_survive_the_process(redis_server: RedisServer) -> None:
    """Another limiter (a new client, as a restarted or second pod would have) sees the
    windows the first one filled: their state is in Redis, not in the process."""
    impl = ledger_choice.load()
    prefix = uuid.uuid4().hex
    limits = Limits(requests_per_5h=3, tokens_per_week=100)
    now = START_US + 123 * SECOND_US
    segments = []

    def clock() -> int:
        return now

    first, segment = make_fleet(impl, redis_server.url, prefix, limits, Limits(), clock)
    segments.append(segment)
    async with running(first):
        plan = first.plan(None, None)
        for _ in range(3):
            admission = await first.admit(plan, 10)
            assert isinstance(admission, Admission)
            first.settle(admission, 20)  # 10 more tokens than reserved
        await first.flush()
        await first.aclose()

    now += 7 * SECOND_US
    second, segment = make_fleet(impl, redis_server.url, prefix, limits, Limits(), clock)
    segments.append(segment)
    try:
        async with running(second):
            plan = second.plan(None, None)
            bucket_5h = FIVE_HOURS_US // BUCKETS
            epoch = (START_US + 123 * SECOND_US) // bucket_5h
            release_s = round(((epoch + BUCKETS) * bucket_5h - now) / 1e6, 3)
            states = await second.limit_states(plan.ops)
            assert states[0] == {"limit": 3, "used": 3, "remaining": 0, "reset_s": release_s,
                                 "releases": 3}
            assert states[1]["used"] == 60 and states[1]["remaining"] == 40
            refusal = await second.admit(plan, 1)
            assert isinstance(refusal, Refusal)
            assert (refusal.op.scope, refusal.op.name) == ("global", "requests_per_5h")
            assert refusal.retry_ns == ((epoch + BUCKETS) * bucket_5h - now) * NS_PER_US
            # Once the 5 h window has moved past those requests, the second limiter admits.
            now = (epoch + BUCKETS) * bucket_5h
            admission = await second.admit(plan, 1)
            assert isinstance(admission, Admission)
            states = await second.limit_states(plan.ops)
            assert states[0]["used"] == 1 and states[1]["used"] == 61
    finally:
        for segment in segments:
            segment.close()
