"""Upscale images with a SeeSR, OSEDiff or TGSR pipeline folder (default: the embedded TGSR model).

Inputs are files, folders (recursive) and globs. One output per input, named after it (PNG by default), written
atomically. Bad inputs (missing, unreadable, too large, ...) are reported on one line each and skipped; the exit
code is 1 if anything failed. Under ``accelerate launch`` the inputs are split across processes.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from seesr.dtypes import DTYPE_NAMES, torch_dtype

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
FORMATS = ("png", "jpg", "webp", "tif")


def _number(kind: type, minimum: float | None = None, allow_none: bool = False):
    def parse(text: str):
        if allow_none and text.lower() in ("none", "off"):
            return "off"
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value != value or (minimum is not None and value < minimum):  # NaN or too small
            raise argparse.ArgumentTypeError(f"expected a value >= {minimum}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    parser.add_argument("-o", "--output-dir", required=True, type=Path, help="folder for the outputs")
    parser.add_argument(
        "--model", help="pipeline folder or hub id (SeeSR, OSEDiff or TGSR); default: the embedded TGSR model"
    )
    parser.add_argument("--prompt", default="", help="user prompt (SeeSR: after the DAPE tags; TGSR: the text guide)")
    parser.add_argument("--steps", type=_number(int, 1), default=50, help="denoising steps (SeeSR)")
    parser.add_argument("--guidance-scale", type=_number(float, 0), default=5.5, help="CFG scale (SeeSR)")
    parser.add_argument("--upscale", type=_number(float, 1), default=4, help="scale factor (TGSR: 2, 4, 8 or 16)")
    parser.add_argument(
        "--process-size",
        type=_number(int, 8),
        default=512,
        help="SeeSR small-input rule: inputs with a side < process_size / upscale are enlarged first",
    )
    parser.add_argument("--seed", type=_number(int, 0), default=42, help="random seed (each image gets this seed)")
    parser.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default="adain", help="SeeSR colour fix")
    parser.add_argument(
        "--tile-size",
        type=_number(int, 8, allow_none=True),
        default=None,
        help="tile size (SeeSR: latent px, default 64; TGSR: LR px, default 256); 'none' disables latent tiling",
    )
    parser.add_argument("--tile-overlap", type=_number(int, 0), default=None, help="tile overlap (same units)")
    parser.add_argument(
        "--vae-tile-size",
        type=_number(int, 64, allow_none=True),
        default=512,
        help="SeeSR VAE tile size in pixels ('none' disables)",
    )
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), help="SeeSR sampler (default: the model's, DDPM)")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32", help="model dtype")
    parser.add_argument(
        "--device", help="torch device (default: cuda if available, else cpu; accelerate's under launch)"
    )
    parser.add_argument("--format", choices=FORMATS, default="png", help="output format")
    parser.add_argument(
        "--max-pixels",
        type=_number(int, 1),
        default=16_000_000,
        help="refuse inputs with more pixels (decompression-bomb guard)",
    )
    parser.add_argument("--save-prompts", action="store_true", help="write NAME.txt with the prompt used")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")


def output_names(files: list[Path], suffix: str) -> list[str]:
    """One output file name per input: the input's stem, disambiguated with _2, _3... when stems collide."""
    names, seen = [], {}
    for path in files:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.{suffix}" if seen[stem] == 1 else f"{stem}_{seen[stem]}.{suffix}")
    return names


def load_pipeline(model: str | None, device, dtype):
    """(pipeline, kind) for a SeeSR or TGSR folder / hub id, or the embedded TGSR model when ``model`` is None."""
    import torch
    from diffusers import DiffusionPipeline

    from pipelines import OSEDiffPipeline, SeeSRPipeline, TGSRPipeline

    if model is None:
        from seesr.models.tgsr import default_model_path

        model = str(default_model_path())
        logger.info("Using the embedded default model (TGSR-small, offline) from %s; pass --model for SeeSR", model)
    config = DiffusionPipeline.load_config(model)
    name = config.get("_class_name")
    name = name[1] if isinstance(name, list) else name
    classes = {"SeeSRPipeline": SeeSRPipeline, "TGSRPipeline": TGSRPipeline, "OSEDiffPipeline": OSEDiffPipeline}
    if name not in classes:
        raise ValueError(f"--model {model}: a {name} folder, expected a {', '.join(classes)} folder")
    pipe = classes[name].from_pretrained(model, dtype=dtype)
    pipe.to(device)
    if getattr(pipe, "prompt_extractor", None) is not None:
        pipe.prompt_extractor.to(dtype=torch.float32)  # DAPE runs in fp32, as the original
    pipe.set_progress_bar_config(disable=True)
    return pipe, name


