"""PAW + FSQ baseline (Chen et al., NeurIPS 2023), in the fully quantized setting.

PAW learns the *full* Winograd transforms (AT, G, BT) on calibration data; FSQ
adds factorized per-tap scales (alpha_a * alpha_b), which in a shared-scale
integer pipeline are exactly diagonal row scales of the transforms. As published,
both start from the standard Toom-Cook transforms with unit scales, and the loss
is the layer's output error on real activations. Unlike the data-free method,
the learned transforms no longer compute the exact convolution in full precision.
"""
from __future__ import annotations

import time
import warnings

import torch

from ..winograd.quantized import QuantWinogradConv2d
from ..winograd.scales import reference_output, relative_error, sqnr_db


def learn_paw_fsq(layer: QuantWinogradConv2d, inputs: torch.Tensor, steps: int = 200, lr: float = 1e-3,
                  batch: int = 8, seed: int = 0) -> dict:
    """Learn full transforms + factorized scales of ``layer`` on ``inputs`` (N, C, H, W)."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    tc = layer.tc
    layer.set_free_transforms(tc.AT, tc.G, tc.BT)
    layer.set_diagonal_scales(torch.ones(tc.n), torch.ones(tc.n))
    with torch.no_grad():
        ref_all = reference_output(layer, inputs)
        before = sqnr_db(layer(inputs), ref_all)
    params = list(layer.free_transforms.parameters()) + [layer.log_sb, layer.log_sg]
    saved = [(p, p.requires_grad) for p in layer.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for _ in range(steps):
            idx = torch.randint(0, inputs.shape[0], (min(batch, inputs.shape[0]),), generator=gen)
            x = inputs[idx]
            with torch.no_grad():
                ref = reference_output(layer, x)
            loss = relative_error(layer(x), ref)
            if not torch.isfinite(loss):
                warnings.warn(f"PAW+FSQ: non-finite loss on {layer}; stopping early")
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, req in saved:
            p.requires_grad_(req)
        for p in params:
            p.requires_grad_(False)
    with torch.no_grad():
        after = sqnr_db(layer(inputs), ref_all)
    return {"sqnr_standard_db": before, "sqnr_learned_db": after, "seconds": time.perf_counter() - start}
