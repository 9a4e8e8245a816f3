"""ONNX export of an :class:`IntegerModel` (opset 13) and a run in onnxruntime.

Convs are ``ConvInteger`` and linears ``MatMulInteger`` (int8 codes shifted to uint8 with zero
point 128, int8 weights, int32 accumulators; padding is an explicit integer ``Pad`` of the codes
so the padded value is the real zero); the int32 bias is an ``Add``; every requantization is
explicit: ``Mul`` by b, ``Add`` 2^(c-1) and an arithmetic shift by c in int64. ONNX's
``BitShift`` is logical (unsigned only), so the shift adds 2^62 first (a multiple of 2^c), shifts
as uint64 and subtracts 2^(62-c), which is the floor division exactly. Input quantization and
output dequantization are the only floating-point nodes. ONNX has no Winograd operator: an
integer Winograd layer exports as its direct twin (``IntWinogradConv2d.direct_twin``: the same
layer as a direct ``ConvInteger`` with per-channel int8 weights, its accumulator rescaled by a
dyadic multiplier to the Winograd accumulator's scale), with a warning. That graph computes the
model with those layers direct, so its logits differ from the integer Winograd model's by the
two algorithms' different rounding (measured in docs/results.md); ``winograd="refuse"`` refuses.
"""
from __future__ import annotations

import numpy as np
import torch

from . import layers as L
from .model import IntegerModel

OPSET = 13
_OFFSET_BITS = 62


