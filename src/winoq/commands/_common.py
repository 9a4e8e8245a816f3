"""Helpers shared by the ``winoq`` commands: errors, argument types, model and data loading."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

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


# ============================================================================ helpers
def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(n: int | None) -> None:
    import torch

    if n is not None:
        torch.set_num_threads(n)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def group_size_arg(text: str) -> int | None:
    if text.lower() in ("none", "channel", "per-channel"):
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None


def winograd_tile(text: str) -> int | None:
    from ..recipe import MAX_TILE

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


def format_name(text: str) -> str:
    from ..formats import parse

    try:
        parse(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(one_line(exc)) from None
    return text.lower()


def progress_enabled(args) -> bool:
    return not getattr(args, "no_progress", False)


def print_warnings(caught) -> None:
    seen = set()
    for w in caught:
        msg = one_line(w.message)
        if msg not in seen:
            seen.add(msg)
            print(f"winoq: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------- models
def _infer_architecture(state: dict) -> str | None:
    """The first model name whose state dict has exactly the keys and shapes of ``state``."""
    from ..models import MODEL_NAMES, get_model

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
    from ..models import MODEL_NAMES, get_model, load_state_dict_file

    if spec.startswith("diffusers:"):
        return _load_diffusers_model(spec[len("diffusers:"):], weights)
    key = spec.strip().lower().replace("_", "-")
    if key in MODEL_NAMES:
        if weights is not None and weights != "shared" and not Path(weights).is_file():
            raise CLIError(f"weights file {weights} not found")
        try:
            return get_model(key, weights), key
        except FileNotFoundError as exc:
            raise CLIError(one_line(exc)) from None
        except ValueError as exc:
            raise CLIError(one_line(exc)) from None
        except RuntimeError as exc:  # load_state_dict mismatch or unreadable file
            raise CLIError(f"cannot load {weights} into {key}: {one_line(exc, 240)}") from None
    path = Path(spec)
    if path.is_file():
        if weights is not None:
            raise CLIError("--model is already a weights file; --weights only goes with a model name")
        try:
            state = load_state_dict_file(path)
        except (RuntimeError, ValueError, OSError) as exc:
            raise CLIError(one_line(exc)) from None
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
        from ..diffusion.diffusers_support import load_diffusers_unet

        return load_diffusers_unet(path), f"diffusers:{Path(path).name}"
    except ImportError as exc:
        raise CLIError(f"{one_line(exc)} (pip install 'winoq[diffusion]')") from None
    except (ValueError, OSError, EnvironmentError) as exc:
        raise CLIError(f"cannot load diffusers model from {path}: {one_line(exc)}") from None


# ---------------------------------------------------------------------------- data
def _default_cifar_dir() -> Path | None:
    from ..models import default_shared_dirs

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
        from ..data import DEFAULT_FASHION_MNIST_ROOT, fashion_mnist_tensors

        root = data or os.environ.get("WINOQ_FASHION_MNIST", DEFAULT_FASHION_MNIST_ROOT)
        try:
            x, y = fashion_mnist_tensors("test", root=root)
        except FileNotFoundError as exc:
            if data is not None:
                raise CLIError(one_line(exc)) from None
            raise CLIError(FMNIST_MISSING.format(root=root, where="--data or "), EXIT_FAILED) from None
        except ValueError as exc:
            raise CLIError(one_line(exc), EXIT_FAILED) from None
        if n_images is not None:
            x, y = x[:n_images], y[:n_images]
        return x, y, f"Fashion-MNIST test split, first {len(y)} images ({root})"
    from ..data import cifar_transform, imagenet_transform, load_imagefolder_tensors

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
        raise CLIError(one_line(exc)) from None
    return x, y, f"{what} ImageFolder {root}, {len(y)} images" + (
        "" if n_images is None else " (class-balanced subset)")


def evaluate(model, x, y, progress: bool, desc: str) -> tuple[float, float]:
    from ..metrics import evaluate_top1, timed

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


def add_common_options(p: argparse.ArgumentParser, threads_default: int | None, threads_help: str) -> None:
    p.add_argument("--threads", type=positive_int, default=threads_default, metavar="N", help=threads_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")


def _same_file(a: Path, b: Path) -> bool:
    """Same file after resolving symlinks (and hard links, when both exist)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(out: Path, inputs: list[Path], flag: str = "--out", example: str = "model.safetensors") -> None:
    """Fail before any work when the output ``flag`` cannot be written or would destroy an input
    (the ``.tmp`` beside it is where ``winoq quantize`` writes first)."""
    if out.is_dir():
        raise CLIError(f"{flag} {out} is a directory; give a file name such as {out / example}")
    if not out.parent.is_dir():
        raise CLIError(f"output folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise CLIError(f"output folder {out.parent} is not writable; choose another --out")
    for src in inputs:
        if _same_file(out, src):
            raise CLIError(f"{flag} {out} is the input file {src}: writing it would overwrite the float weights; "
                           f"choose another {flag}")
    tmp = Path(f"{out}.tmp")
    if tmp.exists() or tmp.is_symlink():
        raise CLIError(f"{tmp} already exists (left by an interrupted run, or another run is writing {out}); "
                       f"remove it if no run is writing, or choose another {flag}")
