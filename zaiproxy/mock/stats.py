"""State of one mock server: request statistics, per-key failure counters, quota. No I/O.

The rest of the mock is a pure function of the request; these two exist so that
end-to-end tests can see what the proxy did to the upstream:

- :class:`MockStats`: requests per path and per ``x-mock-fail-key``, requests in
  flight and the peak of that (did the proxy's concurrency limit hold?), served
  as ``GET /mock/stats`` and zeroed by ``POST /mock/stats/reset``;
- ``failures`` in :class:`MockState`: how many requests carried each
  ``x-mock-fail-key``, so ``x-mock-fail-times: N`` can fail the first N of them
  and let the retry succeed.

- ``quota`` in :class:`MockState`: the accounts' token usage behind Z.AI's quota
  endpoint (:class:`~zaiproxy.mock.quota.QuotaBook`), the ``quota`` section of
  ``GET /mock/stats``. Unlike the rest it is shared by the workers of a
  multi-process mock, and ``POST /mock/stats/reset`` leaves it alone
  (``POST /mock/quota`` with ``{"reset": true}`` forgets one account).

One :class:`MockState` belongs to one ``serve_mock`` call: one per process in
``zaiproxy.mock.run`` (with ``workers > 1`` each worker counts only what the
kernel gave it; tests run one process). Everything runs on one trio loop, so
plain integers need no locks. All maps are bounded (client-chosen keys and
paths must not grow the mock without limit): the least recently used entry
goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson

from zaiproxy.mock.quota import QuotaBook

STATS_PATH = b"/mock/stats"
STATS_RESET_PATH = b"/mock/stats/reset"
MAX_KEYS = 10_000
MAX_PATHS = 1_000
MAX_PATH_CHARS = 200


def is_stats_path(path: bytes) -> bool:
    """The mock's own control routes, which are neither counted nor proxied to a handler."""
    return path.rstrip(b"/") in (STATS_PATH, STATS_RESET_PATH)


class BoundedCounter:
    """Counts per key; holds at most ``max_keys``, dropping the least recently used."""

    def __init__(self, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._counts: OrderedDict[str, int] = OrderedDict()

    def hit(self, key: str) -> int:
        """Count one more for ``key``; return its count, this one included."""
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count
        if len(self._counts) > self.max_keys:
            self._counts.popitem(last=False)
        return count

    def get(self, key: str) -> int:
        return self._counts.get(key, 0)

    def as_dict(self) -> dict[str, int]:
        return dict(self._counts)

    def clear(self) -> None:
        self._counts.clear()

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"BoundedCounter({len(self._counts)}/{self.max_keys} keys)"


class MockStats:
    """Requests seen and in flight. A request is in flight from its head until its
    response is fully written or its connection is gone (the server's try/finally)."""

    def __init__(self, max_keys: int = MAX_KEYS, max_paths: int = MAX_PATHS) -> None:
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.by_path = BoundedCounter(max_paths)
        self.by_key = BoundedCounter(max_keys)

    def started(self, path: bytes, key: str | None) -> None:
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.by_path.hit(path[:MAX_PATH_CHARS].decode("latin-1"))
        if key is not None:
            self.by_key.hit(key)

    def finished(self) -> None:
        self.in_flight -= 1

    def reset(self) -> None:
        """Zero the counts. Requests in flight stay in flight (they will finish and
        be subtracted), so the peak restarts from them rather than from 0."""
        self.requests = 0
        self.peak_in_flight = self.in_flight
        self.by_path.clear()
        self.by_key.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "by_key": self.by_key.as_dict(),
            "by_path": self.by_path.as_dict(),
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.snapshot())

    def __repr__(self) -> str:
        return (
            f"MockStats(requests={self.requests}, in_flight={self.in_flight}, "
            f"peak_in_flight={self.peak_in_flight})"
        )


class MockState:
    """Everything a mock server remembers between requests."""

    def __init__(self, max_keys: int = MAX_KEYS, quota: QuotaBook | None = None) -> None:
        self.stats = MockStats(max_keys)
        # Kept apart from stats.by_key: resetting the statistics between test
        # phases must not re-arm the failures of a key already used up.
        self.failures = BoundedCounter(max_keys)
        self.quota = quota if quota is not None else QuotaBook()

    def __repr__(self) -> str:
        return f"MockState({self.stats!r}, failures={self.failures!r}, quota={self.quota!r})"
