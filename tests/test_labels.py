"""core/labels.py: the original service's ``client`` bucket of a peer address (pure)."""

from __future__ import annotations

import functools
import ipaddress
import re

import pytest

from zaiproxy.core.labels import CLIENT_BUCKETS, client_bucket


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bits, written from the spec (draft-eastlake-fnv): offset basis 2166136261,
    prime 16777619; each octet XORed in, then multiplied modulo 2**32."""
    return functools.reduce(lambda h, octet: ((h ^ octet) * 16777619) % 2**32, data, 2166136261)


@pytest.mark.parametrize(("data", "expected"), [
    # The FNV reference test vectors (the spec's test suite, FNV1a_32).
    (b"", 0x811C9DC5),
    (b"a", 0xE40C292C),
    (b"foobar", 0xBF9CF968),
])
def test_the_reference_fnv1a_is_right(data: bytes, expected: int) -> None:
    assert fnv1a_32(data) == expected


def expected_bucket(host: str) -> str:
    return f"source-{fnv1a_32(host.encode()) % 64:02d}"


@pytest.mark.parametrize(("peer", "host", "label"), [
    ("127.0.0.1", "127.0.0.1", "source-30"),
    ("127.0.0.1:54321", "127.0.0.1", "source-30"),  # a RemoteAddr: the port is stripped
    ("10.0.0.1", "10.0.0.1", "source-13"),
    ("192.168.1.20:443", "192.168.1.20", "source-23"),
    ("::1", "::1", "source-12"),  # a bare v6 address (what a socket's peer name gives)
    ("[::1]:8080", "::1", "source-12"),
    ("[fe80::1%eth0]:443", "fe80::1%eth0", "source-11"),
    ("", "unknown", "source-57"),  # the original hashed "unknown" for an empty address
    ("unix", "unix", "source-35"),  # a Unix-socket peer (run/worker.py names it so)
])
def test_known_peers(peer: str, host: str, label: str) -> None:
    assert client_bucket(peer) == expected_bucket(host) == label


def test_every_address_lands_in_one_of_64_two_digit_buckets() -> None:
    network = ipaddress.ip_network("10.1.0.0/20")  # 4096 addresses
    labels = {client_bucket(str(ip)) for ip in network}
    assert CLIENT_BUCKETS == 64
    assert labels == {f"source-{i:02d}" for i in range(64)}  # all of them, nothing else
    assert all(re.fullmatch(r"source-\d\d", label) for label in labels)
