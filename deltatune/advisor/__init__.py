"""Advisor: plan a run's memory and method before it starts (``plan``), find known mistakes (``doctor``)."""
from deltatune.advisor.plan import Plan, plan

__all__ = ["Plan", "plan"]
