"""Compiled steps of integer-only graphs besides the Winograd step: the direct integer conv
(:class:`winoq.integer.layers.IntConv2d`) with its requantization fused in, the requantization
and residual add on their own, and the max pool of int8 codes (``csrc/int_graph.cpp``).

Every function returns exactly what the PyTorch steps return (the same integers), in the layout
fast kernels pass between layers: channels-last, int8 activation codes (or the int32 accumulator).
The conv is an int8 implicit GEMM with VNNI ``vpdpbusd`` (the input copied once into zero-padded
planes of 4-channel dwords, the weights packed once per layer); the requantization ``clamp((z b + 2^(c-1)) >> c)``
runs in int64 lanes on the conv's int32 block while it is in cache.

Built like the other kernels (:func:`winoq.kernels.cpu.compile_extension`); without a compiler the
callers run the PyTorch steps (:mod:`winoq.integer.runtime` does so on its own).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cpu

_SOURCES = ("int_graph.cpp", "int_graph_portable.h", "cpu_isa.h")
_STATE: dict = {}
INT8_RANGE = (-128, 127)


def load(verbose: bool = False):
    return cpu.compile_extension("int_graph", _SOURCES, _STATE, "integer-graph steps run in PyTorch", verbose)


def available() -> bool:
    return load() is not None


def _module():
    """The built module; an error naming the fix where it could not be built."""
    mod = load()
    if mod is None:
        raise RuntimeError("the compiled integer-graph kernels are not built (run setup.sh)")
    return mod


def isa() -> str | None:
    """Instruction set the compiled steps pick on this CPU ("avx512-vnni", "avx2", "portable")."""
    mod = load()
    return None if mod is None else mod.best_isa()


def fits_int8(qmin: int, qmax: int) -> bool:
    return INT8_RANGE[0] <= qmin and qmax <= INT8_RANGE[1]


def conv_unsupported_reason(step) -> str | None:
    """Why the compiled conv cannot run the ``IntConv2d`` ``step`` (None when it can)."""
    from ..integer.layers import IntConv2d

    if not isinstance(step, IntConv2d):
        return f"it is a {type(step).__name__}, not an IntConv2d (winoq.integer.layers)"
    if step.wide:
        return "its accumulator is int64 (the worst case leaves int32)"
    if step.groups != 1:
        return f"groups={step.groups}"
    if isinstance(step.padding, str) or len(step.padding) != 2:
        return f"padding={step.padding!r}"
    if step.weight.dim() != 4:
        return "not a 2-d conv"
    lo, hi = int(step.weight.min()), int(step.weight.max())
    if lo < -128 or hi > 127:
        return "weight codes wider than 8 bits"
    return None


def cached_reason(step) -> str | None:
    """:func:`conv_unsupported_reason`, computed once per set of buffers (it reads all the weights)."""
    if not hasattr(step, "wide"):
        return conv_unsupported_reason(step)
    key = (step.weight.data_ptr(), step.weight._version, step.wide, step.groups, step.padding)
    return cpu.cached_on(step, "_compiled_reason", key, lambda: conv_unsupported_reason(step))


@dataclass(frozen=True)
class Epilogue:
    """What a step does with its int32 result ``z`` (K channels): ``clamp(rq(z, b, c) [+ rq(other,
    ob, oc)], qmin, qmax)`` as int8 codes, where ``rq`` is the dyadic requantization; ``b, c`` (and
    ``ob, oc``, the multiplier of an added value) per channel or one for all. ``qmin, qmax`` must lie
    in int8's range."""

    b: torch.Tensor
    c: torch.Tensor
    qmin: int
    qmax: int
    ob: torch.Tensor | None = None
    oc: torch.Tensor | None = None

    def __post_init__(self):
        if not fits_int8(self.qmin, self.qmax):
            raise ValueError(f"the compiled epilogue writes int8 codes; range [{self.qmin}, {self.qmax}] does not fit")
        if (self.ob is None) != (self.oc is None):
            raise ValueError("an added value's multiplier needs both ob and oc")

    @property
    def adds(self) -> bool:
        return self.ob is not None

    def tables(self, k: int) -> list[torch.Tensor]:
        """``[b, c, 2^(c-1)]`` (and the added value's) as int64 (Kp,), Kp = k rounded up to 16; cached."""
        cache = self.__dict__.setdefault("_table_cache", {})
        if k not in cache:
            cache[k] = self._tables(k)
        return cache[k]

    def _tables(self, k: int) -> list[torch.Tensor]:
        out = []
        for b, c in ((self.b, self.c), (self.ob, self.oc))[: 2 if self.adds else 1]:
            b, c = (t.flatten() for t in (b, c))
            if b.numel() not in (1, k) or c.numel() not in (1, k):
                raise ValueError(f"multipliers of {b.numel()} / {c.numel()} channels for a value of {k}")
            out += cpu.dyadic_lanes(b, c, (k,), -(-k // 16) * 16)
        return out

    def _args(self, k: int, other: torch.Tensor | None) -> tuple:
        if self.adds != (other is not None):
            raise ValueError("pass the added value (other=) exactly when the epilogue has its multiplier")
        if other is None:
            other = _NONE
        elif other.dtype not in (torch.int8, torch.int32):
            raise ValueError(f"the added value must be int8 codes or an int32 accumulator, got {other.dtype}")
        else:
            other = other.contiguous(memory_format=torch.channels_last)
        return 2 if self.adds else 1, self.tables(k), other, self.qmin, self.qmax


_NONE = torch.empty(0, dtype=torch.int8)


def _packed(step, mod) -> tuple:
    key = tuple((t.data_ptr(), t._version) for t in (step.weight, step.bias))
    return cpu.cached_on(step, "_compiled_graph", key, lambda: tuple(mod.pack(step.weight, step.bias, step.dilation[1])))


def conv(step, x: torch.Tensor, epilogue: Epilogue | None = None, other: torch.Tensor | None = None,
         isa: str = "", rows: int = 0) -> torch.Tensor:
    """``step(x)`` (an ``IntConv2d``) from 8-bit codes ``x`` (int8 or int32, any layout), channels-last:
    the int32 accumulator, or with ``epilogue`` its int8 result (``other``: the value it adds).
    ``isa``: force "avx512-vnni", "avx2" or "portable"; ``rows``: output rows per parallel job (0: by
    the layer's size)."""
    if x.dtype not in (torch.int8, torch.int32):
        raise ValueError(f"the compiled integer conv takes int8 or int32 codes, got {x.dtype} (float input: conv_float)")
    if epilogue is None:
        if other is not None:
            raise ValueError("an added value needs an epilogue with its multiplier")
        return _run(step, x, 1.0, (0, [], _NONE, 0, 0), isa, rows)
    return _run(step, x, 1.0, epilogue._args(step.weight.shape[0], other), isa, rows)


def conv_float(step, x: torch.Tensor, inv_scale: float, scale: torch.Tensor, isa: str = "", rows: int = 0) -> torch.Tensor:
    """A conv with float input and output around the int8 ``step``: the codes
    ``clamp(round(x * inv_scale), -128, 127)`` (``x`` float32, any layout; ``inv_scale`` a float32 value,
    the product rounded to float32 as PyTorch does), the int32 accumulator, and out
    ``z.float() * scale[k]`` (float32, one per output channel) as a contiguous (NCHW) float32 tensor."""
    if x.dtype != torch.float32:
        raise ValueError(f"conv_float takes float32 input, got {x.dtype}")
    return conv_float_fn(step, inv_scale, scale, isa, rows)(x)


def conv_float_fn(step, inv_scale: float, scale: torch.Tensor, isa: str = "", rows: int = 0):
    """:func:`conv_float` bound to its step and scales: the checks and the weight packing done once,
    a function of float32 ``x`` returned (for layers that call it on every forward)."""
    k = step.weight.shape[0]
    if scale.dtype != torch.float32 or scale.numel() != k:
        raise ValueError(f"conv_float needs one float32 scale per output channel ({k}), got {scale.numel()} {scale.dtype}")
    mod, args = _bound(step)
    tail = (3, [scale.contiguous().flatten()], _NONE, 0, 0, isa, rows)
    inv = float(inv_scale)
    return lambda x: mod.conv(x, inv, *args, *tail)


def _run(step, x, inv_scale: float, epilogue_args: tuple, isa: str, rows: int) -> torch.Tensor:
    mod, args = _bound(step)
    return mod.conv(x, inv_scale, *args, *epilogue_args, isa, rows)


def _bound(step) -> tuple:
    """The built module and the conv's arguments that depend on ``step`` only (geometry, packed weights)."""
    why = cached_reason(step)
    if why is not None:
        raise ValueError(f"compiled integer conv {getattr(step, 'name', '?')!r}: {why}")
    mod = _module()
    wp, wq, w0 = _packed(step, mod)
    kh, kw = step.weight.shape[2:]
    geom = [kh, kw, *step.stride, *step.padding, *step.dilation]
    return mod, (geom, wp, wq, w0, step.bias)


def quantize_input(x: torch.Tensor, scale: float, qmax: int, isa: str = "") -> torch.Tensor:
    """An integer model's input quantization (``IntegerModel.quantize_input``: ``clamp(round(double(x) /
    scale), -qmax, qmax)``, the same integers) as int8 channels-last codes, in one pass; ``x`` float32."""
    mod = _module()
    if x.dtype != torch.float32 or x.dim() != 4:
        raise ValueError(f"quantize_input takes (N, C, H, W) float32, got {x.dtype} {tuple(x.shape)}")
    return mod.quantize_input(x, float(scale), int(qmax), isa)


def max_pool(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
             isa: str = "") -> torch.Tensor:
    """``F.max_pool2d`` of int8 codes ``x`` (floor mode, no dilation; any layout), int8 channels-last
    out: the positions outside the image never win, as in PyTorch's padding with -inf."""
    mod = _module()
    if x.dtype != torch.int8 or x.dim() != 4:
        raise ValueError(f"max_pool takes (N, C, H, W) int8 codes, got {x.dtype} {tuple(x.shape)}")
    return mod.max_pool(x, *kernel, *stride, *padding, isa)


def requantize(z: torch.Tensor, epilogue: Epilogue, other: torch.Tensor | None = None, isa: str = "") -> torch.Tensor:
    """The epilogue on its own: ``z`` (N, K, H, W) int32 or int8, any layout, to int8 codes, channels-last."""
    mod = _module()
    if z.dtype not in (torch.int8, torch.int32):
        raise ValueError(f"requantize takes int8 codes or an int32 accumulator, got {z.dtype}")
    if z.dim() != 4:
        raise ValueError(f"requantize takes (N, K, H, W) values, got shape {tuple(z.shape)}")
    z = z.contiguous(memory_format=torch.channels_last)
    return mod.requantize(z, *epilogue._args(z.shape[1], other), isa)
