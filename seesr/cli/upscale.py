"""Upscale images with a SeeSR, OSEDiff or TGSR pipeline folder (default: the embedded TGSR model).

Inputs are files, folders (recursive; dotfiles and leftover temporary files skipped) and globs. Each input gets
an output name, unique across the whole batch, chosen before any work (a.jpg, a.png, a_2.png -> a.png, a_2.png,
a_2_2.png). Outputs keep the input's bit depth (16-bit PNG), greyscale, alpha, ICC profile and EXIF where the
format allows. Each name is claimed with an exclusive create, so a concurrent run skips it; writes are atomic.
Bad inputs are reported on one line each and skipped; the exit code is 1 if anything failed. Under
``accelerate launch`` the inputs are split across processes. The TGSR model is deterministic: `--seed` does nothing
for it. Outputs are byte-identical across runs only at the same thread count (and device).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipelines.presets import PRESETS, SCHEDULERS, preset_table
from seesr.cli_options import (
    add_device,
    add_dtype,
    add_model,
    add_output,
    add_overwrite,
    half_on_cpu_warning,
    number,
    torch_dtype,
)

logger = logging.getLogger(__name__)

FORMATS = ("png", "jpg", "webp", "tif", "bmp")
#: SeeSR-only options: argparse default None ("not given"); the value used when given for SeeSR or not given.
#: None for steps / guidance: the folder's stored defaults (50 / 5.5, or SeeSR-Turbo's 2 / 1.0).
SEESR_DEFAULTS = {
    "steps": None,
    "guidance_scale": None,
    "conditioning_scale": 1.0,
    "process_size": 512,
    "color_fix": "adain",
    "vae_tile_size": 512,
    "scheduler": None,
    "negative_prompt": None,
    "added_prompt": None,
    "start_point": None,
    "start_timestep": None,
    "num_samples": 1,
    "upcast_vae": None,
    "seed": 42,
    "compile": None,
    "size_rule": None,
}
#: The SEESR_DEFAULTS options each pipeline class takes (TGSR takes none of them).
OPTIONS_BY_KIND = {
    "SeeSRPipeline": frozenset(SEESR_DEFAULTS) - {"size_rule"},
    "OSEDiffPipeline": frozenset({"process_size", "color_fix", "vae_tile_size", "upcast_vae", "seed", "size_rule"}),
    "TGSRPipeline": frozenset(),
}
TGSR_UPSCALES = (2, 4, 8, 16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input/output")
    io.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    add_output(io, "folder for the outputs", aliases=("--output-dir",))
    io.add_argument("--format", choices=FORMATS, default="png", help="output format")
    add_overwrite(io)
    io.add_argument(
        "--prompt-files",
        action="store_true",
        help="use NAME.txt beside each input as its prompt, instead of --prompt, where it exists",
    )
    io.add_argument("--save-prompts", action="store_true", help="write NAME.txt with the prompt each image got")
    io.add_argument(
        "--keep-grey",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="greyscale inputs give greyscale outputs (default: on)",
    )
    io.add_argument(
        "--max-pixels",
        type=number(int, 1),
        default=16_000_000,
        help="refuse inputs with more pixels (decompression-bomb guard)",
    )
    io.add_argument(
        "--max-output-pixels",
        type=number(int, 1),
        default=256_000_000,
        help="refuse, before any work, inputs whose output (or working image) would have more pixels",
    )

    model = parser.add_argument_group("model")
    add_model(
        model, "pipeline folder or hub id (SeeSR, SeeSR-Turbo, OSEDiff or TGSR) (default: the embedded TGSR model)"
    )
    model.add_argument(
        "--prompt", default="", help="user prompt (SeeSR: after the DAPE tags; TGSR: the text guide) (default: empty)"
    )
    model.add_argument("--negative-prompt", help="SeeSR negative prompt (default: the original's)")
    model.add_argument("--added-prompt", help="SeeSR text appended to every prompt (default: the original's)")
    model.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="a documented set of settings (table below; explicit options override it; turbo and onestep need "
        "their converted folders)",
    )
    parser.epilog = "presets:\n" + preset_table()

    sampling = parser.add_argument_group("sampling (SeeSR only, except --upscale)")
    sampling.add_argument("--upscale", type=number(float, 1), default=4, help="scale factor (TGSR: 2, 4, 8 or 16)")
    sampling.add_argument(
        "--steps", type=number(int, 1), help="denoising steps (default: the folder's, 50; SeeSR-Turbo's 2)"
    )
    sampling.add_argument(
        "--guidance-scale", type=number(float, 0), help="CFG scale (default: the folder's, 5.5; SeeSR-Turbo's 1)"
    )
    sampling.add_argument("--conditioning-scale", type=number(float, 0), help="ControlNet scale (default: 1.0)")
    sampling.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        help="sampler (default: the model's, DDPM): " + ", ".join(f"{k} = {v[2]}" for k, v in SCHEDULERS.items()),
    )
    sampling.add_argument(
        "--start-point", choices=["lr", "noise"], help="start from the noised LR latent or pure noise (default: lr)"
    )
    sampling.add_argument(
        "--start-timestep",
        type=number(int, 0, allow_none=True),
        help="timestep the LR latent is noised to; 'none' = the sampler's first step "
        "(default: 999 for ddpm, else none)",
    )
    sampling.add_argument(
        "--num-samples", type=number(int, 1), help="outputs per input, NAME-s1, NAME-s2, ... (default: 1)"
    )
    sampling.add_argument(
        "--seed", type=number(int, 0), help="random seed (default: 42; the TGSR model is deterministic and takes none)"
    )
    sampling.add_argument(
        "--seed-per-image",
        action="store_true",
        help="input number i of the batch gets seed + i (default: every input gets --seed)",
    )
    sampling.add_argument(
        "--process-size",
        type=number(int, 8),
        help="small-input rule: inputs with a side < process_size / upscale are enlarged first (default: 512)",
    )
    sampling.add_argument("--color-fix", choices=["adain", "wavelet", "none"], help="colour fix (default: adain)")
    sampling.add_argument(
        "--size-rule",
        choices=["exact", "original"],
        help="OSEDiff: 'exact' = upscale x input size; 'original' = the original's (enlarged small inputs, multiples "
        "of 8, never resized back) (default: exact)",
    )

    tiling = parser.add_argument_group("tiling")
    tiling.add_argument(
        "--tile-size",
        type=number(int, 8, allow_none=True),
        help="tile size (SeeSR: latent px, default 64; TGSR: LR px, default 256); 'none' disables",
    )
    tiling.add_argument("--tile-overlap", type=number(int, 0), help="tile overlap, same units (default: 16 / 32)")
    tiling.add_argument(
        "--vae-tile-size",
        type=number(int, 64, allow_none=True),
        help="SeeSR VAE tile size in pixels, 'none' disables (default: 512)",
    )

    performance = parser.add_argument_group("performance")
    add_dtype(performance, default=None, help="model precision (default: fp32, or the preset's)")
    add_device(performance, "torch device (default: cuda if available, else cpu; accelerate's under launch)")
    performance.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="SeeSR: torch.compile the UNet and ControlNet (slow first image, results equal to rounding)",
    )
    performance.add_argument(
        "--upcast-vae",
        action=argparse.BooleanOptionalAction,
        help="SeeSR: run the VAE in float32 (default: on with --dtype fp16)",
    )


# ---------------------------------------------------------------------------------------------------- planning


def output_names(files: list[Path], suffix: str, samples: int = 1) -> list[list[str]]:
    """Output file names per input: its stem, made unique across the whole batch (_2, _3, ...); NAME-sK per sample.

    Names are checked against every name already given, so a.jpg, a.png, a_2.png get a, a_2 and a_2_2.
    """
    used: set[str] = set()
    result = []
    for path in files:
        stem, n = path.stem, 1
        while True:
            base = stem if n == 1 else f"{stem}_{n}"
            names = [f"{base}.{suffix}"] if samples == 1 else [f"{base}-s{k}.{suffix}" for k in range(1, samples + 1)]
            if not used.intersection(n.lower() for n in names):
                break
            n += 1
        used.update(name.lower() for name in names)
        result.append(names)
    return result


def model_kind(model: str) -> str:
    """`SeeSRPipeline`, `OSEDiffPipeline` or `TGSRPipeline`, from the folder's model_index.json (nothing loaded)."""
    index = Path(model) / "model_index.json"
    if index.is_file():
        try:
            config = json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"--model {model}: model_index.json is not valid JSON ({error})") from None
    else:
        from diffusers import DiffusionPipeline

        config = DiffusionPipeline.load_config(model)
    name = config.get("_class_name")
    name = name[1] if isinstance(name, list) else name
    if name not in OPTIONS_BY_KIND:
        raise ValueError(f"--model {model}: a {name} folder, expected a {', '.join(OPTIONS_BY_KIND)} folder")
    return name


