"""Checks, loading and writing shared by the converters (``seesr convert``: SeeSR, SeeSR-Turbo, OSEDiff, DAPE).

Every converter checks its inputs (:func:`check_inputs`) before it loads anything, loads the SD parts with
:func:`load_text_and_vae`, DAPE with :func:`prompt_extractor_of`, and writes with :func:`save_folder` (staged, never
half-written). Errors are :class:`ConversionError` with a one-line message naming the input.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seesr.cli_options import dtype as dtype_name
from seesr.dtypes import torch_dtype as to_torch_dtype

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """A released file is missing or does not match what the converter expects."""


@dataclass
class DAPEFiles:
    """The released RAM/DAPE files; ``architecture`` overrides DAPEModel config fields (default: the release)."""

    ram: Path
    dape: Path | None
    tag_list: Path
    thresholds: Path
    architecture: dict | None = None


def require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConversionError(f"{path}: {what} not found")
    return path


def check_dape_files(dape: DAPEFiles) -> None:
    for path, what in ((dape.ram, "RAM checkpoint"), (dape.tag_list, "RAM tag list"), (dape.thresholds, "thresholds")):
        require_file(path, what)
    if dape.dape is not None:
        require_file(dape.dape, "DAPE checkpoint")


def dape_model(dape: DAPEFiles):
    """The converted, merged float32 DAPEModel."""
    import torch

    from dape.convert import convert_ram_checkpoint

    logger.info("converting RAM %s + DAPE %s", dape.ram, dape.dape)
    return convert_ram_checkpoint(
        dape.ram, dape.dape, dape.tag_list, dape.thresholds, architecture=dape.architecture, dtype=torch.float32
    )


def prompt_extractor_of(dape: DAPEFiles | None, unet: Any = None, unet_name: str = "UNet"):
    """The DAPE prompt extractor (None without DAPE files); with ``unet``, its tokens must fit the UNet's RCA."""
    if dape is None:
        return None
    model = dape_model(dape)
    width = model.image_proj.out_features
    expected = None if unet is None else unet.config.image_cross_attention_dim
    if expected is not None and width != expected:
        raise ConversionError(f"{dape.ram}: DAPE tokens are {width} wide, the {unet_name} expects {expected}")
    return model


def check_sd_folder(
    sd: str,
    kind: str = "Stable Diffusion",
    example: str = "stabilityai/stable-diffusion-2-base",
    subfolders: tuple[str, ...] = ("vae", "text_encoder", "tokenizer", "scheduler"),
) -> None:
    """A diffusers folder of ``kind`` with ``subfolders`` (or a hub id such as ``example``, not checked here)."""
    path = Path(sd)
    if not path.exists():
        if sd.count("/") == 1 and not sd.startswith((".", "/")):
            return  # a hub id: diffusers resolves it (and reports what is missing)
        raise ConversionError(f"{sd}: {kind} folder not found (a local path or a hub id such as {example})")
    for name in subfolders:
        require_file(path / name, f"the {kind} {name}/ folder")


def check_inputs(
    output_dir: Path, dtype: str, overwrite: bool, dape: DAPEFiles | None, *folder_checks: Callable[[], None]
) -> Any:
    """The checks every converter makes before it loads anything; returns the torch dtype of ``dtype``."""
    try:
        dtype = dtype_name(dtype)
    except argparse.ArgumentTypeError as error:
        raise ConversionError(f"dtype: {error}") from None
    check_replaceable(output_dir, overwrite)
    for check in folder_checks:
        check()
    if dape is not None:
        check_dape_files(dape)
    return to_torch_dtype(dtype)


def load_text_and_vae(source: str, torch_dtype: Any, unet: Any, unet_name: str, hint: str = "") -> tuple:
    """(vae, text_encoder, tokenizer) of the diffusers folder or hub id ``source`` (``torch_dtype`` None: as saved);
    the text encoder must be as wide as ``unet``'s cross-attention (else an error naming ``unet_name``, + ``hint``)."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel

    dtype_kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **dtype_kwargs)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **dtype_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
    width, expected = text_encoder.config.hidden_size, unet.config.cross_attention_dim
    if width != expected:
        raise ConversionError(
            f"{source}: the text encoder is {width} wide but the {unet_name} expects {expected}" + hint
        )
    return vae, text_encoder, tokenizer


def check_replaceable(output_dir: Path, overwrite: bool) -> None:
    """Refuse an existing ``output_dir`` unless ``overwrite`` and it is empty or a saved model / pipeline folder."""
    if not output_dir.exists():
        return
    if not overwrite:
        raise ConversionError(f"{output_dir}: already exists (pass --overwrite to replace it)")
    if not output_dir.is_dir():
        raise ConversionError(f"{output_dir}: exists and is not a folder; refusing to replace it")
    if any(output_dir.iterdir()) and not any((output_dir / n).is_file() for n in ("model_index.json", "config.json")):
        raise ConversionError(
            f"{output_dir}: --overwrite replaces only an empty folder or a saved pipeline/model folder "
            "(model_index.json or config.json); this one holds other files, refusing to delete it"
        )


def save_folder(model: Any, output_dir: Path) -> None:
    """``model.save_pretrained`` (safetensors) into a temporary sibling of ``output_dir``, then swapped into place
    (never half-written)."""
    from seesr.staging import write_folder

    write_folder(output_dir, lambda folder: model.save_pretrained(folder, safe_serialization=True))
