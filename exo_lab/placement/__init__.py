"""Placement: plans, the cost model and the planner (pure: no I/O, no clocks)."""

from exo_lab.placement.plan import Plan, Plans, RankSpec
from exo_lab.placement.planner import plan

__all__ = ["Plan", "Plans", "RankSpec", "plan"]
