"""Where each stage's scales live: one description read by every pipeline.

A :class:`StageGranularity` says which indices own a scale: always the channel group
(``group_size`` consecutive channels, never straddling two conv groups) and the
listed ``per`` kinds ("sample", "pixel", "tile", "block", "tap", "row",
"out_channel"); every other index shares it. ``granularity(layout)`` turns that into the
:class:`~winoq.quantizers.Granularity` of one tensor layout, a tuple naming each dim:

==========================  ==============================================================
dim name                    kind
==========================  ==============================================================
``channel``                 the group axis (cut into groups of ``group_size``)
``conv_group``              always its own scale (integer sums stay in one conv group)
``out_channel``             output channel of a weight
``sample``                  batch index
``y``, ``x``                pixel coordinates ("pixel")
``ty``, ``tx``              tile coordinates ("tile")
``by``, ``bx``              spatial-block coordinates ("block")
``tap``, ``ta``, ``tb``     Winograd tap ("tap")
``row``                     a token / row index of a linear input ("row")
==========================  ==============================================================

The emulated layers (:mod:`winoq.modules`, :mod:`winoq.winograd.quantized`), the integer
twin (``forward_integer``) and the kernels (:mod:`winoq.kernels`) all read these objects,
so a change of granularity is one change here. ``layer_granularity(layer)`` returns a
layer's stages; the defaults are chosen by measurement (docs/results.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .quantizers import Granularity

ALL = 1 << 30  # a group size larger than any axis: the whole axis is one group
KINDS = ("sample", "pixel", "tile", "block", "tap", "row", "out_channel")
_KIND = {"sample": "sample", "y": "pixel", "x": "pixel", "ty": "tile", "tx": "tile", "by": "block", "bx": "block",
         "tap": "tap", "ta": "tap", "tb": "tap", "row": "row", "out_channel": "out_channel",
         "conv_group": "conv_group", "channel": "channel"}

# Recipe.activation_granularity -> (direct conv input, Winograd spatial input)
ACTIVATION_CHOICES = {
    "fine": (("sample", "pixel"), ("sample", "tile")),   # GEMM blocks; integer-transformable tiles
    "block": (("sample", "pixel"), ("sample", "block")),  # Winograd input per m x m pixel block (emulated only)
    "sample": (("sample",), ("sample",)),                 # one scale per sample and group over all pixels
}


@dataclass(frozen=True)
class StageGranularity:
    """Scales of one stage: one per channel group (``group_size`` channels; None: every
    channel of a conv group shares) and per index of each kind in ``per``; with
    ``zero_point`` each dynamic scale also has an integer zero point (asymmetric min / max)."""

    group_size: int | None = 32
    per: tuple[str, ...] = ("sample",)
    zero_point: bool = False

    def __post_init__(self):
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        unknown = set(self.per) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown granularity kinds {sorted(unknown)}; use {', '.join(KINDS)}")
        object.__setattr__(self, "per", tuple(self.per))
        if not isinstance(self.zero_point, bool):
            raise ValueError(f"zero_point must be True or False, got {self.zero_point!r}")

    def keeps(self, kind: str) -> bool:
        return kind in self.per

    def with_kinds(self, *kinds: str) -> "StageGranularity":
        return StageGranularity(self.group_size, tuple(dict.fromkeys(self.per + kinds)), self.zero_point)

    def granularity(self, layout: tuple[str, ...]) -> Granularity:
        """The Granularity of a tensor whose dims are named by ``layout``."""
        axis = _axis(layout)
        kept = {"conv_group", "out_channel"} | set(self.per)
        shared = tuple(d for d, name in enumerate(layout) if d != axis and _kind(name) not in kept)
        own = [d for d in range(len(layout)) if d != axis and d not in shared]
        if self.group_size is None and len(own) == 1 and layout[own[0]] == "out_channel":
            return Granularity("channel", axis=own[0])  # per output channel (weights without groups)
        return Granularity("group", axis=axis, group_size=self.group_size or ALL, shared_dims=shared)

    def static_keep(self, layout: tuple[str, ...]) -> tuple[int, ...]:
        """Dims that keep their own scale in static (calibrated) ranges: the channel group,
        conv group, output channel and, when per tap, the tap; never sample / pixel / tile."""
        kept = {"channel", "conv_group", "out_channel"} | ({"tap"} if self.keeps("tap") else set())
        return tuple(d for d, name in enumerate(layout) if _kind(name) in kept)

    def describe(self) -> str:
        group = "all channels" if self.group_size is None else f"{self.group_size} channels"
        return f"per {', '.join(self.per) or 'tensor'} and group of {group}" + (", with a zero point" if self.zero_point else "")


def _kind(name: str) -> str:
    try:
        return _KIND[name]
    except KeyError:
        raise ValueError(f"unknown dim name {name!r} in a layout; use one of {sorted(_KIND)}") from None


def _axis(layout: tuple[str, ...]) -> int:
    if layout.count("channel") != 1:
        raise ValueError(f"a layout names exactly one 'channel' dim (the group axis), got {layout}")
    for name in layout:
        _kind(name)
    return layout.index("channel")


# ----------------------------------------------------------------------------- the layouts used
CONV_INPUT = ("sample", "conv_group", "channel", "y", "x")        # direct conv input, viewed per conv group
CONV_WEIGHT = ("out_channel", "channel", "y", "x")                 # (K, C/groups, kh, kw)
WINO_INPUT = ("sample", "channel", "y", "x")                       # spatial input (N, C, H, W)
WINO_INPUT_BLOCKS = ("sample", "channel", "by", "y", "bx", "x")    # (N, C, H/m, m, W/m, m)
WINO_TILES = ("tap", "conv_group", "channel", "sample", "ty", "tx")  # taps first, per conv group
WINO_TILES_LAST = ("sample", "conv_group", "channel", "ty", "tx", "ta", "tb")  # (N, G, C/G, th, tw, n, n)
WINO_U = ("out_channel", "channel", "ta", "tb")                    # (K, C/groups, n, n)
WINO_M = ("tap", "channel", "sample", "ty", "tx")                  # (n*n, K, N, th, tw)
WINO_M_LAST = ("sample", "channel", "ty", "tx", "ta", "tb")        # (N, K, th, tw, n, n)


def linear_input(ndim: int) -> tuple[str, ...]:
    """(..., in_features): every leading dim is a row (token) index."""
    return ("row",) * (ndim - 1) + ("channel",)


def linear_weight(ndim: int = 2) -> tuple[str, ...]:
    return ("out_channel", "channel") + ("y", "x")[: ndim - 2]


# ----------------------------------------------------------------------------- stages of each layer
@dataclass(frozen=True)
class DirectGranularity:
    """Stages of a directly quantized conv / linear."""

    input: StageGranularity
    weight: StageGranularity

    @classmethod
    @lru_cache(maxsize=None)
    def make(cls, group_size: int | None, activations: str = "fine", linear: bool = False,
             zero_point: bool = False, weight_tapwise: bool = False) -> "DirectGranularity":
        """``weight_tapwise``: a conv's weights get one scale per kernel position as well (the
        weight's "pixel" dims): the GEMM block (a channel group at one kernel position) then
        owns one scale on both operands, and the weight's folds into the per-(pixel, group)
        rescaling the input's scale already needs: free in integers."""
        per = ("sample", "row") if linear else ACTIVATION_CHOICES[_choice(activations)][0]
        weight = ("out_channel",) + (("pixel",) if weight_tapwise and not linear else ())
        return cls(StageGranularity(group_size, per, zero_point), StageGranularity(group_size, weight))


