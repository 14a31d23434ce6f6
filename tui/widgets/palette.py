"""Colours for the views' roles, one palette per theme brightness.

Fixed palettes rather than theme variables: the built-in themes give
``accent`` and ``warning`` the same colour, and a plot with 2xx/4xx/429/5xx or
p50/p95/p99 overlaid needs four colours that stay apart on a dark and on a
light background.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text

DARK: dict[str, str] = {
    "2xx": "#4EBF71", "4xx": "#E5C07B", "429": "#C678DD", "5xx": "#FF5F6D",
    "p50": "#4EBF71", "p95": "#E5C07B", "p99": "#FF5F6D",
    "in": "#61AFEF", "out": "#4EBF71", "cost": "#E5C07B",
    "in_flight": "#61AFEF", "limit": "#FF5F6D",
    "production": "#61AFEF", "canary": "#FFA94D", "variant-2": "#56B6C2", "variant-3": "#C678DD",
    "ok": "#4EBF71", "warn": "#E5C07B", "error": "#FF5F6D", "accent": "#61AFEF",
}
LIGHT: dict[str, str] = {
    "2xx": "#1A7F37", "4xx": "#9A6700", "429": "#8250DF", "5xx": "#CF222E",
    "p50": "#1A7F37", "p95": "#9A6700", "p99": "#CF222E",
    "in": "#0969DA", "out": "#1A7F37", "cost": "#7D4E00",
    "in_flight": "#0969DA", "limit": "#CF222E",
    "production": "#0969DA", "canary": "#BC4C00", "variant-2": "#1B7C83", "variant-3": "#8250DF",
    "ok": "#1A7F37", "warn": "#9A6700", "error": "#CF222E", "accent": "#0969DA",
}


def color(role: str | None, dark: bool) -> str | None:
    if role is None or role == "muted":
        return None
    return (DARK if dark else LIGHT).get(role)


def style(role: str | None, dark: bool) -> Style:
    if role == "muted":
        return Style(dim=True)
    c = color(role, dark)
    return Style(color=c) if c else Style()


def segments(parts: list[tuple[str, str | None]] | tuple[tuple[str, str | None], ...],
             dark: bool) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    for chunk, role in parts:
        text.append(chunk, style(role, dark))
    return text
