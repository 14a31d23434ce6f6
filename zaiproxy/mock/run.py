"""Process entry of the mock upstream: bind, serve in 1..N processes, announce.

The parent binds one ``SO_REUSEPORT`` socket per worker (:mod:`zaiproxy.run.sockets`),
so the kernel spreads connections evenly and a client that connects before a
worker is up waits in the accept queue instead of being refused. It prints one
line, ``mock-upstream listening on http://HOST:PORT (N workers)``, which tests
and scripts parse for the port (bind port 0 to get a free one). With N > 1 the
line comes only once every worker reported that it is accepting, so a benchmark
that starts on the line does not time the workers' start-up.

One worker serves in this process. More are *spawned*, never forked (measured:
never fork inside trio); each child gets its socket object as an argument, which
the spawn context passes by file descriptor on Linux, and a pipe on which it says
"ready". The parent then only waits: SIGTERM or SIGINT terminates the children
and ``run`` returns 0; a child that dies on its own takes the rest down and
``run`` returns 1 (a mock that lost a worker would skew any benchmark run against
it). Workers watch the parent's sentinel and exit when it dies, even by SIGKILL,
so no stray worker keeps the port.

The workers share one thing: the accounts' quota usage
(:class:`~zaiproxy.mock.quota.QuotaBook`), a shared-memory block the parent
creates and hands to each child with its socket, so a poll answered by one
worker counts the tokens another one served.

Ctrl-C reaches the whole foreground process group. The children are started
with SIGINT ignored (a disposition that survives exec, and Python keeps an
inherited SIG_IGN for SIGINT), so only the parent reacts and nobody prints a
KeyboardInterrupt traceback.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.connection
import signal
import socket
import ssl
import sys
import threading
import types
from multiprocessing.connection import Connection

import trio

from zaiproxy.mock.behaviour import MockOptions
from zaiproxy.mock.quota import QuotaBook
from zaiproxy.mock.server import serve_mock
from zaiproxy.run.sockets import bind_reuseport, format_addr, trio_listener

STOP_TIMEOUT = 5.0  # seconds a child gets after SIGTERM before SIGKILL


def ssl_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["http/1.1"])
    return context


def run(
    options: MockOptions,
    host: str,
    port: int,
    workers: int = 1,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> int:
    """Serve the mock until SIGTERM/SIGINT; return the process exit code."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    context = ssl_context(certfile, keyfile) if certfile else None  # fail before announcing
    socks = bind_reuseport(host, port, workers)
    try:
        bound_host, bound_port = format_addr(socks[0])
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        scheme = "https" if context else "http"
        line = f"mock-upstream listening on {scheme}://{shown}:{bound_port} ({workers} workers)"
        if workers > 1:
            return _supervise(socks, options, certfile, keyfile, line)
        _announce(line)
        in_main = threading.current_thread() is threading.main_thread()
        # Signal handlers can only be installed from the main thread.
        signals = (signal.SIGTERM, signal.SIGINT) if in_main else ()
        trio.run(functools.partial(_serve, [trio_listener(socks[0])], options, context, signals))
        return 0
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        return 0
    finally:
        for sock in socks:
            sock.close()


def _announce(line: str) -> None:
    print(line)
    sys.stdout.flush()  # a pipe is block-buffered: whoever waits for the port reads it now


async def _serve(
    listeners: list[trio.SocketListener],
    options: MockOptions,
    context: ssl.SSLContext | None,
    signals: tuple[int, ...],
    *,
    parent_sentinel: int | None = None,
    ready: Connection | None = None,
    quota: QuotaBook | None = None,
) -> None:
    """Serve until one of ``signals`` arrives or the parent (if any) dies."""
    async with trio.open_nursery() as nursery:
        if signals:
            await nursery.start(_cancel_on_signal, nursery.cancel_scope, signals)
        if parent_sentinel is not None:
            nursery.start_soon(_cancel_when_readable, nursery.cancel_scope, parent_sentinel)
        await nursery.start(functools.partial(serve_mock, listeners, options, context, quota=quota))
        if ready is not None:
            ready.send_bytes(b"ready")  # a few bytes into an empty pipe: never blocks
            ready.close()


async def _cancel_when_readable(scope: trio.CancelScope, fd: int) -> None:
    # The parent's sentinel becomes readable when the parent dies, even by SIGKILL:
    # a worker must not outlive it and keep the port (a stray mock skews the next run).
    await trio.lowlevel.wait_readable(fd)
    scope.cancel()


async def _cancel_on_signal(
    scope: trio.CancelScope,
    signals: tuple[int, ...],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(*signals) as received:
        task_status.started()
        async for _ in received:
            scope.cancel()
            return


def _child_main(
    sock: socket.socket,
    options: MockOptions,
    certfile: str | None,
    keyfile: str | None,
    ready: Connection,
    quota: QuotaBook,
) -> None:
    """Entry point of a spawned worker (module level, so spawn can import it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # belt and braces: the parent owns Ctrl-C
    context = ssl_context(certfile, keyfile) if certfile else None
    parent = multiprocessing.parent_process()
    serve = functools.partial(
        _serve,
        [trio_listener(sock)],
        options,
        context,
        (signal.SIGTERM,),
        parent_sentinel=parent.sentinel if parent is not None else None,
        ready=ready,
        quota=quota,
    )
    trio.run(serve)


def _supervise(
    socks: list[socket.socket],
    options: MockOptions,
    certfile: str | None,
    keyfile: str | None,
    line: str,
) -> int:
    spawn = multiprocessing.get_context("spawn")
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        pass  # the C-level handler writes to the wakeup fd, which ends the waits below

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_wakeup = signal.set_wakeup_fd(wake_w.fileno())
    children: list[multiprocessing.process.BaseProcess] = []
    quota = QuotaBook.from_options(options, shared=True)  # every child maps this block
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the children (see above)
        signal.signal(signal.SIGTERM, on_signal)
        starting: list[Connection] = []
        for index, sock in enumerate(socks):
            reader, writer = spawn.Pipe(duplex=False)
            child = spawn.Process(
                target=_child_main,
                args=(sock, options, certfile, keyfile, writer, quota),
                name=f"mock-upstream-{index}",
            )
            child.start()
            writer.close()  # the child's copy is the one that matters: EOF if it dies
            children.append(child)
            starting.append(reader)
        signal.signal(signal.SIGINT, on_signal)
        sentinels = [child.sentinel for child in children]
        while starting:
            ready = multiprocessing.connection.wait([wake_r, *sentinels, *starting])
            if wake_r in ready:
                return 0
            if any(s in ready for s in sentinels):
                return 1
            for reader in starting[:]:
                if reader in ready:
                    starting.remove(reader)
                    reader.close()
        _announce(line)
        ready = multiprocessing.connection.wait([wake_r, *sentinels])
        return 0 if wake_r in ready else 1
    finally:
        for proc in children:
            if proc.is_alive():
                proc.terminate()
        for proc in children:
            proc.join(STOP_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join()
        signal.set_wakeup_fd(previous_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        wake_r.close()
        wake_w.close()
        quota.close()
