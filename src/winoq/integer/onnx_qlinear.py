"""Fast ONNX export of an :class:`IntegerModel`: onnxruntime's int8 kernels (``ops="qlinear"``).

The exact export (:mod:`.onnx_export`, ``ConvInteger`` + int64 dyadic requantization) reproduces
the integer model bit for bit, but onnxruntime runs ``ConvInteger`` through a slow generic path
(measured 10-20x slower than its fused ``QLinearConv`` on ResNet-20, docs/results.md §18). This
export maps the same integer program onto the operators deployment runtimes optimize:

* a conv whose int32 accumulator is requantized once becomes one ``QLinearConv``: uint8 codes
  in (zero point 128 for signed codes, 0 for unsigned ones), the integer model's int8 weight codes
  and int32 bias, and as per-channel "weight scale" the layer's dyadic multiplier ``b / 2^c``
  (input and output scales 1), so onnxruntime's requantization is ``round(acc * b / 2^c)`` in
  float32 instead of the exact integer shift;
* a residual add becomes ``QLinearAdd`` (com.microsoft): a conv branch is first requantized to
  uint8 at ``f`` times the add's output scale (``f >= 1`` chosen on ``calib`` so that the branch
  fits 8 bits; the integer model adds the int32 accumulators instead), an activation branch enters
  with its dyadic multiplier as its scale;
* clamps narrower than uint8 saturation (``[-127, 127]``, ``[0, 127]``, 4-bit ranges) are a
  ``Clip`` on the uint8 codes; max pooling, slicing, padding (with the zero point) and flattening
  run on the uint8 codes;
* global average pooling is ``QLinearGlobalAveragePool`` (com.microsoft) with the pool's dyadic
  multiplier times H W as input scale; a channel concatenation (U-Net skips) is ``QLinearConcat``
  (com.microsoft) with each input's dyadic multiplier as its scale; the pixel shuffle of a
  transposed conv is ``DepthToSpace`` on the codes;
* everything else (linears, accumulators read twice) runs exactly as
  in the exact export, on int32 codes.

So the graph computes the integer model with different rounding at the requantizations and an
8-bit intermediate in each residual conv branch: close to, not equal to, the integer model
(agreement measured in docs/results.md §18 and checked in the tests). Integer Winograd layers run
as their direct twins, as in the exact export. Weight codes must fit int8 and accumulators int32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import layers as L
from .model import IntegerModel
from .onnx_export import OPSET, _export_step, _Graph, unsigned_values

MS_DOMAIN = "com.microsoft"


@dataclass
class _Val:
    """A value of the exported graph: uint8 codes (``zp`` = zero point), int32 codes or
    accumulator (``zp`` None), or a conv not emitted yet (``pending``: its consumer fuses it)."""

    name: str | None
    zp: int | None = None
    pending: object = None       # (conv step, input value id) of a fusable conv


def _conv_parts(step):
    """(direct IntConv2d, extra dyadic rescale (b, c) or None) of a conv or integer Winograd step."""
    from .winograd import IntWinogradConv2d

    if isinstance(step, IntWinogradConv2d):
        return step.direct, (step.direct_b.reshape(-1), step.direct_c.reshape(-1))
    return step, None


def _zero_point(qmin: int) -> int:
    """uint8 zero point of codes clamped at ``qmin``: 0 for unsigned codes, 128 for signed ones."""
    return 0 if qmin >= 0 else 128


def _scale(b: torch.Tensor, c: torch.Tensor) -> np.ndarray:
    """One dyadic multiplier ``b / 2^c`` as an onnxruntime float32 scale."""
    return np.array(_multiplier(b, c, 1)[0], np.float32)


def _multiplier(b: torch.Tensor, c: torch.Tensor, channels: int, rescale=None) -> np.ndarray:
    """Per-channel float multiplier ``b / 2^c`` (times the twin's rescale), float64 -> float32."""
    m = b.double().reshape(-1) / torch.pow(2.0, c.double().reshape(-1))
    if rescale is not None:
        m = m * rescale[0].double() / torch.pow(2.0, rescale[1].double())
    return np.broadcast_to(m.numpy(), (channels,)).astype(np.float32).copy()


class _QGraph:
    def __init__(self, model: IntegerModel, branch_factors: dict[int, float], hw: dict[int, int]):
        self.model, self.g, self.f, self.hw = model, _Graph(), branch_factors, hw
        self.vals: dict[int, _Val] = {}
        users: dict[int, list[int]] = {}
        for j, (ins, _) in enumerate(model.program):
            for i in ins:
                users.setdefault(i, []).append(j)
        self.users = users
        self.producer = {o: step for step, (_, o) in zip(model.steps, model.program)}
        self.unsigned = unsigned_values(model)

    # -- representations
    def const(self, a, hint="c"):
        return self.g.const(a, hint)

    def u8(self, vid: int, zp: int | None = None) -> tuple[str, int]:
        """Value ``vid`` as uint8 codes; int32 codes are shifted by ``zp`` (default: 0 for unsigned
        codes, 128 for signed ones)."""
        v = self.materialize(vid)
        if v.zp is not None:
            return v.name, v.zp
        zp = (0 if self.unsigned[vid] else 128) if zp is None else zp
        t = self.g.op("Add", [v.name, self.const(np.array(zp, np.int32))])
        return self.g.cast(t, "UINT8"), zp

    def i32(self, vid: int) -> str:
        v = self.materialize(vid)
        if v.zp is None:
            return v.name
        t = self.g.cast(v.name, "INT32")
        return self.g.op("Sub", [t, self.const(np.array(v.zp, np.int32))])

    def materialize(self, vid: int) -> _Val:
        """A pending conv whose consumer cannot fuse it runs as the exact ConvInteger."""
        v = self.vals[vid]
        if v.pending is not None:
            step, src = v.pending
            v = self.vals[vid] = _Val(_export_step(self.g, step, [self.i32(src)], self.unsigned[src]))
        return v

    def clip_u8(self, name: str, zp: int, qmin: int, qmax: int) -> str:
        lo, hi = qmin + zp, qmax + zp
        if lo <= 0 and hi >= 255:
            return name
        return self.g.op("Clip", [name, self.const(np.array(max(lo, 0), np.uint8)),
                                  self.const(np.array(min(hi, 255), np.uint8))])

    # -- fused conv
    def fusable(self, step, out_id: int) -> bool:
        conv, _ = _conv_parts(step)
        if not isinstance(conv, L.IntConv2d) or conv.wide or isinstance(conv.padding, str):
            return False
        if conv.weight.abs().max() > 127:
            return False
        users = self.users.get(out_id, [])
        if len(users) != 1 or out_id == self.model.output_id:
            return False
        return isinstance(self.model.steps[users[0]], (L.Requantize, L.IntAdd))

    def qlinear_conv(self, vid: int, b, c, y_zp: int, scale: float = 1.0) -> str:
        """QLinearConv of the pending conv ``vid``: codes of ``acc * b / 2^c / scale``."""
        step, src = self.vals[vid].pending
        conv, rescale = _conv_parts(step)
        k = conv.weight.shape[0]
        x, x_zp = self.u8(src)
        ph, pw = (conv.padding, conv.padding) if isinstance(conv.padding, int) else conv.padding
        mult = _multiplier(b, c, k, rescale) / np.float32(scale)
        ins = [x, self.const(np.array(1.0, np.float32)), self.const(np.array(x_zp, np.uint8)),
               self.const(conv.weight.numpy().astype(np.int8), "w"), self.const(mult, "w_scale"),
               self.const(np.zeros(k, np.int8)), self.const(np.array(1.0, np.float32)),
               self.const(np.array(y_zp, np.uint8)), self.const(conv.bias.numpy().astype(np.int32), "bias")]
        return self.g.op("QLinearConv", ins, strides=list(conv.stride), pads=[ph, pw, ph, pw],
                         dilations=list(conv.dilation), group=conv.groups)

    # -- steps
    def step(self, step, ins: tuple[int, ...], out: int) -> None:
        from .winograd import IntWinogradConv2d

        g = self.g
        if isinstance(step, (L.IntConv2d, IntWinogradConv2d)) and self.fusable(step, out):
            self.vals[out] = _Val(None, pending=(step, ins[0]))
            return
        if isinstance(step, L.Requantize) and self.vals[ins[0]].pending is not None:
            zp = _zero_point(step.qmin)
            y = self.qlinear_conv(ins[0], step.b, step.c, zp)
            self.vals[out] = _Val(self.clip_u8(y, zp, step.qmin, step.qmax), zp)
            return
        if isinstance(step, L.IntAdd) and all(self.vals[i].pending is not None or self.vals[i].zp is not None
                                              or self._is_codes(i) for i in ins):
            zp = _zero_point(step.qmin)
            parts = []
            for i, (b, c) in zip(ins, ((step.ba, step.ca), (step.bb, step.cb))):
                if self.vals[i].pending is not None:
                    f = self.f.get(i, 1.0)
                    parts += [self.qlinear_conv(i, b, c, 128, f), self.const(np.array(f, np.float32)),
                              self.const(np.array(128, np.uint8))]
                else:
                    name, izp = self.u8(i)
                    parts += [name, self.const(_scale(b, c)), self.const(np.array(izp, np.uint8))]
            parts += [self.const(np.array(1.0, np.float32)), self.const(np.array(zp, np.uint8))]
            out_name = g.name("qadd")
            g.nodes.append(g.h.make_node("QLinearAdd", parts, [out_name], domain=MS_DOMAIN))
            self.vals[out] = _Val(self.clip_u8(out_name, zp, step.qmin, step.qmax), zp)
            return
        if isinstance(step, L.IntGlobalAvgPool) and self.vals[ins[0]].zp is not None and step.b.numel() == 1:
            # round(mean(x - zp) * x_scale / y_scale) with x_scale = H W b / 2^c: the sum times b / 2^c
            self.vals[out] = self.global_avg_pool(step, ins[0])
            return
        if isinstance(step, L.IntConcat) and all(self.vals[i].pending is None for i in ins) \
                and all(self.vals[i].zp is not None or self._is_codes(i) for i in ins):
            self.vals[out] = self.concat(step, ins)
            return
        if isinstance(step, (L.MaxPool, L.Slice, L.Flatten, L.ZeroPad, L.ClampMin, L.PixelShuffle)) \
                and self.vals[ins[0]].zp is not None:
            self.vals[out] = self.codes_op(step, ins[0])
            return
        self.vals[out] = _Val(_export_step(g, step, [self.i32(i) for i in ins], self.unsigned[ins[0]]))

    def _is_codes(self, vid: int) -> bool:
        """Activation codes, not an accumulator: only convs and linears produce accumulators."""
        from .winograd import IntWinogradConv2d

        return not isinstance(self.producer.get(vid), (L.IntConv2d, L.IntLinear, IntWinogradConv2d))

    def global_avg_pool(self, step, vid: int) -> _Val:
        g, v = self.g, self.vals[vid]
        zp = _zero_point(step.qmin)
        scale = _scale(step.b, step.c) * np.float32(self.hw[vid])
        name = g.name("qgap")
        g.nodes.append(g.h.make_node(
            "QLinearGlobalAveragePool", [v.name, self.const(scale),
                                         self.const(np.array(v.zp, np.uint8)), self.const(np.array(1.0, np.float32)),
                                         self.const(np.array(zp, np.uint8))], [name], domain=MS_DOMAIN, channels_last=0))
        return _Val(self.clip_u8(name, zp, step.qmin, step.qmax), zp)

    def concat(self, step, ins) -> _Val:
        """QLinearConcat: each input's codes times its dyadic multiplier (as a float scale)."""
        g = self.g
        zp = _zero_point(step.qmin)
        parts = [self.const(np.array(1.0, np.float32)), self.const(np.array(zp, np.uint8))]
        for i, (b, c) in zip(ins, step.pairs()):
            name, izp = self.u8(i)
            parts += [name, self.const(_scale(b, c)), self.const(np.array(izp, np.uint8))]
        out = g.name("qconcat")
        g.nodes.append(g.h.make_node("QLinearConcat", parts, [out], domain=MS_DOMAIN, axis=1))
        return _Val(self.clip_u8(out, zp, step.qmin, step.qmax), zp)

    def codes_op(self, step, vid: int) -> _Val:
        """Pass-through ops on uint8 codes (the zero point stays)."""
        g, v = self.g, self.vals[vid]
        if isinstance(step, L.ClampMin):
            return _Val(g.op("Max", [v.name, self.const(np.array(v.zp, np.uint8))]), v.zp)
        if isinstance(step, L.ZeroPad):   # pad with the zero point: the real zero
            return _Val(g.pad(v.name, list(step.pad), np.array(v.zp, np.uint8)), v.zp)
        if isinstance(step, L.MaxPool):
            return _Val(g.max_pool(v.name, step.args), v.zp)
        # Slice / Flatten / PixelShuffle commute with the zero-point shift: the exact export's nodes
        return _Val(_export_step(g, step, [v.name]), v.zp)


def branch_factors(model: IntegerModel, calib: torch.Tensor, headroom: float = 1.0):
    """For every conv accumulator read by a residual add: ``f >= 1`` such that the branch, as codes
    at ``f`` times the add's output scale, fits in [-128, 127] on ``calib`` (times ``headroom``);
    and the spatial size of every value (for global pooling)."""
    peaks: dict[int, float] = {}
    wanted = {}
    for (ins, _), step in zip(model.program, model.steps):
        if isinstance(step, L.IntAdd):
            for i, (b, c) in zip(ins, ((step.ba, step.ca), (step.bb, step.cb))):
                wanted[i] = b.double() / torch.pow(2.0, c.double())
    env = {0: model.quantize_input(calib)}
    hw = {0: int(np.prod(env[0].shape[2:]))}
    with torch.no_grad():
        for step, (ins, out) in zip(model.steps, model.program):
            env[out] = step(*(env[i] for i in ins))
            hw[out] = int(np.prod(env[out].shape[2:]))
            if out in wanted:
                peaks[out] = float((env[out].double() * wanted[out]).abs().max())
    return {i: max(1.0, headroom * p / 127.0) for i, p in peaks.items()}, hw


def export_qlinear(model: IntegerModel, path, example: torch.Tensor, calib: torch.Tensor | None = None,
                   headroom: float = 1.0):
    """Write ``model`` as an ONNX graph of onnxruntime's fused int8 operators (see the module doc).
    ``calib``: inputs that set the residual branches' 8-bit ranges (default: ``example``; give a few
    real batches)."""
    import onnx
    from onnx import TensorProto

    q = _QGraph(model, *branch_factors(model, example if calib is None else calib, headroom))
    g = q.g
    x8 = g.op("QuantizeLinear", ["x", g.const(np.array(model.input_scale, np.float32), "s_in"),
                                 g.const(np.array(128, np.uint8))])
    q.vals[0] = _Val(q.clip_u8(x8, 128, -model.input_qmax, model.input_qmax), 128)
    for step, (ins, out) in zip(model.steps, model.program):
        q.step(step, ins, out)
    z = g.cast(q.i32(model.output_id), "DOUBLE")
    scale = model.output_scale.numpy()
    y = g.op("Mul", [z, g.const(scale, "s_out")])
    g.nodes.append(g.h.make_node("Cast", [y], ["logits"], to=TensorProto.FLOAT))
    with torch.no_grad():
        out_shape = ["N"] + list(model(example[:1]).shape[1:])
    graph = g.h.make_graph(g.nodes, "winoq_qlinear",
                           [g.h.make_tensor_value_info("x", TensorProto.FLOAT, ["N"] + list(example.shape[1:]))],
                           [g.h.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], g.inits)
    proto = g.h.make_model(graph, opset_imports=[g.h.make_opsetid("", OPSET), g.h.make_opsetid(MS_DOMAIN, 1)],
                           producer_name="winoq")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto
