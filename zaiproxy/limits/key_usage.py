"""Token totals per client key, across every worker of the host (ledger counter rows).

One row per key alias (``keyusage\\0<alias>``) holds five counters; every worker adds the
usage it settled, whichever worker answers ``/admin/keys`` reads the sums.
"""

from __future__ import annotations

from zaiproxy.core.record import Usage
from zaiproxy.limits.cells import key_usage_key
from zaiproxy.limits.segment import Segment

# Words of a key-usage row.
TOK_REQUESTS = 1
TOK_INPUT = 2
TOK_OUTPUT = 3
TOK_CACHE_READ = 4
TOK_CACHE_WRITE = 5


class KeyUsage:
    """The per-alias token counters of one segment (rows looked up once per alias)."""

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        self._rows: dict[str, int] = {}

    def _row(self, alias: str) -> int:
        row = self._rows.get(alias)
        if row is None:
            row = self._rows[alias] = self._segment.row(key_usage_key(alias))
        return row

    def add(self, alias: str, usage: Usage) -> None:
        row = self._row(alias)
        add = self._segment.counter_add
        add(row, TOK_REQUESTS, 1)
        add(row, TOK_INPUT, usage.input_tokens)
        add(row, TOK_OUTPUT, usage.output_tokens)
        if usage.cache_read_tokens:
            add(row, TOK_CACHE_READ, usage.cache_read_tokens)
        if usage.cache_write_tokens:
            add(row, TOK_CACHE_WRITE, usage.cache_write_tokens)

    def totals(self, alias: str) -> dict[str, int]:
        """Token totals of one client key across all workers (since the segment was made)."""
        row = self._row(alias)
        get = self._segment.counter_get
        return {"requests": get(row, TOK_REQUESTS), "input_tokens": get(row, TOK_INPUT),
                "output_tokens": get(row, TOK_OUTPUT),
                "cache_read_tokens": get(row, TOK_CACHE_READ),
                "cache_write_tokens": get(row, TOK_CACHE_WRITE)}
