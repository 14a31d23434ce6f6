"""Z.AI's quota in the history (schema v6, ``zai_quota``; recorder/quota.py).

The samples come the way the proxy's come: a :class:`QuotaBoard` writing into a real private
ledger segment (as the supervisor's poller does), read by the recorder's feed. The proxy's own
count is a worker's real admission (run/worker.py ``build_limiter``) on the same segment, so
these tests also hold the recorder's reading of the windows to the cells the workers charge.
The file is a real DuckDB file in tmp_path; retention and staleness run on explicit clocks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
import trio

from zaiproxy.cli import build_parser
from zaiproxy.core import logs
from zaiproxy.core.config import Config
from zaiproxy.core.limitspec import Limits
from zaiproxy.limits import ledger as ledger_mod
from zaiproxy.limits.admission import Admission, Admitter
from zaiproxy.limits.segment import LedgerImpl, Segment
from zaiproxy.limits.upstream_keys import PoolSpec, UpstreamKey, pool_of
from zaiproxy.limits.zai_quota import QuotaBoard
from zaiproxy.observe.recorder import cli, process, service
from zaiproxy.observe.recorder.queries import ZAI_QUOTA_STALE_S, history_summary
from zaiproxy.observe.recorder.quota import (
    QuotaFeed,
    QuotaRow,
    local_windows,
    quota_feed,
)
from zaiproxy.observe.recorder.service import Recorder
from zaiproxy.observe.recorder.store import DAY, HistoryStore
from zaiproxy.run.worker import build_limiter, open_ledger
from zaiproxy.upstream.quota import QuotaSample, QuotaWindow

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
H = 3600.0
CONFIG = dataclasses.replace(Config(api_key="k", workers=1), quota_poll=True,
                             quota_interval=60.0, quota_stale_after=900.0)
SELECT_ROWS = ('SELECT epoch(ts), variant, upstream, quota_window, limit_type, used_fraction, '
               'epoch(reset_at), plan_tier, local_used_fraction FROM zai_quota '
               'ORDER BY ts, upstream, quota_window')


def sample(five: float, weekly: float | None = None, *, at: float = T0,
           tier: str | None = "pro") -> QuotaSample:
    windows = [QuotaWindow("five_hour", "TOKENS_LIMIT", five, at + 2 * H)]
    if weekly is not None:
        windows.append(QuotaWindow("weekly", "TOKENS_LIMIT", weekly, at + 100 * H))
    return QuotaSample(tier, tuple(windows))


@pytest.fixture
def impl() -> LedgerImpl:
    return ledger_mod.load(CONFIG.ledger)


@pytest.fixture
def segment(impl: LedgerImpl) -> Iterator[Segment]:
    seg = open_ledger(impl, CONFIG, None)
    yield seg
    seg.close()


def rows(rec: Recorder) -> list[tuple[Any, ...]]:
    assert rec.store is not None
    return rec.store.con.execute(SELECT_ROWS).fetchall()


def admit(limiter: Admitter, upstream: int, tokens: int, times: int = 1) -> None:
    plan = limiter.plan(None, None, upstream)
    for _ in range(times):
        assert isinstance(limiter.admit_now(plan, tokens), Admission)


# ---- the recorder writes a sample once ------------------------------------------------------


async def test_a_row_per_window_only_when_the_sample_is_new(tmp_path: Path,
                                                            segment: Segment,
                                                            impl: LedgerImpl) -> None:
    feed = quota_feed(CONFIG, segment, impl)
    assert feed is not None and feed.local is None  # no upstream window configured
    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production", quota=feed)
    assert await rec.record_quota() == 0  # nothing polled yet
    poller = QuotaBoard(segment, "default")
    poller.record("success", T0, sample(0.42, 0.12))
    assert await rec.record_quota() == 2
    assert await rec.record_quota() == 0  # the same sample, snapshot after snapshot
    poller.record("error", T0 + 60)  # a failed poll keeps the last sample: nothing new
    assert await rec.record_quota() == 0
    poller.record("success", T0 + 120, sample(0.43, at=T0 + 120, tier=None))
    assert await rec.record_quota() == 1  # Z.AI sent one window this time
    assert rows(rec) == [
        (T0, "production", "default", "five_hour", "TOKENS_LIMIT", 0.42, T0 + 2 * H, "pro", None),
        (T0, "production", "default", "weekly", "TOKENS_LIMIT", 0.12, T0 + 100 * H, "pro", None),
        (T0 + 120, "production", "default", "five_hour", "TOKENS_LIMIT", 0.43, T0 + 120 + 2 * H,
         None, None)]
    assert rec.status()["zai_quota_rows"] == 3
    await rec.finish()


async def test_the_snapshot_loop_records_new_samples(tmp_path: Path, segment: Segment,
                                                     impl: LedgerImpl,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The loop's own period, shortened (DuckDB's thread runs on the real clock).
    monkeypatch.setattr(service, "SNAPSHOT_INTERVAL", 0.02)
    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production",
                   quota=quota_feed(CONFIG, segment, impl))
    poller = QuotaBoard(segment, "default")

    async def snapshots() -> int:
        ok, n = await rec.query(lambda s: s.con.execute("SELECT count(*) FROM snapshots")
                                .fetchone())
        return int(n[0]) if ok and n else 0

    async def until(done: Any) -> None:
        with trio.fail_after(10):
            while not await done():  # noqa: ASYNC110  (the loop's period: bounded)
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        poller.record("success", T0, sample(0.42, 0.12))

        def written(n: int) -> Any:
            async def check() -> bool:
                return rec.stats.zai_quota_rows >= n
            return check

        await until(written(2))
        seen = await snapshots()

        async def three_more() -> bool:
            return await snapshots() >= seen + 3

        await until(three_more)  # snapshots go on, the sample is not new: no rows
        assert rec.stats.zai_quota_rows == 2
        poller.record("success", T0 + 60, sample(0.5, 0.13, at=T0 + 60))
        await until(written(4))
        rec.stop_requested.set()
    store = HistoryStore.open(str(tmp_path / "h.duckdb"), read_only=True)
    assert store.con.execute("SELECT count(*), count(DISTINCT ts) FROM zai_quota").fetchone() == (
        4, 2)
    store.close()


async def test_a_recorder_started_again_does_not_write_the_same_sample_twice(
        tmp_path: Path, segment: Segment, impl: LedgerImpl) -> None:
    path = str(tmp_path / "h.duckdb")
    poller = QuotaBoard(segment, "default")
    poller.record("success", T0, sample(0.42, 0.12))
    first = Recorder(path, variant="production", quota=quota_feed(CONFIG, segment, impl))
    assert await first.record_quota() == 2
    await first.finish()
    # The supervisor restarts the recorder; the poller (and its last sample) stayed.
    again = Recorder(path, variant="production", quota=quota_feed(CONFIG, segment, impl))
    assert await again.record_quota() == 0
    assert await again.record_quota() == 0  # and not asked again: it is recorded
    poller.record("success", T0 + 60, sample(0.44, 0.12, at=T0 + 60))
    assert await again.record_quota() == 2
    assert [r[0] for r in rows(again)] == [T0, T0, T0 + 60, T0 + 60]
    await again.finish()


class FullDisk(HistoryStore):
    """A store whose first quota write fails the way a full disk does."""

    failures = 1

    def write_zai_quota(self, variant: str, rows: Any) -> int:
        if FullDisk.failures:
            FullDisk.failures -= 1
            raise duckdb.IOException("No space left on device")
        return super().write_zai_quota(variant, rows)


async def test_a_failed_write_is_tried_again_at_the_next_snapshot(
        tmp_path: Path, segment: Segment, impl: LedgerImpl, autojump_clock: Any,
        log_buffer: Any) -> None:
    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production", store=FullDisk,
                   quota=quota_feed(CONFIG, segment, impl))
    QuotaBoard(segment, "default").record("success", T0, sample(0.42, 0.12))
    assert await rec.record_quota() == 0
    assert rec.store is None and rec.last_error == "IOException: No space left on device"
    assert await rec.record_quota() == 0  # within the backoff: not tried
    await trio.sleep(service.BACKOFF_MAX)  # virtual time: past any backoff
    assert await rec.record_quota() == 2
    assert [r[3] for r in rows(rec)] == ["five_hour", "weekly"]
    await rec.finish()


class RefusesQuota(HistoryStore):
    """A store whose quota rows DuckDB refuses as data (a bug: retrying cannot help)."""

    def write_zai_quota(self, variant: str, rows: Any) -> int:
        raise duckdb.InvalidInputException("bad row")


async def test_rows_refused_as_data_are_logged_and_not_tried_again(
        tmp_path: Path, segment: Segment, impl: LedgerImpl, log_buffer: Any) -> None:
    def events(log_buffer: Any, name: str) -> list[dict[str, Any]]:
        logs.get_logger().flush()
        return [x for x in map(orjson.loads, log_buffer.getvalue().splitlines())
                if x["event"] == name]

    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production", store=RefusesQuota,
                   quota=quota_feed(CONFIG, segment, impl))
    QuotaBoard(segment, "default").record("success", T0, sample(0.42, 0.12))
    assert await rec.record_quota() == 0
    assert rec.store is not None and rec.last_error is None  # the file is fine
    assert [e["rows"] for e in events(log_buffer, "history_zai_quota_discarded")] == [2]
    assert await rec.record_quota() == 0
    assert len(events(log_buffer, "history_zai_quota_discarded")) == 1  # once per sample
    await rec.finish()


def test_the_recorder_process_reads_quota_only_when_it_is_polled(segment: Segment) -> None:
    assert isinstance(process._zai_quota(CONFIG, segment), QuotaFeed)
    assert process._zai_quota(CONFIG, None) is None  # no supervisor's segment
    not_polled = dataclasses.replace(CONFIG, quota_poll=False)
    assert process._zai_quota(not_polled, segment) is None
    paced = dataclasses.replace(not_polled, quota_pacing=True)  # pacing polls too
    assert isinstance(process._zai_quota(paced, segment), QuotaFeed)


# ---- the proxy's own count of the same window -------------------------------------------------


def test_local_share_is_the_workers_own_count_of_the_window(segment: Segment,
                                                            impl: LedgerImpl) -> None:
    config = dataclasses.replace(CONFIG, upstream_tokens_per_5h=1000,
                                 upstream_requests_per_5h=10, upstream_requests_per_week=50)
    spec = pool_of(config)
    worker = build_limiter(config, segment, impl, 0, spec.api_key_bytes(0), spec)
    assert isinstance(worker, Admitter)
    admit(worker, 0, 210, times=2)  # 420 of 1000 tokens, 2 of 10 requests, 2 of 50 a week
    feed = quota_feed(config, segment, impl)
    assert feed is not None and feed.local is not None
    QuotaBoard(segment, "default").record("success", T0, sample(0.5, 0.1))
    batch = feed.new()
    # 5 hours: the higher of tokens (0.42) and requests (0.2); the week: requests alone.
    assert {r.window: r.local_used_fraction for r in batch.rows} == {
        "five_hour": pytest.approx(0.42), "weekly": pytest.approx(0.04)}
    assert worker.upstream_used(0) == pytest.approx(0.42)  # what the pool's choice reads
    assert batch.sequences == (("default", 1),)


def test_local_share_per_key_of_a_pool_and_none_where_no_limit(segment: Segment,
                                                               impl: LedgerImpl) -> None:
    spec = PoolSpec((UpstreamKey("team", "key-team", Limits(), 0),
                     UpstreamKey("backup", "key-backup",
                                 Limits(tokens_per_week=1000, requests_per_minute=60), 1)),
                    from_file=True)
    worker = build_limiter(CONFIG, segment, impl, 0, spec.api_key_bytes(0), spec)
    assert isinstance(worker, Admitter)
    admit(worker, 1, 250)  # with the backup key
    admit(worker, 0, 999)  # with the team key: no window of its own to count it
    local = local_windows(CONFIG, segment, impl, spec)
    assert local is not None
    assert local.used(0) == {} and local.used(1) == {"weekly": pytest.approx(0.25)}
    feed = QuotaFeed(CONFIG, [QuotaBoard(segment, a) for a in spec.aliases], local)
    for alias in spec.aliases:
        QuotaBoard(segment, alias).record("success", T0, sample(0.3, 0.2))
    got = {(r.upstream, r.window): r.local_used_fraction for r in feed.new().rows}
    assert got == {("team", "five_hour"): None, ("team", "weekly"): None,
                   ("backup", "five_hour"): None, ("backup", "weekly"): pytest.approx(0.25)}


def test_local_share_is_capped_and_absent_without_a_window_or_with_redis(
        segment: Segment, impl: LedgerImpl) -> None:
    config = dataclasses.replace(CONFIG, upstream_tokens_per_5h=100)
    spec = pool_of(config)
    worker = build_limiter(config, segment, impl, 0, spec.api_key_bytes(0), spec)
    assert isinstance(worker, Admitter)
    plan = worker.plan(None, None)
    admission = worker.admit_now(plan, 50)
    assert isinstance(admission, Admission)
    worker.settle(admission, 180)  # the real usage is charged past the limit
    local = local_windows(config, segment, impl, spec)
    assert local is not None and local.used(0) == {"five_hour": 1.0}
    assert local_windows(CONFIG, segment, impl, pool_of(CONFIG)) is None  # no window set
    fleet = dataclasses.replace(config, limits_backend="redis")
    assert local_windows(fleet, segment, impl, spec) is None  # the fleet counts in Redis


# ---- the summary: JSON and the command line ---------------------------------------------------


def quota_row(ts: float, used: float, *, upstream: str = "default", window: str = "five_hour",
              reset: float | None = None, local: float | None = None) -> QuotaRow:
    return QuotaRow(ts, upstream, window, "TOKENS_LIMIT", used, reset, "pro", local)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    s = HistoryStore.open(str(tmp_path / "h.duckdb"), raw_days=1.0)
    yield s
    s.close()


def test_the_summary_has_each_keys_latest_sample_and_says_when_it_is_stale(
        store: HistoryStore) -> None:
    store.write_zai_quota("production", [
        quota_row(T0, 0.40, reset=T0 + H, local=0.35),
        quota_row(T0, 0.10, window="weekly", reset=T0 + 50 * H)])
    store.write_zai_quota("production", [
        quota_row(T0 + 600, 0.42, reset=T0 + H, local=0.38),
        quota_row(T0 + 600, 0.12, window="weekly", reset=T0 + 50 * H)])
    store.write_zai_quota("production", [quota_row(T0 - 3 * H, 0.9, upstream="backup")])
    store.write_zai_quota("canary", [quota_row(T0 + 30, 0.7, upstream="canary-key")])
    doc = history_summary(store, H, now=T0 + 660)
    assert doc["zai_quota"] == [
        {"upstream": "backup", "variant": "production", "sampled_at": T0 - 3 * H,
         "age_s": 3 * H + 660, "stale": True, "plan_tier": "pro",
         "windows": [{"window": "five_hour", "limit_type": "TOKENS_LIMIT", "used_fraction": 0.9,
                      "reset_at": None, "local_used_fraction": None}]},
        {"upstream": "canary-key", "variant": "canary", "sampled_at": T0 + 30, "age_s": 630.0,
         "stale": False, "plan_tier": "pro",
         "windows": [{"window": "five_hour", "limit_type": "TOKENS_LIMIT", "used_fraction": 0.7,
                      "reset_at": None, "local_used_fraction": None}]},
        {"upstream": "default", "variant": "production", "sampled_at": T0 + 600, "age_s": 60.0,
         "stale": False, "plan_tier": "pro",
         "windows": [{"window": "five_hour", "limit_type": "TOKENS_LIMIT",
                      "used_fraction": 0.42, "reset_at": T0 + H, "local_used_fraction": 0.38},
                     {"window": "weekly", "limit_type": "TOKENS_LIMIT", "used_fraction": 0.12,
                      "reset_at": T0 + 50 * H, "local_used_fraction": None}]}]
    only = history_summary(store, H, variant="canary", now=T0 + 660)["zai_quota"]
    assert [e["upstream"] for e in only] == ["canary-key"]
    # Inside the range but older than 15 minutes: stale too; a range that starts after the
    # sample: stale as well.
    later = history_summary(store, 24 * H, now=T0 + 600 + ZAI_QUOTA_STALE_S + 1)["zai_quota"]
    assert [(e["upstream"], e["stale"]) for e in later] == [
        ("backup", True), ("canary-key", True), ("default", True)]
    short = history_summary(store, 30, now=T0 + 660)["zai_quota"]
    assert [(e["upstream"], e["stale"]) for e in short] == [
        ("backup", True), ("canary-key", True), ("default", True)]


async def test_the_endpoints_summary_has_zai_quota(tmp_path: Path, segment: Segment,
                                                   impl: LedgerImpl) -> None:
    from zaiproxy.observe.recorder.endpoint import answer

    rec = Recorder(str(tmp_path / "h.duckdb"), variant="production", wall=lambda: T0 + 60,
                   quota=quota_feed(CONFIG, segment, impl))
    QuotaBoard(segment, "default").record("success", T0, sample(0.42, 0.12))
    assert await rec.record_quota() == 2
    status, _, body = await answer(rec, "GET", "/history/summary?range=1h&group_by=key", None,
                                   None)
    assert status == 200
    [entry] = orjson.loads(body)["zai_quota"]
    assert (entry["upstream"], entry["sampled_at"], entry["stale"]) == ("default", T0, False)
    assert [w["used_fraction"] for w in entry["windows"]] == [0.42, 0.12]
    await rec.finish()


def test_the_quota_line(store: HistoryStore) -> None:
    now = T0 + 60
    store.write_zai_quota("production", [
        quota_row(T0 + 11, 0.42, reset=T0 + 7500, local=0.38),  # 10:05 UTC
        quota_row(T0 + 11, 0.12, window="weekly")])
    out = cli_text(store, now)
    assert out == ("\nZ.AI quota (sampled 08:00:11 UTC): default 5h 42 % (local 38 %), "
                   "resets 10:05; weekly 12 %\n")
    store.write_zai_quota("production", [
        quota_row(T0 - 2 * H, 0.9, upstream="backup", window="weekly", reset=T0 + 3 * DAY)])
    out = cli_text(store, now)
    assert out.splitlines()[1] == (
        "Z.AI quota (sampled 06:00:00 UTC, stale: 2 h 1 min old): backup weekly 90 %, "
        "resets 2027-01-18 08:00")
    empty = Text()
    cli.render_zai_quota([], now, empty)  # not polled: not a word
    assert empty.text == ""


class Text:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)


def cli_text(store: HistoryStore, now: float) -> str:
    out = Text()
    doc = history_summary(store, H, now=now)
    cli.render_zai_quota(doc["zai_quota"], now, out)  # type: ignore[arg-type]
    return out.text


def test_zaiproxy_history_prints_the_quota_from_a_stopped_file(tmp_path: Path) -> None:
    path = str(tmp_path / "h.duckdb")
    now = time.time()
    store = HistoryStore.open(path)
    store.write_zai_quota("production", [quota_row(now - 30, 0.42, local=0.38),
                                         quota_row(now - 30, 0.12, window="weekly")])
    store.close()
    out, err = Text(), Text()
    ns = build_parser().parse_args(["history", "--path", path, "--range", "1h"])
    assert cli.run(ns, out, err) == 0, err.text  # type: ignore[arg-type]
    sampled = time.strftime("%H:%M:%S", time.gmtime(now - 30))
    assert (f"Z.AI quota (sampled {sampled} UTC): default 5h 42 % (local 38 %); weekly 12 %\n"
            in out.text)
    out = Text()
    ns = build_parser().parse_args(["history", "--path", path, "--json", "--by", "model"])
    assert cli.run(ns, out, err) == 0  # type: ignore[arg-type]
    [doc] = orjson.loads(out.text)
    assert [w["local_used_fraction"] for w in doc["zai_quota"][0]["windows"]] == [0.38, None]


# ---- retention --------------------------------------------------------------------------------


def test_quota_rows_are_kept_raw_days_like_snapshots(store: HistoryStore) -> None:
    store.write_zai_quota("production", [quota_row(T0, 0.1), quota_row(T0, 0.2, window="weekly")])
    store.write_zai_quota("production", [quota_row(T0 + H, 0.3)])
    store.snapshot(T0)
    assert store.maintain(T0 + DAY)[1] == (0, 0, 0, 0)  # raw_days=1: not older yet
    assert store.maintain(T0 + DAY + 1)[1] == (0, 1, 0, 2)  # with the snapshot of T0
    assert store.maintain(T0 + DAY + H + 1)[1] == (0, 0, 0, 1)
    assert store.con.execute("SELECT count(*) FROM zai_quota").fetchone() == (0,)
