"""The dashboard's look: colours, the page's CSS, cards and HTML panes shared by every section."""

from __future__ import annotations

import html
from typing import Any

import panel as pn

GIB = 1024**3
ACCENT = "#1976d2"
OK, WARN, CRIT = "#2e9d4f", "#e58a00", "#d32f2f"
FG, FG2, FG3, BORDER, BG2 = "#1f2328", "#59636e", "#8b949e", "#d8dee4", "#f6f8fa"
SERIES = ("#1e88e5", "#d81b60", "#43a047", "#f4511e", "#8e24aa", "#00897b", "#6d4c41", "#3949ab")

PAGE_CSS = """
body { background: #f3f5f8; margin: 0; }
.bk-root, body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
"""

CARD = {
    "background": "#ffffff",
    "border": f"1px solid {BORDER}",
    "border-radius": "10px",
    "padding": "6px 16px 14px",
    "box-shadow": "0 1px 2px rgba(31,35,40,0.04)",
}

HTML_CSS = f"""
:host {{ font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: {FG}; }}
.exo-card-title {{ font-size: 15px; font-weight: 600; margin: 6px 0 0; display: flex; gap: 10px; align-items: baseline; }}
.exo-card-sub {{ font-size: 12px; font-weight: 400; color: {FG2}; }}
.exo-hint {{ color: {FG3}; font-size: 12px; font-style: italic; }}
.exo-note {{ color: {FG2}; font-size: 12.5px; line-height: 1.45; }}
.exo-note code, .exo-hint code {{ font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 11.5px;
  background: {BG2}; border: 1px solid {BORDER}; border-radius: 4px; padding: 0 4px; font-style: normal; }}
.exo-error {{ color: {CRIT}; font-size: 12.5px; background: color-mix(in srgb, {CRIT} 8%, white);
  border: 1px solid color-mix(in srgb, {CRIT} 30%, white); border-radius: 6px; padding: 6px 10px; }}
.exo-ok {{ color: {OK}; }}
"""


def gib(n: float) -> str:
    """Bytes as GiB for labels: no decimals from 10 GiB up."""
    v = (n or 0) / GIB
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def card_title(title: str, sub: str = "") -> str:
    """A card's heading, with a muted subtitle."""
    return f"<div class='exo-card-title'>{html.escape(title)}<span class='exo-card-sub'>{html.escape(sub)}</span></div>"


def html_pane(text: str = "", **kwargs: Any) -> pn.pane.HTML:
    """An HTML pane styled for notes, hints and errors (``exo-note``, ``exo-hint``, ``exo-error``)."""
    return pn.pane.HTML(text, stylesheets=[HTML_CSS], margin=(0, 0), **kwargs)


def card(*objs: Any, **kwargs: Any) -> pn.Column:
    """A white card on the page's grey background."""
    return pn.Column(*objs, styles=CARD, sizing_mode="stretch_width", margin=(8, 8), **kwargs)
