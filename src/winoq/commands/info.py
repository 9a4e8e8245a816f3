"""``winoq info``: versions, threads, model names, number formats and the datasets found."""
from __future__ import annotations

import os
from pathlib import Path

from ._common import EXIT_OK, available_cores


def run(args) -> int:
    import platform

    import torch

    from .. import __version__
    from ..formats import NAMED_FORMATS
    from ..models import MODEL_NAMES, default_shared_dirs
    from ..recipe import SCALES
    from ..data import DEFAULT_FASHION_MNIST_ROOT

    fm_root = os.environ.get("WINOQ_FASHION_MNIST", DEFAULT_FASHION_MNIST_ROOT)
    shared = next((str(d) for d in default_shared_dirs() if d.is_dir()), None)
    lines = [
        f"winoq {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}",
        f"threads: torch uses {torch.get_num_threads()}, {available_cores()} CPU cores available",
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


def register(subparsers) -> None:
    info = subparsers.add_parser("info", help="versions, threads, models, formats and datasets found",
                                 description="Print winoq/torch versions, threads, model names, number formats "
                                             "and which datasets are installed.")
    info.set_defaults(func=run)
