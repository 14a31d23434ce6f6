"""A worker process: one ``trio.run`` serving its own SO_REUSEPORT socket.

Drain (SIGTERM/SIGINT, or the supervisor going away) follows hypercorn:
readiness goes false, the listener closes, idle keep-alive connections are
closed, and in-flight requests and streams get ``drain_timeout`` seconds
(a deadline on the connections' nursery, not a cancel). A second signal
exits at once.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import trio

from zaiproxy.core import logs
from zaiproxy.core.config import COMMIT_ENV, Config
from zaiproxy.core.pricing import DEFAULT_PRICES, load_prices
from zaiproxy.http import http11, netstream
from zaiproxy.http.connection import ClientConnection
from zaiproxy.http.netstream import FastSocketStream
from zaiproxy.limits.admission import Admitter, WaitQueue
from zaiproxy.limits.api import Limiter
from zaiproxy.limits.cells import mark_started, upstream_key_id
from zaiproxy.limits.fleet import FleetKeys, FleetLimiter, make_client, scaled
from zaiproxy.limits.keys import KeysFileError, KeyTable, load_keys
from zaiproxy.limits.ledger import load as load_ledger
from zaiproxy.limits.segment import LedgerImpl, Segment
from zaiproxy.limits.upstream_keys import PoolSpec, pool_of
from zaiproxy.limits.upstream_pool import KeyPool
from zaiproxy.limits.zai_quota import PaceBoard, PaceView, QuotaBoard, QuotaView
from zaiproxy.observe.metrics import WorkerMetrics
from zaiproxy.observe.recorder.client import HistoryClient
from zaiproxy.observe.recorder.sink import RecordSink
from zaiproxy.request import scanner, tokens
from zaiproxy.request.context import SharedState, WorkerContext
from zaiproxy.request.pipeline import Pipeline
from zaiproxy.request.routing import Upstream
from zaiproxy.run.sockets import trio_listener
from zaiproxy.upstream.pool import Origin, UpstreamPool, make_ssl_context
from zaiproxy.upstream.zai import RetryPolicy

_private_ids = itertools.count()

# Accept errors that mean "out of resources, try again soon" (trio.serve_listeners' list).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def open_ledger(impl: LedgerImpl, config: Config, path: str | None) -> Segment:
    """Attach to the supervisor's segment, or (no supervisor: tests, embedding) make a private one.

    A private segment is unlinked at once: it stays mapped for this process and
    leaves nothing behind in /dev/shm.
    """
    if path is not None:
        return impl.Ledger(path, create=False)
    private = f"/dev/shm/zaiproxy-private-{os.getpid()}-{next(_private_ids)}"
    ledger = impl.Ledger(private, create=True, rows=config.ledger_rows,
                         workers=max(1, config.workers))
    ledger.unlink()
    mark_started(ledger, time.time())
    return ledger


def build_limiter(config: Config, segment: Segment, ledger: LedgerImpl, worker_index: int,
                  api_key: bytes | None, spec: PoolSpec | None = None) -> Limiter:
    """The limits backend: this host's ledger, or the fleet's in Redis (with the ledger as
    its ``limits_fail = "local"`` fallback, every limit scaled by ``limits_local_share``).
    ``spec``: the pool of upstream keys (None: ``api_key`` alone, ``limits.upstream_*``)."""
    fleet = config.limits_backend == "redis"
    share = config.limits_local_share if fleet else 1.0

    def scope_id(key: bytes | None) -> bytes:
        # An upstream key's scope is named by a hash of the key, never the key itself.
        return b"upstream\0%x" % ledger.stable_hash(key or b"")

    first_limits = spec.keys[0].limits if spec is not None else config.upstream_limits()
    host = Admitter(
        segment, ledger, worker=worker_index,
        global_limits=scaled(config.global_limits(), share),
        upstream_limits=scaled(first_limits, share),
        upstream_id=scope_id(api_key),
        # Quota pacing caps the same rate op (limits/zai_quota.py).
        adaptive=config.adaptive_rate or config.quota_pacing,
        more_upstreams=[(scope_id(k.key.encode()), k.limits)
                        for k in (spec.keys[1:] if spec is not None else ())],
    )
    if not fleet:
        return host
    return FleetLimiter(
        client=make_client(config), local=host,
        keys=FleetKeys(config.redis_key_prefix, upstream_key_id(config.api_key)),
        segment=segment, global_limits=config.global_limits(),
        upstream_limits=config.upstream_limits(),
        adaptive=config.adaptive_rate or config.quota_pacing,
        worker=worker_index, lease_ttl_s=config.redis_lease_ttl,
        command_timeout_s=config.redis_command_timeout, fail=config.limits_fail,
        share=config.limits_local_share,
    )


def zai_quota_reader(config: Config, segment: Segment, aliases: tuple[str, ...],
                     ) -> Callable[[], list[tuple[QuotaView, PaceView | None]]] | None:
    """What ``/metrics``, ``/health`` and ``/admin/keys`` read of Z.AI's quota, per upstream
    key (None: not polled): the rows the supervisor's poller writes (limits/zai_quota.py)."""
    if not (config.quota_poll or config.quota_pacing):
        return None
    boards = [(QuotaBoard(segment, alias),
               PaceBoard(segment, alias) if config.quota_pacing else None) for alias in aliases]
    return lambda: [(board.view(config), pace.view(True) if pace is not None else None)
                    for board, pace in boards]


