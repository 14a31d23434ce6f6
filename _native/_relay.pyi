# Stubs for the Cython module zaiproxy._native._relay (built from _native/_relay.pyx). Its
# pure-Python twin is zaiproxy.request.usage.UsageTracker (with UsageChunkStripper);
# zaiproxy.request.scanner chooses between them.
from collections.abc import Callable
from typing import Final, Protocol

from typing_extensions import Buffer

IMPLEMENTATION: Final[str]
OPENAI: Final[int]
ANTHROPIC: Final[int]
HOLD: Final[int]
FINAL: Final[int]
ERROR: Final[int]

class Acct(Protocol):
    """What the scanner calls for the events that can carry usage (usage.Accounting)."""

    def openai_event(self, data: bytes, has_usage: bool, has_error: bool) -> int: ...
    def anthropic_start(self, data: bytes) -> None: ...
    def anthropic_delta(self, data: bytes) -> bool: ...
    def flush_raw(self, raw: bytes) -> None: ...

class Scanner:
    def __init__(
        self,
        api: int,
        acct: Acct,
        *,
        collect: bool = True,
        max_pending: int = 262144,
        strip: bool = False,
        is_usage_chunk: Callable[[bytes], bool] | None = None,
        max_line: int = 1048576,
        max_event: int | None = None,
        max_strip_event: int = 8192,
    ) -> None: ...
    @property
    def events(self) -> int: ...
    @property
    def done(self) -> bool: ...
    @property
    def error(self) -> bool: ...
    @property
    def held_chars(self) -> int: ...
    @property
    def held_events(self) -> int: ...
    @property
    def stripped(self) -> int: ...
    @property
    def at_event_boundary(self) -> bool: ...
    @property
    def overflowed(self) -> bool: ...
    @property
    def collecting(self) -> bool: ...
    def feed(self, data: Buffer) -> bytes: ...
    def close(self) -> bytes: ...
    def take_held(self) -> bytes: ...
