"""``Recipe``: everything that decides how a model is quantized, in one frozen,
validated dataclass (saved as JSON beside the weights)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from fractions import Fraction

from .formats import parse

SCALES = ("standard", "learned", "paw-fsq", "tapwise")
from .kernels import KERNELS  # noqa: E402
ROUNDINGS = ("nearest", "learned")
NOISES = ("gaussian", "uniform", "halfnormal")
MAX_TILE = 14


@dataclass(frozen=True)
class Recipe:
    """How to quantize a model.

    weights / activations: format names (``winoq.formats.parse``: "int8", "int4",
        "fp8_e4m3", "fp4_e2m1", ...). Unsigned ones ("uint8") are refused or warned about
        where they would clamp negatives to 0 (``winoq.quantize_checks``).
    group_size: channels per scale group (None: per output channel for weights,
        per tensor for activations). When it does not divide a layer's channel
        count the last group is shorter.
    winograd: output tile m of F(m x m, r x r) for eligible convs (square kernel
        > 1, stride 1, dilation 1); None keeps every conv direct.
    scales: transform scales of the Winograd layers: "standard" (Toom-Cook as is),
        "learned" (data-free S_B/S_G, the paper's method), "paw-fsq" (full
        transforms learned on calibration data, baseline), "tapwise" (one scale per
        Winograd tap, baseline).
    shared_scales: learn one S_B/S_G for all layers (the paper's variant) instead of per layer.
    points: interpolation points for F(m, r) (None: 0, ±1, ±2, ±1/2, ...), as strings like "3/2".
    learn_steps, learn_lr, noise, learn_optimizer, learn_loss: the data-free optimisation (steps of
        "adam" or "sgd" after the closed-form start, on "gaussian", "uniform" or "halfnormal"
        noise, minimizing the relative "mse" or "l1" error against the exact conv).
    learn_max_channels: wider layers learn their transform scales on a random subset of this many
        output channels (the scales are shared by all of them; None: every channel); on a
        1280-channel SD-1.5 layer 256 channels cut the time 8x at equal layer SQNR
        (benchmarks/speedups.py).
    seed: seeds every random draw (noise, calibration order).
    kernel: how the Winograd layers compute at inference: "emulated" (PyTorch fake quantization,
        runs anywhere), "int-cpu" (integer arithmetic on the CPU in PyTorch ops, the reference),
        "cpu" (the compiled fixed-point int8 CPU kernel; the emulation then uses its rounded
        transforms, see winoq.winograd.fixed_point), "triton" (GPU kernels; needs
        CUDA and the triton package) or "auto" (triton where it can run, else emulated).
        Calibration always runs emulated.
    winograd_weight_scales: "tapwise" (default: one scale per output channel, channel group and
        tap of the transformed weights U) or "shared" (the paper: one for all n x n taps). Tap-wise
        weight scales keep the pipeline integer: the transforms still see one scale per tile,
        and the per-(channel, tap) weight scale folds into the requantization multiplier of
        the Hadamard result (an integer pipeline requantizes there anyway).
    winograd_input_scales: "tapwise" (default: one scale per sample, tile, channel group and tap of
        V = B^T d B) or "shared" (the paper: one for all taps of a tile). Free in an integer
        pipeline too: V is requantized from the exact integer input transform with one multiplier
        per tap instead of one per tile, and the scale folds into the requantization of M.
    winograd_output_format: format of the Hadamard result M before the output transform
        (default "int16": the int32 group sums, rescaled per group and tap, requantized to 16-bit
        with one scale per sample, tile and output-channel group, so the output transform runs
        in integers; None: the activation format, the paper's fully 8-bit M). No multiplication
        takes M as an operand except the transform's constants: the speed-up of Winograd (8-bit
        V x U products) is unchanged.
    rounding: "nearest", or "learned" (AdaRound-style soft rounding per weight, annealed to
        hard up/down choices between the two neighbouring grid values, INT or FP grid, learned
        layer by layer on ``calib_data``; for Winograd layers on the transformed weights
        G g G^T). ``rounding_iters`` optimisation steps per layer (or block).
    format_search: for minifloat weights, choose each layer's exponent / mantissa split at the
        weight format's bit width (e.g. e2m1 vs e3m0 vs e1m2 at 4 bit): "off" (keep ``weights``),
        "weight" (least weight MSE, data-free) or "output" (least layer-output MSE on
        ``calib_data``). Winograd layers search on their transformed weights.
    calib_samples: at most this many calibration samples (from the start of ``calib_data``) are
        kept for learned rounding, block reconstruction and the output format search (static
        ranges use all of ``calib_data``).
    reconstruction: what learned rounding reproduces: each layer's output ("layer", AdaRound) or
        each block's output ("block", BRECQ: the largest submodules with 2 to 4 convs / linears,
        e.g. residual blocks, learn their layers' rounding together; other layers layer-wise).
    activation_ranges: "dynamic" (default, data-free: every activation scale is computed from the
        values at run time, per sample, channel group and Winograd tile) or "static" (Q-Diffusion
        style: one scale per layer stage and channel group, calibrated once on ``calib_data``, e.g.
        a diffusion model's inputs sampled uniformly over timesteps; max range with an MSE search
        of its clipping ratio).
    skip: module-name patterns (``fnmatch``: "conv_in", "*.time_emb*") whose convs and linears
        stay in float, e.g. a UNet's first and last conv.
    fold_batchnorm: fold every eval-mode BatchNorm2d that directly follows a conv into that conv
        before quantizing (``winoq.batchnorm``), so the quantized weights are the ones a deployment
        runs; False quantizes the conv and keeps the BatchNorm in float after it.
    activation_granularity: where the dynamic activation scales of the convs' inputs live
        (``winoq.granularity``): "fine" (default: a direct conv's input per sample, pixel and channel
        group -- the blocks of its GEMM reduction over (channel, ky, kx); a Winograd conv's input per
        tile and channel group, each overlapping tile quantized on its own, what an integer input
        transform needs), "block" (Winograd input per m x m pixel block of the tile grid instead;
        emulated only) or "sample" (one scale per sample and channel group over all pixels, the
        coarse choice). Linear inputs are always per row (token) and group.
    direct_weight_scales: "tapwise" (default: a direct conv's weights get one scale per output
        channel, input-channel group and kernel position, the block its GEMM reduces with the
        input's per-(pixel, group) scale, so the weight's scale folds into the same rescaling:
        free in integers; DDPM worst-timestep SQNR direct 44.1 -> 46.0 dB) or "shared" (one per
        output channel and input-channel group over the kernel's positions). Linear weights are
        per output channel and group either way.
    activation_zero_point: whether the dynamic scales of the conv and linear inputs (a Winograd
        conv's spatial input and V included; U and M stay symmetric) carry an integer zero point:
        each group's [min, max] spread over all 256 int8 codes instead of [-max, max] over them,
        so a post-SiLU / post-ReLU input gets about twice the resolution (DDPM worst-timestep SQNR
        direct 41.6 -> 44.1 dB; V's add F(6,3) 25.0 -> 26.2 dB; docs/results.md section 19). In
        integers a zero point costs one correction per (pixel, group): zero point x the weights'
        sum over the group, as in fbgemm / onnxruntime's uint8 convs. None (default): on for integer activation formats
        with dynamic ranges and the "emulated" / "cpu" kernels, off otherwise ("int-cpu" and
        "triton" quantize symmetrically; static ranges are symmetric).
    winograd_min_channels: Winograd only where it pays: an eligible conv with fewer input or output
        channels than this stays direct (quantized with the same formats). "group" (default): the
        group size (32 when ``group_size`` is None); None: no channel rule. Such convs (a UNet's or a
        classifier's 3-channel image convs) cost little compute and most of the Winograd error:
        on the project's DDPM / ResNets keeping them direct raises the worst-timestep SQNR / accuracy
        (docs/results.md, "Winograd where it pays").
    winograd_kernels: kernel sizes that run as Winograd (default 3x3 only); a listed larger kernel
        gets the tile with the same transform size as F(winograd, 3) (F(6,3) -> F(4,5), F(2,7);
        F(4,3) -> F(2,5)), never F(winograd, 5): quantized error grows with the transform size
        (F(6,5) measured 10-19x relative output error). Larger kernels left out stay direct, with a
        warning.
    force_winograd: module-name patterns (``fnmatch``) of eligible convs that run as Winograd
        despite ``winograd_min_channels`` and ``winograd_kernels``.
    layer_plan: per-layer choices over the fields above, e.g. a mixed-precision plan
        (``winoq.mixed_precision``): ``{"layer1.0.conv1": {"weights": "int4", "winograd": 2},
        "fc": {"activations": "int4"}}``; keys "weights", "activations" (format names) and
        "winograd" (output tile, or None for direct; an ineligible conv is refused). Saved in the
        checkpoint with the rest of the recipe.
    """

    weights: str = "int8"
    activations: str = "int8"
    group_size: int | None = 32
    winograd: int | None = 6
    scales: str = "learned"
    seed: int = 0
    shared_scales: bool = False
    points: tuple[str, ...] | None = None
    learn_steps: int = 20
    learn_lr: float = 0.01
    noise: str = "gaussian"
    learn_optimizer: str = "adam"
    learn_loss: str = "mse"
    learn_max_channels: int | None = 256
    kernel: str = "emulated"
    winograd_weight_scales: str = "tapwise"
    rounding: str = "nearest"
    rounding_iters: int = 300
    reconstruction: str = "layer"
    calib_samples: int = 32
    format_search: str = "off"
    activation_ranges: str = "dynamic"
    skip: tuple[str, ...] = ()
    fold_batchnorm: bool = True
    activation_granularity: str = "fine"
    activation_zero_point: bool | None = None
    direct_weight_scales: str = "tapwise"
    winograd_input_scales: str = "tapwise"
    winograd_output_format: str | None = "int16"
    winograd_min_channels: int | str | None = "group"
    winograd_kernels: tuple[int, ...] = (3,)
    force_winograd: tuple[str, ...] = ()
    layer_plan: tuple = ()

    def __post_init__(self):
        _check_field_types(self)
        for field in ("weights", "activations"):
            parse(getattr(self, field))  # raises ValueError listing the valid names
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        if self.winograd is not None and (not isinstance(self.winograd, int) or not 2 <= self.winograd <= MAX_TILE):
            raise ValueError(f"winograd must be an output tile size in 2..{MAX_TILE} or None, got {self.winograd!r}")
        _one_of("scales", self.scales, SCALES)
        _one_of("kernel", self.kernel, KERNELS)
        _one_of("noise", self.noise, NOISES)
        _one_of("learn_optimizer", self.learn_optimizer, ("adam", "sgd"))
        _one_of("learn_loss", self.learn_loss, ("mse", "l1"))
        _one_of("winograd_weight_scales", self.winograd_weight_scales, ("shared", "tapwise"))
        _one_of("winograd_input_scales", self.winograd_input_scales, ("shared", "tapwise"))
        if self.winograd_output_format is not None:
            parse(self.winograd_output_format)
        _one_of("rounding", self.rounding, ROUNDINGS)
        _one_of("reconstruction", self.reconstruction, ("layer", "block"))
        _one_of("format_search", self.format_search, ("off", "weight", "output"))
        if self.format_search != "off" and not parse(self.weights).is_float:
            raise ValueError(f"format_search={self.format_search!r} chooses between minifloat splits, but "
                             f"weights={self.weights!r} is an integer format; use e.g. weights='fp4_e2m1' or "
                             "format_search='off'")
        _one_of("activation_ranges", self.activation_ranges, ("dynamic", "static"))
        _one_of("activation_granularity", self.activation_granularity, ("fine", "block", "sample"))
        _one_of("direct_weight_scales", self.direct_weight_scales, ("tapwise", "shared"))
        if not isinstance(self.rounding_iters, int) or self.rounding_iters < 1:
            raise ValueError(f"rounding_iters must be a positive int, got {self.rounding_iters!r}")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise ValueError(f"calib_samples must be a positive int, got {self.calib_samples!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.learn_max_channels is not None and (not isinstance(self.learn_max_channels, int)
                                                    or self.learn_max_channels < 1):
            raise ValueError(f"learn_max_channels must be a positive int or None, got {self.learn_max_channels!r}")
        if self.learn_steps < 0 or self.learn_lr <= 0:
            raise ValueError("learn_steps must be >= 0 and learn_lr > 0")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"skip must be a tuple of module-name patterns (fnmatch, e.g. 'conv_in', "
                             f"'*.time_embedding.*'), got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        self._check_zero_points()
        if not isinstance(self.fold_batchnorm, bool):
            raise ValueError(f"fold_batchnorm must be True or False, got {self.fold_batchnorm!r}")
        self._check_winograd_rules()
        object.__setattr__(self, "layer_plan", _normalize_plan(self.layer_plan))
        if self.points is not None:
            pts = tuple(str(Fraction(p)) for p in self.points)
            object.__setattr__(self, "points", pts)

    def _check_zero_points(self) -> None:
        if self.activation_zero_point is not True:
            return
        if parse(self.activations).is_float:
            raise ValueError(f"activation_zero_point=True needs an integer activation format, not "
                             f"{self.activations!r}; use activation_zero_point=None or False")
        if self.activation_ranges == "static":
            raise ValueError("activation_zero_point=True applies to dynamic scales; static ranges are symmetric. "
                             "Use activation_zero_point=None or False with activation_ranges='static'")
        if self.kernel in ("int-cpu", "triton", "auto"):
            raise ValueError(f"kernel {self.kernel!r} quantizes the Winograd input symmetrically; use "
                             "activation_zero_point=None or False with it, or kernel 'emulated' / 'cpu'")

    @property
    def input_zero_points(self) -> bool:
        """``activation_zero_point`` resolved: None means on for integer activations with dynamic
        ranges and the kernels that run zero points ("emulated", "cpu")."""
        if self.activation_zero_point is not None:
            return self.activation_zero_point
        return (not parse(self.activations).is_float and self.activation_ranges == "dynamic"
                and self.kernel in ("emulated", "cpu"))

    def _check_winograd_rules(self) -> None:
        mc = self.winograd_min_channels
        if mc is not None and mc != "group" and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
            raise ValueError(f"winograd_min_channels must be 'group', a positive int or None, got {mc!r}")
        ks = self.winograd_kernels
        if not isinstance(ks, (tuple, list)) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 2
                                                for k in ks):
            raise ValueError(f"winograd_kernels must be a tuple of kernel sizes >= 2, e.g. (3,) or (3, 5), got {ks!r}")
        object.__setattr__(self, "winograd_kernels", tuple(sorted(set(ks))))
        if not isinstance(self.force_winograd, (tuple, list)) or not all(isinstance(p, str) for p in self.force_winograd):
            raise ValueError(f"force_winograd must be a tuple of module-name patterns (fnmatch, e.g. 'conv_in'), "
                             f"got {self.force_winograd!r}")
        object.__setattr__(self, "force_winograd", tuple(self.force_winograd))

    def plan_for(self, name: str) -> dict:
        """The ``layer_plan`` entry of layer ``name`` as a dict ({} when the plan does not name it)."""
        for layer, choices in self.layer_plan:
            if layer == name:
                return dict(choices)
        return {}

    @property
    def min_winograd_channels(self) -> tuple[int | None, str | None]:
        """The channel threshold of the Winograd rule and how the report names it."""
        mc = self.winograd_min_channels
        if mc == "group":
            g = self.group_size or 32
            return g, f"group size {g}"
        return mc, None if mc is None else f"winograd_min_channels={mc}"

    def winograd_rule(self) -> str:
        """Which convs become Winograd, and what happens to larger kernels, in words."""
        from .winograd.conv import tile_for_kernel

        if self.winograd is None:
            return "every conv direct"
        parts = []
        for k in self.winograd_kernels:
            m = tile_for_kernel(self.winograd, k)
            parts.append(f"{k}x{k}: F({m},{k})" if m else f"{k}x{k}: direct (no tile fits)")
        left = [k for k in (5, 7) if k not in self.winograd_kernels]
        if left:
            parts.append(f"{'/'.join(f'{k}x{k}' for k in left)}: direct")
        mc, label = self.min_winograd_channels
        if mc is not None:
            parts.append(f"< {mc} in/out channels: direct")
        if self.force_winograd:
            parts.append(f"forced: {', '.join(self.force_winograd)}")
        return "; ".join(parts)

    @property
    def uses_calibration_data(self) -> bool:
        """Whether some step learns on ``calib_data`` (PAW+FSQ falls back to noise without it;
        the others require it)."""
        return (self.scales == "paw-fsq" or self.rounding == "learned" or self.activation_ranges == "static"
                or self.format_search == "output")

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"recipe has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        if data.get("points") is not None:
            data["points"] = tuple(data["points"])
        for key in ("skip", "winograd_kernels", "force_winograd"):
            if key in data:
                data[key] = tuple(data[key])
        if "layer_plan" in data:  # JSON lists of [name, [[key, value], ...]]
            data["layer_plan"] = {name: dict(choices) for name, choices in data["layer_plan"]}
        data.setdefault("activation_granularity", "sample")  # files from before the field ran per sample
        data.setdefault("winograd_input_scales", "shared")  # ... and V, M as the paper: shared, 8-bit M
        data.setdefault("winograd_output_format", None)
        # recipes saved before the Winograd rules existed made every eligible conv Winograd
        data.setdefault("winograd_min_channels", None)
        data.setdefault("activation_zero_point", False)  # ... and the inputs were symmetric
        data.setdefault("direct_weight_scales", "shared")  # ... with direct weight scales over the kernel
        return cls(**data)

    @property
    def tapwise_winograd_stages(self) -> tuple[str, ...]:
        """The Winograd-domain stages ("V", "U") that get one scale per tap on top of the tile's."""
        return tuple(stage for stage, mode in (("V", self.winograd_input_scales), ("U", self.winograd_weight_scales))
                     if mode == "tapwise")

    def describe(self) -> str:
        tile = "direct" if self.winograd is None else f"F({self.winograd},3) {self.scales}"
        if self.winograd is not None and self.scales != "tapwise":
            taps = self.tapwise_winograd_stages
            tile += f" tap-wise {'/'.join(taps)}" if taps else ""
            tile += f" M:{self.winograd_output_format or self.activations}"
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        extra = "".join([f" format-search({self.format_search})" if self.format_search != "off" else ""," static-ranges" if self.activation_ranges == "static" else "",
                         (f" learned-rounding({self.reconstruction})" if self.rounding == "learned" else ""),
                         "" if self.fold_batchnorm else " bn-unfolded",
                         "" if self.direct_weight_scales == "tapwise" else " direct-W-shared"])
        rule = "" if self.winograd is None else f" [{self.winograd_rule()}]"
        plan = f" layer-plan({len(self.layer_plan)} layers)" if self.layer_plan else ""
        acts = f"{self.activations}{'+zp' if self.input_zero_points else ''}"
        return f"W:{self.weights} A:{acts} {group} {tile}{extra}{rule}{plan}"


PLAN_KEYS = ("weights", "activations", "winograd")


def _normalize_plan(plan) -> tuple:
    """``layer_plan`` as a sorted tuple ``((name, ((key, value), ...)), ...)`` (hashable, frozen),
    from a dict ``{name: {key: value}}`` or that tuple form; every entry validated."""
    items = plan.items() if isinstance(plan, dict) else plan
    try:
        entries = [(name, dict(choices)) for name, choices in items]
    except (TypeError, ValueError):
        raise ValueError(f"layer_plan must map layer names to dicts of choices, e.g. "
                         f"{{'layer1.0.conv1': {{'weights': 'int4', 'winograd': 2}}}}, got {plan!r}") from None
    out = []
    for name, choices in entries:
        if not isinstance(name, str):
            raise ValueError(f"layer_plan: layer names must be str, got {name!r}")
        unknown = set(choices) - set(PLAN_KEYS)
        if unknown:
            raise ValueError(f"layer_plan[{name!r}] has unknown keys {sorted(unknown)}; known: {list(PLAN_KEYS)}")
        for key in ("weights", "activations"):
            if key in choices:
                if not isinstance(choices[key], str):
                    raise ValueError(f"layer_plan[{name!r}][{key!r}] must be a format name, got {choices[key]!r}")
                parse(choices[key])
        m = choices.get("winograd")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 2 <= m <= MAX_TILE):
            raise ValueError(f"layer_plan[{name!r}]['winograd'] must be an output tile in 2..{MAX_TILE} or None "
                             f"(direct), got {m!r}")
        out.append((name, tuple(sorted(choices.items()))))
    return tuple(sorted(out))


def _one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, allowed))}")


# annotation word -> the Python types a value of it may have (bool is an int subclass: listed apart)
_TYPE_WORDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
               "tuple[str, ...]": (tuple, list)}
_TYPE_NAMES = {"int": "an int", "float": "a finite number", "str": "a str", "bool": "a bool (True/False)",
               "None": "None", "tuple[str, ...]": "a tuple of str"}


def _check_field_types(recipe: "Recipe") -> None:
    """Every field holds a value of its annotated type: ``True`` is no int (group_size=True
    would silently mean 1), floats are finite, a tuple field takes a tuple or list. Fields
    whose annotation is not a plain union of the words above are checked by their own rules."""
    for f in dataclasses.fields(recipe):
        words = [w.strip() for w in str(f.type).split("|")]
        if not all(w in _TYPE_WORDS for w in words):
            continue
        value = getattr(recipe, f.name)
        allowed = tuple(t for w in words for t in _TYPE_WORDS[w])
        if isinstance(value, bool) and "bool" not in words or not isinstance(value, allowed):
            expected = " or ".join(_TYPE_NAMES[w] for w in words)
            raise ValueError(f"{f.name} must be {expected}, got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")

