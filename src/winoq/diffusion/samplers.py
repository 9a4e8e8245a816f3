"""Seeded, reproducible DDPM / DDIM samplers with classifier-free guidance, and a
calibration-input sampler (uniform over timesteps, Q-Diffusion style).

Reproducibility: sample ``i`` draws all its noise (x_T and, for stochastic
samplers, every step's noise) from its own ``torch.Generator`` seeded with
``seeds[i]``, so a sample depends only on its seed and label, never on the batch
it was computed in or on how samples were sharded across processes. Quantized
winoq layers use per-sample activation scales, so this holds for quantized
UNets too.

``model(x, t, y)`` must return the predicted noise (``DDPMUNet`` does; wrap
diffusers UNets with :func:`winoq.diffusion.diffusers_support.eps_model`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .schedule import NoiseSchedule

__all__ = ["sample", "ddim_sample", "ddpm_sample", "guided_eps", "ddim_timesteps",
           "CalibrationSet", "calibration_inputs", "q_sample_calibration"]


def ddim_timesteps(num_train_steps: int, steps: int) -> torch.Tensor:
    """``steps`` timesteps evenly spaced from T-1 down to 0 (descending, int64)."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in 1..{num_train_steps}, got {steps}")
    return torch.linspace(num_train_steps - 1, 0, steps, dtype=torch.float64).round().long()


def guided_eps(model: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
               guidance_scale: float = 1.0, null_label: int | None = None) -> torch.Tensor:
    """eps(x, t, y), with classifier-free guidance eps_u + s (eps_c - eps_u) when
    ``y`` is given and ``guidance_scale != 1`` (one batched call of 2N)."""
    if y is None or guidance_scale == 1.0:
        return model(x, t, y)
    if null_label is None:
        raise ValueError("classifier-free guidance needs the null label (the model's num_classes)")
    null = torch.full_like(y, null_label)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    eps_c, eps_u = eps.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _randn(gens: list[torch.Generator], shape) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


def _null_label(model) -> int | None:
    nc = getattr(model, "num_classes", None)
    return int(nc) if nc else None


@torch.no_grad()
def _run_batch(model, schedule: NoiseSchedule, gens, shape, y, timesteps, eta, guidance_scale,
               clip, ancestral, record, device, dtype):
    x = _randn(gens, shape).to(device=device, dtype=dtype)
    null = _null_label(model)
    traj = []
    for i, t in enumerate(timesteps.tolist()):
        t_prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        if record:
            traj.append((x.detach().cpu().clone(), t))
        eps = guided_eps(model, x, tt, y, guidance_scale, null).to(torch.float64)
        xd = x.to(torch.float64)
        ab, ab_prev = float(schedule.abar(t)), float(schedule.abar(t_prev))
        x0 = (xd - (1 - ab) ** 0.5 * eps) / ab ** 0.5
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (xd - ab ** 0.5 * x0) / (1 - ab) ** 0.5
        if ancestral:
            # posterior q(x_prev | x_t, x0) of the (respaced) forward process, "fixed small" variance
            beta = 1 - ab / ab_prev
            mean = (ab_prev ** 0.5 * beta / (1 - ab)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab)) * xd
            var = beta * (1 - ab_prev) / (1 - ab)
            x_new = mean
            if t_prev >= 0:
                x_new = mean + var ** 0.5 * _randn(gens, shape).to(torch.float64).to(device)
        else:
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
            x_new = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
            if sigma > 0 and t_prev >= 0:
                x_new = x_new + sigma * _randn(gens, shape).to(torch.float64).to(device)
        x = x_new.to(dtype)
    return x, traj


