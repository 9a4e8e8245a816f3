"""Float32 accuracy of the exact (unquantized) Winograd conv against a float64 F.conv2d.

    python benchmarks/winograd_error.py --out benchmarks/out/winograd_error.json

For F(m,3) with m = 2..8 (default points) and F(m,5) with m = 2, 4: relative error
||y - y_ref|| / ||y_ref|| and max abs error over random Gaussian inputs and weights of
a 64->64 conv on a 32x32 input (batch 4), compared with float32 F.conv2d itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine  # noqa: E402

from winoq.winograd import WinogradConv2d, toom_cook  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/winograd_error.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(4, 64, 32, 32, generator=gen, dtype=torch.float64)
    rows = []
    cases = [(m, 3) for m in range(2, 9)] + [(2, 5), (4, 5)]
    for m, r in cases:
        conv = torch.nn.Conv2d(64, 64, r, padding=r // 2, bias=False).double()
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64) / (64 * r * r) ** 0.5)
        conv.requires_grad_(False)
        ref = F.conv2d(x, conv.weight, padding=r // 2)
        wino32 = WinogradConv2d.from_conv(conv, m).float()
        y32 = wino32(x.float()).double()
        direct32 = F.conv2d(x.float(), conv.weight.float(), padding=r // 2).double()
        y64 = WinogradConv2d.from_conv(conv, m)(x)
        rel = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
        tc = toom_cook(m, r)
        row = {"tile": f"F({m},{r})", "rel_err_winograd_fp32": rel(y32), "rel_err_direct_fp32": rel(direct32),
               "rel_err_winograd_fp64": rel(y64), "max_abs_err_winograd_fp32": float((y32 - ref).abs().max()),
               "cond_BT": float(torch.linalg.cond(tc.BT)), "mult_reduction": tc.multiplies_saved_2d()}
        rows.append(row)
        print(f"{row['tile']:8s} fp32 Winograd rel err {row['rel_err_winograd_fp32']:.2e}  "
              f"(direct fp32 {row['rel_err_direct_fp32']:.2e}, Winograd fp64 {row['rel_err_winograd_fp64']:.1e})  "
              f"cond(BT) {row['cond_BT']:.1f}  multiplies / {row['mult_reduction']:.2f}")
    dump_json(args.out, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
