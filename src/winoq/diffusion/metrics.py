"""Sample-quality metrics for (quantized) diffusion models.

* :func:`frechet_distance` between two Gaussians (closed form, eigen-decomposition,
  float64): ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2).
* **FD-proxy**: the Fréchet distance in the penultimate features (input of ``.fc``,
  64-d) of the project's Fashion-MNIST classifier. It is *not* FID (no Inception
  network, different feature space, values are not comparable with published FIDs);
  use it to compare samplers/quantizers on this model against each other and
  against the FP seed-to-seed noise floor.
* :func:`psnr` and :func:`ssim` (Gaussian window, Wang et al. 2004) of quantized vs
  full-precision samples generated from the same seeds.
* :func:`eps_sqnr_per_timestep`: SQNR (dB) of the quantized noise prediction against
  the full-precision one on the FP sampler's own trajectory, per timestep.
* :func:`fid_torchmetrics` / :func:`clip_score_open_clip`: adapters to the real
  metrics; they import lazily and raise a clear error when the package or its
  weights are not available locally (nothing is ever downloaded).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..winograd.scales import sqnr_db

__all__ = ["frechet_distance", "gaussian_stats", "FDProxy", "fd_proxy", "psnr", "ssim",
           "eps_sqnr_per_timestep", "fid_torchmetrics", "clip_score_open_clip", "MissingDependencyError"]


class MissingDependencyError(RuntimeError):
    """An optional metric package or its weights are not available locally."""


# ----------------------------------------------------------------------------- Fréchet distance
def _sym_sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), which avoids the
    complex round-off of a general matrix square root."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    r1 = _sym_sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, float64."""
    f = torch.as_tensor(features).detach().double().cpu().numpy()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need [N >= 2, D] features, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


