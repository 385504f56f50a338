"""Convert the released SeeSR (and DAPE/RAM) weights into one SeeSRPipeline folder (safetensors).

Inputs, unchanged as released:
- a Stable Diffusion 2 base folder in diffusers layout (vae/, text_encoder/, tokenizer/, scheduler/), or a hub id;
- the SeeSR folder with unet/ and controlnet/ (config.json with "use_image_cross_attention": true);
- optionally DAPE: ram_swin_large_14m.pth + DAPE.pth + ram_tag_list.txt + ram_tag_list_threshold.txt.
The scheduler is DDPM with the SD2 scheduler config, as the original ``test_seesr.py``.
With ``--sd-turbo`` (instead of ``--sd``) it writes a SeeSR-Turbo folder instead (``convert_seesr(turbo=True)``, the
UNet assembly in ``seesr.cli.convert_turbo``).
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

from seesr.cli_options import add_dtype, add_output, add_overwrite

from .convert_common import (
    ConversionError,
    DAPEFiles,
    check_dape_files,
    check_inputs,
    check_replaceable,
    check_sd_folder,
    dape_model,
    load_text_and_vae,
    prompt_extractor_of,
    require_file,
    save_folder,
)

logger = logging.getLogger(__name__)


def _check_seesr_folder(seesr_dir: Path) -> None:
    import json

    for name in ("unet", "controlnet"):
        config = require_file(seesr_dir / name / "config.json", f"the SeeSR {name} config")
        weights = [seesr_dir / name / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
        if not any(w.exists() for w in weights):
            raise ConversionError(f"{seesr_dir / name}: no diffusion_pytorch_model.safetensors or .bin")
        try:
            fields = json.loads(config.read_text())
        except json.JSONDecodeError as error:
            raise ConversionError(f"{config}: not valid JSON ({error})") from None
        if not fields.get("use_image_cross_attention"):
            raise ConversionError(f'{config}: not a SeeSR {name} (no "use_image_cross_attention": true)')


def convert_seesr(
    sd: str,
    seesr_dir: str | Path,
    output_dir: str | Path,
    dape: DAPEFiles | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
    turbo: bool = False,
) -> Path:
    """Build and save a SeeSRPipeline folder from the released files; returns ``output_dir``.

    With ``turbo``, ``sd`` is an SD-Turbo folder (or hub id) and the folder is SeeSR-Turbo: the SD-Turbo UNet with
    SeeSR's RCA weights, turbo's scheduler and sampling defaults (see :mod:`seesr.cli.convert_turbo`).
    The folder is written to a temporary sibling and renamed into place, so a failure leaves nothing behind.
    """
    from diffusers import DDPMScheduler

    from pipelines.pipeline_seesr import SeeSRPipeline
    from seesr.models.controlnet import SeeSRControlNetModel
    from seesr.models.unet import SeeSRUNet2DConditionModel

    from . import convert_turbo

    seesr_dir, output_dir = Path(seesr_dir), Path(output_dir)
    check_base = partial(convert_turbo.check_turbo_folder if turbo else check_sd_folder, sd)
    torch_dtype = check_inputs(output_dir, dtype, overwrite, dape, check_base, partial(_check_seesr_folder, seesr_dir))
    variant = {}
    if turbo:
        unet, _ = convert_turbo.assemble_turbo_unet(sd, seesr_dir, torch_dtype)
        scheduler = convert_turbo.turbo_scheduler(sd)
        variant = {
            "sampling_defaults": convert_turbo.TURBO_SAMPLING_DEFAULTS,
            "model_kind": convert_turbo.TURBO_MODEL_KIND,
        }
    else:
        logger.info("loading the SeeSR unet from %s", seesr_dir)
        unet = SeeSRUNet2DConditionModel.from_pretrained(seesr_dir / "unet", torch_dtype=torch_dtype)
        scheduler = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    controlnet = SeeSRControlNetModel.from_pretrained(seesr_dir / "controlnet", torch_dtype=torch_dtype)
    if controlnet.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ConversionError(
            f"{seesr_dir / 'controlnet'}: cross_attention_dim {controlnet.config.cross_attention_dim} does not match "
            f"the {'SD-Turbo ' if turbo else ''}UNet's {unet.config.cross_attention_dim}"
        )
    logger.info("loading the VAE and text encoder from %s", sd)
    hint = "" if turbo else " (use the Stable Diffusion 2 base model SeeSR was trained on)"
    vae, text_encoder, tokenizer = load_text_and_vae(sd, torch_dtype, unet, "UNet", hint)
    prompt_extractor = prompt_extractor_of(dape, unet, "UNet")
    pipe = SeeSRPipeline(
        vae, text_encoder, tokenizer, unet, controlnet, scheduler, prompt_extractor=prompt_extractor, **variant
    )
    save_folder(pipe, output_dir)
    logger.info("wrote %s%s", output_dir, " (SeeSR-Turbo)" if turbo else "")
    return output_dir


def convert_dape(dape: DAPEFiles, output_dir: str | Path, overwrite: bool = False) -> Path:
    """A standalone DAPEModel folder (float32 safetensors) from the released RAM (+ DAPE) files, e.g. for
    ``train_dape.py``'s ``dape_model`` (plain RAM, no DAPE.pth) or ``seesr tag``."""
    output_dir = Path(output_dir)
    check_replaceable(output_dir, overwrite)
    check_dape_files(dape)
    model = dape_model(dape)
    save_folder(model, output_dir)
    logger.info("wrote %s (%d tags)", output_dir, model.num_classes)
    return output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    inputs = parser.add_argument_group("released files")
    inputs.add_argument("--sd", help="Stable Diffusion 2 base: diffusers folder or hub id")
    inputs.add_argument("--seesr", type=Path, help="released SeeSR folder with unet/ and controlnet/")
    inputs.add_argument(
        "--sd-turbo",
        help="SD-Turbo folder or hub id (instead of --sd): writes a SeeSR-Turbo folder (2 steps, no CFG)",
    )
    inputs.add_argument("--osediff", type=Path, help="released OSEDiff osediff.pkl (with --sd: an OSEDiff folder)")
    inputs.add_argument("--ram", type=Path, help="ram_swin_large_14m.pth (adds the DAPE prompt extractor)")
    inputs.add_argument("--dape", type=Path, help="DAPE.pth (LoRA weights; without it plain RAM is used)")
    inputs.add_argument("--tag-list", type=Path, help="ram_tag_list.txt")
    inputs.add_argument("--tag-thresholds", type=Path, help="ram_tag_list_threshold.txt")
    output = parser.add_argument_group("output")
    add_output(output, "pipeline (or DAPE) folder to write", aliases=("--output-dir",))
    add_dtype(output, help="dtype of the saved weights")
    output.add_argument("--fuse-lora", action="store_true", help="OSEDiff: save the LoRA merged into the weights")
    add_overwrite(output, "replace an existing output folder (only an empty one or a saved pipeline/model folder)")


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
    sd_turbo = getattr(args, "sd_turbo", None)
    if sd_turbo is not None and (args.sd is not None or args.seesr is None):
        logger.error("--sd-turbo needs --seesr and replaces --sd (a SeeSR-Turbo pipeline folder)")
        return 2
    if sd_turbo is None and ((args.sd is None) != (args.seesr is None) or (args.sd is None and dape is None)):
        logger.error("give --sd and --seesr (a SeeSR pipeline folder), --ram ... alone (a DAPE folder), or both")
        return 2
    try:
        if args.sd is None and sd_turbo is None:
            convert_dape(dape, args.output, overwrite=args.overwrite)
        else:
            options = {"dape": dape, "dtype": args.dtype, "overwrite": args.overwrite, "turbo": sd_turbo is not None}
            convert_seesr(args.sd or sd_turbo, args.seesr, args.output, **options)
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
            args.output,
            dape,
            args.dtype,
            fuse_lora=args.fuse_lora,
            overwrite=args.overwrite,
        )
    except (ConversionError, ValueError, OSError) as error:
        logger.error("%s", str(error).splitlines()[0] if str(error) else type(error).__name__)
        return 1
    return 0
