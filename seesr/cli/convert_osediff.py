"""Convert the released OSEDiff checkpoint (``osediff.pkl``) + SD 2.1-base into an OSEDiffPipeline folder.

Inputs, unchanged as released: the SD 2.1-base folder in diffusers layout (or a hub id), ``osediff.pkl`` (read with
``torch.load(weights_only=True)`` and checked strictly, see :func:`seesr.models.onestep.read_osediff_checkpoint`),
and optionally the RAM / DAPE files for the prompt extractor (as ``seesr convert --seesr``). The scheduler is DDPM
from the SD folder, as the original ``OSEDiff_test``. The folder is written in safetensors, staged and renamed
into place; the LoRA stays as peft adapters (``onestep_lora.*`` next to the base weights) unless ``fuse_lora``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from seesr.dtypes import DTYPE_NAMES as DTYPES

from .convert import (
    ConversionError,
    DAPEFiles,
    _check_dape_files,
    _check_sd_folder,
    _dape_model,
    _stage_and_rename,
)

logger = logging.getLogger(__name__)


def convert_osediff(
    sd: str,
    osediff: str | Path,
    output_dir: str | Path,
    dape: DAPEFiles | None = None,
    dtype: str = "fp32",
    fuse_lora: bool = False,
    overwrite: bool = False,
) -> Path:
    """Build and save an OSEDiffPipeline folder from the released files; returns ``output_dir``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from pipelines.pipeline_osediff import OSEDiffPipeline

    from ..models.onestep import OSEDiffCheckpointError, load_osediff_checkpoint, read_osediff_checkpoint

    output_dir = Path(output_dir)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir}: already exists (pass --overwrite to replace it)")
    _check_sd_folder(sd)
    if dape is not None:
        _check_dape_files(dape)
    try:
        checkpoint = read_osediff_checkpoint(osediff)
        logger.info("loading Stable Diffusion components from %s", sd)
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(sd, subfolder="vae")
        load_osediff_checkpoint(checkpoint, unet, vae)
    except OSEDiffCheckpointError as error:
        raise ConversionError(str(error)) from None
    text_encoder = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(sd, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ConversionError(
            f"{sd}: the text encoder is {text_encoder.config.hidden_size} wide but the UNet expects "
            f"{unet.config.cross_attention_dim} (use the Stable Diffusion 2.1 base model OSEDiff was trained on)"
        )
    prompt_extractor = _dape_model(dape) if dape is not None else None
    torch_dtype = getattr(torch, DTYPES[dtype])
    for model in (unet, vae, text_encoder):
        model.to(dtype=torch_dtype)
    pipe = OSEDiffPipeline(
        vae, text_encoder, tokenizer, unet, scheduler, prompt_extractor=prompt_extractor, fuse_lora=fuse_lora
    )
    _stage_and_rename(output_dir, lambda folder: pipe.save_pretrained(folder, safe_serialization=True))
    logger.info("wrote %s", output_dir)
    return output_dir
