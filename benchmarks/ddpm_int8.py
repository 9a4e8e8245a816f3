"""The project's DDPM UNet (Fashion-MNIST, 1.1M parameters) with int8 convs, end to end: latency
of one UNet call and sample quality against the float model and against torch.ao's int8 model of
the same net.

    OMP_NUM_THREADS=1 python benchmarks/ddpm_int8.py --batches 1 16 64 --out benchmarks/out/ddpm_int8.json

Models (the UNet has GroupNorm, SiLU, attention and a timestep embedding: no integer-only graph;
every conv computes in int8 with float glue between, as torch.ao's eager static quantization does):

* float32: the model as it is (torch eager, oneDNN convs);
* winoq int8 convs: ``winoq.integer.int8_convs`` (winoq's compiled int8 conv, per-tensor static input
  scale from the largest |input| on the calibration batches, per-channel int8 weights, the input
  quantized inside the kernel, float NCHW out);
* torch.ao int8 (x86 / onednn engine): the same convs wrapped in ``QuantStub`` / ``DeQuantStub``,
  ``prepare`` / ``convert`` with the engine's default qconfig (histogram observer, per-channel
  weights), calibrated on the same batches.

Calibration: ``--calib`` data-free inputs (x_t, t, y) from float DDIM trajectories
(``winoq.diffusion.calibration_inputs``). Latency: median wall ms of one UNet call per batch size,
the models interleaved round by round (``--rounds``), ``torch.set_num_threads(--threads)``. Quality:
noise-prediction SQNR against float per timestep on the float DDIM trajectory of ``--sqnr-seeds``
seeds (mean and worst over the ``--steps`` timesteps), and ``--samples`` class-conditional DDIM
samples per model from the float model's seeds: PSNR and SSIM against the float samples.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dump_json, machine  # noqa: E402


class _AOConv(nn.Module):
    """torch.ao eager static quantization of one conv: quantize, int8 conv, dequantize."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.conv, self.dequant = QuantStub(), conv, DeQuantStub()

    def forward(self, x):
        return self.dequant(self.conv(self.quant(x)))


def _swap_convs(model: nn.Module, make) -> nn.Module:
    from winoq.api import _replace

    model = copy.deepcopy(model)
    for name, conv in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]:
        _replace(model, name, make(conv))
    return model


def torch_ao_int8(model: nn.Module, calib_batches: list, engine: str) -> nn.Module:
    import torch.ao.quantization as aq

    torch.backends.quantized.engine = engine
    wrapped = _swap_convs(model, _AOConv)
    for m in wrapped.modules():
        if isinstance(m, _AOConv):
            m.qconfig = aq.get_default_qconfig(engine)
    prepared = aq.prepare(wrapped)
    with torch.no_grad():
        for batch in calib_batches:
            prepared(*batch)
    return aq.convert(prepared)