def load_key_table(path: str | None) -> KeyTable | None:
    return load_keys(path) if path is not None else None


def build_context(config: Config, *, worker_index: int = 0, state_cell: Any = None,
                  ledger_path: str | None = None, keys: KeyTable | None = None) -> WorkerContext:
    """Everything a worker serves with; ``keys``: the table in force (else read from the file)."""
    if config.http_impl != http11.IMPLEMENTATION:
        # The choice is made at import time from the environment, which the
        # supervisor sets before spawning: a mismatch is a wiring bug.
        raise RuntimeError(f"HTTP implementation {http11.IMPLEMENTATION!r} loaded, "
                           f"{config.http_impl!r} configured")
    ledger: LedgerImpl = load_ledger(config.ledger)
    origins = {
        Upstream.OPENAI: Origin.parse(config.openai_base_url),
        Upstream.ANTHROPIC: Origin.parse(config.anthropic_base_url),
        Upstream.NATIVE: Origin.parse(config.native_base_url),
    }
    needs_tls = any(o.tls for o in origins.values())
    pool = UpstreamPool(
        max_connections=config.pool_max_connections,
        idle_timeout=config.pool_idle_timeout,
        connect_timeout=config.connect_timeout,
        ssl_context=make_ssl_context(config.ca_file) if needs_tls else None,
    )
    segment = open_ledger(ledger, config, ledger_path)
    spec = pool_of(config)  # checked by the supervisor at start: a problem here is a race
    api_key = spec.api_key_bytes(0)
    admitter = build_limiter(config, segment, ledger, worker_index, api_key, spec)
    polled = config.quota_poll or config.quota_pacing
    key_pool = KeyPool(spec, segment, polled=polled,
                       local_used=getattr(admitter, "upstream_used", None))
    metrics = WorkerMetrics(
        variant=config.deployment_variant, ledger=ledger.IMPLEMENTATION, workers=config.workers,
        segment=segment, worker_index=worker_index,
        shared=ledger_path is not None,
        # The original service's ZAI_PROXY_COMMIT when ours is not set (core/original_env.py).
        commit=os.environ.get(COMMIT_ENV) or os.environ.get("ZAI_PROXY_COMMIT") or "unknown",
        pool_stats=lambda: (pool.active, pool.idle_count),
        alias_metrics=config.alias_metrics, known_models=frozenset(config.known_models),
        prices=load_prices(config.price_file) if config.price_file else DEFAULT_PRICES,
        concurrency_limit=config.concurrency,
        upstream_concurrency_limit=config.upstream_concurrency,
        quota=admitter.quota_use, limits_backend=config.limits_backend,
        zai_quota=zai_quota_reader(config, segment, spec.aliases),
        upstream_label=spec.from_file,
        relay=scanner.IMPLEMENTATION,
    )
    pump_hub = None
    if netstream.PUMP:
        from zaiproxy.http.pumphub import PumpHub  # imports the native pump: native relay only

        pump_hub = PumpHub()
    return WorkerContext(
        pump_hub=pump_hub,
        upstream_pool=key_pool,
        quota_gates=(tuple(PaceBoard(segment, alias) for alias in spec.aliases)
                     if config.quota_pacing else None),
        config=config, pool=pool, origins=origins, metrics=metrics,
        ledger=segment, ledger_impl=ledger.IMPLEMENTATION, admitter=admitter,
        keys=keys if keys is not None else load_key_table(config.keys_file),
        api_key=api_key,
        wait_queue=WaitQueue(config.queue_max),
        retry_policy=RetryPolicy(max_retries=config.max_retries),
        http_impl=http11.IMPLEMENTATION, worker_index=worker_index,
        shared_state=SharedState(state_cell), known_models=frozenset(config.known_models),
    )


