"""The bytes that cross the worker → recorder channel.

One datagram carries one batch of finished requests from one worker::

    [WIRE_VERSION, worker, pid, nonce, variant, dropped_total, first, [row, row, ...]]

encoded with orjson. A row is a flat list in :data:`ROW_FIELDS` order, not a
dict: the keys would more than double the bytes (and the kernel buffer holds
bytes, so fewer bytes = more records before anything is dropped), and a list
costs the hot path one tuple build per record.

Sequence numbers (docs/decisions/recorder-loss.md): ``(worker, pid, nonce)`` names
one worker incarnation (``nonce`` is random per :class:`~zaiproxy.observe.recorder.sink.RecordSink`,
so a pid reused after a restart of the proxy is a different source), which
numbers its rows 0, 1, 2, ... in the order it hands them over. ``first`` is the
number of the batch's first row; the batch holds rows ``first .. first + len(rows) - 1``.
``dropped_total`` is how many of the rows numbered before ``first`` the worker
itself dropped (the channel was full; it counted them). So the recorder can tell
rows dropped by the worker from rows that were sent and never written (lost in a
recorder that died), and a batch it already wrote (read again after a restart)
from a new one. A batch without rows is a heartbeat: the worker's counts, sent
when it has been idle a while and when it exits, so that a loss after a worker's
last batch is seen too.

Versions: 3 added ``api`` to the row (the record's API: which usage counts cached tokens
inside the input, for the cost); 4 added ``requested_model`` (the client's model when a
1312 fallback sent the request to another one); 5 added ``upstream`` (the alias of the pool's
upstream key the answer came with). A datagram of another version is refused whole (a
:class:`WireError`, counted as a bad datagram): workers and recorder are always one
build, started by one supervisor, so another version is a stray writer, and a row whose
fields cannot be trusted is not written.

:data:`STOP` is the supervisor's end-of-stream marker. All writers share one
socket, whose queue is FIFO: once the recorder reads STOP, it has read every
datagram sent before it, i.e. everything the (already exited) workers sent.

Pure functions only: no sockets here (h11's sans-I/O habit), so the format is
tested byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from zaiproxy.core.record import RequestRecord

WIRE_VERSION: Final = 5
STOP: Final = b"STOP"
# Limit of one error message stored per request: our own messages are short, but some quote
# client input (a JSON parse error), and the history is not a place for request bodies.
MAX_ERROR_CHARS: Final = 200

ROW_FIELDS: Final = (
    "ts", "request_id", "method", "route", "api", "status", "duration_s", "bytes_in", "bytes_out",
    "model", "stream", "upstream_status", "upstream_ttfb_s", "result", "retried",
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "tokens_estimated", "prompt_estimate", "key_alias", "zai_retries", "zai_class", "zai_code",
    "error", "ttft_s", "upstream_s", "queue_wait_s", "token_count_s", "requested_model",
    "upstream",
)  # fmt: skip
ROW_LEN: Final = len(ROW_FIELDS)

WireRow = tuple[Any, ...]


class WireError(ValueError):
    """A datagram that is not a batch of this version (a bug or a stray writer)."""


def row_of(record: RequestRecord, ts: float) -> WireRow:
    """The wire row of one record, finished at wall-clock time ``ts`` (epoch seconds)."""
    u = record.usage
    error = record.error
    if error is not None and len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS]
    return (
        ts, record.request_id, record.method, record.route, record.api, record.status,
        record.duration_s, record.bytes_in, record.bytes_out, record.model, record.stream,
        record.upstream_status, record.upstream_ttfb_s, record.result, record.retried,
        u.input_tokens if u is not None else None,
        u.output_tokens if u is not None else None,
        u.cache_read_tokens if u is not None else None,
        u.cache_write_tokens if u is not None else None,
        record.tokens_estimated, record.prompt_estimate, record.key_alias, record.zai_retries,
        record.zai_class, record.zai_code, error, record.ttft_s, record.upstream_s,
        record.queue_wait_s, record.token_count_s, record.requested_model, record.upstream,
    )


def encode_batch(worker: int, pid: int, variant: str, dropped_total: int,
                 rows: list[WireRow], *, nonce: int = 0, first: int = 0) -> bytes:
    return orjson.dumps([WIRE_VERSION, worker, pid, nonce, variant, dropped_total, first, rows])


@dataclass(frozen=True, slots=True)
class Batch:
    worker: int
    pid: int
    nonce: int
    variant: str
    dropped_total: int  # rows numbered before ``first`` that the worker dropped
    first: int  # the sequence number of rows[0]
    rows: list[list[Any]]

    @property
    def source(self) -> tuple[int, int, int]:
        """The worker incarnation that numbered these rows."""
        return (self.worker, self.pid, self.nonce)


def decode_batch(data: bytes) -> Batch:
    """Parse one datagram; raises :class:`WireError` for anything but a valid batch.

    Rows are only checked for their length here; :func:`zaiproxy.observe.recorder.store.db_row`
    checks each value's type.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"not JSON: {exc}") from None
    if not isinstance(doc, list) or len(doc) != 8 or doc[0] != WIRE_VERSION:
        raise WireError(f"not a batch of wire version {WIRE_VERSION}")
    _, worker, pid, nonce, variant, dropped, first, rows = doc
    if (type(worker) is not int or type(pid) is not int or type(nonce) is not int
            or not isinstance(variant, str) or type(dropped) is not int or dropped < 0
            or type(first) is not int or first < 0 or dropped > first
            or not isinstance(rows, list)):
        raise WireError("bad batch header")
    for row in rows:
        if not isinstance(row, list) or len(row) != ROW_LEN:
            raise WireError("bad row")
    return Batch(worker, pid, nonce, variant, dropped, first, rows)
