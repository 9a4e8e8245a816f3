"""Train the dense (over-provisioned) segmentation U-Net baseline on the CPU, seeded.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice python3 scripts/train_seg.py --dataset sunnybrook \
        --out benchmarks/weights/unet_sunnybrook.safetensors --steps 600 --max-minutes 25

Sunnybrook: whole slices resized to --size (default 128), batches of 8.
CHASE_DB1: images downscaled by --downscale (default 3, 333 x 320), random --patch (96) crops.
--init continues from earlier weights (the committed baselines were trained in two runs; see
docs/results.md section 15 for the commands).
The weights are written with the U-Net config in the safetensors metadata, plus test Dice/IoU
(and the second observer's agreement on CHASE_DB1) in the same metadata.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from winoq.data.segmentation import load_segmentation
from winoq.models.unet_seg import UNetConfig, UNetSeg, count_params
from winoq.pruning import TrainConfig, evaluate, human_reference, load_unet, save_unet, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["sunnybrook", "chase"], required=True)
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--root", default=None, help="dataset folder (default: <shared>/data/<dataset>)")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--base-width", type=int, default=32)
    ap.add_argument("--norm", default="batch", choices=["batch", "instance", "none"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--size", type=int, default=128, help="Sunnybrook image size")
    ap.add_argument("--crop", type=int, default=None, help="Sunnybrook: central crop (pixels) before resizing")
    ap.add_argument("--downscale", type=int, default=3, help="CHASE_DB1 downscale factor")
    ap.add_argument("--patch", type=int, default=96, help="CHASE_DB1 training patch size")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init", default=None,
                    help="continue from these weights (a file written by save_unet; its config wins over "
                         "--depth/--base-width/--norm); the earlier training is kept in the metadata")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    kw = {"size": args.size, "crop": args.crop} if args.dataset == "sunnybrook" else {"downscale": args.downscale}
    tr = load_segmentation(args.dataset, "train", args.root, **kw)
    te = load_segmentation(args.dataset, "test", args.root, **kw)
    previous = None
    if args.init is not None:
        model, previous = load_unet(args.init)
        if model.config.in_channels != tr.images.shape[1]:
            raise ValueError(f"--init {args.init}: the network takes {model.config.in_channels} input channels, "
                             f"the {args.dataset} images have {tr.images.shape[1]}")
    else:
        cfg = UNetConfig(in_channels=tr.images.shape[1], out_channels=1, depth=args.depth,
                         base_width=args.base_width, norm=args.norm)
        model = UNetSeg(cfg)
    print(f"{args.dataset}: train {tuple(tr.images.shape)}, test {tuple(te.images.shape)}; "
          f"U-Net {count_params(model):,} params", flush=True)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       patch_size=args.patch if args.dataset == "chase" else None, seed=args.seed,
                       max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    t0 = time.time()
    log = train(model, tr, tcfg, progress=True, desc=f"train {args.dataset}")
    scores = evaluate(model, te)
    info = {"dataset": args.dataset, "train": log, "test_dice": scores["dice"], "test_iou": scores["iou"],
            "args": vars(args)}
    if previous is not None:   # the whole training history: earlier runs first
        info["previous"] = previous.get("previous", []) + [{k: v for k, v in previous.items() if k != "previous"}]
        info["total_steps"] = sum(p["train"]["steps"] for p in info["previous"]) + log["steps"]
    ref = human_reference(te)
    if ref is not None:
        info["second_observer_dice"], info["second_observer_iou"] = ref["dice"], ref["iou"]
    save_unet(model, args.out, info)
    print(json.dumps({k: v for k, v in info.items() if k != "args"}, indent=1))
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
