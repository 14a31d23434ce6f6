"""Messages the app routes (named in the past tense: they report what happened)."""

from __future__ import annotations

from textual.message import Message

from zaiproxy_tui.model import History, KeysReport
from zaiproxy_tui.source import FeedEvent


class FeedReported(Message):
    """The live feed connected, sent a snapshot, lost the connection or needs a token."""

    def __init__(self, event: FeedEvent) -> None:
        super().__init__()
        self.event = event


class HistoryLoaded(Message):
    def __init__(self, history: History) -> None:
        super().__init__()
        self.history = history


class HistoryFailed(Message):
    def __init__(self, range_: str, message: str) -> None:
        super().__init__()
        self.range, self.message = range_, message


class KeysLoaded(Message):
    def __init__(self, report: KeysReport) -> None:
        super().__init__()
        self.report = report


class KeysFailed(Message):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
