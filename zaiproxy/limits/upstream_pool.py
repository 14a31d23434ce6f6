"""The pool of upstream keys as a worker uses it: which key a request tries first, which keys
rest, and what the reports show (the file and the rules: ``limits/upstream_keys.py``).

Every worker has its own :class:`KeyPool` over the host's ledger: a key put to rest by one
worker rests for all of them at once (one row per key: until when, why, how often).
Headroom reads Z.AI's own sample of each key (the poller's rows, when it polls) and the
key's own rolling windows (when configured); a request's choice costs a few ledger reads per
key, and nothing at all with one key and no file (``candidates`` returns a constant).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from zaiproxy.limits.cells import (
    REST_REASONS,
    W_REST_REASON,
    W_REST_UNTIL_MS,
    W_RESTS,
    W_SWITCHED_AWAY,
    upstream_rest_key,
)
from zaiproxy.limits.upstream_keys import PoolSpec
from zaiproxy.limits.zai_quota import QuotaBoard

if TYPE_CHECKING:
    from zaiproxy.limits.segment import Segment

ONLY_KEY: Final = (0,)


class KeyPool:
    def __init__(self, spec: PoolSpec, segment: Segment, *, polled: bool,
                 local_used: Callable[[int], float] | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        """``polled``: Z.AI's quota is polled (each key's sample counts in its headroom);
        ``local_used``: the highest used share of a key's own rolling windows (Admitter)."""
        self.spec = spec
        self.segment = segment
        self.wall = wall
        self.aliases = spec.aliases
        self.api_keys = tuple(k.key.encode() for k in spec.keys)
        self.rest_rows = tuple(segment.row(upstream_rest_key(i)) for i in range(len(spec.keys)))
        self.boards = (tuple(QuotaBoard(segment, a) for a in self.aliases) if polled else None)
        self.local_used = local_used
        self.index_of = {a: i for i, a in enumerate(self.aliases)}
        self.pins = {client: self.index_of[up] for client, up in spec.pins.items()}
        self.shown = spec.from_file  # a configured pool says which key answered
        self._turn = 0

    def __len__(self) -> int:
        return len(self.api_keys)

    # ---- choosing ----------------------------------------------------------------------

    def candidates(self, client_alias: str | None) -> Sequence[int]:
        """The keys to try for one request, best first (see the module docstrings)."""
        if len(self.api_keys) == 1:
            return ONLY_KEY
        if client_alias is not None:
            pinned = self.pins.get(client_alias)
            if pinned is not None:
                return (pinned,)
        now_ms = self.wall() * 1000
        free: list[int] = []
        resting: list[tuple[int, int]] = []
        for i in range(len(self.api_keys)):
            until = self.resting_until_ms(i)
            if until > now_ms:
                resting.append((until, i))
            else:
                free.append(i)
        if self.spec.selection == "headroom" and len(free) > 1:
            self._turn += 1
            n = len(self.api_keys)
            turn = self._turn
            # Most headroom first; ties in round-robin order (rounded: a percent is a tie).
            free.sort(key=lambda i: (-round(self.headroom(i), 2), (i - turn) % n))
        return (*free, *(i for _, i in sorted(resting)))

    def headroom(self, index: int) -> float:
        """1 - the highest used share known for the key: Z.AI's windows, its own windows."""
        used = 0.0
        if self.boards is not None:
            used = self.boards[index].used_max()
        if self.local_used is not None:
            used = max(used, self.local_used(index))
        return 1.0 - used

    # ---- resting -----------------------------------------------------------------------

    def rest(self, index: int, until_s: float, reason: str) -> None:
        """Put a key to rest until ``until_s`` (never shortens a longer rest)."""
        seg, row = self.segment, self.rest_rows[index]
        until_ms = round(until_s * 1000)
        if until_ms > seg.counter_get(row, W_REST_UNTIL_MS):
            seg.counter_set(row, W_REST_REASON, REST_REASONS.index(reason))
            seg.counter_set(row, W_REST_UNTIL_MS, until_ms)
        seg.counter_add(row, W_RESTS, 1)

    def switched_away(self, index: int) -> None:
        self.segment.counter_add(self.rest_rows[index], W_SWITCHED_AWAY, 1)

    def resting_until_ms(self, index: int) -> int:
        return self.segment.counter_get(self.rest_rows[index], W_REST_UNTIL_MS)

    def report(self) -> list[dict[str, Any]]:
        """Per key: whether it rests, until when and why, how often (``/admin/keys``)."""
        now = self.wall()
        out = []
        get = self.segment.counter_get
        for i, alias in enumerate(self.aliases):
            row = self.rest_rows[i]
            until = get(row, W_REST_UNTIL_MS) / 1000
            reason = get(row, W_REST_REASON)
            resting = until > now
            out.append({
                "alias": alias, "index": i, "resting": resting,
                "resting_until": until if resting else None,
                "rest_reason": (REST_REASONS[reason] if resting and 0 <= reason < len(REST_REASONS)
                                else None),
                "rests": get(row, W_RESTS), "switched_away": get(row, W_SWITCHED_AWAY),
                "pinned_clients": sorted(c for c, k in self.pins.items() if k == i),
                "headroom": round(self.headroom(i), 4),
            })
        return out