class Worker:
    def __init__(self, ctx: WorkerContext, listeners: list[trio.SocketListener]) -> None:
        self.ctx = ctx
        self.listeners = listeners
        self.pipeline = Pipeline(ctx)
        self.connections: set[ClientConnection] = set()
        self.drain_requested = trio.Event()
        self.finished = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = self.ctx
        log = logs.get_logger()
        if ctx.config.token_counting:
            # ~0.15 s in a thread, before "ready": the first request must not pay for it.
            await tokens.load_encoding()
        async with trio.open_nursery() as root:
            root.start_soon(ctx.pool.reap)
            root.start_soon(ctx.pool.watch_idle, ctx.config.body_idle_timeout)
            if ctx.pump_hub is not None:
                root.start_soon(ctx.pump_hub.run)
            async with trio.open_nursery() as conns:
                accept_scope = trio.CancelScope()

                async def accept_all() -> None:
                    with accept_scope:
                        async with trio.open_nursery() as acceptors:
                            for listener in self.listeners:
                                acceptors.start_soon(self._accept_loop, listener, conns)

                conns.start_soon(accept_all)
                task_status.started()
                await self.drain_requested.wait()
                log.info("drain_started", connections=len(self.connections),
                         deadline_s=ctx.config.drain_timeout)
                ctx.draining = True
                accept_scope.cancel()
                for listener in self.listeners:
                    await listener.aclose()
                for c in list(self.connections):
                    if c.idle_scope is not None:
                        c.idle_scope.cancel()
                conns.cancel_scope.deadline = trio.current_time() + ctx.config.drain_timeout
            if conns.cancel_scope.cancelled_caught:
                log.warning("drain_deadline_reached", aborted=len(self.connections))
            root.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await ctx.pool.aclose()
        log.info("drained")
        self.finished.set()

    async def _accept_loop(self, listener: trio.SocketListener, conns: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                    logs.get_logger().error("accept_failed", error=exc.strerror)
                    await trio.sleep(0.1)
                    continue
                raise
            conns.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, accepted: trio.SocketStream) -> None:
        try:
            peer = accepted.socket.getpeername()
            client_ip = peer[0] if isinstance(peer, tuple) else "unix"
        except OSError:
            await trio.aclose_forcefully(accepted)
            return
        stream = FastSocketStream.from_trio(accepted)
        handler = self.pipeline.connection(stream, client_ip)
        self.connections.add(handler)
        try:
            await handler.run()
        finally:
            self.connections.discard(handler)

    async def watch_signals(self) -> None:
        """SIGTERM starts the drain; more SIGTERMs change nothing.

        Process managers often signal the whole group (systemd's control-group
        kill mode, ``timeout``), so a worker can get SIGTERM from them *and*
        from the supervisor: that must not count as the operator's second
        signal. The immediate exit on a second signal is the supervisor's job
        (it SIGKILLs the workers).
        """
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                self.drain_requested.set()

    async def watch_reload(self) -> None:
        """SIGHUP reloads the client keys file; a bad file is rejected and the old one stays.

        Connections are untouched: requests in flight keep the plan they were
        admitted with; new requests use the new keys and limits.
        """
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                await self.reload_keys()

    async def reload_keys(self) -> bool:
        ctx = self.ctx
        log = logs.get_logger()
        path = ctx.config.keys_file
        if path is None:
            log.warning("keys_reload_ignored", reason="no keys file configured")
            return False
        try:
            table = await trio.to_thread.run_sync(load_keys, path)
        except KeysFileError as exc:
            log.error("keys_reload_rejected", path=path, problems=exc.problems,
                      kept=len(ctx.keys) if ctx.keys is not None else 0)
            return False
        ctx.keys = table
        ctx.admitter.forget_plans()
        log.info("keys_reloaded", path=path, keys=len(table))
        return True

    async def watch_parent(self, parent_pid: int) -> None:
        """Drain if the supervisor disappears (no orphaned workers holding the port)."""
        # No event exists for "parent died" without prctl(PR_SET_PDEATHSIG); poll.
        while os.getppid() == parent_pid:  # noqa: ASYNC110
            await trio.sleep(1)
        logs.get_logger().warning("supervisor_gone")
        self.drain_requested.set()


