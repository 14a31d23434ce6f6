"""Process trees under /proc and child servers: what the benchmarks measure and start.

- :func:`tree_pids`: a process and its live descendants, through
  ``/proc/PID/task/TID/children`` or, on kernels without that file, a scan of every
  ``/proc/PID/stat`` for parent pids;
- :class:`TreeSampler`: CPU time (utime + stime) of a whole tree over a window and the
  peak of its summed VmRSS, sampled every 200 ms, plus the max per process;
- :class:`WindowSampler`: the same for several trees and the machine, as time series, for
  windows known only afterwards;
- :func:`machine_cpu_seconds`, :func:`all_cpu_seconds`, :func:`busiest_others`: where the
  machine's cores went, including processes outside the benchmark;
- :class:`Child`: a server started as a child process, its stdout and stderr in log files,
  stopped with a signal sequence that ends in SIGKILL.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import platform
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT = 60.0  # seconds a child gets to print its "listening on" line
STOP_TIMEOUT = 15.0  # seconds a child gets after each stop signal before the next one
SAMPLE_INTERVAL = 0.2  # seconds between RSS samples
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A precondition failed (a child did not start, a sample request was wrong, ...)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN; without it, scan /proc for parents.
HAVE_CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (empty if it is gone)."""
    if HAVE_CHILDREN_FILES:
        out: list[int] = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out.extend(int(child) for child in f.read().split())
        except FileNotFoundError:
            pass
        return out
    return parents().get(pid, [])


def parents() -> dict[int, list[int]]:
    """Parent pid -> child pids, from the 4th field of every /proc/PID/stat."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(name))
    return out


def tree_pids(root: int, by_parent: dict[int, list[int]] | None = None) -> list[int]:
    """``root`` and all its descendants that are alive right now; ``by_parent`` (from
    :func:`parents`) saves the /proc scan when several trees are walked at once."""
    if by_parent is None and not HAVE_CHILDREN_FILES:
        by_parent = parents()  # one /proc scan per call
    pids: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if not os.path.exists(f"/proc/{pid}"):
            continue
        pids.append(pid)
        todo.extend(child_pids(pid) if by_parent is None else by_parent.get(pid, []))
    return pids


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (all its threads), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def process_rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return 0  # a zombie has no VmRSS line


def process_role(pid: int, root: int) -> str:
    """What a process of a tree is: supervisor (the root), resource-tracker, recorder (holds
    a DuckDB file open: zaiproxy's history), worker (anything else, nginx's workers too)."""
    if pid == root:
        return "supervisor"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    if b"resource_tracker" in cmd:
        return "resource-tracker"
    for fd in fds:
        try:
            if ".duckdb" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                return "recorder"
        except OSError:  # closed meanwhile
            continue
    return "worker"


def machine_cpu_seconds() -> dict[str, float]:
    """Core-seconds since boot from the first line of /proc/stat: busy (without steal), steal."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return {"busy": (user + nice + system + irq + softirq) / CLK_TCK, "steal": steal / CLK_TCK}


def all_cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (comm, utime + stime) for every process on the machine."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[int(name)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def busiest_others(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    ours: set[int],
    limit: int = 3,
) -> list[dict[str, Any]]:
    """The processes outside the benchmark that used the most CPU between two snapshots."""
    used = [
        (after[pid][1] - before[pid][1], pid, after[pid][0])
        for pid in after.keys() & before.keys()
        if pid not in ours and after[pid][1] > before[pid][1]
    ]
    used.sort(reverse=True)
    return [{"pid": pid, "comm": comm, "cpu_seconds": round(seconds, 2), "cmdline": cmdline(pid)}
            for seconds, pid, comm in used[:limit]]


def cmdline(pid: int, limit: int = 160) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:limit]
    except FileNotFoundError:
        return ""


