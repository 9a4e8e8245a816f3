"""The paper's mechanism on the CIFAR ResNets of ../shared:

* per-tap range spread of the Winograd-domain product M (max/min over taps of the
  largest |M| per tap, on real activations) with standard vs learned scales;
* per-layer SQNR of W8A8 fully quantized F(m,3) on Gaussian noise (what the
  scales were learned on) vs on real activations (do noise-learned scales hold?);
* the cost of quantizing data-free (seconds for the whole model).

    python benchmarks/mechanism.py --depth 56 --tiles 4 6 --out benchmarks/out/mechanism.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine, shared_dir  # noqa: E402

import winoq  # noqa: E402
from winoq.data import cifar_transform, load_imagefolder_tensors  # noqa: E402
from winoq.models import load_cifar_resnet  # noqa: E402
from winoq.winograd.conv import hadamard_taps_first, tiles_taps_first, transform_2d, transform_taps_first  # noqa: E402
from winoq.winograd.quantized import QuantWinogradConv2d  # noqa: E402
from winoq.winograd.scales import reference_output, sqnr_db  # noqa: E402


@torch.no_grad()
def tap_spread(layer: QuantWinogradConv2d, x: torch.Tensor) -> float:
    """max/min over taps of max |M| per tap (unquantized pipeline, layer's transforms)."""
    at, g, bt = layer.transforms(torch.float32, "cpu")
    xp = layer.pad_input(x)
    v = transform_taps_first(bt, tiles_taps_first(xp, layer.m, layer.kernel_size, layer.output_hw(xp)))
    mprod = hadamard_taps_first(transform_2d(g, layer.weight), v, layer.groups)
    per_tap = mprod.abs().flatten(1).amax(1)
    return float(per_tap.max() / per_tap.min().clamp_min(1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--tiles", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/mechanism.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x_all, _ = load_imagefolder_tensors(str(shared_dir() / "data" / "cifar10-test"), cifar_transform(),
                                        limit=args.n_images)
    model = load_cifar_resnet(args.depth)
    out = {"machine": machine(), "depth": args.depth, "n_images": args.n_images}
    for m in args.tiles:
        res = {}
        for scales in ("standard", "learned"):
            t0 = time.perf_counter()
            q = winoq.quantize(model, winoq.Recipe(winograd=m, scales=scales), progress=False)
            res[f"quantize_s_{scales}"] = time.perf_counter() - t0
            layers = {n: l for n, l in q.named_modules() if isinstance(l, QuantWinogradConv2d)}
            acts = {}
            hooks = [l.register_forward_pre_hook(lambda mod, a, n=n: acts.__setitem__(n, a[0])) for n, l in layers.items()]
            with torch.no_grad():
                q(x_all)
            for h in hooks:
                h.remove()
            rows = res.setdefault("layers", {})
            for rep in q.winoq_report:
                if rep.kind != "winograd":
                    continue
                layer, xr = layers[rep.name], acts[rep.name]
                with torch.no_grad():
                    real = sqnr_db(layer(xr), reference_output(layer, xr))
                row = rows.setdefault(rep.name, {})
                row[f"spread_{scales}"] = tap_spread(layer, xr)
                row[f"sqnr_real_{scales}"] = real
                if scales == "learned":
                    row["sqnr_noise_standard"] = rep.calibration["sqnr_standard_db"]
                    row["sqnr_noise_learned"] = rep.calibration["sqnr_learned_db"]
        out[f"F({m},3)"] = res
        rows = res["layers"]
        mean = lambda k: sum(r[k] for r in rows.values()) / len(rows)  # noqa: E731
        gmean = lambda k: torch.tensor([r[k] for r in rows.values()]).log().mean().exp().item()  # noqa: E731
        print(f"ResNet-{args.depth} W8A8 F({m},3), {len(rows)} Winograd layers, {args.n_images} images for real SQNR")
        print(f"  tap range spread of M (geo-mean over layers): standard {gmean('spread_standard'):.0f}x, "
              f"learned {gmean('spread_learned'):.1f}x")
        print(f"  SQNR dB (mean over layers): noise standard {mean('sqnr_noise_standard'):.1f}, "
              f"noise learned {mean('sqnr_noise_learned'):.1f}, real standard {mean('sqnr_real_standard'):.1f}, "
              f"real learned {mean('sqnr_real_learned'):.1f}")
        print(f"  data-free quantize time (whole model, learned): {res['quantize_s_learned']:.1f} s")
        dump_json(args.out, out)


if __name__ == "__main__":
    main()
