"""Sharded sample generation and metrics with ``torch.distributed``.

Each rank generates the samples of its contiguous slice of the seed list (samples
depend only on their seed and label, see :mod:`winoq.diffusion.samplers`), the
slices are gathered in seed order on every rank, so the result equals the
single-process result. Works with any backend; CPU runs use gloo. When
``torch.distributed`` is not initialized the functions run in-process (world size 1).

:func:`spawn_sharded` runs a function on ``world_size`` local CPU processes (gloo,
``file://`` rendezvous) and returns rank 0's result, for tests and single-machine runs.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .samplers import sample

__all__ = ["rank_world", "shard_bounds", "gather_rows", "sharded_sample", "sharded_fd_proxy",
           "sharded_eps_sqnr", "spawn_sharded"]


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous [start, stop) of ``n`` items for ``rank`` (the first ``n % world`` ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather_rows(local: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate every rank's rows (rank order) on every rank. Ranks may hold
    different row counts (from :func:`shard_bounds`); the rest of the shape must agree."""
    rank, world = rank_world()
    if world == 1:
        return local
    sizes = [shard_bounds(n_total, world, r) for r in range(world)]
    rows = max(b - a for a, b in sizes)
    padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype)
    padded[:len(local)] = local.cpu()
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded)
    return torch.cat([buf[:b - a] for buf, (a, b) in zip(bufs, sizes)])


def sharded_sample(model, schedule, seeds: Sequence[int], *, labels=None, **kwargs) -> torch.Tensor:
    """``samplers.sample`` with the seeds split across ranks; every rank returns all samples."""
    rank, world = rank_world()
    seeds = list(seeds)
    a, b = shard_bounds(len(seeds), world, rank)
    lab = None if labels is None else torch.as_tensor(labels)[a:b]
    local = sample(model, schedule, seeds[a:b], labels=lab, **kwargs)
    return gather_rows(local, len(seeds))


def sharded_fd_proxy(model_a, model_b, schedule, seeds_a: Sequence[int], seeds_b: Sequence[int], *,
                     labels_a=None, labels_b=None, classifier=None, **kwargs) -> float:
    """FD-proxy between the samples of ``model_a`` (seeds_a) and ``model_b`` (seeds_b):
    samples and classifier features are computed on each rank's shard, features gathered."""
    from .metrics import FDProxy, frechet_distance, gaussian_stats

    rank, world = rank_world()
    fd = FDProxy(classifier)
    feats = []
    for model, seeds, labels in ((model_a, list(seeds_a), labels_a), (model_b, list(seeds_b), labels_b)):
        a, b = shard_bounds(len(seeds), world, rank)
        lab = None if labels is None else torch.as_tensor(labels)[a:b]
        local = fd.features(sample(model, schedule, seeds[a:b], labels=lab, **kwargs))
        feats.append(gather_rows(local.double(), len(seeds)))
    return frechet_distance(*gaussian_stats(feats[0]), *gaussian_stats(feats[1]))


def sharded_eps_sqnr(fp_model, q_model, schedule, seeds: Sequence[int], *, labels=None, steps: int = 50,
                     shape=(1, 28, 28), batch_size: int = 64) -> dict[int, float]:
    """Per-timestep noise-prediction SQNR with the seeds split across ranks (the signal
    and error energies are summed over ranks, so the result equals the 1-process one)."""
    from .samplers import sample as _sample

    rank, world = rank_world()
    seeds = list(seeds)
    a, b = shard_bounds(len(seeds), world, rank)
    lab = None if labels is None else torch.as_tensor(labels, dtype=torch.long)[a:b]
    _, traj = _sample(fp_model, schedule, seeds[a:b], shape=shape, steps=steps, labels=lab,
                      batch_size=batch_size, record=True)
    energies = []
    with torch.no_grad():
        for x_t, t in traj:
            sig = err = 0.0
            for i in range(0, len(x_t), batch_size):
                xb = x_t[i:i + batch_size]
                tb = torch.full((len(xb),), t, dtype=torch.long)
                yb = None if lab is None else lab[i:i + batch_size]
                ref = fp_model(xb, tb, yb).double()
                got = q_model(xb, tb, yb).double()
                sig += float(ref.pow(2).sum())
                err += float((got - ref).pow(2).sum())
            energies.append((int(t), sig, err))
    e = torch.tensor([[s, r] for _, s, r in energies], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(e)
    import math
    return {t: -10 * math.log10(max(float(e[k, 1] / max(float(e[k, 0]), 1e-300)), 1e-30))
            for k, (t, _, _) in enumerate(energies)}


def _worker(rank: int, world: int, init_file: str, out_file: str, fn: Callable, args: tuple, kwargs: dict,
            threads: int):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(*args, **kwargs)
        if rank == 0:
            with open(out_file, "wb") as f:
                pickle.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_sharded(fn: Callable, args: tuple = (), kwargs: dict | None = None, world_size: int = 2,
                  threads_per_rank: int = 1):
    """Run ``fn(*args, **kwargs)`` on ``world_size`` local processes joined in a gloo process
    group and return rank 0's result. ``fn`` must be importable (module level) and
    ``args`` / ``kwargs`` picklable (models are copied into each process)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="winoq-dist-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        out_file = os.path.join(tmp, "result.pkl")
        mp.spawn(_worker, args=(world_size, init_file, out_file, fn, tuple(args), dict(kwargs or {}), threads_per_rank),
                 nprocs=world_size, join=True)
        with open(out_file, "rb") as f:
            return pickle.load(f)
