"""Speed and memory benchmark for SeeSRPipeline with random-weight models (no network, no real weights).

For each model config (``tiny``: the test suite's sizes; ``mid``: a 3-level SD2-style UNet with 64-256 channels),
measured in one run:

1. time per denoising step (median over the steps of one call, after a warm-up call) at 512 px output;
2. the share of that call's wall time spent outside the model forwards (ControlNet, UNet, VAE encoder/decoder,
   text encoder; timed with forward pre/post hooks, synchronised on CUDA). Target: under 5 %;
3. peak memory at each ``--sizes`` output (latent and VAE tiling on at the pipeline defaults, CFG on, ``--mem-steps``
   steps) above a baseline taken after the models are built and one tiny warm-up call, so weights are excluded
   alike for every size. CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, above
   ``memory_allocated``; CPU: each size in a fresh subprocess of this script, the rise of the peak RSS
   (``ru_maxrss``; on Linux read as VmHWM) over the resident set at the baseline (the peak is reset there through
   /proc/self/clear_refs, so that model-building transients do not hide small runs). Target: peak(largest) /
   peak(smallest) within 1.3x (issue #12). CPU children run with a fixed glibc mmap threshold (--allocator-default).

``--presets quality,fast,turbo,onestep`` measures the memory of each preset's own pipeline and settings instead
(``apply_preset``; onestep is an ``OSEDiffPipeline``): docs/benchmarks.md, "Peak memory of every preset".

Defaults fit two shared CPU cores in about five minutes: memory at 512 and 1024 px with one step (2048 px has 16
latent tiles per step, minutes each on CPU). The full set, e.g. on a GPU:

    python benchmarks/bench_pipeline.py                                  # CPU defaults
    python benchmarks/bench_pipeline.py --sizes 512,1024,2048 --mem-steps 2 --configs tiny   # CPU, ~10 min
    python benchmarks/bench_pipeline.py --device cuda --steps 20 --sizes 512,1024,2048,4096  # GPU, fp32
    python benchmarks/bench_pipeline.py --device cuda --dtype float16 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "tests" / "fixtures" / "tiny_clip_tokenizer"  # a real 524-token CLIP BPE vocabulary
UPSCALE = 4
GUIDANCE = 5.5


def _pipeline_defaults() -> tuple[int, int, int]:
    import inspect

    from pipelines.pipeline_seesr import SAMPLING_DEFAULTS, SeeSRPipeline

    params = inspect.signature(SeeSRPipeline.__call__).parameters
    overlap = params["latent_tile_overlap"].default or SAMPLING_DEFAULTS["latent_tile_overlap"]
    return params["latent_tile_size"].default, overlap, params["vae_tile_size"].default


TILE, TILE_OVERLAP, VAE_TILE = _pipeline_defaults()  # the pipeline's own defaults
IMAGE_TOKENS = 145  # DAPE's representation tokens per image (RCA input)
SHARE_TARGET, RATIO_TARGET = 0.05, 1.3  # issue #12: peak(2048) / peak(512) within 1.3x
CHILD_MARK = "BENCH_CHILD_RESULT "
if str(REPO) not in sys.path:  # `pipelines` from this checkout, also when an older editable install maps it oddly
    sys.path.insert(0, str(REPO))


def sd2_unet(channels: tuple, heads: tuple, cross_attention_dim: int, norm_num_groups: int, sample_size: int) -> dict:
    """A UNet config in SD2's layout (cross-attention on every level but the lowest, 2 layers per block) with
    SeeSR's RCA on DAPE's 512-wide tokens. ``heads`` is diffusers' ``attention_head_dim`` (the head count)."""
    crossed = len(channels) - 1
    return {
        "block_out_channels": channels,
        "down_block_types": ("CrossAttnDownBlock2D",) * crossed + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * crossed,
        "attention_head_dim": heads,
        "cross_attention_dim": cross_attention_dim,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "layers_per_block": 2,
        "use_linear_projection": True,
        "image_cross_attention_dim": 512,
    }


