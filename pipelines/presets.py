"""Named samplers and presets for the SeeSR family (standard-library imports only at module level).

Samplers: any diffusers scheduler works with ``pipe.scheduler = X.from_config(pipe.scheduler.config)``;
:data:`SCHEDULERS` names the ones tested on the pipeline (``seesr upscale --scheduler NAME``).

Presets (``seesr upscale --preset NAME``, :func:`apply_preset` in Python): a documented set of settings.

==========  ==================  =====  ========  =============  ====================================
preset      sampler             steps  guidance  precision      weights
==========  ==================  =====  ========  =============  ====================================
quality     DDPM (the paper's)  50     5.5       fp32           SeeSR folder (``seesr convert --sd``)
fast        DPM-Solver++ 2M     10     5.5       bf16 CPU/fp16  SeeSR folder
turbo       DDPM, trailing      2      1 (none)  fp32           SeeSR-Turbo folder (``--sd-turbo``)
onestep     x0 in one step      1      1 (none)  fp32           OSEDiff folder (``--osediff``)
==========  ==================  =====  ========  =============  ====================================

Measured speed ratios against quality are in docs/benchmarks.md (``benchmarks/bench_speed.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: CLI name -> (diffusers class name, config overrides, description). Each is run by tests/test_schedulers.py.
SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "ddpm": ("DDPMScheduler", {}, "DDPM, ancestral (the original's)"),
    "ddim": ("DDIMScheduler", {}, "DDIM (eta 0)"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PNDM / PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS (k-diffusion)"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler ancestral"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun (2 model calls per step)"),
    "dpm": ("DPMSolverMultistepScheduler", {}, "DPM-Solver++ 2M"),
    "dpm-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM-Solver++ 2M, Karras sigmas"),
    "dpm-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "SDE-DPM-Solver++ 2M"),
    "dpm-single": ("DPMSolverSinglestepScheduler", {}, "DPM-Solver++ single-step"),
    "kdpm2": ("KDPM2DiscreteScheduler", {}, "KDPM2 (DPM-Solver-2, 2 model calls per step)"),
    "kdpm2-a": ("KDPM2AncestralDiscreteScheduler", {}, "KDPM2 ancestral"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "deis": ("DEISMultistepScheduler", {}, "DEIS"),
}


def make_scheduler(name: str, config: dict[str, Any]):
    """The scheduler ``name`` (a key of :data:`SCHEDULERS`) built from a pipeline's scheduler ``config``."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: expected one of {sorted(SCHEDULERS)}, got {name!r}")
    class_name, overrides, _ = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config({**dict(config), **overrides})


@dataclass(frozen=True)
class Preset:
    """A named set of settings. ``scheduler`` None keeps the folder's own; ``steps`` / ``guidance_scale`` None keep
    the folder's stored defaults (SeeSR-Turbo's are 2 steps, guidance 1)."""

    name: str
    description: str
    pipeline: str  # the pipeline class the folder must hold
    model_kind: str  # the folder's model_kind it needs ("seesr", "seesr-turbo", "osediff")
    scheduler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    half_precision: bool = False  # bf16 on CPU, fp16 on CUDA (VAE upcast to fp32 in fp16)
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    def dtype_name(self, device_type: str) -> str:
        if not self.half_precision:
            return "fp32"
        return "fp16" if device_type == "cuda" else "bf16"


PRESETS: dict[str, Preset] = {
    "quality": Preset(
        "quality",
        "the paper's settings: DDPM 50 steps, guidance 5.5, fp32 (SeeSR folder)",
        "SeeSRPipeline",
        "seesr",
        scheduler="ddpm",
        steps=50,
        guidance_scale=5.5,
    ),
    "fast": Preset(
        "fast",
        "DPM-Solver++ 2M 10 steps, guidance 5.5, half precision (SeeSR folder)",
        "SeeSRPipeline",
        "seesr",
        scheduler="dpm",
        steps=10,
        guidance_scale=5.5,
        half_precision=True,
    ),
    "turbo": Preset(
        "turbo",
        "SeeSR-Turbo: its DDPM 2 steps at [999, 499], no CFG, fp32 (folder from seesr convert --sd-turbo)",
        "SeeSRPipeline",
        "seesr-turbo",
    ),
    "onestep": Preset(
        "onestep",
        "OSEDiff: one UNet step, no CFG, fp32 (folder from seesr convert --osediff)",
        "OSEDiffPipeline",
        "osediff",
    ),
}


