"""The adaptive upstream rate in a real supervisor: learned from Z.AI 429s, shared, persisted, reset.

Workers count upstream answers and frequency-class 429s in the ledger; the
supervisor's RateController ticks once a second, backs the shared rate off,
publishes it (every worker's /health shows it), saves it to the state file,
and a restarted proxy starts from the saved rate instead of relearning it.
``POST /admin/reset-rate-limit`` (admin token) forgets it in every worker at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import trio

from tests.harness import UPSTREAM_KEY, ProcessServer, request, start_process, wait_until

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
    proxy = serve(mock, tmp_path, state_file, "proxy1")
    try:
        assert await health_rates(proxy) == {None}  # nothing learned: not limiting
        throttled = [JSON, ("x-mock-zai-code", "1303")]
        # Keep Z.AI answering 1303 until the supervisor has backed the rate off.
        async def backed_off() -> bool:
            resp = await request(proxy.port, "POST", "/v1/chat/completions", throttled, CHAT)
            assert resp.status == 429
            return state_file.exists()

        with trio.fail_after(15):
            while not await backed_off():  # noqa: ASYNC110 - the supervisor ticks once a second
                await trio.sleep(0.1)
        saved = json.loads(state_file.read_text())
        # First decrease: the ceiling is the rate throttling happened at (50), then
        # rate = min(50 * backoff 0.7, ceiling * hold 0.9) = 35.
        assert saved["ceiling"] == 50.0
        assert saved["rate"] == 35.0
        # Every worker reads the one shared rate. (A 429 sent just before the save may
        # count in the next tick and lower it once more: compare with the saved state.)
        rates = await health_rates(proxy)
        assert len(rates) == 1 and rates <= {35.0, 24.5}
        assert proxy.stop() == 0
        final = json.loads(state_file.read_text())["rate"]
        assert rates == {final}

        # A restart loads the learned rate instead of relearning it with a burst of 429s.
        proxy = serve(mock, tmp_path, state_file, "proxy2")
        assert await health_rates(proxy) == {final}
        assert f"restored adaptive rate {final:.3g} rps" in proxy.logs()

        refused = await request(proxy.port, "POST", "/admin/reset-rate-limit")
        assert refused.status == 401
        reset = await request(proxy.port, "POST", "/admin/reset-rate-limit",
                              [("authorization", f"Bearer {ADMIN}")])
        assert reset.status == 200
        assert await health_rates(proxy) == {None}  # at once, in every worker

        def forgotten() -> bool:
            state = json.loads(state_file.read_text())
            return state["ceiling"] is None and state["rate"] == 50.0

        await wait_until(forgotten, limit=10, step=0.05)  # the supervisor's next tick saves it
        assert "adaptive_rate_reset" in proxy.logs()
        assert ADMIN not in proxy.logs()
    finally:
        proxy.stop()
        mock.stop()
