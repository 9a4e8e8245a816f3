"""Int8 convs inside a float model: for models the integer-only converter cannot trace or run in
integers end to end (GroupNorm, SiLU, attention, timestep embeddings: diffusion UNets), every conv
takes and returns float tensors and computes in int8 in between, the rest of the model stays
float. This is what torch.ao's eager static quantization does (a QuantStub / DeQuantStub around each
conv), on winoq's compiled int8 conv (:mod:`winoq.kernels.int_graph`):

* the input's codes ``clamp(round(x / s_in), -128, 127)`` with one static scale ``s_in`` per conv
  (the largest |input| seen on the calibration batches / 127), quantized while the kernel copies
  the input into its padded planes;
* int8 weights per output channel and an int32 bias at ``s_in s_w``, exactly as the integer-only
  converter makes them (:func:`winoq.integer.convert.convert_conv`);
* the int32 accumulator times ``s_in s_w`` per output channel, written as float32 NCHW.

``Int8Conv2d.forward_torch`` is the definition in PyTorch ops; the compiled kernel returns the same
floats bit for bit and runs where it is built (else the definition runs, with the same result).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .convert import _fold_bn, _QVal, activation_grid, convert_conv


class Int8Conv2d(nn.Module):
    """A float-in, float-out conv computed in int8 (see the module's docstring)."""

    def __init__(self, name: str, conv: nn.Conv2d, input_amax: float):
        super().__init__()
        scale, qmin, qmax = activation_grid([], float(input_amax), 8, unsigned=False, unsigned_max_bits=0,
                                            clip="minmax")
        w, b = _fold_bn(conv, None)
        step, s_acc, _ = convert_conv(name, conv, w, b, _QVal(0, torch.tensor(scale, dtype=torch.float64), False,
                                                                qmin, qmax), 8, "minmax")
        if step.wide:
            raise ValueError(f"conv {name!r}: its int32 accumulator could overflow ({conv.in_channels} input "
                             f"channels x {conv.kernel_size} taps); keep it float with skip=")
        self.name = name
        self.step = step
        self.register_buffer("input_inv", torch.tensor(1.0 / scale, dtype=torch.float32))
        self.register_buffer("scale", s_acc.flatten().float())
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def compiled(self) -> bool:
        """Does ``forward`` run the compiled kernel (float32 CPU input)?"""
        return self._kernel() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32 and x.dim() == 4 and x.shape[1] == self.in_channels and x.device.type == "cpu":
            run = self._kernel()
            if run is not None:
                return run(x)
        return self.forward_torch(x)

    def _kernel(self):
        """The compiled conv bound to this layer's buffers (None where it cannot run), rebuilt only when a
        buffer changes: the per-call checks and packing would cost more than a small conv."""
        from ..kernels import cpu, int_graph

        step = self.step
        bufs = (step._buffers["weight"], step._buffers["bias"], self._buffers["input_inv"], self._buffers["scale"])
        key = tuple((t.data_ptr(), t._version) for t in bufs)

        def make():
            if not step.compiled():
                return None
            return int_graph.conv_float_fn(step, float(self.input_inv), self.scale)

        return cpu.cached_on(self, "_kernel_fn", key, make)

    def __getstate__(self):  # the bound kernel is a closure over this process's build: not pickled
        state = dict(super().__getstate__())
        state.pop("_kernel_fn", None)
        return state

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The definition: codes, the integer conv (int32), times the accumulator's scale."""
        self._check(x)
        codes = torch.round(x * self.input_inv).clamp_(-128, 127).to(torch.int32)
        return self.step.forward_torch(codes).float() * self.scale.view(1, -1, 1, 1)

    def _check(self, x: torch.Tensor) -> None:
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Int8Conv2d {self.name!r} takes float32 (N, {self.in_channels}, H, W) input, got "
                             f"{x.dtype} {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return (f"{self.name}, {self.in_channels} -> {self.out_channels}, kernel={tuple(self.step.weight.shape[2:])}, "
                f"stride={self.step.stride}, input scale={1 / float(self.input_inv):.4g}")


def unsupported_reason(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` stays float (None when it can run in int8)."""
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if conv.weight.dtype != torch.float32 or conv.weight.device.type != "cpu":
        return f"{conv.weight.dtype} weights on {conv.weight.device} (float32 CPU only)"
    return None


def int8_convs(model: nn.Module, calib_batches, *, skip: Iterable[str] = (), progress: bool = False
               ) -> nn.Module:
    """A copy of ``model`` whose ``nn.Conv2d`` layers are :class:`Int8Conv2d` (float in and out,
    int8 inside), their input scales calibrated on ``calib_batches``: any form ``winoq.quantize``'s
    ``calib_data`` takes (:mod:`winoq.calibration`: a tensor, batches of tensors, ``(input, target)``
    pairs or keyword dicts, a ``winoq.diffusion.CalibrationSet``, or a function ``run(model)``).
    A model that is itself a conv comes back as an ``Int8Conv2d``.

    Convs named in ``skip``, convs the kernel cannot run (grouped, string padding, other padding
    modes, not float32 on the CPU) and convs the calibration never reached or only saw zeros stay
    float, with one warning naming them and why. ``model`` itself is not changed."""
    import copy

    from tqdm.auto import tqdm

    from ..api import _replace

    skip = set(skip)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    unknown = skip - set(convs)
    if unknown:
        raise ValueError(f"skip names no conv of the model: {sorted(unknown)}; convs: {sorted(convs)[:8]} ...")
    kept = {n: "skipped" for n in skip}
    kept.update({n: why for n, m in convs.items() if n not in kept and (why := unsupported_reason(m))})
    amax = _calibrated_amax(model, {n: m for n, m in convs.items() if n not in kept}, calib_batches)
    for n in convs:
        if n not in kept and amax.get(n, 0.0) <= 0.0:
            kept[n] = "no calibration batch reached it" if n not in amax else "its calibration input was all zeros"
    out = copy.deepcopy(model)
    for n in tqdm([n for n in convs if n not in kept], desc="int8 convs", unit="conv", disable=not progress):
        if not n:  # the model is the conv
            return Int8Conv2d(n, model, amax[n])
        _replace(out, n, Int8Conv2d(n, convs[n], amax[n]))
    if kept:
        warnings.warn(f"{len(kept)} of {len(convs)} convs stay float: "
                      + "; ".join(f"{n} ({why})" for n, why in list(kept.items())[:10])
                      + (" ..." if len(kept) > 10 else ""), stacklevel=2)
    return out


def _calibrated_amax(model: nn.Module, convs: dict, calib_batches) -> dict[str, float]:
    """The largest |input| of each conv in ``convs`` over the batches (float model, no gradients)."""
    from ..calibration import run_calibration

    amax: dict[str, float] = {}

    def hook(name):
        def record(_module, args):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().amax()))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in convs.items()]
    try:
        run_calibration(model, calib_batches)
    finally:
        for h in handles:
            h.remove()
    return amax


__all__ = ["Int8Conv2d", "int8_convs", "unsupported_reason"]
