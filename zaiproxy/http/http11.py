"""Chooses the HTTP/1.1 protocol implementation of the proxy, in one place.

``ZAIPROXY_HTTP_IMPL=h11`` (the default) uses h11; ``h11-mypyc`` uses
h11-mypyc, the same code compiled with mypyc (PyPI ``h11-mypyc``, imported
as ``h11_mypyc``). Measured here with one worker (wrk -c16, small JSON):
447 -> 275 us of worker CPU per request and 2.2k -> 3.6k req/s; the whole
test suite passes with either (``make test`` runs it against both). It stays
opt-in while h11-mypyc is an alpha release: an HTTP parser is where request
smuggling bugs live, and h11 is the one with years of scrutiny.

Every proxy module imports ``h11`` from here, never directly, because the two
packages' event classes are distinct types (``type(event) is h11.Data`` must
compare against the implementation that produced the event). The mock
upstream and the tests' clients keep plain h11, so each test is also a
differential test across the wire.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

CHOICES = ("h11", "h11-mypyc")
ENV = "ZAIPROXY_HTTP_IMPL"
IMPLEMENTATION = os.environ.get(ENV) or "h11"

if TYPE_CHECKING:
    import h11
elif IMPLEMENTATION == "h11-mypyc":
    try:
        import h11_mypyc as h11
    except ImportError as exc:
        raise ImportError(
            f"{ENV}=h11-mypyc but h11-mypyc is not installed: pip install 'zaiproxy[fast]'"
        ) from exc
elif IMPLEMENTATION == "h11":
    import h11
else:
    raise ImportError(f"{ENV}={IMPLEMENTATION!r}: expected one of {', '.join(CHOICES)}")



def as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """What ``receive_data`` is fed: h11-mypyc takes ``bytes`` only (h11 takes any
    bytes-like; tests/test_http11_differential.py), and trio's streams are typed
    ``bytes | bytearray``. A no-op for the bytes they actually return."""
    return data if type(data) is bytes else bytes(data)


__all__ = ["CHOICES", "ENV", "IMPLEMENTATION", "as_bytes", "h11"]
