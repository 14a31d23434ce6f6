"""Listening sockets: one SO_REUSEPORT group per proxy, never a silent join."""

from __future__ import annotations

import errno
import socket

import pytest

from zaiproxy.run.sockets import bind_reuseport


def test_group_shares_one_port() -> None:
    socks = bind_reuseport("127.0.0.1", 0, 3)
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(ports) == 1 and ports != {0}
        for s in socks:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        for s in socks:
            s.close()


def test_second_proxy_on_the_same_port_is_refused() -> None:
    first = bind_reuseport("127.0.0.1", 0, 2)
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(OSError) as info:
            bind_reuseport("127.0.0.1", port, 2)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        for s in first:
            s.close()
    # Once the first group is gone the port is free again (TIME_WAIT does not block it).
    again = bind_reuseport("127.0.0.1", port, 1)
    again[0].close()


def test_port_used_by_another_server_is_refused() -> None:
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    try:
        with pytest.raises(OSError):
            bind_reuseport("127.0.0.1", other.getsockname()[1], 1)
    finally:
        other.close()
