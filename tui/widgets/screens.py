"""Modal screens: the help overlay and the admin-token prompt."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Static

PANELS_HELP = (
    ("Status line", "connection (reconnects with backoff), STALE when the newest snapshot is "
                    "older than 3 intervals, a variant DOWN / STALE n/m when a collector's "
                    "targets of it stopped answering, variant and range shown, req/s, 5xx %, "
                    "and when they happen the proxy's refusals, Z.AI 429s and other 4xx as "
                    "shares of requests, p50, tokens/s, in-flight/max; ⚠ ADMIN API OPEN when "
                    "the proxy listens beyond loopback without an admin token, ⚠ LIMITS: "
                    "REDIS UNREACHABLE while the fleet's limits fall back"),
    ("Requests/s", "by status class (2xx, 4xx, 429, 5xx); in both mode: req/s per variant"),
    ("Latency / TTFT", "p50/p95/p99 of the whole request and of the first token"),
    ("Tokens/s, cost", "throughput in/out and the estimated cost, with totals over the range"),
    ("Concurrency", "requests in flight against the configured limit"),
    ("Limiter & quotas", "the adaptive upstream rate and every proxy-wide limit"),
    ("Errors & retries", "by class and Z.AI code; counts over the range"),
    ("Keys", "per client key: requests, refused / 4xx / 5xx, tokens, the quota it has least "
             "of (its colour: the key's state; s or click to sort)"),
)


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; max-width: 100; height: auto; max-height: 90%;
                                  border: round $primary; background: $surface; padding: 0 1; }
    """
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self._shown = bindings

    def compose(self) -> ComposeResult:
        keys = Table.grid(padding=(0, 2))
        keys.add_column(style="bold", no_wrap=True)
        keys.add_column()
        for key, what in self._shown:
            keys.add_row(key, what)
        panels = Table.grid(padding=(0, 2))
        panels.add_column(style="bold", no_wrap=True)
        panels.add_column()
        for name, what in PANELS_HELP:
            panels.add_row(name, what)
        with VerticalScroll():
            yield Static(Text("Keys", style="bold underline"))
            yield Static(keys)
            yield Static(Text("Panels", style="bold underline"))
            yield Static(panels)
            yield Static(Text("esc closes · ↑↓ scroll", style="dim"))


class TokenScreen(ModalScreen[str | None]):
    """Asks for the admin token after a 401; the token is never shown or logged."""

    DEFAULT_CSS = """
    TokenScreen { align: center middle; }
    TokenScreen > Vertical { width: 70; max-width: 95%; height: auto; border: round $error;
                             background: $surface; padding: 0 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, url: str, message: str) -> None:
        super().__init__()
        self._url, self._message = url, message

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(f"{self._url} needs the admin token", style="bold"))
            yield Static(Text(self._message, style="dim"))
            yield Input(placeholder="admin token (ZAIPROXY_ADMIN_TOKEN)", password=True,
                        id="token")
            yield Static(Text("enter to connect · esc to cancel", style="dim"))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
