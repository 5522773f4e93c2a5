"""What a notebook shows for an object: IPython's own display formatter, with exo_lab.ui's hooks."""

from __future__ import annotations

from typing import Any

from IPython.core.formatters import DisplayFormatter

from exo_lab.ui.display import register_display_hooks


def notebook_display(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data, metadata) as IPython formats ``obj`` for a notebook once ``exo_lab.ui`` is imported."""
    formatter = DisplayFormatter()
    assert register_display_hooks(formatter)
    return formatter.format(obj)
