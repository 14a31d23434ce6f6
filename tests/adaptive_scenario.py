"""The issue-13 adaptive-rate scenario on a virtual clock: the real proxy worker, the real mock
upstream, the supervisor's RateController, and one clock that drives all three.

Used by ``tests/test_adaptive_scenario.py`` (assertions) and runnable as a script that prints
the numbers (``python -m tests.adaptive_scenario``), so the same code measured the behaviour
before and after the redesign (docs/decisions/adaptive-rate.md has both sets).

How time works here. Nothing sleeps for real and nothing depends on the machine's speed:

- the proxy's Z.AI retry waits (``ctx.retry_sleep``) park on :class:`VirtualTime`;
- admission's GCRA clock (``admitter.clock``), the proxy's wall clock (``ctx.wall``, which the
  1308 reset time is measured from) and the controller's ``now``/``wall`` all read
  ``VirtualTime.now``;
- time only moves when every request in flight is parked in a retry wait (or there is none):
  then the clock jumps to the next due wait, calling ``RateController.tick`` at every whole
  second on the way, as the supervisor's ~1 s loop does.

The jitter is production's (``0.5 + u/2``) from a seeded generator, so a run is exactly
repeatable and still spreads the retries as a real one would.
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import trio

from tests.harness import (
    UPSTREAM_KEY,
    InProcessProxy,
    Response,
    make_config,
    request,
    start_mock,
    start_proxy,
)
from zaiproxy.limits.cells import SC_ADAPTIVE_MRPS
from zaiproxy.limits.ratecontrol import RateController

# 2026-11-27T12:00:00Z: three hours before the reset in the mock's 1308 text.
WALL0 = 1795791600.0 - 10800.0
CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
JSON = ("content-type", "application/json")


def outcome(resp: Response) -> str:
    """``ok``, ``proxy-429`` (the proxy's own limit), ``zai-<code>`` (Z.AI's answer relayed)."""
    if resp.status == 200:
        return "ok"
    if resp.header(b"x-zaiproxy-limit") is not None:
        return "proxy-429"
    code = resp.header(b"x-zai-error-code")
    if code is not None:
        return f"zai-{code.decode()}"
    return f"status-{resp.status}"


@dataclass
class VirtualTime:
    """One virtual clock for the proxy's retry waits, admission, wall time and the ticks."""

    controller: RateController | None = None
    now: float = 0.0
    last_tick: float = 0.0
    live: int = 0  # client requests sent and not yet answered
    sleepers: list[tuple[float, int, trio.Event]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    _seq: int = 0

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def sleep(self, seconds: float) -> None:
        """``ctx.retry_sleep``: parked until the clock reaches now + seconds (cancellable)."""
        event = trio.Event()
        self._seq += 1
        entry = (self.now + seconds, self._seq, event)
        self.sleepers.append(entry)
        self._poke()
        try:
            await event.wait()
        finally:
            if entry in self.sleepers:
                self.sleepers.remove(entry)
                self._poke()

    async def _quiescent(self) -> None:
        while True:
            changed = self.changed
            if len(self.sleepers) >= self.live:
                return
            await changed.wait()

    def _tick_to(self, t: float) -> None:
        """Every whole-second tick in (last_tick, t], then ``now = t``."""
        second = math.floor(self.last_tick) + 1
        while second <= t:
            self.now = float(second)
            if self.controller is not None:
                self.controller.tick(self.now)
            self.last_tick = self.now
            second += 1
        self.now = t

    async def advance_to(self, t: float) -> None:
        """Run everything due up to ``t`` (waits end, ticks happen, in time order)."""
        while True:
            await self._quiescent()
            due = min(self.sleepers, default=None)
            if due is None or due[0] > t:
                self._tick_to(max(t, self.now))
                return
            self._tick_to(max(due[0], self.now))
            for entry in [s for s in self.sleepers if s[0] <= self.now]:
                self.sleepers.remove(entry)
                entry[2].set()
            await trio.lowlevel.checkpoint()

    async def settle(self) -> None:
        """Run until no request is in flight."""
        while self.live:
            await self._quiescent()
            if not self.sleepers:
                continue
            await self.advance_to(min(self.sleepers)[0])

    def send(self, nursery: trio.Nursery, port: int, headers: list[tuple[str, str]],
             out: list[Response]) -> None:
        """Start one client request now (counted live at once, so time waits for it)."""
        self.live += 1

        async def one() -> None:
            try:
                out.append(await request(port, "POST", "/v1/chat/completions",
                                         [JSON, *headers], CHAT))
            finally:
                self.live -= 1
                self._poke()

        nursery.start_soon(one)


@dataclass
class Stack:
    proxy: InProcessProxy
    controller: RateController
    clock: VirtualTime
    nursery: trio.Nursery
    mock: str  # the mock upstream's origin (GET /mock/stats counts what reached "Z.AI")
    last: list[Response] = field(default_factory=list)  # the responses of the last burst

    @property
    def rate(self) -> float | None:
        """The published adaptive rate in requests/s; None = not limiting."""
        mrps = self.proxy.worker.ctx.ledger.scalar_get(SC_ADAPTIVE_MRPS)
        return mrps / 1000 if mrps > 0 else None

    async def burst(self, n: int, headers: list[tuple[str, str]]) -> Counter[str]:
        """n concurrent requests now, run to completion; their outcomes."""
        out: list[Response] = []
        async with trio.open_nursery() as clients:
            for _ in range(n):
                self.clock.send(clients, self.proxy.port, headers, out)
            await self.clock.settle()
        self.last = out
        return Counter(outcome(r) for r in out)

    async def steady(self, rps: float, seconds: float,
                     headers: list[tuple[str, str]] | None = None,
                     every: Callable[[float, Counter[str]], None] | None = None) -> Counter[str]:
        """``rps`` requests per second, evenly spaced, for ``seconds``; their outcomes.
        ``every(t, outcomes)`` is called after each whole second (for time lines)."""
        out: list[Response] = []
        start = self.clock.now
        n = round(rps * seconds)
        async with trio.open_nursery() as clients:
            for k in range(n):
                t = start + k / rps
                await self.clock.advance_to(t)
                self.clock.send(clients, self.proxy.port, headers or [], out)
                if every is not None and k % round(rps) == 0:  # each whole second
                    await self.clock.settle()
                    every(k / rps, Counter(outcome(r) for r in out))
            await self.clock.settle()
        await self.clock.advance_to(start + seconds)
        return Counter(outcome(r) for r in out)

    async def upstream_calls(self) -> int:
        return int((await request(self.mock, "GET", "/mock/stats")).json()["requests"])

    async def idle(self, seconds: float) -> None:
        await self.clock.advance_to(self.clock.now + seconds)


async def open_stack(nursery: trio.Nursery, state_file: str, *, seed: int = 13,
                     **overrides: Any) -> Stack:
    mock = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(mock, **overrides))
    ctx = proxy.worker.ctx
    clock = VirtualTime()
    rng = random.Random(seed)
    ctx.retry_sleep = clock.sleep
    ctx.jitter = lambda: 0.5 + rng.random() / 2  # production's seam, seeded
    ctx.wall = lambda: WALL0 + clock.now
    ctx.admitter.clock = lambda: int(clock.now * 1e9) + 10**12
    controller = RateController(ctx.ledger, ctx.config, state_file,
                                wall=lambda: WALL0 + clock.now)
    clock.controller = controller
    controller.tick(0.0)
    return Stack(proxy, controller, clock, nursery, mock)


