"""Memory per open stream: the RSS a server's process tree grows by while N paced SSE streams
are open through it (default 1,000), divided by N.

    python -m bench.stream_memory [--streams N] [--target proxy|baseline|nginx ...]
                                  [--baseline DIR] [--proxy-workers 2]

For each target (zaiproxy with the bench suite's product defaults on: history, access log,
token counting, limits; an older checkout as ``baseline``; nginx), started beside the mock as
``bench.suite`` starts them:

1. warm up: a few streams opened and finished, so lazily built state (pool, caches, the
   recorder's first rows) is not counted as per-stream memory;
2. the tree's summed VmRSS, the median of five samples 0.2 s apart;
3. N clients each open a stream of ``--events`` deltas ``--gap`` seconds apart (the mock's
   pacing) and read it as it comes; once every stream has had its first event, the RSS is
   sampled again the same way, while all N are open;
4. ``(after - before) / N`` is the memory per open stream; the clients then close.

Kernel socket buffers are not in RSS (nor in nginx's): this is the servers' own memory. The
proxy's upstream pool is raised to hold N connections per worker
(``ZAIPROXY_POOL_MAX_CONNECTIONS``); everything else is the suite's configuration.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import BenchError, log, process_rss_bytes, tree_pids
from bench.suite import Children, Scenario, Target, start_targets

OPEN_TIMEOUT = 120.0  # seconds for all N streams to deliver their first event


def tree_rss(root: int) -> int:
    """The summed VmRSS of a process tree, the median of five samples 0.2 s apart."""
    samples = []
    for _ in range(5):
        samples.append(sum(process_rss_bytes(pid) or 0 for pid in tree_pids(root)))
        time.sleep(0.2)
    return int(statistics.median(samples))


def request_bytes(target: Target, scenario: Scenario) -> bytes:
    body = scenario.body()
    headers = scenario.headers(target.key) | {"Host": "127.0.0.1",
                                               "Content-Length": str(len(body))}
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"POST {target.path} HTTP/1.1\r\n{head}\r\n".encode() + body


def open_streams(target: Target, scenario: Scenario, count: int,
                 timeout: float) -> tuple[list[socket.socket], float]:
    """``count`` streams, each read until its first event; returns the sockets (still open)
    and the seconds it took. Raises if a stream fails or the time runs out."""
    data = request_bytes(target, scenario)
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    seen: dict[int, bytes] = {}
    started = time.monotonic()
    deadline = started + timeout
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", target.port), timeout=10)
            sock.sendall(data)
            sock.setblocking(False)
            socks.append(sock)
            seen[sock.fileno()] = b""
            sel.register(sock, selectors.EVENT_READ)
            if len(socks) % 50 == 0:  # drain as we go: a backlog never builds up
                _read_ready(sel, seen, 0)
        while any(b"data:" not in got for got in seen.values()):
            if time.monotonic() > deadline:
                waiting = sum(b"data:" not in got for got in seen.values())
                raise BenchError(f"{target.name}: {waiting} of {count} streams had no event "
                                 f"after {timeout:g} s")
            _read_ready(sel, seen, 0.2)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    finally:
        sel.close()
    bad = [got[:60] for got in seen.values() if not got.startswith(b"HTTP/1.1 200 ")]
    if bad:
        for sock in socks:
            sock.close()
        raise BenchError(f"{target.name}: {len(bad)} streams did not answer 200: {bad[0]!r}")
    return socks, time.monotonic() - started


def _read_ready(sel: selectors.BaseSelector, seen: dict[int, bytes], wait: float) -> None:
    for key, _ in sel.select(wait):
        sock = key.fileobj
        assert isinstance(sock, socket.socket)
        try:
            got = sock.recv(65536)
        except BlockingIOError:
            continue
        if not got:
            raise BenchError("a stream ended before it was measured (too short: raise --events)")
        fd = sock.fileno()
        if b"data:" not in seen[fd]:
            seen[fd] = (seen[fd] + got)[:4096]


def measure(target: Target, streams: int, scenario: Scenario) -> dict[str, Any]:
    warm, _ = open_streams(target, Scenario("warm-up", "", 1, stream=True, chunks=2,
                                            chunk_delay=0.01), 50, OPEN_TIMEOUT)
    for sock in warm:
        sock.close()
    time.sleep(1.5)
    before = tree_rss(target.child.pid)
    socks, took = open_streams(target, scenario, streams, OPEN_TIMEOUT)
    try:
        during = tree_rss(target.child.pid)
    finally:
        for sock in socks:
            sock.close()
    result = {"target": target.name, "streams": streams, "rss_before": before,
              "rss_open": during, "per_stream_bytes": (during - before) / streams,
              "open_seconds": round(took, 2)}
    log(f"{target.name}: RSS {before / 2**20:.1f} MiB -> {during / 2**20:.1f} MiB with "
        f"{streams} open streams: {result['per_stream_bytes'] / 1024:.1f} KiB per stream "
        f"(opened in {took:.1f} s)")
    time.sleep(2)  # the streams end before the next target is measured
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--events", type=int, default=200, help="deltas per stream")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between deltas")
    parser.add_argument("--target", dest="targets", action="append",
                        choices=["proxy", "baseline", "nginx"])
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--proxy-workers", type=int, default=2)
    parser.add_argument("--mock-workers", type=int, default=2)
    parser.add_argument("--nginx-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.targets = args.targets or ["proxy", "nginx"]
    if "baseline" in args.targets and args.baseline is None:
        parser.error("--target baseline needs --baseline DIR")
    out_dir = args.out / ("memory-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    out_dir.mkdir(parents=True)
    scenario = Scenario("paced", "", args.streams, stream=True, chunks=args.events,
                        chunk_delay=args.gap)
    children = Children()
    try:
        _, _, targets, lines = start_targets(
            args, out_dir, children,
            proxy_extra_env={"ZAIPROXY_POOL_MAX_CONNECTIONS": str(max(256, args.streams))})
        results = [measure(target, args.streams, scenario) for target in targets]
    finally:
        children.stop_all()
    report = {"command": " ".join(sys.argv), "servers": lines, "results": results}
    (out_dir / "memory.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
