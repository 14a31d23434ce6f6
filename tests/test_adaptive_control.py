"""The supervisor's RateController on a real ledger segment: the workers' counting
(``Admitter.note_upstream``), the tick, the published scalars, the state file and what
``/admin/keys`` makes of them. Explicit clocks: ``now`` is the supervisor's monotonic time,
the wall clock is ``WALL + now``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from zaiproxy.core.config import Config
from zaiproxy.core.limitspec import Limits
from zaiproxy.limits import ledger as ledger_mod
from zaiproxy.limits.admission import Admitter
from zaiproxy.limits.cells import (
    SC_ADAPTIVE_CEILING_MRPS,
    SC_ADAPTIVE_EPOCH,
    SC_ADAPTIVE_MRPS,
    SC_ADAPTIVE_REASON,
    SC_ADAPTIVE_RESET,
    SC_ADAPTIVE_THROTTLED_AT_MS,
    SC_ADJUST_DOWN,
    upstream_key_id,
)
from zaiproxy.limits.ratecontrol import RateController
from zaiproxy.limits.report import adaptive_state
from zaiproxy.run.worker import open_ledger

WALL = 1_700_000_000.0
KEY = "upstream-secret-key-0123456789"


class Host:
    """A segment, two workers' admitters and the controller, on one explicit clock."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.config = dataclasses.replace(
            Config(api_key=KEY, workers=2), adaptive_max_rps=1000.0, **overrides)
        impl = ledger_mod.load(self.config.ledger)
        self.segment = open_ledger(impl, self.config, None)
        self.workers = [
            Admitter(self.segment, impl, worker=i, global_limits=Limits(),
                     upstream_limits=Limits(), upstream_id=b"upstream", adaptive=True)
            for i in range(2)]
        self.now = 0.0
        self.state_file = tmp_path / "adaptive.json"
        self.controller = self.start()

    def start(self) -> RateController:
        return RateController(self.segment, self.config, str(self.state_file),
                              wall=lambda: WALL + self.now)

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds
        self.controller.tick(self.now)

    def throttle(self, cls: str = "frequency", *, requests: int = 3, worker: int = 0) -> None:
        """``requests`` answers of one worker, all Z.AI throttles of ``cls``, then a tick."""
        for _ in range(requests):
            self.workers[worker].note_upstream(cls)
        self.tick()

    def scalar(self, index: int) -> int:
        return int(self.segment.scalar_get(index))

    def state(self) -> Any:
        return json.loads(self.state_file.read_text())


def test_three_throttled_requests_across_workers_lower_the_rate_and_publish_why(
    tmp_path: Path,
) -> None:
    host = Host(tmp_path)
    host.controller.tick(0.0)  # the supervisor's first tick
    assert host.scalar(SC_ADAPTIVE_MRPS) == 0  # not limiting
    w0, w1 = host.workers
    for _ in range(17):
        w0.note_upstream()
    # Worker 0: one request, four attempts, all 1302; worker 1: two requests of one 1302 each.
    epoch = -1
    for _ in range(4):
        epoch = w0.note_upstream("concurrency", epoch)
    assert epoch == 0
    w1.note_upstream("concurrency")
    w1.note_upstream("frequency")
    host.tick()
    # 23 answers in the first second (span one tick): sent 23 rps, 6 of them 1302/1303.
    assert host.scalar(SC_ADAPTIVE_MRPS) == round(23 * 0.7 * 1000)
    assert host.scalar(SC_ADAPTIVE_CEILING_MRPS) == 23_000
    assert host.scalar(SC_ADAPTIVE_THROTTLED_AT_MS) == (WALL + 1) * 1000
    assert host.scalar(SC_ADAPTIVE_REASON) == 1  # concurrency: 5 of the 6 throttles
    assert host.scalar(SC_ADAPTIVE_EPOCH) == 1
    assert host.scalar(SC_ADJUST_DOWN) == 1
    assert host.state() == {"version": 2, "saved_at": WALL + 1, "keys": {upstream_key_id(KEY): {
        "rate": pytest.approx(16.1), "ceiling": 23.0, "throttled_at": WALL + 1,
        "hold_steps": 1, "reason": "concurrency"}}}
    assert adaptive_state(host.config, host.segment, WALL + 31) == {
        "enabled": True, "rate_rps": 16.1, "min_rps": 0.5, "max_rps": 1000.0,
        "ceiling_rps": 23.0, "adjustments": {"up": 0, "down": 1},
        "throttled_at": WALL + 1, "reason": "concurrency", "forget_after_s": 300.0,
        "free_in_s": 270.0}
    # The epoch moved: worker 0's request counts again if it is throttled again.
    assert w0.note_upstream("concurrency", epoch) == 1