# UNet / VAE / text-encoder sizes. ``tiny`` matches tests/tiny.py; ``mid`` keeps SD2's block types and a 4-level VAE
# (scale factor 8), sized to run in minutes on two CPU cores; ``sd2`` is the released size.
CONFIGS: dict[str, dict] = {
    "tiny": {
        "unet": sd2_unet((32, 64), (2, 4), cross_attention_dim=32, norm_num_groups=8, sample_size=16),
        "vae": {"block_out_channels": (8, 8, 8, 8), "norm_num_groups": 4, "layers_per_block": 1},
        "text": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2},
        "max_length": 16,
    },
    "mid": {  # 32 channels per head
        "unet": sd2_unet((64, 128, 256), (2, 4, 8), cross_attention_dim=64, norm_num_groups=32, sample_size=64),
        "vae": {"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 32, "layers_per_block": 1},
        "text": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4},
        "max_length": 77,
    },
    # The released sizes (SD2-base UNet + SeeSR RCA, SD VAE, OpenCLIP-H text encoder), random weights: for GPUs
    # (on two CPU cores one 2048 px memory run takes about 20 minutes).
    "sd2": {
        "unet": sd2_unet(
            (320, 640, 1280, 1280), (5, 10, 20, 20), cross_attention_dim=1024, norm_num_groups=32, sample_size=64
        ),
        "vae": {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "layers_per_block": 2},
        "text": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23},
        "max_length": 77,
    },
}


# Building --------------------------------------------------------------------------------------------------------


PRESETS = ("quality", "fast", "turbo", "onestep")
#: SeeSR-Turbo's folder defaults (seesr convert --sd-turbo) and scheduler config (SD-Turbo's "trailing" spacing).
TURBO_DEFAULTS = {"num_inference_steps": 2, "guidance_scale": 1.0, "latent_tile_overlap": 32}


