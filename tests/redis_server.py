"""A real ``redis-server`` (Debian's) for the fleet-limits tests: started on a free port and a
unix socket in a temporary directory, killed and restarted at will.

``make test`` installs the package when it is missing (``make debian-deps``).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; ``restart`` keeps its port, socket and data directory."""

    def __init__(self, directory: Path, *, password: str | None = None,
                 persist: bool = False) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.unix_path = str(directory / "redis.sock")
        self.password = password
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}"

    def start(self) -> None:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--unixsocket", self.unix_path, "--unixsocketperm", "700",
                "--dir", str(self.directory), "--daemonize", "no", "--loglevel", "warning",
                "--save", "", "--appendonly", "yes" if self.persist else "no",
                "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                if self.cli("PING").strip() == "PONG":
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start:\n{(self.directory / 'redis.log').read_text()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def cli(self, *args: str) -> str:
        """``redis-cli`` against this server (its text output)."""
        cmd = [shutil.which("redis-cli") or "redis-cli", "-p", str(self.port), "--no-auth-warning"]
        if self.password:
            cmd += ["-a", self.password]
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=10,
                              check=True).stdout
