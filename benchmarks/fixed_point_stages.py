"""The fixed-point pipeline (``kernel="cpu"``) against the float-transform emulation, per stage setting.

One 128 -> 128 channel 3x3 layer (kaiming weights, seed 0), 2 x 28 x 28 ReLU'd noise input, g32,
closed-form learned transform scales; SQNR (dB) of ``layer.forward_emulated`` and of
``fixed_point.reference_forward`` (what the compiled kernel returns, bit for bit) against the
float64 conv, for: input scales per sample with V/U shared by the taps (the paper), per tile and
shared, per tile with V/U per tap (the default); M int8 or int16 (the default).

    python benchmarks/fixed_point_stages.py       # table + benchmarks/out/fixed_point_stages.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine  # noqa: E402

from winoq.formats import parse  # noqa: E402
from winoq.winograd import fixed_point as fp  # noqa: E402
from winoq.winograd.quantized import QuantWinogradConv2d, StageFormats  # noqa: E402
from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales, sqnr_db  # noqa: E402

SETTINGS = (("sample", False), ("fine", False), ("fine", True))


def main() -> None:
    rows = []
    x = torch.randn(2, 128, 28, 28, generator=torch.Generator().manual_seed(1)).relu()
    heads = [f"{g}/{'tap' if t else 'shared'} emu | fixed" for g, t in SETTINGS]
    print(f"{'tile':<7}{'M':<6}" + "".join(f"{h:>28}" for h in heads))
    for m in (4, 6):
        for out in ("int8", "int16"):
            torch.manual_seed(0)
            conv = torch.nn.Conv2d(128, 128, 3, padding=1)
            torch.nn.init.kaiming_normal_(conv.weight)
            exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            layer = QuantWinogradConv2d.from_conv(conv, m, group_size=32,
                                                  formats=StageFormats(output=parse(out))).eval()
            learn_layer_scales(layer, ScaleLearningConfig(steps=0))
            cells = []
            for gran, tap in SETTINGS:
                layer.activation_granularity, layer.input_tapwise, layer.weight_tapwise = gran, tap, tap
                with torch.no_grad():
                    emu = sqnr_db(layer.forward_emulated(x).double(), exact)
                    fixed = sqnr_db(fp.reference_forward(layer, x).double(), exact)
                rows.append({"tile": m, "m_format": out, "input": gran, "tapwise_v_u": tap,
                             "emulated_db": emu, "fixed_point_db": fixed})
                cells.append(f"{emu:.2f} | {fixed:.2f}")
            print(f"F({m},3) {out:<6}" + "".join(f"{c:>28}" for c in cells), flush=True)
    out_path = Path(__file__).resolve().parent / "out" / "fixed_point_stages.json"
    dump_json(out_path, {"machine": machine(), "rows": rows})
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