def folder_kind(pipeline_class: str, config: dict[str, Any]) -> str:
    """ "seesr", "seesr-turbo", "osediff" or the class name, for a loaded pipeline's (or model_index.json's) config."""
    if pipeline_class == "OSEDiffPipeline":
        return "osediff"
    if pipeline_class == "SeeSRPipeline":
        return config.get("model_kind") or "seesr"
    return pipeline_class


def check_preset_folder(preset: str | Preset, pipeline_class: str, config: dict[str, Any], where: str = "") -> Preset:
    """The preset, or a one-line error when the folder holds other weights than the preset needs."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {list(PRESETS)}, got {preset!r}")
        preset = PRESETS[preset]
    kind = folder_kind(pipeline_class, config)
    if kind != preset.model_kind:
        how = {
            "seesr": "seesr convert --sd SD2 --seesr DIR",
            "seesr-turbo": "seesr convert --seesr DIR --sd-turbo SD_TURBO",
            "osediff": "seesr convert --osediff osediff.pkl --sd SD21",
        }[preset.model_kind]
        raise ValueError(
            f"preset {preset.name}: {where or 'the model'} is a {kind} folder, the preset needs a "
            f"{preset.model_kind} folder (made by `{how}`)"
        )
    return preset


def apply_preset(pipe, preset: str | Preset, dtype=None) -> dict[str, Any]:
    """Set up ``pipe`` for ``preset`` (scheduler, dtype) and return the call keyword arguments it implies.

    ``pipe(image, **apply_preset(pipe, "fast"))``. Raises ValueError when ``pipe`` holds other weights than the
    preset needs (e.g. "turbo" on a plain SeeSR folder). The dtype change is in place; ``dtype`` (a torch dtype)
    overrides the preset's precision.
    """
    import torch

    preset = check_preset_folder(preset, type(pipe).__name__, dict(pipe.config))
    device_type = pipe._execution_device.type if hasattr(pipe, "_execution_device") else "cpu"
    if dtype is None:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[preset.dtype_name(device_type)]
    kwargs = dict(preset.call_kwargs)
    prompt_extractor = getattr(pipe, "prompt_extractor", None)
    pipe.to(dtype=dtype)
    if prompt_extractor is not None:
        prompt_extractor.to(dtype=torch.float32)  # DAPE runs in fp32, as the original
    if preset.scheduler is not None:
        pipe.scheduler = make_scheduler(preset.scheduler, pipe.scheduler.config)
    if preset.steps is not None:
        kwargs["num_inference_steps"] = preset.steps
    if preset.guidance_scale is not None:
        kwargs["guidance_scale"] = preset.guidance_scale
    if dtype == torch.float16 and "upcast_vae" in _call_parameters(pipe):
        kwargs["upcast_vae"] = True
    logger.info("preset %s: %s", preset.name, preset.description)
    return kwargs


#: Measured speed-up against quality, end to end, 512x512 from 128 px, 2-core CPU (benchmarks/bench_speed.py;
#: docs/benchmarks.md; fast: 2 of 10 steps measured, quality: extrapolated from measured steps). The same figures
#: as the README's preset table.
MEASURED_SPEEDUP: dict[str, str] = {"quality": "1x", "fast": "29x", "turbo": "22x", "onestep": "40x (bf16: 147x)"}


def preset_table() -> str:
    """The preset table (plain text) for ``--help``."""
    rows = [("preset", "steps", "guidance", "precision", "weights", "speed")]
    rows += [
        ("quality", "50 DDPM", "5.5", "fp32", "SeeSR", MEASURED_SPEEDUP["quality"]),
        ("fast", "10 DPM++2M", "5.5", "bf16 / fp16 CUDA", "SeeSR", MEASURED_SPEEDUP["fast"]),
        ("turbo", "2 DDPM", "1 (none)", "fp32", "SeeSR-Turbo", MEASURED_SPEEDUP["turbo"]),
        ("onestep", "1", "1 (none)", "fp32", "OSEDiff", MEASURED_SPEEDUP["onestep"]),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _call_parameters(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)