def latency(models: dict, batch: int, rounds: int, reps: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x, t, y)
        for _ in range(rounds):  # interleaved: every model sees the same machine state
            for k, m in models.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    m(x, t, y)
                times[k].append((time.perf_counter() - t0) / reps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def quality(fp, models: dict, schedule, args) -> dict:
    from winoq.diffusion.metrics import eps_sqnr_per_timestep, psnr, ssim
    from winoq.diffusion.samplers import ddim_sample, sample

    seeds = list(range(1000, 1000 + args.sqnr_seeds))
    labels = [i % 10 for i in seeds]
    _, traj = sample(fp, schedule, seeds, steps=args.steps, labels=labels, record=True)
    sample_seeds = list(range(args.samples))
    sample_labels = [i % 10 for i in sample_seeds]
    ref = ddim_sample(fp, schedule, sample_seeds, steps=args.steps, labels=sample_labels)
    out = {}
    for k, m in models.items():
        if m is fp:
            continue
        with torch.no_grad():
            per_t = eps_sqnr_per_timestep(fp, m, schedule, seeds, labels=labels, trajectory=traj)
            got = ddim_sample(m, schedule, sample_seeds, steps=args.steps, labels=sample_labels)
        out[k] = {"eps_sqnr_mean": statistics.mean(per_t.values()), "eps_sqnr_min": min(per_t.values()),
                  "eps_sqnr_per_t": per_t, "sample_psnr": psnr(got, ref), "sample_ssim": float(ssim(got, ref))}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib", type=int, default=256, help="calibration inputs (x_t, t, y)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (calibration, SQNR, samples)")
    p.add_argument("--sqnr-seeds", type=int, default=32)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--engines", nargs="+", default=["x86", "onednn"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/ddpm_int8.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="torch.ao")

    from winoq.diffusion.pretrained import default_ddpm_schedule, load_default_ddpm
    from winoq.diffusion.samplers import calibration_inputs
    from winoq.integer import int8_convs
    from winoq.kernels import int_graph

    fp = load_default_ddpm().eval()
    schedule = default_ddpm_schedule()
    t0 = time.perf_counter()
    calib_set = calibration_inputs(fp, schedule, args.calib, steps=args.steps, seed=0)
    calib = list(calib_set.batches(64))
    t1 = time.perf_counter()
    models = {"float32": fp, "winoq int8 convs": int8_convs(fp, calib_set)}
    convert_s = {"calibration inputs": t1 - t0, "winoq int8 convs": time.perf_counter() - t1}
    for engine in args.engines:
        t1 = time.perf_counter()
        models[f"torch.ao int8 ({engine})"] = torch_ao_int8(fp, calib, engine)
        convert_s[f"torch.ao int8 ({engine})"] = time.perf_counter() - t1
    result = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "kernel_isa": int_graph.isa(), "convert_s": convert_s, "latency_ms": {}}
    for b in args.batches:
        lat = latency_by_engine(models, b, args.rounds, max(1, 64 // b))
        result["latency_ms"][str(b)] = lat
        print(f"batch {b}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in lat.items()), flush=True)
    result["quality"] = quality(fp, models, schedule, args)
    dump_json(args.out, result)
    print_tables(result)


def latency_by_engine(models: dict, batch: int, rounds: int, reps: int) -> dict[str, float]:
    """:func:`latency`, with the quantized engine each torch.ao model was converted for set around its calls."""
    def engine_of(k):
        return k.split("(")[1].rstrip(")") if k.startswith("torch.ao") else None

    class _OnEngine(nn.Module):
        def __init__(self, m, engine):
            super().__init__()
            self.m, self.engine = m, engine

        def forward(self, *a):
            if self.engine is not None:
                torch.backends.quantized.engine = self.engine
            return self.m(*a)

    return latency({k: _OnEngine(m, engine_of(k)) for k, m in models.items()}, batch, rounds, reps)


def print_tables(result: dict) -> None:
    names = list(next(iter(result["latency_ms"].values())))
    print("\n| batch | " + " | ".join(names) + " | winoq vs float | winoq vs best torch.ao |")
    print("|---:|" + "---:|" * (len(names) + 2))
    for b, lat in result["latency_ms"].items():
        ao = min(v for k, v in lat.items() if k.startswith("torch.ao"))
        w = lat["winoq int8 convs"]
        print(f"| {b} | " + " | ".join(f"{lat[k]:.2f}" for k in names)
              + f" | {lat['float32'] / w:.2f}x | {ao / w:.2f}x |")
    print("\n| model | eps SQNR mean / worst (dB) | sample PSNR (dB) | sample SSIM |")
    print("|---|---:|---:|---:|")
    for k, q in result["quality"].items():
        print(f"| {k} | {q['eps_sqnr_mean']:.1f} / {q['eps_sqnr_min']:.1f} | {q['sample_psnr']:.1f} | "
              f"{q['sample_ssim']:.3f} |")


if __name__ == "__main__":
    main()
