"""The adaptive upstream rate in a real supervisor: learned from Z.AI 429s, shared, persisted, reset.

Workers count upstream answers and account throttles (1302, 1303, a 429 without a
code) in the ledger; the supervisor's RateController ticks once a second, backs the
shared rate off on evidence (three distinct throttled requests), publishes it (every
worker's /health shows it), saves it to the state file with the time of the evidence,
and a restarted proxy starts from the saved rate while that evidence is recent, never
from a stale file. ``POST /admin/reset-rate-limit`` (admin token) forgets it in every
worker at once.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import orjson
import pytest
import trio

from tests.harness import UPSTREAM_KEY, ProcessServer, request, start_process, wait_until
from zaiproxy.limits.cells import upstream_key_id

JSON = ("content-type", "application/json")
CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
ADMIN = "adm-test-token-77"


def serve(mock: ProcessServer, tmp_path: Path, state_file: Path, name: str) -> ProcessServer:
    return start_process(["serve", "--port", "0"], env={
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
        "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
        "ZAIPROXY_NATIVE_BASE_URL": mock.url,
        "ZAIPROXY_WORKERS": "2",
        "ZAIPROXY_STATE_FILE": str(state_file),
        "ZAIPROXY_ADMIN_TOKEN": ADMIN,
        "ZAIPROXY_ADAPTIVE_MAX_RPS": "50",
        "MAX_RETRIES": "0",  # each 429 goes straight back: no real backoff sleeps here
    }, stderr_path=tmp_path / f"{name}.log")


async def health_rates(proxy: ProcessServer, n: int = 8) -> set[object]:
    """The adaptive rate as seen by the workers that answer n fresh connections."""
    seen = set()
    for _ in range(n):
        seen.add((await request(proxy.port, "GET", "/health")).json()["adaptive_rate_rps"])
    return seen


async def test_backoff_is_shared_persisted_and_reset(tmp_path: Path) -> None:
    mock = start_process(["mock-upstream", "--port", "0", "--api-key", UPSTREAM_KEY],
                         env=None, stderr_path=tmp_path / "mock.log")
    state_file = tmp_path / "adaptive.json"
    key = upstream_key_id(UPSTREAM_KEY)
    proxy = serve(mock, tmp_path, state_file, "proxy1")
    try:
        assert await health_rates(proxy) == {None}  # nothing learned: not limiting
        # Z.AI's capacity (1305) is not the account's rate: nothing is learned from it.
        for _ in range(6):
            resp = await request(proxy.port, "POST", "/v1/chat/completions",
                                 [JSON, ("x-mock-zai-code", "1305")], CHAT)
            assert resp.header(b"x-zai-error-class") == b"overload"
        throttled = [JSON, ("x-mock-zai-code", "1303")]

        # Keep Z.AI answering 1303 (distinct requests) until the supervisor has backed off.
        async def backed_off() -> bool:
            resp = await request(proxy.port, "POST", "/v1/chat/completions", throttled, CHAT)
            assert resp.status == 429
            return state_file.exists() and bool(json.loads(state_file.read_text())["keys"])

        with trio.fail_after(15):
            while not await backed_off():  # noqa: ASYNC110 - the supervisor ticks once a second
                await trio.sleep(0.1)
        entry = json.loads(state_file.read_text())["keys"][key]
        # The first decrease: 0.7 x the send rate observed (the ceiling), below max 50.
        assert entry["rate"] == pytest.approx(0.7 * entry["ceiling"])
        assert entry["reason"] == "frequency"
        assert entry["throttled_at"] == pytest.approx(time.time(), abs=15)
        # Every worker reads the one shared rate. (A 429 sent just before the save may
        # count in the next tick and lower it once more: compare with the saved state.)
        rates = await health_rates(proxy)
        assert len(rates) == 1
        assert proxy.stop() == 0
        final = json.loads(state_file.read_text())["keys"][key]["rate"]
        assert rates == {round(final * 1000) / 1000}  # published in milli-requests/s

        # A restart loads the learned rate (its evidence is seconds old) instead of
        # relearning it with a burst of 429s.
        proxy = serve(mock, tmp_path, state_file, "proxy2")
        restored = re.search(r"restored adaptive rate ([0-9.]+) rps", proxy.logs())
        assert restored is not None
        (rate,) = await health_rates(proxy)
        # Logged to 3 digits; one recovery step higher if the restart took over 10 s.
        assert rate == pytest.approx(float(restored[1]), rel=0.01) or rate > float(restored[1])

        refused = await request(proxy.port, "POST", "/admin/reset-rate-limit")
        assert refused.status == 401
        reset = await request(proxy.port, "POST", "/admin/reset-rate-limit",
                              [("authorization", f"Bearer {ADMIN}")])
        assert reset.status == 200
        assert await health_rates(proxy) == {None}  # at once, in every worker

        def forgotten() -> bool:
            return json.loads(state_file.read_text())["keys"] == {}

        await wait_until(forgotten, limit=10, step=0.05)  # the supervisor's next tick saves it
        assert "adaptive_rate_reset" in proxy.logs()
        assert ADMIN not in proxy.logs()
    finally:
        proxy.stop()
        mock.stop()


@pytest.mark.parametrize("version", [1, 2])
async def test_a_stale_state_file_does_not_cap_a_fresh_start(tmp_path: Path, version: int) -> None:
    """What operators had: a file from 5 hours ago holding 1.2 rps. Format 1 has no throttle
    time (not restored as a cap), format 2's throttle is older than the 300 s horizon."""
    mock = start_process(["mock-upstream", "--port", "0", "--api-key", UPSTREAM_KEY],
                         env=None, stderr_path=tmp_path / "mock.log")
    state_file = tmp_path / "adaptive.json"
    five_hours_ago = time.time() - 5 * 3600
    if version == 1:
        doc: dict[str, object] = {"version": 1, "rate": 1.2, "ceiling": 1.7,
                                  "saved_at": five_hours_ago}
    else:
        doc = {"version": 2, "saved_at": five_hours_ago, "keys": {upstream_key_id(UPSTREAM_KEY): {
            "rate": 1.2, "ceiling": 1.7, "throttled_at": five_hours_ago, "hold_steps": 1,
            "reason": "frequency"}}}
    state_file.write_text(json.dumps(doc))
    proxy = serve(mock, tmp_path, state_file, "proxy")
    try:
        assert await health_rates(proxy) == {None}
        statuses = [(await request(proxy.port, "POST", "/v1/chat/completions", [JSON], CHAT)).status
                    for _ in range(10)]
        assert statuses == [200] * 10  # 1.2 rps with a burst of 1 would have refused 9
        if version == 1:
            assert "format 1 has no throttle time" in proxy.logs()
        else:
            # The age is rounded to the second when the supervisor starts: a loaded machine
            # can take a few seconds from writing the file to that.
            ages = [int(m) for m in re.findall(
                r"saved adaptive state not restored \(last throttle (\d+) s ago", proxy.logs())]
            assert len(ages) == 1 and 18000 <= ages[0] <= 18060, ages
    finally:
        proxy.stop()
        mock.stop()
