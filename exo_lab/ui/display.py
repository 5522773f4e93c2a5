"""Notebook displays of exo_lab's data classes, registered with IPython by type name.

The data classes (:class:`~exo_lab.Topology`, :class:`~exo_lab.placement.Plans`,
:class:`~exo_lab.instance.Instance`) know nothing of widgets: they render as text and HTML
tables. Importing :mod:`exo_lab.ui` in an IPython kernel (``import exo_lab`` does it there)
registers these widget displays with the shell's mime-bundle formatter; each falls back to
the tables outside a widget kernel (a hook returning None).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exo_lab.ui.instance_monitor import instance_mimebundle
from exo_lab.ui.plan_comparison import plans_mimebundle
from exo_lab.ui.topology_widget import topology_mimebundle
from exo_lab.ui.trace_view import trace_mimebundle

#: (module, class name, display function); by name, so no class is imported to register it
HOOKS: tuple[tuple[str, str, Callable[..., Any]], ...] = (
    ("exo_lab.cluster.topology", "Topology", topology_mimebundle),
    ("exo_lab.placement.plan", "Plans", plans_mimebundle),
    ("exo_lab.instance", "Instance", instance_mimebundle),
    ("exo_lab.engine.trace", "Trace", trace_mimebundle),
)


def register_display_hooks(formatter: Any = None) -> bool:
    """Register the widget displays with an IPython ``DisplayFormatter`` (default: the running shell's);
    False when there is none."""
    if formatter is None:
        try:
            from IPython import get_ipython  # optional: only a notebook or IPython has a shell
        except ImportError:
            return False
        shell = get_ipython()
        if shell is None:
            return False
        formatter = shell.display_formatter
    for module, name, hook in HOOKS:
        formatter.mimebundle_formatter.for_type_by_name(module, name, hook)
    return True
