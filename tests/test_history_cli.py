"""The history file as users query it: the stock DuckDB command-line tool (``duckdb-cli`` from
PyPI, installed by ``make test``) opens a file the recorder wrote and runs every SQL example
of ``zaiproxy/observe/recorder/README.md``; the collector's database opens the same way.

The Python package writes DuckDB's newest storage format unless told otherwise, which the
current stable CLI refuses ("can only read versions between 64 and 68"); the files are created
in ``schema.STORAGE_COMPATIBILITY``'s format instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import trio

from tests.harness import REPO, ProcessServer, request, start_process, upstream_env
from zaiproxy.fleet.collector_store import Store

JSON = ("content-type", "application/json")
CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
MESSAGES = orjson.dumps({"model": "glm-4.6", "max_tokens": 16,
                         "messages": [{"role": "user", "content": "hi"}]})
README = REPO / "zaiproxy" / "observe" / "recorder" / "README.md"


def duckdb_cli() -> str:
    found = shutil.which("duckdb", path=str(Path(sys.executable).parent)) or shutil.which("duckdb")
    assert found, "the DuckDB CLI (pip install duckdb-cli; make test installs it) is missing"
    return found


def cli(database: Path, sql: str, cwd: Path) -> list[dict]:
    done = subprocess.run([duckdb_cli(), "-readonly", "-json", str(database), "-c", sql],
                          capture_output=True, text=True, cwd=cwd, timeout=60)
    assert done.returncode == 0, f"{sql}\n{done.stderr}"
    assert "Error" not in done.stderr, done.stderr
    return orjson.loads(done.stdout) if done.stdout.strip() else []


def cli_memory(sql: str, cwd: Path) -> list[dict]:
    """The CLI without a database file (a Parquet export is queried by its path)."""
    done = subprocess.run([duckdb_cli(), "-json", "-c", sql], capture_output=True, text=True,
                          cwd=cwd, timeout=60)
    assert done.returncode == 0, f"{sql}\n{done.stderr}"
    return orjson.loads(done.stdout)


def readme_queries() -> list[str]:
    """Every statement of the README's SQL examples (its ```sql block)."""
    block = re.search(r"```sql\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    body = "\n".join(line for line in block[1].splitlines() if not line.startswith("--"))
    return [stmt.strip() for stmt in body.split(";") if stmt.strip()]


@pytest.mark.slow
async def test_the_stock_duckdb_cli_runs_the_documented_queries_on_a_recorded_history(
        mock: ProcessServer, tmp_path: Path) -> None:
    # Z.AI's quota polled (the mock answers it), and a 5-hour window of the proxy's own for
    # the key: the README's quota query has a sample with both numbers to read.
    proxy = start_process(["serve", "--port", "0"],
                          env=upstream_env(mock, ZAIPROXY_WORKERS="1", ZAIPROXY_QUOTA_POLL="true",
                                           ZAIPROXY_UPSTREAM_TOKENS_PER_5H="1000000"),
                          stderr_path=tmp_path / "proxy.log")
    history = tmp_path / "proxy.history.duckdb"
    try:
        for _ in range(3):
            assert (await request(proxy.url, "POST", "/v1/chat/completions", [JSON],
                                  CHAT)).status == 200
        assert (await request(proxy.url, "POST", "/v1/messages", [JSON], MESSAGES)).status == 200
        # The README's export, made the documented way while the proxy runs (the recorder
        # writes in batches: again until the four rows are in it, bounded).
        deadline = time.monotonic() + 15
        while True:
            export = await trio.run_process(
                [sys.executable, "-m", "zaiproxy", "history", "--export", "parquet",
                 "last-day.parquet"], cwd=tmp_path, capture_stdout=True, capture_stderr=True,
                check=False, env={"PATH": "/usr/bin:/bin", "ZAIPROXY_HISTORY_PATH": str(history)})
            assert export.returncode == 0, export.stderr
            rows = await trio.to_thread.run_sync(
                cli_memory, "SELECT count(*) AS n FROM 'last-day.parquet'", tmp_path)
            if rows[0]["n"] == 4 or time.monotonic() > deadline:
                break
            await trio.sleep(0.2)
    finally:
        assert proxy.stop() == 0
    queries = readme_queries()
    assert len(queries) == 5
    results = [cli(history, sql, tmp_path) for sql in queries]
    per_model, per_key_day, per_variant, zai_quota, exported = results
    assert sum(row["requests"] for row in per_model) == 4
    assert {row["model"] for row in per_model} == {"glm-4.6"}
    # The 1-minute rollups hold finished minutes only: this minute's requests are not in
    # them yet, so the query ran (cli() checks it) on rows older than this test, if any.
    assert all({"day", "key_alias", "input", "output"} <= row.keys() for row in per_key_day)
    assert sum(row["requests"] for row in per_variant) == 4
    assert sum(row["count_star()"] for row in exported) == 4
    # The poller's sample at start at least (the recorder writes the newest when it stops).
    assert {(row["upstream"], row["quota_window"]) for row in zai_quota} >= {("default", "five_hour")}
    assert all(row["local_pct"] is not None for row in zai_quota if row["quota_window"] == "five_hour")
    # The README's other doorway (an interactive session) opens the same file.
    version = cli(history, "SELECT max(version) AS v FROM schema_version", tmp_path)
    assert version[0]["v"] >= 1


def test_the_collectors_database_opens_in_the_stock_cli(tmp_path: Path) -> None:
    path = tmp_path / "collector.duckdb"
    store = Store(str(path))
    store.query("SELECT 1")  # creates the file and its schema
    store.close()
    tables = cli(path, "SHOW TABLES", tmp_path)
    assert tables, "the collector's schema is missing"


@pytest.mark.slow
async def test_history_takes_the_admin_token_like_the_tui(mock: ProcessServer,
                                                          tmp_path: Path) -> None:
    token = "adm-history-token-0123"
    proxy = start_process(["serve", "--port", "0"],
                          env=upstream_env(mock, ZAIPROXY_WORKERS="1",
                                           ZAIPROXY_ADMIN_TOKEN=token),
                          stderr_path=tmp_path / "proxy.log")
    history = tmp_path / "proxy.history.duckdb"

    async def zaiproxy_history(*args: str) -> subprocess.CompletedProcess[bytes]:
        # The shell of an operator: no ZAIPROXY_ADMIN_TOKEN in it.
        return await trio.run_process(
            [sys.executable, "-m", "zaiproxy", "history", "--path", str(history), "--json",
             "--range", "1h", *args], capture_stdout=True, capture_stderr=True, check=False,
            env={"PATH": "/usr/bin:/bin"})

    try:
        assert (await request(proxy.url, "POST", "/v1/chat/completions", [JSON],
                              CHAT)).status == 200
        deadline = time.monotonic() + 15
        while not await trio.Path(f"{history}.endpoint").exists():
            assert time.monotonic() < deadline, "the recorder wrote no endpoint file"
            await trio.sleep(0.05)
        refused = await zaiproxy_history()
        assert refused.returncode != 0
        assert b"401" in refused.stderr or b"token" in refused.stderr.lower(), refused.stderr
        assert token.encode() not in refused.stderr + refused.stdout
        while True:
            answered = await zaiproxy_history("--token", token)
            assert answered.returncode == 0, answered.stderr
            docs = orjson.loads(answered.stdout)
            if docs[0]["total"]["requests"] == 1 or time.monotonic() > deadline:
                break
            await trio.sleep(0.1)  # the recorder writes in batches
        assert docs[0]["total"]["requests"] == 1
        assert token.encode() not in answered.stderr + answered.stdout
    finally:
        assert proxy.stop() == 0


def test_history_demo_reads_the_demo_file_from_the_state_directory(tmp_path: Path) -> None:
    """`make run` without a key writes demo traffic to its own file in the state directory;
    `zaiproxy history --demo` reads that one, plain `zaiproxy history` the real one."""
    from zaiproxy.observe.recorder.store import HistoryStore

    state = tmp_path / "state"
    (state / "zaiproxy").mkdir(parents=True)
    HistoryStore.open(str(state / "zaiproxy" / "demo-history.duckdb")).close()
    env = {"PATH": "/usr/bin:/bin", "XDG_STATE_HOME": str(state)}
    demo = subprocess.run([sys.executable, "-m", "zaiproxy", "history", "--demo", "--json"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert orjson.loads(demo.stdout)[0]["total"]["requests"] == 0
    real = subprocess.run([sys.executable, "-m", "zaiproxy", "history", "--json"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert real.returncode != 0  # no real history yet: said, not silently empty
    assert "zaiproxy/history.duckdb" in real.stderr and "demo-history" not in real.stderr
    assert not list(tmp_path.glob("*.duckdb"))  # nothing in the current directory
