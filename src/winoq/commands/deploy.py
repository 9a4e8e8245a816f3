"""``winoq deploy``: convert a model to integer-only inference (HAWQ-V3 dyadic arithmetic, optionally
a mixed-precision plan or integer Winograd layers), export it to ONNX for onnxruntime's fused int8
kernels, and report what it cost in accuracy and gained in size and speed against the float model
(torch and onnxruntime, same batch and threads). The integer model also runs on winoq's own compiled
int8 kernels (``winoq.integer.compile_model``; the only path that runs its Winograd layers as
Winograd), timed beside the ONNX file."""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("deploy", help="integer-only model -> ONNX (onnxruntime int8), accuracy / size / speed",
                              description=__doc__)
    p.add_argument("--model", default="fmnist-resnet", help="model name or state-dict file (as for quantize)")
    p.add_argument("--weights", help="weights file, or 'shared' for the CIFAR ResNets")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL.onnx", help="the deployable ONNX file")
    p.add_argument("--bits", type=int, default=8, choices=(4, 8), help="weight and activation bits of every layer "
                   "(first and last layer stay 8 bit)")
    p.add_argument("--plan", type=Path, help="mixed-precision plan JSON from `winoq mixed --out` (per-layer bits)")
    p.add_argument("--winograd", type=int, choices=(2, 4, 6), help="integer Winograd F(m,3) for eligible convs in "
                   "the integer model; ONNX has no Winograd operator, so the file runs them as direct twins")
    p.add_argument("--exact", action="store_true", help="export ConvInteger + int64 dyadic requantization (bit for "
                   "bit the integer model, much slower in onnxruntime) instead of fused QLinearConv")
    p.add_argument("--data", metavar="DIR", help="evaluation images (default: the model's test set when found)")
    p.add_argument("--calib-data", metavar="DIR", help="calibration images (ImageFolder); default: Fashion-MNIST "
                   "training images for fmnist-resnet, else images held out of --data")
    p.add_argument("--calib-images", type=int, default=128, metavar="N")
    p.add_argument("--n-images", type=int, default=1000, metavar="N", help="evaluation images")
    p.add_argument("--batch", type=int, default=64, help="batch size of the timing")
    p.add_argument("--threads", type=int, default=1, help="threads of torch and onnxruntime in the timing")
    p.add_argument("--reps", type=int, default=7, help="timed runs per model (median)")
    p.add_argument("--report", type=Path, metavar="OUT.json", help="write the measurements as JSON")
    p.set_defaults(func=run)