def random_vae(config: dict):
    """An ``AutoencoderKL`` of ``config["vae"]`` (a ``CONFIGS`` entry) with random weights from torch's global RNG."""
    from diffusers import AutoencoderKL

    levels = len(config["vae"]["block_out_channels"])
    return AutoencoderKL(
        **config["vae"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        sample_size=512,
    ).eval()


def random_text_encoder(config: dict):
    """(CLIP text encoder with random weights from torch's global RNG, the tiny fixture tokenizer) of ``config``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    max_length = config["max_length"]
    text_config = CLIPTextConfig(
        vocab_size=524, max_position_embeddings=max_length, bos_token_id=522, eos_token_id=523, pad_token_id=523,
        **config["text"],
    )  # fmt: skip
    tokenizer = CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=max_length
    )
    return CLIPTextModel(text_config).eval(), tokenizer


def build_pipeline(name: str, device: str, dtype: torch.dtype | None, seed: int = 0, preset: str | None = None):
    """A pipeline of ``CONFIGS[name]`` with seeded random weights on ``device``: a SeeSRPipeline in ``dtype``, or
    with ``preset``, the preset's pipeline set up by ``apply_preset`` (``dtype`` None: the preset's precision;
    onestep: an OSEDiffPipeline whose UNet is the same UNet without RCA and without LoRA, i.e. fused LoRA's cost).
    Returns ``(pipe, call_kwargs)``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pipelines import OSEDiffPipeline, SeeSRPipeline
    from pipelines.pipeline_seesr import SD2_SCHEDULER_CONFIG
    from pipelines.presets import apply_preset
    from seesr import SeeSRControlNetModel, SeeSRUNet2DConditionModel

    config = CONFIGS[name]
    torch.manual_seed(seed)
    if preset == "onestep":
        unet_config = {k: v for k, v in config["unet"].items() if k != "image_cross_attention_dim"}
        unet = UNet2DConditionModel(**unet_config).eval()
        controlnet = None
    else:
        unet = SeeSRUNet2DConditionModel(**config["unet"], use_image_cross_attention=True).eval()
        controlnet = SeeSRControlNetModel.from_unet(unet).eval()
    vae = random_vae(config)
    text_encoder, tokenizer = random_text_encoder(config)
    components = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
    scheduler = DDPMScheduler.from_config(SD2_SCHEDULER_CONFIG)
    if preset == "onestep":
        pipe = OSEDiffPipeline(**components, scheduler=scheduler)
    elif preset == "turbo":
        turbo_scheduler = DDPMScheduler.from_config({**SD2_SCHEDULER_CONFIG, "timestep_spacing": "trailing"})
        pipe = SeeSRPipeline(
            **components, controlnet=controlnet, scheduler=turbo_scheduler, sampling_defaults=TURBO_DEFAULTS,
            model_kind="seesr-turbo",
        )  # fmt: skip
    else:
        pipe = SeeSRPipeline(**components, controlnet=controlnet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if preset is None:
        return pipe.to(dtype=dtype), {}
    return pipe, apply_preset(pipe, preset, dtype=dtype)


def parameter_count(pipe) -> dict[str, float]:
    models = {"unet": pipe.unet, "controlnet": getattr(pipe, "controlnet", None), "vae": pipe.vae}
    models["text"] = pipe.text_encoder
    return {k: sum(p.numel() for p in m.parameters()) / 1e6 if m is not None else 0.0 for k, m in models.items()}


def lq_image(output_size: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB LQ image, ``output_size / UPSCALE`` pixels square."""
    side = output_size // UPSCALE
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(side // 4, 1), max(side // 4, 1), generator=generator)
    image = torch.nn.functional.interpolate(small, size=(side, side), mode="bilinear")[0]
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def run_pipeline(pipe, output_size: int, steps: int, device: str, image_dim: int, preset_kwargs=None, **kwargs):
    """One call at ``output_size`` px. Without ``preset_kwargs``: CFG 5.5 and the benchmark's tiling; with them (a
    preset): the preset's settings and the pipeline's default tiling, ``steps`` steps for the multi-step presets."""
    generator = torch.Generator(device).manual_seed(0)
    common = {"upscale": UPSCALE, "process_size": min(512, output_size), "generator": generator, "output_type": "pil"}
    if preset_kwargs is None:
        common.update(guidance_scale=GUIDANCE, latent_tile_size=TILE, latent_tile_overlap=TILE_OVERLAP)
        common["vae_tile_size"] = VAE_TILE
    else:
        common.update({k: v for k, v in preset_kwargs.items() if k != "num_inference_steps"})
    if type(pipe).__name__ == "SeeSRPipeline":
        common["image_embeds"] = torch.randn(1, IMAGE_TOKENS, image_dim, generator=torch.Generator().manual_seed(1))
        common["num_inference_steps"] = steps
    return pipe(lq_image(output_size), **common, **kwargs)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# Instrumentation -------------------------------------------------------------------------------------------------


class ModelTimer:
    """Wall time inside the model forwards, by group, via forward pre/post hooks (synchronised on CUDA)."""

    def __init__(self, pipe, device: str):
        self.device = device
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._start: dict[int, float] = {}
        vae = pipe.vae
        groups = {
            "controlnet": [pipe.controlnet],
            "unet": [pipe.unet],
            "vae": [m for m in (vae.encoder, vae.decoder, vae.quant_conv, vae.post_quant_conv) if m is not None],
            "text_encoder": [pipe.text_encoder],
        }
        self.handles = []
        for group, modules in groups.items():
            for module in modules:
                self.handles.append(module.register_forward_pre_hook(self._pre))
                self.handles.append(module.register_forward_hook(self._post(group)))

    def _pre(self, module, args) -> None:
        synchronize(self.device)
        self._start[id(module)] = time.perf_counter()

    def _post(self, group: str) -> Callable:
        def hook(module, args, output) -> None:
            synchronize(self.device)
            elapsed = time.perf_counter() - self._start.pop(id(module))
            self.totals[group] = self.totals.get(group, 0.0) + elapsed
            self.calls[group] = self.calls.get(group, 0) + 1

        return hook

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def wrapped(obj, name: str, before: Callable[[], None] | None = None, after: Callable[[], None] | None = None):
    """Temporarily replace ``obj.name`` by a wrapper calling ``before()`` / ``after()`` around it."""
    original, own = getattr(obj, name), name in vars(obj)

    def wrapper(*args, **kwargs):
        if before is not None:
            before()
        result = original(*args, **kwargs)
        if after is not None:
            after()
        return result

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)  # back to the class's method


class StageTimer:
    """Wall time of named pipeline calls (wrapped), e.g. the whole ``vae.decode`` including its tile blending."""

    def __init__(self, device: str):
        self.device = device
        self.totals: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def around(self, stack: contextlib.ExitStack, obj, attr: str, label: str) -> None:
        def before() -> None:
            synchronize(self.device)
            self._start[label] = time.perf_counter()

        def after() -> None:
            synchronize(self.device)
            self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - self._start.pop(label)

        stack.enter_context(wrapped(obj, attr, before, after))


# Speed -----------------------------------------------------------------------------------------------------------


def measure_speed(pipe, args, image_dim: int, size: int) -> dict:
    """One warm-up call, then one timed call at ``size`` px: per-step times and the share outside the models."""
    run_pipeline(pipe, size, 1, args.device, image_dim)  # warm-up: kernels, allocator, oneDNN primitives
    timer = ModelTimer(pipe, args.device)
    stages = StageTimer(args.device)
    marks: list[float] = []

    def on_step(pipe_, step, timestep, tensors):
        synchronize(args.device)
        marks.append(time.perf_counter())
        return tensors

    with contextlib.ExitStack() as stack:
        stack.enter_context(wrapped(pipe, "prepare_latents", after=lambda: on_step(None, -1, None, None)))
        stages.around(stack, pipe.vae, "encode", "vae.encode call")
        stages.around(stack, pipe.vae, "decode", "vae.decode call")
        stages.around(stack, pipe.scheduler, "step", "scheduler.step")
        stages.around(stack, pipe, "postprocess", "postprocess (colour fix, resize, PIL)")
        stages.around(stack, pipe, "prepare_lq", "prepare_lq (bicubic)")
        synchronize(args.device)
        start = time.perf_counter()
        run_pipeline(pipe, size, args.steps, args.device, image_dim, callback_on_step_end=on_step)
        synchronize(args.device)
        wall = time.perf_counter() - start
    timer.remove()
    step_times = list(np.diff(marks))
    model = sum(timer.totals.values())
    return {
        "size": size,
        "steps": args.steps,
        "step_median": statistics.median(step_times),
        "step_times": step_times,
        "wall": wall,
        "model": model,
        "share_outside": 1 - model / wall,
        "by_model": dict(timer.totals),
        "calls": dict(timer.calls),
        "stages": dict(stages.totals),
    }


# Memory ----------------------------------------------------------------------------------------------------------


def current_peak(device: str) -> int:
    """Bytes: the CUDA allocator's peak, or the process's peak resident set size.

    On Linux the peak RSS is read as VmHWM from /proc/self/status: the same high-water mark as ``ru_maxrss``, but
    ``ru_maxrss`` also keeps the mark of any thread that exited before, so it cannot be reset; elsewhere
    ``ru_maxrss`` (KiB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    with contextlib.suppress(OSError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_cpu_peak() -> int:
    """Return freed heap to the OS and reset the peak RSS to the current RSS (Linux >= 4.0: /proc/self/clear_refs),
    so that the peak afterwards measures this run, not a transient from model building; returns it (bytes)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return current_peak("cpu")


def measure_memory_in_process(pipe, config: str, size: int, args, image_dim: int, preset_kwargs=None) -> dict:
    """Peak memory of one call at ``size`` px above the baseline; also which stage first reached the peak."""
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()  # the weights (and anything else still allocated)
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = reset_cpu_peak()  # the resident set after build + warm-up: weights, caches, libraries
    stages: list[tuple[str, int]] = []

    def mark(label: str) -> Callable[[], None]:
        return lambda: stages.append((label, current_peak(args.device)))

    def on_step(pipe_, step, timestep, tensors):
        mark(f"denoise step {step + 1}")()
        return tensors

    with contextlib.ExitStack() as stack:
        stack.enter_context(wrapped(pipe, "prepare_lq", after=mark("pre-process")))
        stack.enter_context(wrapped(pipe, "encode_lq", before=mark("DAPE + text encoder"), after=mark("vae encode")))
        stack.enter_context(wrapped(pipe, "decode_latents", before=mark("denoise"), after=mark("vae decode")))
        stack.enter_context(wrapped(pipe, "postprocess", after=mark("postprocess")))
        start = time.perf_counter()
        output = run_pipeline(
            pipe, size, args.mem_steps, args.device, image_dim, preset_kwargs, callback_on_step_end=on_step
        )
        synchronize(args.device)
        wall = time.perf_counter() - start
    assert output.images[0].size == (size, size), output.images[0].size
    peak = current_peak(args.device)
    previous, raised_by = baseline, []
    for label, value in stages:
        if value > previous:
            raised_by.append((label, (value - previous) / 2**20))
        previous = max(previous, value)
    top = max(raised_by, key=lambda item: item[1])[0] if raised_by else "-"
    result = {"config": config, "size": size, "peak_mib": (peak - baseline) / 2**20, "wall": wall, "top": top}
    result["process_peak_mib"] = peak / 2**20
    result["raised_by"] = raised_by
    result["baseline_mib"] = baseline / 2**20
    return result


def memory_child(args) -> None:
    """Hidden entry point: build, warm up with a tiny call, then measure one size; print the result as JSON."""
    config, size, preset = args._mem_child.split(":")
    preset = None if preset == "-" else preset
    pipe, preset_kwargs = build_pipeline(config, args.device, preset_dtype(args, preset), preset=preset)
    pipe.vae_tiling_exact = not args.vae_fast
    image_dim = CONFIGS[config]["unet"]["image_cross_attention_dim"]
    run_pipeline(pipe, 64, 1, args.device, image_dim, preset_kwargs if preset else None)
    result = measure_memory_in_process(pipe, config, int(size), args, image_dim, preset_kwargs if preset else None)
    result["preset"] = preset
    print(CHILD_MARK + json.dumps(result), flush=True)


def preset_dtype(args, preset: str | None) -> torch.dtype | None:
    """--dtype for plain runs; for a preset its own precision unless --dtype was given."""
    return DTYPES[args.dtype or "float32"] if preset is None or args.dtype else None


def measure_memory(pipe, config: str, args, image_dim: int, preset: str | None = None, kwargs=None) -> list[dict]:
    results = []
    for size in args.sizes:
        if args.device.startswith("cuda"):
            results.append(measure_memory_in_process(pipe, config, size, args, image_dim, kwargs))
            continue
        command = [
            sys.executable,
            __file__,
            "--_mem-child",
            f"{config}:{size}:{preset or '-'}",
            "--device",
            args.device,
        ]
        command += ["--mem-steps", str(args.mem_steps), "--threads", str(args.threads)]
        command += ["--dtype", args.dtype] if args.dtype else []
        command += ["--vae-fast"] if args.vae_fast else []
        env = dict(os.environ)
        if not args.allocator_default:  # see --allocator-default
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_MARK)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory run {config} {size}px failed:\n{proc.stdout}\n{proc.stderr}")
        results.append(json.loads(lines[-1][len(CHILD_MARK) :]))
        done = results[-1]
        print(f"  [{config} {preset or ''} {size} px: +{done['peak_mib']:.1f} MiB above the baseline, process peak "
              f"{done['process_peak_mib']:.1f} MiB, {done['wall']:.0f} s]", flush=True)  # fmt: skip
    return results


# Report ----------------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def header(args) -> None:
    import diffusers
    import transformers

    if args.device.startswith("cuda"):
        hardware = torch.cuda.get_device_name()
    else:
        hardware = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
            hardware = names[0].split(":", 1)[1].strip() if names else hardware
    print(
        "SeeSRPipeline benchmark (random weights)" + (f", presets {', '.join(args.presets)}" if args.presets else "")
    )
    dtype = args.dtype or ("each preset's" if args.presets else "float32")
    print(f"  device      {args.device} ({hardware}), dtype {dtype}, torch threads {torch.get_num_threads()}")
    print(f"  versions    torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"transformers {transformers.__version__}, python {platform.python_version()}")  # fmt: skip
    print(f"  settings    x{UPSCALE}, CFG {GUIDANCE}, latent tiles {TILE}/{TILE_OVERLAP}, VAE tiles {VAE_TILE} px, "
          f"speed: {args.steps} steps at {args.speed_size} px, memory: {args.mem_steps} steps at "
          f"{', '.join(map(str, args.sizes))} px")  # fmt: skip
    print(f"  tiled VAE   {'fast mode (same windows, same memory)' if args.vae_fast else 'exact mode'}")


def report(results: dict[str, dict], args) -> bool:
    if not args.memory_only:
        print()
        print("Speed (one call after a warm-up call; model = ControlNet + UNet + VAE + text-encoder forwards)")
        print(f"  {'config':<6} {'params M (unet/cn/vae/text)':<28} {'step ms (median)':>17} {'min-max ms':>15} "
              f"{'call s':>8} {'model s':>8} {'outside':>8}")  # fmt: skip
        for name, res in results.items():
            sp, pc = res["speed"], res["params"]
            params = f"{pc['unet']:.2f}/{pc['controlnet']:.2f}/{pc['vae']:.2f}/{pc['text']:.2f}"
            spread = f"{min(sp['step_times']) * 1e3:.0f}-{max(sp['step_times']) * 1e3:.0f}"
            print(f"  {name:<6} {params:<28} {sp['step_median'] * 1e3:>17.1f} {spread:>15} {sp['wall']:>8.2f} "
                  f"{sp['model']:>8.2f} {sp['share_outside'] * 100:>7.2f}%")  # fmt: skip
        print()
        print("Time breakdown of the timed call (s; forwards from hooks, calls from wrappers)")
        for name, res in results.items():
            sp = res["speed"]
            models = ", ".join(f"{k} {v:.3f} ({sp['calls'][k]}x)" for k, v in sp["by_model"].items())
            print(f"  {name:<6} forwards: {models}")
            print(f"  {'':<6} calls:    " + ", ".join(f"{k} {v:.3f}" for k, v in sp["stages"].items()))
        print()
    sizes = args.sizes
    how = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS, fresh process"
    width = max(6, *(len(name) for name in results))
    print(f"Peak memory above the post-warm-up baseline (MiB; {how} per size, {args.mem_steps} steps)")
    print(f"  {'config':<{width}} " + " ".join(f"{f'{s} px':>10}" for s in sizes)
          + f" {'ratio':>8}   stage that raised the peak most, per size")  # fmt: skip
    for name, res in results.items():
        mem = {m["size"]: m for m in res["memory"]}
        ratio = mem[sizes[-1]]["peak_mib"] / max(mem[sizes[0]]["peak_mib"], 0.1)  # 0.1 MiB: below resolution
        res["ratio"] = ratio
        cells = " ".join(f"{mem[s]['peak_mib']:>10.1f}" for s in sizes)
        print(f"  {name:<{width}} {cells} {ratio:>7.2f}x   " + "; ".join(f"{s}: {mem[s]['top']}" for s in sizes))
    if not args.device.startswith("cuda"):
        print("Process peak RSS, weights and libraries included (MiB)")
        for name, res in results.items():
            mem = {m["size"]: m for m in res["memory"]}
            ratio = mem[sizes[-1]]["process_peak_mib"] / mem[sizes[0]]["process_peak_mib"]
            cells = " ".join(f"{mem[s]['process_peak_mib']:>10.1f}" for s in sizes)
            print(f"  {name:<{width}} {cells} {ratio:>7.2f}x")
    for name, res in results.items():
        for m in res["memory"]:
            steps = ", ".join(f"{label} +{mib:.1f}" for label, mib in m["raised_by"])
            print(f"  {name:<{width}} {m['size']} px, stages that raised the peak (MiB): {steps}")
    if not args.device.startswith("cuda"):
        base = ", ".join(f"{n} {res['memory'][0].get('baseline_mib', 0):.0f}" for n, res in results.items())
        print(f"  (baseline: resident set after build + warm-up, MiB: {base})")
    print()
    ok = True
    for name, res in results.items():
        sp = res["speed"]
        if sp is None:
            continue
        passed = sp["share_outside"] < SHARE_TARGET
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} {name}: share of wall time outside model forwards "
              f"{sp['share_outside'] * 100:.2f}% (target < {SHARE_TARGET * 100:.0f}%; model {sp['model']:.2f} s "
              f"of {sp['wall']:.2f} s, {args.steps} steps at {args.speed_size} px)")  # fmt: skip
    for name, res in results.items():
        mem = {m["size"]: m for m in res["memory"]}
        passed = res["ratio"] <= RATIO_TARGET
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} {name}: peak({sizes[-1]}) / peak({sizes[0]}) = {res['ratio']:.2f}x "
              f"(target <= {RATIO_TARGET}x; {mem[sizes[-1]]['peak_mib']:.1f} MiB vs "
              f"{mem[sizes[0]]['peak_mib']:.1f} MiB)")  # fmt: skip
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float32; presets: their own")
    parser.add_argument(
        "--presets",
        default=None,
        help=f"comma list from {', '.join(PRESETS)}: memory runs of each preset's pipeline and settings "
        "(apply_preset; onestep = OSEDiffPipeline, turbo = SeeSR-Turbo's scheduler and defaults); no timed call",
    )
    parser.add_argument("--steps", type=int, default=3, help="denoising steps of the timed call")
    parser.add_argument("--speed-size", type=int, default=512, help="output size (px) of the timed call")
    parser.add_argument(
        "--sizes", default=None, help="output sizes (px) of the memory runs (default: 512,1024,2048; CPU: 512,1024)"
    )
    parser.add_argument("--mem-steps", type=int, default=None, help="steps of each memory run (default 2; CPU: 1)")
    parser.add_argument("--configs", default="tiny,mid", help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target check fails")
    parser.add_argument("--memory-only", action="store_true", help="skip the timed call; only the memory runs")
    parser.add_argument(
        "--allocator-default",
        action="store_true",
        help="CPU memory children keep glibc's dynamic mmap threshold (by default they run with "
        "MALLOC_MMAP_THRESHOLD_=131072, so freed tensors leave the resident set and its peak measures live memory; "
        "with the dynamic threshold heap retention makes the 2048 px peak vary by +-50%% between runs)",
    )
    parser.add_argument(
        "--vae-fast",
        action="store_true",
        help="memory runs with the tiled VAE's fast mode (pipe.vae_tiling_exact = False): the same windows, hence "
        "the same peak memory, without exact mode's pass per GroupNorm layer (hours at 2048 px for mid on 2 cores)",
    )
    parser.add_argument("--_mem-child", dest="_mem_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = not args.device.startswith("cuda")
    # Two shared CPU cores: a 96x96 latent tile costs ~10 s (tiny) / ~25 s (mid) per ControlNet + UNet pass, and
    # 2048 px has 16 tiles per step, so the CPU defaults stop at 1024 px (4 tiles) and one step per memory run.
    args.sizes = [int(s) for s in (args.sizes or ("512,1024" if cpu else "512,1024,2048")).split(",")]
    args.mem_steps = args.mem_steps or (1 if cpu else 2)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()] if args.presets else []
    if set(args.presets) - set(PRESETS):
        parser.error(f"--presets: unknown {sorted(set(args.presets) - set(PRESETS))}, choose from {list(PRESETS)}")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}, choose from {list(CONFIGS)}")
    if any(s % 64 for s in args.sizes + [args.speed_size]):
        parser.error("--sizes / --speed-size: output sizes must be multiples of 64")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not the "modules kept in float32" notice of every .to()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._mem_child:
        memory_child(args)
        return
    header(args)
    results = {}
    for name in args.configs:
        for preset in args.presets or [None]:
            start = time.perf_counter()
            label = name if preset is None else f"{name} {preset}"
            pipe, kwargs = build_pipeline(name, args.device, preset_dtype(args, preset), preset=preset)
            pipe.vae_tiling_exact = not args.vae_fast
            image_dim = CONFIGS[name]["unet"]["image_cross_attention_dim"]
            timed = not args.memory_only and preset is None  # the timed call: plain SeeSR runs only
            speed = measure_speed(pipe, args, image_dim, args.speed_size) if timed else None
            if args.device.startswith("cuda"):  # the same tiny warm-up as the CPU children
                run_pipeline(pipe, 64, 1, args.device, image_dim, kwargs if preset else None)
            memory = measure_memory(pipe, name, args, image_dim, preset, kwargs if preset else None)
            results[label] = {"speed": speed, "memory": memory, "params": parameter_count(pipe)}
            del pipe
            print(f"  [{label} measured in {time.perf_counter() - start:.0f} s]", flush=True)
    ok = report(results, args)
    if args.strict and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