def test_one_request_throttled_on_every_attempt_changes_nothing(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.controller.tick(0.0)
    w0 = host.workers[0]
    epoch = -1
    for second in range(8):
        w0.note_upstream()
        w0.note_upstream()
        if second in (0, 1, 3, 7):
            epoch = w0.note_upstream("frequency", epoch)
        host.tick()
    assert host.scalar(SC_ADAPTIVE_MRPS) == 0
    assert host.scalar(SC_ADAPTIVE_THROTTLED_AT_MS) == 0
    assert not host.state_file.exists()  # nothing changed, nothing saved


def test_recovery_by_time_is_published_and_the_cap_is_gone_at_300s(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.controller.tick(0.0)
    host.throttle("frequency")  # 3 answers in one tick, all throttled: sent 3 rps -> 2.1 rps
    assert host.scalar(SC_ADAPTIVE_MRPS) == 2100
    host.tick(10.0)
    assert host.scalar(SC_ADAPTIVE_MRPS) == 2700  # x2, stopped at the hold line 0.9 * 3
    for _ in range(28):
        host.tick(10.0)
    assert host.scalar(SC_ADAPTIVE_MRPS) == round(2.7 * 1.1**28 * 1000)
    host.tick(9.0)  # 299 s after the evidence
    assert host.scalar(SC_ADAPTIVE_MRPS) > 0
    host.tick()  # 300 s
    assert host.scalar(SC_ADAPTIVE_MRPS) == 0
    assert host.scalar(SC_ADAPTIVE_CEILING_MRPS) == 0
    assert host.scalar(SC_ADAPTIVE_THROTTLED_AT_MS) == 0
    assert host.scalar(SC_ADAPTIVE_REASON) == 0
    assert host.state() == {"version": 2, "saved_at": WALL + 301, "keys": {}}
    assert adaptive_state(host.config, host.segment, WALL + 301)["free_in_s"] is None


def test_a_restart_restores_a_recent_cap_and_a_stale_one_not(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.controller.tick(0.0)
    host.throttle("unknown")
    host.tick(5.0)
    host.controller.save()  # on exit: as of the last tick
    assert host.state()["keys"][upstream_key_id(KEY)]["throttled_at"] == WALL + 1

    host.now = 20.0  # restarted 14 s later; the new process's monotonic clock starts anew
    restarted = host.start()
    assert host.scalar(SC_ADAPTIVE_THROTTLED_AT_MS) == (WALL + 1) * 1000
    restarted.tick(1000.0)  # its first tick: one recovery step owed (19 s after evidence)
    assert host.scalar(SC_ADAPTIVE_MRPS) == 2700
    assert host.scalar(SC_ADAPTIVE_REASON) == 3  # unknown

    host.now = 301.0  # restarted 300 s after the evidence: nothing restored
    fresh = host.start()
    fresh.tick(0.0)
    assert host.scalar(SC_ADAPTIVE_MRPS) == 0
    assert host.scalar(SC_ADAPTIVE_THROTTLED_AT_MS) == 0


def test_another_upstream_key_does_not_inherit_the_cap(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.controller.tick(0.0)
    host.throttle("frequency")
    other = dataclasses.replace(host.config, api_key="another-upstream-key-98765")
    RateController(host.segment, other, str(host.state_file), wall=lambda: WALL + 2)
    assert host.scalar(SC_ADAPTIVE_MRPS) == 0


def test_admin_reset_forgets_the_cap_and_the_file(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.controller.tick(0.0)
    host.throttle("frequency")
    assert host.scalar(SC_ADAPTIVE_MRPS) == 2100
    host.segment.scalar_add(SC_ADAPTIVE_RESET, 1)  # POST /admin/reset-rate-limit
    host.tick()
    assert host.scalar(SC_ADAPTIVE_MRPS) == 0
    assert host.scalar(SC_ADAPTIVE_THROTTLED_AT_MS) == 0
    assert host.state() == {"version": 2, "saved_at": WALL + 2, "keys": {}}
    # Fresh evidence right after the reset is evidence again.
    host.throttle("frequency", worker=1)
    assert host.scalar(SC_ADAPTIVE_MRPS) == 2100


def test_forget_after_is_a_setting(tmp_path: Path) -> None:
    host = Host(tmp_path, adaptive_forget_after=60.0)
    host.controller.tick(0.0)
    host.throttle("frequency")
    host.tick(59.0)
    assert host.scalar(SC_ADAPTIVE_MRPS) > 0
    host.tick()
    assert host.scalar(SC_ADAPTIVE_MRPS) == 0
