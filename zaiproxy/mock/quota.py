"""Z.AI's quota endpoint on the mock: per-key token usage that moves with traffic.

``GET {any prefix}/api/monitor/usage/quota/limit`` answers like Z.AI
(``zaiproxy/upstream/quota.py`` parses it)::

    {"code": 200, "msg": "Operation successful", "success": true,
     "data": {"limits": [
        {"type": "TOKENS_LIMIT", "unit": 3, "number": 5, "percentage": P, "nextResetTime": MS},
        {"type": "TOKENS_LIMIT", "unit": 6, "number": 1, "percentage": P, "nextResetTime": MS},
        {"type": "TIME_LIMIT", "unit": 5, "number": 1, "usage": 1000, ...}],
      "level": "pro"}}

Accounts
    An account is the key a request carries: ``x-api-key``, else ``Authorization``
    with or without ``Bearer `` (the quota endpoint itself reads ``Authorization``
    only, as Z.AI's clients send it there). A request with no key belongs to the
    *shared* account, so a mock without ``--api-key`` and clients without keys see
    one account. When the mock has an ``api_key``, the quota endpoint wants it
    (raw or Bearer) and answers anything else with 401
    ``{"code": 1001, "msg": ..., "success": false}``; keys are only ever shown
    as :func:`account_id` (``sha256(key)[:12]`` in hex, ``"shared"``).

Usage
    Every generation the mock answers 200 without a fault (chat, completions,
    messages; see ``ResponsePlan.tokens``) adds prompt + completion tokens, the
    numbers of its ``usage``, to both windows of its account; ``x-mock-usage``
    only moves or hides that report, it does not make the tokens free. A window
    starts at its first use after a reset and ends 5 hours (five-hour) or 7 days
    (weekly) later: then its usage is 0 again and the next use starts it anew.
    ``percentage`` is ``round(used / allowance * 100)``, half up and at most 100,
    an integer as Z.AI sends it (the mock does not refuse traffic past 100%); a
    window not started has no ``nextResetTime``. Tests read exact token counts
    from the ``quota`` section of ``GET /mock/stats`` (or ``GET /mock/quota``).
    Polls are counted there too (``polls``), and not as ``requests``/``by_path``/
    ``in_flight``: a proxy's poller must not disturb tests that count its traffic.

Shapes (:class:`~zaiproxy.mock.controls.QuotaShape`)
    ``ok``; ``error`` (HTTP 200, ``{"code": 500, "msg": "internal error",
    "success": false}``, as Z.AI reports its own failures); ``malformed`` (HTTP
    200, ``{"code": 200, "success": true, "data": {}}``); ``http500`` (a text 500);
    ``oversized`` (the ok answer padded to more than 64 KiB); ``slow`` (the ok
    answer after :data:`SLOW_SECONDS`). Chosen per request by
    ``x-mock-quota-shape``, else the account's shape (default ``ok``).

Control: ``POST /mock/quota`` changes the account of the key it carries (the
rules above; no key: the shared account) and answers its state. Every field
is optional; unknown fields are a 400, like a bad ``x-mock-*`` header::

    {"reset": true,                       # first forget the account (defaults, no usage)
     "shape": "ok" | "error" | "malformed" | "http500" | "oversized" | "slow",
     "level": "max",
     "five_hour_allowance": 100000, "weekly_allowance": 1000000,
     "used": {"five_hour": 5000, "weekly": 5000},        # starts the window if > 0, 0 ends it
     "reset_at_ms": {"five_hour": 1767225600000, "weekly": null}}   # null: not started

``GET /mock/quota`` shows every account (the ``quota`` section of ``/mock/stats``).

State (:class:`QuotaBook`) lives in a small shared-memory block, so the workers
of a multi-process mock (``zaiproxy.mock.run``) share usage: the parent creates
the block (a ``memfd``), each spawned worker maps it (the fd travels like the
listening sockets do) and takes a POSIX record lock (``lockf``) around each
read-modify-write; the kernel drops the lock of a worker that dies. A one-process
mock takes no lock (one trio thread). The critical sections are a few struct
reads and writes, so blocking on the lock costs microseconds. At most
:data:`MAX_ACCOUNTS` accounts are kept; a new one replaces the least recently
used, which forgets its usage. The clock is wall time (``nextResetTime`` is
epoch ms) and injectable (``clock=``) for tests.

Layout (little-endian): a 64-byte header ``magic "ZQM1", u32 slots, u64 seq, u64
polls``, then ``slots`` records of 128 bytes, each :data:`_SLOT`: ``16s digest``
(sha256 of the key, first 16 bytes), ``u64 seq`` (last use, from the header's
counter; 0 = a free slot), ``u8 shape``, ``u8 level length``, 6 pad, ``24s level``
(empty: the default), then per window (five-hour, weekly) ``i64 allowance``
(0: the default), ``i64 used``, ``f64 reset_at`` (unix seconds, 0: not started),
then ``u64 polls, requests, tokens``.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from multiprocessing.context import get_spawning_popen
from multiprocessing.reduction import DupFd
from typing import Any, Final

import orjson

from zaiproxy.mock import payloads
from zaiproxy.mock.behaviour import (
    MAX_QUOTA,
    QUOTA_LEVEL,
    MockOptions,
    MockRequest,
    ResponsePlan,
    json_plan,
)
from zaiproxy.mock.controls import ControlError, QuotaShape, parse_headers

__all__ = [
    "CONTROL_PATH",
    "MAX_ACCOUNTS",
    "QUOTA_PATH",
    "SLOW_SECONDS",
    "Account",
    "QuotaBook",
    "QuotaChange",
    "Window",
    "account_id",
    "account_key",
    "handle",
    "is_quota_route",
    "parse_change",
    "quota_body",
]

QUOTA_PATH: Final = b"/api/monitor/usage/quota/limit"
CONTROL_PATH: Final = b"/mock/quota"
MAX_ACCOUNTS: Final = 64
SLOW_SECONDS: Final = 10.0
FIVE_HOUR_SECONDS: Final = 5 * 3600.0
WEEK_SECONDS: Final = 7 * 86400.0
MAX_BODY: Final = 64 * 1024  # what a poller reads; "oversized" goes past it
SHARED: Final = "shared"  # the account id of requests without a key

_MAGIC: Final = b"ZQM1"
_HEADER = struct.Struct("<4sIQQ")
_HEADER_SIZE: Final = 64
_SLOT = struct.Struct("<16sQBB6x24sqqdqqdQQQ")
_SLOT_SIZE: Final = 128
_SHAPES: Final = tuple(QuotaShape)
_WINDOWS: Final = ("five_hour", "weekly")
_PERIODS: Final = (FIVE_HOUR_SECONDS, WEEK_SECONDS)
_NO_KEY: Final = b"\x00" * 16  # the shared account's digest
_TIME_LIMIT_CALLS: Final = 1000  # the tool-call allowance in the TIME_LIMIT entry (ignored)

assert _HEADER.size <= _HEADER_SIZE and _SLOT.size == _SLOT_SIZE


# --- accounts ------------------------------------------------------------------------------


def account_key(
    headers: Iterable[tuple[bytes, bytes]], *, authorization_only: bool = False
) -> bytes | None:
    """The key a request carries: ``x-api-key``, else ``Authorization`` (raw or Bearer)."""
    api_key = authorization = None
    for name, value in headers:
        if name == b"x-api-key" and not authorization_only:
            api_key = value.strip()
        elif name == b"authorization":
            authorization = value.strip()
    key = api_key if api_key else authorization
    if key and (key[:7].lower() == b"bearer " or key.lower() == b"bearer"):
        key = key[7:].strip()
    return key or None


def account_id(key: bytes | str | None) -> str:
    """How an account is shown: never the key, a short digest of it."""
    if key is None:
        return SHARED
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()[:12]


def _digest(key: bytes | None) -> bytes:
    return _NO_KEY if key is None else hashlib.sha256(key).digest()[:16]


@dataclass(frozen=True, slots=True)
class Window:
    allowance: int
    used: int
    reset_at: float | None  # unix seconds; None: not started

    @property
    def percentage(self) -> int:
        """Z.AI's integer percent: rounded half up, at most 100."""
        return min(100, (self.used * 200 + self.allowance) // (2 * self.allowance))

    @property
    def reset_at_ms(self) -> int | None:
        return None if self.reset_at is None else round(self.reset_at * 1000)

    def to_json(self) -> dict[str, Any]:
        return {"allowance": self.allowance, "used": self.used, "percentage": self.percentage,
                "reset_at_ms": self.reset_at_ms}


@dataclass(frozen=True, slots=True)
class Account:
    """One account's state at one moment (expired windows already back at 0)."""

    id: str
    level: str
    shape: QuotaShape
    five_hour: Window
    weekly: Window
    polls: int
    requests: int
    tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "shape": self.shape.value, "polls": self.polls,
                "requests": self.requests, "tokens": self.tokens,
                "five_hour": self.five_hour.to_json(), "weekly": self.weekly.to_json()}