def check_options(kind: str, args: argparse.Namespace) -> list[str]:
    """Errors for options that do not apply to `kind` (a warning is logged for --seed with TGSR)."""
    taken = OPTIONS_BY_KIND[kind]
    given = [name for name in SEESR_DEFAULTS if name not in taken | {"seed"} and getattr(args, name, None) is not None]
    errors = []
    if given:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        errors.append(f"{options}: not used by a {kind} model")
    if kind != "TGSRPipeline":
        return errors
    if args.seed is not None or args.seed_per_image:
        logger.warning("--seed / --seed-per-image: the TGSR model is deterministic; ignored")
    if args.upscale not in TGSR_UPSCALES:
        errors.append(f"--upscale: the TGSR model supports 2, 4, 8 or 16, got {args.upscale:g}")
    return errors


def output_pixels(size: tuple[int, int], kind: str, args: argparse.Namespace) -> int:
    """Pixels of the output, or of the working image when larger (SeeSR's small-input rule)."""
    width, height = size
    pixels = int(width * args.upscale) * int(height * args.upscale)
    if kind != "TGSRPipeline":
        process_size = SEESR_DEFAULTS["process_size"] if args.process_size is None else args.process_size
        min_side = int(process_size // args.upscale)
        if 0 < min(width, height) < min_side:
            scale = min_side / min(width, height)
            pixels = max(pixels, int(scale * width * args.upscale) * int(scale * height * args.upscale))
    return pixels


def size_error(path: Path, kind: str, args: argparse.Namespace) -> str | None:
    """A one-line refusal when the input's output would exceed --max-output-pixels (header read only)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            size = image.size
    except Exception:  # unreadable: load_image reports it with its reason later
        return None
    pixels = output_pixels(size, kind, args)
    if pixels > args.max_output_pixels:
        return (
            f"{path}: {size[0]}x{size[1]} at x{args.upscale:g} needs {pixels} output pixels, over "
            f"--max-output-pixels={args.max_output_pixels} (raise it to allow this, memory permitting)"
        )
    return None


# ---------------------------------------------------------------------------------------------------- running


def load_pipeline(model: str, kind: str, device, dtype):
    """The pipeline for `model` on `device`; SeeSR's DAPE prompt extractor stays float32, as in the original."""
    import torch

    from pipelines import OSEDiffPipeline, SeeSRPipeline, TGSRPipeline

    if kind in ("SeeSRPipeline", "OSEDiffPipeline"):
        cls = SeeSRPipeline if kind == "SeeSRPipeline" else OSEDiffPipeline
        pipe = cls.from_pretrained(model, dtype={"default": dtype, "prompt_extractor": torch.float32})
    else:
        pipe = TGSRPipeline.from_pretrained(model, dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(kind: str, args: argparse.Namespace) -> dict:
    if kind == "TGSRPipeline":
        kwargs = {"upscale": int(args.upscale)}
        if args.tile_size is not None:
            kwargs["tile_size"] = 1 << 30 if args.tile_size == "off" else args.tile_size
        if args.tile_overlap is not None:
            kwargs["tile_overlap"] = args.tile_overlap
        return kwargs
    value = {
        name: default if getattr(args, name) is None else getattr(args, name)
        for name, default in SEESR_DEFAULTS.items()
    }
    if kind == "OSEDiffPipeline":  # one step, no guidance
        kwargs = {
            "upscale": args.upscale,
            "process_size": value["process_size"],
            "color_fix": None if value["color_fix"] == "none" else value["color_fix"],
            "vae_tile_size": None if value["vae_tile_size"] == "off" else value["vae_tile_size"],
            "upcast_vae": args.dtype == "fp16" if value["upcast_vae"] is None else value["upcast_vae"],
        }
        if value["size_rule"] is not None:
            kwargs["size_rule"] = value["size_rule"]
        if args.tile_size is not None:
            kwargs["latent_tile_size"] = None if args.tile_size == "off" else args.tile_size
        if args.tile_overlap is not None:
            kwargs["latent_tile_overlap"] = args.tile_overlap
        return kwargs
    kwargs = {
        "upscale": args.upscale,
        "process_size": value["process_size"],
        "conditioning_scale": value["conditioning_scale"],
        "color_fix": None if value["color_fix"] == "none" else value["color_fix"],
        "vae_tile_size": None if value["vae_tile_size"] == "off" else value["vae_tile_size"],
        "upcast_vae": args.dtype == "fp16" if value["upcast_vae"] is None else value["upcast_vae"],
        "num_images_per_prompt": value["num_samples"],
    }
    if value["steps"] is not None:
        kwargs["num_inference_steps"] = value["steps"]
    if value["guidance_scale"] is not None:
        kwargs["guidance_scale"] = value["guidance_scale"]
    for name in ("negative_prompt", "added_prompt", "start_point"):
        if value[name] is not None:
            kwargs[name] = value[name]
    if args.start_timestep is not None:  # else the pipeline's: 999 for DDPM, the sampler's first step otherwise
        kwargs["start_timestep"] = None if args.start_timestep == "off" else args.start_timestep
    if args.tile_size is not None:
        kwargs["latent_tile_size"] = None if args.tile_size == "off" else args.tile_size
    if args.tile_overlap is not None:
        kwargs["latent_tile_overlap"] = args.tile_overlap
    return kwargs


class NonFiniteOutputError(ValueError):
    """The model produced NaN or inf pixels."""


def guard_finite(pipe) -> None:
    """Make `pipe` raise NonFiniteOutputError before post-processing NaN/inf pixels (which would save as black)."""
    import torch

    if getattr(pipe, "_finite_guard", False):
        return
    postprocess = pipe.postprocess

    def checked(images, *args, **kwargs):
        tensors = images if isinstance(images, (list, tuple)) else [images]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise NonFiniteOutputError("the model output has NaN/inf values")
        return postprocess(images, *args, **kwargs)

    pipe.postprocess = checked
    pipe._finite_guard = True


def prompt_for(path: Path, args: argparse.Namespace) -> str:
    """`NAME.txt` beside the input with --prompt-files (when it exists), else --prompt."""
    caption = path.with_suffix(".txt")
    if args.prompt_files and caption.is_file():
        return caption.read_text(encoding="utf-8").strip()
    return args.prompt


def release(claimed: list[Path]) -> None:
    """Remove output names claimed but not written (empty placeholders)."""
    for target in claimed:
        try:
            if target.stat().st_size == 0:
                target.unlink()
        except FileNotFoundError:
            pass


def upscale_one(pipe, kind, path, targets, index, args, kwargs) -> list[Path]:
    """Load, run and save one input; returns the files written."""
    import numpy as np
    import torch

    from seesr.image_io import atomic_write_text, load_image
    from seesr.image_save import save_result

    loaded = load_image(path, max_pixels=args.max_pixels)
    prompt = prompt_for(path, args)
    call = dict(kwargs)
    if kind != "TGSRPipeline":  # SeeSR: all its draws; OSEDiff: the VAE posterior sample
        seed = SEESR_DEFAULTS["seed"] if args.seed is None else args.seed
        call["generator"] = torch.Generator(device="cpu").manual_seed(seed + (index if args.seed_per_image else 0))
    output_type = "np" if loaded.bit_depth == 16 else "pil"
    out = pipe(loaded.rgb, prompt=prompt, output_type=output_type, **call)
    images = out.images if isinstance(out.images, list) else list(out.images)
    for target, image in zip(targets, images, strict=True):
        pixels = np.asarray(image, dtype=np.float64) / (255.0 if output_type == "pil" else 1.0)
        save_result(pixels, target, loaded, keep_grey=args.keep_grey)
        if args.save_prompts:
            atomic_write_text(target.with_suffix(".txt"), out.prompts[0] + "\n")
    return targets


def pending(args: argparse.Namespace, files: list[Path]) -> list[tuple]:
    """(index, input, targets) per input whose outputs do not all exist yet (all of them with --overwrite)."""
    samples = args.num_samples or 1
    jobs = []
    for index, (path, names) in enumerate(zip(files, output_names(files, args.format, samples), strict=True)):
        targets = [args.output / name for name in names]
        if not args.overwrite and all(t.exists() for t in targets):
            logger.info("%s: %s exists, skipped (pass --overwrite to replace it)", path, targets[0])
            continue
        jobs.append((index, path, targets))
    return jobs


def prepare_output(out_dir: Path) -> str | None:
    """Create the output folder and test that it is writable (exclusive, no-follow temp file); error or None."""
    import os
    import tempfile

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".seesr-write-test-", dir=out_dir)  # O_EXCL: never follows a link
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return f"{out_dir}: output folder is not writable ({error.strerror or error})"
    return None


def resolve_model(args: argparse.Namespace) -> tuple[str, str]:
    if args.model is not None:
        return args.model, model_kind(args.model)
    from seesr.models.tgsr import default_model_path

    model = str(default_model_path())
    logger.info("Using the embedded default model (TGSR-small, offline) from %s; pass --model for SeeSR", model)
    return model, "TGSRPipeline"


def upscale_files(args: argparse.Namespace) -> int:
    """The command's work; returns the exit code."""
    from seesr.image_io import expand_inputs

    files, errors = expand_inputs(args.inputs)
    problem = prepare_output(args.output)
    if problem:
        logger.error("%s", problem)
        return 1
    jobs = pending(args, files)  # before loading anything
    if files and not jobs:
        logger.info("nothing to do: every output exists in %s (pass --overwrite to replace them)", args.output)
        return 1 if errors else 0
    try:
        model, kind = resolve_model(args)
    except (ValueError, OSError) as error:
        logger.error("%s", str(error).splitlines()[0])
        return 1
    option_errors = check_options(kind, args)
    for line in option_errors:
        logger.error("%s", line)
    if option_errors:
        return 2
    refusals = [(job, size_error(job[1], kind, args)) for job in jobs]
    errors += [refusal for _, refusal in refusals if refusal]
    jobs = [job for job, refusal in refusals if not refusal]
    for error in errors:
        logger.error("%s", error)
    if not jobs:
        return 1 if errors else 0
    return run_jobs(args, model, kind, jobs, len(errors))


def run_jobs(args: argparse.Namespace, model: str, kind: str, jobs: list[tuple], failed: int) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from seesr.image_io import ImageLoadError, claim_path, shard

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # set by `accelerate launch --cpu`
    jobs = shard(jobs, state.process_index, state.num_processes)
    device = torch.device(args.device) if args.device else state.device
    preset = getattr(args, "preset", None)
    if args.dtype is None:
        args.dtype = PRESETS[preset].dtype_name(device.type) if preset else "fp32"
    reason = half_on_cpu_warning(args.dtype, device.type)
    if reason:
        logger.warning("%s", reason)
    try:
        dtype = torch_dtype(args.dtype)
        pipe = load_pipeline(model, kind, device, dtype)
        preset_kwargs = {}
        if preset:
            from pipelines.presets import apply_preset

            preset_kwargs = apply_preset(pipe, preset, dtype=dtype)
        kwargs = {**preset_kwargs, **pipeline_kwargs(kind, args)}
        if args.scheduler and kind == "SeeSRPipeline":
            from pipelines.presets import make_scheduler

            pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
        if args.compile and kind == "SeeSRPipeline":
            pipe.unet.compile()
            pipe.controlnet.compile()
    except (ValueError, OSError) as error:
        logger.error("%s", str(error).splitlines()[0])
        return 1
    guard_finite(pipe)
    for index, path, targets in tqdm(jobs, desc="upscale", unit="image", disable=not state.is_local_main_process):
        claimed = [t for t in targets if args.overwrite or claim_path(t)]
        if len(claimed) < len(targets):
            logger.warning("%s: %s exists or is claimed by another run, skipped", path, targets[0])
            release(claimed)
            continue
        try:
            upscale_one(pipe, kind, path, targets, index, args, kwargs)
            logger.debug("%s -> %s (process %d)", path, targets[0], state.process_index)
        except NonFiniteOutputError:
            failed += 1
            cause = "half-precision overflow: use --dtype fp32 or bf16" if args.dtype == "fp16" else "check the model"
            logger.error("%s: the model output has NaN/inf values (likely %s); nothing written", path, cause)
        except ImageLoadError as error:
            failed += 1
            logger.error("%s", error)
        except (ValueError, OSError, RuntimeError) as error:
            failed += 1
            logger.error("%s: %s", path, str(error).splitlines()[0] if str(error) else type(error).__name__)
        finally:
            release(claimed)
    state.wait_for_everyone()
    if failed:
        logger.error("%d input(s) failed", failed)
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    return upscale_files(args)
