"""Hessian-aware mixed precision (HAWQ-V3): Hutchinson traces, sensitivities, an exact ILP."""
from .ilp import solve_ilp

__all__ = ["solve_ilp"]
