"""Pure-Python twin of ``_native._ledger`` with the same semantics.

Every ledger test runs against both (see tests/test_ledger_twin.py).
"""

IMPLEMENTATION = "python"

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = 0xFFFFFFFFFFFFFFFF


def stable_hash(data: bytes) -> int:
    """64-bit FNV-1a of ``data``; identical in every process and in the native module."""
    h = _FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * _FNV_PRIME) & _MASK
    return h
