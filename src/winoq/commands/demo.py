"""``winoq demo``: the embedded Fashion-MNIST ResNet quantized five ways and deployed as an int8 ONNX
file, with a report."""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

from ._common import (CLIError, EXIT_OK, EXIT_FAILED, FMNIST_MISSING, one_line, set_threads, positive_int,
                      progress_enabled, print_warnings, evaluate, add_common_options)


def _demo_methods():
    from ..recipe import Recipe

    return [
        ("FP32", None),
        ("direct W8A8", Recipe(winograd=None)),
        ("Winograd F(4,3) standard", Recipe(winograd=4, scales="standard")),
        ("Winograd F(4,3) learned", Recipe(winograd=4, scales="learned")),
        ("Winograd F(6,3) standard", Recipe(winograd=6, scales="standard")),
        ("Winograd F(6,3) learned", Recipe(winograd=6, scales="learned")),
    ]


def _describe_recipe(r) -> str:
    if r is None:
        return "float model (FP32)"
    group = "per-channel/per-tensor scales" if r.group_size is None else f"scale groups of {r.group_size} channels"
    if r.winograd is None:
        return f"{r.describe()}: every conv and linear direct, weights {r.weights}, activations {r.activations}, {group}"
    per_tap = r.tapwise_winograd_stages
    taps = ("one scale per tap for " + " and ".join(per_tap) + ", M's shared by the taps of a tile" if per_tap
            else "one scale shared by all taps of a tile")
    text = (f"{r.describe()}: 3x3 stride-1 convs with enough channels as Winograd F({r.winograd},3), stages "
            f"in/V/U/M {r.activations}/{r.activations}/{r.weights}/{r.winograd_output_format or r.activations}, "
            f"{taps}, {group}; other convs direct; seed {r.seed}")
    if r.scales == "learned":
        text += (f"; data-free S_B/S_G: closed form then {r.learn_steps} Adam steps (lr {r.learn_lr}) on "
                 f"{r.noise} noise")
    return text


