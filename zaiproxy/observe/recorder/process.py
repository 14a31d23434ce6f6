"""Entry point of the recorder process (spawned by the supervisor, like a worker).

Stopping: the supervisor stops the workers first, then sends the STOP marker
through the channel; the recorder reads every datagram before it, writes them,
and exits 0. SIGTERM alone does *not* stop it at once: process managers signal
the whole group (systemd, ``timeout``), and a recorder that left first would lose
the records of the requests the workers are still draining. After SIGTERM it
waits for STOP for ``drain_timeout`` + :data:`TERM_GRACE` seconds, or until the
supervisor is gone, then drains what is queued and exits. SIGINT is ignored
(the terminal's Ctrl-C is the supervisor's to handle).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import orjson
import trio

from zaiproxy.core import logs
from zaiproxy.core.config import Config

if TYPE_CHECKING:
    from zaiproxy.observe.recorder.service import Recorder

TERM_GRACE = 15.0
PARENT_POLL = 0.5


def endpoint_file(history_path: str) -> str:
    return history_path + ".endpoint"


def write_endpoint_file(history_path: str, url: str) -> None:
    path = endpoint_file(history_path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps({"url": url, "pid": os.getpid()}))
        os.replace(tmp, path)
    except OSError as exc:
        # Same directory as the history file: if this fails the file will too, and that is
        # reported (and retried) by the recorder. Queries still work through the supervisor's log.
        logs.get_logger().error("recorder_endpoint_file_failed", path=path, error=str(exc))


def remove_endpoint_file(history_path: str) -> None:
    path = endpoint_file(history_path)
    with contextlib.suppress(OSError):
        with open(path, "rb") as fh:
            if orjson.loads(fh.read()).get("pid") != os.getpid():
                return  # a newer recorder's
        os.unlink(path)


async def _watch(recorder: Recorder, parent_pid: int, grace: float, early: list[int]) -> None:
    """SIGTERM → stop after ``grace`` (or at once if the supervisor is gone)."""
    deadline: float | None = trio.current_time() + grace if early else None
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        while True:
            if os.getppid() != parent_pid:
                logs.get_logger().warning("supervisor_gone")
                recorder.stop_requested.set()
                return
            if deadline is not None and trio.current_time() >= deadline:
                logs.get_logger().warning("recorder_stop_marker_timeout", waited_s=grace)
                recorder.stop_requested.set()
                return
            with trio.move_on_after(PARENT_POLL):
                async for _ in signals:
                    if deadline is None:
                        deadline = trio.current_time() + grace
                    break


def recorder_main(channel: socket.socket, config: Config, ready: Connection | None,
                  parent_pid: int, ledger_path: str | None = None, run: str | None = None,
                  channel_bytes: int | None = None) -> None:
    """Entry point of the spawned recorder process. ``run``: the channel's id (the
    sequence numbers' progress of other runs is dropped); ``channel_bytes``: its capacity."""
    # Imported here: the supervisor imports this module for the target's name only, and
    # should not load DuckDB for that.
    from zaiproxy.observe.recorder.endpoint import serve_endpoint
    from zaiproxy.observe.recorder.service import Recorder

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    early_sigterm: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: early_sigterm.append(signum))
    logs.configure(config.level, proc="recorder")
    log = logs.get_logger()
    path = config.history_path
    # The default location is a state directory that may not exist yet (owner-only: the
    # history names client key aliases and models).
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    segment, cells = _attach_metrics(config, ledger_path)
    recorder = Recorder(path, variant=config.deployment_variant, raw_days=config.history_raw_days,
                        rollup_days=config.history_rollup_days, channel=channel, cells=cells,
                        prices=_prices(config), run=run, channel_bytes=channel_bytes,
                        quota=_zai_quota(config, segment))

    async def serve(rec: Recorder, *, task_status: trio.TaskStatus[str]) -> None:
        await serve_endpoint(rec, config.admin_token, task_status=task_status)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            grace = config.drain_timeout + TERM_GRACE
            nursery.start_soon(_watch, recorder, parent_pid, grace, early_sigterm)
            async with trio.open_nursery() as inner:  # done when run() has flushed and closed
                url = await inner.start(recorder.run, serve)
                write_endpoint_file(path, url)
                log.info("recorder_ready", url=url, path=path)
                if ready is not None:
                    ready.send(("ready", os.getpid(), url))
                    ready.close()
            nursery.cancel_scope.cancel()
        remove_endpoint_file(path)

    try:
        trio.run(main)
    finally:
        if segment is not None:
            segment.close()
        log.flush()


def _prices(config: Config) -> Any:
    """The price table the workers' metrics use (cost_usd of each row), or None."""
    from zaiproxy.core.pricing import DEFAULT_PRICES, PriceFileError, load_prices

    if config.price_file is None:
        return DEFAULT_PRICES
    try:
        return load_prices(config.price_file)
    except (PriceFileError, OSError) as exc:  # checked at start-up; changed since?
        logs.get_logger().error("recorder_prices_unavailable", path=config.price_file,
                                error=str(exc))
        return None


def _attach_metrics(config: Config, ledger_path: str | None) -> tuple[Any, Any]:
    """(segment, metrics.RecorderCells) on the supervisor's shared memory, or (None, None)."""
    if ledger_path is None:
        return None, None
    from zaiproxy.limits.ledger import load
    from zaiproxy.observe.metrics import RecorderCells

    segment = None
    try:
        segment = load(config.ledger).Ledger(ledger_path, create=False)
        return segment, RecorderCells(segment)
    except Exception as exc:  # LedgerUnavailable, LedgerError, OSError: metrics only
        logs.get_logger().error("recorder_metrics_unavailable", path=ledger_path, error=str(exc))
        if segment is not None:
            segment.close()
        return None, None


def _zai_quota(config: Config, segment: Any) -> Any:
    """Z.AI's quota samples from the supervisor's segment (recorder/quota.py), or None."""
    if segment is None:
        return None
    from zaiproxy.limits.ledger import load
    from zaiproxy.observe.recorder.quota import quota_feed

    return quota_feed(config, segment, load(config.ledger))