@dataclass(frozen=True, slots=True)
class QuotaChange:
    """A parsed ``POST /mock/quota`` body; ``None`` fields are left as they are.
    In ``used`` and ``reset_at_ms`` a window absent from the dict is left alone."""

    reset: bool = False
    shape: QuotaShape | None = None
    level: str | None = None
    five_hour_allowance: int | None = None
    weekly_allowance: int | None = None
    used: dict[str, int] | None = None
    reset_at_ms: dict[str, int | None] | None = None


# --- the shared state ----------------------------------------------------------------------


class _Slot:
    """One record, unpacked for a read-modify-write under the lock."""

    __slots__ = ("allowance", "digest", "level", "polls", "requests", "reset", "seq", "shape",
                 "tokens", "used")

    def __init__(self, values: tuple[Any, ...]) -> None:
        (self.digest, self.seq, self.shape, level_len, level, a5, u5, r5, aw, uw, rw,
         self.polls, self.requests, self.tokens) = values
        self.level: bytes = level[:level_len]
        self.allowance = [a5, aw]
        self.used = [u5, uw]
        self.reset = [r5, rw]

    def pack(self) -> tuple[Any, ...]:
        return (self.digest, self.seq, self.shape, len(self.level), self.level,
                self.allowance[0], self.used[0], self.reset[0],
                self.allowance[1], self.used[1], self.reset[1],
                self.polls, self.requests, self.tokens)

    def settle(self, now: float) -> None:
        """A window whose time is up is back at 0 and not started."""
        for i in (0, 1):
            if self.reset[i] and now >= self.reset[i]:
                self.used[i], self.reset[i] = 0, 0.0


