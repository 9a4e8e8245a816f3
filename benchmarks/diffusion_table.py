"""Diffusion table: the committed Fashion-MNIST DDPM under W8A8 quantization, and
per-layer Winograd error on an SD-1.5-shaped UNet (random weights).

    python benchmarks/diffusion_table.py --n-samples 40 --steps 50 --out benchmarks/out/diffusion_table.json

Part 1 (``--parts ddpm``): class-conditional DDIM samples (``--steps`` steps, eta 0,
labels i % 10, guidance ``--guidance``) of the FP model and of W8A8 (int8 weights and
activations, group size 32) direct convs, Winograd F(4,3) and F(6,3) with standard
and learned (data-free) transform scales; per configuration:

* FD-proxy vs FP: Fréchet distance in the penultimate features of the project's
  Fashion-MNIST classifier between the quantized samples and the FP samples of the
  same seeds. Noise floor: FP samples of *other* seeds vs the FP samples (a
  configuration below the floor is indistinguishable from re-seeding the FP model
  at this sample count). FD-proxy is not FID.
* FD-proxy vs real: against as many Fashion-MNIST test images (the real-vs-real
  value at this count is printed as the estimator's floor).
* PSNR and SSIM of each sample against the FP sample of the same seed.
* eps SQNR: noise-prediction SQNR (dB) per timestep on the FP trajectory of the
  first ``--sqnr-trajectories`` seeds (mean / min over timesteps in the table,
  every timestep in the JSON); "time-emb float": the same with the time-embedding
  Linear layers kept float (ablation).
* class accuracy of the samples according to the classifier.

Part 2 (``--parts sd``): ``UNet2DConditionModel`` with the SD-1.5 config (random
weights, seed 0, latent ``--sd-size``): per Winograd layer SQNR of W8A8 F(6,3) with
standard vs learned scales on held-out noise (``learn_layer_scales`` with a noise
batch of ``--sd-noise-batch`` images of ``--sd-noise-tiles`` tiles per side and
``--sd-learn-steps`` Adam steps), the time to calibrate all layers, the output SQNR
of a full UNet call, and the time of one UNet call at batch 1 (FP and emulated W8A8).

Results are merged into the JSON as they come (a rerun skips finished rows; use
--fresh to start over), then printed as markdown tables.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, dump_json, load_json, machine, quantize_timed  # noqa: E402

import winoq  # noqa: E402
from winoq.diffusion import calibration_inputs, default_ddpm_schedule, load_default_ddpm, sample  # noqa: E402
from winoq.diffusion.images import save_panels  # noqa: E402
from winoq.diffusion.metrics import FDProxy, eps_sqnr_per_timestep, frechet_distance, psnr, ssim  # noqa: E402

OUT = REPO / "benchmarks" / "out"


FORMAT_ROWS = [("W8A8 FP8 e4m3", "fp8_e4m3", "fp8_e4m3", "nearest"),
               ("W4A8 INT4 nearest", "int4", "int8", "nearest"), ("W4A8 INT4 learned", "int4", "int8", "learned"),
               ("W4A8 FP4 nearest", "fp4_e2m1", "int8", "nearest"), ("W4A8 FP4 learned", "fp4_e2m1", "int8", "learned")]


def ddpm_configs(tiles, groups, rounding_iters):
    """(row name, recipe); recipes that need calibration data get the timestep-uniform set."""
    if "base" in groups:
        yield "W8A8 direct g32", winoq.Recipe(winograd=None)
        for m in tiles:
            for s in ("standard", "learned"):
                yield f"W8A8 F({m},3) {s}", winoq.Recipe(winograd=m, scales=s)
    if "static" in groups:
        yield "W8A8 direct g32, static ranges", winoq.Recipe(winograd=None, activation_ranges="static")
        for m in tiles:
            yield f"W8A8 F({m},3) learned, static ranges", winoq.Recipe(winograd=m, activation_ranges="static")
    if "extra" in groups:  # beyond the paper: tap-wise weight scales (data-free), learned rounding of U
        for m in tiles:
            yield f"W8A8 F({m},3) learned +tap-wise weights", winoq.Recipe(winograd=m, winograd_weight_scales="tapwise")
            yield f"W8A8 F({m},3) learned, learned rounding", winoq.Recipe(winograd=m, rounding="learned",
                                                                          rounding_iters=rounding_iters)
    if "formats" in groups:
        for label, w, a, rounding in FORMAT_ROWS:
            for m in [None, *tiles]:
                tile = "direct g32" if m is None else f"F({m},3) learned"
                yield f"{label} | {tile}", winoq.Recipe(weights=w, activations=a, winograd=m, rounding=rounding,
                                                       rounding_iters=rounding_iters)


def in_panel(recipe):
    """The sample grid shows the paper's settings: W8A8 INT8, dynamic ranges, nearest rounding."""
    return (recipe.weights == recipe.activations == "int8" and recipe.activation_ranges == "dynamic"
            and recipe.rounding == "nearest" and recipe.winograd_weight_scales == "shared")


