"""Helpers for diffusers UNets (optional dependency: ``pip install winoq[diffusion]``).

* :func:`build_unet2d` / :func:`build_sd15_unet`: a ``UNet2DModel`` or a
  Stable-Diffusion-1.5-shaped ``UNet2DConditionModel`` from a config written out
  here, with random (seeded) weights: nothing is downloaded.
* :func:`load_diffusers_unet`: load a UNet saved with ``save_pretrained`` from a
  local folder (``local_files_only=True``; a hub id is refused up front).
* :func:`validate_unet_input`: shape checks that raise a clear ``ValueError`` before
  any compute; :func:`check_supported`: the UNet classes winoq handles.
* :class:`DiffusersEps`: wraps a diffusers UNet as ``model(x, t, y) -> eps`` for the
  samplers and metrics of :mod:`winoq.diffusion`.
* :func:`quantize_unet`: ``winoq.quantize`` on a checked diffusers UNet, and
  :func:`float_layers` / :func:`time_embedding_linears` to report what stays float.

``winoq.quantize`` is generic over ``nn.Module``: it swaps every ``nn.Conv2d``
(ResNet 3x3 convs -> Winograd; stride-2 down-samplers, 1x1 shortcuts, ``proj_in``
/ ``proj_out`` 1x1 convs -> direct) and every ``nn.Linear`` (attention q/k/v/out,
feed-forward, ``time_emb_proj`` and the time-embedding MLP). Norms (GroupNorm,
LayerNorm), activations, softmax, the sinusoidal timestep projection and
embeddings stay float.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["SUPPORTED_UNETS", "SD15_UNET_CONFIG", "require_diffusers", "sd15_unet_config", "tiny_sd_unet_config",
           "unet2d_config", "build_unet2d", "build_sd15_unet", "load_diffusers_unet", "check_supported",
           "validate_unet_input", "DiffusersEps", "quantize_unet", "float_layers", "time_embedding_linears"]

SUPPORTED_UNETS = ("UNet2DModel", "UNet2DConditionModel")

# Stable Diffusion 1.5 UNet (runwayml/stable-diffusion-v1-5, unet/config.json), written out.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "upcast_attention": False,
}


def require_diffusers():
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError("diffusers is not installed: `pip install winoq[diffusion]` "
                          "(or `pip install diffusers`)") from exc
    return diffusers


def sd15_unet_config(**overrides) -> dict:
    """The SD-1.5 UNet config (a copy), with ``overrides`` applied."""
    cfg = dict(SD15_UNET_CONFIG)
    unknown = set(overrides) - set(cfg) - {"num_class_embeds", "class_embed_type"}
    if unknown:
        raise ValueError(f"unknown SD-1.5 UNet config keys {sorted(unknown)}")
    cfg.update(overrides)
    return cfg


def tiny_sd_unet_config(**overrides) -> dict:
    """An SD-1.5-shaped UNet (same block types) small enough for tests."""
    return sd15_unet_config(**{"sample_size": 16, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1,
                               "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8,
                               **overrides})


def unet2d_config(**overrides) -> dict:
    """A small DDPM-style ``UNet2DModel`` config (28x28x1, one attention level)."""
    cfg = {"sample_size": 28, "in_channels": 1, "out_channels": 1, "block_out_channels": (32, 64, 64),
           "layers_per_block": 1, "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
           "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), "norm_num_groups": 8,
           "attention_head_dim": 8}
    cfg.update(overrides)
    return cfg


def _seeded_build(cls, cfg: dict, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**cfg).eval()


def build_unet2d(config: dict | None = None, seed: int = 0):
    """A ``diffusers.UNet2DModel`` with random weights (default: :func:`unet2d_config`)."""
    require_diffusers()
    from diffusers import UNet2DModel

    return _seeded_build(UNet2DModel, config or unet2d_config(), seed)


def build_sd15_unet(seed: int = 0, **overrides):
    """An SD-1.5-shaped ``UNet2DConditionModel`` with random weights (~860M parameters
    at the default config; pass e.g. ``block_out_channels=(32, 64, 64, 64)`` for a toy one)."""
    require_diffusers()
    from diffusers import UNet2DConditionModel

    return _seeded_build(UNet2DConditionModel, sd15_unet_config(**overrides), seed)


def check_supported(unet) -> str:
    """Name of the UNet class if winoq supports it, else ``ValueError`` naming the supported ones."""
    name = type(unet).__name__
    try:
        diffusers = require_diffusers()
        ok = isinstance(unet, (diffusers.UNet2DModel, diffusers.UNet2DConditionModel))
    except ImportError:
        ok = False
    if not ok:
        raise ValueError(f"unsupported UNet class {name}; supported diffusers UNets: {', '.join(SUPPORTED_UNETS)} "
                         "(for other nn.Modules call winoq.quantize directly)")
    return name


def load_diffusers_unet(path: str | os.PathLike, subfolder: str | None = None, torch_dtype=torch.float32):
    """Load a diffusers UNet from a local folder (``save_pretrained`` layout:
    ``config.json`` + weights), never from the network."""
    require_diffusers()
    import diffusers

    root = Path(path)
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a local folder; load_diffusers_unet only reads local "
                                "save_pretrained folders (nothing is downloaded)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: expected a diffusers save_pretrained folder")
    try:
        cls_name = json.loads(cfg_file.read_text()).get("_class_name")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file} is not valid JSON ({exc})") from exc
    if cls_name not in SUPPORTED_UNETS:
        raise ValueError(f"{cfg_file} describes a {cls_name!r}; supported diffusers UNets: {', '.join(SUPPORTED_UNETS)}")
    cls = getattr(diffusers, cls_name)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return cls.from_pretrained(os.fspath(root), local_files_only=True, torch_dtype=torch_dtype, **kwargs).eval()


def _down_factor(unet) -> int:
    return 2 ** (len(unet.config.block_out_channels) - 1)


def validate_unet_input(unet, sample: torch.Tensor, timestep=None, encoder_hidden_states: torch.Tensor | None = None,
                        class_labels: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` (before any compute) when the inputs cannot go through ``unet``."""
    name = check_supported(unet)
    cfg = unet.config
    if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise ValueError(f"{name} expects a latent of shape [N, {cfg.in_channels}, H, W], got {shape}")
    n, c, h, w = sample.shape
    if c != cfg.in_channels:
        raise ValueError(f"{name} expects {cfg.in_channels} latent channels, got {c} (shape {tuple(sample.shape)})"
                         + ("; SD-1.5 latents are 4-channel VAE latents at 1/8 of the image size" if c == 3 else ""))
    f = _down_factor(unet)
    if h % f or w % f or h == 0 or w == 0:
        raise ValueError(f"{name} needs H and W divisible by {f} (it down-samples {len(cfg.block_out_channels) - 1} "
                         f"times), got {h}x{w}")
    if timestep is not None:
        t = torch.as_tensor(timestep)
        if t.ndim > 1 or (t.ndim == 1 and len(t) not in (1, n)):
            raise ValueError(f"timestep must be a scalar or have {n} entries, got shape {tuple(t.shape)}")
    if name == "UNet2DConditionModel":
        if encoder_hidden_states is None:
            raise ValueError("UNet2DConditionModel needs encoder_hidden_states [N, L, "
                             f"{cfg.cross_attention_dim}] (e.g. CLIP text embeddings)")
        e = encoder_hidden_states
        if e.ndim != 3 or e.shape[0] != n or e.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be [N={n}, L, {cfg.cross_attention_dim}], got {tuple(e.shape)}")
    nce = getattr(cfg, "num_class_embeds", None)
    if class_labels is not None and nce is None and getattr(cfg, "class_embed_type", None) is None:
        raise ValueError(f"{name} is unconditional (no num_class_embeds): class_labels must be None")


