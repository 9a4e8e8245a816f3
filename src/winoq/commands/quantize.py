"""``winoq quantize``: quantize a float model and save it (safetensors) with its recipe."""
from __future__ import annotations

import argparse
import errno
import os
import warnings
from pathlib import Path

from ._common import (CLIError, check_output, EXIT_OK, one_line, set_threads, positive_int, group_size_arg, winograd_tile,
                      format_name, progress_enabled, print_warnings, load_float_model, load_eval_data, evaluate,
                      layer_summary, add_common_options)


def _recipe_from_args(args):
    from ..recipe import Recipe

    try:
        return Recipe(weights=args.weights_format, activations=args.activations, group_size=args.group_size,
                      winograd=args.winograd, scales=args.scales, seed=args.seed, rounding=args.rounding,
                      reconstruction=args.reconstruction, activation_ranges=args.activation_ranges,
                      format_search=args.format_search, calib_samples=args.calib_images)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"invalid recipe: {one_line(exc)}") from None


def _calibration_images(name: str, calib_dir: str | None = None, n: int = 64):
    """Calibration images: ``--calib-data DIR`` (ImageFolder), else Fashion-MNIST training
    images for fmnist-resnet, else None."""
    if calib_dir is not None:
        if name.startswith("diffusers:"):
            raise CLIError("--calib-data holds images for classifiers; UNets calibrate on (x_t, t, context) "
                           "inputs: use the Python API with winoq.diffusion.calibration_inputs(...)")
        if not Path(calib_dir).is_dir():
            raise CLIError(f"--calib-data {calib_dir}: not a directory (ImageFolder layout DIR/<class>/<image>)")
        from ..data import cifar_transform, imagenet_transform, load_imagefolder_tensors

        transform = cifar_transform() if name.startswith("cifar-") else imagenet_transform()
        try:
            return load_imagefolder_tensors(Path(calib_dir), transform, limit=n)[0]
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise CLIError(one_line(exc)) from None
    if name != "fmnist-resnet":
        return None
    from ..data import fashion_mnist_tensors

    try:
        return fashion_mnist_tensors("train")[0][:n]
    except (FileNotFoundError, ValueError):
        return None


def _input_files(model: str, weights: str | None) -> list[Path]:
    """The files the float model is read from (``--out`` must not overwrite any of them)."""
    files = [Path(weights)] if weights not in (None, "shared") else []
    folder = Path(model[len("diffusers:"):]) if model.startswith("diffusers:") else None
    if folder is not None and folder.is_dir():
        files += [p for p in folder.rglob("*") if p.is_file()]
    elif Path(model).is_file():
        files.append(Path(model))
    return files


def _save(qmodel, out: Path) -> None:
    """``winoq.save`` with a one-line error on a full disk or an unwritable file, and no
    half-written ``<out>.tmp`` left behind."""
    from .. import save

    try:
        save(qmodel, out)
    except OSError as exc:
        Path(f"{out}.tmp").unlink(missing_ok=True)  # check_output made sure it was not there before
        fix = "free some space or choose another --out" if exc.errno == errno.ENOSPC else "choose another --out"
        raise CLIError(f"cannot write {out}: {one_line(exc)} ({fix})") from None