def fmt(rate: float | None) -> str:
    return "unlimited" if rate is None else f"{rate:.4g} rps"


async def issue_scenario(stack: Stack, say: Callable[[str], None]) -> dict[str, Any]:
    """The scenario of the issue: one 1305 request, a 100-client 1305 burst, 50 normal
    requests, 90 s of 2 rps, a 100-client 1308 storm. Returns the numbers."""
    n: dict[str, Any] = {}
    n["one_1305"] = await stack.burst(1, [("x-mock-zai-code", "1305")])
    await stack.idle(1.0)
    n["rate_after_one_1305"] = stack.rate
    say(f"one request, 4 x 1305:            {dict(n['one_1305'])}; rate {fmt(stack.rate)}")
    n["burst_1305"] = await stack.burst(100, [("x-mock-zai-code", "1305")])
    await stack.idle(1.0)
    n["rate_after_burst_1305"] = stack.rate
    say(f"100 concurrent 1305:              {dict(n['burst_1305'])}; rate {fmt(stack.rate)}")
    n["normal_50"] = await stack.burst(50, [])
    say(f"50 normal requests right after:   {dict(n['normal_50'])}")
    n["light_90s"] = await stack.steady(2.0, 90.0)
    n["rate_after_light_90s"] = stack.rate
    say(f"90 s at 2 rps:                    {dict(n['light_90s'])}; rate {fmt(stack.rate)}")
    n["storm_1308"] = await stack.burst(100, [("x-mock-zai-code", "1308")])
    say(f"100 concurrent 1308:              {dict(n['storm_1308'])}")
    return n