def _empty_slot(digest: bytes, seq: int) -> _Slot:
    return _Slot((digest, seq, 0, 0, b"", 0, 0, 0.0, 0, 0, 0.0, 0, 0, 0))


class QuotaBook:
    """Every account's quota, in a shared-memory block (see the module docstring).

    ``shared``: the block will be mapped by other processes (pickle the book into
    a spawned child's arguments), so every change takes the lock.
    """

    def __init__(
        self,
        *,
        five_hour_allowance: int = MockOptions.quota_five_hour,
        weekly_allowance: int = MockOptions.quota_weekly,
        level: str = MockOptions.quota_level,
        clock: Callable[[], float] = time.time,
        slots: int = MAX_ACCOUNTS,
        shared: bool = False,
        _fd: int | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.defaults = (five_hour_allowance, weekly_allowance)
        self.level = level
        self.clock = clock
        self.slots = slots
        self.shared = shared or _fd is not None
        size = _HEADER_SIZE + slots * _SLOT_SIZE
        if _fd is None:
            _fd = os.memfd_create("zaiproxy-mock-quota", os.MFD_CLOEXEC)
            os.ftruncate(_fd, size)
            self._fd = _fd
            self._map = mmap.mmap(_fd, size)
            _HEADER.pack_into(self._map, 0, _MAGIC, slots, 0, 0)
        else:
            self._fd = _fd
            self._map = mmap.mmap(_fd, size)
            magic, stored_slots, _, _ = _HEADER.unpack_from(self._map, 0)
            if (magic, stored_slots) != (_MAGIC, slots):
                raise ValueError("not a quota block of this layout")
        self._index: dict[bytes, int] = {}  # digest -> slot, this process's memo

    @classmethod
    def from_options(
        cls, options: MockOptions, *, clock: Callable[[], float] = time.time, shared: bool = False
    ) -> QuotaBook:
        return cls(five_hour_allowance=options.quota_five_hour,
                   weekly_allowance=options.quota_weekly, level=options.quota_level,
                   clock=clock, shared=shared)

    def __reduce__(self) -> tuple[Any, ...]:
        # The fd travels as the listening sockets do: passed to the spawned child,
        # which maps the same memory. Only then: elsewhere DupFd would quietly start
        # multiprocessing's fd-sharing thread, which nothing here wants.
        if get_spawning_popen() is None:
            raise RuntimeError("a QuotaBook can only be passed to a process being spawned")
        return (_attach, (DupFd(self._fd), self.defaults, self.level, self.clock, self.slots))

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def __repr__(self) -> str:
        return (f"QuotaBook({len(self.accounts())}/{self.slots} accounts, "
                f"shared={self.shared}, defaults={self.defaults}, level={self.level!r})")

    # --- operations (each one read-modify-write under the lock) ---------------------------

    def charge(self, key: bytes | None, tokens: int) -> None:
        """Add ``tokens`` to both windows of ``key``'s account, starting them if needed."""
        now = self.clock()
        with self._locked():
            index, slot = self._slot(_digest(key))
            slot.settle(now)
            for i in (0, 1):
                if not slot.reset[i]:
                    slot.reset[i] = now + _PERIODS[i]
                slot.used[i] = min(MAX_QUOTA, slot.used[i] + tokens)
            slot.requests += 1
            slot.tokens += tokens
            self._write(index, slot)

    def poll(self, key: bytes | None) -> Account:
        """Count a poll of ``key``'s account and return its state."""
        now = self.clock()
        with self._locked():
            self._count_poll()
            index, slot = self._slot(_digest(key))
            slot.settle(now)
            slot.polls += 1
            self._write(index, slot)
            return self._account(account_id(key), slot)

    def refused(self) -> None:
        """Count a poll that was refused (no account of its own)."""
        with self._locked():
            self._count_poll()

    def change(self, key: bytes | None, change: QuotaChange) -> Account:
        """Apply a ``POST /mock/quota`` to ``key``'s account; return its new state."""
        now = self.clock()
        with self._locked():
            index, slot = self._slot(_digest(key))
            if change.reset:
                slot = _empty_slot(slot.digest, slot.seq)
            slot.settle(now)
            if change.shape is not None:
                slot.shape = _SHAPES.index(change.shape)
            if change.level is not None:
                slot.level = change.level.encode()
            for i, allowance in enumerate((change.five_hour_allowance, change.weekly_allowance)):
                if allowance is not None:
                    slot.allowance[i] = allowance
            for i, name in enumerate(_WINDOWS):
                if change.used is not None and name in change.used:
                    slot.used[i] = change.used[name]
                    if slot.used[i] == 0:
                        slot.reset[i] = 0.0
                    elif not slot.reset[i]:
                        slot.reset[i] = now + _PERIODS[i]
                if change.reset_at_ms is not None and name in change.reset_at_ms:
                    ms = change.reset_at_ms[name]
                    slot.reset[i] = 0.0 if ms is None else ms / 1000
            self._write(index, slot)
            return self._account(account_id(key), slot)

    def accounts(self) -> dict[str, Account]:
        """Every account by id, the most recently used first. The id of an account
        is :func:`account_id` of its key; the book keeps digests, so it shows
        ``digest[:6]`` in hex: the same 12 characters."""
        now = self.clock()
        with self._locked():
            slots = [s for s in (self._read(i) for i in range(self.slots)) if s.seq]
        slots.sort(key=lambda s: s.seq, reverse=True)
        found = {}
        for slot in slots:
            slot.settle(now)
            ident = SHARED if slot.digest == _NO_KEY else slot.digest[:6].hex()
            found[ident] = self._account(ident, slot)
        return found

    def snapshot(self) -> dict[str, Any]:
        """The ``quota`` section of ``GET /mock/stats``."""
        accounts = {ident: a.to_json() for ident, a in self.accounts().items()}
        with self._locked():
            polls = _HEADER.unpack_from(self._map, 0)[3]
        return {"polls": polls, "accounts": accounts}

    def spent(self, key: bytes | None) -> float | None:
        """When ``key``'s account has used a window's whole allowance: the latest reset time
        of the spent windows (unix seconds); None while it has quota left."""
        now = self.clock()
        with self._locked():
            index, slot = self._slot(_digest(key))
            slot.settle(now)
            self._write(index, slot)
        resets = [slot.reset[i] or now for i in (0, 1)
                  if slot.used[i] >= (slot.allowance[i] or self.defaults[i])]
        return max(resets) if resets else None

    # --- the block -------------------------------------------------------------------------

    def _locked(self) -> _Lock:
        return _Lock(self._fd if self.shared else None)

    def _read(self, index: int) -> _Slot:
        return _Slot(_SLOT.unpack_from(self._map, _HEADER_SIZE + index * _SLOT_SIZE))

    def _write(self, index: int, slot: _Slot) -> None:
        _SLOT.pack_into(self._map, _HEADER_SIZE + index * _SLOT_SIZE, *slot.pack())

    def _next_seq(self) -> int:
        magic, slots, seq, polls = _HEADER.unpack_from(self._map, 0)
        _HEADER.pack_into(self._map, 0, magic, slots, seq + 1, polls)
        return int(seq + 1)

    def _count_poll(self) -> None:
        magic, slots, seq, polls = _HEADER.unpack_from(self._map, 0)
        _HEADER.pack_into(self._map, 0, magic, slots, seq, polls + 1)

    def _slot(self, digest: bytes) -> tuple[int, _Slot]:
        """The slot of ``digest`` (touched: most recently used), made if missing."""
        seq = self._next_seq()
        index = self._index.get(digest)
        slot = self._read(index) if index is not None else None
        if index is None or slot is None or slot.digest != digest or not slot.seq:
            index, slot = self._find(digest)
        slot.seq = seq
        return index, slot

    def _find(self, digest: bytes) -> tuple[int, _Slot]:
        free = oldest = None
        oldest_seq = 0
        for i in range(self.slots):
            slot = self._read(i)
            if slot.seq and slot.digest == digest:
                self._remember(digest, i)
                return i, slot
            if not slot.seq:
                free = i if free is None else free
            elif oldest is None or slot.seq < oldest_seq:
                oldest, oldest_seq = i, slot.seq
        index = free if free is not None else oldest
        assert index is not None
        # The evicted account (if any) may be in another process's memo: the digest
        # check in _slot catches that.
        self._remember(digest, index)
        return index, _empty_slot(digest, 0)

    def _remember(self, digest: bytes, index: int) -> None:
        # One digest per slot in the memo (whoever held the slot before is gone), so
        # it never holds more than `slots` entries however many keys come and go.
        self._index = {d: i for d, i in self._index.items() if i != index}
        self._index[digest] = index

    def _account(self, ident: str, slot: _Slot) -> Account:
        windows = [
            Window(slot.allowance[i] or self.defaults[i], slot.used[i], slot.reset[i] or None)
            for i in (0, 1)
        ]
        return Account(ident, slot.level.decode() or self.level, _SHAPES[slot.shape],
                       windows[0], windows[1], slot.polls, slot.requests, slot.tokens)


class _Lock:
    """``lockf`` on the block's fd, or nothing for a book of one process."""

    __slots__ = ("fd",)

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)


