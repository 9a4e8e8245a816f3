"""Hessian-aware mixed precision (HAWQ-V3): Hutchinson traces, sensitivities, an exact ILP,
Fisher traces, a model-level planner and the joint Winograd tile + bits choice."""
from .hessian import TraceEstimate, activation_traces, fisher_traces, hutchinson_traces, sensitivities, weight_error
from .ilp import solve_ilp
from .planner import Plan, PlanConfig, cost_tables, model_layers, plan_bits

__all__ = ["solve_ilp", "TraceEstimate", "activation_traces", "fisher_traces", "hutchinson_traces", "sensitivities",
           "weight_error", "Plan", "PlanConfig", "cost_tables", "model_layers", "plan_bits"]
