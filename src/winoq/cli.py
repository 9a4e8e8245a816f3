"""The ``winoq`` command: ``demo``, ``quantize``, ``eval`` and ``info``.

Exit status: 0 success, 1 a run could not be done (e.g. a default dataset is not
installed), 2 usage errors (bad option, unknown model, missing or unreadable file).
User errors print one line ``winoq: error: ...`` on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

FMNIST_MISSING = ("Fashion-MNIST is not installed (looked in {root}). Install it with "
                  "`apt-get install dataset-fashion-mnist` (as root) or run `bash setup.sh` from the "
                  "winoq source tree; or point {where}$WINOQ_FASHION_MNIST at a folder holding the IDX files")

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".th", ".bin", ".ckpt")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's convention for bad usage)
        self.exit(EXIT_USAGE, f"winoq: error: {message} (see `{self.prog} --help`)\n")


# ============================================================================ helpers
def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _set_threads(n: int | None) -> None:
    import torch

    if n is not None:
        torch.set_num_threads(n)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _group_size(text: str) -> int | None:
    if text.lower() in ("none", "channel", "per-channel"):
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None


def _winograd_tile(text: str) -> int | None:
    from .recipe import MAX_TILE

    if text.lower() in ("none", "off", "direct"):
        return None
    try:
        m = int(text)
    except ValueError:
        m = -1
    if not 2 <= m <= MAX_TILE:
        raise argparse.ArgumentTypeError(f"expected an output tile size 2..{MAX_TILE} (e.g. 4 or 6) or 'none', "
                                         f"got {text!r}")
    return m


def _format_name(text: str) -> str:
    from .formats import parse

    try:
        parse(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(_one_line(exc)) from None
    return text.lower()


def _progress_enabled(args) -> bool:
    return not getattr(args, "no_progress", False)


def _print_warnings(caught) -> None:
    seen = set()
    for w in caught:
        msg = _one_line(w.message)
        if msg not in seen:
            seen.add(msg)
            print(f"winoq: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------- models
def _infer_architecture(state: dict) -> str | None:
    """The first model name whose state dict has exactly the keys and shapes of ``state``."""
    from .models import MODEL_NAMES, get_model

    def shapes(sd):  # old checkpoints lack BatchNorm's num_batches_tracked (loads fine without it)
        return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}

    want = shapes(state)
    for name in MODEL_NAMES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            have = shapes(get_model(name).state_dict())
        if have == want:
            return name
    return None


def load_float_model(spec: str, weights: str | None = None):
    """(model, name) for ``--model NAME_OR_PATH [--weights FILE|shared]``; CLIError on user errors."""
    from .models import MODEL_NAMES, get_model, load_state_dict_file

    if spec.startswith("diffusers:"):
        return _load_diffusers_model(spec[len("diffusers:"):], weights)
    key = spec.strip().lower().replace("_", "-")
    if key in MODEL_NAMES:
        if weights is not None and weights != "shared" and not Path(weights).is_file():
            raise CLIError(f"weights file {weights} not found")
        try:
            return get_model(key, weights), key
        except FileNotFoundError as exc:
            raise CLIError(_one_line(exc)) from None
        except ValueError as exc:
            raise CLIError(_one_line(exc)) from None
        except RuntimeError as exc:  # load_state_dict mismatch or unreadable file
            raise CLIError(f"cannot load {weights} into {key}: {_one_line(exc, 240)}") from None
    path = Path(spec)
    if path.is_file():
        if weights is not None:
            raise CLIError("--model is already a weights file; --weights only goes with a model name")
        try:
            state = load_state_dict_file(path)
        except (RuntimeError, ValueError, OSError) as exc:
            raise CLIError(_one_line(exc)) from None
        name = _infer_architecture(state)
        if name is None:
            raise CLIError(f"{path} matches none of the known architectures ({', '.join(MODEL_NAMES)}); "
                           "pass --model NAME --weights FILE to see the mismatch")
        return get_model(name, path), name
    if path.suffix.lower() in WEIGHT_SUFFIXES or os.sep in spec:
        raise CLIError(f"model file {spec} not found")
    raise CLIError(f"unknown model {spec!r}; valid names: {', '.join(MODEL_NAMES)} (or a path to a state-dict file)")


def _load_diffusers_model(path: str, weights: str | None):
    """``--model diffusers:PATH``: a local diffusers UNet folder (never downloaded)."""
    if weights is not None:
        raise CLIError("--weights does not go with --model diffusers:PATH (the folder holds the weights)")
    if not Path(path).is_dir():
        raise CLIError(f"diffusers model folder {path!r} not found (expected a folder with config.json and "
                       "the weights, e.g. a saved UNet2DModel / UNet2DConditionModel or a pipeline's unet/)")
    try:
        from .diffusion.diffusers_support import load_diffusers_unet

        return load_diffusers_unet(path), f"diffusers:{Path(path).name}"
    except ImportError as exc:
        raise CLIError(f"{_one_line(exc)} (pip install 'winoq[diffusion]')") from None
    except (ValueError, OSError, EnvironmentError) as exc:
        raise CLIError(f"cannot load diffusers model from {path}: {_one_line(exc)}") from None


# ---------------------------------------------------------------------------- data
def _default_cifar_dir() -> Path | None:
    from .models import default_shared_dirs

    for root in default_shared_dirs():
        d = root / "data" / "cifar10-test"
        if d.is_dir():
            return d
    return None


def load_eval_data(name: str, data: str | None, n_images: int | None, quiet: bool = False):
    """(x, y, description) of the evaluation set that fits model ``name``."""
    import torch  # noqa: F401  (data loaders return tensors)

    if data is not None and not Path(data).is_dir():
        raise CLIError(f"--data {data}: not a directory")
    if name == "fmnist-resnet":
        from .data import DEFAULT_FASHION_MNIST_ROOT, fashion_mnist_tensors

        root = data or os.environ.get("WINOQ_FASHION_MNIST", DEFAULT_FASHION_MNIST_ROOT)
        try:
            x, y = fashion_mnist_tensors("test", root=root)
        except FileNotFoundError as exc:
            if data is not None:
                raise CLIError(_one_line(exc)) from None
            raise CLIError(FMNIST_MISSING.format(root=root, where="--data or "), EXIT_FAILED) from None
        except ValueError as exc:
            raise CLIError(_one_line(exc), EXIT_FAILED) from None
        if n_images is not None:
            x, y = x[:n_images], y[:n_images]
        return x, y, f"Fashion-MNIST test split, first {len(y)} images ({root})"
    from .data import cifar_transform, imagenet_transform, load_imagefolder_tensors

    if name.startswith("cifar-"):
        root = Path(data) if data is not None else _default_cifar_dir()
        if root is None:
            raise CLIError("no CIFAR-10 test set found (looked for shared/data/cifar10-test); pass --data DIR "
                           "(ImageFolder layout DIR/<class>/<image>)", EXIT_FAILED)
        transform, what = cifar_transform(), "CIFAR-10 test"
    else:
        if data is None:
            raise CLIError(f"{name} is an ImageNet model: pass --data DIR (ImageFolder layout DIR/<class>/<image>)")
        root, transform, what = Path(data), imagenet_transform(), "ImageNet-style"
    if not quiet:
        print(f"loading {'all' if n_images is None else n_images} images from {root} ...", file=sys.stderr)
    try:
        x, y = load_imagefolder_tensors(root, transform, limit=n_images)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise CLIError(_one_line(exc)) from None
    return x, y, f"{what} ImageFolder {root}, {len(y)} images" + (
        "" if n_images is None else " (class-balanced subset)")


def _evaluate(model, x, y, progress: bool, desc: str) -> tuple[float, float]:
    from .metrics import evaluate_top1, timed

    return timed(evaluate_top1, model, x, y, batch_size=250, progress=progress, desc=desc)


# ---------------------------------------------------------------------------- per-layer summary
def layer_summary(reports) -> str:
    """Plain-text table of a quantized model's layers (SQNR on noise where calibrated)."""
    rows = [("layer", "kind", "detail", "SQNR standard -> learned (dB)")]
    for r in reports:
        cal = r.calibration or {}
        if "sqnr_standard_db" in cal and "sqnr_learned_db" in cal:
            sq = f"{cal['sqnr_standard_db']:6.1f} -> {cal['sqnr_learned_db']:5.1f}"
        elif cal.get("shared"):
            sq = "shared scales"
        else:
            sq = "-"
        rows.append((r.name, r.kind, r.detail, sq))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ============================================================================ commands
