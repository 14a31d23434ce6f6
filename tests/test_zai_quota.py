"""Z.AI's quota in the proxy (limits/zai_quota.py): the rows workers read, the original's
/health shape, and pacing on explicit clocks.

The end-to-end tests (a real proxy polling the real mock, pacing on a virtual clock against
the mock's quota endpoint, one poller per host and per fleet) are in test_zai_quota_procs.py.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from zaiproxy.core.config import Config
from zaiproxy.limits import ledger as ledger_mod
from zaiproxy.limits.zai_quota import (
    Decision,
    PaceBoard,
    PaceSettings,
    QuotaBoard,
    QuotaPacer,
    QuotaPoller,
)
from zaiproxy.run.worker import open_ledger
from zaiproxy.upstream.quota import QuotaSample, QuotaWindow

# Pure bookkeeping: independent of the HTTP implementation.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="no HTTP here: run once, with h11")

T0 = 1_800_000_000.0  # a wall clock
H = 3600.0


def sample(five: float, weekly: float | None = None, *, reset5: float = T0 + 5 * H,
           resetw: float = T0 + 100 * H, tier: str | None = "pro") -> QuotaSample:
    windows = [QuotaWindow("five_hour", "TOKENS_LIMIT", five, reset5)]
    if weekly is not None:
        windows.append(QuotaWindow("weekly", "TOKENS_LIMIT", weekly, resetw))
    return QuotaSample(tier, tuple(windows))


@pytest.fixture
def segment():  # type: ignore[no-untyped-def]
    config = Config(api_key="k", workers=1)
    seg = open_ledger(ledger_mod.load(config.ledger), config, None)
    yield seg
    seg.close()


CONFIG = dataclasses.replace(Config(api_key="k"), quota_poll=True, quota_interval=60.0,
                             quota_stale_after=900.0)


# ---- the rows ------------------------------------------------------------------------------

def test_a_sample_reaches_every_reader_through_the_rows(segment) -> None:  # type: ignore[no-untyped-def]
    writer, reader = QuotaBoard(segment), QuotaBoard(segment)  # the poller, a worker
    assert reader.view(CONFIG).last_success_at is None
    writer.record("success", T0, sample(0.42, 0.1))
    view = reader.view(CONFIG)
    assert view.last_success_at == T0 and view.last_outcome == "success"
    assert view.plan_tier == "pro"
    assert [(w.window, w.limit_type, w.used_fraction, w.reset_at) for w in view.windows] == [
        ("five_hour", "TOKENS_LIMIT", 0.42, T0 + 5 * H),
        ("weekly", "TOKENS_LIMIT", 0.1, T0 + 100 * H)]
    # A failure keeps the last good sample, and says what happened.
    writer.record("error", T0 + 60)
    view = reader.view(CONFIG)
    assert view.last_outcome == "error" and view.last_success_at == T0
    assert view.windows[0].used_fraction == 0.42
    assert view.counts == {"success": 1, "error": 1, "malformed": 0, "stale": 0}
    assert reader.sequence() == 1


def test_health_is_the_originals_shape(segment) -> None:  # type: ignore[no-untyped-def]
    board = QuotaBoard(segment)
    assert dataclasses.replace(board.view(CONFIG), enabled=False).health(T0) == {
        "enabled": False, "fresh": False}
    board.record("success", T0, sample(0.5))
    assert board.view(CONFIG).health(T0 + 30) == {
        "enabled": True, "fresh": True, "interval": "1m0s", "stale_after": "15m0s",
        "last_success_at": "2027-01-15T08:00:00Z", "sample_age_seconds": 30.0,
        "last_outcome": "success", "plan_tier": "pro",
        "windows": [{"window": "five_hour", "limit_type": "TOKENS_LIMIT", "used_fraction": 0.5,
                     "reset_at": "2027-01-15T13:00:00Z"}]}
    stale = board.view(CONFIG).health(T0 + 901)
    assert stale["fresh"] is False and stale["sample_age_seconds"] == 901.0
    report = board.view(CONFIG).report(T0 + 901, None)
    assert report["stale"] is True and report["windows"][0]["used_pct"] == 50.0
    assert report["windows"][0]["reset_in_s"] == 5 * H - 901


def test_stale_is_counted_once_per_transition(segment) -> None:  # type: ignore[no-untyped-def]
    now = [T0]
    poller = QuotaPoller(segment, CONFIG, wall=lambda: now[0]).first
    # Never succeeded: the first failure is also the first stale.
    poller.polls = 1
    poller._failed("error", "refused", now[0])
    counts = poller.board.view(CONFIG).counts
    assert (counts["error"], counts["stale"]) == (1, 1)
    poller.board.record("success", now[0], sample(0.1))
    poller._got(sample(0.1), now[0])
    poller.stale = False
    for minute in range(1, 30):  # failing for half an hour: stale once, after 15 minutes
        now[0] = T0 + 60 * minute
        poller._failed("error", "refused", now[0])
    counts = poller.board.view(CONFIG).counts
    assert (counts["error"], counts["stale"]) == (30, 2)
    assert poller.board.view(CONFIG).last_outcome == "error"


def test_the_pace_board_carries_the_gate_to_workers(segment) -> None:  # type: ignore[no-untyped-def]
    board, worker = PaceBoard(segment), PaceBoard(segment)
    assert worker.closed_until_ms() == 0
    board.write(Decision(0.25, T0 + 100, "weekly"), {"five_hour": 1e-5})
    assert worker.closed_until_ms() == (T0 + 100) * 1000 and worker.gate_window() == "weekly"
    view = worker.view(True)
    assert (view.rate_rps, view.closed(T0), view.closed(T0 + 100)) == (0.25, True, False)
    assert view.cost == {"five_hour": pytest.approx(1e-5)}
    follower = PaceBoard(segment)
    follower.copy(board.raw())
    assert follower.raw() == board.raw()


# ---- pacing ----------------------------------------------------------------------------------

def test_no_rate_until_a_cost_is_measured_and_the_reserve_closes_at_once() -> None:
    pacer = QuotaPacer(PaceSettings(reserve=0.05))
    assert pacer.decide(T0, 0) == Decision(None, None, None)
    pacer.on_sample(sample(0.5), T0, 0)
    assert pacer.decide(T0, 0) == Decision(None, None, None)  # no cost: no guess
    pacer.on_sample(sample(0.96), T0 + 60, 10)
    d = pacer.decide(T0 + 60, 10)
    assert (d.closed_until, d.window) == (T0 + 5 * H, "five_hour")


def test_the_cost_is_measured_across_whole_percent_steps() -> None:
    pacer = QuotaPacer(PaceSettings(alpha=1.0))
    pacer.on_sample(sample(0.10), T0, 0)
    pacer.on_sample(sample(0.10), T0 + 60, 40)  # Z.AI still says 10 %: keep counting
    assert pacer.cost == {}
    pacer.on_sample(sample(0.11), T0 + 120, 100)  # 1 % over the 100 answers since 10 %
    assert pacer.cost["five_hour"] == pytest.approx(0.0001)
    # 4.89 h left, 84 % to spend: the rate makes it last exactly.
    d = pacer.decide(T0 + 120, 100)
    assert d.rate_rps == pytest.approx(0.84 / (5 * H - 120) / 0.0001)
    assert d.window == "five_hour" and d.closed_until is None


def test_the_projection_counts_answers_since_the_sample() -> None:
    pacer = QuotaPacer(PaceSettings(alpha=1.0, reserve=0.05))
    pacer.on_sample(sample(0.80), T0, 0)
    pacer.on_sample(sample(0.90), T0 + 60, 1000)  # 0.0001 per answer
    assert pacer.decide(T0 + 61, 1000).closed_until is None
    # 500 answers later (before the next poll) the projection is at 95 %: closed.
    d = pacer.decide(T0 + 70, 1500)
    assert d.closed_until == T0 + 5 * H


def test_the_tightest_window_sets_the_rate() -> None:
    pacer = QuotaPacer(PaceSettings(alpha=1.0))
    pacer.on_sample(sample(0.10, 0.50), T0, 0)
    pacer.on_sample(sample(0.20, 0.51), T0 + 60, 1000)
    d = pacer.decide(T0 + 60, 1000)
    five = (0.95 - 0.20) / (5 * H - 60) / 1e-4
    weekly = (0.95 - 0.51) / (100 * H - 60) / 1e-5
    assert d.rate_rps == pytest.approx(min(five, weekly))
    assert d.window == ("five_hour" if five < weekly else "weekly")


def test_a_stale_sample_never_tightens() -> None:
    pacer = QuotaPacer(PaceSettings(alpha=1.0, stale_after_s=900.0))
    pacer.on_sample(sample(0.10), T0, 0)
    pacer.on_sample(sample(0.20), T0 + 60, 1000)
    fresh = pacer.decide(T0 + 60, 1000)
    assert fresh.rate_rps is not None
    # No new sample for longer than stale_after: the last fresh cap is held as it was, not
    # recomputed, whatever the traffic since (a projection would close the gate here) ...
    assert pacer.decide(T0 + 60 + 901, 10**9) == fresh
    # ... until its window resets.
    assert pacer.decide(T0 + 5 * H + 1, 10**9) == Decision(None, None, None)
    # A stale sample that says "over the reserve" does not close the gate either.
    late = QuotaPacer(PaceSettings(stale_after_s=900.0))
    late.on_sample(sample(0.99), T0, 0)
    assert late.decide(T0 + 901, 0) == Decision(None, None, None)
    # A gate closed while the sample was fresh holds until the window's reset only.
    held = QuotaPacer(PaceSettings(stale_after_s=900.0))
    held.on_sample(sample(0.99), T0, 0)
    assert held.decide(T0 + 1, 0).closed_until == T0 + 5 * H
    assert held.decide(T0 + 2000, 0).closed_until == T0 + 5 * H
    assert held.decide(T0 + 5 * H + 1, 0) == Decision(None, None, None)


def test_rises_are_smoothed_per_sample_and_falls_are_at_once() -> None:
    pacer = QuotaPacer(PaceSettings(alpha=1.0, max_increase=0.2))
    pacer.on_sample(sample(0.10), T0, 0)
    pacer.on_sample(sample(0.50), T0 + 60, 1000)  # expensive: a low rate
    low = pacer.decide(T0 + 60, 1000).rate_rps
    assert low is not None
    pacer.on_sample(sample(0.51), T0 + 120, 101_000)  # suddenly cheap: 100x the rate
    assert pacer.decide(T0 + 120, 101_000).rate_rps == pytest.approx(low * 1.2)
    pacer.on_sample(sample(0.91), T0 + 180, 101_001)  # suddenly dear: falls at once
    high_cost = pacer.decide(T0 + 180, 101_001).rate_rps
    assert high_cost is not None and high_cost < low / 100


def test_a_reset_relaxes_pacing() -> None:
    pacer = QuotaPacer(PaceSettings(alpha=1.0, reserve=0.05))
    pacer.on_sample(sample(0.80, reset5=T0 + 600), T0, 0)
    pacer.on_sample(sample(0.96, reset5=T0 + 600), T0 + 60, 1600)
    assert pacer.decide(T0 + 60, 1600).closed_until == T0 + 600  # at the reserve: closed
    # The reset time passed: open, and no cap, before any new sample says so.
    assert pacer.decide(T0 + 601, 1600) == Decision(None, None, None)
    # The next sample shows the new window: paced for a whole window on the cost measured
    # before (1e-4 per answer), not closed.
    pacer.on_sample(sample(0.0, reset5=T0 + 600 + 5 * H), T0 + 660, 1700)
    after = pacer.decide(T0 + 660, 1700)
    assert after.closed_until is None
    assert after.rate_rps == pytest.approx(0.95 / (5 * H - 60) / 1e-4)


def test_a_fresh_sample_with_room_opens_the_gate_before_the_reset() -> None:
    pacer = QuotaPacer(PaceSettings(reserve=0.05))
    pacer.on_sample(sample(0.97), T0, 0)
    assert pacer.decide(T0, 0).closed_until == T0 + 5 * H
    pacer.on_sample(sample(0.40), T0 + 60, 0)  # e.g. Z.AI reset the account early
    assert pacer.decide(T0 + 60, 0).closed_until is None