class TreeSampler:
    """CPU time over a window and RSS every ``interval`` seconds for one process tree."""

    def __init__(self, root: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.root = root
        self.interval = interval
        self.cpu_start: dict[int, float] = {}
        self.cpu_end: dict[int, float] = {}
        self.peak_rss = 0
        self.max_rss: dict[int, int] = {}
        self.roles: dict[int, str] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _cpu(self) -> dict[int, float]:
        out = {}
        for pid in tree_pids(self.root):
            seconds = process_cpu_seconds(pid)
            if seconds is not None:
                out[pid] = seconds
        return out

    def _sample_rss(self) -> None:
        total = 0
        for pid in tree_pids(self.root):
            rss = process_rss_bytes(pid)
            if rss is None:
                continue
            total += rss
            self.max_rss[pid] = max(self.max_rss.get(pid, 0), rss)
            if pid not in self.roles:
                self.roles[pid] = process_role(pid, self.root)
        self.peak_rss = max(self.peak_rss, total)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample_rss()

    def __enter__(self) -> TreeSampler:
        self.cpu_start = self._cpu()
        self._sample_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_rss()
        self.cpu_end = self._cpu()

    def cpu_by_pid(self) -> dict[int, float]:
        # A process that started inside the window counts from zero; one that ended inside it
        # is lost (none should: a restarted worker would show up in the supervisor's log).
        return {pid: end - self.cpu_start.get(pid, 0.0) for pid, end in self.cpu_end.items()}

    def cpu_seconds(self) -> float:
        return sum(self.cpu_by_pid().values())

    def report(self) -> dict[str, Any]:
        cpu = self.cpu_by_pid()
        processes = [
            {
                "pid": pid,
                "role": self.roles.get(pid, process_role(pid, self.root)),
                "cpu_seconds": round(cpu.get(pid, 0.0), 3),
                "max_rss_mb": round(self.max_rss.get(pid, 0) / 2**20, 1),
            }
            for pid in sorted(set(cpu) | set(self.max_rss))
        ]
        return {
            "cpu_seconds": round(sum(cpu.values()), 3),
            "peak_rss_mb": round(self.peak_rss / 2**20, 1),
            "rss_samples": self.samples,
            "processes": processes,
        }


@dataclass
class Sample:
    """One tick of a :class:`WindowSampler`."""

    t: float  # time.monotonic()
    trees: dict[str, list[int]]  # tree name -> pids alive
    cpu: dict[int, float]  # pid -> utime + stime, seconds
    rss: dict[int, int]  # pid -> VmRSS, bytes
    machine: dict[str, float]  # machine_cpu_seconds()


class WindowSampler:
    """CPU time and RSS of named process trees and the machine's CPU time, sampled every
    ``interval`` seconds with timestamps, so that any window inside the sampling period can be
    read afterwards: CPU interpolated linearly between the samples around its ends, RSS peaks
    over the samples inside it. For windows known only at the end, such as "the last
    ``duration_s`` seconds before the load generator exited"."""

    def __init__(self, roots: dict[str, int], interval: float = 0.1) -> None:
        self.roots = roots
        self.interval = interval
        self.samples: list[Sample] = []
        self.roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _take(self) -> None:
        by_parent = None if HAVE_CHILDREN_FILES else parents()
        t = time.monotonic()
        trees = {name: tree_pids(root, by_parent) for name, root in self.roots.items()}
        cpu: dict[int, float] = {}
        rss: dict[int, int] = {}
        for name, pids in trees.items():
            for pid in pids:
                seconds, size = process_cpu_seconds(pid), process_rss_bytes(pid)
                if seconds is None or size is None:
                    continue  # gone meanwhile
                cpu[pid], rss[pid] = seconds, size
                if pid not in self.roles:
                    self.roles[pid] = process_role(pid, self.roots[name])
        self.samples.append(Sample(t, trees, cpu, rss, machine_cpu_seconds()))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> WindowSampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _at(self, values: list[float], t: float) -> float:
        """``values`` (one per sample) at time ``t``, clamped to the sampling period."""
        times = [s.t for s in self.samples]
        if t <= times[0]:
            return values[0]
        if t >= times[-1]:
            return values[-1]
        i = bisect.bisect_right(times, t) - 1
        return values[i] + (t - times[i]) / (times[i + 1] - times[i]) * (values[i + 1] - values[i])

    def _cumulative(self, pid: int) -> list[float]:
        """The pid's CPU seconds at every sample: 0 before it appears (a process starts at 0),
        its last value after it exits."""
        out, last = [], 0.0
        for sample in self.samples:
            last = sample.cpu.get(pid, last)
            out.append(last)
        return out

    def covers(self, start: float, end: float) -> bool:
        return self.samples[0].t <= start and end <= self.samples[-1].t

    def machine(self, start: float, end: float) -> dict[str, float]:
        """Core-seconds the machine was busy and stolen between ``start`` and ``end``."""
        return {key: self._at([s.machine[key] for s in self.samples], end)
                - self._at([s.machine[key] for s in self.samples], start)
                for key in ("busy", "steal")}

    def report(self, name: str, start: float, end: float) -> dict[str, Any]:
        """Tree ``name`` between ``start`` and ``end``, shaped like :meth:`TreeSampler.report`."""
        pids = sorted({pid for s in self.samples for pid in s.trees[name]})
        inside = [s for s in self.samples if start <= s.t <= end]
        processes: list[dict[str, Any]] = []
        for pid in pids:
            cumulative = self._cumulative(pid)
            processes.append({
                "pid": pid,
                "role": self.roles.get(pid, "gone"),
                "cpu_seconds": round(self._at(cumulative, end) - self._at(cumulative, start), 3),
                "max_rss_mb": round(max((s.rss.get(pid, 0) for s in inside), default=0) / 2**20,
                                    1),
            })
        peak = max((sum(s.rss.get(pid, 0) for pid in s.trees[name]) for s in inside), default=0)
        return {
            "cpu_seconds": round(sum(p["cpu_seconds"] for p in processes), 3),
            "peak_rss_mb": round(peak / 2**20, 1),
            "rss_samples": len(inside),
            "processes": processes,
        }


# ---- children -------------------------------------------------------------------------------


class Child:
    """A server started as a child process; its URL comes from its first stdout line
    (``wait_listening``), stdout and stderr go to ``<log_dir>/<name>.std{out,err}.log``."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.stdout_path = log_dir / f"{name}.stdout.log"
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self._stderr = self.stderr_path.open("w")
        self.started = time.monotonic()  # just before the spawn: start-up times count from here
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, env=env, text=True, bufsize=1,
            cwd=cwd,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        # Keep draining stdout after the first line: a full pipe would block the child.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.line = ""
        self.url = ""

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with self.stdout_path.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self._lines.put(line)
        self._lines.put(None)

    def wait_listening(self, timeout: float = STARTUP_TIMEOUT) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            line = None
        match = re.search(r"listening on (https?://\S+)", line or "")
        if match is None:
            raise BenchError(
                f"{self.name} did not start (first line {line!r}, exit code "
                f"{self.proc.poll()}); see {self.stderr_path}"
            )
        self.line = line.strip() if line else ""
        self.url = match.group(1)
        return self.url

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> int | None:
        """Send each of ``signals`` in turn, waiting up to STOP_TIMEOUT after each, then
        SIGKILL if it still runs; return the exit code."""
        for sig in signals:
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored {sig.name} for {STOP_TIMEOUT:g} s", file=sys.stderr)
        if self.proc.poll() is None:
            print(f"{self.name}: killing it", file=sys.stderr)
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self._stderr.close()
        return self.proc.returncode


# Settings zaiproxy also reads without the ZAIPROXY_ prefix (zaiproxy/core/config.py).
PRODUCT_ENV = frozenset({
    "LOG_LEVEL", "HOST", "PORT", "MAX_RETRIES", "DEPLOYMENT_VARIANT",
    "TOKEN_COUNTING_ENABLED", "ENABLE_TOKEN_COUNTING",
})


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without proxy settings it might carry, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("ZAIPROXY_", "ZAI_")) and k not in PRODUCT_ENV
    }
    env.update(extra)
    return env


# ---- report helpers (bench.suite and bench.wrk_compare) ------------------------------------


def fmt_ms(us: float | None) -> str:
    """Microseconds as milliseconds, 3 significant-ish digits; "—" for no value."""
    if us is None:
        return "—"
    ms = us / 1000
    return f"{ms:.2f} ms" if abs(ms) < 10 else f"{ms:,.1f} ms"


def fmt_delta_ms(us: float | None) -> str:
    return "—" if us is None else ("+" if us >= 0 else "-") + fmt_ms(abs(us))


def fmt_errors(errors: dict[str, int]) -> str:
    parts = [f"{kind} {count:,}" for kind, count in sorted(errors.items()) if count]
    return ", ".join(parts) if parts else "0"


def command_line(module: str) -> str:
    """How this run was started, for the report (the interpreter relative to the cwd)."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "-m", module, *sys.argv[1:]])


def machine_info(**tools: str) -> dict[str, Any]:
    """This machine for the report, plus the versions of the ``tools`` the caller used."""
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        **tools,
        "loadavg_at_start": os.getloadavg(),
    }


def log_counts(path: Path) -> dict[str, int]:
    """"level event" -> count over zaiproxy's JSON log lines, access-log lines by status and
    upstream status (none: the proxy answered itself); other lines count as "text"."""
    counts: dict[str, int] = {}
    if not path.exists():
        return counts
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            key = f"{record.get('level', '?')} {record.get('event', '?')}"
            if "status" in record:  # an access-log line: relayed or the proxy's own answer
                key += f" {record['status']} (upstream {record.get('upstream_status') or 'none'})"
        except (json.JSONDecodeError, AttributeError):
            key = "text"
        counts[key] = counts.get(key, 0) + 1
    return counts
