"""End-to-end deployment: whole quantized models against float and against the int8 paths users
already have, same inputs, same threads.

    python benchmarks/deploy_e2e.py --models r20 r56 r18 --threads-list 1 2 --out benchmarks/out/deploy_e2e.json

Per model: top-1 (CIFAR models, ``--n-images`` of the fixed shuffle, static ranges on
``--calib-images`` other images; ResNet-18 at 224x224 has random weights and random inputs, so
only its speed and its agreement with the integer model are meaningful) and median wall ms per
batch of
* float32: torch (eager) and onnxruntime (``torch.onnx.export``);
* torch.ao int8: FX graph mode post-training quantization, ``x86`` backend (per-channel int8
  weights, uint8 activations, calibrated on the same images);
* onnxruntime's own int8 quantizer: ``quantize_static`` QOperator, per-channel, on the same images;
* winoq integer-only W8A8 (``winoq.integer.convert``): every step in PyTorch (the bit-exact int32 /
  int64 reference), on winoq's compiled runtime (``winoq.integer.compile_model``: fused int8 kernels,
  the same output codes), as exact ONNX (``ConvInteger`` + int64 dyadic requantization) and as fast
  ONNX (``ops="qlinear"``: ``QLinearConv`` / ``QLinearAdd``) in onnxruntime;
* winoq integer-only W8A8 with its eligible 3x3 convs as integer Winograd F(m,3) (``--winograd``,
  default m = 4) on the compiled runtime.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cifar_split, dump_json, machine  # noqa: E402
from winoq.integer.onnx_export import cpu_session  # noqa: E402


def median_ms(fn, reps: int, budget_s: float) -> float:
    fn()
    ts, t_end = [], time.perf_counter() + budget_s
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and len(ts) >= 3:
            break
    return 1e3 * statistics.median(ts)


def ort_fn(sess):
    return lambda t: torch.from_numpy(sess.run(None, {"x": t.numpy().astype(np.float32)})[0])


def torch_ao(model, calib, example):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    qm = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (example,))
    with torch.no_grad():
        for i in range(0, len(calib), 32):
            qm(calib[i:i + 32])
    return convert_fx(qm)


def ort_quantized(fp_path, calib, out):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": calib[i:i + 32].numpy()} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.it, None)

    pre = Path(out).with_suffix(".pre.onnx")
    quant_pre_process(str(fp_path), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def load(name, n_images, calib_images):
    from winoq.models import resnet18
    from winoq.models.cifar_resnet import load_cifar_resnet

    if name in ("r20", "r56"):
        x, y, calib = cifar_split(n_images, calib_images)
        return load_cifar_resnet(int(name[1:])).eval(), x, y, calib
    g = torch.Generator().manual_seed(0)
    model = resnet18().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics for a random network
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(max(n_images, 8), 3, 224, 224, generator=g)
    return model, x, None, torch.randn(calib_images, 3, 224, 224, generator=g)


REF = "winoq integer (PyTorch steps)"


def pytorch_steps(im):
    """``im`` with every step on its PyTorch definition (the compiled kernels off)."""
    def run(x):
        with im.kernels("torch"):
            return im(x)
    return run


def run_model(name, args, tmp: Path, n_images: int, calib_images: int) -> dict:
    from winoq.integer import IntegerConfig, compile_model, convert
    from winoq.integer.onnx_export import export_onnx

    model, x, y, calib = load(name, n_images, calib_images)
    torch.set_num_threads(max(args.threads_list))
    paths = {k: tmp / f"{name}_{k}.onnx" for k in ("fp", "ortq", "exact", "qlinear")}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x[:1], str(paths["fp"]), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}}, dynamo=False)
        ao = torch_ao(model, calib, x[:1])
        ort_quantized(paths["fp"], calib, paths["ortq"])
        im = convert(model, calib)
        wino = {m: compile_model(convert(model, calib, IntegerConfig(winograd=m))) for m in args.winograd}
        export_onnx(im, paths["exact"], x[:1])
        export_onnx(im, paths["qlinear"], x[:1], ops="qlinear", calib=calib[:64])
    print(f"{name}: built the models in {time.perf_counter() - t0:.0f} s", flush=True)

    def runners(threads):   # every column's callable, the onnxruntime ones at ``threads`` threads
        sess = {k: cpu_session(p, threads) for k, p in paths.items()}
        return {"float torch": model, "float onnxruntime": ort_fn(sess["fp"]), "torch.ao int8 (x86)": ao,
                "onnxruntime quantize_static int8": ort_fn(sess["ortq"]), REF: pytorch_steps(im),
                "winoq integer (compiled)": compile_model(im),
                **{f"winoq integer F({m},3) (compiled)": w for m, w in wino.items()},
                "winoq ONNX exact (ConvInteger)": ort_fn(sess["exact"]),
                "winoq ONNX fast (QLinearConv)": ort_fn(sess["qlinear"])}

    row = {"accuracy": {}, "ms": {}}
    fns = runners(1)
    with torch.no_grad():
        preds = {k: torch.cat([f(x[i:i + 100]).argmax(1) for i in range(0, len(x), 100)]) for k, f in fns.items()
                 if y is not None or k in (REF, "winoq integer (compiled)", "winoq ONNX fast (QLinearConv)")}
    ref = preds[REF]
    for k, p in preds.items():
        row["accuracy"][k] = {"top1": None if y is None else 100.0 * float((p == y).float().mean()),
                              "same_as_winoq_integer": 100.0 * float((p == ref).float().mean())}
    for threads in args.threads_list:
        torch.set_num_threads(threads)
        fns = runners(threads)
        for batch in (args.r18_batches if name == "r18" else args.batches):
            xb = x[:batch] if len(x) >= batch else x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
            key = f"threads={threads},batch={batch}"
            row["ms"][key] = {}
            with torch.no_grad():
                for k, f in fns.items():
                    slow = k in (REF, "winoq ONNX exact (ConvInteger)")
                    if slow and name == "r18" and batch > 1:
                        continue  # the reference paths take seconds per 224x224 image
                    row["ms"][key][k] = median_ms(lambda: f(xb), 3 if slow else args.reps, args.budget)
            print(f"{name} {key}: " + ", ".join(f"{k} {v:.1f}" for k, v in row["ms"][key].items()), flush=True)
    row["size_bytes"] = {"float32 weights": sum(p.numel() * 4 for p in model.parameters()),
                         "winoq integer": im.size_bytes(), "winoq ONNX fast file": paths["qlinear"].stat().st_size,
                         "float ONNX file": paths["fp"].stat().st_size}
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["r20", "r56", "r18"], choices=["r20", "r56", "r18"])
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--threads-list", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--r18-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--winograd", type=int, nargs="*", default=[4], choices=[2, 4, 6],
                    help="tiles m of the integer Winograd models on the compiled runtime (none: skip them)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timing per cell at most")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/deploy_e2e.json"))
    args = ap.parse_args(argv)
    result = {"machine": machine(), "command": "python benchmarks/deploy_e2e.py " + " ".join(argv or sys.argv[1:]),
              "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            n = args.n_images if name != "r18" else 8
            result["rows"][name] = run_model(name, args, Path(tmp), n, args.calib_images if name != "r18" else 32)
            dump_json(args.out, result)
    for name, row in result["rows"].items():
        print(f"\n{name}: top-1 / same prediction as the winoq integer model")
        for k, v in row["accuracy"].items():
            top1 = "" if v["top1"] is None else f"{v['top1']:.1f}"
            print(f"  {k:36s} {top1:>6s}  {v['same_as_winoq_integer']:.1f}%")
        for key, ms in row["ms"].items():
            print(f"  {key}: " + " | ".join(f"{k} {v:.1f}" for k, v in ms.items()))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
