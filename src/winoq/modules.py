"""Directly quantized layers (no Winograd): convs that are not eligible (stride 2,
1x1, ...) or when Winograd is off, and linear layers. Same formats and group
rule as the Winograd layer: weights group-wise along input channels (scale per
output channel and group of ``group_size`` input channels; per output channel when
``group_size`` is None); activations dynamic. A conv is a GEMM whose reduction runs over
(channel, ky, kx), so by default its input has one scale per sample, pixel and group of
``group_size`` channels (within one conv group); ``activation_granularity="sample"`` keeps
one scale per sample and group over all pixels. Linear inputs: one scale per row (token)
and group. Where the scales live is described once in :mod:`winoq.granularity`."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .formats import parse
from .granularity import CONV_INPUT, DirectGranularity, linear_input, linear_weight
from .quantizers import Granularity, compute_scale, fake_quantize, fake_quantize_dynamic


def _fq(x, fmt, gran, zero_point: bool = False):
    return x if fmt is None else fake_quantize_dynamic(x, fmt, gran, zero_point=zero_point)


def quantize_activation(layer: nn.Module, stage: str, x: torch.Tensor, fmt, gran: Granularity,
                        keep: tuple[int, ...], clip=1.0, zero_point: bool = False) -> torch.Tensor:
    """Fake-quantize an activation of ``layer``: dynamic scales (``gran``, from the
    values themselves; with ``zero_point``, asymmetric) unless the layer carries static
    ranges (``layer.act_ranges``, a ``StaticRanges``: one calibrated symmetric scale per
    channel group of ``gran.axis``, per index of the ``keep`` dims, shared by everything else)."""
    if fmt is None:
        return x
    ranges = getattr(layer, "act_ranges", None)
    if ranges is None or (ranges.stages is not None and stage not in ranges.stages):
        return fake_quantize_dynamic(x, fmt, gran, clip_ratio=clip, zero_point=zero_point)
    return ranges(stage, x, fmt, gran.axis, gran.group_size, keep)


@contextlib.contextmanager
def replaced_quantized_weight(layer: nn.Module, replacement):
    """For the duration, ``layer.quantized_weight`` (shadowed on the instance only) returns
    ``replacement``'s result, and no gradient reaches the layer's own parameters: only what
    ``replacement`` closes over is learned."""
    saved = [(p, p.requires_grad) for p in layer.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    layer.quantized_weight = replacement
    try:
        yield
    finally:
        layer.__dict__.pop("quantized_weight", None)
        for p, req in saved:
            p.requires_grad_(req)


@dataclass
class WeightView:
    """A quantized layer's weights in the domain its quantizer works on (the transformed
    ``U = G' g G'^T`` of a Winograd layer, with its current transform scales), with the
    format, scale granularity and scale method the layer itself uses."""

    weight: torch.Tensor
    fmt: object
    gran: Granularity
    method: str

    def scale(self) -> torch.Tensor:
        return compute_scale(self.weight, self.fmt, self.gran, self.method)[0]


class DirectWeightsMixin:
    """What learned rounding, block reconstruction, format search and checkpoints need from a
    directly quantized layer (``QuantConv2d``, ``QuantLinear``): its weights are rounded as they are."""

    def rounding_format(self):
        """The weight format (None: the weights stay float)."""
        return self.weight_format

    def rounding_target(self) -> WeightView:
        """The weights learned rounding rounds, with the layer's own scale granularity."""
        w = self.weight.detach()
        return WeightView(w, self.weight_format, self.weight_gran(), "minmax")

    def weight_gran(self) -> Granularity:
        """The weights' scale granularity, from the layer's one description (``granularity.weight``)."""
        return self.granularity.weight.granularity(linear_weight(self.weight.ndim))

    @torch.no_grad()
    def set_rounded_weight(self, w_q: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Weights already on the grid become the layer's weights (the layer re-derives the same scale)."""
        self.weight.copy_(w_q)

    def set_weight_format(self, fmt) -> None:
        self.weight_format = parse(fmt)
        self.weight_scale = None  # scales loaded for another grid no longer apply

    @torch.no_grad()
    def rounding_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the layer's activation quantizer passes it to the weights."""
        x = x.to(self.weight.dtype).detach()
        return x if self.act_format is None else self.quantize_input(x, dynamic=True)

    def rounding_layer_fn(self):
        """``fn(x, w)``: the layer on already quantized inputs with weights ``w`` (no gradient to
        the layer's own parameters)."""
        bias = None if self.bias is None else self.bias.detach()
        return lambda xb, wb: self.apply_weight(xb, wb, bias)

    def rounding_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's full-precision output on ``rounding_inputs`` (what learned rounding matches)."""
        with torch.no_grad():
            return self.rounding_layer_fn()(x, self.weight.detach())

    def weights_replaced_by(self, fn):
        """For the duration, the quantized weights are ``fn()`` (used as given) and no gradient
        reaches the layer's own parameters."""
        return replaced_quantized_weight(self, fn)

    def frozen_weight(self) -> torch.Tensor | None:
        """Quantized weights with the scale loaded from a checkpoint (``weight_scale``), else None."""
        scale = getattr(self, "weight_scale", None)
        return None if scale is None else fake_quantize(self.weight, self.weight_format, scale)


class QuantConv2d(DirectWeightsMixin, nn.Conv2d):
    """nn.Conv2d with fake-quantized weights and dynamically quantized inputs."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weights, activations, group_size: int | None,
                  activation_granularity: str = "fine") -> "QuantConv2d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        layer.load_state_dict(conv.state_dict())
        layer = _with_formats(layer, weights, activations, group_size)
        layer.activation_granularity = activation_granularity
        return layer

    activation_granularity = "fine"  # winoq.granularity.ACTIVATION_CHOICES
    activation_zero_point = False  # set from Recipe.input_zero_points by winoq.granularity.apply_recipe
    weight_tapwise = False  # one weight scale per kernel position too (Recipe.direct_weight_scales)

    @property
    def granularity(self) -> DirectGranularity:
        return DirectGranularity.make(self.group_size, self.activation_granularity, zero_point=self.activation_zero_point,
                                      weight_tapwise=self.weight_tapwise)

    def quantized_weight(self) -> torch.Tensor:
        frozen = self.frozen_weight()
        if frozen is not None:
            return frozen
        return _fq(self.weight, self.weight_format, self.weight_gran())

    def quantize_input(self, x: torch.Tensor, dynamic: bool = False) -> torch.Tensor:
        """The input stage, viewed (N, groups, C/groups, H, W) so that no channel group
        straddles two conv groups (one loud group must not zero the others);
        ``dynamic=True`` ignores static ranges."""
        stage = self.granularity.input
        gran = stage.granularity(CONV_INPUT)
        if dynamic:
            return self._per_conv_group(x, lambda t: _fq(t, self.act_format, gran, stage.zero_point))
        return self._per_conv_group(x, lambda t: quantize_activation(self, "input", t, self.act_format, gran,
                                                                     stage.static_keep(CONV_INPUT),
                                                                     zero_point=stage.zero_point))

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
        return self._conv_forward(x, w, bias)

    def expected_input(self) -> str:
        return f"(N, {self.in_channels}, H, W)"

    def accepts_input(self, x: torch.Tensor) -> bool:
        return x.ndim == 4 and x.shape[1] == self.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)

    def _per_conv_group(self, x, fn):
        nb, c = x.shape[:2]
        return fn(x.reshape(nb, self.groups, c // self.groups, *x.shape[2:])).reshape(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + _formats_repr(self)


class QuantLinear(DirectWeightsMixin, nn.Linear):
    """nn.Linear with fake-quantized weights and dynamically quantized inputs
    (one scale per row and group of input features)."""

    @classmethod
    def from_linear(cls, lin: nn.Linear, weights, activations, group_size: int | None) -> "QuantLinear":
        layer = cls(lin.in_features, lin.out_features, lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
        layer.load_state_dict(lin.state_dict())
        return _with_formats(layer, weights, activations, group_size)

    activation_zero_point = False  # set from Recipe.input_zero_points by winoq.granularity.apply_recipe

    @property
    def granularity(self) -> DirectGranularity:
        return DirectGranularity.make(self.group_size, linear=True, zero_point=self.activation_zero_point)

    def quantized_weight(self) -> torch.Tensor:
        frozen = self.frozen_weight()
        if frozen is not None:
            return frozen
        return _fq(self.weight, self.weight_format, self.weight_gran())

    def quantize_input(self, x: torch.Tensor, dynamic: bool = False) -> torch.Tensor:
        """The input stage: one scale per row (token) and group of input features."""
        stage = self.granularity.input
        layout = linear_input(x.ndim)
        if dynamic:
            return _fq(x, self.act_format, stage.granularity(layout), stage.zero_point)
        return quantize_activation(self, "input", x, self.act_format, stage.granularity(layout),
                                   stage.static_keep(layout), zero_point=stage.zero_point)

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
        return F.linear(x, w, bias)

    def expected_input(self) -> str:
        return f"(N, ..., {self.in_features})"

    def accepts_input(self, x: torch.Tensor) -> bool:
        return x.ndim >= 2 and x.shape[-1] == self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + _formats_repr(self)


def _with_formats(layer, weights, activations, group_size):
    """Attach the weight / activation formats and group size every quantized layer carries."""
    layer.weight_format = None if weights is None else parse(weights)
    layer.act_format = None if activations is None else parse(activations)
    layer.group_size = group_size
    layer.act_ranges = None  # dynamic activation scales unless static ranges are calibrated
    layer.register_buffer("weight_scale", None)  # set by winoq.load: the weights' saved scales, used as they are
    return layer


def _formats_repr(layer) -> str:
    return f", W={_name(layer.weight_format)}, A={_name(layer.act_format)}, group_size={layer.group_size}"


def _name(fmt) -> str:
    return "float" if fmt is None else fmt.name
