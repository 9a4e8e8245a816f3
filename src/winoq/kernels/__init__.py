"""Kernels behind one switch: the same QuantWinogradConv2d computed different ways.

``emulated``  the layer's own ``forward`` (fake quantization in floating point;
              works everywhere, differentiable).
``int-cpu``   integer arithmetic on CPU in PyTorch ops (int8 codes, int32 group sums;
              :mod:`winoq.kernels.int_cpu`), equal to ``forward_integer``: the reference
              of the float-transform pipeline.
``cpu``       the compiled fixed-point int8 kernel (:mod:`winoq.kernels.cpu`: AVX-512 VNNI,
              AVX2 or portable C++): int8 tiles, k-bit fixed-point integer transforms
              (:mod:`winoq.winograd.fixed_point`), int32 group sums. The layer's emulation
              then uses the same rounded transforms. Without a C++ toolchain it warns once
              and runs the PyTorch twin (same results). Layers it cannot run (float or
              > 8-bit stages, tap-wise scales, non-zero padding modes) run emulated.
``triton``    Triton GPU kernels (:mod:`winoq.kernels.triton_winograd`); needs
              CUDA and the optional ``triton`` package.
``auto``      ``triton`` when CUDA and triton are available, else ``emulated``.
"""
from __future__ import annotations

import torch

KERNELS = ("emulated", "int-cpu", "cpu", "triton", "auto")
# why "int-cpu" and "triton" refuse a layer whose input scales carry zero points
SYMMETRIC_ONLY = ("input scales with zero points (this kernel quantizes the input symmetrically: "
                  "Recipe(activation_zero_point=False), or kernel 'cpu' / 'emulated')")


def triton_available() -> bool:
    """True when the optional ``triton`` package can be imported."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


def _is_cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def resolve_kernel(name: str, device=None) -> str:
    """The concrete kernel ``name`` means on ``device`` (a torch.device, a string,
    or None for "this machine"). Raises ValueError for an unknown name and
    RuntimeError when ``triton`` is asked for where it cannot run."""
    if name not in KERNELS:
        raise ValueError(f"kernel {name!r} unknown; choose one of {', '.join(KERNELS)}")
    if name == "auto":
        return "triton" if (_is_cuda(device) and triton_available()) else "emulated"
    if name == "triton":
        missing = []
        if not torch.cuda.is_available():
            missing.append("a CUDA device (torch.cuda.is_available() is False)")
        elif not _is_cuda(device):
            missing.append(f"CUDA tensors (got device {device})")
        if not triton_available():
            missing.append("the 'triton' package (pip install triton)")
        if missing:
            raise RuntimeError(f"kernel 'triton' needs {' and '.join(missing)}; "
                               "kernel 'emulated' works everywhere (and 'int-cpu' on CPU)")
    return name


def winograd_forward(layer, x: torch.Tensor, kernel: str = "emulated") -> torch.Tensor:
    """Run ``layer`` (a QuantWinogradConv2d) on ``x`` with ``kernel``; the result has x's dtype."""
    name = resolve_kernel(kernel, x.device)
    if name == "emulated":
        # a layer whose forward() dispatches through here keeps its fake-quant body as forward_emulated
        emulated = getattr(layer, "forward_emulated", None)
        return emulated(x) if emulated is not None else layer(x)
    if name == "int-cpu":
        from . import int_cpu

        return int_cpu.forward(layer, x).to(x.dtype)
    if name == "cpu":
        return _fixed_point_forward(layer, x)
    from . import triton_winograd

    return triton_winograd.forward(layer, x).to(x.dtype)


def _fixed_point_forward(layer, x: torch.Tensor) -> torch.Tensor:
    from ..winograd import fixed_point
    from . import cpu

    why = fixed_point.unsupported_reason(layer)
    if why is None and x.device.type != "cpu":
        why = f"its input is on {x.device}"
    if why is not None:
        if not getattr(layer, "_warned_cpu_kernel", False):
            import warnings

            warnings.warn(f"kernel 'cpu' cannot run {type(layer).__name__} ({why}); it runs emulated", stacklevel=3)
            layer._warned_cpu_kernel = True
        return layer.forward_emulated(x)
    return cpu.forward(layer, x).to(x.dtype)


__all__ = ["KERNELS", "resolve_kernel", "triton_available", "winograd_forward"]