class _Graph:
    def __init__(self):
        from onnx import helper

        self.h = helper
        self.nodes, self.inits = [], []
        self.n = 0

    def name(self, hint="t"):
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, array: np.ndarray, hint="c") -> str:
        from onnx import numpy_helper

        nm = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), nm))
        return nm

    def op(self, op_type, inputs, hint=None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.h.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def cast(self, x, to) -> str:
        from onnx import TensorProto

        return self.op("Cast", [x], to=getattr(TensorProto, to))

    # -- integer building blocks
    def to_u8(self, x, unsigned: bool = False) -> tuple[str, str]:
        """int32 codes -> uint8 codes and their zero point: signed codes in [-128, 127] shifted by 128,
        unsigned codes in [0, 255] as they are (zero point 0)."""
        if unsigned:
            return self.cast(x, "UINT8"), self.const(np.array(0, np.uint8), "zp")
        shifted = self.op("Add", [x, self.const(np.array(128, np.int32))])
        return self.cast(shifted, "UINT8"), self.const(np.array(128, np.uint8), "zp")

    def requant(self, z, b: torch.Tensor, c: torch.Tensor) -> str:
        """``(z b + 2^(c-1)) >> c`` on int64 (arithmetic shift through a uint64 offset)."""
        z64 = self.cast(z, "INT64")
        b_np, c_np = b.numpy().astype(np.int64), c.numpy().astype(np.int64)
        t = self.op("Mul", [z64, self.const(b_np, "b")])
        t = self.op("Add", [t, self.const(np.left_shift(np.int64(1), c_np - 1), "half")])
        t = self.op("Add", [t, self.const(np.array(1 << _OFFSET_BITS, np.int64), "offset")])
        t = self.op("BitShift", [self.cast(t, "UINT64"), self.const(c_np.astype(np.uint64), "c")], direction="RIGHT")
        return self.op("Sub", [self.cast(t, "INT64"), self.const(np.left_shift(np.int64(1), _OFFSET_BITS - c_np), "off")])

    def pixel_shuffle(self, x, r: int, channels: int) -> str:
        """``F.pixel_shuffle`` as Reshape / Transpose / Reshape (onnxruntime's DepthToSpace takes
        float tensors only); batch and spatial sizes stay dynamic."""
        shape = self.op("Shape", [x])
        part = lambda a, b: self.op("Slice", [shape, self.const(np.array([a], np.int64)),  # noqa: E731
                                              self.const(np.array([b], np.int64))])
        n, hw = part(0, 1), part(2, 4)
        s6 = self.op("Concat", [n, self.const(np.array([channels, r, r], np.int64)), hw], axis=0)
        t = self.op("Transpose", [self.op("Reshape", [x, s6])], perm=[0, 1, 4, 2, 5, 3])
        s4 = self.op("Concat", [n, self.const(np.array([channels], np.int64)),
                                self.op("Mul", [hw, self.const(np.array([r], np.int64))])], axis=0)
        return self.op("Reshape", [t, s4])

    def max_pool(self, x, args) -> str:
        """``F.max_pool2d(x, *args)`` on 8-bit codes (onnxruntime's MaxPool takes int8 / uint8)."""
        k, s, p, d, ceil = args
        two = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
        s = k if s is None or s == [] else s
        return self.op("MaxPool", [x], kernel_shape=two(k), strides=two(s), pads=two(p) * 2, dilations=two(d),
                       ceil_mode=int(ceil))

    def pad(self, x, pad, value: np.ndarray) -> str:
        """``F.pad(x, pad, value=value)`` on an NCHW tensor (``pad`` lists the last dimension first)."""
        begins, ends = [0] * 4, [0] * 4
        for j in range(0, len(pad), 2):
            begins[3 - j // 2], ends[3 - j // 2] = pad[j], pad[j + 1]
        return self.op("Pad", [x, self.const(np.array(begins + ends, np.int64)), self.const(value)])

    def clip_int32(self, x64, qmin, qmax) -> str:
        t = self.op("Max", [x64, self.const(np.array(qmin, np.int64))])
        t = self.op("Min", [t, self.const(np.array(qmax, np.int64))])
        return self.cast(t, "INT32")


def _pads(padding) -> list[int]:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return [0, 0, ph, pw, 0, 0, ph, pw]


def unsigned_values(model: IntegerModel) -> dict[int, bool]:
    """For every value of the program: True where it holds unsigned activation codes (a clamp at
    zero, e.g. after a ReLU: up to 255 at 8 bits), which enter ConvInteger with zero point 0."""
    out = {0: False}
    for step, (ins, o) in zip(model.steps, model.program):
        if isinstance(step, (L.Requantize, L.IntAdd, L.IntGlobalAvgPool, L.IntConcat)):
            out[o] = step.qmin >= 0
        elif isinstance(step, L.ClampMin):
            out[o] = True
        else:  # pass-through ops keep their input's sign; accumulators are signed
            out[o] = out[ins[0]] if isinstance(step, (L.MaxPool, L.Slice, L.ZeroPad, L.Flatten, L.PixelShuffle)) else False
    return out


def _export_step(g: _Graph, step, ins: list[str], unsigned: bool = False) -> str:
    """One integer step on int32 values; ``unsigned``: the (first) input holds unsigned codes."""
    from .winograd import IntWinogradConv2d

    if isinstance(step, IntWinogradConv2d):
        acc = _export_step(g, step.direct, ins, unsigned)
        return g.clip_int32(g.requant(acc, step.direct_b, step.direct_c), -L.INT32_MAX, L.INT32_MAX)
    if isinstance(step, L.IntConv2d):
        if step.wide:
            raise ValueError(f"layer {step.name!r} accumulates in int64; ONNX ConvInteger has int32 accumulators only")
        if isinstance(step.padding, str):
            raise ValueError(f"layer {step.name!r}: padding={step.padding!r} is not exported; use integer padding")
        x = g.op("Pad", [ins[0], g.const(np.array(_pads(step.padding), np.int64)),
                         g.const(np.array(0, np.int32))])
        xu, zp = g.to_u8(x, unsigned)
        w = g.const(step.weight.numpy().astype(np.int8), "w")
        acc = g.op("ConvInteger", [xu, w, zp], strides=list(step.stride), dilations=list(step.dilation),
                   group=step.groups)
        return g.op("Add", [acc, g.const(step.bias.numpy().astype(np.int32).reshape(1, -1, 1, 1), "bias")])
    if isinstance(step, L.IntLinear):
        if step.wide:
            raise ValueError(f"layer {step.name!r} accumulates in int64; ONNX MatMulInteger has int32 accumulators only")
        xu, zp = g.to_u8(ins[0], unsigned)
        wt = g.const(step.weight.numpy().T.astype(np.int8).copy(), "w")
        acc = g.op("MatMulInteger", [xu, wt, zp])
        return g.op("Add", [acc, g.const(step.bias.numpy().astype(np.int32), "bias")])
    if isinstance(step, L.Requantize):
        return g.clip_int32(g.requant(ins[0], step.b, step.c), step.qmin, step.qmax)
    if isinstance(step, L.IntAdd):
        s = g.op("Add", [g.requant(ins[0], step.ba, step.ca), g.requant(ins[1], step.bb, step.cb)])
        return g.clip_int32(s, step.qmin, step.qmax)
    if isinstance(step, L.IntConcat):
        parts = [g.requant(x, b, c) for x, (b, c) in zip(ins, step.pairs())]
        return g.clip_int32(g.op("Concat", parts, axis=1), step.qmin, step.qmax)
    if isinstance(step, L.PixelShuffle):
        return g.pixel_shuffle(ins[0], step.factor, step.channels)
    if isinstance(step, L.IntGlobalAvgPool):
        s = g.op("ReduceSum", [g.cast(ins[0], "INT64"), g.const(np.array([2, 3], np.int64))], keepdims=1)
        return g.clip_int32(g.requant(s, step.b, step.c), step.qmin, step.qmax)
    if isinstance(step, L.ClampMin):
        return g.op("Max", [ins[0], g.const(np.array(0, np.int32))])
    if isinstance(step, L.MaxPool):   # unsigned codes reach 255: uint8, not int8
        return g.cast(g.max_pool(g.cast(ins[0], "UINT8" if unsigned else "INT8"), step.args), "INT32")
    if isinstance(step, L.Slice):
        idx = step.index if isinstance(step.index, tuple) else (step.index,)
        if not all(isinstance(i, slice) for i in idx):
            raise ValueError(f"indexing {step.index!r} is not exported (slices only)")
        axes, starts, ends, steps = [], [], [], []
        for ax, sl in enumerate(idx):
            if sl == slice(None):
                continue
            st = 1 if sl.step is None else sl.step
            axes.append(ax); steps.append(st)
            starts.append(0 if sl.start is None else sl.start)
            ends.append(np.iinfo(np.int64).max if sl.stop is None else sl.stop)
        if not axes:
            return ins[0]
        arr = lambda v: g.const(np.array(v, np.int64))  # noqa: E731
        return g.op("Slice", [ins[0], arr(starts), arr(ends), arr(axes), arr(steps)])
    if isinstance(step, L.ZeroPad):
        return g.pad(ins[0], list(step.pad), np.array(0, np.int32))
    if isinstance(step, L.Flatten):
        if step.end_dim != -1:
            raise ValueError(f"flatten with end_dim={step.end_dim} is not exported")
        return g.op("Flatten", [ins[0]], axis=step.start_dim)
    raise ValueError(f"step {type(step).__name__} has no ONNX export")


def export_onnx(model: IntegerModel, path, example: torch.Tensor, winograd: str = "direct", ops: str = "integer",
                calib: torch.Tensor | None = None):
    """Write ``model`` as an ONNX graph (opset 13) with float input ``x`` and float output ``logits``.
    ``winograd``: "direct" exports integer Winograd layers as their direct twins (with a warning),
    "refuse" raises for them. ``ops``: "integer" (``ConvInteger`` and int64 dyadic requantization:
    bit for bit the integer model) or "qlinear" (onnxruntime's fused int8 ``QLinearConv`` /
    ``QLinearAdd``: many times faster, float32 requantization, see :mod:`.onnx_qlinear`; ``calib``
    sets its residual branches' ranges)."""
    import warnings

    import onnx
    from onnx import TensorProto

    from .winograd import IntWinogradConv2d

    wino = [s.name for s in model.steps if isinstance(s, IntWinogradConv2d)]
    if wino and winograd == "refuse":
        raise ValueError(f"layers {wino} are integer Winograd steps and ONNX has no Winograd operator; export with "
                         f"winograd='direct' (their direct integer twins) or convert with IntegerConfig(winograd=None)")
    if winograd not in ("direct", "refuse"):
        raise ValueError(f"winograd must be 'direct' or 'refuse', got {winograd!r}")
    if ops not in ("integer", "qlinear"):
        raise ValueError(f"ops must be 'integer' (exact) or 'qlinear' (onnxruntime's fused int8 ops), got {ops!r}")
    if wino:
        warnings.warn(f"ONNX has no Winograd operator: {len(wino)} integer Winograd layer(s) (e.g. {wino[0]!r}) are "
                      f"exported as direct ConvInteger twins; the exported logits differ from this model's by the "
                      f"two algorithms' rounding", stacklevel=2)
    if ops == "qlinear":
        from .onnx_qlinear import export_qlinear

        return export_qlinear(model, path, example, calib)

    g = _Graph()
    xd = g.cast("x", "DOUBLE")
    q = g.op("Round", [g.op("Div", [xd, g.const(np.array(model.input_scale, np.float64), "s_in")])])
    q = g.op("Clip", [q, g.const(np.array(-model.input_qmax, np.float64)), g.const(np.array(model.input_qmax, np.float64))])
    env = {0: g.cast(q, "INT32")}
    unsigned = unsigned_values(model)
    for step, (ins, out) in zip(model.steps, model.program):
        env[out] = _export_step(g, step, [env[i] for i in ins], unsigned[ins[0]])
    z = g.cast(env[model.output_id], "DOUBLE")
    scale = model.output_scale.numpy()
    y = g.op("Mul", [z, g.const(scale.reshape(scale.shape) if scale.ndim else scale, "s_out")])
    g.nodes.append(g.h.make_node("Cast", [y], ["logits"], to=TensorProto.FLOAT))
    shape = ["N"] + list(example.shape[1:])
    with torch.no_grad():
        out_shape = ["N"] + list(model(example[:1]).shape[1:])
    graph = g.h.make_graph(g.nodes, "winoq_integer", [g.h.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                           [g.h.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], g.inits)
    proto = g.h.make_model(graph, opset_imports=[g.h.make_opsetid("", OPSET)], producer_name="winoq")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto


def cpu_session(path, threads: int | None = None):
    """An onnxruntime CPU session of ``path``; ``threads``: intra-op threads (one inter-op thread),
    None for onnxruntime's default."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    """Run an exported model in onnxruntime on the CPU."""
    sess = cpu_session(path)
    return torch.from_numpy(sess.run(["logits"], {"x": x.numpy().astype(np.float32)})[0])
