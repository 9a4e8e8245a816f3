"""Segmentation U-Nets (dense and pruned) as integer-only W8A8 models in onnxruntime's int8 kernels:
Dice and CPU latency against the float model.

    python benchmarks/unet_int8.py --dataset sunnybrook --pruned /tmp/p64.safetensors --out benchmarks/out/unet_int8_sunnybrook.json

Per model (the dense U-Net of benchmarks/weights and each ``--pruned`` file from ``winoq prune``):
test Dice of the float model, of the integer model (``winoq.integer.convert``, static ranges on
32 training images; the bit-exact int32 reference in torch) and of its fast ONNX export
(``ops="qlinear"``) in onnxruntime; latency at batch 1 (median thread CPU ms of ``--repeats``
runs at 1 thread, and median wall ms at 1 and 2 threads) of float torch, float onnxruntime and
int8 onnxruntime.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, dump_json, machine  # noqa: E402


def run_model(label, model, train, test, example, tmp: Path, repeats: int) -> dict:
    from winoq.data.segmentation import pad_to_multiple
    from winoq.models.unet_seg import count_params
    from winoq.pruning import evaluate
    from winoq.pruning.deploy import export_onnx, int8_onnx, onnx_latency, onnx_logits, torch_latency
    from winoq.pruning.train import logit_scores, predict_logits

    m = 2 ** model.config.depth
    fp_path, q_path = tmp / f"{label}_fp.onnx", tmp / f"{label}_int8.onnx"
    export_onnx(model, fp_path, example)
    im = int8_onnx(model, pad_to_multiple(train.images[:32], m)[0], q_path, example)
    with torch.no_grad():
        int_logits = predict_logits(im, test.images, m, batch_size=4)
    onnx_int8 = onnx_logits(q_path, test.images, m)
    row = {"params": count_params(model),
           "dice": {"float": evaluate(model, test)["dice"],
                    "integer (torch, exact)": logit_scores(int_logits, test)["dice"],
                    "int8 onnxruntime": logit_scores(onnx_int8, test)["dice"]},
           "pixels_same_as_integer": float(((onnx_int8 > 0) == (int_logits > 0)).float().mean()),
           "latency": {}}
    for threads in (1, 2):
        row["latency"][f"threads={threads}"] = {
            "float torch": torch_latency(model, example, threads, repeats),
            "float onnxruntime": onnx_latency(fp_path, example, threads, repeats),
            "int8 onnxruntime": onnx_latency(q_path, example, threads, repeats)}
    lat = row["latency"]["threads=1"]
    print(f"{label}: {row['params']} params, Dice float {row['dice']['float']:.4f} / integer "
          f"{row['dice']['integer (torch, exact)']:.4f} / int8 ORT {row['dice']['int8 onnxruntime']:.4f}; "
          f"1-thread CPU ms: float torch {lat['float torch']['cpu_median_ms']:.1f}, float ORT "
          f"{lat['float onnxruntime']['cpu_median_ms']:.1f}, int8 ORT {lat['int8 onnxruntime']['cpu_median_ms']:.1f}",
          flush=True)
    return row


def main(argv=None):
    from winoq.data.segmentation import load_segmentation, pad_to_multiple
    from winoq.pruning import load_unet

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["sunnybrook", "chase"], required=True)
    ap.add_argument("--pruned", nargs="*", default=[], type=Path, help="pruned U-Nets (winoq prune --out)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dense, info = load_unet(REPO / "benchmarks" / "weights" / f"unet_{args.dataset}.safetensors")
    targs = info.get("args", {})
    kw = {"size": targs.get("size", 128), "crop": targs.get("crop")} if args.dataset == "sunnybrook" else \
        {"downscale": targs.get("downscale", 3)}
    train, test = load_segmentation(args.dataset, "train", **kw), load_segmentation(args.dataset, "test", **kw)
    example = pad_to_multiple(test.images[:1], 2 ** dense.config.depth)[0].contiguous()
    result = {"machine": machine(), "command": "python benchmarks/unet_int8.py " + " ".join(argv or sys.argv[1:]),
              "dataset": args.dataset, "example_shape": list(example.shape), "rows": {}}
    out = args.out or REPO / "benchmarks" / "out" / f"unet_int8_{args.dataset}.json"
    with tempfile.TemporaryDirectory() as tmp:
        models = [("dense", dense)] + [(p.stem, load_unet(p)[0]) for p in args.pruned]
        for label, model in models:
            result["rows"][label] = run_model(label, model.eval(), train, test, example, Path(tmp), args.repeats)
            dump_json(out, result)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
