"""Per client key totals: every request of a key by outcome, and the tokens it was charged.

**Outcomes.** Every API request of a known key is counted once, when it ends
(``request/pipeline.py`` ``emit``, from its :class:`~zaiproxy.core.record.RequestRecord`), in
one of :data:`OUTCOMES` (:func:`outcome_of`): ``ok`` (it got an answer below 400), then
``/admin/status``'s failure kinds (``observe/snapshot.py`` ``FAILURE_KINDS``, the same names):
``proxy_429`` (the proxy's own 429: refused by its limits, nothing reached upstream),
``zai_429`` (a 429 from Z.AI relayed after the retries), ``other_4xx`` (any other 4xx,
including 499: the client left first) and ``5xx`` (including a request that got no answer at
all). ``requests`` in a report is their sum: everything the key sent. A request refused
before its key is known (401: no or an unknown key) belongs to no key and is not counted.

**Tokens.** When a request is settled with usage (``request/gate.py`` ``settle``) its tokens
are added: ``charged_requests`` (how many were), input, output, cache read and write tokens.

**The host's ledger** (:class:`KeyUsage`) keeps two counter rows per alias, each of the
ledger's seven counter words: ``keyusage\\0<alias>`` (``cells.key_usage_key``) holds the
token totals in words 1..5 (``TOK_*``), ``keyoutcome\\0<alias>`` (``cells.key_outcome_key``)
the outcome counts in words 1..5 (word ``1 + outcome``). Ten counters do not fit one row's
seven words; apart, the add every request makes and the adds of a settle land on different
cache lines. Nothing is allocated per request (the row of an alias is looked up once per
worker). Every worker adds to
the same rows, so whichever worker answers ``/admin/keys`` reads the host's sums (since the
segment was made: a restart of the supervisor starts them again). The fleet backend keeps the
same counters in one Redis hash per alias (``limits/fleet.py``); both report through
:func:`usage_report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from zaiproxy.core.record import Usage
from zaiproxy.limits.cells import key_outcome_key, key_usage_key
from zaiproxy.limits.segment import Segment

# Words of a key-usage row.
TOK_REQUESTS = 1  # requests whose usage was charged (reported as charged_requests)
TOK_INPUT = 2
TOK_OUTPUT = 3
TOK_CACHE_READ = 4
TOK_CACHE_WRITE = 5

# The outcomes of a request, by index (word 1 + index of a key-outcome row).
OUTCOMES: Final = ("ok", "proxy_429", "zai_429", "other_4xx", "5xx")
OK, PROXY_429, ZAI_429, OTHER_4XX, SERVER_ERROR = range(len(OUTCOMES))
# The token totals in the order of the words TOK_REQUESTS..TOK_CACHE_WRITE.
TOKEN_FIELDS: Final = ("charged_requests", "input_tokens", "output_tokens",
                       "cache_read_tokens", "cache_write_tokens")


def outcome_of(status: int, upstream_status: int | None) -> int:
    """The outcome (an index of :data:`OUTCOMES`) of a request that ended with ``status``.

    A 429 is the proxy's own when nothing was relayed from upstream (``upstream_status`` is
    None: the limits refused it, at admission or at a Z.AI retry's readmission), Z.AI's when
    upstream's 429 was relayed. ``status`` 0 (no answer: a bug cost the connection) is a 5xx.
    """
    if 200 <= status < 400:
        return OK
    if status == 429:
        return PROXY_429 if upstream_status is None else ZAI_429
    if 400 <= status < 500:
        return OTHER_4XX
    return SERVER_ERROR


def usage_report(outcomes: Sequence[int], tokens: Sequence[int]) -> dict[str, int]:
    """One key's ``usage`` object of ``/admin/keys``: ``requests`` (all), the count of each
    outcome, then the token totals (``outcomes`` in :data:`OUTCOMES` order, ``tokens`` in
    :data:`TOKEN_FIELDS` order)."""
    report = {"requests": sum(outcomes)}
    report.update(zip(OUTCOMES, outcomes, strict=True))
    report.update(zip(TOKEN_FIELDS, tokens, strict=True))
    return report


class KeyUsage:
    """The per-alias counters of one segment (rows looked up once per alias)."""

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        self._rows: dict[str, int] = {}
        self._outcome_rows: dict[str, int] = {}

    def _row(self, alias: str) -> int:
        row = self._rows.get(alias)
        if row is None:
            row = self._rows[alias] = self._segment.row(key_usage_key(alias))
        return row

    def _outcome_row(self, alias: str) -> int:
        row = self._outcome_rows.get(alias)
        if row is None:
            row = self._outcome_rows[alias] = self._segment.row(key_outcome_key(alias))
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

    def count(self, alias: str, outcome: int) -> None:
        """Count one ended request of ``alias`` (``outcome``: an index of OUTCOMES)."""
        row = self._outcome_rows.get(alias)
        if row is None:
            row = self._outcome_row(alias)
        self._segment.counter_add(row, 1 + outcome, 1)

    def totals(self, alias: str) -> dict[str, int]:
        """One client key's totals across all workers (since the segment was made)."""
        tokens = self._segment.row_counters(self._row(alias))
        outcomes = self._segment.row_counters(self._outcome_row(alias))
        return usage_report(outcomes[:len(OUTCOMES)], tokens[:len(TOKEN_FIELDS)])
