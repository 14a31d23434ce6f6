"""A :class:`ResponsePlan` as bytes on the wire: timed writes and how the connection ends.

Pure, like :mod:`~zaiproxy.mock.behaviour`: :func:`build_schedule` returns
the list of writes (each with the delay before it) and an :class:`Ending`;
the server only waits, sends each write with its own ``send`` and ends the
connection as told.
So ``build_schedule(plan_response(request, options)).data`` is exactly what a
client receives, faults and write splits included.

The response is built by hand instead of through h11's writer: it is valid
HTTP/1.1 (status line with a reason phrase, ``content-length`` for bodies,
``transfer-encoding: chunked`` with one chunk per SSE event for streams) and
it saves the writer's per-header validation on the hot path. Each
``send_all`` costs ~15-20 us (measured on the bench machine), so by default the head and the
whole body leave in ONE write; only a chunk delay, a write-split mode or a
fault makes more.

Write splits (``x-mock-write-split``) change only the write boundaries, never
the bytes:

- default: head + body in one write (or head + first event, then one write per
  event when there is a chunk delay);
- ``one``: the head, then each timed body segment in one write;
- ``bytes``: the head, then every body byte as its own write;
- ``random``: the head, then body writes of 1-64 bytes from ``random.Random(seed)``;
- ``large``: head and whole body in a single write, chunk delays ignored.

Faults truncate the body: ``reset-mid-stream`` / ``close-mid-body`` keep the
first half of the events (stream) or of the bytes (non-stream) and end with
RST / FIN; ``stall`` keeps the first event (stream) or half the bytes
(non-stream) and then waits for the peer to leave; ``reset-before-headers``
and ``stall-headers`` send nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import http
import random
from dataclasses import dataclass

from zaiproxy.mock.behaviour import ResponsePlan
from zaiproxy.mock.controls import Fault, WriteSplit

TERMINATOR = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_RANDOM_MAX_WRITE = 64


class Ending(enum.Enum):
    KEEP_ALIVE = "keep-alive"  # read the next request on this connection
    CLOSE = "close"  # FIN
    RESET = "reset"  # RST: SO_LINGER {1, 0}, then close
    STALL = "stall"  # send nothing more; close once the peer leaves


@dataclass(frozen=True)
class Write:
    delay: float  # seconds after the previous write was due (see mock.pacer)
    data: bytes


@dataclass(frozen=True)
class Schedule:
    writes: tuple[Write, ...]
    ending: Ending

    @property
    def data(self) -> bytes:
        """Every byte the client receives, in order."""
        return b"".join(w.data for w in self.writes)


_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


def render_head(plan: ResponsePlan) -> bytes:
    parts = [status_line(plan.status)]
    parts.extend(name + b": " + value + b"\r\n" for name, value in plan.headers)
    if plan.events is not None:
        parts.append(b"transfer-encoding: chunked\r\n")
    else:
        parts.append(b"content-length: %d\r\n" % len(plan.body))
    if plan.close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def frame_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def render_response(plan: ResponsePlan) -> bytes:
    """The complete response as sent when no fault applies."""
    return build_schedule(dataclasses.replace(plan, fault=None)).data


def _body_segments(plan: ResponsePlan) -> tuple[list[bytes], bool]:
    """Body bytes cut where a fault truncates; second item: is the body complete."""
    fault = plan.fault
    if plan.events is None:
        if fault in (Fault.RESET_MID_STREAM, Fault.CLOSE_MID_BODY, Fault.STALL):
            return [plan.body[: len(plan.body) // 2]], False
        return [plan.body], True
    framed = [frame_chunk(e) for e in plan.events]
    if fault in (Fault.RESET_MID_STREAM, Fault.CLOSE_MID_BODY):
        return framed[: max(1, len(framed) // 2)], False
    if fault is Fault.STALL:
        return framed[:1], False
    framed[-1] += TERMINATOR  # the terminator leaves with the last event: one write fewer
    return framed, True


_FAULT_ENDINGS: dict[Fault | None, Ending] = {
    Fault.RESET_MID_STREAM: Ending.RESET,
    Fault.CLOSE_MID_BODY: Ending.CLOSE,
    Fault.STALL: Ending.STALL,
}


def _split(data: bytes, mode: WriteSplit | None, rng: random.Random) -> list[bytes]:
    if mode is WriteSplit.BYTES:
        return [data[i : i + 1] for i in range(len(data))]
    if mode is WriteSplit.RANDOM:
        pieces, i = [], 0
        while i < len(data):
            n = rng.randint(1, _RANDOM_MAX_WRITE)
            pieces.append(data[i : i + n])
            i += n
        return pieces
    return [data]


def build_schedule(plan: ResponsePlan) -> Schedule:
    """The writes for ``plan`` and how the connection ends afterwards."""
    first = plan.first_byte_delay
    if plan.fault is Fault.RESET_BEFORE_HEADERS:
        return Schedule((Write(first, b""),) if first else (), Ending.RESET)
    if plan.fault is Fault.STALL_HEADERS:
        return Schedule((Write(first, b""),) if first else (), Ending.STALL)

    head = render_head(plan)
    segments, complete = ([], True) if plan.head_only else _body_segments(plan)
    ending = Ending.CLOSE if plan.close else Ending.KEEP_ALIVE
    if not complete:
        ending = _FAULT_ENDINGS[plan.fault]
    # Timed segments: one per event when a stream has a chunk delay, else the whole body.
    timed = (
        plan.events is not None
        and plan.chunk_delay > 0
        and plan.write_split is not WriteSplit.LARGE
    )
    if not timed and len(segments) > 1:
        segments = [b"".join(segments)]
    gap = plan.chunk_delay if timed else 0.0

    mode = plan.write_split
    if mode is None or mode is WriteSplit.LARGE:
        writes = [Write(first, head + (segments[0] if segments else b""))]
        writes.extend(Write(gap, s) for s in segments[1:])
        return Schedule(tuple(writes), ending)
    rng = random.Random(plan.seed)
    writes = [Write(first, head)]
    for index, segment in enumerate(segments):
        for n, piece in enumerate(_split(segment, mode, rng)):
            writes.append(Write(gap if index and not n else 0.0, piece))
    return Schedule(tuple(writes), ending)
