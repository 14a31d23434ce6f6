"""Bounded label values that more than one wing derives from a request (pure).

The request path (the ledger's token counters per model) and the metrics (``model`` on the
token, cost and time-to-first-token series) must put a request under the same label, or
``/admin/keys`` and ``/metrics`` disagree about a model's tokens: one function, here at the
bottom so both may import it. :func:`client_bucket` is the original service's ``client``
label of its rate-limit series (a peer address folded into 64 values).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Final

CLIENT_BUCKETS: Final = 64
UNKNOWN_PEER: Final = "unknown"  # what the original hashed for an empty address
_FNV32_OFFSET: Final = 0x811C9DC5
_FNV32_PRIME: Final = 0x01000193
NO_MODEL: Final = "-"  # the request named no model
OTHER_MODEL: Final = "other"  # a model outside the configured known_models


def model_label(model: str | None, known_models: Container[str]) -> str:
    """A configured model name as it is, any other ``other``, none ``-``: client-chosen model
    names never become label values (each would be a new series or ledger row)."""
    if model is None:
        return NO_MODEL
    return model if model in known_models else OTHER_MODEL


def client_bucket(peer: str) -> str:
    """The original service's rate-limit ``client`` label: ``source-00`` … ``source-63``.

    Its ``rateLimitClientBucket(r.RemoteAddr)``: the direct peer's IP (a port stripped,
    ``unknown`` when empty) hashed with 32-bit FNV-1a, modulo :data:`CLIENT_BUCKETS`, two
    digits, so its dashboards group our series as they grouped its own. Forwarded headers are
    never read, as there: a client could choose its bucket with them. 64 values whatever the
    traffic: peer addresses never become label values (each would be a series).
    """
    host = peer
    if host.startswith("["):  # [v6]:port, or [v6]
        end = host.find("]")
        if end > 0 and (end == len(host) - 1 or host[end + 1] == ":"):
            host = host[1:end]
    elif host.count(":") == 1:  # v4:port, name:port (a bare v6 address has more colons)
        host = host.partition(":")[0]
    h = _FNV32_OFFSET
    for byte in (host or UNKNOWN_PEER).encode("utf-8", "surrogatepass"):
        h = ((h ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return f"source-{h % CLIENT_BUCKETS:02d}"
