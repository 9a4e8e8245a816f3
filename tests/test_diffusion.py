"""Diffusion support: UNet, schedules, samplers, metrics, diffusers helpers, sharding."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

import winoq
from winoq.diffusion import (DDPMUNet, UNetConfig, calibration_inputs, ddim_timesteps, make_schedule,
                             q_sample_calibration, sample)
from winoq.diffusion import metrics as M
from winoq.diffusion.distributed import shard_bounds, sharded_eps_sqnr, sharded_sample, spawn_sharded

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed")

TINY = dict(base=8, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,), groups=4, image_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(num_classes=None, seed=0):
    torch.manual_seed(seed)
    m = DDPMUNet(UNetConfig(num_classes=num_classes, **TINY)).eval()
    with torch.no_grad():  # the output conv is zero-initialised: give it weights so eps depends on x
        m.conv_out.weight.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def sched():
    return make_schedule("linear", 100)


# ----------------------------------------------------------------------------- schedule / UNet
def test_schedules():
    lin = make_schedule("linear", 1000)
    assert lin.betas[0] == pytest.approx(1e-4) and lin.betas[-1] == pytest.approx(0.02)
    cos = make_schedule("cosine", 1000)
    ab = cos.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 1e-3
    assert float(lin.abar(-1)) == 1.0
    with pytest.raises(ValueError, match="unknown"):
        make_schedule("quadratic")
    x0 = torch.ones(3, 1, 4, 4)
    xt = lin.q_sample(x0, torch.tensor([0, 500, 999]), torch.zeros_like(x0))
    assert torch.allclose(xt[:, 0, 0, 0], lin.abar(torch.tensor([0, 500, 999])).sqrt().float())


def test_unet_shapes_and_validation():
    m = tiny_unet(num_classes=3)
    x = torch.randn(2, 1, 8, 8)
    assert m(x, torch.tensor([1, 50])).shape == x.shape
    assert m(x, 7, torch.tensor([0, 3])).shape == x.shape  # scalar t, null class 3
    assert m.class_emb.num_embeddings == 4
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        m(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 1, 7, 7), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible by groups"):
        UNetConfig(base=10, groups=4)
    full = DDPMUNet(UNetConfig(num_classes=10))  # the default: 28x28, attention at 7x7
    assert 1e6 < sum(p.numel() for p in full.parameters()) < 2e6
    assert full(torch.randn(1, 1, 28, 28), torch.tensor([3])).shape == (1, 1, 28, 28)


# ----------------------------------------------------------------------------- samplers
def test_sampler_reproducible_and_batch_independent(sched):
    m = tiny_unet()
    a = sample(m, sched, [1, 2, 3, 4, 5], shape=(1, 8, 8), steps=4, batch_size=5)
    b = sample(m, sched, [1, 2, 3, 4, 5], shape=(1, 8, 8), steps=4, batch_size=2)
    c = sample(m, sched, [3], shape=(1, 8, 8), steps=4)
    # the batch composition only changes float round-off (batch-dependent conv kernels)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    torch.testing.assert_close(a[2:3], c, atol=2e-4, rtol=0)
    one_by_one = sample(m, sched, [1, 2, 3, 4, 5], shape=(1, 8, 8), steps=4, batch_size=1)
    assert torch.equal(one_by_one[2:3], c)
    assert not torch.allclose(a[0], a[1])
    s1 = sample(m, sched, [7, 8], shape=(1, 8, 8), steps=4, eta=1.0)
    s2 = sample(m, sched, [7, 8], shape=(1, 8, 8), steps=4, eta=1.0)
    assert torch.equal(s1, s2)


def test_ddpm_equals_ddim_eta1(sched):
    m = tiny_unet()
    a = sample(m, sched, [0, 1], shape=(1, 8, 8), method="ddpm", steps=6)
    b = sample(m, sched, [0, 1], shape=(1, 8, 8), method="ddim", steps=6, eta=1.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ddim_timesteps(1000, 50)[0] == 999 and ddim_timesteps(1000, 50)[-1] == 0
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)


def test_classifier_free_guidance(sched):
    m = tiny_unet(num_classes=3)
    y = torch.tensor([0, 2])
    kw = dict(shape=(1, 8, 8), steps=3, labels=y)
    cond = sample(m, sched, [0, 1], **kw)
    torch.testing.assert_close(sample(m, sched, [0, 1], guidance_scale=1.0, **kw), cond)
    uncond = sample(m, sched, [0, 1], shape=(1, 8, 8), steps=3, labels=torch.tensor([3, 3]))
    torch.testing.assert_close(sample(m, sched, [0, 1], guidance_scale=0.0, **kw), uncond, atol=1e-5, rtol=0)
    guided = sample(m, sched, [0, 1], guidance_scale=3.0, **kw)
    assert not torch.allclose(guided, cond)
    with pytest.raises(ValueError, match="needs labels"):
        sample(m, sched, [0], shape=(1, 8, 8), steps=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        sample(tiny_unet(), sched, [0], shape=(1, 8, 8), steps=2, labels=[1])


def test_calibration_inputs_uniform_over_timesteps(sched):
    m = tiny_unet(num_classes=3)
    cal = calibration_inputs(m, sched, 20, seed=0, steps=5, num_trajectories=4, shape=(1, 8, 8))
    assert cal.x.shape == (20, 1, 8, 8) and cal.y.shape == (20,)
    counts = torch.bincount(cal.t, minlength=100)
    assert sorted(set(counts[counts > 0].tolist())) == [4]  # 5 timesteps x 4 each
    assert sum(len(b[0]) for b in cal.batches(8)) == 20
    q = q_sample_calibration(torch.zeros(10, 1, 8, 8), sched, 30, seed=1)
    assert q.x.shape == (30, 1, 8, 8) and int(q.t.max()) < 100


# ----------------------------------------------------------------------------- metrics
def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expect, rel=1e-10)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    from scipy.linalg import sqrtm
    ref = np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert M.frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(ref, rel=1e-8)
    assert M.frechet_distance(mu1, s1[:5, :5], mu1, s1[:5, :5]) == pytest.approx(0, abs=1e-9)
    assert M.frechet_distance(0.0, 4.0, 1.0, 1.0) == pytest.approx(1 + 1)  # 1-D: (mu)^2 + (2-1)^2
    with pytest.raises(ValueError, match="shape"):
        M.frechet_distance(mu1, s1, mu2, s2)


def test_psnr_ssim():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert M.psnr(x + 0.02, x) == pytest.approx(10 * math.log10(4 / 0.02 ** 2), rel=1e-6)
    assert M.ssim(x, x) == pytest.approx(1.0)
    noisy = x + 0.3 * torch.randn_like(x)
    assert 0 < M.ssim(noisy, x) < M.ssim(x + 0.05 * torch.randn_like(x), x) < 1
    assert M.ssim(noisy, x) == pytest.approx(M.ssim(x, noisy))
    a, b = torch.full((1, 1, 12, 12), 0.5), torch.full((1, 1, 12, 12), -0.2)
    c1 = (0.01 * 2) ** 2
    assert M.ssim(a, b) == pytest.approx((2 * 0.5 * -0.2 + c1) / (0.25 + 0.04 + c1), rel=1e-6)
    assert M.psnr(x, x, reduction="none").isinf().all()


def test_fd_proxy_features():
    fd = M.FDProxy()
    x = torch.rand(40, 1, 28, 28) * 2 - 1
    f = fd.features(x)
    assert f.shape == (40, fd.classifier.fc.in_features)
    assert fd(x, x) == pytest.approx(0, abs=1e-6)
    assert fd(x, -torch.ones_like(x[:20]) + 0.01 * torch.rand(20, 1, 28, 28)) > 1


def test_eps_sqnr_and_quantize_ddpm_unet(sched):
    m = tiny_unet(num_classes=3)
    q = winoq.quantize(m, winoq.Recipe(winograd=4, scales="learned", learn_steps=1, winograd_min_channels=None),
                       progress=False)
    kinds = {r.kind for r in q.winoq_report}
    assert {"winograd", "direct", "linear"} <= kinds
    y = torch.tensor([0, 1, 2])
    s = M.eps_sqnr_per_timestep(m, q, sched, [0, 1, 2], steps=3, labels=y, shape=(1, 8, 8))
    assert list(s) == ddim_timesteps(100, 3).tolist()
    assert all(10 < v < 80 for v in s.values())
    same = M.eps_sqnr_per_timestep(m, m, sched, [0, 1], steps=2, shape=(1, 8, 8), labels=y[:2])
    assert min(same.values()) > 200
    xq = sample(q, sched, [0, 1, 2], shape=(1, 8, 8), steps=3, labels=y)
    assert torch.isfinite(xq).all()


def test_optional_metric_adapters_fail_clearly():
    x = torch.zeros(2, 1, 8, 8)
    if importlib.util.find_spec("torchmetrics") is None:
        with pytest.raises(M.MissingDependencyError, match="torchmetrics"):
            M.fid_torchmetrics(x, x)
    else:
        with pytest.raises(M.MissingDependencyError):
            M.fid_torchmetrics(x, x, weights_path="/nonexistent/inception.pth")
    with pytest.raises(M.MissingDependencyError, match="open_clip|CLIP weights"):
        M.clip_score_open_clip(x, ["a", "b"])


def test_default_ddpm_loads():
    from winoq.diffusion import default_ddpm_schedule, load_default_ddpm
    from winoq.diffusion.pretrained import ddpm_metadata

    m = load_default_ddpm()
    meta = ddpm_metadata()
    assert m.num_classes == 10 and meta["parameters"] == sum(p.numel() for p in m.parameters())
    assert default_ddpm_schedule().num_steps == meta["schedule"]["num_steps"]
    x = sample(m, default_ddpm_schedule(), [0, 1], steps=2, labels=[0, 7])
    assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all()


# ----------------------------------------------------------------------------- sharding
def test_shard_bounds():
    parts = [shard_bounds(7, 3, r) for r in range(3)]
    assert parts == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(1, 2, 1) == (1, 1)


def test_two_process_sharding_matches_one_process(sched):
    m = tiny_unet(num_classes=3)
    seeds, labels = [11, 12, 13, 14, 15], torch.tensor([0, 1, 2, 0, 1])
    kw = dict(shape=(1, 8, 8), steps=3)
    single = sample(m, sched, seeds, labels=labels, **kw)
    both = spawn_sharded(_shard_job, (m, sched, seeds, labels), world_size=2)
    torch.testing.assert_close(both["samples"], single, atol=2e-4, rtol=0)  # batches differ: round-off only
    assert torch.equal(both["samples_bs1"], sample(m, sched, seeds, labels=labels, batch_size=1, **kw))
    assert both["world"] == 2
    ref = M.eps_sqnr_per_timestep(m, both["q"], sched, seeds, steps=3, labels=labels, shape=(1, 8, 8))
    for t, v in both["sqnr"].items():
        assert v == pytest.approx(ref[t], abs=1e-3)  # energies summed over ranks; round-off only


def _shard_job(m, sched, seeds, labels):
    import torch.distributed as dist

    q = winoq.quantize(m, winoq.Recipe(winograd=None), progress=False)
    out = sharded_sample(m, sched, seeds, labels=labels, shape=(1, 8, 8), steps=3)
    out1 = sharded_sample(m, sched, seeds, labels=labels, shape=(1, 8, 8), steps=3, batch_size=1)
    sq = sharded_eps_sqnr(m, q, sched, seeds, labels=labels, steps=3, shape=(1, 8, 8))
    return {"samples": out, "samples_bs1": out1, "sqnr": sq, "world": dist.get_world_size(), "q": q}


# ----------------------------------------------------------------------------- diffusers
@pytest.fixture(scope="module")
def tiny_sd():
    from winoq.diffusion.diffusers_support import build_sd15_unet, tiny_sd_unet_config

    cfg = tiny_sd_unet_config(block_out_channels=(16, 32, 32, 32), cross_attention_dim=16, attention_head_dim=4)
    return build_sd15_unet(seed=0, **{k: v for k, v in cfg.items()})


@needs_diffusers
def test_sd15_config_written_out():
    from winoq.diffusion.diffusers_support import sd15_unet_config

    cfg = sd15_unet_config()
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280) and cfg["layers_per_block"] == 2
    assert cfg["cross_attention_dim"] == 768 and cfg["attention_head_dim"] == 8
    assert cfg["sample_size"] == 64 and cfg["in_channels"] == cfg["out_channels"] == 4
    with pytest.raises(ValueError, match="unknown"):
        sd15_unet_config(widths=3)


@needs_diffusers
def test_diffusers_validation(tiny_sd):
    from winoq.diffusion.diffusers_support import DiffusersEps, check_supported, validate_unet_input

    ctx = torch.randn(1, 3, 16)
    ok = torch.randn(2, 4, 16, 16)
    validate_unet_input(tiny_sd, ok, torch.tensor([1, 2]), ctx.expand(2, 3, 16))
    with pytest.raises(ValueError, match="4 latent channels, got 3"):
        validate_unet_input(tiny_sd, torch.randn(2, 3, 16, 16), 1, ctx.expand(2, 3, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        validate_unet_input(tiny_sd, torch.randn(1, 4, 12, 12), 1, ctx)
    with pytest.raises(ValueError, match="latent of shape"):
        validate_unet_input(tiny_sd, torch.randn(4, 16, 16), 1, ctx)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        validate_unet_input(tiny_sd, ok, 1, None)
    with pytest.raises(ValueError, match=r"\[N=2, L, 16\]"):
        validate_unet_input(tiny_sd, ok, 1, torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="UNet2DModel, UNet2DConditionModel"):
        check_supported(tiny_unet())
    eps = DiffusersEps(tiny_sd, ctx)
    with torch.no_grad():
        assert eps(ok, torch.tensor([5, 9])).shape == ok.shape


@needs_diffusers
def test_diffusers_quantize_and_local_load(tiny_sd, tmp_path, sched):
    from winoq.diffusion.diffusers_support import (DiffusersEps, build_unet2d, float_layers, load_diffusers_unet,
                                                   quantize_unet, time_embedding_linears, unet2d_config)

    q = quantize_unet(tiny_sd, winoq.Recipe(winograd=4, scales="standard"), progress=False)
    kinds = {}
    for r in q.winoq_report:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    assert kinds["winograd"] > 10 and kinds["linear"] > 10
    left = float_layers(q)
    assert set(left) <= {"GroupNorm", "LayerNorm"}, left
    assert "time_embedding.linear_1" in time_embedding_linears(tiny_sd)
    ctx = torch.randn(1, 3, 16)
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        ref, got = DiffusersEps(tiny_sd, ctx)(x, 10), DiffusersEps(q, ctx)(x, 10)
    assert torch.isfinite(got).all() and got.shape == ref.shape

    small = build_unet2d(unet2d_config(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                       up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    small.save_pretrained(tmp_path / "unet")
    back = load_diffusers_unet(tmp_path / "unet")
    assert type(back).__name__ == "UNet2DModel"
    for a, b in zip(small.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    xs = sample(DiffusersEps(back), sched, [0, 1], shape=(1, 8, 8), steps=2)
    assert xs.shape == (2, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="local"):
        load_diffusers_unet(tmp_path / "not-there")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="supported diffusers UNets"):
        load_diffusers_unet(tmp_path / "vae")
