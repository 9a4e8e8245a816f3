"""The steps of an integer-only model.

Every step maps integer tensors to an integer tensor (``forward``, int32 / int64 only) and
has a float64 twin (``simulate``) computing the same codes with floating-point arithmetic;
``IntegerModel`` runs either. A conv step outputs its int32 accumulator at scale
``S_w[c] S_in`` (per output channel); the next step that needs activation codes
requantizes it by a dyadic multiplier. Any module with the same two methods and the
attributes the converter sets (``name``, ``in_scale`` ...) can stand in for a conv, e.g. an
integer Winograd conv whose fixed-point transforms give the same accumulator scale.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dyadic import requantize, requantize_float

INT32_MAX = (1 << 31) - 1


def _clamp(x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return x.clamp(qmin, qmax)


class IntConv2d(nn.Module):
    """Integer conv: int32 codes in, int32 accumulator ``conv(x, W_q) + bias_q`` out.

    ``wide=True`` accumulates in int64 (chosen when the worst-case sum could pass int32).
    ``kernel``: "auto" runs the compiled int8 conv (:mod:`winoq.kernels.int_graph`, same integers,
    channels-last) where it can, "torch" always :meth:`forward_torch`."""

    def __init__(self, name: str, weight_q: torch.Tensor, bias_q: torch.Tensor, conv: nn.Conv2d, wide: bool):
        super().__init__()
        self.name = name
        self.register_buffer("weight", weight_q.to(torch.int64 if wide else torch.int32))
        self.register_buffer("bias", bias_q.to(torch.int64 if wide else torch.int32))
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.wide = wide
        self.kernel = "auto"

    @classmethod
    def timing_twin(cls, conv: nn.Conv2d, name: str = "timing") -> "IntConv2d":
        """``conv``'s shape with int8 weights per output channel (max-abs scale) and zero bias: the
        same work as the converted layer, for timing (the converter calibrates the real one)."""
        w = conv.weight.detach()
        s_w = w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / 127
        return cls(name, torch.round(w / s_w), torch.zeros(w.shape[0]), conv, wide=False)

    def _conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def compiled(self) -> bool:
        """Does ``forward`` run the compiled conv (for 8-bit codes)?"""
        if getattr(self, "kernel", "auto") != "auto" or self.weight.device.type != "cpu":
            return False
        from ..kernels import int_graph

        return int_graph.available() and int_graph.cached_reason(self) is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.int8, torch.int32) and x.dim() == 4 and self.compiled():
            from ..kernels import int_graph

            if x.dtype == torch.int8 or int_graph.fits_int8(*(int(v) for v in torch.aminmax(x))):
                return int_graph.conv(self, x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The definition in PyTorch integer ops."""
        return self._conv(x.to(self.weight.dtype), self.weight, self.bias)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight.double(), self.bias.double())

    def extra_repr(self) -> str:
        return f"{self.name}, weight={tuple(self.weight.shape)}, stride={self.stride}, wide={self.wide}"


class IntLinear(nn.Module):
    """Integer linear: int32 codes in, int32 accumulator out (like :class:`IntConv2d`)."""

    def __init__(self, name: str, weight_q: torch.Tensor, bias_q: torch.Tensor, wide: bool):
        super().__init__()
        self.name = name
        self.register_buffer("weight", weight_q.to(torch.int64 if wide else torch.int32))
        self.register_buffer("bias", bias_q.to(torch.int64 if wide else torch.int32))
        self.wide = wide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.double(), self.bias.double())