def cmd_info(args) -> int:
    import platform

    import torch

    from . import __version__
    from .formats import NAMED_FORMATS
    from .models import MODEL_NAMES, default_shared_dirs
    from .recipe import SCALES
    from .data import DEFAULT_FASHION_MNIST_ROOT

    fm_root = os.environ.get("WINOQ_FASHION_MNIST", DEFAULT_FASHION_MNIST_ROOT)
    shared = next((str(d) for d in default_shared_dirs() if d.is_dir()), None)
    lines = [
        f"winoq {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}",
        f"threads: torch uses {torch.get_num_threads()}, {_available_cores()} CPU cores available",
        f"platform: {platform.platform()}",
        f"models: {', '.join(MODEL_NAMES)}",
        "formats (--weights-format / --activations): int2..int16, uint2..uint16, int2n..int16n (narrow), "
        + ", ".join(NAMED_FORMATS) + ", generic fp{bits}_e{E}m{M}",
        f"scales (--scales): {', '.join(SCALES)}",
        f"Fashion-MNIST: {'found at ' + fm_root if Path(fm_root).is_dir() else 'missing (apt-get install dataset-fashion-mnist)'}",
        f"shared folder: {shared or 'not found (only needed for cifar-resnet* --weights shared)'}",
    ]
    print("\n".join(lines))
    return EXIT_OK