def worker_main(index: int, sock: socket.socket, config: Config, state_cell: Any,
                ready: Connection | None, parent_pid: int, ledger_path: str | None = None,
                keys: KeyTable | None = None, record_channel: socket.socket | None = None) -> None:
    """Entry point of a spawned worker process."""
    # The terminal's Ctrl-C reaches the whole process group; only the
    # supervisor acts on it (and forwards SIGTERM), otherwise its SIGTERM would
    # be each worker's *second* signal and skip the drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A SIGTERM before trio's receiver is installed (start-up) or after it is
    # gone (drained) is remembered, never fatal: trio restores this handler.
    early_sigterm: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: early_sigterm.append(signum))
    # SIGHUP's default action kills the process. Until trio's receiver is up it is
    # remembered, like SIGTERM: a reload signalled while this worker starts (with the
    # table from before the reload) is done once it runs, not lost.
    early_sighup: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: early_sighup.append(signum))
    logs.configure(config.level, proc=f"worker-{index}")
    ctx = build_context(config, worker_index=index, state_cell=state_cell, ledger_path=ledger_path,
                        keys=keys)
    segment_inode = os.stat(ledger_path).st_ino if ledger_path is not None else -1
    if record_channel is not None:  # the history recorder's channel (zaiproxy/observe/recorder/sink.py)
        ctx.record_sink = RecordSink(record_channel, worker=index,
                                     variant=config.deployment_variant)
        ctx.metrics.set_recorder_stats(ctx.record_sink.stats)
        ctx.history_query = HistoryClient(config.history_path, config.admin_token)
    worker = Worker(ctx, [trio_listener(sock)])
    if config.token_counting:
        # Before the loop exists, so in this thread: nothing waits on it, and tiktoken's
        # tables land in the main heap (loaded in a helper thread they cost ~2.5 MB more
        # RSS: that thread's malloc arena). Worker.run then finds the encoding loaded.
        tokens.encoding()
    # Everything allocated so far (modules, config, tables) lives as long as the process:
    # move it out of the collector's reach, so a full collection under load scans only what
    # requests allocate (~7 ms per full collection before, a latency spike every few hundred
    # requests; ~0 after). Instagram's gc.freeze() recipe for long-lived servers.
    gc.collect()
    gc.freeze()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.watch_signals)
            nursery.start_soon(worker.watch_parent, parent_pid)
            nursery.start_soon(worker.watch_reload)
            if ctx.record_sink is not None:
                nursery.start_soon(ctx.record_sink.run)
            await nursery.start(ctx.admitter.run)
            await nursery.start(worker.run)
            if early_sigterm:
                worker.drain_requested.set()
            if early_sighup:
                nursery.start_soon(worker.reload_keys)
            if ready is not None:
                ready.send(("ready", os.getpid()))
                ready.close()
            await worker.finished.wait()  # run() has drained
            await ctx.admitter.aclose()  # the drained requests' last settles
            nursery.cancel_scope.cancel()

    trio.run(main)
    if ctx.record_sink is not None:
        ctx.record_sink.close()  # the records of the drained requests
    if ledger_path is not None and os.getppid() != parent_pid:
        # Orphaned (the supervisor was SIGKILLed): nobody else will unlink the segment, and
        # without a supervisor it is useless. The other workers keep their mappings. Only
        # if it is still *our* file: a new supervisor may already own that path.
        with contextlib.suppress(OSError):
            if os.stat(ledger_path).st_ino == segment_inode:
                os.unlink(ledger_path)
    logs.get_logger().flush()

