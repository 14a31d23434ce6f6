"""Chooses the ledger implementation in exactly one place.

``ZAIPROXY_LEDGER=native`` (the default) requires the compiled module and
fails start-up if it did not build or load: a silent fallback to the pure
twin would hide a broken build in production.
``ZAIPROXY_LEDGER=python`` selects the twin explicitly (tests, debugging).
"""

from __future__ import annotations

import os

from zaiproxy.limits.segment import LedgerImpl


class LedgerUnavailable(RuntimeError):
    """The requested ledger implementation could not be loaded."""


def load(choice: str | None = None) -> LedgerImpl:
    """The chosen implementation module; both satisfy :class:`LedgerImpl` (mypy checks it)."""
    choice = (choice or os.environ.get("ZAIPROXY_LEDGER") or "native").lower()
    if choice == "native":
        try:
            from zaiproxy._native import _ledger
        except ImportError as exc:  # pragma: no cover - exercised by the twin test
            raise LedgerUnavailable(
                "the native ledger (zaiproxy._native._ledger) did not load: "
                f"{exc}; build it with `make dev` or set ZAIPROXY_LEDGER=python"
            ) from exc
        return _ledger
    if choice == "python":
        from zaiproxy._native import _ledger_py

        return _ledger_py
    raise LedgerUnavailable(f"ZAIPROXY_LEDGER={choice!r}: expected 'native' or 'python'")
