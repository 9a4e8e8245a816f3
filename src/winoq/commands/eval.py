"""``winoq eval``: top-1 accuracy of a float model or of a checkpoint written by ``winoq quantize``."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (CLIError, EXIT_OK, one_line, set_threads, positive_int, progress_enabled, load_float_model,
                      load_eval_data, evaluate, add_common_options)


def run(args) -> int:
    from .. import load

    set_threads(args.threads)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CLIError(f"checkpoint {args.checkpoint} not found")
    model, name = load_float_model(args.model, args.weights)
    label = "FP32"
    if args.checkpoint is not None:
        try:
            model = load(args.checkpoint, model)
        except (ValueError, RuntimeError, OSError, KeyError, TypeError) as exc:
            raise CLIError(f"cannot load checkpoint {args.checkpoint}: {one_line(exc)}") from None
        label = f"quantized {model.winoq_recipe.describe()}"
    x, y, desc = load_eval_data(name, args.data, args.n_images)
    acc, secs = evaluate(model, x, y, progress_enabled(args), f"eval {name}")
    print(f"{name} ({label}): top-1 {acc:.2f} % on {desc} [{secs:.1f} s]")
    return EXIT_OK


def register(subparsers) -> None:
    from ..models import MODEL_NAMES

    fmt = argparse.RawDescriptionHelpFormatter
    names = ", ".join(MODEL_NAMES)
    e = subparsers.add_parser(
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
    e.add_argument("--n-images", type=positive_int, default=None, metavar="N",
                   help="evaluate on N images only (default: the whole test set)")
    add_common_options(e, None, "torch threads (default: torch's choice)")
    e.set_defaults(func=run)