class DiffusersEps(nn.Module):
    """``model(x, t, y=None) -> eps`` around a diffusers UNet. ``context``: the
    ``encoder_hidden_states`` of a ``UNet2DConditionModel`` ([1 or N, L, D], expanded
    to the batch). ``y`` goes to ``class_labels`` (class-conditional UNet2DModel with
    ``num_class_embeds``; for classifier-free guidance the last class embedding is the
    null class, so ``num_classes`` is ``num_class_embeds - 1``)."""

    def __init__(self, unet, context: torch.Tensor | None = None, validate: bool = True):
        super().__init__()
        check_supported(unet)
        self.unet = unet
        self.context = context
        self.validate = validate

    @property
    def num_classes(self):
        n = getattr(self.unet.config, "num_class_embeds", None)
        return n - 1 if n else None

    def forward(self, x, t, y=None):
        ctx = self.context
        if ctx is not None and ctx.shape[0] != x.shape[0]:
            ctx = ctx.expand(x.shape[0], *ctx.shape[1:]) if ctx.shape[0] == 1 else ctx
        if self.validate:
            validate_unet_input(self.unet, x, t, ctx, y)
        kw = {"class_labels": y} if y is not None else {}
        if ctx is not None:
            kw["encoder_hidden_states"] = ctx
        return self.unet(x, t, return_dict=False, **kw)[0]


def time_embedding_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers fed by the timestep embedding (time MLP and the
    per-ResBlock projections): diffusers ``time_embedding.*``, ``*time_emb_proj``,
    ``class_embedding``; winoq's DDPMUNet ``time_mlp.*`` and ``*.temb``."""
    keys = ("time_embedding", "time_emb_proj", "class_embedding", "time_mlp", "temb")
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(k in n.split(".") or n.endswith(k) for k in keys)]


def float_layers(qmodel: nn.Module) -> dict[str, int]:
    """Count of the module types with parameters that ``winoq.quantize`` left float."""
    from ..modules import QuantConv2d, QuantLinear
    from ..winograd.quantized import QuantWinogradConv2d

    quant = (QuantWinogradConv2d, QuantConv2d, QuantLinear)
    counts: dict[str, int] = {}
    for _, m in qmodel.named_modules():
        if isinstance(m, quant) or not any(True for _ in m.parameters(recurse=False)):
            continue
        counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def quantize_unet(unet, recipe=None, **kwargs):
    """``winoq.quantize`` for a supported diffusers UNet (checks the class first)."""
    from ..api import quantize

    check_supported(unet)
    return quantize(unet, recipe, **kwargs)