def sample(model, schedule: NoiseSchedule, seeds: Sequence[int], *, shape=(1, 28, 28), method: str = "ddim",
           steps: int = 50, eta: float = 0.0, labels: Sequence[int] | torch.Tensor | None = None,
           guidance_scale: float = 1.0, clip: bool = True, batch_size: int = 64, record: bool = False,
           device=None, dtype=torch.float32, progress: bool = False):
    """Generate ``len(seeds)`` samples (``[N, *shape]`` in the model's data range, [-1, 1]).

    method: "ddim" (``steps`` evenly spaced timesteps, ``eta`` = 0 deterministic,
    1 = DDPM posterior variance) or "ddpm" (ancestral sampling on the same
    respaced timesteps; ``steps=T`` is the original DDPM sampler).
    labels: class per sample for conditional UNets (None: unconditional / null class).
    guidance_scale: classifier-free guidance weight (1: plain conditional).
    record: also return the trajectory, a list of ``(x_t [N, *shape], t)`` per step.
    """
    if method not in ("ddim", "ddpm"):
        raise ValueError(f"method {method!r} unknown; use 'ddim' or 'ddpm'")
    if eta < 0:
        raise ValueError("eta must be >= 0")
    seeds = [int(s) for s in seeds]
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (len(seeds),):
            raise ValueError(f"labels must have one entry per seed ({len(seeds)}), got shape {tuple(labels.shape)}")
        if _null_label(model) is None:
            raise ValueError("labels were given but the model is unconditional (no num_classes)")
    if guidance_scale != 1.0 and labels is None:
        raise ValueError("guidance_scale != 1 needs labels (classifier-free guidance of a conditional model)")
    if device is None:
        param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    timesteps = ddim_timesteps(schedule.num_steps, steps)
    outs, trajs = [], []
    it = range(0, len(seeds), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"{method} {steps} steps", unit="batch")
    for s in it:
        gens = _generators(seeds[s:s + batch_size])
        y = None if labels is None else labels[s:s + batch_size].to(device)
        x, traj = _run_batch(model, schedule, gens, shape, y, timesteps, eta, guidance_scale, clip,
                             method == "ddpm", record, device, dtype)
        outs.append(x.cpu())
        trajs.append(traj)
    if not outs:
        empty = torch.empty((0, *shape), dtype=dtype)
        return (empty, []) if record else empty
    x = torch.cat(outs)
    if not record:
        return x
    traj = [(torch.cat([tr[k][0] for tr in trajs]), trajs[0][k][1]) for k in range(len(timesteps))]
    return x, traj


def ddim_sample(model, schedule, seeds, steps: int = 50, eta: float = 0.0, **kw):
    return sample(model, schedule, seeds, method="ddim", steps=steps, eta=eta, **kw)


def ddpm_sample(model, schedule, seeds, steps: int | None = None, **kw):
    return sample(model, schedule, seeds, method="ddpm", steps=steps or schedule.num_steps, **kw)


# ----------------------------------------------------------------------------- calibration inputs
@dataclass
class CalibrationSet:
    """UNet inputs for calibration: ``x`` [N, C, H, W], ``t`` [N] (int64), ``y`` [N] or None."""
    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor | None

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size: int = 64):
        """Yields ``(x, t, y)`` tuples (call the UNet as ``model(*batch)``)."""
        for i in range(0, len(self.x), batch_size):
            yield (self.x[i:i + batch_size], self.t[i:i + batch_size],
                   None if self.y is None else self.y[i:i + batch_size])


def calibration_inputs(model, schedule: NoiseSchedule, num_samples: int = 256, *, seed: int = 0,
                       steps: int = 50, num_trajectories: int | None = None, shape=(1, 28, 28),
                       num_classes: int | None = None, guidance_scale: float = 1.0,
                       batch_size: int = 64) -> CalibrationSet:
    """Data-free calibration inputs (Q-Diffusion): run the full-precision DDIM sampler
    from ``num_trajectories`` seeded noises and keep ``num_samples`` intermediate
    ``(x_t, t)`` pairs spread uniformly over the ``steps`` timesteps (every timestep
    gets ``num_samples // steps`` or one more, drawn from random trajectories).
    Conditional models get uniformly random labels (if ``num_classes``)."""
    gen = torch.Generator().manual_seed(seed)
    n_traj = num_trajectories or max(1, min(num_samples, 64))
    seeds = torch.randint(0, 2 ** 31 - 1, (n_traj,), generator=gen).tolist()
    labels = None
    nc = num_classes if num_classes is not None else _null_label(model)
    if nc:
        labels = torch.randint(0, nc, (n_traj,), generator=gen)
    _, traj = sample(model, schedule, seeds, shape=shape, steps=steps, labels=labels,
                     guidance_scale=guidance_scale, batch_size=batch_size, record=True)
    # step k gets samples with global index j where j % steps == k: uniform over timesteps
    step_of = torch.arange(num_samples) % steps
    step_of = step_of[torch.randperm(num_samples, generator=gen)]
    which = torch.randint(0, n_traj, (num_samples,), generator=gen)
    xs = torch.stack([traj[int(k)][0][int(j)] for k, j in zip(step_of, which)])
    ts = torch.tensor([traj[int(k)][1] for k in step_of], dtype=torch.long)
    ys = None if labels is None else labels[which]
    return CalibrationSet(xs, ts, ys)


def q_sample_calibration(x0: torch.Tensor, schedule: NoiseSchedule, num_samples: int = 256, *, seed: int = 0,
                         labels: torch.Tensor | None = None) -> CalibrationSet:
    """Calibration inputs from data: x_t ~ q(x_t | x0) with t uniform over all T timesteps."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x0), (num_samples,), generator=gen)
    t = torch.randint(0, schedule.num_steps, (num_samples,), generator=gen)
    noise = torch.randn((num_samples, *x0.shape[1:]), generator=gen)
    xt = schedule.q_sample(x0[idx].float(), t, noise)
    return CalibrationSet(xt, t, None if labels is None else torch.as_tensor(labels)[idx])
