"""Data-free calibration of an SD-1.5-shaped UNet on 1 vs N local processes (winoq.distributed).

    python benchmarks/distributed_calibration.py --procs 1 2 --widths 64 128 256 256 --out benchmarks/out/distributed_calibration.json

``UNet2DConditionModel`` with the SD-1.5 config (random weights, seed 0), ``block_out_channels``
replaced by ``--widths`` (SD-1.5: 320 640 1280 1280), W8A8 g32 F(6,3) learned, ``--learn-steps``
Adam steps. Per process count: wall time of ``quantize_sharded`` (process start and model copies
included), and per rank the summed learning seconds of the layers it owns (the critical path is
the slowest rank); checks that the learned scales equal the 1-process run bit for bit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, dump_json, load_json, machine  # noqa: E402

import winoq  # noqa: E402
from winoq.distributed import assign_layers, layer_cost, quantize_sharded  # noqa: E402
from winoq.winograd.quantized import QuantWinogradConv2d  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--widths", type=int, nargs=4, default=[64, 128, 256, 256])
    ap.add_argument("--learn-steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "distributed_calibration.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from winoq.diffusion.diffusers_support import build_sd15_unet

    unet = build_sd15_unet(seed=0, block_out_channels=tuple(args.widths))
    recipe = winoq.Recipe(winograd=6, learn_steps=args.learn_steps)
    res = load_json(args.out)
    res.update(machine=machine(), widths=args.widths, learn_steps=args.learn_steps,
               parameters=sum(p.numel() for p in unet.parameters()),
               command="python benchmarks/distributed_calibration.py " + " ".join(argv or sys.argv[1:]))
    runs, ref = {}, None
    for n in args.procs:
        t0 = time.perf_counter()
        q = quantize_sharded(unet, recipe, procs=n, progress=False)
        wall = time.perf_counter() - t0
        wino = [(r, m) for r, m in zip(q.winoq_report, [q.get_submodule(r.name) for r in q.winoq_report])
                if isinstance(m, QuantWinogradConv2d)]
        owners = assign_layers([layer_cost(m, recipe.learn_max_channels) for _, m in wino], n)
        per_rank = [sum(r.calibration["seconds"] for (r, _), o in zip(wino, owners) if o == k) for k in range(n)]
        scales = torch.cat([torch.cat([m.log_sb.detach(), m.log_sg.detach()]) for _, m in wino])
        ref = scales if ref is None else ref
        runs[str(n)] = {"wall_s": wall, "learning_s_per_rank": per_rank, "critical_path_s": max(per_rank),
                        "winograd_layers": len(wino), "identical_to_first": bool(torch.equal(scales, ref))}
        print(f"{n} process(es): wall {wall:.1f}s, learning per rank {[round(s, 1) for s in per_rank]}, "
              f"identical {runs[str(n)]['identical_to_first']}", flush=True)
    res["runs"] = runs
    dump_json(args.out, res)


if __name__ == "__main__":
    main()