async def throttle_scenario(stack: Stack, say: Callable[[str], None], code: str = "1303",
                            sustained: bool = False) -> dict[str, Any]:
    """An account-throttle storm, then 2 rps of clean traffic for 10 minutes: when is the last
    request refused, and when is the cap gone. The storm is 100 concurrent clients, or
    (``sustained``) 30 s of 10 rps that Z.AI all throttles."""
    n: dict[str, Any] = {}
    if sustained:
        n["storm"] = await stack.steady(10.0, 30.0, [("x-mock-zai-code", code)])
        what = f"30 s of 10 rps, all {code}:"
    else:
        n["storm"] = await stack.burst(100, [("x-mock-zai-code", code)])
        what = f"100 concurrent {code}:"
    await stack.idle(1.0)
    n["rate_after_storm"] = stack.rate
    n["reason"] = stack.controller.rate.reason
    say(f"{what:<34}{dict(n['storm'])}; rate {fmt(stack.rate)}")
    last_refused: list[float] = []
    cap_gone: list[float] = []
    rates: dict[int, float | None] = {}
    refused_before = [0]

    def every(t: float, seen: Counter[str]) -> None:
        if seen["proxy-429"] > refused_before[0]:
            last_refused.append(t)
            refused_before[0] = seen["proxy-429"]
        if stack.rate is None and not cap_gone:
            cap_gone.append(t)
        if t in (10, 20, 30, 60, 120, 240, 299, 300):
            rates[int(t)] = stack.rate

    n["light_600s"] = await stack.steady(2.0, 600.0, every=every)
    n["last_refused_s"] = last_refused[-1] if last_refused else None
    n["cap_gone_s"] = cap_gone[0] if cap_gone else None
    n["rates"] = rates
    n["rate_after_600s"] = stack.rate
    say(f"then 600 s at 2 rps:              {dict(n['light_600s'])}; last refusal "
        f"{n['last_refused_s']} s in, cap gone {n['cap_gone_s']} s in; rate at "
        + ", ".join(f"{t} s {fmt(r)}" for t, r in rates.items()))
    return n


def key_id() -> str:
    """The state file's name for the harness's upstream key (any name before format 2)."""
    from zaiproxy.limits import ratecontrol

    name = getattr(ratecontrol, "upstream_key_id", None)
    return "*" if name is None else str(name(UPSTREAM_KEY))


def write_stale_state(path: Path, version: int) -> None:
    """A state file saved 5 hours before the start with a cap of 1.2 rps (what operators saw),
    in the old format (1) or with the throttle time of the new one (2, throttled 5 h ago)."""
    saved_at = WALL0 - 5 * 3600
    if version == 1:
        doc: dict[str, Any] = {"version": 1, "rate": 1.2, "ceiling": 1.7, "saved_at": saved_at}
    else:
        doc = {"version": 2, "saved_at": saved_at, "keys": {key_id(): {
            "rate": 1.2, "ceiling": 1.7, "last_throttle": saved_at, "hold_steps": 1,
            "reason": "frequency"}}}
    path.write_bytes(orjson.dumps(doc))


async def stale_state_scenario(stack: Stack, say: Callable[[str], None]) -> dict[str, Any]:
    """A fresh start next to a 5-hour-old state file: 30 s at 2 rps."""
    n: dict[str, Any] = {"rate_at_start": stack.rate}
    n["light_30s"] = await stack.steady(2.0, 30.0)
    say(f"fresh start, 5 h old state file:  rate at start {fmt(n['rate_at_start'])}; "
        f"30 s at 2 rps: {dict(n['light_30s'])}")
    return n


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for version in (1, 2):
            async with trio.open_nursery() as nursery:
                print(f"== a stale state file (format {version}) ==")
                state = Path(tmp) / f"stale{version}.json"
                write_stale_state(state, version)
                stack = await open_stack(nursery, str(state))
                await stale_state_scenario(stack, print)
                nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            print("== the issue's scenario ==")
            stack = await open_stack(nursery, str(Path(tmp) / "a.json"))
            await issue_scenario(stack, print)
            nursery.cancel_scope.cancel()
        for code, sustained in (("1303", False), ("1302", False), ("1303", True)):
            async with trio.open_nursery() as nursery:
                print(f"== a {code} storm{' (sustained)' if sustained else ''}, then light "
                      "traffic ==")
                stack = await open_stack(nursery, str(Path(tmp) / f"b{code}{sustained}.json"))
                await throttle_scenario(stack, print, code, sustained)
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    from zaiproxy.core import logs

    logs.configure("error", proc="scenario", stream=sys.stderr.buffer)
    trio.run(main)
