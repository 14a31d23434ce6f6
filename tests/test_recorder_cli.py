"""``zaiproxy history`` on a file (no proxy running): tables, JSON, Parquet, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import orjson
import pytest

from tests.harness import REPO
from zaiproxy.cli import build_parser
from zaiproxy.core.record import RequestRecord, Usage
from zaiproxy.observe.recorder import cli, wire
from zaiproxy.observe.recorder.process import endpoint_file
from zaiproxy.observe.recorder.store import HistoryStore, db_row


class Text:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)


def history(*args: str) -> tuple[int, str, str]:
    out, err = Text(), Text()
    code = cli.run(build_parser().parse_args(["history", *args]), out, err)  # type: ignore[arg-type]
    return code, out.text, err.text


@pytest.fixture
def path(tmp_path: Path) -> str:
    """A history file with 6 requests of the last minutes: two keys, two models, one 502."""
    p = str(tmp_path / "h.duckdb")
    now = time.time()
    store = HistoryStore.open(p)
    rows = []
    for i, (alias, model, status, variant) in enumerate([
        ("alice", "glm-4.6", 200, "production"), ("alice", "glm-4.6", 200, "production"),
        ("bob", "glm-4.5", 200, "production"), ("bob", "glm-4.5", 502, "production"),
        (None, "glm-4.6", 429, "production"), ("alice", "glm-4.6", 200, "canary"),
    ]):
        rec = RequestRecord(request_id=f"r{i}", method="POST", route="/v1/messages",
                            status=status, duration_s=0.2 + i / 10, bytes_in=10, client="-",
                            model=model, key_alias=alias, usage=Usage(100, 10))
        rows.append(db_row(variant, 0, list(wire.row_of(rec, now - 60 * i))))
    store.write(rows)
    store.close()
    return p


def test_text_summaries_per_key_model_status_variant(path: str) -> None:
    code, out, err = history("--path", path, "--range", "1h")
    assert code == 0, err
    blocks = out.split("\n\n")
    assert "source: raw" in blocks[0] and "(read-only)" in blocks[0]
    assert [b.splitlines()[0].split()[:2] for b in blocks[1:]] == [
        ["by", "key"], ["by", "model"], ["by", "status"], ["by", "variant"]]
    by_key = blocks[1].splitlines()
    assert by_key[1].split()[:3] == ["alice", "3", "0"]
    assert by_key[-1].split()[:3] == ["TOTAL", "6", "1"]
    assert "(none)" in blocks[1]  # the request without a key
    by_status = {line.split()[0]: line.split()[1] for line in blocks[3].splitlines()[1:]}
    assert by_status == {"200": "4", "429": "1", "502": "1", "TOTAL": "6"}


def test_json_range_and_variant(path: str) -> None:
    code, out, _ = history("--path", path, "--json", "--by", "model", "--range", "150s",
                           "--variant", "production")
    assert code == 0
    [doc] = orjson.loads(out)
    assert doc["variant"] == "production" and doc["group_by"] == "model"
    # Within 150 s: the requests 0, 60 and 120 s old.
    assert [(r["model"], r["requests"]) for r in doc["rows"]] == [("glm-4.6", 2), ("glm-4.5", 1)]


def test_export_parquet(path: str, tmp_path: Path) -> None:
    target = str(tmp_path / "out.parquet")
    code, _, err = history("--path", path, "--export", "parquet", target, "--variant", "canary")
    assert code == 0 and f"wrote {target}" in err
    assert duckdb.sql(f"SELECT request_id, variant FROM '{target}'").fetchall() == [
        ("r5", "canary")]
    code, _, err = history("--path", path, "--export", "csv", target)
    assert code == 2 and "parquet only" in err


def test_a_stale_endpoint_file_falls_back_to_the_file(path: str) -> None:
    # A proxy that died without cleaning up: nobody listens there any more.
    Path(endpoint_file(path)).write_bytes(orjson.dumps({"url": "http://127.0.0.1:9", "pid": 1}))
    code, out, err = history("--path", path, "--by", "variant")
    assert code == 0, err
    assert "(read-only)" in out and "production" in out


def test_a_locked_file_without_endpoint_says_so(path: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys\ncon = duckdb.connect(sys.argv[1])\n"
         "print('held', flush=True)\nsys.stdin.read()\n", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        code, _, err = history("--path", path)
        assert code == 1
        assert "Could not set lock" in err and "pass --url, or stop the proxy" in err
    finally:
        holder.kill()
        holder.wait()


def test_errors(tmp_path: Path) -> None:
    code, _, err = history("--path", str(tmp_path / "nothing.duckdb"))
    assert (code, err) == (1, f"zaiproxy history: no history file at {tmp_path}/nothing.duckdb\n")
    code, _, err = history("--path", str(tmp_path / "x"), "--range", "soon")
    assert code == 2 and "bad duration 'soon'" in err
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()
    code, _, err = history("--path", str(other))
    assert code == 1 and "schema version 0" in err and "not a history file" in err


def test_the_real_command(path: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZAIPROXY_", "ZAI_"))}
    out = subprocess.run([sys.executable, "-m", "zaiproxy", "history", "--path", path,
                          "--by", "key"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[3].split()[:2] == ["alice", "3"]


def test_requests_that_never_became_rows_are_said(tmp_path: Path) -> None:
    from zaiproxy.observe.recorder.sequence import Chunk

    p = str(tmp_path / "h.duckdb")
    store = HistoryStore.open(p, run="r")
    rec = RequestRecord(request_id="r5", method="POST", route="/v1/messages", status=200,
                        duration_s=0.2, bytes_in=10, client="-", model="glm-4.6")
    row = db_row("production", 0, list(wire.row_of(rec, time.time())))
    # Row 5 of a worker that dropped 2 of its rows 0-4: the other 3 were lost.
    store.write_chunks([Chunk((0, 7, 1), "production", 5, 1, 2, [row])], time.time())
    store.close()
    code, out, err = history("--path", p, "--by", "variant")
    assert code == 0, err
    assert out.endswith("\nnot in the history (since the file began):\n"
                        "  production: 2 dropped (channel full), 3 lost (a recorder died "
                        "holding them)\n")
    code, out, _ = history("--path", p, "--by", "variant", "--json")
    assert code == 0 and "not in the history" not in out  # JSON: the summaries only


def test_a_file_of_schema_v1_is_read_as_it_is(tmp_path: Path) -> None:
    from zaiproxy.observe.recorder.schema import MIGRATIONS, current_version, migrate

    p = str(tmp_path / "h.duckdb")
    con = duckdb.connect(p)
    migrate(con, MIGRATIONS[:1])  # what the previous zaiproxy wrote
    con.execute("INSERT INTO requests (ts, variant, route, status, latency_ms) "
                "VALUES (now(), 'production', '/v1/messages', 200, 5)")
    con.execute("INSERT INTO snapshots VALUES (now(), 'production', 1, 0, 0, 0, 0, 0, 0.0, 4)")
    con.close()
    code, out, err = history("--path", p, "--by", "status")
    assert code == 0, err
    assert "TOTAL" in out and out.endswith("  production: 4 dropped (channel full), "
                                           "0 lost (a recorder died holding them)\n")
    con = duckdb.connect(p, read_only=True)
    assert current_version(con) == 1  # read, not migrated
    con.close()


def test_history_splits_what_failed_for_the_clients(tmp_path: Path) -> None:
    """Beside err% (5xx and cut streams): the proxy's refusals, Z.AI's 429s, other 4xx."""
    p = str(tmp_path / "f.duckdb")
    now = time.time()
    store = HistoryStore.open(p)
    rows = []
    for i, (status, upstream_status) in enumerate([
            (200, 200), (200, 200), (429, None), (429, None), (429, None),  # 3 refused
            (429, 429), (400, None), (502, None)]):
        rec = RequestRecord(request_id=f"f{i}", method="POST", route="/v1/messages",
                            status=status, duration_s=0.1, bytes_in=10, client="-",
                            model="glm-4.6", upstream_status=upstream_status)
        rows.append(db_row("production", 0, list(wire.row_of(rec, now - 10 * i))))
    store.write(rows)
    store.close()
    code, out, err = history("--path", p, "--json", "--by", "model", "--range", "1h")
    assert code == 0, err
    total = orjson.loads(out)[0]["total"]
    assert (total["requests"], total["errors"]) == (8, 1)
    assert (total["proxy_429"], total["zai_429"], total["other_4xx"]) == (3, 1, 1)
    assert total["proxy_429_rate"] == 0.375
    code, out, err = history("--path", p, "--by", "model", "--range", "1h")
    assert code == 0, err
    header, *_, last = out.split("\n\n")[1].splitlines()
    assert "refused%" in header and "zai429%" in header and "4xx%" in header
    total_cells = last.split()
    assert total_cells[0] == "TOTAL"
    # err% 12.50 (the 502), refused% 37.50, zai429% 12.50, 4xx% 12.50, in that order.
    assert total_cells[3:7] == ["12.50", "37.50", "12.50", "12.50"]
