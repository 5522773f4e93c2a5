"""Notebook widgets: the live topology graph and the plan comparison."""

from exo_lab.ui.plan_comparison import PlanComparison
from exo_lab.ui.topology_widget import TopologyWidget

__all__ = ["PlanComparison", "TopologyWidget"]
