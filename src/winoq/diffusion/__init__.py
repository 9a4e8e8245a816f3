"""Diffusion models: a small DDPM UNet, noise schedules, seeded DDPM/DDIM samplers with
classifier-free guidance, calibration inputs, sample-quality metrics (FD-proxy, PSNR,
SSIM, noise-prediction SQNR), diffusers UNet helpers and sharded generation."""
from .pretrained import ddpm_metadata, default_ddpm_schedule, load_default_ddpm
from .samplers import (CalibrationSet, calibration_inputs, ddim_sample, ddim_timesteps, ddpm_sample,
                       guided_eps, q_sample_calibration, sample)
from .schedule import NoiseSchedule, cosine_betas, linear_betas, make_schedule
from .unet import DDPMUNet, UNetConfig

__all__ = ["DDPMUNet", "UNetConfig", "NoiseSchedule", "linear_betas", "cosine_betas", "make_schedule",
           "sample", "ddim_sample", "ddpm_sample", "guided_eps", "ddim_timesteps", "CalibrationSet",
           "calibration_inputs", "q_sample_calibration", "load_default_ddpm", "default_ddpm_schedule",
           "ddpm_metadata"]
