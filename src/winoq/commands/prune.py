"""`winoq prune`: structured filter pruning of a segmentation U-Net to a target ratio."""
from __future__ import annotations

import argparse
from pathlib import Path
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="prune a segmentation U-Net's filters to a target compression ratio (safetensors)",
        description="Remove whole filters of a U-Net written by scripts/train_seg.py (or winoq.pruning.save_unet) "
                    "with Torch-Pruning's dependency graph until the parameter (or MAC) count is --ratio times "
                    "smaller, fine-tune, and save the smaller network with its new widths.",
        epilog="examples:\n"
               "  winoq prune --weights unet_sunnybrook.safetensors --dataset sunnybrook --ratio 100 "
               "--out u100.safetensors --eval\n"
               "  winoq prune --weights unet_chase.safetensors --dataset chase --ratio 50 --metric macs "
               "--criterion taylor --schedule iterative --stages 4 --finetune-steps 200 --out c50.safetensors")
    p.add_argument("--weights", required=True, metavar="FILE.safetensors", help="the dense U-Net")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write the pruned U-Net")
    p.add_argument("--ratio", type=float, required=True, help="target compression, dense / pruned (e.g. 10, 1000)")
    p.add_argument("--metric", choices=["params", "macs"], default="params", help="what --ratio counts (default: params)")
    p.add_argument("--criterion", choices=["l1", "l2", "taylor", "random"], default="l1",
                   help="filter importance (default: l1; random is the control)")
    p.add_argument("--schedule", choices=["oneshot", "iterative"], default="oneshot")
    p.add_argument("--stages", type=int, default=4, help="pruning / fine-tuning stages of --schedule iterative")
    p.add_argument("--allocation", choices=["global", "uniform"], default="global",
                   help="filters per layer: global cost-aware ranking (default) or the same fraction of every layer")
    p.add_argument("--min-filters", type=int, default=1,
                   help="filters every conv keeps at least (default 1; 2-4 avoid one-channel bottlenecks at high ratios)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="total fine-tuning steps, split over the stages (default: 0; needs --dataset)")
    p.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
    p.add_argument("--dataset", choices=["sunnybrook", "chase"], default=None,
                   help="training data for fine-tuning / Taylor gradients, test data for --eval")
    p.add_argument("--data-root", default=None, help="dataset folder (default: <shared>/data/<dataset>)")
    p.add_argument("--eval", action="store_true", help="print test Dice / IoU of the dense and pruned models")
    p.add_argument("--onnx", metavar="FILE.onnx", default=None, help="also export the pruned model to ONNX")
    p.add_argument("--int8-onnx", metavar="FILE.onnx", default=None,
                   help="also convert the pruned model to integer-only W8A8 (static ranges on the training images "
                        "of --dataset) and export it for onnxruntime's int8 kernels; with --eval its Dice is printed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.set_defaults(func=run)


def _example(model, info: dict, dataset: str | None):
    import torch

    from ..data.segmentation import pad_to_multiple

    args = info.get("args", {})
    dataset = dataset or info.get("dataset")
    m = 2 ** model.config.depth
    if dataset == "chase":   # a whole downscaled fundus image
        h, w = 960 // args.get("downscale", 3), 999 // args.get("downscale", 3)
    else:
        h = w = args.get("size", 128)
    return pad_to_multiple(torch.zeros(1, model.config.in_channels, h, w), m)[0]


def run(args) -> int:
    import torch

    from ._common import CLIError, check_output
    from ..data.segmentation import load_segmentation
    from ..pruning import PruneConfig, TrainConfig, evaluate, load_unet, prune_unet, save_unet

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    check_output(Path(args.out), [Path(args.weights)])  # before any work: never overwrite the dense U-Net
    model, info = load_unet(args.weights)
    needs_data = args.finetune_steps > 0 or args.criterion == "taylor" or args.eval or args.int8_onnx
    if needs_data and args.dataset is None:
        raise CLIError("--finetune-steps, --criterion taylor, --eval and --int8-onnx need --dataset sunnybrook|chase")
    for out in (args.onnx, args.int8_onnx):
        if out is not None:
            check_output(Path(out), [Path(args.weights)])
    train_data = test_data = None
    if needs_data:
        train_args = info.get("args", {})
        kw = {"size": train_args.get("size", 128), "crop": train_args.get("crop")} if args.dataset == "sunnybrook" else \
             {"downscale": train_args.get("downscale", 3)}
        train_data = load_segmentation(args.dataset, "train", args.data_root, **kw)
        test_data = load_segmentation(args.dataset, "test", args.data_root, **kw)
    patch = info.get("args", {}).get("patch", 64) if args.dataset == "chase" else None
    try:
        finetune = TrainConfig(steps=args.finetune_steps, lr=args.lr, patch_size=patch, seed=args.seed)
        config = PruneConfig(target_ratio=args.ratio, criterion=args.criterion, schedule=args.schedule,
                             metric=args.metric, stages=args.stages, finetune=finetune, seed=args.seed,
                             min_filters=args.min_filters, allocation=args.allocation)
        result = prune_unet(model, config, train_data, example=_example(model, info, args.dataset), progress=True)
    except ValueError as e:   # unreachable ratio, bad config: one line, usage exit status
        raise CLIError(str(e)) from e
    summary = {"params": result.params, "macs": result.macs, "ratio_params": round(result.ratio_params, 2),
               "ratio_macs": round(result.ratio_macs, 2), "widths": list(result.model.config.widths)}
    if args.eval:
        summary["dense_dice"] = evaluate(model, test_data)["dice"]
        scores = evaluate(result.model, test_data)
        summary["dice"], summary["iou"] = scores["dice"], scores["iou"]
    save_unet(result.model, args.out, {"pruned_from": str(args.weights), "prune": {
        "ratio": args.ratio, "metric": args.metric, "criterion": args.criterion, "schedule": args.schedule,
        "min_filters": args.min_filters, "allocation": args.allocation},
        **{k: v for k, v in summary.items() if k != "widths"}, "dataset": args.dataset or info.get("dataset"),
        "args": info.get("args", {})})
    if args.onnx:
        from ..pruning.deploy import export_onnx

        export_onnx(result.model, args.onnx, _example(result.model, info, args.dataset))
        summary["onnx"] = args.onnx
    if args.int8_onnx:
        from ..data.segmentation import pad_to_multiple
        from ..pruning.deploy import int8_onnx, onnx_logits
        from ..pruning.train import logit_scores

        m = 2 ** result.model.config.depth
        calib = pad_to_multiple(train_data.images[:32], m)[0]
        int8_onnx(result.model, calib, args.int8_onnx, _example(result.model, info, args.dataset))
        summary["int8_onnx"] = args.int8_onnx
        if args.eval:
            logits = onnx_logits(args.int8_onnx, test_data.images, m)
            summary["int8_dice"] = logit_scores(logits, test_data)["dice"]
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 0