def _config(args, calib):
    from ..integer import IntegerConfig
    from ._common import CLIError

    layer_bits = {}
    if args.plan:
        from ..mixed_precision.planner import Plan

        try:
            layer_bits = dict(Plan.from_json(args.plan.read_text()).bits)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CLIError(f"--plan {args.plan}: not a plan written by `winoq mixed --out` ({exc})") from None
    try:
        return IntegerConfig(weight_bits=args.bits, act_bits=args.bits, layer_bits=layer_bits, winograd=args.winograd,
                             calib_samples=len(calib))
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _data(args, name):
    """(calibration images, evaluation images, labels, description)."""
    import torch

    from ._common import CLIError, load_eval_data
    from .quantize import _calibration_images

    calib = _calibration_images(name, args.calib_data, args.calib_images)
    n_eval = args.n_images + (0 if calib is not None else args.calib_images)
    try:
        x, y, what = load_eval_data(name, args.data, n_eval, quiet=True)
    except CLIError:
        if calib is None:
            raise CLIError("winoq deploy needs calibration images: pass --calib-data DIR (ImageFolder) or --data DIR")
        raise
    if calib is None:  # hold calibration images out of the evaluation set (a fixed shuffle)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        calib, x, y = x[order[:args.calib_images]], x[order[args.calib_images:]], y[order[args.calib_images:]]
        what += f"; {len(calib)} of them held out for calibration"
    return calib, x, y, what


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up (onnxruntime plans, oneDNN primitives)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts)[len(ts) // 2]


def _top1(fn, x, y, batch: int = 250):
    """(top-1 %, predicted classes) of ``fn`` on ``x``."""
    import torch

    preds = torch.cat([fn(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return 100.0 * float((preds == y).float().mean()), preds


def measure_deployment(model, im, onnx_path, x, y, batch: int, threads: int, reps: int) -> dict:
    """Top-1 of the float model, the integer model (run by winoq's compiled runtime: the same codes as
    its PyTorch steps) and the ONNX file (with the share of images where the file predicts the integer
    model's class), the median ms per batch of float torch, float onnxruntime, the integer model on
    winoq's compiled int8 kernels and the file in onnxruntime, and the sizes."""
    import numpy as np
    import torch

    from ..integer import compile_model
    from ..integer.onnx_export import cpu_session

    sess = cpu_session(onnx_path, threads)
    run_int8 = lambda t: torch.from_numpy(sess.run(["logits"], {"x": t.numpy().astype(np.float32)})[0])  # noqa: E731
    compiled = compile_model(im)
    with torch.no_grad():
        acc_fp, _ = _top1(model, x, y)
        acc_int, p_int = _top1(compiled, x, y)
        acc_onnx, p_onnx = _top1(run_int8, x, y)
    result = {"batch": batch, "threads": threads,
              "top1": {"float": acc_fp, "integer": acc_int, "onnx": acc_onnx,
                       "onnx_same_prediction_as_integer": 100.0 * float((p_int == p_onnx).float().mean())}}
    with tempfile_dir() as tmp:
        fp_path = Path(tmp) / "float.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, x[:1], str(fp_path), input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "N"}}, dynamo=False)
        fp_sess = cpu_session(fp_path, threads)
        xb = x[:batch]
        if len(xb) < batch:
            xb = xb.repeat((batch + len(xb) - 1) // len(xb), *([1] * (xb.dim() - 1)))[:batch]
        xn = xb.numpy().astype(np.float32)
        with torch.no_grad():
            result["ms_per_batch"] = {"float torch": _median_ms(lambda: model(xb), reps),
                                      "float onnxruntime": _median_ms(lambda: fp_sess.run(None, {"x": xn}), reps),
                                      "winoq int8 kernels": _median_ms(lambda: compiled(xb), reps),
                                      "int8 onnxruntime": _median_ms(lambda: sess.run(None, {"x": xn}), reps)}
    float_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values() if p.is_floating_point())
    result["size_bytes"] = {"float32 weights": float_bytes, "onnx file": Path(onnx_path).stat().st_size,
                            "integer weights + int32 bias": im.size_bytes()}
    return result


def run(args) -> int:
    from ..integer import IntegerConversionError, convert
    from ..integer.onnx_export import export_onnx
    from ._common import CLIError, check_output, load_float_model, set_threads

    for opt in ("calib_images", "n_images", "batch", "threads", "reps"):
        if getattr(args, opt) < 1:
            raise CLIError(f"--{opt.replace('_', '-')} must be >= 1")
    if args.out.suffix != ".onnx":
        raise CLIError(f"--out {args.out}: give a .onnx file name")
    check_output(args.out, [Path(p) for p in (args.model, args.weights) if p and p != "shared"])
    model, name = load_float_model(args.model, args.weights)
    model.eval()
    calib, x, y, what = _data(args, name)
    cfg = _config(args, calib)
    print(f"converting {name} to integer-only ({'plan ' + str(args.plan) if args.plan else f'W{args.bits}A{args.bits}'}"
          f"{f', Winograd F({args.winograd},3)' if args.winograd else ''}; static ranges on {len(calib)} images) ...",
          file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = convert(model, calib, cfg)
            export_onnx(im, args.out, x[:1], ops="integer" if args.exact else "qlinear", calib=calib[:64])
    except (IntegerConversionError, ValueError) as exc:
        raise CLIError(f"cannot deploy {name}: {exc}") from None
    print(f"ONNX ({'ConvInteger, exact' if args.exact else 'QLinearConv'}) -> {args.out}")

    set_threads(args.threads)
    result = {"model": name, "data": what, "out": str(args.out), "ops": "integer" if args.exact else "qlinear",
              **measure_deployment(model, im, args.out, x, y, args.batch, args.threads, args.reps)}
    print(_table(result, x, len(im.layers)))
    if args.report:
        args.report.write_text(json.dumps(result, indent=1))
        print(f"report -> {args.report}")
    return 0


def tempfile_dir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="winoq-deploy-")


def _table(r, x, n_layers) -> str:
    t, ms, sz = r["top1"], r["ms_per_batch"], r["size_bytes"]
    lines = [f"{r['model']} on {r['data']}",
             f"  top-1 %: float {t['float']:.2f} | integer-only {t['integer']:.2f} ({t['integer'] - t['float']:+.2f}) "
             f"| ONNX in onnxruntime {t['onnx']:.2f} ({t['onnx'] - t['float']:+.2f}; same prediction as the integer "
             f"model on {t['onnx_same_prediction_as_integer']:.1f}% of {len(x)} images)",
             f"  size: float32 weights {sz['float32 weights'] / 1e6:.3f} MB -> integer {sz['integer weights + int32 bias'] / 1e6:.3f} MB "
             f"({sz['float32 weights'] / max(sz['integer weights + int32 bias'], 1):.1f}x smaller; ONNX file "
             f"{sz['onnx file'] / 1e6:.3f} MB), {n_layers} layers",
             f"  speed, batch {r['batch']}, {r['threads']} thread(s), median ms per batch:"]
    base = ms["float torch"]
    for k, v in ms.items():
        lines.append(f"    {k:18s} {v:9.2f} ms  ({base / v:.2f}x vs float torch, {ms['float onnxruntime'] / v:.2f}x vs "
                     f"float onnxruntime)")
    return "\n".join(lines)
