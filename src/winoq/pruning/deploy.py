"""The deployment end of the pipeline for a (pruned) U-Net: W8A8 quantization, ONNX export,
CPU latency in torch and onnxruntime.

Latency is the median wall time of ``repeats`` single-image forwards after ``warmup`` runs,
at a fixed thread count, with the spread.  At one thread the work runs on the calling thread
(torch intra-op 1; onnxruntime intra-op 1 runs on the caller), so the median *thread CPU time*
is returned too: on a machine shared with other jobs it is the number to trust.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings

import torch
from torch import nn


def quantize_w8a8(model: nn.Module, winograd: int | None, progress: bool = False) -> nn.Module:
    """winoq W8A8 (int8 weights and activations): ``winograd=None`` direct convs,
    ``winograd=4`` fully quantized Winograd F(4,3) for the 3x3 convs (learned data-free
    scales).  The transposed convs (upsampling) stay in float: winoq quantizes Conv2d / Linear."""
    import winoq

    # a pruned net is narrow: Winograd is asked for explicitly, so the few-channel rule is off
    recipe = winoq.Recipe(weights="int8", activations="int8", winograd=winograd, winograd_min_channels=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return winoq.quantize(model, recipe, progress=progress).eval()


def export_onnx(model: nn.Module, path: str | os.PathLike, example: torch.Tensor) -> str:
    """Export with the TorchScript-based exporter (no onnxscript needed); returns the path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, input_names=["image"],
                          output_names=["logits"], opset_version=17)
    return str(path)


def int8_onnx(model: nn.Module, calib: torch.Tensor, path: str | os.PathLike, example: torch.Tensor):
    """Integer-only W8A8 version of a (pruned) U-Net (``winoq.integer.convert``: BN folded, static
    ranges on ``calib``, dyadic requantization; the transposed convs and skip concatenations in
    integers too), written as ONNX for onnxruntime's int8 kernels (``ops="qlinear"``).
    Returns the integer model (the bit-exact reference of the file)."""
    from ..integer import IntegerConfig, convert
    from ..integer.onnx_export import export_onnx as export_integer

    im = convert(model.eval(), calib, IntegerConfig(calib_samples=len(calib)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_integer(im, path, example, ops="qlinear", calib=calib[:16])
    return im


def onnx_logits(path: str | os.PathLike, images: torch.Tensor, multiple: int, input_name: str = "x") -> torch.Tensor:
    """Per-image logits of an exported segmentation model (inputs zero-padded to ``multiple``, one at a
    time: the exported input shape is fixed)."""
    import numpy as np

    from ..data.segmentation import pad_to_multiple
    from ..integer.onnx_export import cpu_session

    sess = cpu_session(path)
    outs = []
    for i in range(len(images)):
        x, (h, w) = pad_to_multiple(images[i:i + 1], multiple)
        outs.append(torch.from_numpy(sess.run(None, {input_name: x.numpy().astype(np.float32)})[0])[..., :h, :w])
    return torch.cat(outs)


def _summary(times: list[float], cpu: list[float]) -> dict:
    times = sorted(times)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * times[0],
            "max_ms": 1e3 * times[-1], "cpu_median_ms": 1e3 * statistics.median(cpu), "repeats": len(times)}


def torch_latency(model: nn.Module, example: torch.Tensor, threads: int, repeats: int = 10, warmup: int = 2) -> dict:
    """Median wall time of one forward at ``threads`` torch threads (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        times, cpu = [], []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                t0, c0 = time.perf_counter(), time.thread_time()
                model(example)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.thread_time() - c0)
    finally:
        torch.set_num_threads(old)
    return _summary(times, cpu)


def onnx_latency(path: str | os.PathLike, example: torch.Tensor, threads: int, repeats: int = 10,
                 warmup: int = 2) -> dict:
    """Median wall time of one onnxruntime CPU run at ``threads`` intra-op threads."""
    from ..integer.onnx_export import cpu_session

    sess = cpu_session(path, threads)
    feed = {sess.get_inputs()[0].name: example.numpy()}
    times, cpu = [], []
    for i in range(warmup + repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        sess.run(None, feed)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    return _summary(times, cpu)


def onnx_outputs(path: str | os.PathLike, example: torch.Tensor) -> torch.Tensor:
    from ..integer.onnx_export import cpu_session

    sess = cpu_session(path)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0])
