"""Prefetch: predictions in, moves out. ``planner`` holds the pure planners (``plan_prefetch``,
``plan_demand``) that turn a residency snapshot and scores into frozen plans; the prefetcher that
drives ``tiermem.transfer`` with those plans sits beside it.
"""

from tiermem.prefetch.planner import DemandPlan, PrefetchBudget, PrefetchPlan, plan_demand, plan_prefetch

__all__ = ["DemandPlan", "PrefetchBudget", "PrefetchPlan", "plan_demand", "plan_prefetch"]
