"""The configurable segmentation U-Net."""
from __future__ import annotations

import pytest
import torch

from winoq.models.unet_seg import UNetConfig, UNetSeg, count_params, default_widths, measured_widths, width_slots


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
@pytest.mark.parametrize("depth", [1, 3])
def test_forward_shape(norm, depth):
    model = UNetSeg(UNetConfig(in_channels=3, out_channels=2, depth=depth, base_width=4, norm=norm)).eval()
    assert model(torch.randn(2, 3, 16, 24)).shape == (2, 2, 16, 24)
    assert measured_widths(model) == default_widths(depth, 4)
    assert len(width_slots(depth)) == len(default_widths(depth, 4))


def test_explicit_widths_build_a_smaller_net():
    cfg = UNetConfig(depth=2, base_width=8)
    narrow = cfg.with_widths([1] * len(width_slots(2)))
    assert count_params(UNetSeg(narrow)) < count_params(UNetSeg(cfg))
    assert UNetConfig.from_dict(narrow.to_dict()) == narrow


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="norm"):
        UNetConfig(norm="layer")
    with pytest.raises(ValueError, match="widths has 3 entries"):
        UNetConfig(depth=2, widths=(1, 2, 3))
    with pytest.raises(ValueError, match="divisible by 8"):
        UNetSeg(UNetConfig(depth=3, base_width=2))(torch.zeros(1, 1, 12, 16))
