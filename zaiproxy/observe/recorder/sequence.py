"""Sequence accounting: which rows of which worker are in the file, dropped, or lost (pure).

Every worker incarnation (a *source*: worker index, pid and a random nonce, see
:mod:`zaiproxy.observe.recorder.wire`) numbers the rows it hands over 0, 1, 2, ...; a
batch carries the number of its first row and the worker's count of rows it
dropped before that (the channel was full). The file keeps, per source and in the
same transaction as the rows, a :class:`Progress`: how far the rows are accounted
for. So, for the next batch of that source, :func:`account` can tell exactly

* rows already in the file (a datagram read again by a recorder restarted after
  it committed the rows but before it consumed the datagram): skipped;
* rows missing between the progress and the batch: the worker dropped some of
  them (its count says how many; already counted as dropped, by the worker), the
  rest were sent and never written — a recorder died holding them: *lost*, and
  counted here, once.

:func:`settle` applies that to a run of :class:`Chunk` (datagrams on their way to
the file) and says what one transaction writes. No I/O and no clock here: the
arithmetic is tested on its own (tests/test_recorder_loss.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SourceKey = tuple[int, int, int]  # (worker, pid, nonce)


@dataclass(frozen=True, slots=True)
class Progress:
    """How far one source's rows are accounted for."""

    next: int = 0  # rows 0 .. next - 1: in the file, or counted as dropped or lost
    dropped: int = 0  # of those, dropped by the worker (its dropped_total at ``next``)
    lost: int = 0  # of those, sent and never written (counted by a recorder)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one batch means against a source's progress."""

    skip: int  # leading rows already accounted for (in the file): not to be written again
    lost: int  # rows before the batch that were sent and never written
    worker_dropped: int  # rows before the batch that the worker dropped, not yet known here
    progress: Progress  # the source's progress once the batch is written


def account(prev: Progress | None, first: int, count: int, dropped_total: int) -> Verdict:
    """The batch of rows ``first .. first + count - 1``, whose worker had dropped
    ``dropped_total`` rows before ``first``, against the source's progress ``prev``
    (None: nothing of this source accounted for yet)."""
    p = prev if prev is not None else Progress()
    end = first + count
    if end <= p.next:
        # Read before (a replayed datagram, or a heartbeat older than the progress).
        return Verdict(skip=count, lost=0, worker_dropped=0, progress=p)
    skip = max(0, p.next - first)
    missing = max(0, first - p.next)
    # ``dropped_total - p.dropped`` are exactly the worker's drops numbered in
    # [p.next, first): the min() only guards against a writer that is not a RecordSink.
    worker_dropped = min(missing, max(0, dropped_total - p.dropped))
    lost = missing - worker_dropped
    return Verdict(skip=skip, lost=lost, worker_dropped=worker_dropped,
                   progress=Progress(end, p.dropped + worker_dropped, p.lost + lost))


@dataclass(slots=True, eq=False)
class Chunk:
    """One datagram on its way to the file (mutable: the recorder sheds rows under pressure).

    ``rows[i]`` is row number ``first + trimmed + i`` of the source (None: a row that
    failed the type checks, counted as bad when it was read).
    """

    source: SourceKey | None  # None: nothing to account (a bad datagram, the STOP marker)
    variant: str
    first: int
    count: int  # rows the datagram carried (bad ones included)
    dropped_total: int
    rows: list[Any]
    trimmed: int = 0  # leading rows shed because the recorder's memory was full
    shed: int = 0  # how many of those were good rows (counted as dropped when shed)
    held: int = 0  # 1 while the datagram is still in the channel (consumed after the commit)

    def trim(self, n: int) -> int:
        """Shed up to ``n`` leading rows; returns how many good rows went."""
        gone = self.rows[:n]
        del self.rows[:n]
        good = sum(1 for r in gone if r is not None)
        self.trimmed += len(gone)
        self.shed += good
        return good


@dataclass(frozen=True, slots=True)
class Settlement:
    """What one transaction writes for a run of chunks, and what it learnt."""

    rows: list[Any]  # the rows to append, in order
    progress: dict[SourceKey, Progress]  # sources whose progress moved (written with the rows)
    variants: dict[SourceKey, str]  # the variant of each of those sources
    duplicates: int = 0  # good rows already in the file (read again after a restart)
    shed_duplicates: int = 0  # rows shed as "dropped" that the file already had
    worker_dropped: dict[str, int] = field(default_factory=dict)  # per variant
    lost: dict[str, int] = field(default_factory=dict)  # per variant
    losses: tuple[tuple[SourceKey, str, int], ...] = ()  # each gap: (source, variant, rows)

    @property
    def empty(self) -> bool:
        """Nothing for the file (heartbeats that change nothing, replays, bad datagrams)."""
        return not self.rows and not self.progress

    @property
    def lost_total(self) -> int:
        return sum(self.lost.values())


def settle(chunks: Iterable[Chunk], progress: Mapping[SourceKey, Progress]) -> Settlement:
    """Account ``chunks`` (in channel order) against the file's ``progress``."""
    moved: dict[SourceKey, Progress] = {}
    variants: dict[SourceKey, str] = {}
    rows: list[Any] = []
    duplicates = shed_duplicates = 0
    worker_dropped: dict[str, int] = {}
    lost: dict[str, int] = {}
    losses: list[tuple[SourceKey, str, int]] = []
    for c in chunks:
        source = c.source
        if source is None:
            continue
        prev = moved.get(source) or progress.get(source)
        v = account(prev, c.first, c.count, c.dropped_total)
        start = max(0, v.skip - c.trimmed)  # index in c.rows of the first row to write
        if start:
            duplicates += sum(1 for r in c.rows[:start] if r is not None)
        if c.trimmed and v.skip >= c.trimmed:
            shed_duplicates += c.shed  # a replayed datagram's rows were shed: not a loss
        rows.extend(r for r in (c.rows[start:] if start else c.rows) if r is not None)
        if v.progress != (prev if prev is not None else Progress()):
            moved[source] = v.progress
            variants[source] = c.variant
        if v.worker_dropped:
            worker_dropped[c.variant] = worker_dropped.get(c.variant, 0) + v.worker_dropped
        if v.lost:
            lost[c.variant] = lost.get(c.variant, 0) + v.lost
            losses.append((source, c.variant, v.lost))
    return Settlement(rows=rows, progress=moved, variants=variants, duplicates=duplicates,
                      shed_duplicates=shed_duplicates, worker_dropped=worker_dropped, lost=lost,
                      losses=tuple(losses))
