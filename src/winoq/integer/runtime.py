"""Fast execution of an :class:`~winoq.integer.model.IntegerModel`: the same output codes as
``forward_integer``, with the program's steps fused and run on compiled int8 kernels.

``compile_model(model)`` plans the program once:

* a conv step (direct :class:`~winoq.integer.layers.IntConv2d` or the integer Winograd step) whose
  accumulator is read only by one requantization or one residual add becomes one fused op, run
  where that step was: the conv, then the requantization (and the add) in its epilogue, int8
  codes out (:mod:`winoq.kernels.int_graph`; the Winograd step's epilogue runs as a separate pass
  over its int32 result). When two convs feed one add, the larger one fuses;
* a requantization or add on its own runs the compiled epilogue;
* every other step (pooling, slicing, the classifier) runs its PyTorch forward.

Activations pass between ops as int8 channels-last codes, as in fast int8 runtimes; a value whose
calibrated range does not fit int8 (8-bit unsigned codes) stays int32 and its steps run in PyTorch.
Without the compiled kernels every op runs its step's PyTorch forward (same integers, slower).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import layers as L
from .model import IntegerModel
from .winograd import IntWinogradConv2d

__all__ = ["CompiledIntegerModel", "compile_model"]

_PASSTHROUGH = (L.ClampMin, L.MaxPool, L.Slice, L.ZeroPad, L.Flatten, L.PixelShuffle)


@dataclass
class _Op:
    """One op of the plan: ``step`` on ``ins`` -> ``out``. A fused conv also holds its consumer (the
    requantization or add it absorbed, with that step's inputs ``consumer_ins``), the compiled
    epilogue doing the consumer's work (``epi``) and the value the epilogue adds (``other``). A
    stand-alone requantization or add has ``epi`` and no ``consumer``."""

    step: nn.Module
    ins: tuple[int, ...]
    out: int
    epi: object = None
    other: int | None = None
    consumer: nn.Module | None = None
    consumer_ins: tuple[int, ...] = ()

    def __post_init__(self):
        self.settle()

    def settle(self) -> None:
        """Derive ``kind``, ``acc`` (the fused conv's accumulator: the consumer's input the conv
        makes) and ``reads`` (every value the op reads) once, not on every call."""
        if self.consumer is not None:
            self.kind = "conv+add" if self.other is not None else "conv+requantize"
        else:
            self.kind = "epilogue" if self.epi is not None else "step"
        self.acc = None if self.consumer is None else next(v for v in self.consumer_ins if v != self.other)
        self.reads = self.ins + tuple(v for v in self.consumer_ins if v not in self.ins and v != self.acc)


def _code_ranges(model: IntegerModel) -> dict[int, tuple[int, int] | None]:
    """(qmin, qmax) of every value holding activation codes; None for accumulators."""
    ranges: dict[int, tuple[int, int] | None] = {0: (-model.input_qmax, model.input_qmax)}
    for step, (ins, out) in zip(model.steps, model.program):
        if isinstance(step, (L.Requantize, L.IntAdd, L.IntConcat, L.IntGlobalAvgPool)):
            ranges[out] = (step.qmin, step.qmax)
        elif isinstance(step, _PASSTHROUGH) and ranges.get(ins[0]) is not None:
            lo, hi = ranges[ins[0]]
            ranges[out] = (max(lo, 0), hi) if isinstance(step, L.ClampMin) else (lo, hi)
        else:
            ranges[out] = None
    return ranges


def _compiled_conv(step: nn.Module) -> bool:
    from ..kernels import int_step

    if isinstance(step, L.IntConv2d):
        return step.compiled()
    if isinstance(step, IntWinogradConv2d):
        return step.kernel == "auto" and int_step.available() and int_step.cached_reason(step) is None
    return False


def _weights(step: nn.Module) -> int:
    """Weight codes of a conv step (a Winograd step's transformed weights U)."""
    return (step.weight if isinstance(step, L.IntConv2d) else step.u).numel()


def _epilogue_of(step: nn.Module, ins: tuple[int, ...], acc: int):
    """The compiled epilogue doing the work of ``step`` (a ``Requantize`` or ``IntAdd`` on ``ins``)
    on value ``acc``, and the value it adds (None for a requantization)."""
    from ..kernels.int_graph import Epilogue

    if isinstance(step, L.Requantize):
        return Epilogue(step.b, step.c, step.qmin, step.qmax), None
    first = ins[0] == acc
    b, c = (step.ba, step.ca) if first else (step.bb, step.cb)
    ob, oc = (step.bb, step.cb) if first else (step.ba, step.ca)
    return Epilogue(b, c, step.qmin, step.qmax, ob, oc), ins[1] if first else ins[0]


def _fits(r) -> bool:
    from ..kernels.int_graph import fits_int8

    return r is not None and fits_int8(*r)


def plan(model: IntegerModel) -> list[_Op]:
    """The fused ops of ``model``'s program (see the module doc)."""
    from ..kernels import int_graph

    ops = [_Op(s, ins, out) for s, (ins, out) in zip(model.steps, model.program)]
    if not int_graph.available():
        return ops
    ranges = _code_ranges(model)
    readers: dict[int, list[int]] = {}
    for i, (ins, out) in enumerate(model.program):
        for v in ins:
            readers.setdefault(v, []).append(i)
    # a conv read by one requantization or add is emitted at that step, fused: its inputs are older,
    # and nothing else reads its accumulator
    fused_at: dict[int, tuple[int, _Op]] = {}  # consumer step -> (conv step, fused op)
    for i, op in enumerate(ops):
        users = readers.get(op.out, [])
        if not (_compiled_conv(op.step) and _fits(ranges[op.ins[0]]) and len(users) == 1 and op.out != model.output_id):
            continue
        j = users[0]
        consumer, (c_ins, c_out) = model.steps[j], model.program[j]
        if isinstance(consumer, (L.Requantize, L.IntAdd)) and _fits((consumer.qmin, consumer.qmax)) \
                and c_ins.count(op.out) == 1:
            if j in fused_at and _weights(ops[fused_at[j][0]].step) >= _weights(op.step):
                continue  # two convs into one add: the larger one fuses (the other writes its int32 accumulator)
            epi, other = _epilogue_of(consumer, c_ins, op.out)
            fused_at[j] = (i, _Op(op.step, op.ins, c_out, epi, other, consumer, c_ins))
    moved = {i for i, _ in fused_at.values()}
    planned = []
    for i, op in enumerate(ops):
        if i in fused_at:
            planned.append(fused_at[i][1])
        elif i not in moved:
            if isinstance(op.step, (L.Requantize, L.IntAdd)) and _fits((op.step.qmin, op.step.qmax)):
                op.epi, op.other = _epilogue_of(op.step, op.ins, op.ins[0])
                op.settle()
            planned.append(op)
    return planned


class CompiledIntegerModel(nn.Module):
    """``model`` run by the fused plan of :func:`plan`: ``forward_integer(q)`` equals
    ``model.forward_integer(q)``; ``forward(x)`` quantizes, runs and dequantizes like ``model``."""

    def __init__(self, model: IntegerModel):
        super().__init__()
        self.model = model
        self.ops = plan(model)
        last = {}
        for n, op in enumerate(self.ops):
            for v in op.reads:
                last[v] = n
        last.pop(model.output_id, None)
        self._last_use = last

    def summary(self) -> dict[str, int]:
        """How many ops of each kind the plan has ("conv+requantize", "conv+add", "epilogue", "step")."""
        out: dict[str, int] = {}
        for op in self.ops:
            out[op.kind] = out.get(op.kind, 0) + 1
        return out

    @staticmethod
    def _run_op(op: _Op, env: dict) -> torch.Tensor:
        from ..kernels import int_graph, int_step

        args = [env[v] for v in op.ins]
        other = env[op.other] if op.other is not None else None
        usable = op.epi is not None and all(
            t.dim() == 4 and t.dtype in (torch.int8, torch.int32) for t in args + ([other] if other is not None else []))
        if op.kind == "epilogue":
            return int_graph.requantize(args[0], op.epi, other) if usable else op.step(*args)
        if op.kind == "step":
            return op.step(*args)
        if not usable:  # e.g. an int64 input from a wide step: the two steps in PyTorch
            y = op.step(*args)
            return op.consumer(*(y if v == op.acc else env[v] for v in op.consumer_ins))
        if isinstance(op.step, L.IntConv2d):
            return int_graph.conv(op.step, args[0], op.epi, other)
        return int_graph.requantize(int_step.forward(op.step, args[0]), op.epi, other)

    @torch.no_grad()
    def forward_integer(self, q: torch.Tensor) -> torch.Tensor:
        if q.is_floating_point():
            raise TypeError("forward_integer takes the integer codes of quantize_input(x), not a float tensor")
        if q.dtype == torch.int8 or (q.dim() == 4 and q.numel() and _fits(tuple(int(v) for v in torch.aminmax(q)))):
            q = q.to(torch.int8).contiguous(memory_format=torch.channels_last)
        env = {0: q}
        for n, op in enumerate(self.ops):
            env[op.out] = self._run_op(op, env)
            for v in op.reads:
                if self._last_use.get(v) == n:
                    env.pop(v, None)
        y = env[self.model.output_id]
        return (y.to(torch.int32) if y.dtype == torch.int8 else y).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.dequantize(self.forward_integer(self.quantize_input(x)))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``model.quantize_input(x)``'s integers; as int8 channels-last codes in one compiled pass where
        they fit (the float64 PyTorch definition takes several passes over the image)."""
        from ..kernels import int_graph

        m = self.model
        if x.dtype == torch.float32 and x.dim() == 4 and x.device.type == "cpu" and m.input_qmax <= 127 \
                and int_graph.available():
            return int_graph.quantize_input(x, m.input_scale, m.input_qmax)
        return m.quantize_input(x)


def compile_model(model: IntegerModel) -> CompiledIntegerModel:
    """``model`` with its program fused and run on the compiled int8 kernels (same output codes)."""
    if not isinstance(model, IntegerModel):
        raise TypeError(f"compile_model takes the IntegerModel of winoq.integer.convert(model, calib), got "
                        f"{type(model).__name__}")
    return CompiledIntegerModel(model)