class Requantize(nn.Module):
    """``clamp((z b + 2^(c-1)) >> c, qmin, qmax)``: accumulator -> activation codes."""

    def __init__(self, b: torch.Tensor, c: torch.Tensor, qmin: int, qmax: int):
        super().__init__()
        self.register_buffer("b", b)
        self.register_buffer("c", c)
        self.qmin, self.qmax = int(qmin), int(qmax)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _clamp(requantize(z, self.b, self.c), self.qmin, self.qmax).to(torch.int32)

    def simulate(self, z: torch.Tensor) -> torch.Tensor:
        return _clamp(requantize_float(z, self.b, self.c), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"range=[{self.qmin}, {self.qmax}]"


class IntAdd(nn.Module):
    """Residual add: each branch times its own dyadic multiplier to the output scale, summed
    in integers, then clamped (``qmin = 0`` when a ReLU follows)."""

    def __init__(self, ba, ca, bb, cb, qmin: int, qmax: int):
        super().__init__()
        for n, t in (("ba", ba), ("ca", ca), ("bb", bb), ("cb", cb)):
            self.register_buffer(n, t)
        self.qmin, self.qmax = int(qmin), int(qmax)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s = requantize(a, self.ba, self.ca) + requantize(b, self.bb, self.cb)
        return _clamp(s, self.qmin, self.qmax).to(torch.int32)

    def simulate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s = requantize_float(a, self.ba, self.ca) + requantize_float(b, self.bb, self.cb)
        return _clamp(s, self.qmin, self.qmax)


class IntGlobalAvgPool(nn.Module):
    """Global average pool: integer sum over H x W, then a dyadic multiplier
    ``S_in / (H W S_out)`` applied as multiply + rounding shift (a pure rounding shift when
    H W is a power of two and the scales agree)."""

    def __init__(self, b: torch.Tensor, c: torch.Tensor, qmin: int, qmax: int):
        super().__init__()
        self.register_buffer("b", b)
        self.register_buffer("c", c)
        self.qmin, self.qmax = int(qmin), int(qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.sum(dim=(2, 3), keepdim=True, dtype=torch.int64)
        return _clamp(requantize(s, self.b, self.c), self.qmin, self.qmax).to(torch.int32)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        return _clamp(requantize_float(x.sum(dim=(2, 3), keepdim=True), self.b, self.c), self.qmin, self.qmax)


class ClampMin(nn.Module):
    """ReLU on activation codes (zero point 0): ``max(x, 0)``."""

    def forward(self, x):
        return x.clamp_min(0)

    simulate = forward


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class MaxPool(nn.Module):
    """``max_pool2d`` of codes. ``kernel``: "auto" runs int8 codes on the compiled pool
    (:func:`winoq.kernels.int_graph.max_pool`) where it can, "torch" on PyTorch ops."""

    def __init__(self, kernel_size, stride, padding, dilation, ceil_mode):
        super().__init__()
        self.args = (kernel_size, stride, padding, dilation, ceil_mode)
        self.kernel = "auto"

    def forward(self, x):
        if x.dtype == torch.int8:  # torch's integer max pool counts positions in the input's type (int8 fails)
            return self._int8(x)
        return F.max_pool2d(x, *self.args)

    def _int8(self, x):
        """The maximum of the window's strided slices, padded with -128 (no code is below it, so the
        padding never wins, as max_pool2d's); the layout of ``x`` kept. Dilation and ceil mode: via int32."""
        k, s, p, d, ceil = self.args
        k, s, p, d = (_pair(v) for v in (k, k if s is None or s == [] else s, p, d))
        if ceil or d != (1, 1):
            return F.max_pool2d(x.int(), *self.args).to(torch.int8)
        if x.device.type == "cpu" and getattr(self, "kernel", "auto") == "auto":
            from ..kernels import int_graph

            if int_graph.available():  # the compiled pool: channels-last, 64 channels per instruction
                y = int_graph.max_pool(x, k, s, p)
                return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()
        oh, ow = (x.shape[2] + 2 * p[0] - k[0]) // s[0] + 1, (x.shape[3] + 2 * p[1] - k[1]) // s[1] + 1
        xp = F.pad(x, (p[1], p[1], p[0], p[0]), value=-128)
        out = None
        for i in range(k[0]):
            for j in range(k[1]):
                v = xp[:, :, i:i + s[0] * (oh - 1) + 1:s[0], j:j + s[1] * (ow - 1) + 1:s[1]]
                out = v.clone(memory_format=torch.preserve_format) if out is None else torch.maximum(out, v, out=out)
        return out

    def simulate(self, x):
        return F.max_pool2d(x, *self.args)


class Slice(nn.Module):
    """``x[index]`` with a tuple of slices / ints / Ellipsis (e.g. the option-A ``x[:, :, ::2, ::2]``)."""

    def __init__(self, index):
        super().__init__()
        self.index = index

    def forward(self, x):
        return x[self.index]

    simulate = forward


class ZeroPad(nn.Module):
    """``F.pad`` with zeros (the zero point), e.g. the option-A channel padding."""

    def __init__(self, pad):
        super().__init__()
        self.pad = tuple(pad)

    def forward(self, x):
        return F.pad(x, self.pad)

    simulate = forward


class Flatten(nn.Module):
    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return torch.flatten(x, self.start_dim, self.end_dim)

    simulate = forward


class PixelShuffle(nn.Module):
    """``F.pixel_shuffle`` of codes: a k x k stride-k transposed conv runs as a 1x1 conv to
    ``C k^2`` channels (its requantized codes) followed by this permutation."""

    def __init__(self, factor: int, channels: int):
        super().__init__()
        self.factor, self.channels = int(factor), int(channels)   # channels: after the shuffle

    def forward(self, x):
        return F.pixel_shuffle(x, self.factor)

    simulate = forward


class IntConcat(nn.Module):
    """Channel concatenation: each input times its own dyadic multiplier to the output scale
    (``b[i], c[i]``), then clamped (``qmin = 0`` when every input is unsigned)."""

    def __init__(self, pairs, qmin: int, qmax: int):
        super().__init__()
        for i, (b, c) in enumerate(pairs):
            self.register_buffer(f"b{i}", b)
            self.register_buffer(f"c{i}", c)
        self.n = len(pairs)
        self.qmin, self.qmax = int(qmin), int(qmax)

    def pairs(self):
        return [(getattr(self, f"b{i}"), getattr(self, f"c{i}")) for i in range(self.n)]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        parts = [requantize(x, b, c) for x, (b, c) in zip(xs, self.pairs())]
        return _clamp(torch.cat(parts, 1), self.qmin, self.qmax).to(torch.int32)

    def simulate(self, *xs: torch.Tensor) -> torch.Tensor:
        parts = [requantize_float(x, b, c) for x, (b, c) in zip(xs, self.pairs())]
        return _clamp(torch.cat(parts, 1), self.qmin, self.qmax)
