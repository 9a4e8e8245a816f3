"""Noise schedules of a discrete-time DDPM (T steps, epsilon prediction).

``NoiseSchedule`` holds betas and the derived alpha-bar products in float64 (the
sampler arithmetic runs in float64 scalars and casts per step, so schedules give
identical samples regardless of the UNet's dtype).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["NoiseSchedule", "linear_betas", "cosine_betas", "make_schedule"]


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020): betas linear in t, scaled so ``num_steps=1000`` gives 1e-4..0.02."""
    scale = 1000.0 / num_steps
    return torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2)."""
    def abar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    betas: torch.Tensor  # [T] float64

    def __post_init__(self):
        b = self.betas
        if b.ndim != 1 or len(b) < 1 or not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1)")

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, 0)

    def abar(self, t) -> torch.Tensor:
        """alpha_bar at integer timesteps t (tensor); t = -1 gives 1 (the clean image)."""
        ac = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return ac[torch.as_tensor(t).long() + 1]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t [N] integer timesteps."""
        ab = self.abar(t).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def make_schedule(kind: str = "linear", num_steps: int = 1000, **kwargs) -> NoiseSchedule:
    if kind == "linear":
        return NoiseSchedule(linear_betas(num_steps, **kwargs))
    if kind == "cosine":
        return NoiseSchedule(cosine_betas(num_steps, **kwargs))
    raise ValueError(f"schedule {kind!r} unknown; use 'linear' or 'cosine'")