def keep_float(qmodel, fmodel, names):
    """Put float copies of the named modules back into ``qmodel``."""
    for n in names:
        parent, _, child = n.rpartition(".")
        setattr(qmodel.get_submodule(parent) if parent else qmodel, child, copy.deepcopy(fmodel.get_submodule(n)))
    return qmodel


def time_embedding_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and (n.startswith("time_mlp") or n.endswith(".temb"))]


def sqnr_summary(d):
    v = list(d.values())
    ts = sorted(d)
    return {"mean_db": statistics.fmean(v), "min_db": min(v), "t_min": min(d, key=d.get),
            "t0_db": d[ts[0]], "tmax_db": d[ts[-1]], "per_t": {str(k): d[k] for k in ts}}


def run_ddpm(args, res):
    torch.manual_seed(0)
    model = load_default_ddpm()
    sched = default_ddpm_schedule()
    n = args.n_samples
    seeds_a, seeds_b = list(range(n)), list(range(100_000, 100_000 + n))
    labels = torch.arange(n) % 10
    kw = dict(steps=args.steps, labels=labels, guidance_scale=args.guidance, batch_size=args.batch)
    fd = FDProxy()
    rows = res.setdefault("ddpm", {})
    cache = OUT / "diffusion_samples.pt"
    samples = torch.load(cache) if cache.exists() and not args.fresh else {}

    def gen(name, mdl, seeds):
        key = f"{name}|{n}|{args.steps}|{args.guidance}|{seeds[0]}"
        if key not in samples:
            t0 = time.perf_counter()
            samples[key] = (sample(mdl, sched, seeds, **kw), time.perf_counter() - t0)
            torch.save(samples, cache)
        return samples[key]

    fp_a, t_fp = gen("FP", model, seeds_a)
    fp_b, _ = gen("FP", model, seeds_b)
    feats_fp = fd.stats(fp_a)
    from winoq.data import load_fashion_mnist
    real, real_y = load_fashion_mnist("test")
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    real_a = real[perm[:n]].float().div(127.5).sub(1).unsqueeze(1)
    real_b = real[perm[n:2 * n]].float().div(127.5).sub(1).unsqueeze(1)
    feats_real = fd.stats(real_a)
    res["ddpm_setup"] = {
        "n_samples": n, "sampler": f"DDIM {args.steps} steps, eta 0", "guidance_scale": args.guidance,
        "labels": "i % 10", "seeds": f"0..{n - 1} (noise floor: 100000..{100_000 + n - 1})",
        "sqnr_trajectories": args.sqnr_trajectories, "recipe": "int8 weights + activations, group 32",
        "fd_proxy_real_vs_real": frechet_distance(*fd.stats(real_b), *feats_real),
        "fd_proxy_fp_vs_real": frechet_distance(*feats_fp, *feats_real),
        "fp_seconds": t_fp, "fp_class_acc": float((fd.predict(fp_a) == labels).float().mean())}
    rows["FP other seeds (noise floor)"] = {
        "fd_proxy_vs_fp": frechet_distance(*fd.stats(fp_b), *feats_fp),
        "fd_proxy_vs_real": frechet_distance(*fd.stats(fp_b), *feats_real),
        "psnr_db": psnr(fp_b, fp_a), "ssim": ssim(fp_b, fp_a),
        "class_acc": float((fd.predict(fp_b) == labels).float().mean())}
    dump_json(args.out, res)

    k = args.sqnr_trajectories
    _, traj = sample(model, sched, seeds_a[:k], steps=args.steps, labels=labels[:k], record=True)
    t0 = time.perf_counter()
    # calibration inputs for static ranges and learned rounding: x_t of FP DDIM trajectories from
    # other seeds, uniform over the sampler's timesteps, random labels
    calib = calibration_inputs(model, sched, num_samples=args.calib_samples, seed=12345, steps=args.steps,
                               num_trajectories=32, num_classes=10)
    res["ddpm_setup"]["calibration_set"] = {"samples": args.calib_samples, "trajectories": 32, "seed": 12345,
                                            "seconds": time.perf_counter() - t0,
                                            "rounding": f"{args.rounding_iters} iters per layer on 32 of them"}
    panels = [("FP", fp_a[:args.grid])]
    for name, recipe in ddpm_configs(args.tiles, args.groups, args.rounding_iters):
        key = f"{name}|{n}|{args.steps}|{args.guidance}|{seeds_a[0]}"  # as gen() stores it
        if name in rows and not args.fresh and key in samples:
            if in_panel(recipe):
                panels.append((name.replace("W8A8 ", ""), samples[key][0][:args.grid]))
            continue
        q, t_cal = quantize_timed(model, recipe, calib)
        xq, t_s = gen(name, q, seeds_a)
        if in_panel(recipe):
            panels.append((name.replace("W8A8 ", ""), xq[:args.grid]))
        row = {"fd_proxy_vs_fp": frechet_distance(*fd.stats(xq), *feats_fp),
               "fd_proxy_vs_real": frechet_distance(*fd.stats(xq), *feats_real),
               "psnr_db": psnr(xq, fp_a), "ssim": ssim(xq, fp_a),
               "class_acc": float((fd.predict(xq) == labels).float().mean()),
               "calibrate_seconds": t_cal, "sample_seconds": t_s,
               "eps_sqnr": sqnr_summary(eps_sqnr_per_timestep(model, q, sched, seeds_a[:k], labels=labels[:k],
                                                              trajectory=traj))}
        if name in ("W8A8 direct g32", f"W8A8 F({max(args.tiles)},3) learned"):
            qf = keep_float(q, model, time_embedding_linears(model))
            row["eps_sqnr_time_emb_float"] = sqnr_summary(
                eps_sqnr_per_timestep(model, qf, sched, seeds_a[:k], labels=labels[:k], trajectory=traj))
        rows[name] = row
        dump_json(args.out, res)
        print(f"{name}: FD-proxy vs FP {row['fd_proxy_vs_fp']:.2f}, PSNR {row['psnr_db']:.1f} dB, "
              f"eps SQNR {row['eps_sqnr']['mean_db']:.1f} dB ({t_s:.0f}s)", flush=True)
    save_panels(panels, args.png, nrow=10, scale=2, columns=3)
    res["ddpm_png"] = str(Path(args.png).relative_to(REPO)) if Path(args.png).is_relative_to(REPO) else str(args.png)


