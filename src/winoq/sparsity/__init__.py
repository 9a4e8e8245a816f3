"""Hardware-aware sparsity search for dataflow accelerators (HASS, Yu et al., FPL 2024).

``thresholds`` applies per-layer weight / activation thresholds with fixed-point quantization and
measures the sparsity they give; ``accelerator`` models a layer-pipelined FPGA accelerator with
sparse conv engines and allocates its resources; ``search`` runs the hardware-aware TPE search
and its baselines; ``plots`` draws Pareto fronts and per-layer bars.
"""
from .accelerator import PLATFORMS, Design, Folding, LayerSpec, Platform, allocate, get_platform, map_model
from .search import (Problem, Record, SearchSpace, StudyConfig, allocate_best, best_under_drop, greedy_search,
                     hass_search, pareto, refine, run_study, uniform_search, unaware_search)
from .thresholds import Evaluation, Evaluator, LayerStats, SparsityConfig

__all__ = ["PLATFORMS", "Design", "Folding", "LayerSpec", "Platform", "allocate", "get_platform", "map_model",
           "Problem", "Record", "SearchSpace", "StudyConfig", "allocate_best", "best_under_drop", "greedy_search",
           "hass_search", "pareto", "refine", "run_study", "uniform_search", "unaware_search",
           "Evaluation", "Evaluator", "LayerStats", "SparsityConfig"]
