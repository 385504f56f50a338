"""SeeSR-Turbo: the SD-Turbo UNet with SeeSR's RCA weights, as the original ``test_seesr_turbo.py`` assembles it.

The original (``from_pretrained_orig``) builds the UNet from the SD-Turbo ``unet/config.json`` with RCA added, loads
the SD-Turbo weights, overwrites every SeeSR UNet key containing ``image_attentions`` and loads with
``strict=False``. Here every key is accounted for: each stock key comes from the SD-Turbo UNet, each RCA key from
SeeSR, SeeSR's other (Stable Diffusion) keys are ignored on purpose and counted; a key missing from both, an
unexpected key or a shape mismatch is an error naming it. The ControlNet comes from SeeSR; VAE, text encoder and
tokenizer from SD-Turbo; the scheduler is a ``DDPMScheduler`` built from SD-Turbo's scheduler config (its
"trailing" spacing gives timesteps [999, 499] for 2 steps). The folder stores turbo's defaults: 2 steps,
guidance 1 (no classifier-free guidance, no negative prompt), LR-latent start at t=999, latent tile overlap 32.
``seesr.cli.convert.convert_seesr(..., turbo=True)`` writes the folder from these parts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .convert_common import (
    ConversionError,
    check_sd_folder,
)

logger = logging.getLogger(__name__)

#: The original turbo script's defaults, stored in the converted folder (SeeSRPipeline ``sampling_defaults``).
TURBO_SAMPLING_DEFAULTS = {"num_inference_steps": 2, "guidance_scale": 1.0, "latent_tile_overlap": 32}
TURBO_MODEL_KIND = "seesr-turbo"


@dataclass
class TurboUNetReport:
    """Where each tensor of the assembled UNet came from."""

    from_turbo: int
    from_seesr: int
    seesr_ignored: int


def check_turbo_folder(sd_turbo: str) -> None:
    """An SD-Turbo diffusers folder (or a hub id such as stabilityai/sd-turbo), before anything loads."""
    check_sd_folder(
        sd_turbo, "SD-Turbo", "stabilityai/sd-turbo", ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    )


def _read_state_dict(folder: Path) -> dict[str, Any]:
    """A released model folder's weights, loaded safely (safetensors, or torch.load with weights_only=True)."""
    import torch
    from safetensors.torch import load_file

    safetensors = folder / "diffusion_pytorch_model.safetensors"
    if safetensors.exists():
        return load_file(str(safetensors))
    return torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)


def _shown(keys: list[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")


def assemble_turbo_unet(sd_turbo: str, seesr_dir: str | Path, torch_dtype=None):
    """(SeeSRUNet2DConditionModel, TurboUNetReport): the SD-Turbo UNet plus SeeSR's RCA weights, every key checked."""
    import torch
    from diffusers import UNet2DConditionModel

    from seesr.models.rca import RCA_MODULE_NAME
    from seesr.models.unet import SeeSRUNet2DConditionModel, check_loading_info

    seesr_dir = Path(seesr_dir)
    turbo, info = UNet2DConditionModel.from_pretrained(
        sd_turbo, subfolder="unet", torch_dtype=torch.float32, output_loading_info=True
    )
    check_loading_info(info, "SD-Turbo UNet", f"{sd_turbo}/unet")
    turbo_state = turbo.state_dict()
    rca_marker = f".{RCA_MODULE_NAME}."
    in_turbo = [k for k in turbo_state if rca_marker in k]
    if in_turbo:
        raise ConversionError(f"{sd_turbo}/unet: an SD-Turbo UNet has no RCA weights, found {_shown(in_turbo)}")

    seesr_config = SeeSRUNet2DConditionModel.load_config(seesr_dir / "unet")
    config = {k: v for k, v in turbo.config.items() if not k.startswith("_")}
    config.update(
        use_image_cross_attention=True,
        image_cross_attention_dim=seesr_config.get("image_cross_attention_dim", 512),
    )
    del turbo
    model = SeeSRUNet2DConditionModel.from_config(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}

    seesr_state = _read_state_dict(seesr_dir / "unet")
    rca = {k: v for k, v in seesr_state.items() if rca_marker in k}
    others = [k for k in seesr_state if rca_marker not in k]
    problems = []
    unknown_seesr = [k for k in others if k not in expected]
    if unknown_seesr:
        problems.append(f"SeeSR UNet keys that are neither RCA nor Stable Diffusion keys: {_shown(unknown_seesr)}")
    unexpected_rca = [k for k in rca if k not in expected]
    if unexpected_rca:
        problems.append(f"SeeSR RCA keys the SD-Turbo architecture has no place for: {_shown(unexpected_rca)}")
    missing = [k for k in expected if k not in turbo_state and k not in rca]
    if missing:
        problems.append(f"keys in neither the SD-Turbo nor the SeeSR RCA weights: {_shown(missing)}")
    combined = {**turbo_state, **rca}
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k])}"
        for k, v in combined.items()
        if k in expected and tuple(v.shape) != tuple(expected[k])
    ]
    if mismatched:
        problems.append(f"shape mismatches (weights vs SD-Turbo architecture): {_shown(mismatched)}")
    if problems:
        raise ConversionError(f"{seesr_dir / 'unet'} + {sd_turbo}/unet: " + "; ".join(problems))
    model.load_state_dict(combined, strict=True)
    if torch_dtype is not None:
        model = torch.nn.Module.to(model, dtype=torch_dtype)
    report = TurboUNetReport(from_turbo=len(turbo_state), from_seesr=len(rca), seesr_ignored=len(others))
    logger.info(
        "turbo UNet: %d tensors from SD-Turbo, %d RCA tensors from SeeSR, %d other SeeSR tensors ignored (as the "
        "original)",
        report.from_turbo,
        report.from_seesr,
        report.seesr_ignored,
    )
    return model.eval(), report


def turbo_scheduler(sd_turbo: str):
    """A ``DDPMScheduler`` from SD-Turbo's (Euler, "trailing") scheduler config, as the original turbo script."""
    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(sd_turbo, subfolder="scheduler")
    return DDPMScheduler.from_config(config)