def run(args) -> int:
    from .. import quantize
    from ..metrics import timed

    set_threads(args.threads)
    recipe = _recipe_from_args(args)
    out = Path(args.out)
    check_output(out, _input_files(args.model, args.weights))
    model, name = load_float_model(args.model, args.weights)
    if args.eval and name.startswith("diffusers:"):
        raise CLIError("--eval measures classifier accuracy; for UNets see benchmarks/diffusion_table.py")
    progress = progress_enabled(args)
    data = load_eval_data(name, args.data, args.n_images) if args.eval else None  # fail before the slow part
    if recipe.uses_calibration_data and name.startswith("diffusers:"):
        raise CLIError("this recipe learns on calibration data, and UNets calibrate on (x_t, t, context) inputs: "
                       "use the Python API with calib_data=winoq.diffusion.calibration_inputs(...), or keep the "
                       "data-free defaults (--rounding nearest --activation-ranges dynamic --scales learned)")
    calib = _calibration_images(name, args.calib_data, args.calib_images) if recipe.uses_calibration_data else None
    if calib is None and recipe.uses_calibration_data and recipe.scales != "paw-fsq":
        raise CLIError("this recipe learns on calibration data (learned rounding, static ranges or output format "
                       "search): pass --calib-data DIR (ImageFolder of training images, not the evaluation set)")
    print(f"quantizing {name}: {recipe.describe()} (seed {recipe.seed})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if args.procs != 1:  # data-free scale learning spread over local processes (winoq.distributed)
                from ..distributed import quantize_sharded
                qmodel, q_seconds = timed(quantize_sharded, model, recipe, procs=args.procs, calib_data=calib)
            else:
                qmodel, q_seconds = timed(quantize, model, recipe, calib_data=calib, progress=progress)
        except ValueError as exc:  # the recipe does not fit this model (e.g. unsigned weights)
            print_warnings(caught)
            raise CLIError(f"cannot quantize {name}: {one_line(exc)}") from None
    print_warnings(caught)
    _save(qmodel, out)
    print(layer_summary(qmodel.winoq_report))
    print(f"quantized in {q_seconds:.1f} s; saved {out} ({out.stat().st_size / 1024:.0f} KiB)")
    if data is not None:
        x, y, desc = data
        fp, fp_s = evaluate(model, x, y, progress, "eval FP32")
        q, q_s = evaluate(qmodel, x, y, progress, "eval quantized")
        print(f"top-1 on {desc}:")
        print(f"  FP32       {fp:6.2f} %  ({fp_s:.1f} s)")
        print(f"  quantized  {q:6.2f} %  ({q_s:.1f} s)")
        print(f"  drop       {fp - q:+6.2f} points")
    return EXIT_OK


def register(subparsers) -> None:
    from ..models import MODEL_NAMES
    from ..recipe import SCALES

    fmt = argparse.RawDescriptionHelpFormatter
    names = ", ".join(MODEL_NAMES)
    q = subparsers.add_parser(
        "quantize", formatter_class=fmt, help="quantize a model and save it (safetensors)",
        description="Quantize a float model and save the result with its recipe (safetensors; reload with "
                    "`winoq eval --checkpoint` or winoq.load). Prints each layer: kind (winograd, direct, "
                    "linear), detail, and for learned scales the SQNR on noise with standard -> learned "
                    "transforms.",
        epilog="examples:\n"
               "  winoq quantize --model fmnist-resnet --out fm.safetensors --eval\n"
               "  winoq quantize --model cifar-resnet20 --weights shared --out r20.safetensors --winograd 4\n"
               "  winoq quantize --model resnet20-12fca82f.th --out r20.safetensors --scales standard")
    q.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help=f"a model name ({names}) or a state-dict file whose architecture is recognised")
    q.add_argument("--weights", metavar="FILE",
                   help="float weights for --model NAME (.safetensors or torch state dict); 'shared' loads the "
                        "pretrained cifar-resnet20/32/44/56 from the shared folder. Default: fmnist-resnet's "
                        "embedded weights, random initialisation for the others")
    q.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write the quantized model")
    q.add_argument("--weights-format", type=format_name, default="int8", metavar="FMT",
                   help="weight format: int2..int16, fp8_e4m3, fp6_e2m3, fp4_e2m1, ... (default: int8; "
                        "`winoq info` lists them)")
    q.add_argument("--activations", type=format_name, default="int8", metavar="FMT",
                   help="activation format, also used by the Winograd-domain stages (default: int8)")
    q.add_argument("--group-size", type=group_size_arg, default=32, metavar="G|none",
                   help="channels per scale group (default: 32); 'none': per output channel for weights, "
                        "per tensor for activations")
    q.add_argument("--winograd", type=winograd_tile, default=6, metavar="M|none",
                   help="output tile m of Winograd F(m,3) for 3x3 stride-1 convs (default: 6); 'none' keeps every "
                        "conv direct")
    q.add_argument("--scales", choices=SCALES, default="learned",
                   help="Winograd transform scales: learned (data-free, default), standard (plain Toom-Cook), "
                        "paw-fsq (baseline learned on 64 training images; Fashion-MNIST only, noise otherwise), "
                        "tapwise (baseline, one scale per tap)")
    q.add_argument("--seed", type=int, default=0, help="random seed of the scale learning (default: 0)")
    q.add_argument("--procs", type=positive_int, default=1, metavar="N",
                   help="learn the Winograd layers' transform scales on N local processes (gloo; same result as 1)")
    q.add_argument("--rounding", choices=("nearest", "learned"), default="nearest",
                   help="weight rounding: nearest (default) or learned (AdaRound-style, on calibration images)")
    q.add_argument("--reconstruction", choices=("layer", "block"), default="layer",
                   help="learned rounding reproduces each layer's output (default) or each block's (BRECQ)")
    q.add_argument("--activation-ranges", choices=("dynamic", "static"), default="dynamic",
                   help="dynamic activation scales (default, data-free) or static ones calibrated on images")
    q.add_argument("--format-search", choices=("off", "weight", "output"), default="off",
                   help="for fp weight formats: choose each layer's exponent/mantissa split by weight MSE "
                        "(data-free) or layer-output MSE on calibration images")
    q.add_argument("--calib-data", metavar="DIR",
                   help="ImageFolder of calibration images for learned rounding, static ranges, output format "
                        "search and paw-fsq (default: Fashion-MNIST training images for fmnist-resnet)")
    q.add_argument("--calib-images", type=positive_int, default=64, metavar="N",
                   help="calibration images to load and learn on (default: 64)")
    q.add_argument("--eval", action="store_true", help="also evaluate the float and quantized models and print the drop")
    q.add_argument("--data", metavar="DIR",
                   help="evaluation data for --eval: Fashion-MNIST IDX folder for fmnist-resnet (default: "
                        "/usr/share/datasets/fashion-mnist), ImageFolder for the others (cifar-*: default "
                        "shared/data/cifar10-test)")
    q.add_argument("--n-images", type=positive_int, default=None, metavar="N",
                   help="evaluate on N images only (default: the whole test set)")
    add_common_options(q, None, "torch threads (default: torch's choice)")
    q.set_defaults(func=run)
