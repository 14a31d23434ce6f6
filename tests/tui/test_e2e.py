"""End to end: a real proxy (child processes) in front of the real mock, real traffic from the
official OpenAI SDK, and the TUI reading the proxy's admin API over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from textual.widgets import DataTable

from tests.harness import ProcessServer, start_process, upstream_env
from tests.tui.test_app import plot_lines, status, summary, text
from zaiproxy_tui.app import ZaiproxyTui
from zaiproxy_tui.source import AdminApi
from zaiproxy_tui.widgets.panels import KeysPanel, LimiterPanel
from zaiproxy_tui.widgets.screens import TokenScreen

ADMIN = "tui-e2e-admin-token"
KEYS = """
[[keys]]
alias = "agent-a"
key = "zp-agent-a"
[keys.limits]
requests_per_minute = 600
requests_per_5h = 5000

[[keys]]
alias = "agent-b"
key = "zp-agent-b"
"""


@pytest.fixture(scope="module")
def proxy(mock: ProcessServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    tmp = tmp_path_factory.mktemp("tui-e2e")
    keys = tmp / "keys.toml"
    keys.write_text(KEYS)
    env = upstream_env(mock, ZAIPROXY_WORKERS="2", ZAIPROXY_ADMIN_TOKEN=ADMIN,
                       ZAIPROXY_KEYS_FILE=str(keys), ZAIPROXY_TOKENS_PER_5H="10000000",
                       DEPLOYMENT_VARIANT="production")
    server = start_process(["serve", "--port", "0"], env=env, stderr_path=tmp / "proxy.log")
    yield server
    assert server.stop() == 0


def _traffic(url: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """Streamed and whole chat completions from two keys until ``stop`` (bounded: 400)."""
    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
               for key in ("zp-agent-a", "zp-agent-b")]
    for i in range(400):
        if stop.is_set():
            break
        client = clients[i % 2]
        if i % 3 == 0:
            stream = client.chat.completions.create(
                model="glm-4.6", stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"hello {i}"}])
            for _ in stream:
                pass
        else:
            client.chat.completions.create(
                model="glm-4.6", messages=[{"role": "user", "content": f"hi {i}"}])
        counts["sent"] = counts.get("sent", 0) + 1
        time.sleep(0.02)


def test_tui_shows_live_traffic_history_and_keys_of_a_real_proxy(proxy: ProcessServer,
                                                                 tmp_path: Path) -> None:
    stop, counts = threading.Event(), {}
    sender = threading.Thread(target=_traffic, args=(proxy.url, stop, counts), daemon=True)

    async def main() -> None:
        api = AdminApi(proxy.url, ADMIN)
        app = ZaiproxyTui(api, url=proxy.url, range_="5m")
        async with app.run_test(size=(160, 48)) as pilot:
            sender.start()
            # One bounded budget for every phase below; generous, because CI runs this
            # beside the rest of the suite on two shared cores (the phases need ~8 s alone).
            deadline = time.monotonic() + 90
            # Live: the second events snapshot carries rates over real traffic.
            while time.monotonic() < deadline:
                await pilot.pause(0.25)
                line = status(app)
                if "req " in line and "req –" not in line and "req 0/s" not in line:
                    break
            line = status(app)
            assert "● connected" in line and "production" in line, line
            assert "req –" not in line and "req 0/s" not in line, line
            assert "now " in summary(app, "rate") and "now –" not in summary(app, "rate")
            # Keys: both aliases with their usage, never a key itself.
            table = app.query_one(KeysPanel).query_one(DataTable)

            def requests_of() -> dict[str, int]:
                # alias, req (every request the key sent), refused, 4xx, 5xx, ...
                return {str(table.get_row_at(i)[0]): int(str(table.get_row_at(i)[1])
                                                         .replace(",", ""))
                        for i in range(table.row_count)}

            while time.monotonic() < deadline and not all(requests_of().values()):
                await pilot.pause(0.25)  # the keys report refreshes every 5 s
            assert set(requests_of()) == {"agent-a", "agent-b"}
            assert all(n > 0 for n in requests_of().values()), requests_of()
            keys_text = text(app.query_one(KeysPanel))
            assert "zp-agent" not in keys_text
            # The proxy-wide window limit, with its reset time.
            while time.monotonic() < deadline and "tok/5h" not in text(app.query_one(
                    LimiterPanel)):
                await pilot.pause(0.25)
            assert "tok/5h" in text(app.query_one(LimiterPanel))
            # History: a range change re-queries the recorder; the plots keep real points.
            stop.set()
            await pilot.press("2")  # 15m
            while time.monotonic() < deadline and (app.dashboard.history is None or not any(
                    app.dashboard.history.series.values())):
                await pilot.pause(0.25)
            assert app.dashboard.history is not None and app.dashboard.history.range == "15m"
            assert app.dashboard.history.series.get("production")

            def drawn() -> bool:
                return any(ch in "".join(plot_lines(app, "rate")) for ch in "⠁⠂⠄⡀⠈⠐⠠⢀⣀⠤⠒⠉")

            # The plots redraw on the app's next refresh after the history arrived.
            while time.monotonic() < deadline and not drawn():
                await pilot.pause(0.25)
            assert drawn()
        await api.aclose()

    try:
        asyncio.run(main())
    finally:
        stop.set()
        sender.join(10)
    assert counts.get("sent", 0) > 0


def test_tui_asks_for_the_token_of_a_protected_proxy(proxy: ProcessServer) -> None:
    async def main() -> None:
        api = AdminApi(proxy.url, None)
        app = ZaiproxyTui(api, url=proxy.url)
        async with app.run_test(size=(80, 24)) as pilot:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not isinstance(app.screen, TokenScreen):
                await pilot.pause(0.1)
            assert isinstance(app.screen, TokenScreen)
            await pilot.press(*ADMIN, "enter")
            while time.monotonic() < deadline and "● connected" not in status(app):
                await pilot.pause(0.1)
            assert "● connected" in status(app)
        await api.aclose()

    asyncio.run(main())


def test_tui_survives_an_unreachable_proxy(tmp_path: Path) -> None:
    async def main() -> None:
        api = AdminApi("http://127.0.0.1:9", None)  # discard port: nothing listens
        app = ZaiproxyTui(api, url=api.url)
        async with app.run_test(size=(80, 24)) as pilot:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "reconnecting" not in status(app):
                await pilot.pause(0.1)
            assert "reconnecting in" in status(app) and "cannot connect" in status(app)
        await api.aclose()

    asyncio.run(main())


def test_zaiproxy_tui_runs_the_tui_as_its_own_process() -> None:
    """``zaiproxy tui`` exec's ``python -m zaiproxy_tui`` (the proxy never imports Textual)."""
    out = subprocess.run([sys.executable, "-m", "zaiproxy", "tui", "--help"], check=True,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("usage: zaiproxy tui")
    assert "--url" in out.stdout and "--token" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "zaiproxy", "tui", "--range", "3d"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: '3d'" in bad.stderr