# ----------------------------------------------------------------------------- FD-proxy
class FDProxy:
    """Fréchet distance in the penultimate features of a classifier (default: the
    project's Fashion-MNIST ResNet). Samples are in [-1, 1]; they are mapped to [0, 1]
    and standardized with the Fashion-MNIST mean/std the classifier was trained on."""

    def __init__(self, classifier: torch.nn.Module | None = None, batch_size: int = 500):
        from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

        if classifier is None:
            from ..models.fmnist import load_default_fmnist_model
            classifier = load_default_fmnist_model()
        if not hasattr(classifier, "fc"):
            raise ValueError("the classifier needs an `fc` head: its input is the feature vector")
        self.classifier = classifier.eval()
        self.mean, self.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        hook = self.classifier.fc.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach().flatten(1)))
        try:
            for i in range(0, len(x), self.batch_size):
                xb = ((x[i:i + self.batch_size].float() + 1) / 2).clamp(0, 1)
                self.classifier((xb - self.mean) / self.std)
        finally:
            hook.remove()
        return torch.cat(feats) if feats else torch.empty(0)

    def stats(self, x: torch.Tensor):
        return gaussian_stats(self.features(x))

    def __call__(self, x_a: torch.Tensor, x_b: torch.Tensor) -> float:
        return frechet_distance(*self.stats(x_a), *self.stats(x_b))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class predictions on samples in [-1, 1] (e.g. to check class-conditional samples)."""
        out = []
        for i in range(0, len(x), self.batch_size):
            xb = ((x[i:i + self.batch_size].float() + 1) / 2).clamp(0, 1)
            out.append(self.classifier((xb - self.mean) / self.std).argmax(1))
        return torch.cat(out)


def fd_proxy(x_a: torch.Tensor, x_b: torch.Tensor, classifier: torch.nn.Module | None = None) -> float:
    """FD-proxy between two sets of [-1, 1] Fashion-MNIST-like samples."""
    return FDProxy(classifier)(x_a, x_b)


# ----------------------------------------------------------------------------- PSNR / SSIM
def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, reduction: str = "mean"):
    """Peak signal-to-noise ratio (dB) per image, averaged (``reduction="none"``: per image).
    ``data_range`` 2 for [-1, 1] samples. Identical images give +inf."""
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(ref.shape)}")
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
    val = 10 * torch.log10(data_range ** 2 / mse)
    return val if reduction == "none" else float(val.mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03, reduction: str = "mean"):
    """Structural similarity (Wang et al. 2004) with a Gaussian window (11, sigma 1.5),
    valid (unpadded) filtering, per channel; mean over pixels, channels and images."""
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(f"need two [N, C, H, W] tensors of equal shape, got {tuple(x.shape)} / {tuple(ref.shape)}")
    c = x.shape[1]
    ws = min(window_size, x.shape[-1], x.shape[-2])
    w = _gaussian_window(ws, sigma).expand(c, 1, ws, ws)
    a, b = x.double(), ref.double()

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    val = smap.flatten(1).mean(1)
    return val if reduction == "none" else float(val.mean())


# ----------------------------------------------------------------------------- noise-prediction SQNR
@torch.no_grad()
def eps_sqnr_per_timestep(fp_model, q_model, schedule, seeds: Sequence[int], *, steps: int = 50,
                          labels=None, shape=(1, 28, 28), batch_size: int = 64,
                          trajectory=None) -> dict[int, float]:
    """SQNR (dB) of ``q_model``'s noise prediction against ``fp_model``'s, per timestep,
    on the inputs x_t of the FP DDIM trajectory (both see exactly the same x_t).
    ``trajectory``: a recorded ``[(x_t, t), ...]`` to reuse (from ``sample(record=True)``)."""
    from .samplers import sample

    if trajectory is None:
        _, trajectory = sample(fp_model, schedule, seeds, shape=shape, steps=steps, labels=labels,
                               batch_size=batch_size, record=True)
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    out = {}
    for x_t, t in trajectory:
        ref, got = [], []
        for i in range(0, len(x_t), batch_size):
            xb = x_t[i:i + batch_size]
            tb = torch.full((len(xb),), t, dtype=torch.long)
            yb = None if y is None else y[i:i + batch_size]
            ref.append(fp_model(xb, tb, yb))
            got.append(q_model(xb, tb, yb))
        out[int(t)] = sqnr_db(torch.cat(got), torch.cat(ref))
    return out


# ----------------------------------------------------------------------------- optional real metrics
_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{module} is not installed ({exc}); install it with `pip install {extra}` "
                                     "and provide its weights locally (winoq never downloads weights)") from exc


def _to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    x = ((x.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def fid_torchmetrics(real: torch.Tensor, fake: torch.Tensor, *, feature: int = 2048,
                     weights_path: str | os.PathLike | None = None) -> float:
    """FID with ``torchmetrics`` (Inception-v3 of torch-fidelity). Images in [-1, 1]
    ([N, 1 or 3, H, W]). ``weights_path``: the local FID Inception weights
    (``weights-inception-2015-12-05-6726825d.pth``); by default looked up in the torch
    hub checkpoint folder. Raises :class:`MissingDependencyError` when torchmetrics /
    torch-fidelity or the weights are missing instead of downloading them."""
    _require("torchmetrics", "torchmetrics[image]")
    _require("torch_fidelity", "torch-fidelity")
    if weights_path is None:
        cand = Path(torch.hub.get_dir()) / "checkpoints" / _INCEPTION_FILE
        if not cand.is_file():
            raise MissingDependencyError(
                f"FID Inception weights not found locally ({cand}); place {_INCEPTION_FILE} there or pass "
                "weights_path=... (winoq never downloads weights). For a weight-free comparison on "
                "Fashion-MNIST use winoq.diffusion.metrics.fd_proxy")
        weights_path = cand
    elif not Path(weights_path).is_file():
        raise MissingDependencyError(f"FID Inception weights {weights_path} do not exist")
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                             feature_extractor_weights_path=os.fspath(weights_path))
    metric = FrechetInceptionDistance(feature=net)
    metric.update(_to_uint8_rgb(real), real=True)
    metric.update(_to_uint8_rgb(fake), real=False)
    return float(metric.compute())


def clip_score_open_clip(images: torch.Tensor, prompts: Sequence[str], *, model_name: str = "ViT-B-32",
                         pretrained: str | os.PathLike | None = None) -> float:
    """CLIP score (100 x mean cosine similarity, clipped at 0) with ``open_clip``.
    ``pretrained`` must be a local checkpoint file; pretrained *tags* (which download)
    are refused. Images in [-1, 1], [N, 1 or 3, H, W]."""
    open_clip = _require("open_clip", "open_clip_torch")
    if pretrained is None or not Path(pretrained).is_file():
        raise MissingDependencyError(
            f"CLIP weights for {model_name} are not available locally (pretrained={pretrained!r}); pass the "
            "path of a local open_clip checkpoint file (winoq never downloads weights)")
    if len(prompts) != len(images):
        raise ValueError(f"one prompt per image: {len(prompts)} prompts for {len(images)} images")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=os.fspath(pretrained))
    tokenizer = open_clip.get_tokenizer(model_name)
    size = getattr(model.visual, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = ((images.float() + 1) / 2).clamp(0, 1)
    x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = torch.tensor(getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    x = (x - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(list(prompts))), dim=-1)
    return float((100 * (img * txt).sum(-1)).clamp_min(0).mean())
