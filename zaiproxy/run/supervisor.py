"""The supervisor: binds, spawns workers, restarts the dead, drains on signal.

- Workers are started with the *spawn* method (never forked from a process
  that may run threads or a trio loop) and each gets its own SO_REUSEPORT
  socket, bound here. The supervisor keeps its copies open while running, so a
  dead worker's queued connections wait for its replacement instead of being
  refused.
- A worker that dies is restarted with exponential backoff (0.25 s doubling
  to 30 s; reset after a minute of good health: ``core/backoff.py``), and logged.
- SIGTERM/SIGINT: readiness turns false in every worker at once (shared state
  cell), the listening sockets close, workers drain with ``drain_timeout``,
  exit code 0. A second signal kills the workers and exits at once.
- ``--demo``: the built-in mock upstream runs as a child process on loopback.
- The shared-memory ledger segment is created here after binding (a stale one
  from a crash is recreated: the port probe proved no other supervisor owns
  it), handed to every worker by path, and unlinked on exit. When a worker
  dies, its concurrency leases are reclaimed before it is replaced.
- The adaptive upstream rate is decided here, once for all workers
  (``zaiproxy.limits.ratecontrol``), from the workers' shared counters.
- The history recorder (``zaiproxy.observe.recorder``, when ``history`` is on) is one more
  child: spawned before the workers (they get its channel), restarted with the
  same backoff, never fatal, and stopped after the workers in the drain so that
  it writes every record they sent (``recorder/supervise.py``).
- SIGHUP: the keys file is validated here; if good, every worker reloads it;
  if bad, the error is logged and the old keys stay in force. "In force"
  includes workers started later (a restart after a crash): the supervisor
  keeps the last good table and hands it to every worker it spawns, which
  therefore never reads a file nobody validated (it used to, and a rejected
  file on disk turned any worker restart into a crash loop).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

from zaiproxy import __version__
from zaiproxy.core import logs
from zaiproxy.core.backoff import Backoff
from zaiproxy.core.config import Config
from zaiproxy.http.http11 import ENV as HTTP_IMPL_ENV
from zaiproxy.limits.cells import mark_started
from zaiproxy.limits.fleet import make_client
from zaiproxy.limits.fleet_rate import FleetRate
from zaiproxy.limits.keys import KeysFileError, KeyTable, load_keys
from zaiproxy.limits.ledger import LedgerUnavailable
from zaiproxy.limits.ledger import load as load_ledger
from zaiproxy.limits.ratecontrol import RateController
from zaiproxy.limits.segment import Segment
from zaiproxy.limits.upstream_keys import PoolSpec, UpstreamKeysError, pool_of
from zaiproxy.limits.zai_quota import QuotaPoller
from zaiproxy.observe.recorder.supervise import RecorderHandle
from zaiproxy.request.admin_access import ADMIN_API_OPEN, open_api_message, security_warnings
from zaiproxy.request.context import STATE_DRAINING, STATE_RUNNING, STATE_STARTING
from zaiproxy.run.sockets import bind_reuseport
from zaiproxy.run.worker import worker_main

DEMO_UPSTREAM_KEY = "demo-upstream-key"  # what the demo mock requires, so key injection is exercised


@dataclasses.dataclass(eq=False)
class _Slot:
    index: int
    process: BaseProcess | None = None
    ready_pipe: Connection | None = None
    backoff: Backoff = dataclasses.field(default_factory=Backoff)
    restart_at: float | None = None
    ready_once: bool = False


class Supervisor:
    def __init__(self, config: Config, *, out: TextIO | None = None) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.mp = multiprocessing.get_context("spawn")
        self.state = self.mp.RawValue("i", STATE_STARTING)
        self.slots: list[_Slot] = []
        self.socks: list[Any] = []
        self.mock: subprocess.Popen[str] | None = None
        self.signals: list[int] = []
        self.reloads = 0  # SIGHUPs not yet handled
        self.keys: KeyTable | None = None  # the client keys in force (None = open mode)
        self.segment: Segment | None = None  # the shared-memory ledger, made by run()
        self.rates: RateController | None = None
        self.fleet_rate: FleetRate | None = None
        self.quota: QuotaPoller | None = None
        self.pool: PoolSpec | None = None
        self.exit_code = 0  # 1 when start-up failed; the drain keeps it
        self.recorder: RecorderHandle | None = None  # the history recorder (None: history off)
        self.log = logs.get_logger()

    # ---- start-up -------------------------------------------------------------

    def _start_demo_upstream(self) -> Config:
        cmd = [sys.executable, "-m", "zaiproxy", "mock-upstream", "--host", "127.0.0.1",
               "--port", "0", "--api-key", DEMO_UPSTREAM_KEY, "--chunks", "24",
               "--chunk-delay", "0.03",
               # Small windows and a short poll, so a newcomer sees Z.AI's quota fill.
               "--quota-five-hour", "20000", "--quota-weekly", "200000"]
        # Its own session: the terminal's Ctrl-C must not stop it before the
        # proxy has drained the streams that depend on it.
        self.mock = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.mock.stdout is not None
        ready, _, _ = select.select([self.mock.stdout], [], [], 15)
        line = self.mock.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.mock.kill()
            raise RuntimeError(f"the demo mock upstream did not start (got {line!r})")
        url = line.split("listening on ", 1)[1].split()[0]
        banner = (
            "\n" + "=" * 72 + "\n"
            "  DEMO MODE: no ZAI_API_KEY in use. Requests go to the built-in MOCK\n"
            f"  upstream at {url} (not Z.AI). Set ZAI_API_KEY to proxy to Z.AI.\n"
            + "=" * 72 + "\n"
        )
        sys.stderr.write(banner)
        sys.stderr.flush()
        self.log.warning("demo_mode", mock_upstream=url)
        return dataclasses.replace(
            self.config,
            openai_base_url=f"{url}/api/paas/v4",
            anthropic_base_url=f"{url}/api/anthropic",
            native_base_url=url,
            api_key=DEMO_UPSTREAM_KEY,
            # The mock serves Z.AI's quota API and fills it with the traffic it answers.
            quota_poll=True,
            quota_base_url=None,
            quota_interval=min(self.config.quota_interval, 10.0),
        )

    def _segment(self) -> Segment:
        assert self.segment is not None, "run() makes the segment before any worker exists"
        return self.segment

    def _spawn(self, slot: _Slot) -> None:
        parent_end, child_end = self.mp.Pipe(duplex=False)
        process = self.mp.Process(
            target=worker_main,
            args=(slot.index, self.socks[slot.index], self.config, self.state, child_end,
                  os.getpid(), self._segment().path, self.keys,
                  self.recorder.channel if self.recorder is not None else None),
            name=f"zaiproxy-worker-{slot.index}",
        )
        process.start()
        child_end.close()
        slot.process = process
        slot.ready_pipe = parent_end
        slot.backoff.started(time.monotonic())
        slot.restart_at = None
        self.log.info("worker_started", worker=slot.index, worker_pid=process.pid)

    # ---- the loop ---------------------------------------------------------------

    def run(self) -> int:
        cfg = self.config
        try:
            ledger = load_ledger(cfg.ledger)
        except LedgerUnavailable as exc:
            self.log.error("ledger_unavailable", error=str(exc))
            sys.stderr.write(f"zaiproxy: {exc}\n")
            return 1
        # Workers pick their HTTP implementation at import time, from the
        # environment they inherit (zaiproxy/http/http11.py); check it imports here
        # so a missing package fails start-up once, clearly.
        os.environ[HTTP_IMPL_ENV] = cfg.http_impl
        if cfg.http_impl == "h11-mypyc" and importlib.util.find_spec("h11_mypyc") is None:
            sys.stderr.write("zaiproxy: http_impl h11-mypyc needs the h11-mypyc package "
                             "(pip install 'zaiproxy[fast]')\n")
            return 1
        if cfg.keys_file is not None:
            try:
                self.keys = load_keys(cfg.keys_file)
            except KeysFileError as exc:
                self.log.error("keys_file_invalid", path=cfg.keys_file, problems=exc.problems)
                sys.stderr.write(f"zaiproxy: invalid keys file:\n{exc}\n")
                return 1
            self._warn_token_limits(self.keys)
        try:
            # The pool of upstream keys, checked once here (workers read it again).
            self.pool = pool_of(cfg)
        except UpstreamKeysError as exc:
            self.log.error("upstream_keys_file_invalid", path=cfg.upstream_keys_file,
                           problems=exc.problems)
            sys.stderr.write(f"zaiproxy: invalid upstream keys file:\n{exc}\n")
            return 1
        if cfg.demo:
            self.config = cfg = self._start_demo_upstream()
            self.pool = pool_of(cfg)
        try:
            self.socks = bind_reuseport(cfg.host, cfg.port, cfg.workers)
        except OSError as exc:
            self.log.error("bind_failed", host=cfg.host, port=cfg.port, error=exc.strerror)
            sys.stderr.write(f"zaiproxy: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}\n")
            self._stop_mock()
            return 1
        host, port = self.socks[0].getsockname()[:2]
        if ADMIN_API_OPEN in security_warnings(host, cfg.admin_token):
            self.log.warning(ADMIN_API_OPEN, host=host, port=port, message=open_api_message())
        path = cfg.ledger_path or f"/dev/shm/zaiproxy-{port}"
        try:
            self.segment = ledger.Ledger(path, create=True, rows=cfg.ledger_rows,
                                         workers=cfg.workers)
        except (OSError, ledger.LedgerError) as exc:
            self.log.error("ledger_create_failed", path=path, error=str(exc))
            sys.stderr.write(f"zaiproxy: cannot create the ledger segment {path}: {exc}\n")
            for sock in self.socks:
                sock.close()
            self._stop_mock()
            return 1
        mark_started(self.segment, time.time())  # the host's windows cover nothing before
        self.log.info("ledger_created", path=path, implementation=ledger.IMPLEMENTATION,
                      rows=cfg.ledger_rows, workers=cfg.workers)
        fleet = cfg.limits_backend == "redis"
        # Pacing needs samples: it turns the poller on (limits/zai_quota.py).
        polling = cfg.quota_poll or cfg.quota_pacing
        if polling:
            # One poller for the host; with Redis, only the pod leading the fleet's rate polls.
            self.quota = QuotaPoller(
                self.segment, cfg, keys=[(k.alias, k.key) for k in self.pool.keys],
                leader=(lambda: self.fleet_rate is not None and self.fleet_rate.leader)
                if fleet else None,
                redis=make_client(cfg) if fleet else None)
        if fleet and (cfg.adaptive_rate or polling):
            # One rate for the fleet, decided by one pod (limits/fleet_rate.py), which is
            # also the pod that polls Z.AI's quota and paces on it.
            self.fleet_rate = FleetRate(self.segment, cfg, quota=self.quota)
            self.fleet_rate.start()
        elif cfg.adaptive_rate or cfg.quota_pacing:
            state_file = cfg.state_file or os.path.join(
                tempfile.gettempdir(), f"zaiproxy-adaptive-{port}.json")
            self.rates = RateController(self.segment, cfg, state_file, quota=self.quota,
                                        pool=self.pool)
        if self.quota is not None:
            self.quota.start()

        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_sighup)
        try:
            if cfg.history:
                # Before the workers: they get its channel. Never fatal (recorder/supervise.py).
                self.recorder = RecorderHandle(self.mp, dataclasses.replace(
                    cfg, history_path=os.path.abspath(cfg.history_path)), self.segment.path)
                self.recorder.spawn()
            self.slots = [_Slot(i) for i in range(cfg.workers)]
            for slot in self.slots:
                self._spawn(slot)
            return self._loop(wake_r, host, port, ledger.IMPLEMENTATION)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            os.close(wake_r)
            os.close(wake_w)
            if self.recorder is not None:
                self.recorder.close()
            for sock in self.socks:
                sock.close()
            self._stop_mock()
            if self.rates is not None:
                self.rates.save()
            if self.fleet_rate is not None:
                self.fleet_rate.stop()
            if self.quota is not None:
                self.quota.stop()
            self.segment.close()
            self.segment.unlink()
            self.log.flush()

    def _warn_token_limits(self, table: KeyTable) -> None:
        """Per-key token limits need token counting; say so instead of ignoring them quietly."""
        if self.config.token_counting:
            return
        aliases = [key.alias for key in table
                   if any(getattr(key.limits, name) is not None
                          for name in ("tokens_per_minute", "tokens_per_5h", "tokens_per_week"))]
        if aliases:
            self.log.warning("key_token_limits_not_enforced", keys=aliases,
                             reason="token counting is off (TOKEN_COUNTING_ENABLED=false)")

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reloads += 1

    def _reload_keys(self) -> None:
        """Validate the keys file here, then have every worker load it (they keep the old on error)."""
        self.reloads = 0
        path = self.config.keys_file
        if path is None:
            self.log.warning("keys_reload_ignored", reason="no keys file configured")
            return
        try:
            table = load_keys(path)
        except KeysFileError as exc:
            self.log.error("keys_reload_rejected", path=path, problems=exc.problems)
            return
        self.keys = table  # what workers started from now on get
        self.log.info("keys_reload", path=path, keys=len(table))
        self._warn_token_limits(table)
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                try:
                    os.kill(slot.process.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass

    def _loop(self, wake_r: int, host: str, port: int, ledger: str) -> int:
        announced = False
        while True:
            if self.signals:
                return self._drain()
            if self.reloads:
                self._reload_keys()
            now = time.monotonic()
            if self.rates is not None:
                self.rates.tick(now)
            for slot in self.slots:
                if slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot)
            if self.recorder is not None:
                self.recorder.poll(now)
            if not announced and all(s.ready_once for s in self.slots):
                announced = True
                self.state.value = STATE_RUNNING
                scheme_host = f"[{host}]" if ":" in host else host
                workers = f"{len(self.slots)} worker" + ("s" if len(self.slots) != 1 else "")
                self.out.write(
                    f"zaiproxy listening on http://{scheme_host}:{port} "
                    f"({workers}, variant {self.config.deployment_variant}, ledger {ledger})\n")
                self.out.flush()
                if self.mock is not None:
                    base = f"http://{scheme_host}:{port}"
                    sys.stderr.write(
                        "Try it (demo mode, mock upstream):\n"
                        f"  curl -N {base}/v1/chat/completions -H 'content-type: application/json' "
                        "-d '{\"model\":\"glm-4.6\",\"stream\":true,"
                        "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'\n"
                        f"  ANTHROPIC_BASE_URL={base} ANTHROPIC_AUTH_TOKEN=any claude\n")
                    sys.stderr.flush()
                self.log.info("started", host=host, port=port, workers=len(self.slots),
                              version=__version__, ledger=ledger,
                              openai_upstream=self.config.openai_base_url,
                              anthropic_upstream=self.config.anthropic_base_url)

            waitables: list[Any] = [wake_r]
            for slot in self.slots:
                if slot.process is not None:
                    waitables.append(slot.process.sentinel)
                if slot.ready_pipe is not None:
                    waitables.append(slot.ready_pipe)
            pending = [s.restart_at for s in self.slots if s.restart_at is not None]
            if self.recorder is not None:
                waitables.extend(self.recorder.waitables())
                if self.recorder.restart_at is not None:
                    pending.append(self.recorder.restart_at)
            timeout = max(0.0, min(pending) - time.monotonic()) if pending else 1.0
            for obj in wait(waitables, timeout=timeout):
                if obj == wake_r:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
            for slot in self.slots:
                self._poll_ready(slot)
                if (slot.process is not None and not slot.process.is_alive()
                        and not self._on_worker_exit(slot, announced)):
                    self.signals.append(signal.SIGTERM)
                    self.exit_code = 1

    def _poll_ready(self, slot: _Slot) -> None:
        pipe = slot.ready_pipe
        if pipe is None:
            return
        try:
            if not pipe.poll():
                return
            pipe.recv()
            slot.ready_once = True
            self.log.info("worker_ready", worker=slot.index,
                          worker_pid=slot.process.pid if slot.process else None)
        except (EOFError, OSError):
            pass
        pipe.close()
        slot.ready_pipe = None

    def _on_worker_exit(self, slot: _Slot, announced: bool) -> bool:
        """Schedule a restart; False when start-up itself failed (no point in looping)."""
        assert slot.process is not None
        code = slot.process.exitcode
        restart = slot.backoff.exited(time.monotonic())
        slot.process.close()
        slot.process = None
        # Its leases would hold concurrency slots forever; the index is reused by the replacement.
        reclaimed = self._segment().reclaim(slot.index)
        if reclaimed:
            self.log.warning("leases_reclaimed", worker=slot.index, leases=reclaimed)
        if slot.ready_pipe is not None:
            slot.ready_pipe.close()
            slot.ready_pipe = None
        if not announced and not slot.ready_once:
            self.log.error("worker_failed_to_start", worker=slot.index, exit_code=code)
            return False
        slot.restart_at = restart.at
        self.log.error("worker_died", worker=slot.index, exit_code=code,
                       signal=-code if code is not None and code < 0 else None,
                       restart_in_s=restart.delay, lived_s=round(restart.lived, 3))
        return True

    # ---- shutdown ---------------------------------------------------------------

    def _drain(self) -> int:
        first = self.signals.pop(0)
        self.state.value = STATE_DRAINING
        deadline = time.monotonic() + self.config.drain_timeout + 5.0
        self.log.info("drain_started", signal=first, drain_timeout_s=self.config.drain_timeout)
        for sock in self.socks:
            sock.close()  # the workers' copies close as they drain
        alive = [s for s in self.slots if s.process is not None]
        for slot in self.slots:
            slot.restart_at = None
        for slot in alive:
            assert slot.process is not None
            if slot.process.pid is not None:
                try:
                    os.kill(slot.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        clean = True
        while alive:
            if self.signals:
                second = self.signals.pop(0)
                self.log.warning("second_signal_exit", signal=second)
                self._kill_all(alive)
                if self.recorder is not None:
                    self.recorder.kill()
                return 128 + second
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.log.error("drain_timeout_kill", workers=len(alive))
                self._kill_all(alive)
                clean = False
                break
            wait([s.process.sentinel for s in alive if s.process is not None],
                 timeout=min(remaining, 0.5))
            still: list[_Slot] = []
            for slot in alive:
                assert slot.process is not None
                if slot.process.is_alive():
                    still.append(slot)
                elif slot.process.exitcode not in (0, None):
                    clean = False
                    self.log.warning("worker_exit_nonzero", worker=slot.index,
                                     exit_code=slot.process.exitcode)
            alive = still
        if self.recorder is not None:
            # After the workers: the STOP marker follows everything they sent.
            self.recorder.stop()
        self.log.info("drained", clean=clean)
        return self.exit_code if clean else 1

    def _kill_all(self, slots: list[_Slot]) -> None:
        for slot in slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.kill()
                slot.process.join(2)

    def _stop_mock(self) -> None:
        if self.mock is not None and self.mock.poll() is None:
            self.mock.terminate()
            try:
                self.mock.wait(5)
            except subprocess.TimeoutExpired:
                self.mock.kill()
        self.mock = None
