"""Notebook widgets: the live topology graph (and, later, plan comparison)."""

from exo_lab.ui.topology_widget import TopologyWidget

__all__ = ["TopologyWidget"]
