"""The issue-13 scenario end to end: the real proxy worker, the real mock upstream, the
supervisor's RateController, one virtual clock (tests/adaptive_scenario.py explains it).

Before the redesign (docs/decisions/adaptive-rate.md has the full table) one request with
four 1305s capped the host at 240 rps, 100 concurrent 1305s at 19.8 rps, 32 of 50 normal
requests got the proxy's 429, 90 s of 2 rps did not move the cap, and 82 of 100 clients of a
1308 storm got the proxy's 429 instead of Z.AI's quota answer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import trio

from tests.adaptive_scenario import issue_scenario, open_stack, throttle_scenario

RESET_1308 = b"2026-11-27T15:00:00Z"  # the mock's "2026-11-27 23:00:00" (Beijing)


def quiet(_: str) -> None:
    pass


async def test_overload_caps_nothing_and_a_quota_storm_reaches_clients_as_quota(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    stack = await open_stack(nursery, str(tmp_path / "adaptive.json"))
    n = await issue_scenario(stack, quiet)
    # 1305 is Z.AI's capacity: each request backs off its own retries (4 attempts), no cap.
    assert n["one_1305"] == Counter({"zai-1305": 1})
    assert n["rate_after_one_1305"] is None
    assert n["burst_1305"] == Counter({"zai-1305": 100})
    assert n["rate_after_burst_1305"] is None
    assert n["normal_50"] == Counter({"ok": 50})
    assert n["light_90s"] == Counter({"ok": 180})
    assert n["rate_after_light_90s"] is None
    # The quota storm: every client gets Z.AI's answer, its reset time and a Retry-After
    # derived from it (3 h 0 min minus the scenario's 92 s of virtual time so far).
    assert n["storm_1308"] == Counter({"zai-1308": 100})
    for resp in stack.last:
        assert resp.status == 429
        assert resp.header(b"x-zai-error-class") == b"quota"
        assert resp.header(b"x-zai-rate-limit-reset") == RESET_1308
        assert resp.header(b"x-zaiproxy-limit") is None
        assert resp.json()["error"]["code"] == "1308"
    # The mock sent "retry-after: 1" with its 1308: upstream's header is relayed as sent.
    assert {resp.header(b"retry-after") for resp in stack.last} == {b"1"}
    assert stack.rate is None
    assert stack.controller.rate.adjustments == {"up": 0, "down": 0}
    # Everything reached "Z.AI": 4 + 400 attempts of the 1305s (retried, never refused by the
    # proxy), 50 + 180 normal requests, 100 quota answers (never retried).
    assert await stack.upstream_calls() == 4 + 400 + 50 + 180 + 100


async def test_a_quota_storm_after_two_clients_1303s_reaches_clients_as_quota(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    stack = await open_stack(nursery, str(tmp_path / "adaptive.json"))
    # Two clients whose four attempts each are all 1303: eight throttled answers, but two
    # throttled requests, and a decrease needs three (their retries are our own schedule).
    assert await stack.burst(2, [("x-mock-zai-code", "1303")]) == Counter({"zai-1303": 2})
    assert await stack.upstream_calls() == 8
    await stack.idle(2.0)
    assert stack.rate is None
    assert await stack.burst(100, [("x-mock-zai-code", "1308")]) == Counter({"zai-1308": 100})
    assert {r.header(b"x-zai-rate-limit-reset") for r in stack.last} == {RESET_1308}
    assert await stack.upstream_calls() == 108


async def test_an_account_throttle_storm_backs_off_then_light_traffic_is_never_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    stack = await open_stack(nursery, str(tmp_path / "adaptive.json"))
    n = await throttle_scenario(stack, quiet, "1303")
    storm = n["storm"]
    assert sum(storm.values()) == 100
    assert set(storm) == {"zai-1303", "proxy-429"}  # retries the lowered rate refused
    assert n["rate_after_storm"] is not None and n["rate_after_storm"] < 100
    # 2 rps of clean traffic right after: never refused (the cap stayed above it) ...
    assert n["light_600s"] == Counter({"ok": 1200})
    # ... and the cap is gone no later than 300 s after the last evidence.
    assert n["cap_gone_s"] is not None and n["cap_gone_s"] <= 300
    assert n["rate_after_600s"] is None


@pytest.mark.parametrize("code", ["1303", "1302"])
async def test_a_sustained_throttle_pins_the_floor_then_2rps_recovers_within_50s(
    nursery: trio.Nursery, tmp_path: Path, code: str
) -> None:
    """30 s of 10 rps that Z.AI throttles all (the operators' case: the old proxy then
    admitted 1.2 req/s and refused most requests for as long as anyone watched)."""
    stack = await open_stack(nursery, str(tmp_path / "adaptive.json"))
    n = await throttle_scenario(stack, quiet, code, sustained=True)
    assert n["rate_after_storm"] == 0.5  # the floor: Z.AI refused everything
    assert n["reason"] == ("frequency" if code == "1303" else "concurrency")
    # Then 2 rps of clean traffic: refused at first (the cap is the floor), never after
    # 50 s, and the cap is gone well before the 300 s horizon (the traffic proved it).
    assert n["light_600s"]["proxy-429"] > 0
    assert n["last_refused_s"] is not None and n["last_refused_s"] <= 50
    assert n["cap_gone_s"] is not None and n["cap_gone_s"] <= 150
    assert n["rate_after_600s"] is None
