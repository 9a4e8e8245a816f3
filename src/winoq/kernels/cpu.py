"""The compiled fixed-point int8 Winograd kernel for CPUs (``kernel="cpu"``).

It computes the pipeline defined in :mod:`winoq.winograd.fixed_point` (int8 input tiles,
exact integer or k-bit fixed-point transforms, int8 V and U, int32 group sums with AVX-512 VNNI
``vpdpbusd``, one requantization of M, integer output transform) and returns what
:func:`winoq.winograd.fixed_point.reference_forward` returns, bit for bit.

The C++ source (``csrc/``) is compiled on first use with ``torch.utils.cpp_extension.load``
(ninja) into a cache directory (``$WINOQ_EXT_DIR``, default ``~/.cache/winoq/ext``);
``bash setup.sh`` builds it once so that later imports only load it. A JIT build rather than
an ahead-of-time one because the package itself stays a pure-Python wheel: an AOT build
needs torch inside pip's isolated build environment, which is exactly where pip would pick
a CUDA torch. When the compiler or ninja is missing the build fails once with a warning
and the kernel runs ``reference_forward`` (same numbers, PyTorch speed).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..winograd import fixed_point as fp

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("winograd_int8.cpp", "winograd_int8_body.h", "cpu_isa.h")
_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]
_STATE: dict = {}


def build_dir(name: str = "winograd_int8", sources: tuple[str, ...] = _SOURCES) -> Path:
    """Where extension ``name`` is built: a folder per source digest, flags and torch version."""
    root = Path(os.environ.get("WINOQ_EXT_DIR", Path.home() / ".cache" / "winoq" / "ext"))
    digest = hashlib.sha1(b"".join((_CSRC / s).read_bytes() for s in sources) + " ".join(_FLAGS).encode()
                          + torch.__version__.encode()).hexdigest()[:12]
    return root / f"{name}-{digest}"


def compile_extension(name: str, sources: tuple[str, ...], state: dict, what: str, verbose: bool = False):
    """The compiled module ``winoq_<name>`` (``sources[0]`` is its one translation unit; the rest are
    headers it includes), built if needed and cached in ``state``; None, with one warning naming
    ``what`` runs instead, when it cannot be built."""
    if "mod" in state:
        return state["mod"]
    try:
        from torch.utils import cpp_extension

        d = build_dir(name, sources)
        d.mkdir(parents=True, exist_ok=True)
        mod = cpp_extension.load(name=f"winoq_{name}", sources=[str(_CSRC / sources[0])],
                                 extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(d),
                                 verbose=verbose)
    except Exception as err:  # no compiler, no ninja, unsupported platform
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        warnings.warn(f"winoq: the compiled {name} kernel could not be built ({first}); {what} instead (same "
                      "results, slower). Install g++ and ninja and run setup.sh.", RuntimeWarning, stacklevel=3)
        mod = None
    state["mod"] = mod
    return mod


def cached_on(obj, attr: str, key, make):
    """``make()``, kept on ``obj.<attr>`` beside ``key`` and made again only when ``key`` changes (the
    buffers a kernel's packed tables or checks were derived from)."""
    hit = getattr(obj, attr, None)
    if hit is None or hit[0] != key:
        hit = (key, make())
        setattr(obj, attr, hit)
    return hit[1]


def dyadic_lanes(b: torch.Tensor, c: torch.Tensor, shape: tuple[int, ...], kp: int) -> list[torch.Tensor]:
    """A requantization's dyadic multipliers as a kernel reads them: ``b, c`` broadcast to ``shape``
    (last dimension: the K output channels), padded to ``kp`` channels (b = 0 and the valid shift
    c = 1 beyond K), and ``2^(c-1)``; int64, contiguous."""
    k = shape[-1]
    b = F.pad(b.to(torch.int64).expand(shape), (0, kp - k)).contiguous()
    c = F.pad(c.to(torch.int64).expand(shape), (0, kp - k), value=1).contiguous()
    return [b, c, torch.bitwise_left_shift(torch.ones_like(c), c - 1)]


def load(verbose: bool = False):
    """The compiled module, building it if needed; None (with one warning) when it cannot be built."""
    return compile_extension("winograd_int8", _SOURCES, _STATE, "kernel='cpu' runs the PyTorch fixed-point twin",
                             verbose)


def available() -> bool:
    return load() is not None


def isa() -> str | None:
    """Instruction set the compiled kernel picks on this CPU ("avx512-vnni", "avx2", "portable")."""
    mod = load()
    return None if mod is None else mod.best_isa()


def _packed(layer, p: fp.Plan, mod):
    if p.packed is None:
        g = layer.groups
        taps, k, cg = p.u.shape
        kg = k // g
        u8, usum = mod.pack_u(p.u, g, p.gs)
        kgp = usum.shape[-1]
        su = p.su.reshape(taps, g, kg, p.nj).permute(0, 1, 3, 2)  # (taps, G, J, kg)
        su = torch.nn.functional.pad(su, (0, kgp - kg)).contiguous()
        p.packed = (u8, usum, su)
    return p.packed


@torch.no_grad()
def forward(layer, x: torch.Tensor, rx: torch.Tensor | None = None, sx: torch.Tensor | None = None,
            isa: str = "", zp: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed-point forward of a QuantWinogradConv2d on CPU (float32 out). ``rx``, ``sx``, ``zp``:
    (N, th, tw, C) input multipliers / scales / zero points (default: the layer's input
    granularity; a given ``rx`` without ``zp``: no zero points).
    ``isa``: force "avx512-vnni", "avx2" or "portable" (default: the best this CPU has)."""
    why = fp.unsupported_reason(layer)
    if why is not None:
        raise ValueError(f"cpu kernel: {why}; use kernel='emulated'")
    if x.device.type != "cpu":
        raise ValueError(f"cpu kernel runs on CPU tensors, got {x.device}")
    layer.check_input(x)
    mod = load()
    if mod is None:
        return fp.reference_forward(layer, x, rx, sx, zp=zp)
    p = fp.plan(layer)
    nb, c, h, w = x.shape
    pad, out_hw, th, tw = fp.tile_grid(layer, h, w)
    fm = layer.formats
    vf, mf, inf = fm.winograd_input, fm.output, fm.input
    tile_in = [0.0]
    if rx is None and layer.granularity.input_mode == "tile":  # the kernel computes them (fp.input_scales)
        with_zp = layer.granularity.input.zero_point
        q = float(inf.qmax - inf.qmin) if with_zp else float(inf.max_value)
        tile_in = [1.0, q, float(fp.input_group_size(layer, c)), float(with_zp)]
        rx = sx = zp = torch.zeros(1, 1, 1, 1).expand(nb, th, tw, c)
    else:
        if rx is None:
            rx, sx, zp = fp.input_scales(layer, x, th, tw)
        elif zp is None:
            zp = torch.zeros_like(rx)
        fp.check_scale_nesting(layer, sx, p, zp)
    u8, usum, su = _packed(layer, p, mod)
    bias = None if layer.bias is None else layer.bias.detach().float()
    v_zp = layer.granularity.v.zero_point
    return mod.forward(x.detach().float(), [pad[2], pad[0]], [layer.m, layer.m + layer.kernel_size - 1, th, tw, *out_hw],
                       rx.float(), sx.float(), zp.float(), p.bq, p.v_factor, p.aq,
                       [p.sb, int(p.input16), p.sa, p.sa - 2 * p.ka],
                       [layer.groups, p.gs, p.gsm, layer.out_channels], u8, usum, su,
                       [float(vf.qmax - vf.qmin) if v_zp else float(vf.max_value), vf.qmin, vf.qmax,
                        float(layer.granularity.v.keeps("tap")), float(v_zp)],
                       [float(mf.max_value), mf.qmin, mf.qmax],
                       [inf.qmin, inf.qmax], tile_in, bias, isa)
