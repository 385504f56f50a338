"""Convert the released SeeSR (and DAPE/RAM) weights into one SeeSRPipeline folder (safetensors).

Inputs, unchanged as released:
- a Stable Diffusion 2 base folder in diffusers layout (vae/, text_encoder/, tokenizer/, scheduler/), or a hub id;
- the SeeSR folder with unet/ and controlnet/ (config.json with "use_image_cross_attention": true);
- optionally DAPE: ram_swin_large_14m.pth + DAPE.pth + ram_tag_list.txt + ram_tag_list_threshold.txt.
The scheduler is DDPM with the SD2 scheduler config, as the original ``test_seesr.py``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from seesr.dtypes import DTYPE_NAMES
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


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConversionError(f"{path}: {what} not found")
    return path


def _check_seesr_folder(seesr_dir: Path) -> None:
    import json

    for name in ("unet", "controlnet"):
        config = _require(seesr_dir / name / "config.json", f"the SeeSR {name} config")
        weights = [seesr_dir / name / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
        if not any(w.exists() for w in weights):
            raise ConversionError(f"{seesr_dir / name}: no diffusion_pytorch_model.safetensors or .bin")
        try:
            fields = json.loads(config.read_text())
        except json.JSONDecodeError as error:
            raise ConversionError(f"{config}: not valid JSON ({error})") from None
        if not fields.get("use_image_cross_attention"):
            raise ConversionError(f'{config}: not a SeeSR {name} (no "use_image_cross_attention": true)')


def _check_dape_files(dape: DAPEFiles) -> None:
    for path, what in ((dape.ram, "RAM checkpoint"), (dape.tag_list, "RAM tag list"), (dape.thresholds, "thresholds")):
        _require(path, what)
    if dape.dape is not None:
        _require(dape.dape, "DAPE checkpoint")


def _dape_model(dape: DAPEFiles):
    """The converted, merged float32 DAPEModel."""
    import torch

    from dape.convert import convert_ram_checkpoint

    logger.info("converting RAM %s + DAPE %s", dape.ram, dape.dape)
    return convert_ram_checkpoint(
        dape.ram, dape.dape, dape.tag_list, dape.thresholds, architecture=dape.architecture, dtype=torch.float32
    )


def _check_sd_folder(sd: str) -> None:
    path = Path(sd)
    if not path.exists():
        if sd.count("/") == 1 and not sd.startswith((".", "/")):
            return  # a hub id: diffusers resolves it (and reports what is missing)
        raise ConversionError(
            f"{sd}: Stable Diffusion folder not found (a local path or a hub id such as "
            "stabilityai/stable-diffusion-2-base)"
        )
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        _require(path / name, f"the Stable Diffusion {name}/ folder")


def convert_seesr(
    sd: str,
    seesr_dir: str | Path,
    output_dir: str | Path,
    dape: DAPEFiles | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Build and save a SeeSRPipeline folder from the released files; returns ``output_dir``.

    The folder is written to a temporary sibling and renamed into place, so a failure leaves nothing behind.
    """
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModel

    from pipelines.pipeline_seesr import SeeSRPipeline
    from seesr.models.controlnet import SeeSRControlNetModel
    from seesr.models.unet import SeeSRUNet2DConditionModel

    seesr_dir, output_dir = Path(seesr_dir), Path(output_dir)
    if dtype not in DTYPE_NAMES:
        raise ConversionError(f"dtype: expected one of {list(DTYPE_NAMES)}, got {dtype!r}")
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir}: already exists (pass --overwrite to replace it)")
    _check_sd_folder(sd)
    _check_seesr_folder(seesr_dir)
    if dape is not None:
        _check_dape_files(dape)

    torch_dtype = to_torch_dtype(dtype)
    logger.info("loading the SeeSR unet and controlnet from %s", seesr_dir)
    unet = SeeSRUNet2DConditionModel.from_pretrained(seesr_dir / "unet", torch_dtype=torch_dtype)
    controlnet = SeeSRControlNetModel.from_pretrained(seesr_dir / "controlnet", torch_dtype=torch_dtype)
    logger.info("loading Stable Diffusion components from %s", sd)
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae", torch_dtype=torch_dtype)
    text_encoder = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", torch_dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(sd, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ConversionError(
            f"{sd}: the text encoder is {text_encoder.config.hidden_size} wide but the SeeSR UNet expects "
            f"{unet.config.cross_attention_dim} (use the Stable Diffusion 2 base model SeeSR was trained on)"
        )
    prompt_extractor = None
    if dape is not None:
        prompt_extractor = _dape_model(dape)
        width = prompt_extractor.image_proj.out_features
        if width != unet.config.image_cross_attention_dim:
            raise ConversionError(
                f"{dape.ram}: DAPE tokens are {width} wide, the SeeSR UNet expects "
                f"{unet.config.image_cross_attention_dim}"
            )

    pipe = SeeSRPipeline(vae, text_encoder, tokenizer, unet, controlnet, scheduler, prompt_extractor=prompt_extractor)
    _stage_and_rename(output_dir, lambda folder: pipe.save_pretrained(folder, safe_serialization=True))
    logger.info("wrote %s", output_dir)
    return output_dir