def _pick_tap_layer(qstd, qlrn) -> str:
    """A middle Winograd layer present in both models (the demo's tap-range figure)."""
    names = [r.name for r in qlrn.winoq_report if r.kind == "winograd"]
    names = [n for n in names if any(r.name == n and r.kind == "winograd" for r in qstd.winoq_report)]
    return names[len(names) // 2]


def run(args) -> int:
    import torch

    from .. import __version__, quantize
    from ..data import fashion_mnist_tensors
    from ..metrics import timed
    from ..models import fmnist_metadata, load_default_fmnist_model
    from ..plots import plot_layer_sqnr, plot_tap_ranges
    from ..report import format_table, machine_info, write_markdown_report

    start = time.perf_counter()
    set_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    progress = progress_enabled(args)
    try:
        x, y = fashion_mnist_tensors("test")
    except FileNotFoundError:
        from ..data import DEFAULT_FASHION_MNIST_ROOT

        root = os.environ.get("WINOQ_FASHION_MNIST", DEFAULT_FASHION_MNIST_ROOT)
        raise CLIError(FMNIST_MISSING.format(root=root, where=""), EXIT_FAILED) from None
    except ValueError as exc:
        raise CLIError(one_line(exc), EXIT_FAILED) from None
    held_out = x[args.n_images:][-128:]   # calibration images never evaluated (if the train split is absent)
    x, y = x[: args.n_images], y[: args.n_images]
    out.mkdir(parents=True, exist_ok=True)
    model = load_default_fmnist_model()
    methods = _demo_methods()
    print(f"winoq demo: embedded Fashion-MNIST ResNet, {len(y)} test images, {len(methods)} methods, "
          f"{torch.get_num_threads()} thread(s)")
    rows, models = [], {}
    fp_acc = None
    for i, (label, recipe) in enumerate(methods, 1):
        step = f"[{i}/{len(methods)}] {label}"
        if recipe is None:
            qmodel, q_seconds = model, None
        else:
            print(f"{step}: quantizing ({recipe.describe()}) ...", flush=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                qmodel, q_seconds = timed(quantize, model, recipe, progress=progress)
            print_warnings(caught)
        acc, e_seconds = evaluate(qmodel, x, y, progress, f"eval {label}")
        fp_acc = acc if fp_acc is None else fp_acc
        models[label] = qmodel
        rows.append({"method": label, "accuracy": acc, "drop": fp_acc - acc, "quantize_seconds": q_seconds,
                     "eval_seconds": e_seconds, "recipe": None if recipe is None else json.loads(recipe.to_json())})
        q_text = "" if q_seconds is None else f", quantize {q_seconds:.1f} s"
        print(f"{step}: top-1 {acc:.2f} % (drop {fp_acc - acc:+.2f}){q_text}, eval {e_seconds:.1f} s", flush=True)

    deployment = _deploy(model, x, y, held_out, out)

    learned = {"F(4,3)": models["Winograd F(4,3) learned"].winoq_report,
               "F(6,3)": models["Winograd F(6,3) learned"].winoq_report}
    qstd, qlrn = models["Winograd F(6,3) standard"], models["Winograd F(6,3) learned"]
    tap_layer = _pick_tap_layer(qstd, qlrn)
    images = {
        "Per-layer SQNR: standard vs learned transform scales": plot_layer_sqnr(learned, out / "layer_sqnr.png"),
        f"Per-tap ranges of {tap_layer} (F(6,3)) before vs after learning": plot_tap_ranges(
            qstd.get_submodule(tap_layer), qlrn.get_submodule(tap_layer), out / "tap_ranges.png",
            title=f"Per-tap ranges of {tap_layer}, F(6,3), standard vs learned scales"),
    }
    total = time.perf_counter() - start
    try:
        fp_ref = fmnist_metadata().get("test_accuracy")
    except (FileNotFoundError, ValueError):
        fp_ref = None
    meta = {
        "model": "fmnist-resnet (embedded pretrained Fashion-MNIST ResNet, 3x3 convs at 28/14/7 px)"
                 + ("" if fp_ref is None else f"; full test-set FP32 accuracy {100 * fp_ref:.2f} %"),
        "data": "Fashion-MNIST test split (/usr/share/datasets/fashion-mnist or $WINOQ_FASHION_MNIST)",
        "n images": f"{len(y)} (the first {len(y)} of the test split)",
        "recipes": {label: _describe_recipe(r) for label, r in methods},
        "tap-range layer": f"{tap_layer} of the F(6,3) models",
        "machine": machine_info(),
        "winoq": __version__,
        "total seconds": f"{total:.1f}",
    }
    report_path = write_markdown_report(out / "report.md", rows, meta, images, title="winoq demo: Fashion-MNIST",
                                        layers={f"{k} learned": v for k, v in learned.items()},
                                        sections={"Deployment: integer-only W8A8 in onnxruntime": _deploy_lines(deployment)})
    results = {"meta": meta, "rows": rows, "deployment": deployment,
               "layers": {k: [r.__dict__ for r in v] for k, v in learned.items()},
               "files": {"report": "report.md", "layer_sqnr": "layer_sqnr.png", "tap_ranges": "tap_ranges.png"}}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print()
    print(format_table(rows))
    print()
    print(f"total time {time.perf_counter() - start:.1f} s; wrote to {out}:")
    for p in (report_path, out / "results.json", out / "model_int8.onnx", *images.values()):
        print(f"  {p}")
    return EXIT_OK


def _deploy(model, x, y, held_out, out: Path) -> dict:
    """The float model as an integer-only W8A8 ONNX file for onnxruntime's int8 kernels: what it costs
    in top-1 and gains in size and speed (``winoq deploy``'s measurement)."""
    import torch

    from ..integer import convert
    from ..integer.onnx_export import export_onnx
    from .deploy import measure_deployment
    from .quantize import _calibration_images

    calib = _calibration_images("fmnist-resnet", None, 128)
    if calib is None:
        calib = held_out
    print(f"[deploy] integer-only W8A8 (static ranges on {len(calib)} images) -> ONNX for onnxruntime's int8 "
          f"kernels ...", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = convert(model, calib)
        export_onnx(im, out / "model_int8.onnx", x[:1], ops="qlinear", calib=calib[:64])
    d = measure_deployment(model, im, out / "model_int8.onnx", x, y, 64, torch.get_num_threads(), 5)
    d["calibration_images"] = len(calib)
    print("[deploy] " + "; ".join(_deploy_lines(d)[:3]), flush=True)
    return d


def _deploy_lines(d: dict) -> list[str]:
    t, ms, sz = d["top1"], d["ms_per_batch"], d["size_bytes"]
    return [f"top-1 float {t['float']:.2f} %, integer-only {t['integer']:.2f} %, ONNX in onnxruntime {t['onnx']:.2f} % "
            f"(same prediction as the integer model on {t['onnx_same_prediction_as_integer']:.1f} % of the images)",
            f"size {sz['float32 weights'] / 1e6:.3f} MB float32 -> {sz['integer weights + int32 bias'] / 1e6:.3f} MB "
            f"integer ({sz['float32 weights'] / max(sz['integer weights + int32 bias'], 1):.1f}x smaller)",
            f"ms per batch of {d['batch']} ({d['threads']} thread(s)): float torch {ms['float torch']:.1f}, float "
            f"onnxruntime {ms['float onnxruntime']:.1f}, int8 onnxruntime {ms['int8 onnxruntime']:.1f} "
            f"({ms['float onnxruntime'] / ms['int8 onnxruntime']:.2f}x vs float onnxruntime), winoq int8 kernels "
            f"{ms['winoq int8 kernels']:.1f} ({ms['float torch'] / ms['winoq int8 kernels']:.2f}x vs float torch)",
            "",
            f"The file is `model_int8.onnx` (`winoq deploy` does this for any model; static ranges on "
            f"{d['calibration_images']} images that are not evaluated). The five methods above are emulated in "
            f"PyTorch (fake quantization), so their eval times say nothing about deployed speed."]


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    demo = subparsers.add_parser(
        "demo", formatter_class=fmt, help="quantize the embedded Fashion-MNIST model 5 ways and write a report",
        description="Compare FP32, direct W8A8 and int8 Winograd F(4,3) / F(6,3) with standard and learned "
                    "transform scales on the embedded Fashion-MNIST ResNet. Prints a table (top-1, drop vs FP32, "
                    "quantize and eval time), then deploys the model as an integer-only W8A8 ONNX file "
                    "(model_int8.onnx) and times it in onnxruntime against float; writes report.md, results.json, "
                    "model_int8.onnx, layer_sqnr.png and tap_ranges.png to --out. Needs the Fashion-MNIST test set "
                    "(`apt-get install dataset-fashion-mnist`). About a minute on 2 cores with the defaults.")
    demo.add_argument("--out", default="./winoq-demo", metavar="DIR",
                      help="output folder, created if needed (default: ./winoq-demo)")
    demo.add_argument("--n-images", type=positive_int, default=2000, metavar="N",
                      help="evaluate on the first N test images (default: 2000; the full split is 10000)")
    add_common_options(demo, 1, "torch threads (default: 1; the demo's layers are small, and one thread is the fastest "
                     "on a shared or busy machine)")
    demo.set_defaults(func=run)
