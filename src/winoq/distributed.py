"""Data-free calibration sharded over processes with ``torch.distributed``.

The data-free scale learning of one Winograd layer (``winoq.winograd.scales.learn_layer_scales``)
depends only on that layer and its seed (``recipe.seed + index``), never on the other layers.
So ``quantize`` can run on N processes joined in a process group: each rank learns a
deterministic subset of the layers (:func:`assign_layers`, balanced by an estimate of each
layer's cost), then every rank receives every layer's learned scales and report entry
(:func:`share_learned_scales`), so all ranks end with identical models, bit for bit equal to
the single-process result (same seeds, same arithmetic; compare at equal thread counts).

Entry points:

* :func:`quantize_sharded` ``(model, recipe, procs=N)``: spawns N local CPU processes (gloo,
  the launcher of :mod:`winoq.diffusion.distributed`) and returns the quantized model; inside an
  existing process group (e.g. launched by ``torchrun``) call it on every rank with
  ``procs=None``.
* :func:`sharded_calibration`: a context in which ``winoq.quantize`` shards its data-free scale
  learning over the current process group (every rank must call ``quantize`` with the same
  model and recipe).

Only the per-layer data-free learning (``scales="learned"``, ``shared_scales=False``) is sharded;
the other steps (module swap, calibration-data steps) run on every rank as in one process.
"""
from __future__ import annotations

import contextlib
import contextvars
import heapq

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["layer_cost", "assign_layers", "sharded_calibration", "shard", "share_learned_scales",
           "quantize_sharded"]

_SHARDING = contextvars.ContextVar("winoq_sharded_calibration", default=False)


def layer_cost(layer, max_out_channels: int | None) -> float:
    """Relative cost of learning one layer's scales: the transformed weights and the Hadamard
    products (n^2 taps x in x out channels learned on) plus the input transform (n^4 x in)."""
    n = layer.tc.n
    cout = layer.out_channels
    if max_out_channels is not None and layer.groups == 1:
        cout = min(cout, max_out_channels)
    return float(n * n * (layer.in_channels // layer.groups) * cout + n ** 4 * layer.in_channels)


def assign_layers(costs: list[float], world: int) -> list[int]:
    """Owner rank of each layer: longest first to the least loaded rank (ties: lower index, lower
    rank), so the assignment depends only on the costs and the world size."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    owners = [0] * len(costs)
    loads = [(0.0, r) for r in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


@contextlib.contextmanager
def sharded_calibration():
    """Within this block ``winoq.quantize`` shards its per-layer data-free scale learning over
    the initialized process group (no effect without one)."""
    token = _SHARDING.set(True)
    try:
        yield
    finally:
        _SHARDING.reset(token)


def shard() -> tuple[int, int]:
    """(rank, world size) the calibration shards over: the process group's inside
    :func:`sharded_calibration`, else (0, 1)."""
    if _SHARDING.get() and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_learned_scales(layers: list[nn.Module], infos: dict[int, dict]) -> dict[int, dict]:
    """Give every rank every layer's learned log-scales and report entry. ``infos`` holds this
    rank's layers (index -> calibration dict); returns all of them. The log-scale tensors travel
    as they are (pickled), so every rank holds exactly the owner's values."""
    _, world = shard()
    if world == 1:
        return infos
    mine = {i: (layers[i].log_sb.detach().clone(), layers[i].log_sg.detach().clone(), info)
            for i, info in infos.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    out = {}
    for part in gathered:
        for i, (log_sb, log_sg, info) in part.items():
            with torch.no_grad():
                layers[i].log_sb.copy_(log_sb)
                layers[i].log_sg.copy_(log_sg)
            out[i] = info
    if sorted(out) != list(range(len(layers))):
        raise RuntimeError(f"sharded calibration: {len(layers) - len(out)} layers learned by no rank "
                           "(every rank must call quantize with the same model and recipe)")
    return out


def _quantize_in_group(model, recipe, kwargs):
    from .api import quantize

    with sharded_calibration():
        return quantize(model, recipe, **kwargs)


def quantize_sharded(model: nn.Module, recipe=None, *, procs: int | None = 2, threads_per_rank: int = 1,
                     **kwargs) -> nn.Module:
    """``winoq.quantize`` with the per-layer data-free scale learning spread over ``procs`` local
    processes (gloo); the result equals the one-process result at the same thread count.
    ``procs=None``: run in the already initialized process group (call it on every rank).
    ``kwargs`` go to ``quantize`` (``calib_data``, ``progress``); model and data are copied into
    each process, so they must be picklable."""
    if procs is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("procs=None shards over an initialized process group and none is; pass procs=N "
                             "to start N local processes")
        return _quantize_in_group(model, recipe, kwargs)
    if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
        raise ValueError(f"procs must be a positive int (local processes) or None, got {procs!r}")
    if procs == 1:
        from .api import quantize

        return quantize(model, recipe, **kwargs)
    from .diffusion.distributed import spawn_sharded

    kwargs.setdefault("progress", False)
    return spawn_sharded(_quantize_in_group, (model, recipe, kwargs), world_size=procs,
                         threads_per_rank=threads_per_rank)
