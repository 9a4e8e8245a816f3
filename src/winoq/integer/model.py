"""``IntegerModel``: a straight-line program of integer steps between one input quantization
and one dequantization of the output."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LayerInfo:
    """What the converter did with one conv / linear (for reports and cost models)."""

    name: str
    kind: str            # "conv" or "linear"
    weight_bits: int
    act_bits: int        # bits of its input activation
    macs: int            # multiply-accumulates per sample
    params: int
    bn_folded: bool
    wide_accumulator: bool
    algorithm: str = "direct"   # or "F(m,3)": integer Winograd (macs then counts its multiplications)


class IntegerModel(nn.Module):
    """Integer-only model. ``forward(x)`` = ``dequantize(forward_integer(quantize_input(x)))``;
    ``forward_integer`` uses integer tensors only; ``simulate(x)`` computes the same codes with
    float64 arithmetic (the float simulation, bit for bit)."""

    def __init__(self, input_scale: float, input_qmax: int, steps: list[nn.Module],
                 program: list[tuple[tuple[int, ...], int]], output_id: int, output_scale: torch.Tensor,
                 layers: list[LayerInfo]):
        super().__init__()
        self.input_scale = float(input_scale)
        self.input_qmax = int(input_qmax)
        self.steps = nn.ModuleList(steps)
        self.program = [(tuple(i), int(o)) for i, o in program]
        self.output_id = int(output_id)
        self.register_buffer("output_scale", output_scale.double())
        self.layers = list(layers)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The one float -> integer step: ``clamp(round(x / S_in), -qmax, qmax)`` as int32."""
        q = torch.round(x.double() / self.input_scale).clamp(-self.input_qmax, self.input_qmax)
        return q.to(torch.int32)

    def dequantize(self, z: torch.Tensor) -> torch.Tensor:
        """The one integer -> float step: output codes times their (per-channel) scale."""
        return (z.double() * self.output_scale).float()

    def _run(self, q: torch.Tensor, method: str) -> torch.Tensor:
        env = {0: q}
        for step, (ins, out) in zip(self.steps, self.program):
            fn = step if method == "forward" else step.simulate  # step(...) so module hooks see it
            env[out] = fn(*(env[i] for i in ins))
            for i in ins:  # free values no later step reads
                if self._last_use.get(i) == out:
                    env.pop(i, None)
        return env[self.output_id]

    @property
    def _last_use(self) -> dict[int, int]:
        if not hasattr(self, "_last_use_cache"):
            last = {}
            for ins, out in self.program:
                for i in ins:
                    last[i] = out
            last.pop(self.output_id, None)
            self._last_use_cache = last
        return self._last_use_cache

    @contextmanager
    def kernels(self, kind: str):
        """Within the block, every step with a compiled kernel uses ``kind``: "torch" (its PyTorch
        definition) or "auto" (the kernel where it can run); restored afterwards."""
        if kind not in ("auto", "torch"):
            raise ValueError(f"kernel kind must be 'auto' or 'torch', got {kind!r}")
        saved = {s: s.kernel for s in self.steps if hasattr(s, "kernel")}
        try:
            for s in saved:
                s.kernel = kind
            yield self
        finally:
            for s, k in saved.items():
                s.kernel = k

    def forward_integer(self, q: torch.Tensor) -> torch.Tensor:
        if q.is_floating_point():
            raise TypeError("forward_integer takes the integer codes of quantize_input(x), not a float tensor")
        return self._run(q, "forward")

    def simulate_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Output codes computed in float64 only (input quantized the same way)."""
        return self._run(self.quantize_input(x).double(), "simulate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.forward_integer(self.quantize_input(x)))

    def size_bytes(self) -> float:
        """Weights at their bit widths plus int32 biases."""
        total = 0.0
        for info in self.layers:
            total += info.params * info.weight_bits / 8
        for step in self.steps:
            if hasattr(step, "bias") and isinstance(step.bias, torch.Tensor):
                total += step.bias.numel() * 4
        return total

    def bops(self) -> int:
        """Bit operations per sample: sum of MACs x weight bits x input activation bits."""
        return sum(i.macs * i.weight_bits * i.act_bits for i in self.layers)