def _recipe_from_args(args):
    from .recipe import Recipe

    try:
        return Recipe(weights=args.weights_format, activations=args.activations, group_size=args.group_size,
                      winograd=args.winograd, scales=args.scales, seed=args.seed, rounding=args.rounding,
                      reconstruction=args.reconstruction, activation_ranges=args.activation_ranges,
                      format_search=args.format_search, calib_samples=args.calib_images)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"invalid recipe: {_one_line(exc)}") from None


def _calibration_images(name: str, calib_dir: str | None = None, n: int = 64):
    """Calibration images: ``--calib-data DIR`` (ImageFolder), else Fashion-MNIST training
    images for fmnist-resnet, else None."""
    if calib_dir is not None:
        if name.startswith("diffusers:"):
            raise CLIError("--calib-data holds images for classifiers; UNets calibrate on (x_t, t, context) "
                           "inputs: use the Python API with winoq.diffusion.calibration_inputs(...)")
        if not Path(calib_dir).is_dir():
            raise CLIError(f"--calib-data {calib_dir}: not a directory (ImageFolder layout DIR/<class>/<image>)")
        from .data import cifar_transform, imagenet_transform, load_imagefolder_tensors

        transform = cifar_transform() if name.startswith("cifar-") else imagenet_transform()
        try:
            return load_imagefolder_tensors(Path(calib_dir), transform, limit=n)[0]
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise CLIError(_one_line(exc)) from None
    if name != "fmnist-resnet":
        return None
    from .data import fashion_mnist_tensors

    try:
        return fashion_mnist_tensors("train")[0][:n]
    except (FileNotFoundError, ValueError):
        return None


def cmd_quantize(args) -> int:
    from . import quantize, save
    from .metrics import timed

    _set_threads(args.threads)
    recipe = _recipe_from_args(args)
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {out} is a directory; give a file name such as {out / 'model.safetensors'}")
    if not out.parent.is_dir():
        raise CLIError(f"output folder {out.parent} does not exist")
    model, name = load_float_model(args.model, args.weights)
    if args.eval and name.startswith("diffusers:"):
        raise CLIError("--eval measures classifier accuracy; for UNets see benchmarks/diffusion_table.py")
    progress = _progress_enabled(args)
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
        qmodel, q_seconds = timed(quantize, model, recipe, calib_data=calib, progress=progress)
    _print_warnings(caught)
    try:
        save(qmodel, out)
    except OSError as exc:
        raise CLIError(f"cannot write {out}: {_one_line(exc)}") from None
    print(layer_summary(qmodel.winoq_report))
    print(f"quantized in {q_seconds:.1f} s; saved {out} ({out.stat().st_size / 1024:.0f} KiB)")
    if data is not None:
        x, y, desc = data
        fp, fp_s = _evaluate(model, x, y, progress, "eval FP32")
        q, q_s = _evaluate(qmodel, x, y, progress, "eval quantized")
        print(f"top-1 on {desc}:")
        print(f"  FP32       {fp:6.2f} %  ({fp_s:.1f} s)")
        print(f"  quantized  {q:6.2f} %  ({q_s:.1f} s)")
        print(f"  drop       {fp - q:+6.2f} points")
    return EXIT_OK


def cmd_eval(args) -> int:
    from . import load

    _set_threads(args.threads)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CLIError(f"checkpoint {args.checkpoint} not found")
    model, name = load_float_model(args.model, args.weights)
    label = "FP32"
    if args.checkpoint is not None:
        try:
            model = load(args.checkpoint, model)
        except (ValueError, RuntimeError, OSError, KeyError) as exc:
            raise CLIError(f"cannot load checkpoint {args.checkpoint}: {_one_line(exc)}") from None
        label = f"quantized {model.winoq_recipe.describe()}"
    x, y, desc = load_eval_data(name, args.data, args.n_images)
    acc, secs = _evaluate(model, x, y, _progress_enabled(args), f"eval {name}")
    print(f"{name} ({label}): top-1 {acc:.2f} % on {desc} [{secs:.1f} s]")
    return EXIT_OK


