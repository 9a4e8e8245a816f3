"""The committed Fashion-MNIST DDPM (``scripts/train_ddpm.py``): loader and metadata."""
from __future__ import annotations

import json
from importlib import resources

from .schedule import NoiseSchedule, make_schedule
from .unet import DDPMUNet, UNetConfig

__all__ = ["DDPM_WEIGHTS", "DDPM_METADATA", "DDPM_SAMPLES", "ddpm_metadata", "load_default_ddpm",
           "default_ddpm_schedule"]

DDPM_WEIGHTS = "ddpm_fmnist.safetensors"
DDPM_METADATA = "ddpm_fmnist.json"
DDPM_SAMPLES = "ddpm_fmnist_samples.png"


def _asset(name: str):
    return resources.files("winoq").joinpath("assets", name)


def ddpm_metadata() -> dict:
    """Training metadata of the committed DDPM (config, schedule, seed, steps, time, command, ...)."""
    res = _asset(DDPM_METADATA)
    if not res.is_file():
        raise FileNotFoundError(f"packaged metadata winoq/assets/{DDPM_METADATA} is missing; "
                                "reinstall winoq or run scripts/train_ddpm.py")
    return json.loads(res.read_text(encoding="utf-8"))


def default_ddpm_schedule() -> NoiseSchedule:
    """The noise schedule the committed DDPM was trained with."""
    sch = ddpm_metadata().get("schedule", {"kind": "linear", "num_steps": 1000})
    return make_schedule(sch.get("kind", "linear"), sch.get("num_steps", 1000))


def load_default_ddpm() -> DDPMUNet:
    """The committed class-conditional Fashion-MNIST DDPM UNet (EMA weights), in eval
    mode; data range [-1, 1], epsilon prediction, schedule: :func:`default_ddpm_schedule`."""
    from safetensors.torch import load as st_load

    res = _asset(DDPM_WEIGHTS)
    if not res.is_file():
        raise FileNotFoundError(f"packaged weights winoq/assets/{DDPM_WEIGHTS} are missing; "
                                "reinstall winoq or run scripts/train_ddpm.py")
    model = DDPMUNet(UNetConfig.from_dict(ddpm_metadata()["config"]))
    model.load_state_dict(st_load(res.read_bytes()), strict=True)
    return model.eval()