def pipeline_kwargs(kind: str, args: argparse.Namespace) -> dict:
    if kind == "TGSRPipeline":
        if args.upscale not in (2, 4, 8, 16):
            raise ValueError(f"--upscale: the TGSR model supports 2, 4, 8 or 16, got {args.upscale:g}")
        kwargs = {"upscale": int(args.upscale)}
        if args.tile_size is not None:
            kwargs["tile_size"] = 1 << 30 if args.tile_size == "off" else args.tile_size
        if args.tile_overlap is not None:
            kwargs["tile_overlap"] = args.tile_overlap
        return kwargs
    kwargs = {
        "upscale": args.upscale,
        "process_size": args.process_size,
        "color_fix": None if args.color_fix == "none" else args.color_fix,
        "vae_tile_size": None if args.vae_tile_size == "off" else args.vae_tile_size,
        "upcast_vae": args.dtype == "fp16",
    }
    if kind == "SeeSRPipeline":  # OSEDiffPipeline: one step, no guidance
        kwargs.update(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    if args.tile_size is not None:
        kwargs["latent_tile_size"] = None if args.tile_size == "off" else args.tile_size
    if args.tile_overlap is not None:
        kwargs["latent_tile_overlap"] = args.tile_overlap
    return kwargs


def upscale_files(args: argparse.Namespace) -> int:
    """The command's work; returns the exit code."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from seesr.image_io import ImageLoadError, atomic_save_image, atomic_write_text, expand_inputs, load_image, shard

    files, errors = expand_inputs(args.inputs)
    for error in errors:
        logger.error("%s", error)
    out_dir: Path = args.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".seesr-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        logger.error("%s: output folder is not writable (%s)", out_dir, error.strerror or error)
        return 1
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # set by `accelerate launch --cpu`
    jobs = shard(
        list(zip(files, output_names(files, args.format), strict=True)), state.process_index, state.num_processes
    )
    device = torch.device(args.device) if args.device else state.device
    dtype = torch_dtype(args.dtype)
    try:
        pipe, kind = load_pipeline(args.model, device, dtype)
        kwargs = pipeline_kwargs(kind, args)
        if args.scheduler and kind == "SeeSRPipeline":
            import diffusers

            pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
            if args.scheduler != "ddpm":
                kwargs["start_timestep"] = None  # noise the LR latent to the sampler's own first step
    except (ValueError, OSError) as error:
        logger.error("%s", str(error).splitlines()[0])
        return 1

    failed = len(errors)
    for path, name in tqdm(jobs, desc="upscale", unit="image", disable=not state.is_local_main_process):
        target = out_dir / name
        if target.exists() and not args.overwrite:
            logger.warning("%s: %s exists, skipped (pass --overwrite to replace it)", path, target)
            continue
        try:
            loaded = load_image(path, max_pixels=args.max_pixels)
            if kind != "TGSRPipeline":
                kwargs["generator"] = torch.Generator(device="cpu").manual_seed(args.seed)
            out = pipe(loaded.rgb, prompt=args.prompt, output_type="pil", **kwargs)
            atomic_save_image(out.images[0], target, alpha=loaded.alpha)
            if args.save_prompts:
                atomic_write_text(target.with_suffix(".txt"), out.prompts[0] + "\n")
            logger.debug("%s -> %s (process %d)", path, target, state.process_index)
        except (ImageLoadError, ValueError, OSError, RuntimeError) as error:
            failed += 1
            logger.error("%s: %s", path, str(error).splitlines()[0] if str(error) else type(error).__name__)
    state.wait_for_everyone()
    if failed:
        logger.error("%d input(s) failed", failed)
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    return upscale_files(args)
