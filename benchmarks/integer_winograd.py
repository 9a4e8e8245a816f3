"""Integer Winograd layers inside the integer-only graph, on a CIFAR ResNet from ../shared.

    python benchmarks/integer_winograd.py --depth 20 --n-images 1000 --out benchmarks/out/integer_winograd_r20.json

Rows: FP; integer-only W8A8 with every conv direct (HAWQ-V3); integer-only W8A8 with every 3x3
stride-1 conv of at least 16 channels as integer Winograd F(m, 3), m = 2, 4, 6
(``IntegerConfig(winograd=m)``: fixed-point transforms with data-free learned scales, static
V scales per tile, tap and 32 channels as powers of two (``tile``) or static per tap with min-max
or MSE clipping (``static``), int16 M). Each row states whether the integer
model's codes equal its float64 simulation bit for bit on the first 64 images, the general
multiplications per image and the conversion time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_cifar_args, cifar_result, cifar_setup, dump_json, top1  # noqa: E402

import torch  # noqa: E402

from winoq.integer import IntegerConfig, convert  # noqa: E402
from winoq.models import load_cifar_resnet  # noqa: E402


def onnx_rows(im, x, y, path) -> dict:
    """Top-1 of the ONNX export (Winograd layers as direct twins) in onnxruntime, how often its
    prediction equals the integer Winograd model's, and whether it equals the twin model bit for bit."""
    import copy
    import warnings

    from winoq.integer.onnx_export import export_onnx, run_onnx
    from winoq.integer.winograd import IntWinogradConv2d

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(im, path, x[:1])
    twin = copy.deepcopy(im)
    for step in twin.steps:
        if isinstance(step, IntWinogradConv2d):
            step.forward = step.direct_twin
    ort = torch.cat([run_onnx(path, x[i:i + 250]) for i in range(0, len(x), 250)])
    with torch.no_grad():
        ours = torch.cat([im(x[i:i + 250]) for i in range(0, len(x), 250)])
        exact = torch.equal(ort[:64], twin(x[:64]))
    return {"onnx_top1": 100.0 * float((ort.argmax(1) == y).float().mean()),
            "onnx_same_prediction": 100.0 * float((ort.argmax(1) == ours.argmax(1)).float().mean()),
            "onnx_equals_direct_twins": exact}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--clips", nargs="+", default=["minmax"])
    ap.add_argument("--v-scales", nargs="+", default=["tile", "static"])
    ap.add_argument("--direct", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--onnx", action="store_true",
                    help="also export each Winograd row to ONNX (direct twins) and score it in onnxruntime")
    ap.add_argument("--scales", nargs="+", default=["learned"])
    ap.add_argument("--input-rows", nargs="+", default=["auto"], choices=["auto", "fixed", "exact"],
                    help="the integer input transform's rows (IntegerConfig.winograd_input_rows)")
    add_cifar_args(ap, n_images=1000, calib_images=256, out="benchmarks/out/integer_winograd.json")
    args = ap.parse_args(argv)
    x, y, calib = cifar_setup(args)
    model = load_cifar_resnet(args.depth)
    res = cifar_result("integer_winograd.py", args, argv)
    res["rows"]["FP32"] = {"top1": top1(model, x, y)}
    print("FP32", res["rows"]["FP32"], flush=True)
    configs = {"int W8A8 direct": IntegerConfig()} if args.direct else {}
    for m in args.tiles:
        for vs in args.v_scales:
            for clip in (args.clips if vs == "static" else ["-"]):
                for sc in args.scales:
                    for rows in args.input_rows:
                        name = f"int W8A8 F({m},3) V {vs}{'' if clip == '-' else ' ' + clip} {sc} rows {rows}"
                        configs[name] = IntegerConfig(winograd=m, winograd_v_scales=vs, winograd_scales=sc,
                                                      winograd_v_clip="minmax" if clip == "-" else clip,
                                                      winograd_input_rows=rows)
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        im = convert(model, calib, cfg)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            exact = torch.equal(im.forward_integer(im.quantize_input(x[:64])).double(), im.simulate_codes(x[:64]))
        row = {"top1": top1(im, x, y), "bit_exact_vs_float64": exact, "convert_s": secs,
               "gmults": sum(i.macs for i in im.layers) / 1e9,
               "winograd_layers": sum(i.algorithm != "direct" for i in im.layers), "layers": len(im.layers)}
        if args.onnx and row["winograd_layers"]:
            row.update(onnx_rows(im, x, y, args.out.with_suffix(".onnx")))
        res["rows"][name] = row
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        dump_json(args.out, res)


if __name__ == "__main__":
    main()