@dataclass(frozen=True)
class WinogradGranularity:
    """Stages of a fully quantized Winograd conv: spatial input x, V = B^T d B, U = G g G^T, M."""

    input: StageGranularity
    v: StageGranularity
    u: StageGranularity
    m: StageGranularity

    @classmethod
    @lru_cache(maxsize=None)
    def make(cls, group_size: int | None, activations: str = "fine", tapwise: bool = False,
             weight_tapwise: bool = False, input_tapwise: bool = False,
             zero_point: bool = False) -> "WinogradGranularity":
        """``tapwise``: every Winograd-domain stage per tap (the tap-wise baseline; M per tap needs a
        float output transform); ``weight_tapwise`` / ``input_tapwise``: U / V per tap as well, which
        an integer pipeline gets for free (U's scale folds into the requantization of M; V is
        requantized from the integer input transform by one multiplier per tap instead of one per
        tile); M keeps one scale per tile so that the output transform runs in integers.
        ``zero_point``: the scales of the spatial input and of V carry zero points (the integer
        input transform runs on code - zero point, 9-bit values; V's zero point is one
        correction per tile, tap and group in the Hadamard sums: zero point x the group's U sum);
        U and M stay symmetric (a zero point on M measured no gain)."""
        tile = ("sample", "tile")
        v = StageGranularity(group_size, tile + (("tap",) if (tapwise or input_tapwise) else ()), zero_point)
        m = StageGranularity(group_size, tile + (("tap",) if tapwise else ()))
        u = StageGranularity(group_size, ("out_channel",) + (("tap",) if (tapwise or weight_tapwise) else ()))
        spatial = StageGranularity(group_size, ACTIVATION_CHOICES[_choice(activations)][1], zero_point)
        return cls(spatial, v, u, m)

    @property
    def input_mode(self) -> str:
        """"tile", "block" or "sample": where the spatial input's scales live."""
        for mode in ("tile", "block"):
            if self.input.keeps(mode):
                return mode
        return "sample"