def _attach(
    dupfd: Any, defaults: tuple[int, int], level: str, clock: Callable[[], float], slots: int
) -> QuotaBook:
    """Unpickle in a spawned child: map the parent's block."""
    return QuotaBook(five_hour_allowance=defaults[0], weekly_allowance=defaults[1], level=level,
                     clock=clock, slots=slots, _fd=dupfd.detach())


# --- the routes ----------------------------------------------------------------------------


def is_quota_route(path: bytes) -> bool:
    """The quota endpoint (any prefix) or its control route; neither is counted as traffic."""
    path = path.rstrip(b"/")
    return path == CONTROL_PATH or path.endswith(QUOTA_PATH)


def handle(request: MockRequest, book: QuotaBook, options: MockOptions) -> ResponsePlan:
    """Answer a request for which :func:`is_quota_route` holds."""
    path = request.target.split(b"?", 1)[0].rstrip(b"/")
    if path == CONTROL_PATH:
        return _control(request, book)
    return _endpoint(request, book, options)


def _native(request: MockRequest, status: int, code: int, msg: str) -> ResponsePlan:
    body = orjson.dumps({"code": code, "msg": msg, "success": False})
    return json_plan(request, status, body)


def _endpoint(request: MockRequest, book: QuotaBook, options: MockOptions) -> ResponsePlan:
    if request.method not in (b"GET", b"HEAD"):
        book.refused()
        plan = _native(request, 405, 405, "method not allowed")
        return replace(plan, headers=(*plan.headers, (b"allow", b"GET, HEAD")))
    key = account_key(request.headers, authorization_only=True)
    if options.api_key is not None and key != options.api_key.encode():
        book.refused()
        msg = "Authorization Token Missing" if key is None else "Authorization Token Invalid"
        return _native(request, 401, 1001, msg)
    try:
        shape = parse_headers(dict(request.headers)).quota_shape
    except ControlError as exc:
        book.refused()
        return _native(request, 400, 400, str(exc))
    account = book.poll(key)
    return _answer(request, shape or account.shape, account, book.clock())


