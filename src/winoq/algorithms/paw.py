"""PAW + FSQ baseline (Chen et al., NeurIPS 2023), in the fully quantized setting.

PAW learns the *full* Winograd transforms (AT, G, BT) on calibration data; FSQ
adds factorized per-tap scales (alpha_a * alpha_b), which in a shared-scale
integer pipeline are exactly diagonal row scales of the transforms. As published,
the factorized scales start from the taps' ranges on the calibration data (here:
the same separable balancing as the data-free closed form, but measured on real
activations), the matrices from Toom-Cook, and the loss is the layer's output
error on real activations. Both are then learned with Adam, and the better of
start and end (on the calibration inputs) is kept. Unlike the data-free method,
the learned transforms no longer compute the exact convolution in full precision.
"""
from __future__ import annotations

import time
import warnings

import torch

from ..winograd.quantized import QuantWinogradConv2d
from ..winograd.scales import closed_form_scales, reference_output, relative_error, sqnr_db, training_only
from ..winograd.transforms import apply_diagonal_scales


def learn_paw_fsq(layer: QuantWinogradConv2d, inputs: torch.Tensor, steps: int = 100, lr: float = 1e-3,
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
        # FSQ start: factorized per-tap scales that balance the taps' ranges measured on the
        # calibration data; folded into the matrices PAW then learns (rows of similar size).
        s_b, s_g = closed_form_scales(layer, inputs, 1.0)
        layer.set_free_transforms(*apply_diagonal_scales(tc.AT, tc.G, tc.BT, s_b, s_g))
    params = list(layer.free_transforms.parameters()) + [layer.log_sb, layer.log_sg]
    with torch.no_grad():
        start_sqnr = sqnr_db(layer(inputs), ref_all)
    start_values = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    with training_only(layer, params):
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
    with torch.no_grad():
        after = sqnr_db(layer(inputs), ref_all)
        if after < start_sqnr:
            for p, v in zip(params, start_values):
                p.copy_(v)
            after = start_sqnr
    return {"sqnr_standard_db": before, "sqnr_learned_db": after, "seconds": time.perf_counter() - start}
