"""Convert the released OSEDiff checkpoint (``osediff.pkl``) + SD 2.1-base into an OSEDiffPipeline folder.

Inputs, unchanged as released: the SD 2.1-base folder in diffusers layout (or a hub id), ``osediff.pkl`` (read with
``torch.load(weights_only=True)`` and checked strictly, see :func:`seesr.models.onestep.read_osediff_checkpoint`),
and optionally the RAM / DAPE files for the prompt extractor (as ``seesr convert --seesr``). The scheduler is DDPM
from the SD folder, as the original ``OSEDiff_test``. The folder is written in safetensors, staged and renamed
into place; the LoRA stays as peft adapters (``onestep_lora.*`` next to the base weights) unless ``fuse_lora``.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from .convert_common import (
    ConversionError,
    DAPEFiles,
    check_inputs,
    check_sd_folder,
    load_text_and_vae,
    prompt_extractor_of,
    save_folder,
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
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pipelines.pipeline_osediff import OSEDiffPipeline

    from ..models.onestep import OSEDiffCheckpointError, load_osediff_checkpoint, read_osediff_checkpoint

    output_dir = Path(output_dir)
    torch_dtype = check_inputs(output_dir, dtype, overwrite, dape, partial(check_sd_folder, sd))
    try:
        checkpoint = read_osediff_checkpoint(osediff)
        logger.info("loading Stable Diffusion components from %s", sd)
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
        hint = " (use the Stable Diffusion 2.1 base model OSEDiff was trained on)"
        vae, text_encoder, tokenizer = load_text_and_vae(sd, None, unet, "UNet", hint)  # float32: LoRA loads first
        load_osediff_checkpoint(checkpoint, unet, vae)
    except OSEDiffCheckpointError as error:
        raise ConversionError(str(error)) from None
    scheduler = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    prompt_extractor = prompt_extractor_of(dape)
    for model in (unet, vae, text_encoder):
        model.to(dtype=torch_dtype)
    pipe = OSEDiffPipeline(
        vae, text_encoder, tokenizer, unet, scheduler, prompt_extractor=prompt_extractor, fuse_lora=fuse_lora
    )
    save_folder(pipe, output_dir)
    logger.info("wrote %s", output_dir)
    return output_dir