def _answer(request: MockRequest, shape: QuotaShape, account: Account, now: float) -> ResponsePlan:
    if shape is QuotaShape.ERROR:
        return _native(request, 200, 500, "internal error")
    if shape is QuotaShape.MALFORMED:
        return json_plan(request, 200, b'{"code":200,"success":true,"data":{}}')
    if shape is QuotaShape.HTTP500:
        plan = json_plan(request, 500, b"Internal Server Error")
        return replace(plan, headers=((b"content-type", b"text/plain; charset=utf-8"),))
    plan = json_plan(request, 200, quota_body(account, now, shape is QuotaShape.OVERSIZED))
    return replace(plan, first_byte_delay=SLOW_SECONDS) if shape is QuotaShape.SLOW else plan


def quota_body(account: Account, now: float, oversized: bool = False) -> bytes:
    """Z.AI's answer for ``account``; ``oversized`` pads it past :data:`MAX_BODY`."""
    limits: list[dict[str, Any]] = []
    for unit, number, window in ((3, 5, account.five_hour), (6, 1, account.weekly)):
        entry: dict[str, Any] = {"type": "TOKENS_LIMIT", "unit": unit, "number": number,
                                 "percentage": window.percentage}
        if window.reset_at_ms is not None:
            entry["nextResetTime"] = window.reset_at_ms
        limits.append(entry)
    limits.append({
        "type": "TIME_LIMIT", "unit": 5, "number": 1, "usage": _TIME_LIMIT_CALLS,
        "currentValue": 0, "remaining": _TIME_LIMIT_CALLS, "percentage": 0,
        "nextResetTime": _next_month_ms(now), "usageDetails": [],
    })
    doc: dict[str, Any] = {"code": 200, "msg": "Operation successful",
                           "data": {"limits": limits, "level": account.level}, "success": True}
    if oversized:
        # Valid JSON, realistic in shape (a long tool-usage breakdown), > 64 KiB.
        details = [{"modelCode": f"tool-{i:05d}", "usage": 0} for i in range(MAX_BODY // 30)]
        limits[-1]["usageDetails"] = details
    return orjson.dumps(doc)


def _next_month_ms(now: float) -> int:
    """When the monthly TIME_LIMIT resets: the first of next month, UTC."""
    today = dt.datetime.fromtimestamp(now, dt.UTC)
    first = dt.datetime(today.year + today.month // 12, today.month % 12 + 1, 1, tzinfo=dt.UTC)
    return int(first.timestamp()) * 1000


def _control(request: MockRequest, book: QuotaBook) -> ResponsePlan:
    if request.method in (b"GET", b"HEAD"):
        return json_plan(request, 200, orjson.dumps(book.snapshot()))
    if request.method != b"POST":
        message = f"{request.method.decode('latin-1')} not allowed on {CONTROL_PATH.decode()}"
        plan = json_plan(request, 405, payloads.openai_error(405, message))
        return replace(plan, headers=(*plan.headers, (b"allow", b"GET, HEAD, POST")))
    try:
        change = parse_change(request.body)
    except ControlError as exc:
        return json_plan(request, 400, payloads.openai_error(400, str(exc)))
    account = book.change(account_key(request.headers), change)
    return json_plan(request, 200, orjson.dumps({"account": account.id, **account.to_json()}))


_CHANGE_FIELDS: Final = frozenset({"reset", "shape", "level", "five_hour_allowance",
                                   "weekly_allowance", "used", "reset_at_ms"})


def parse_change(body: bytes) -> QuotaChange:
    """A ``POST /mock/quota`` body (an empty body changes nothing); ControlError if bad."""
    try:
        doc = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ControlError(f"/mock/quota body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ControlError("/mock/quota body must be a JSON object")
    unknown = sorted(set(doc) - _CHANGE_FIELDS)
    if unknown:
        raise ControlError(f"/mock/quota: unknown field(s) {', '.join(unknown)}")
    reset = doc.get("reset", False)
    if not isinstance(reset, bool):
        raise ControlError("/mock/quota: reset must be true or false")
    shape = None
    if "shape" in doc:
        try:
            shape = QuotaShape(doc["shape"])
        except ValueError:
            allowed = ", ".join(s.value for s in QuotaShape)
            raise ControlError(f"/mock/quota: shape must be one of {allowed}") from None
    level = doc.get("level")
    if level is not None and not (isinstance(level, str) and QUOTA_LEVEL.fullmatch(level)):
        raise ControlError("/mock/quota: level must be 1 to 24 of [A-Za-z0-9_.-]")
    used = _per_window(doc, "used", nullable=False)
    return QuotaChange(
        reset=reset,
        shape=shape,
        level=level,
        five_hour_allowance=_count(doc, "five_hour_allowance", 1),
        weekly_allowance=_count(doc, "weekly_allowance", 1),
        used=None if used is None else {w: n for w, n in used.items() if n is not None},
        reset_at_ms=_per_window(doc, "reset_at_ms", nullable=True),
    )


def _count(doc: dict[str, Any], name: str, low: int, where: str = "") -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_QUOTA:
        raise ControlError(f"/mock/quota: {where}{name} must be an integer in [{low}, {MAX_QUOTA}]")
    return value


def _per_window(doc: dict[str, Any], name: str, *, nullable: bool) -> dict[str, int | None] | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, dict) or not set(value) <= set(_WINDOWS):
        raise ControlError(f"/mock/quota: {name} must be an object with five_hour and/or weekly")
    parsed: dict[str, int | None] = {}
    for window, raw in value.items():
        if raw is None and not nullable:
            raise ControlError(f"/mock/quota: {name}.{window} must be an integer")
        parsed[window] = None if raw is None else _count(value, window, 0, f"{name}.")
    return parsed