def run_sd(args, res):
    from winoq.diffusion.diffusers_support import build_sd15_unet, float_layers, sd15_unet_config
    from winoq.winograd.quantized import QuantWinogradConv2d
    from winoq.winograd.scales import ScaleLearningConfig, learn_layer_scales, sqnr_db

    t0 = time.perf_counter()
    unet = build_sd15_unet(seed=0, sample_size=args.sd_size)
    t_build = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, args.sd_size, args.sd_size, generator=gen)
    ctx = torch.randn(1, 77, 768, generator=gen)
    t = torch.tensor([500])

    def call(m):
        with torch.no_grad():
            t1 = time.perf_counter()
            out = m(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
            return out, time.perf_counter() - t1

    ref, t_fp = call(unet)
    _, t_fp2 = call(unet)
    print(f"SD-1.5-shaped UNet built in {t_build:.0f}s; FP call {min(t_fp, t_fp2):.1f}s", flush=True)
    t0 = time.perf_counter()
    q = winoq.quantize(unet, winoq.Recipe(winograd=6, scales="standard"), progress=False)
    t_swap = time.perf_counter() - t0
    out_std, t_q = call(q)
    print(f"W8A8 F(6,3) standard: call {t_q:.1f}s, output SQNR {sqnr_db(out_std, ref):.1f} dB", flush=True)
    cfg = dict(steps=args.sd_learn_steps, batch=args.sd_noise_batch, tiles=args.sd_noise_tiles,
               max_out_channels=args.sd_max_channels)
    wino = [(nm, m) for nm, m in q.named_modules() if isinstance(m, QuantWinogradConv2d)]
    # calibration cost and error depend on the layer shape only (random weights): "distinct" calibrates
    # one layer per (cin, cout) and reuses its time (and, for the output SQNR, its scales) for the others
    by_shape = {}
    for nm, m in wino:
        by_shape.setdefault((m.in_channels, m.out_channels), []).append((nm, m))
    todo = wino if args.sd_layers == "all" else [v[0] for v in by_shape.values()]
    layers, done = [], {}
    for i, (nm, m) in enumerate(todo):
        info = learn_layer_scales(m, ScaleLearningConfig(seed=i, **cfg))
        done[(m.in_channels, m.out_channels)] = (info, m)
        layers.append({"layer": nm, "cin": m.in_channels, "cout": m.out_channels,
                       "same_shape_layers": len(by_shape[(m.in_channels, m.out_channels)]),
                       "sqnr_standard_db": info["sqnr_standard_db"], "sqnr_learned_db": info["sqnr_learned_db"],
                       "seconds": info["seconds"]})
        print(f"  {nm} {m.in_channels}->{m.out_channels}: {info['sqnr_standard_db']:.1f} -> "
              f"{info['sqnr_learned_db']:.1f} dB ({info['seconds']:.1f}s)", flush=True)
    if args.sd_layers == "all":
        t_cal = sum(r["seconds"] for r in layers)
    else:
        t_cal = sum(r["seconds"] * r["same_shape_layers"] for r in layers)
        for key, group in by_shape.items():
            src = done[key][1]
            for _, m in group[1:]:
                m.set_diagonal_scales(src.log_sb.exp(), src.log_sg.exp())
    out_learned, t_q2 = call(q)
    kinds = {}
    for r in q.winoq_report:
        kinds[f"{r.kind}: {r.detail}"] = kinds.get(f"{r.kind}: {r.detail}", 0) + 1
    std = [r["sqnr_standard_db"] for r in layers]
    lrn = [r["sqnr_learned_db"] for r in layers]
    res["sd15"] = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in sd15_unet_config(sample_size=args.sd_size).items()},
        "parameters": sum(p.numel() for p in unet.parameters()), "weights": "random (seed 0)",
        "latent": [1, 4, args.sd_size, args.sd_size], "context": [1, 77, 768], "timestep": 500,
        "recipe": "W8A8 g32 F(6,3)", "layers": layers, "layer_kinds": kinds, "float_layers": float_layers(q),
        "calibration": {**cfg, "total_seconds": t_cal, "n_winograd_layers": len(wino), "layers": args.sd_layers,
                        "note": ("all layers calibrated" if args.sd_layers == "all" else
                                 "one layer per distinct (cin, cout) calibrated; total_seconds = sum of its time x "
                                 "layers of that shape; the output SQNR uses its scales for the layers of that shape")},
        "sqnr_standard_db_mean": statistics.fmean(std), "sqnr_learned_db_mean": statistics.fmean(lrn),
        "sqnr_gain_db_min": min(b - a for a, b in zip(std, lrn)), "sqnr_gain_db_max": max(b - a for a, b in zip(std, lrn)),
        "output_sqnr_standard_db": sqnr_db(out_std, ref), "output_sqnr_learned_db": sqnr_db(out_learned, ref),
        "seconds_build": t_build, "seconds_swap": t_swap,
        "seconds_per_call_fp": min(t_fp, t_fp2), "seconds_per_call_w8a8_f63_emulated": min(t_q, t_q2),
    }
    dump_json(args.out, res)


