"""The pruned U-Net through W8A8 quantization, ONNX export and the latency helpers."""
from __future__ import annotations

import pytest
import torch

from winoq.models.unet_seg import UNetConfig, UNetSeg
from winoq.pruning import PruneConfig, prune_unet
from winoq.pruning.deploy import export_onnx, onnx_latency, onnx_outputs, quantize_w8a8, torch_latency

EXAMPLE = torch.zeros(1, 1, 16, 16)


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    dense = UNetSeg(UNetConfig(depth=2, base_width=8)).eval()
    return prune_unet(dense, PruneConfig(target_ratio=4), example=EXAMPLE, progress=False).model


@pytest.mark.parametrize("winograd", [None, 4])
def test_w8a8_quantized_pruned_unet_tracks_float(pruned, winograd, one_thread):
    x = torch.rand(2, 1, 16, 16)
    q = quantize_w8a8(pruned, winograd)
    with torch.no_grad():
        ref, out = pruned(x), q(x)
    kinds = {r.kind for r in q.winoq_report}
    assert kinds == ({"direct"} if winograd is None else {"winograd", "direct"})
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > 20, f"W8A8 SQNR {sqnr:.1f} dB"


def test_onnx_export_matches_torch(pruned, tmp_path):
    pytest.importorskip("onnxruntime")
    x = torch.rand(1, 1, 16, 16)
    path = export_onnx(pruned, tmp_path / "p.onnx", x)
    with torch.no_grad():
        assert torch.allclose(onnx_outputs(path, x), pruned(x), atol=1e-5)
    lat = onnx_latency(path, x, threads=1, repeats=2, warmup=0)
    assert lat["repeats"] == 2 and lat["min_ms"] <= lat["median_ms"] <= lat["max_ms"]
    assert torch_latency(pruned, x, threads=1, repeats=2, warmup=0)["median_ms"] > 0
