"""Kernels behind one switch: the same QuantWinogradConv2d computed different ways.

``emulated``  the layer's own ``forward`` (fake quantization in floating point;
              works everywhere, differentiable).
``int-cpu``   integer arithmetic on CPU (int8 codes, int32 group sums;
              :mod:`winoq.kernels.int_cpu`), equal to ``forward_integer``.
``triton``    Triton GPU kernels (:mod:`winoq.kernels.triton_winograd`); needs
              CUDA and the optional ``triton`` package.
``auto``      ``triton`` when CUDA and triton are available, else ``emulated``.
"""
from __future__ import annotations

import torch

KERNELS = ("emulated", "int-cpu", "triton", "auto")


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
    from . import triton_winograd

    return triton_winograd.forward(layer, x).to(x.dtype)


__all__ = ["KERNELS", "resolve_kernel", "triton_available", "winograd_forward"]