def _stage_and_rename(output_dir: Path, write) -> None:
    """``write(folder)`` into a temporary sibling of ``output_dir``, then rename it into place (never half-written)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert_dape(dape: DAPEFiles, output_dir: str | Path, overwrite: bool = False) -> Path:
    """A standalone DAPEModel folder (float32 safetensors) from the released RAM (+ DAPE) files, e.g. for
    ``train_dape.py``'s ``dape_model`` (plain RAM, no DAPE.pth) or ``seesr tag``."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir}: already exists (pass --overwrite to replace it)")
    _check_dape_files(dape)
    model = _dape_model(dape)
    _stage_and_rename(output_dir, lambda folder: model.save_pretrained(folder, safe_serialization=True))
    logger.info("wrote %s (%d tags)", output_dir, model.num_classes)
    return output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sd", help="Stable Diffusion 2 base: diffusers folder or hub id")
    parser.add_argument("--seesr", type=Path, help="released SeeSR folder with unet/ and controlnet/")
    parser.add_argument("--osediff", type=Path, help="released OSEDiff osediff.pkl (with --sd: an OSEDiff folder)")
    parser.add_argument("--fuse-lora", action="store_true", help="OSEDiff: save the LoRA merged into the weights")
    parser.add_argument("-o", "--output-dir", required=True, type=Path, help="pipeline folder to write")
    parser.add_argument("--ram", type=Path, help="ram_swin_large_14m.pth (adds the DAPE prompt extractor)")
    parser.add_argument("--dape", type=Path, help="DAPE.pth (LoRA weights; without it plain RAM is used)")
    parser.add_argument("--tag-list", type=Path, help="ram_tag_list.txt")
    parser.add_argument("--tag-thresholds", type=Path, help="ram_tag_list_threshold.txt")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    dape = None
    dape_args = {"--ram": args.ram, "--tag-list": args.tag_list, "--tag-thresholds": args.tag_thresholds}
    if any(v is not None for v in [*dape_args.values(), args.dape]):
        missing = [name for name, value in dape_args.items() if value is None]
        if missing:
            logger.error("DAPE conversion needs %s as well", ", ".join(missing))
            return 2
        dape = DAPEFiles(args.ram, args.dape, args.tag_list, args.tag_thresholds)
    if args.osediff is not None:
        return _run_osediff(args, dape)
    if (args.sd is None) != (args.seesr is None) or (args.sd is None and dape is None):
        logger.error("give --sd and --seesr (a SeeSR pipeline folder), --ram ... alone (a DAPE folder), or both")
        return 2
    try:
        if args.sd is None:
            convert_dape(dape, args.output_dir, overwrite=args.overwrite)
        else:
            convert_seesr(args.sd, args.seesr, args.output_dir, dape=dape, dtype=args.dtype, overwrite=args.overwrite)
    except (ConversionError, ValueError, OSError) as error:
        logger.error("%s", str(error).splitlines()[0] if str(error) else type(error).__name__)
        return 1
    return 0


def _run_osediff(args: argparse.Namespace, dape: DAPEFiles | None) -> int:
    from .convert_osediff import convert_osediff

    if args.sd is None or args.seesr is not None:
        logger.error("--osediff needs --sd (Stable Diffusion 2.1 base) and no --seesr")
        return 2
    try:
        convert_osediff(
            args.sd,
            args.osediff,
            args.output_dir,
            dape,
            args.dtype,
            fuse_lora=args.fuse_lora,
            overwrite=args.overwrite,
        )
    except (ConversionError, ValueError, OSError) as error:
        logger.error("%s", str(error).splitlines()[0] if str(error) else type(error).__name__)
        return 1
    return 0
