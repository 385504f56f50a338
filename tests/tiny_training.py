"""Tiny on-disk inputs for the training tests: an SD2-layout model folder, a DAPE folder and HR images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tiny import SD2_SCHEDULER, tiny_text_encoder, tiny_tokenizer, tiny_unet_config, tiny_vae
from tiny_dape import tiny_dape

ROOT = Path(__file__).resolve().parents[1]
#: the environment of the `accelerate launch` / script runs: one thread each, offline, this checkout first
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def launch_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` (one CPU process, no mixed precision) of the checkout's ``script`` with ``args``."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1",
              "--mixed_precision=no", "--dynamo_backend=no", "--cpu"]  # fmt: skip
    command = [*launch, str(ROOT / script), *args]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240)


def config_error_test(config_class: type, path: Path, cases: list[tuple[list[str], str]]):
    """A test (assign it to a ``test_*`` name) that each ``(overrides, match)`` case fails when the config loads,
    with a ``ValueError`` / ``ConfigError`` matching ``match``."""
    import pytest

    from seesr.training.config import ConfigError, load_config

    @pytest.mark.parametrize(("items", "match"), cases)
    def test(items: list[str], match: str) -> None:
        with pytest.raises((ValueError, ConfigError), match=match):
            load_config(config_class, path, items)

    return test


def write_sd2_folder(path: Path, prediction_type: str = "epsilon") -> Path:
    """A Stable-Diffusion-2-layout folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) of tiny stock models."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    config = {k: v for k, v in tiny_unet_config().items() if k not in ("use_image_cross_attention",
                                                                       "image_cross_attention_dim")}  # fmt: skip
    UNet2DConditionModel.from_config(config).save_pretrained(path / "unet")
    tiny_vae().save_pretrained(path / "vae")
    tiny_text_encoder().save_pretrained(path / "text_encoder")
    tiny_tokenizer().save_pretrained(path / "tokenizer")
    scheduler_config = {**SD2_SCHEDULER, "prediction_type": prediction_type}
    DDPMScheduler.from_config(scheduler_config).save_pretrained(path / "scheduler")
    return path


def write_dape_folder(path: Path) -> Path:
    tiny_dape().save_pretrained(path)
    return path


def write_images(path: Path, count: int = 3, size: int = 40, tagged: int = 1) -> Path:
    """``count`` smooth random RGB PNGs (``size`` px, smaller than some crops); the first ``tagged`` get a tag file."""
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        small = torch.rand(1, 3, size // 4, size // 4, generator=generator)
        image = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")[0]
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(path / f"img{i}.png")
        if i < tagged:
            (path / f"img{i}.txt").write_text("dog, grass")
    return path


def write_lq_image(path: Path, size: int = 16) -> Path:
    generator = torch.Generator().manual_seed(1)
    array = (torch.rand(size, size, 3, generator=generator).numpy() * 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path
