"""Chooses the stream scanner of the relay in exactly one place.

Per upstream read of an SSE body the relay watches the bytes for token usage (and, for
clients that did not ask for it, cuts out the usage chunk that ``include_usage`` added).
Two implementations give the same bytes and the same usage:

- ``ZAIPROXY_RELAY=native`` (the default): :class:`NativeUsageTracker`, one C call per read
  (``zaiproxy._native._relay.Scanner``, _native/README.md). Start-up fails if it did not
  build or load: a silent fallback to the twin would hide a broken build in production.
- ``ZAIPROXY_RELAY=python``: :class:`~zaiproxy.request.usage.UsageTracker`, the pure-Python
  twin (tests, debugging).

The same switch chooses the chunked framing of the relayed body (``zaiproxy._native._framing``
or its twin ``_framing_py``; made in ``zaiproxy/http/netstream.py``, below this layer, for
the pool and the client connection), so one value runs the whole relay natively or in Python.

:data:`Tracker` is the chosen class, fixed when this module is first imported (a worker
imports it at start-up, through the relay).
"""

from __future__ import annotations

import os
from typing import Literal, Protocol

from zaiproxy.core.record import Usage
from zaiproxy.request.usage import Accounting, StreamTracker, StreamUsage, UsageTracker
from zaiproxy.request.usage_rewrite import is_usage_chunk

__all__ = [
    "IMPLEMENTATION",
    "NativeUsageTracker",
    "RelayUnavailable",
    "Tracker",
    "TrackerClass",
    "load",
]


class RelayUnavailable(RuntimeError):
    """The requested stream scanner could not be loaded."""


class TrackerClass(Protocol):
    """Either tracker class: both take these arguments and make a ``StreamTracker``."""

    def __call__(self, api: Literal["openai", "anthropic"], *, count_deltas: bool = ...,
                 max_pending_bytes: int = ..., strip_usage: bool = ...,
                 max_line_bytes: int = ...) -> StreamTracker: ...


class NativeUsageTracker:
    """:class:`~zaiproxy.request.usage.UsageTracker`'s API over the native scanner.

    ``feed`` is the scanner's own method (no Python frame per read); the scanner calls
    the :class:`~zaiproxy.request.usage.Accounting` only for the few events that carry
    usage, and when the held delta data passes ``max_pending_bytes``.
    """

    __slots__ = ("_acct", "_scan", "feed")

    def __init__(
        self,
        api: Literal["openai", "anthropic"],
        *,
        count_deltas: bool = True,
        max_pending_bytes: int = 256 * 1024,
        strip_usage: bool = False,
        max_line_bytes: int = 1 << 20,
    ) -> None:
        from zaiproxy._native import _relay  # loaded by load() at start-up: a dict lookup

        if api not in ("openai", "anthropic"):
            raise ValueError(f"api must be 'openai' or 'anthropic', not {api!r}")
        self._acct = Accounting(api)
        self._scan = _relay.Scanner(
            _relay.OPENAI if api == "openai" else _relay.ANTHROPIC, self._acct,
            collect=count_deltas, max_pending=max_pending_bytes, strip=strip_usage,
            is_usage_chunk=is_usage_chunk, max_line=max_line_bytes)
        self.feed = self._scan.feed

    @property
    def usage(self) -> Usage | None:
        return self._acct.usage

    @property
    def events(self) -> int:
        return self._scan.events

    @property
    def done(self) -> bool:
        return self._scan.done

    @property
    def error(self) -> bool:
        return self._scan.error

    @property
    def at_event_boundary(self) -> bool:
        return self._scan.at_event_boundary

    @property
    def overflowed(self) -> bool:
        return self._scan.overflowed

    @property
    def pending_bytes(self) -> int:
        """Characters of delta data held but not yet counted."""
        return self._scan.held_chars + self._acct.carry_chars

    def close(self) -> bytes:
        return self._scan.close()

    def _flush(self) -> None:
        if self._scan.held_events:
            self._acct.flush_raw(self._scan.take_held())

    def output_estimate(self) -> int:
        self._flush()
        return self._acct.output_estimate()

    def usage_estimated(self) -> StreamUsage | None:
        self._flush()
        return self._acct.usage_estimated(self._scan.events)


def load(choice: str | None = None) -> TrackerClass:
    """The chosen tracker class (``choice``, else ``$ZAIPROXY_RELAY``, else native)."""
    choice = (choice or os.environ.get("ZAIPROXY_RELAY") or "native").lower()
    if choice == "native":
        try:
            from zaiproxy._native import _relay  # noqa: F401  (fail here, not per request)
        except ImportError as exc:  # pragma: no cover - exercised by the twin test
            raise RelayUnavailable(
                "the native stream scanner (zaiproxy._native._relay) did not load: "
                f"{exc}; build it with `make dev` or set ZAIPROXY_RELAY=python"
            ) from exc
        return NativeUsageTracker
    if choice == "python":
        return UsageTracker
    raise RelayUnavailable(f"ZAIPROXY_RELAY={choice!r}: expected 'native' or 'python'")


Tracker: TrackerClass = load()
# Which one the worker runs, for /health and /metrics ("native" or "python").
IMPLEMENTATION = "native" if Tracker is NativeUsageTracker else "python"

