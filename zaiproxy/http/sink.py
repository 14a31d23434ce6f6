"""The seam of the client side the relay writes through.

:class:`~zaiproxy.http.connection.ClientConnection` implements :class:`ClientSink`; the
relay sees only a ``ClientSink``: a native relay can write to any object with these methods.
"""

from __future__ import annotations

import socket
from typing import Protocol

Headers = list[tuple[bytes, bytes]]


class ClientGone(Exception):
    """The client connection broke while we were writing to it."""


class ClientSink(Protocol):
    """What the request path writes a response through (the relay sees nothing else)."""

    request_id: bytes
    gone: bool  # the client went away (EOF, reset or a failed write)

    def queue_response(self, status: int, headers: Headers, reason: bytes = b"") -> None: ...

    def queue_data(self, data: bytes) -> None: ...

    def queue_end(self) -> None: ...

    # The client's socket, for a writer that frames and sends the body's chunks itself (the
    # stream pump) until queue_end; None unless the response under way is chunked, nothing
    # is queued and the connection is a plain socket.
    def chunked_socket(self) -> socket.socket | None: ...

    async def flush(self) -> None: ...  # raises ClientGone

    async def send_data(self, data: bytes) -> None: ...

    async def abort(self) -> None: ...


class WorkerState(Protocol):
    draining: bool
