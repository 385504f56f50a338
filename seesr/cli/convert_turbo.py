"""SeeSR-Turbo: the SD-Turbo UNet with SeeSR's RCA weights, as the original ``test_seesr_turbo.py`` assembles it.

The original (``from_pretrained_orig``) builds the UNet from the SD-Turbo ``unet/config.json`` with RCA added, loads
the SD-Turbo weights, overwrites every SeeSR UNet key containing ``image_attentions`` and loads with
``strict=False``. Here every key is accounted for: each stock key comes from the SD-Turbo UNet, each RCA key from
SeeSR, SeeSR's other (Stable Diffusion) keys are ignored on purpose and counted; a key missing from both, an
unexpected key or a shape mismatch is an error naming it. The ControlNet comes from SeeSR; VAE, text encoder and
tokenizer from SD-Turbo; the scheduler is a ``DDPMScheduler`` built from SD-Turbo's scheduler config (its
"trailing" spacing gives timesteps [999, 499] for 2 steps). The folder stores turbo's defaults: 2 steps,
guidance 1 (no classifier-free guidance, no negative prompt), LR-latent start at t=999, latent tile overlap 32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seesr.dtypes import DTYPE_NAMES as DTYPES

from .convert import (
    ConversionError,
    DAPEFiles,
    _check_dape_files,
    _check_seesr_folder,
    _dape_model,
    _require,
    _stage_and_rename,
    check_replaceable,
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


def _check_turbo_folder(sd_turbo: str) -> None:
    path = Path(sd_turbo)
    if not path.exists():
        if sd_turbo.count("/") == 1 and not sd_turbo.startswith((".", "/")):
            return  # a hub id (e.g. stabilityai/sd-turbo): diffusers resolves it
        raise ConversionError(
            f"{sd_turbo}: SD-Turbo folder not found (a local path or a hub id such as stabilityai/sd-turbo)"
        )
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        _require(path / name, f"the SD-Turbo {name}/ folder")


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


def convert_seesr_turbo(
    sd_turbo: str,
    seesr_dir: str | Path,
    output_dir: str | Path,
    dape: DAPEFiles | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Build and save a SeeSR-Turbo SeeSRPipeline folder (turbo's scheduler and defaults); returns ``output_dir``."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel

    from pipelines.pipeline_seesr import SeeSRPipeline
    from seesr.models.controlnet import SeeSRControlNetModel

    seesr_dir, output_dir = Path(seesr_dir), Path(output_dir)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    check_replaceable(output_dir, overwrite)
    _check_turbo_folder(sd_turbo)
    _check_seesr_folder(seesr_dir)
    if dape is not None:
        _check_dape_files(dape)
    torch_dtype = getattr(torch, DTYPES[dtype])

    unet, _ = assemble_turbo_unet(sd_turbo, seesr_dir, torch_dtype)
    controlnet = SeeSRControlNetModel.from_pretrained(seesr_dir / "controlnet", torch_dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(sd_turbo, subfolder="vae", torch_dtype=torch_dtype)
    text_encoder = CLIPTextModel.from_pretrained(sd_turbo, subfolder="text_encoder", torch_dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(sd_turbo, subfolder="tokenizer")
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ConversionError(
            f"{sd_turbo}: the text encoder is {text_encoder.config.hidden_size} wide but the UNet expects "
            f"{unet.config.cross_attention_dim}"
        )
    if controlnet.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ConversionError(
            f"{seesr_dir / 'controlnet'}: cross_attention_dim {controlnet.config.cross_attention_dim} does not match "
            f"the SD-Turbo UNet's {unet.config.cross_attention_dim}"
        )
    prompt_extractor = None
    if dape is not None:
        prompt_extractor = _dape_model(dape)
        width = prompt_extractor.image_proj.out_features
        if width != unet.config.image_cross_attention_dim:
            raise ConversionError(
                f"{dape.ram}: DAPE tokens are {width} wide, the UNet expects {unet.config.image_cross_attention_dim}"
            )
    pipe = SeeSRPipeline(
        vae,
        text_encoder,
        tokenizer,
        unet,
        controlnet,
        turbo_scheduler(sd_turbo),
        prompt_extractor=prompt_extractor,
        sampling_defaults=TURBO_SAMPLING_DEFAULTS,
        model_kind=TURBO_MODEL_KIND,
    )
    _stage_and_rename(output_dir, lambda folder: pipe.save_pretrained(folder, safe_serialization=True))
    logger.info("wrote %s (SeeSR-Turbo)", output_dir)
    return output_dir
