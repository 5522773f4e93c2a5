"""Notebook widgets: the live topology graph, the plan comparison and the instance monitor.

Importing this package in an IPython kernel registers the widgets as the notebook displays of
topologies, plans and instances (:mod:`exo_lab.ui.display`).
"""

from exo_lab.ui.display import register_display_hooks
from exo_lab.ui.instance_monitor import InstanceMonitor
from exo_lab.ui.plan_comparison import PlanComparison
from exo_lab.ui.topology_widget import TopologyWidget

register_display_hooks()

__all__ = ["InstanceMonitor", "PlanComparison", "TopologyWidget", "register_display_hooks"]