def _demo_methods():
    from .recipe import Recipe

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
    text = (f"{r.describe()}: 3x3 stride-1 convs as Winograd F({r.winograd},3), stages in/V/U/M "
            f"{r.activations}/{r.activations}/{r.weights}/{r.activations}, one scale shared by all taps of a tile, "
            f"{group}; other convs direct; seed {r.seed}")
    if r.scales == "learned":
        text += (f"; data-free S_B/S_G: closed form then {r.learn_steps} Adam steps (lr {r.learn_lr}) on "
                 f"{r.noise} noise")
    return text


def _pick_tap_layer(qstd, qlrn) -> str:
    """A middle Winograd layer present in both models (the demo's tap-range figure)."""
    names = [r.name for r in qlrn.winoq_report if r.kind == "winograd"]
    names = [n for n in names if any(r.name == n and r.kind == "winograd" for r in qstd.winoq_report)]
    return names[len(names) // 2]


def cmd_demo(args) -> int:
    import torch

    from . import __version__, quantize
    from .data import fashion_mnist_tensors
    from .metrics import timed
    from .models import fmnist_metadata, load_default_fmnist_model
    from .plots import plot_layer_sqnr, plot_tap_ranges
    from .report import format_table, machine_info, write_markdown_report

    start = time.perf_counter()
    _set_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    progress = _progress_enabled(args)
    try:
        x, y = fashion_mnist_tensors("test")
    except FileNotFoundError:
        from .data import DEFAULT_FASHION_MNIST_ROOT

        root = os.environ.get("WINOQ_FASHION_MNIST", DEFAULT_FASHION_MNIST_ROOT)
        raise CLIError(FMNIST_MISSING.format(root=root, where=""), EXIT_FAILED) from None
    except ValueError as exc:
        raise CLIError(_one_line(exc), EXIT_FAILED) from None
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
            _print_warnings(caught)
        acc, e_seconds = _evaluate(qmodel, x, y, progress, f"eval {label}")
        fp_acc = acc if fp_acc is None else fp_acc
        models[label] = qmodel
        rows.append({"method": label, "accuracy": acc, "drop": fp_acc - acc, "quantize_seconds": q_seconds,
                     "eval_seconds": e_seconds, "recipe": None if recipe is None else json.loads(recipe.to_json())})
        q_text = "" if q_seconds is None else f", quantize {q_seconds:.1f} s"
        print(f"{step}: top-1 {acc:.2f} % (drop {fp_acc - acc:+.2f}){q_text}, eval {e_seconds:.1f} s", flush=True)

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
                                        layers={f"{k} learned": v for k, v in learned.items()})
    results = {"meta": meta, "rows": rows,
               "layers": {k: [r.__dict__ for r in v] for k, v in learned.items()},
               "files": {"report": "report.md", "layer_sqnr": "layer_sqnr.png", "tap_ranges": "tap_ranges.png"}}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print()
    print(format_table(rows))
    print()
    print(f"total time {time.perf_counter() - start:.1f} s; wrote to {out}:")
    for p in (report_path, out / "results.json", *images.values()):
        print(f"  {p}")
    return EXIT_OK


