"""Structured filter pruning of the segmentation U-Nets: Dice vs compression, latency, W8A8.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice python3 benchmarks/pruning_unet.py --dataset sunnybrook

Needs the dense weights from scripts/train_seg.py (benchmarks/weights/unet_<dataset>.safetensors)
and ../shared/data.  Per dataset:
  1. the dense model's test Dice / IoU (and the second observer's on CHASE_DB1), and a control:
     the dense model fine-tuned with the same budget the pruned models get;
  2. for every (criterion, schedule) and target parameter ratio: prune, fine-tune, test Dice;
  3. the largest ratio within 4% and within 1% (relative) of the reference Dice: the dense model's,
     or the control's when that is higher;
  4. CPU latency (median of repeats, batch 1 at deployment size) of the dense model and the
     pruned ones, torch and onnxruntime at 1 and 2 threads; the 4%-point model also after
     winoq W8A8 (direct, Winograd F(4,3)) with its Dice.
Writes benchmarks/out/pruning_unet_<dataset>.json, plots beside it, and prints tables.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, dump_json, machine  # noqa: E402

from winoq.data.segmentation import load_segmentation, pad_to_multiple  # noqa: E402
from winoq.models.unet_seg import count_params  # noqa: E402
from winoq.pruning import (PruneConfig, TrainConfig, count_macs, evaluate, human_reference,  # noqa: E402
                           load_unet, predict_logits, prune_unet, save_unet, train)
from winoq.pruning.deploy import export_onnx, onnx_latency, quantize_w8a8, torch_latency  # noqa: E402
from winoq.pruning.plots import plot_dice_vs_ratio, plot_latency_vs_ratio, plot_overlays  # noqa: E402

OUT = REPO / "benchmarks" / "out"


def parse_runs(text: str, allocation: str = "global") -> list[tuple[str, str, str]]:
    """"l1/oneshot,taylor/iterative/uniform" -> [("l1", "oneshot", allocation), ("taylor", "iterative", "uniform")]."""
    runs = []
    for item in text.split(","):
        if item:
            parts = item.split("/")
            if len(parts) not in (2, 3):
                raise SystemExit(f"--runs: {item!r} is not criterion/schedule[/allocation]")
            runs.append((parts[0], parts[1], parts[2] if len(parts) == 3 else allocation))
    return runs


def latency_row(model, example, onnx_path, repeats: int) -> dict:
    """Wall medians at 1 and 2 threads, and the 1-thread CPU time (robust on a shared machine)."""
    row = {}
    for t in (1, 2):
        lat = torch_latency(model, example, t, repeats, warmup=1)
        row[f"torch_{t}t_ms"] = lat["median_ms"]
        if t == 1:
            row["torch_1t_cpu"] = lat["cpu_median_ms"]
    if onnx_path is not None:
        export_onnx(model, onnx_path, example)
        for t in (1, 2):
            lat = onnx_latency(onnx_path, example, t, repeats, warmup=1)
            row[f"ort_{t}t_ms"] = lat["median_ms"]
            if t == 1:
                row["ort_1t_cpu"] = lat["cpu_median_ms"]
    return row


def largest_within(rows: list[dict], dense_dice: float, loss: float) -> dict | None:
    ok = [r for r in rows if r["dice"] >= dense_dice * (1 - loss)]
    return max(ok, key=lambda r: r["ratio_params"]) if ok else None


def earlier_control(path, weights, dense_dice: float, wait_s: float = 30.0) -> dict:
    """The control of a ``--control-only`` run of the same dense weights; waits for that run to
    write its file when it is still going (polling every ``wait_s`` seconds)."""
    path = Path(path)
    if not path.exists():
        print(f"waiting for the control {path} (a --control-only run)", flush=True)
        while not path.exists():
            time.sleep(wait_s)
    earlier = json.loads(path.read_text())
    if Path(earlier.get("weights", "")).resolve() != Path(weights).resolve() or \
            abs(earlier["dense"]["dice"] - dense_dice) > 1e-9 or not earlier.get("dense_finetuned"):
        raise SystemExit(f"--control-json {path}: not a control of {weights} (its weights: {earlier.get('weights')}, "
                         f"dense Dice {earlier.get('dense', {}).get('dice')} vs {dense_dice:.6f}); run --control-only")
    return earlier["dense_finetuned"]


def reference_dice(dense_dice: float, control: dict | None) -> float:
    """The Dice the pruned models are held to: the dense model's as trained, or the control's (the
    dense model fine-tuned with the pruned models' budget) when higher, so that "within 4%" never
    flatters a pruned model that merely got more training steps than an under-trained baseline."""
    return max(dense_dice, control["dice"]) if control is not None else dense_dice


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["sunnybrook", "chase"], required=True)
    ap.add_argument("--weights", default=None, help="dense U-Net (default benchmarks/weights/unet_<dataset>.safetensors)")
    ap.add_argument("--ratios", default="16,64,256,1000,3000", help="target parameter ratios")
    ap.add_argument("--runs", default="l1/oneshot,l2/oneshot,taylor/oneshot,random/oneshot,l1/iterative",
                    help="criterion/schedule pairs")
    ap.add_argument("--side-ratios", default="256,1000", help="target ratios of the runs after the first")
    ap.add_argument("--finetune-steps", type=int, default=600,
                    help="fine-tuning budget per pruned model (steps; the iterative schedule splits it over its stages)")
    ap.add_argument("--control-steps", type=int, default=None,
                    help="fine-tune the dense model this many steps as a control (default: --finetune-steps; 0: skip)")
    ap.add_argument("--control-json", default=None, metavar="JSON",
                    help="take the control from the result file of a --control-only run of the same dense weights "
                         "instead of training it here (read after the pruning rows, so both can run side by side)")
    ap.add_argument("--control-only", action="store_true",
                    help="only score the dense model and its control; writes <name>_control.json")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--stages", type=int, default=3, help="stages of the iterative schedule")
    ap.add_argument("--min-filters", type=int, default=1, help="filters every conv keeps at least")
    ap.add_argument("--allocation", choices=["global", "uniform"], default="global",
                    help="filters per layer: global cost-aware ranking, or the same fraction of every layer")
    ap.add_argument("--repeats", type=int, default=5, help="latency repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for pruning / fine-tuning")
    ap.add_argument("--deadline-minutes", type=float, default=None,
                    help="start no further pruning row after this wall time; skipped rows are listed in the JSON")
    ap.add_argument("--deploy-only", type=float, default=None, metavar="RATIO",
                    help="only prune l1/oneshot to RATIO (with the fine-tuning budget), then W8A8, latency and "
                         "overlays of that model; writes pruning_unet_<dataset>_deploy.json")
    ap.add_argument("--dense-latency", action="store_true",
                    help="only time the dense model (torch / onnxruntime); writes pruning_unet_<dataset>_dense_latency.json")
    ap.add_argument("--name", default=None, help="output file stem (default pruning_unet_<dataset>)")
    ap.add_argument("--no-latency", action="store_true", help="skip latency, W8A8 and overlays (Dice rows only)")
    ap.add_argument("--plot-only", nargs="+", metavar="JSON", default=None,
                    help="only redraw the Dice-vs-compression plot from the rows of these result files "
                         "(one dataset) into <name>_dice.png")
    args = ap.parse_args(argv)
    if args.plot_only:
        return plot_only(args)
    if args.dense_latency:
        return dense_latency(args)
    if args.deploy_only is not None:
        return deploy_only(args)
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    runs = parse_runs(args.runs, args.allocation)   # a bad --runs fails before any work
    tag = args.dataset
    weights = args.weights or REPO / "benchmarks" / "weights" / f"unet_{tag}.safetensors"
    dense, info = load_unet(weights)
    targs = info.get("args", {})
    kw = {"size": targs.get("size", 128), "crop": targs.get("crop")} if tag == "sunnybrook" else {"downscale": targs.get("downscale", 3)}
    train_data = load_segmentation(tag, "train", **kw)
    test_data = load_segmentation(tag, "test", **kw)
    m = 2 ** dense.config.depth
    example = pad_to_multiple(test_data.images[:1], m)[0].contiguous()
    patch = targs.get("patch", 64) if tag == "chase" else None
    ft = TrainConfig(steps=args.finetune_steps, batch_size=args.batch_size, lr=args.lr, patch_size=patch)
    t_start = time.time()

    result = {"machine": machine(), "dataset": tag, "weights": str(weights), "args": vars(args),
              "example_shape": list(example.shape)}
    dense_scores = evaluate(dense, test_data)
    result["dense"] = {"dice": dense_scores["dice"], "iou": dense_scores["iou"], "params": count_params(dense),
                       "macs": count_macs(dense, example)}
    ref = human_reference(test_data)
    if ref is not None:
        result["second_observer"] = {"dice": ref["dice"], "iou": ref["iou"]}
    control_steps = args.finetune_steps if args.control_steps is None else args.control_steps
    result["dense_finetuned"] = None
    stem = args.name or f"pruning_unet_{tag}"
    if args.control_only or (args.control_json is None and control_steps > 0):
        control = copy.deepcopy(dense)
        train(control, train_data, TrainConfig(**{**ft.__dict__, "steps": control_steps}), progress=False)
        result["dense_finetuned"] = {k: v for k, v in evaluate(control, test_data).items() if not k.endswith("image")}
        result["dense_finetuned"]["steps"] = control_steps
    print(f"{tag}: dense Dice {dense_scores['dice']:.4f}, fine-tuned control {result['dense_finetuned']}", flush=True)
    if args.control_only:
        return dump_json(OUT / f"{stem}_control.json", result)
    if args.control_json is not None and Path(args.control_json).exists():   # a wrong file fails before the rows
        earlier_control(args.control_json, weights, dense_scores["dice"])

    rows, keep, skipped = [], {}, []
    json_path = OUT / f"{stem}.json"
    result["finetune_steps"] = args.finetune_steps
    for k, (criterion, schedule, allocation) in enumerate(runs):
        for ratio in [float(r) for r in (args.ratios if k == 0 else args.side_ratios).split(",")]:
            if args.deadline_minutes is not None and time.time() - t_start > 60 * args.deadline_minutes:
                skipped.append({"criterion": criterion, "schedule": schedule, "allocation": allocation, "target": ratio})
                print(f"  {criterion:6s} {schedule:9s} {ratio:7g}x: skipped (deadline)", flush=True)
                result["skipped"] = skipped
                continue
            cfg = PruneConfig(target_ratio=ratio, criterion=criterion, schedule=schedule, stages=args.stages,
                              finetune=ft, min_filters=args.min_filters, allocation=allocation)
            t0 = time.time()
            res = prune_unet(dense, cfg, train_data, example=example, progress=False)
            s = evaluate(res.model, test_data)
            row = {"criterion": criterion, "schedule": schedule, "allocation": allocation, "target": ratio, "ratio_params": res.ratio_params,
                   "ratio_macs": res.ratio_macs, "params": res.params, "macs": res.macs, "dice": s["dice"],
                   "iou": s["iou"], "widths": list(res.model.config.widths), "seconds": time.time() - t0,
                   "finetune_steps": sum(h.get("finetune", {}).get("steps", 0) for h in res.history)}
            rows.append(row)
            keep[(criterion, schedule, allocation, ratio)] = res.model
            print(f"  {criterion:6s} {schedule:9s} {allocation:7s} {ratio:7g}x: params {res.ratio_params:8.1f}x MACs "
                  f"{res.ratio_macs:8.1f}x Dice {s['dice']:.4f} ({row['seconds']:.0f} s)", flush=True)
            result["rows"] = rows
            dump_json(json_path, result)

    if args.control_json is not None:   # read only now: that run may have gone on beside this one
        result["dense_finetuned"] = earlier_control(args.control_json, weights, dense_scores["dice"])
    dd = result["reference_dice"] = reference_dice(dense_scores["dice"], result["dense_finetuned"])
    for name, loss in (("within_4pct", 0.04), ("within_1pct", 0.01)):
        best = largest_within(rows, dd, loss)
        result[name] = None if best is None else {k: best[k] for k in ("criterion", "schedule", "allocation", "target",
                                                                      "ratio_params", "ratio_macs", "dice")}

    if args.no_latency:
        result["latency"], result["quantized"], result["seconds"] = [], [], time.time() - t_start
        result["plots"] = [plot_dice_vs_ratio(rows, dd, OUT / f"{stem}_dice.png", f"{tag}: Dice vs compression")]
        dump_json(json_path, result)
        return print_tables(result)

    # latency: dense, every model of the first run, and the 4%-point model (+ W8A8)
    onnx_dir = OUT / f"{stem}_onnx"
    onnx_dir.mkdir(exist_ok=True)
    lat = [{"model": "dense", "ratio_params": 1.0, **latency_row(dense, example, onnx_dir / "dense.onnx", args.repeats)}]
    first = runs[0]   # the main curve: every ratio of the first run
    curve = [r for r in rows if (r["criterion"], r["schedule"], r["allocation"]) == first]
    for r in curve:
        model = keep[(*first, r["target"])]
        lat.append({"model": f"{'/'.join(first)} {r['target']:g}x", "ratio_params": r["ratio_params"],
                    **latency_row(model, example, onnx_dir / f"curve_{r['target']:g}.onnx", args.repeats)})
    quant = []
    best = largest_within(rows, dd, 0.04)
    if best is not None:
        model = keep[(best["criterion"], best["schedule"], best["allocation"], best["target"])]
        save_unet(model, OUT / f"{stem}_4pct.safetensors", {"dataset": tag, "args": targs, **{
            k: best[k] for k in ("criterion", "schedule", "allocation", "target", "ratio_params", "dice")}})
        lat.append({"model": f"4% point {best['criterion']}/{best['schedule']}/{best['allocation']} {best['target']:g}x",
                    "ratio_params": best["ratio_params"],
                    **latency_row(model, example, onnx_dir / "best.onnx", args.repeats)})
        for wino in (None, 4):
            q = quantize_w8a8(model, wino)
            qs = evaluate(q, test_data)
            quant.append({"recipe": f"W8A8 {'direct' if wino is None else 'Winograd F(4,3)'}", "dice": qs["dice"],
                          "iou": qs["iou"], **latency_row(q, example, None, args.repeats)})
        # example overlays: dense vs the 4%-point model on the first test image
        with torch.no_grad():
            preds = {"dense": (predict_logits(dense, test_data.images[:1], m) > 0).float()[0],
                     f"pruned {best['ratio_params']:.0f}x": (predict_logits(model, test_data.images[:1], m) > 0).float()[0]}
        result["plots"] = [plot_overlays(test_data.images[0], test_data.masks[0], preds,
                                         OUT / f"{stem}_overlay.png", f"{tag}: {test_data.names[0]}")]
    result["latency"], result["quantized"] = lat, quant
    result.setdefault("plots", [])
    result["plots"] += [
        plot_dice_vs_ratio(rows, dd, OUT / f"{stem}_dice.png", f"{tag}: Dice vs compression"),
        plot_latency_vs_ratio(lat[:len(curve) + 1], OUT / f"{stem}_latency.png",
                              f"{tag}: CPU latency (batch 1, {tuple(example.shape[-2:])})")]
    result["seconds"] = time.time() - t_start
    dump_json(json_path, result)
    print_tables(result)


def plot_only(args) -> None:
    results = [json.loads(Path(p).read_text()) for p in args.plot_only]
    tags = {r["dataset"] for r in results}
    denses = {round(r["dense"]["dice"], 6) for r in results}
    if len(tags) != 1 or len(denses) != 1:
        raise SystemExit(f"--plot-only: the files must share one dataset and dense model, got {tags}, {denses}")
    rows = [row for r in results for row in r["rows"]]
    stem = args.name or f"pruning_unet_{args.dataset}"
    print(plot_dice_vs_ratio(rows, results[0]["dense"]["dice"], OUT / f"{stem}_dice.png",
                             f"{args.dataset}: Dice vs compression ({len(rows)} runs)"))


def dense_latency(args) -> None:
    torch.set_num_threads(args.threads)
    tag = args.dataset
    dense, info = load_unet(args.weights or REPO / "benchmarks" / "weights" / f"unet_{tag}.safetensors")
    targs = info.get("args", {})
    kw = {"size": targs.get("size", 128), "crop": targs.get("crop")} if tag == "sunnybrook" else \
        {"downscale": targs.get("downscale", 3)}
    test_data = load_segmentation(tag, "test", **kw)
    example = pad_to_multiple(test_data.images[:1], 2 ** dense.config.depth)[0].contiguous()
    out = {"machine": machine(), "dataset": tag, "params": count_params(dense), "macs": count_macs(dense, example),
           **latency_row(dense, example, OUT / f"pruning_unet_{tag}_dense.onnx", args.repeats)}
    dump_json(OUT / f"pruning_unet_{tag}_dense_latency.json", out)
    print(json.dumps(out, indent=1))


def deploy_only(args) -> None:
    """Dense vs one pruned model (l1 / one-shot at ``--deploy-only``): Dice, W8A8, latency, overlays."""
    torch.set_num_threads(args.threads)
    tag = args.dataset
    weights = args.weights or REPO / "benchmarks" / "weights" / f"unet_{tag}.safetensors"
    dense, info = load_unet(weights)
    targs = info.get("args", {})
    kw = {"size": targs.get("size", 128), "crop": targs.get("crop")} if tag == "sunnybrook" else \
        {"downscale": targs.get("downscale", 3)}
    train_data, test_data = load_segmentation(tag, "train", **kw), load_segmentation(tag, "test", **kw)
    m = 2 ** dense.config.depth
    example = pad_to_multiple(test_data.images[:1], m)[0].contiguous()
    patch = targs.get("patch", 64) if tag == "chase" else None
    ft = TrainConfig(steps=args.finetune_steps, batch_size=args.batch_size, lr=args.lr, patch_size=patch)
    res = prune_unet(dense, PruneConfig(target_ratio=args.deploy_only, finetune=ft, min_filters=args.min_filters),
                     train_data, example=example,
                     progress=False)
    model = res.model
    save_unet(model, OUT / f"pruning_unet_{tag}_{args.deploy_only:g}x.safetensors", {"dataset": tag, "args": targs})
    out = {"machine": machine(), "dataset": tag, "ratio_params": res.ratio_params, "ratio_macs": res.ratio_macs,
           "params": res.params, "dense_dice": evaluate(dense, test_data)["dice"]}
    s = evaluate(model, test_data)
    out["rows"] = [{"recipe": "float", "dice": s["dice"], "iou": s["iou"]}]
    for wino in (None, 4):
        q = quantize_w8a8(model, wino)
        qs = evaluate(q, test_data)
        out["rows"].append({"recipe": f"W8A8 {'direct' if wino is None else 'Winograd F(4,3)'}", "dice": qs["dice"],
                            "iou": qs["iou"], **latency_row(q, example, None, args.repeats)})
    out["rows"][0].update(latency_row(model, example, OUT / f"pruning_unet_{tag}_deploy.onnx", args.repeats))
    with torch.no_grad():
        preds = {"dense": (predict_logits(dense, test_data.images[:1], m) > 0).float()[0],
                 f"pruned {res.ratio_params:.0f}x": (predict_logits(model, test_data.images[:1], m) > 0).float()[0]}
    out["plot"] = plot_overlays(test_data.images[0], test_data.masks[0], preds, OUT / f"pruning_unet_{tag}_overlay.png",
                                f"{tag}: {test_data.names[0]}")
    dump_json(OUT / f"pruning_unet_{tag}_deploy.json", out)
    print(json.dumps(out, indent=1))


def print_tables(r: dict) -> None:
    print(f"\n## {r['dataset']}: dense Dice {r['dense']['dice']:.4f} IoU {r['dense']['iou']:.4f}, "
          f"{r['dense']['params']:,} params, {r['dense']['macs'] / 1e6:.1f} MMAC; dense + same fine-tuning "
          f"{(r['dense_finetuned'] or {}).get('dice', float('nan')):.4f}" + (f"; second observer Dice {r['second_observer']['dice']:.4f}"
                                                    if "second_observer" in r else ""))
    print("\n| criterion | schedule | target | params x | MACs x | params | fine-tune steps | Dice | IoU | Dice / reference |"
          "\n|---|---|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        print(f"| {x['criterion']} | {x['schedule']}/{x.get('allocation', 'global')} | {x['target']:g} | {x['ratio_params']:.1f} | "
              f"{x['ratio_macs']:.1f} | {x['params']:,} | {x.get('finetune_steps', '-')} | {x['dice']:.4f} | "
              f"{x['iou']:.4f} | {x['dice'] / r.get('reference_dice', r['dense']['dice']):.3f} |")
    for x in r.get("skipped", []):
        print(f"| {x['criterion']} | {x['schedule']}/{x['allocation']} | {x['target']:g} | skipped (deadline) |")
    for k in ("within_4pct", "within_1pct"):
        print(f"\nlargest ratio {k}: {json.dumps(r[k])}")
    if not r["latency"]:
        return
    dense = r["latency"][0]
    print("\n| model | params x | torch 1t CPU ms | speed-up | ORT 1t CPU ms | speed-up | torch 1t / 2t wall ms "
          "| ORT 1t / 2t wall ms |\n|---|---|---|---|---|---|---|---|")
    for x in r["latency"]:
        print(f"| {x['model']} | {x['ratio_params']:.1f} | {x['torch_1t_cpu']:.2f} | "
              f"{dense['torch_1t_cpu'] / x['torch_1t_cpu']:.1f}x | {x['ort_1t_cpu']:.2f} | "
              f"{dense['ort_1t_cpu'] / x['ort_1t_cpu']:.1f}x | {x['torch_1t_ms']:.1f} / {x['torch_2t_ms']:.1f} | "
              f"{x['ort_1t_ms']:.1f} / {x['ort_2t_ms']:.1f} |")
    if r["quantized"]:
        print("\n| 4%-point model | Dice | IoU | torch 1t CPU ms | torch 1t / 2t wall ms |\n|---|---|---|---|---|")
        for x in r["quantized"]:
            print(f"| {x['recipe']} | {x['dice']:.4f} | {x['iou']:.4f} | {x['torch_1t_cpu']:.2f} | "
                  f"{x['torch_1t_ms']:.1f} / {x['torch_2t_ms']:.1f} |")


if __name__ == "__main__":
    main()
