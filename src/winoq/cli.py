"""The ``winoq`` command: ``demo``, ``quantize``, ``eval`` and ``info``, one module each
in ``winoq.commands`` (``register(subparsers)``); this module assembles the parser.

Exit status: 0 success, 1 a run could not be done (e.g. a default dataset is not
installed), 2 usage errors (bad option, unknown model, missing or unreadable file).
User errors print one line ``winoq: error: ...`` on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .commands._common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError, layer_summary,  # noqa: F401 (public)
                               load_eval_data, load_float_model)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's convention for bad usage)
        self.exit(EXIT_USAGE, f"winoq: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="winoq", formatter_class=fmt,
        description="Post-training quantization of conv nets with data-free, group-wise, fully quantized "
                    "Winograd convolution and learned transform scales.",
        epilog="examples:\n"
               "  winoq demo --out ./winoq-demo\n"
               "  winoq quantize --model fmnist-resnet --out fm.safetensors --winograd 6 --eval\n"
               "  winoq eval --model fmnist-resnet --checkpoint fm.safetensors\n"
               "  winoq deploy --model cifar-resnet20 --weights shared --out r20.onnx\n"
               "  winoq info\n\n"
               "exit status: 0 ok, 1 a run could not be done (e.g. dataset not installed), 2 usage error.")
    parser.add_argument("--version", action="version", version=f"winoq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    # one line per command (its module in winoq.commands adds the subparser):
    from .commands import demo as _demo; _demo.register(sub)
    from .commands import quantize as _quantize; _quantize.register(sub)
    from .commands import eval as _eval; _eval.register(sub)
    from .commands import info as _info; _info.register(sub)
    from .commands import sparsity as _sparsity; _sparsity.register(sub)
    from .commands import prune as _prune; _prune.register(sub)
    from .commands import mixed as _mixed; _mixed.register(sub)
    from .commands import deploy as _deploy; _deploy.register(sub)
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