# ============================================================================ parser
def _common(p: argparse.ArgumentParser, threads_default: int | None, threads_help: str) -> None:
    p.add_argument("--threads", type=_positive_int, default=threads_default, metavar="N", help=threads_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .models import MODEL_NAMES
    from .recipe import SCALES

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="winoq", formatter_class=fmt,
        description="Post-training quantization of conv nets with data-free, group-wise, fully quantized "
                    "Winograd convolution and learned transform scales.",
        epilog="examples:\n"
               "  winoq demo --out ./winoq-demo\n"
               "  winoq quantize --model fmnist-resnet --out fm.safetensors --winograd 6 --eval\n"
               "  winoq eval --model fmnist-resnet --checkpoint fm.safetensors\n"
               "  winoq info\n\n"
               "exit status: 0 ok, 1 a run could not be done (e.g. dataset not installed), 2 usage error.")
    parser.add_argument("--version", action="version", version=f"winoq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo", formatter_class=fmt, help="quantize the embedded Fashion-MNIST model 5 ways and write a report",
        description="Compare FP32, direct W8A8 and int8 Winograd F(4,3) / F(6,3) with standard and learned "
                    "transform scales on the embedded Fashion-MNIST ResNet. Prints a table (top-1, drop vs FP32, "
                    "quantize and eval time) and writes report.md, results.json, layer_sqnr.png and "
                    "tap_ranges.png to --out. Needs the Fashion-MNIST test set "
                    "(`apt-get install dataset-fashion-mnist`). About a minute on 2 cores with the defaults.")
    demo.add_argument("--out", default="./winoq-demo", metavar="DIR",
                      help="output folder, created if needed (default: ./winoq-demo)")
    demo.add_argument("--n-images", type=_positive_int, default=2000, metavar="N",
                      help="evaluate on the first N test images (default: 2000; the full split is 10000)")
    _common(demo, 1, "torch threads (default: 1; the demo's layers are small, and one thread is the fastest "
                     "on a shared or busy machine)")
    demo.set_defaults(func=cmd_demo)

    names = ", ".join(MODEL_NAMES)
    q = sub.add_parser(
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
    q.add_argument("--weights-format", type=_format_name, default="int8", metavar="FMT",
                   help="weight format: int2..int16, fp8_e4m3, fp6_e2m3, fp4_e2m1, ... (default: int8; "
                        "`winoq info` lists them)")
    q.add_argument("--activations", type=_format_name, default="int8", metavar="FMT",
                   help="activation format, also used by the Winograd-domain stages (default: int8)")
    q.add_argument("--group-size", type=_group_size, default=32, metavar="G|none",
                   help="channels per scale group (default: 32); 'none': per output channel for weights, "
                        "per tensor for activations")
    q.add_argument("--winograd", type=_winograd_tile, default=6, metavar="M|none",
                   help="output tile m of Winograd F(m,3) for 3x3 stride-1 convs (default: 6); 'none' keeps every "
                        "conv direct")
    q.add_argument("--scales", choices=SCALES, default="learned",
                   help="Winograd transform scales: learned (data-free, default), standard (plain Toom-Cook), "
                        "paw-fsq (baseline learned on 64 training images; Fashion-MNIST only, noise otherwise), "
                        "tapwise (baseline, one scale per tap)")
    q.add_argument("--seed", type=int, default=0, help="random seed of the scale learning (default: 0)")
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
    q.add_argument("--calib-images", type=_positive_int, default=64, metavar="N",
                   help="calibration images to load and learn on (default: 64)")
    q.add_argument("--eval", action="store_true", help="also evaluate the float and quantized models and print the drop")
    q.add_argument("--data", metavar="DIR",
                   help="evaluation data for --eval: Fashion-MNIST IDX folder for fmnist-resnet (default: "
                        "/usr/share/datasets/fashion-mnist), ImageFolder for the others (cifar-*: default "
                        "shared/data/cifar10-test)")
    q.add_argument("--n-images", type=_positive_int, default=None, metavar="N",
                   help="evaluate on N images only (default: the whole test set)")
    _common(q, None, "torch threads (default: torch's choice)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser(
        "eval", formatter_class=fmt, help="top-1 accuracy of a float model or a quantized checkpoint",
        description="Top-1 accuracy of the float model, or of a quantized checkpoint written by `winoq quantize` "
                    "(pass the same --model it was made from).",
        epilog="examples:\n"
               "  winoq eval --model fmnist-resnet\n"
               "  winoq eval --model fmnist-resnet --checkpoint fm.safetensors --n-images 2000\n"
               "  winoq eval --model cifar-resnet20 --weights shared --data ../shared/data/cifar10-test")
    e.add_argument("--model", required=True, metavar="NAME", help=f"model name ({names}) or a state-dict file")
    e.add_argument("--weights", metavar="FILE", help="float weights (see `winoq quantize --help`)")
    e.add_argument("--checkpoint", metavar="Q.safetensors",
                   help="quantized checkpoint from `winoq quantize` (evaluated instead of the float model)")
    e.add_argument("--data", metavar="DIR", help="evaluation data (see `winoq quantize --help`)")
    e.add_argument("--n-images", type=_positive_int, default=None, metavar="N",
                   help="evaluate on N images only (default: the whole test set)")
    _common(e, None, "torch threads (default: torch's choice)")
    e.set_defaults(func=cmd_eval)

    from .commands import mixed as _mixed; _mixed.register(sub)  # noqa: E702
    info = sub.add_parser("info", help="versions, threads, models, formats and datasets found",
                          description="Print winoq/torch versions, threads, model names, number formats and "
                                      "which datasets are installed.")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``winoq`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    import torch

    threads = torch.get_num_threads()
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"winoq: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("winoq: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # --threads must not leak into an in-process caller


if __name__ == "__main__":
    sys.exit(main())
