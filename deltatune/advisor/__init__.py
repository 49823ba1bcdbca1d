"""Advisor: plan a run's memory and method before it starts (``plan``), find known mistakes (``doctor``)."""
from deltatune.advisor.doctor import Finding, diagnose_path
from deltatune.advisor.plan import Plan, plan

__all__ = ["Finding", "Plan", "diagnose_path", "plan"]
