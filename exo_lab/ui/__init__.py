"""Notebook widgets: the live topology graph, the plan comparison and the instance monitor."""

from exo_lab.ui.instance_monitor import InstanceMonitor
from exo_lab.ui.plan_comparison import PlanComparison
from exo_lab.ui.topology_widget import TopologyWidget

__all__ = ["InstanceMonitor", "PlanComparison", "TopologyWidget"]