def _choice(name: str) -> str:
    if name not in ACTIVATION_CHOICES:
        raise ValueError(f"activation granularity {name!r} unknown; choose one of {', '.join(ACTIVATION_CHOICES)}")
    return name


def table(group_size: int | None = 32, activations: str = "fine", zero_point: bool = True,
          weight_tapwise: bool = True, tapwise_vu: bool = True) -> list[tuple[str, str]]:
    """(stage, description) rows of every stage's granularity under the given choices (defaults:
    the default recipe's; the README's table)."""
    d = DirectGranularity.make(group_size, activations, zero_point=zero_point, weight_tapwise=weight_tapwise)
    dl = DirectGranularity.make(group_size, linear=True, zero_point=zero_point)
    w = WinogradGranularity.make(group_size, activations, weight_tapwise=tapwise_vu, input_tapwise=tapwise_vu,
                                 zero_point=zero_point)
    return [("direct conv input", d.input.describe()), ("direct conv weight", d.weight.describe()),
            ("linear input", dl.input.describe()), ("linear weight", dl.weight.describe()),
            ("Winograd input x", w.input.describe()), ("Winograd V", w.v.describe()), ("Winograd U", w.u.describe()),
            ("Winograd M", w.m.describe())]


def apply_recipe(qmodel, recipe) -> None:
    """Give every quantized layer of ``qmodel`` the recipe's activation granularity, zero points
    (``Recipe.input_zero_points``; a layer whose activations are minifloat stays symmetric) and
    direct conv weight scales (``Recipe.direct_weight_scales``)."""
    from .modules import QuantConv2d, QuantLinear
    from .winograd.quantized import QuantWinogradConv2d

    mode = _choice(recipe.activation_granularity)
    zp = recipe.input_zero_points
    for mod in qmodel.modules():
        if isinstance(mod, (QuantConv2d, QuantWinogradConv2d)):
            mod.activation_granularity = mode
        if isinstance(mod, QuantConv2d):
            mod.weight_tapwise = recipe.direct_weight_scales == "tapwise"
        if isinstance(mod, (QuantConv2d, QuantLinear, QuantWinogradConv2d)):
            fmt = mod.formats.input if isinstance(mod, QuantWinogradConv2d) else mod.act_format
            mod.activation_zero_point = bool(zp and fmt is not None and not fmt.is_float)