def print_formats_table(res):
    """INT vs FP, nearest vs learned rounding (issue: formats): FD-proxy vs FP / PSNR vs FP (dB) /
    calibration seconds, per weight format and tile."""
    rows = res["ddpm"]
    tiles = sorted({k.split(" | ")[1] for k in rows if " | " in k}, key=lambda t: (t != "direct g32", t))
    print("\n| weights / rounding | " + " | ".join(tiles) + " |")
    print("|---|" + "---|" * len(tiles))
    base = {"direct g32": "W8A8 direct g32"}
    base.update({t: f"W8A8 {t}" for t in tiles if t != "direct g32"})
    for label in ["W8A8 INT8"] + [r[0] for r in FORMAT_ROWS]:
        cells = []
        for t in tiles:
            r = rows.get(base[t]) if label == "W8A8 INT8" else rows.get(f"{label} | {t}")
            cells.append("-" if r is None else f"{r['fd_proxy_vs_fp']:.2f} / {r['psnr_db']:.1f} / {r['calibrate_seconds']:.0f}s")
        print(f"| {label} | " + " | ".join(cells) + " |")


def print_tables(res):
    if "ddpm" in res:
        s = res["ddpm_setup"]
        print(f"\nFashion-MNIST DDPM, {s['n_samples']} samples, {s['sampler']}, guidance {s['guidance_scale']}; "
              f"FD-proxy real-vs-real floor {s['fd_proxy_real_vs_real']:.2f}, FP vs real {s['fd_proxy_fp_vs_real']:.2f}, "
              f"FP class acc {s['fp_class_acc']:.2f}")
        print("| config | FD-proxy vs FP | FD-proxy vs real | PSNR vs FP (dB) | SSIM vs FP | eps SQNR mean / min (dB) "
              "| eps SQNR, time-emb float | class acc |")
        print("|---|---|---|---|---|---|---|---|")
        order = ["FP other seeds (noise floor)", "W8A8 direct g32"] + [f"W8A8 F({m},3) {k}" for m in range(2, 15)
                                                                       for k in ("standard", "learned")]
        for name, r in sorted(res["ddpm"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            e = r.get("eps_sqnr")
            tf = r.get("eps_sqnr_time_emb_float")
            es = "-" if e is None else f"{e['mean_db']:.1f} / {e['min_db']:.1f}"
            tfs = "-" if tf is None else f"{tf['mean_db']:.1f} / {tf['min_db']:.1f}"
            print(f"| {name} | {r['fd_proxy_vs_fp']:.2f} | {r['fd_proxy_vs_real']:.2f} | {r['psnr_db']:.1f} | "
                  f"{r['ssim']:.3f} | {es} | {tfs} | {r['class_acc']:.2f} |")
    if any(" | " in k for k in res.get("ddpm", {})):
        print_formats_table(res)
    if "sd15" in res:
        s = res["sd15"]
        c = s["calibration"]
        print(f"\nSD-1.5-shaped UNet ({s['parameters'] / 1e6:.0f}M params, random weights), W8A8 g32 F(6,3), "
              f"{c['n_winograd_layers']} Winograd layers ({len(s['layers'])} calibrated, {c['layers']}): per-layer SQNR standard {s['sqnr_standard_db_mean']:.1f} dB -> "
              f"learned {s['sqnr_learned_db_mean']:.1f} dB (gain {s['sqnr_gain_db_min']:.1f}..{s['sqnr_gain_db_max']:.1f}); "
              f"calibration {c['total_seconds']:.0f}s{'' if c['layers'] == 'all' else ' (extrapolated by shape)'} (noise batch {c['batch']}x{c['tiles']}x{c['tiles']} tiles, "
              f"{c['steps']} steps); UNet output SQNR {s['output_sqnr_standard_db']:.1f} -> {s['output_sqnr_learned_db']:.1f} dB; "
              f"one call at batch 1, latent {s['latent'][-1]}: FP {s['seconds_per_call_fp']:.1f}s, emulated W8A8 F(6,3) "
              f"{s['seconds_per_call_w8a8_f63_emulated']:.1f}s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["ddpm", "sd"], choices=["ddpm", "sd"])
    ap.add_argument("--n-samples", type=int, default=40)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--tiles", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--sqnr-trajectories", type=int, default=4)
    ap.add_argument("--groups", nargs="+", default=["base", "static", "formats"],
                    choices=["base", "static", "formats", "extra"],
                    help="DDPM rows: base (W8A8 direct / Winograd standard vs learned), static (Q-Diffusion static "
                         "ranges), formats (FP8, INT4/FP4 weights x nearest/learned rounding), extra (tap-wise "
                         "weight scales, learned rounding of the Winograd weights at W8A8)")
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--rounding-iters", type=int, default=100)
    ap.add_argument("--grid", type=int, default=30, help="samples per panel of the PNG")
    ap.add_argument("--sd-size", type=int, default=64)
    ap.add_argument("--sd-learn-steps", type=int, default=5)
    ap.add_argument("--sd-noise-batch", type=int, default=1)
    ap.add_argument("--sd-noise-tiles", type=int, default=4)
    ap.add_argument("--sd-max-channels", type=int, default=256,
                    help="learn each layer's scales on this many of its output channels (0: all)")
    ap.add_argument("--sd-layers", choices=["distinct", "all"], default="distinct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT / "diffusion_table.json")
    ap.add_argument("--png", type=Path, default=OUT / "diffusion_samples.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.sd_max_channels = args.sd_max_channels or None
    res = {} if args.fresh else load_json(args.out)
    res["machine"] = machine()
    res["command"] = "python benchmarks/diffusion_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    if "ddpm" in args.parts:
        run_ddpm(args, res)
        res["ddpm_seconds"] = time.perf_counter() - t0
    if "sd" in args.parts:
        t1 = time.perf_counter()
        run_sd(args, res)
        res["sd_seconds"] = time.perf_counter() - t1
    dump_json(args.out, res)
    print_tables(res)
    print(f"\n{time.perf_counter() - t0:.0f}s; JSON: {args.out}")


if __name__ == "__main__":
    main()
