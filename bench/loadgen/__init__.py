"""The C load generator (``loadgen.c``): build it, run it, build raw requests for it.

wrk times only whole responses and never looks at bodies; ``loadgen`` also times the
first body byte of every response, verifies status, body bytes and SSE streams, and
counts stream events per read (coalescing). It is a closed loop: N keep-alive
connections, each sending the next request as soon as the previous response ended.
See the comment at the top of ``loadgen.c`` and :func:`run` for the JSON it prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "loadgen.c"
BUILD_DIR = SOURCE.parent.parent / ".build"


def build() -> Path:
    """Compile ``loadgen.c`` (once per source version) and return the binary's path."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    binary = BUILD_DIR / f"loadgen-{digest}"
    if binary.exists():
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".loadgen-{digest}-", dir=BUILD_DIR)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        proc = subprocess.run(
            ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"building loadgen failed (gcc exit {proc.returncode}):\n{proc.stderr}"
            )
        tmp.chmod(0o755)
        tmp.replace(binary)  # atomic: concurrent builders race harmlessly
    finally:
        tmp.unlink(missing_ok=True)
    return binary


def command(
    binary: Path,
    host: str,
    port: int,
    request_file: Path,
    *,
    connections: int,
    duration: float,
    warmup: float = 0.0,
    max_requests: int | None = None,
    expect_status: Iterable[int] = (200,),
    expect_body_file: Path | None = None,
    sse: bool = False,
    timeout: float = 30.0,
) -> list[str]:
    """The argument list of one loadgen run (for callers that run it themselves)."""
    args = [
        str(binary),
        "--host",
        host,
        "--port",
        str(port),
        "--connections",
        str(connections),
        "--duration",
        repr(float(duration)),
        "--warmup",
        repr(float(warmup)),
        "--request",
        str(request_file),
        "--timeout",
        repr(float(timeout)),
    ]
    if max_requests is not None:
        args += ["--max-requests", str(max_requests)]
    for status in expect_status:
        args += ["--expect-status", str(status)]
    if expect_body_file is not None:
        args += ["--expect-body", str(expect_body_file)]
    if sse:
        args.append("--sse")
    return args


def run(
    host: str,
    port: int,
    request: bytes,
    *,
    connections: int,
    duration: float,
    warmup: float = 0.0,
    max_requests: int | None = None,
    expect_status: Iterable[int] = (200,),
    expect_body: bytes | None = None,
    sse: bool = False,
    timeout: float = 30.0,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run loadgen against ``host:port`` with the raw ``request`` bytes; return its JSON.

    Keys: requests, errors ({kind: count}: connect, reset, timeout, parse,
    body_mismatch, sse_no_done, sse_no_usage, status_<code>), errors_total,
    duration_s, rps, reconnects, latency_us and ttfb_us ({p50, p90, p99, max,
    mean}), events, coalesced_events, event_gap_us ({p50, p90, p99, max, mean,
    count}), bytes_received, cpu_s, connections, warmup_requests,
    max_requests_reached. Raises RuntimeError when loadgen exits non-zero.
    """
    binary = build()
    with tempfile.TemporaryDirectory(prefix="loadgen-", dir=workdir) as tmp:
        request_file = Path(tmp) / "request.bin"
        request_file.write_bytes(request)
        body_file = None
        if expect_body is not None:
            body_file = Path(tmp) / "expect-body.bin"
            body_file.write_bytes(expect_body)
        args = command(
            binary,
            host,
            port,
            request_file,
            connections=connections,
            duration=duration,
            warmup=warmup,
            max_requests=max_requests,
            expect_status=expect_status,
            expect_body_file=body_file,
            sse=sse,
            timeout=timeout,
        )
        proc = subprocess.run(
            args, capture_output=True, timeout=warmup + duration + 60, check=False
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"loadgen exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def http_request(
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes = b"",
    host: str = "127.0.0.1",
    port: int | None = None,
) -> bytes:
    """Raw HTTP/1.1 request bytes; ``Host`` (``host[:port]``) and ``Content-Length`` are
    added unless ``headers`` has them."""
    names = {name.lower() for name in headers}
    lines = [f"{method} {path} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host}" if port is None else f"Host: {host}:{port}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if "content-length" not in names and (body or method in ("POST", "PUT", "PATCH")):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
