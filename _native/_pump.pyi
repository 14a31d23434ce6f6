# Stubs for the Cython module zaiproxy._native._pump (built from _native/_pump.pyx). Its
# pure-Python twin is the relay's own loop (zaiproxy/request/relay.py); zaiproxy.http.netstream
# loads it, or not (ZAIPROXY_RELAY=python).
import socket
from collections.abc import Callable
from typing import Final, Protocol

class _Dechunker(Protocol):  # zaiproxy._native._framing.Dechunker
    @property
    def ended(self) -> bool: ...
    def feed(self, data: bytes) -> bytes: ...

IMPLEMENTATION: Final[str]
READ: Final[int]
WRITE: Final[int]
YIELD: Final[int]
END: Final[int]
EOF: Final[int]

class UpstreamFailed(OSError): ...
class ClientFailed(OSError): ...

class Pump:
    body_bytes: int
    received: int
    def __init__(self, up: socket.socket, down: socket.socket, dechunk: _Dechunker,
                 scan: Callable[[bytes], bytes], burst: int = 16) -> None: ...
    @property
    def pending_bytes(self) -> int: ...
    def step(self) -> int: ...
