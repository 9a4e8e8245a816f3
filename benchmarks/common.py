"""Shared helpers of the benchmark scripts: locating ../shared, machine info, JSON output."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    for cand in (os.environ.get("WINOQ_SHARED"), REPO.parent / "shared", Path.cwd().parent / "shared"):
        if cand and Path(cand, "data", "cifar10-test").is_dir():
            return Path(cand)
    raise SystemExit("this benchmark needs ../shared (CIFAR-10 test set and ResNet checkpoints); set WINOQ_SHARED")


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def dump_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def correct(model, x, y, batch: int = 250) -> torch.Tensor:
    """Per image: does ``model``'s top-1 class equal the label (bool, one per image of ``x``)."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]).argmax(1) == y[i:i + batch] for i in range(0, len(x), batch)])


def top1(model, x, y, batch: int = 250) -> float:
    return 100.0 * int(correct(model, x, y, batch).sum()) / len(x)


def cifar_split(n_images: int, calib_images: int, calib_labels: bool = False):
    """CIFAR-10 test images of ../shared in a fixed random order (seed 0; the files are
    sorted by class): the first ``n_images`` are evaluated, ``calib_images`` calibration
    images come from the other end and never overlap them. Returns (x, y, calib), and the
    calibration images' labels last with ``calib_labels``."""
    from winoq.data import cifar_transform, load_imagefolder_tensors

    x_all, y_all = load_imagefolder_tensors(str(shared_dir() / "data" / "cifar10-test"), cifar_transform())
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    if n_images + calib_images > len(x_all):
        raise SystemExit(f"{n_images} test + {calib_images} calibration images overlap: the set has {len(x_all)}")
    pool = order[len(order) - calib_images:]
    out = x_all[order[:n_images]], y_all[order[:n_images]], x_all[pool]
    return out + (y_all[pool],) if calib_labels else out


def add_cifar_args(ap: argparse.ArgumentParser, n_images: int, calib_images: int, out: str) -> None:
    """The options every CIFAR benchmark shares (see :func:`cifar_setup`)."""
    ap.add_argument("--n-images", type=int, default=n_images)
    ap.add_argument("--calib-images", type=int, default=calib_images)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(out))


def cifar_result(script: str, args, argv) -> dict:
    """The result header of a CIFAR benchmark: machine, command line, image counts, empty rows."""
    return {"machine": machine(), "command": f"python benchmarks/{script} " + " ".join(argv or sys.argv[1:]),
            "n_images": args.n_images, "calib_images": args.calib_images, "rows": {}}


def cifar_setup(args):
    """Apply ``--threads``; returns ``cifar_split(--n-images, --calib-images)``."""
    torch.set_num_threads(args.threads)
    return cifar_split(args.n_images, args.calib_images)


def quantize_timed(model, recipe, calib=None):
    """``winoq.quantize`` without progress bars or warnings, given ``calib`` only when the recipe
    learns on data; returns ``(qmodel, seconds)``."""
    import winoq

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = winoq.quantize(model, recipe, calib_data=calib if recipe.uses_calibration_data else None, progress=False)
    return q, time.perf_counter() - t0
