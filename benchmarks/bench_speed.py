"""Speed table of the presets (quality, fast, turbo, onestep) at full SD-2 size on random weights.

512x512 output from a 128 px input; every preset end to end through its pipeline (``SeeSRPipeline``; onestep:
``OSEDiffPipeline``) with the time per stage (DAPE, text encoder, VAE encode, denoiser = ControlNet + UNet,
VAE decode; timed with forward pre/post hooks) and the peak resident memory of each run (VmHWM, reset before each
run through /proc/self/clear_refs; it includes the weights). Ratios are against the quality preset measured in the
same run. Quality (DDPM 50 steps, CFG, fp32) is **extrapolated**: its fixed costs and ``--quality-steps`` denoising
steps are measured, the other steps cost the measured mean step time. ``--fast-steps`` below 10 extrapolates the
fast preset the same way (every DPM-Solver++ step costs one guided ControlNet + UNet call, as a DDPM step); the
table says which rows are extrapolated. Turbo and onestep run all their steps.

Models (random weights, built on the meta device and filled in place, so nothing is initialised twice): the
SeeSR UNet (SD-2 base + RCA, 1126.8 M parameters), the SeeSR ControlNet (489.0 M), the SD VAE (83.7 M), the
OpenCLIP-H text encoder (340 M) and DAPE (Swin-L RAM + tagging head, 4585 tags). SeeSR-Turbo has the same
shapes (its UNet is SD-Turbo's, i.e. SD-2.1 base's, plus RCA). onestep = ``OSEDiffPipeline`` with a stock SD-2
``UNet2DConditionModel`` (OSEDiff's LoRA fused: the stock UNet's cost) that shares its weights with the SeeSR UNet's
SD part (no second copy in memory), and the same VAE, text encoder and DAPE: DAPE tags of the upscaled input, one
text encoding, VAE encode (posterior sample), one UNet call at t=999, x0, VAE decode, AdaIN colour fix.

Usage (about 10-15 minutes and 10 GB on two CPU cores):

    python benchmarks/bench_speed.py                     # the full table
    python benchmarks/bench_speed.py --config mid        # small shapes, for a quick check of the script
    python benchmarks/bench_speed.py --checks-only       # channels_last and torch.compile effects only
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
TOKENIZER_DIR = REPO / "tests" / "fixtures" / "tiny_clip_tokenizer"  # a real CLIP BPE vocabulary (524 tokens)
OUTPUT, UPSCALE = 512, 4


def _config(channels: tuple, heads: tuple, cross: int, vae: tuple, vae_layers: int, text: tuple, **extra) -> dict:
    """Model shapes: UNet block widths / attention heads / cross-attention width, VAE block widths / layers per
    block, text encoder (hidden, intermediate, heads, layers); ``extra``: ``dape`` overrides and ``tags``."""
    hidden, intermediate, text_heads, layers = text
    return {
        "unet": {
            "block_out_channels": channels,
            "attention_head_dim": heads,
            "cross_attention_dim": cross,
            "use_linear_projection": True,
            "sample_size": 64,
        },
        "vae": {"block_out_channels": vae, "layers_per_block": vae_layers, "norm_num_groups": 32},
        "text": {
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_attention_heads": text_heads,
            "num_hidden_layers": layers,
        },
        **extra,
    }


#: SD-2 base + SeeSR RCA, SD VAE, OpenCLIP-H; DAPEModel's defaults are the release's (Swin-L @ 384), 4585 tags.
SD2 = _config((320, 640, 1280, 1280), (5, 10, 20, 20), 1024, (128, 256, 512, 512), 2, (1024, 4096, 16, 23),
              dape={}, tags=4585)  # fmt: skip
#: SD-2's block types at small widths, for checking the script in a minute.
MID_DAPE = {"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (2, 2, 4, 4), "tagging_hidden_size": 64}
MID = _config((64, 128, 256, 256), (2, 4, 8, 8), 64, (32, 64, 64, 64), 1, (64, 256, 4, 4), dape=MID_DAPE, tags=100)
CONFIGS = {"sd2": SD2, "mid": MID}
STAGES = ("dape", "text_encoder", "vae_encode", "denoiser", "vae_decode")


# Building --------------------------------------------------------------------------------------------------------


def _fill_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights in place: N(0, 0.02) for weights, 0 for biases, 1 for norm scales (finite activations)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1 and "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for buffer in model.buffers():
            if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                buffer.zero_()
    return model


def _on_meta(build, seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        model = build()
    model = model.to_empty(device="cpu")
    for module in model.modules():  # buffers computed at init (positions, relative indices) must be rebuilt
        if hasattr(module, "_init_buffers"):
            module._init_buffers()
    return _fill_(model, seed).eval()


def build_pipeline(config: dict):
    """A SeeSRPipeline with DAPE at ``config``'s shapes, random weights, fp32."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dape import DAPEModel
    from pipelines import SeeSRPipeline
    from pipelines.pipeline_seesr import SD2_SCHEDULER_CONFIG
    from seesr import SeeSRControlNetModel, SeeSRUNet2DConditionModel

    unet = _on_meta(lambda: SeeSRUNet2DConditionModel(**config["unet"]), 0)
    controlnet = _on_meta(lambda: SeeSRControlNetModel.from_unet(unet, load_weights_from_unet=False), 1)
    vae = _on_meta(
        lambda: AutoencoderKL(
            **config["vae"],
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=OUTPUT,
        ),
        2,
    )
    text_config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=522, eos_token_id=523, pad_token_id=523,
        hidden_act="gelu", **config["text"],
    )  # fmt: skip
    text_encoder = CLIPTextModel(text_config).eval()  # built directly: its position ids are buffers set at init
    _fill_(text_encoder, 3)
    tags = [f"tag{i}" for i in range(config["tags"])]
    torch.manual_seed(4)
    dape = DAPEModel(tag_names=tags, tag_thresholds=[0.7] * len(tags), **config["dape"]).eval()
    tokenizer = CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77
    )
    pipe = SeeSRPipeline(
        vae, text_encoder, tokenizer, unet, controlnet, DDPMScheduler.from_config(SD2_SCHEDULER_CONFIG), dape
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipe) -> dict[str, float]:
    names = ("unet", "controlnet", "vae", "text_encoder", "prompt_extractor")
    return {n: round(sum(p.numel() for p in getattr(pipe, n).parameters()) / 1e6, 2) for n in names}


# Measuring -------------------------------------------------------------------------------------------------------


class StageTimer:
    """Wall time per stage, from forward pre/post hooks on the stage modules."""

    def __init__(self, pipe):
        self.times = dict.fromkeys(STAGES, 0.0)
        self.step_times: list[float] = []
        self._start: dict[str, float] = {}
        self.handles = []
        modules = {
            "dape": [pipe.prompt_extractor],
            "text_encoder": [pipe.text_encoder],
            "vae_encode": [pipe.vae.encoder],
            "denoiser": [m for m in (getattr(pipe, "controlnet", None), pipe.unet) if m is not None],
            "vae_decode": [pipe.vae.decoder],
        }
        for stage, items in modules.items():
            for module in items:
                self.handles.append(module.register_forward_pre_hook(self._pre(stage, module)))
                self.handles.append(module.register_forward_hook(self._post(stage, module)))
        self.unet = pipe.unet

    def _pre(self, stage, module):
        def hook(*_):
            self._start[id(module)] = time.perf_counter()

        return hook

    def _post(self, stage, module):
        def hook(*_):
            elapsed = time.perf_counter() - self._start.pop(id(module))
            self.times[stage] += elapsed
            if module is self.unet:
                self.step_times.append(elapsed)

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def reset_peak() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float:
    with contextlib.suppress(OSError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 2**20
    return float("nan")


def lq_image(seed: int = 0) -> Image.Image:
    side = OUTPUT // UPSCALE
    small = torch.rand(1, 3, side // 4, side // 4, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(small, size=(side, side), mode="bilinear")[0]
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def measure(name: str, pipe, call, steps_run: int, steps_total: int, controlnet_share: bool = True) -> dict:
    """Run ``call()`` once with stage timers; extrapolate the denoiser to ``steps_total`` steps when fewer ran."""
    timer = StageTimer(pipe)
    reset_peak()
    start = time.perf_counter()
    try:
        call()
    finally:
        timer.remove()
    total = time.perf_counter() - start
    stages = dict(timer.times)
    other = total - sum(stages.values())
    if steps_total != steps_run:
        per_step = stages["denoiser"] / steps_run
        stages["denoiser"] = per_step * steps_total
    result = {
        "preset": name,
        "stages_s": {k: round(v, 2) for k, v in stages.items()},
        "other_s": round(other, 2),
        "total_s": round(sum(stages.values()) + other, 2),
        "steps": steps_total,
        "steps_measured": steps_run,
        "extrapolated": steps_total != steps_run,
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    logging.info("%s: %s", name, json.dumps(result))
    return result


def run_seesr(pipe, steps: int, guidance: float, **kwargs):
    return pipe(
        lq_image(),
        upscale=UPSCALE,
        process_size=OUTPUT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    )


def onestep_pipeline(pipe):
    """An ``OSEDiffPipeline`` on ``pipe``'s VAE, text encoder, tokenizer and DAPE, with a stock SD-2 UNet whose
    parameters are the SeeSR UNet's SD parameters themselves (shared Parameter objects: no copy, and a dtype change
    of one is a change of both)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pipelines import OSEDiffPipeline
    from pipelines.pipeline_seesr import SD2_SCHEDULER_CONFIG

    accepted = inspect.signature(UNet2DConditionModel.__init__).parameters
    config = {k: v for k, v in pipe.unet.config.items() if k in accepted}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    stock_keys = set(unet.state_dict())
    shared = {k: v for k, v in pipe.unet.state_dict(keep_vars=True).items() if k in stock_keys}
    if set(shared) != stock_keys:
        raise RuntimeError(f"onestep UNet: SeeSR UNet lacks {sorted(stock_keys - set(shared))[:5]}")
    unet.load_state_dict(shared, assign=True)
    one = OSEDiffPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unet.eval(),
        scheduler=DDPMScheduler.from_config(SD2_SCHEDULER_CONFIG),
        prompt_extractor=pipe.prompt_extractor,
    )
    one.set_progress_bar_config(disable=True)
    return one


def run_onestep(pipe):
    return pipe(
        lq_image(), upscale=UPSCALE, process_size=OUTPUT, generator=torch.Generator().manual_seed(0), output_type="np"
    )


def to_dtype(pipe, dtype: torch.dtype) -> None:
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        torch.nn.Module.to(getattr(pipe, name), dtype=dtype)
    pipe.prompt_extractor.to(dtype=torch.float32)  # DAPE in fp32, as the CLI runs it


def table(results: list[dict]) -> str:
    quality = next(r for r in results if r["preset"] == "quality")
    header = "| preset | steps | " + " | ".join(STAGES) + " | other | total s | speed-up | peak RSS GiB |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        stages = " | ".join(f"{r['stages_s'][s]:.1f}" for s in STAGES)
        steps = f"{r['steps']}" + (f" ({r['steps_measured']} measured)" if r["extrapolated"] else "")
        speed = quality["total_s"] / r["total_s"]
        lines.append(
            f"| {r['preset']} | {steps} | {stages} | {r['other_s']:.1f} | {r['total_s']:.1f} | {speed:.1f}x | "
            f"{r['peak_rss_gib']:.1f} |"
        )
    return "\n".join(lines)


# Exact-preserving / opt-in speed-up checks ----------------------------------------------------------------------


def time_call(function, repeats: int = 3) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def channels_last_check(pipe, dtype: torch.dtype, repeats: int) -> dict:
    """Median times of one UNet call (batch 1, 64x64 latent, RCA on) and of a VAE decode, contiguous vs
    channels_last memory format, in ``dtype``; and whether the outputs are bitwise equal."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, OUTPUT // 8, OUTPUT // 8, generator=generator).to(dtype)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator).to(dtype)
    tokens = torch.randn(1, 145, 512, generator=generator).to(dtype)
    results = {}
    for name, module, call in (
        ("unet", pipe.unet, lambda x: pipe.unet(x, torch.tensor(999), text, image_encoder_hidden_states=tokens)[0]),
        ("vae_decode", pipe.vae, lambda x: pipe.vae.decode(x)[0]),
    ):
        outputs, times = {}, {}
        for fmt in (torch.contiguous_format, torch.channels_last):
            module.to(memory_format=fmt)
            x = latents.contiguous(memory_format=fmt)
            times[str(fmt)] = time_call(lambda x=x, call=call: call(x), repeats)
            outputs[str(fmt)] = call(x).float()
        module.to(memory_format=torch.contiguous_format)
        base, last = (str(f) for f in (torch.contiguous_format, torch.channels_last))
        results[name] = {
            "contiguous_s": round(times[base], 3),
            "channels_last_s": round(times[last], 3),
            "speedup": round(times[base] / times[last], 3),
            "bitwise_equal": bool(torch.equal(outputs[base], outputs[last])),
            "max_abs_diff": float((outputs[base] - outputs[last]).abs().max()),
        }
    logging.info("channels_last (%s): %s", dtype, json.dumps(results))
    return results


@torch.no_grad()
def lean_vae_check(pipe, repeats: int, side: int = OUTPUT) -> dict:
    """VAE decode + encode at ``side`` px, stock resnet blocks vs ``pipelines.common.lean_vae_resnets``, alternating
    (median of ``repeats`` each, after a warm-up); and whether the outputs are bitwise equal."""
    from pipelines.common import lean_vae_resnets

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, side // 8, side // 8, generator=generator).to(pipe.vae.dtype)
    image = (torch.rand(1, 3, side, side, generator=generator) * 2 - 1).to(pipe.vae.dtype)

    def call():
        return pipe.vae.decode(latents).sample, pipe.vae.encode(image).latent_dist.mean

    call()
    times, outputs = {"stock": [], "lean": []}, {}
    for _ in range(repeats):
        for mode in times:
            with lean_vae_resnets(pipe.vae) if mode == "lean" else contextlib.nullcontext():
                start = time.perf_counter()
                outputs[mode] = call()
                times[mode].append(time.perf_counter() - start)
    stock, lean = statistics.median(times["stock"]), statistics.median(times["lean"])
    equal = all(torch.equal(a, b) for a, b in zip(outputs["stock"], outputs["lean"], strict=True))
    result = {"side": side, "stock_s": round(stock, 2), "lean_s": round(lean, 2), "speedup": round(stock / lean, 3)}
    result["bitwise_equal"] = equal
    logging.info("lean VAE resnets: %s", json.dumps(result))
    return result


@torch.no_grad()
def compile_check(repeats: int) -> dict:
    """torch.compile's effect on one ControlNet + UNet step of the ``mid`` config (full size takes too long to
    compile on two CPU cores): compile time, median step time before and after, max difference."""
    pipe = build_pipeline(MID)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, OUTPUT // 8, OUTPUT // 8, generator=generator)
    text = torch.randn(2, 77, MID["unet"]["cross_attention_dim"], generator=generator)
    tokens = torch.randn(2, 145, 512, generator=generator)
    control = torch.rand(2, 3, OUTPUT, OUTPUT, generator=generator)
    embeds = pipe.controlnet.embed_condition(control)

    def step():
        down, mid = pipe.controlnet(
            latents, torch.tensor(999), text, None, image_encoder_hidden_states=tokens, return_dict=False,
            controlnet_cond_embeds=embeds,
        )  # fmt: skip
        return pipe.unet(
            latents, torch.tensor(999), text, image_encoder_hidden_states=tokens,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
        )[0]  # fmt: skip

    eager = time_call(step, repeats)
    reference = step()
    pipe.unet.compile()
    pipe.controlnet.compile()
    start = time.perf_counter()
    compiled_out = step()
    compile_s = time.perf_counter() - start
    compiled = time_call(step, repeats)
    result = {
        "config": "mid",
        "compile_s": round(compile_s, 1),
        "eager_step_s": round(eager, 4),
        "compiled_step_s": round(compiled, 4),
        "speedup": round(eager / compiled, 3),
        "max_abs_diff": float((compiled_out - reference).abs().max()),
    }
    logging.info("torch.compile: %s", json.dumps(result))
    return result


# Main ------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="sd2")
    parser.add_argument("--quality-steps", type=int, default=2, help="quality steps measured (of 50)")
    parser.add_argument("--fast-steps", type=int, default=10, help="fast steps measured (of 10; fewer: extrapolated)")
    parser.add_argument("--presets", default="quality,turbo,onestep,fast,onestep-bf16")
    parser.add_argument(
        "--checks", default="channels_last,compile", help="comma list (channels_last, compile, lean_vae), or 'none'"
    )
    parser.add_argument("--checks-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats in the checks")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_flush_denormal(True)

    from diffusers import DDPMScheduler

    from pipelines.presets import make_scheduler

    config = CONFIGS[args.config]
    start = time.perf_counter()
    pipe = build_pipeline(config)
    logging.info(
        "built %s in %.0f s: %s M parameters", args.config, time.perf_counter() - start, parameter_counts(pipe)
    )
    report = {"config": args.config, "threads": torch.get_num_threads(), "torch": torch.__version__}
    report["parameters_m"] = parameter_counts(pipe)
    results = []
    presets = [] if args.checks_only else args.presets.split(",")
    ddpm = pipe.scheduler
    for name in presets:
        if name == "quality":
            pipe.scheduler = ddpm
            results.append(
                measure(name, pipe, lambda: run_seesr(pipe, args.quality_steps, 5.5), args.quality_steps, 50)
            )
        elif name == "turbo":
            # SD-Turbo's scheduler config ("trailing") read into DDPM: 2 steps at 999, 499; no CFG.
            pipe.scheduler = DDPMScheduler.from_config({**ddpm.config, "timestep_spacing": "trailing"})
            results.append(measure(name, pipe, lambda: run_seesr(pipe, 2, 1.0, latent_tile_overlap=32), 2, 2))
        elif name in ("onestep", "onestep-bf16"):
            to_dtype(pipe, torch.bfloat16 if name.endswith("bf16") else torch.float32)
            one = onestep_pipeline(pipe)
            results.append(measure(name, one, lambda one=one: run_onestep(one), 1, 1))
        elif name == "fast":
            to_dtype(pipe, torch.bfloat16)
            pipe.scheduler = make_scheduler("dpm", ddpm.config)
            results.append(measure(name, pipe, lambda: run_seesr(pipe, args.fast_steps, 5.5), args.fast_steps, 10))
        else:
            raise SystemExit(f"--presets: unknown preset {name!r}")
    if results:
        report["results"] = results
        quality = next((r for r in results if r["preset"] == "quality"), None)
        if quality:
            report["speedups"] = {r["preset"]: round(quality["total_s"] / r["total_s"], 2) for r in results}
            one = next((r for r in results if r["preset"].startswith("onestep")), None)
            if one:
                report["vae_decode_share_onestep"] = {
                    r["preset"]: round(r["stages_s"]["vae_decode"] / r["total_s"], 3)
                    for r in results
                    if r["preset"].startswith("onestep")
                }
            print(table(results))
        print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    checks = [] if args.checks == "none" else args.checks.split(",")
    if "channels_last" in checks:
        report["channels_last"] = {}
        for dtype in (torch.float32, torch.bfloat16):
            to_dtype(pipe, dtype)
            report["channels_last"][str(dtype)] = channels_last_check(pipe, dtype, args.repeats)
        print(json.dumps({"channels_last": report["channels_last"]}, indent=1))
    if "lean_vae" in checks:
        to_dtype(pipe, torch.float32)
        report["lean_vae"] = lean_vae_check(pipe, args.repeats)
        print(json.dumps({"lean_vae": report["lean_vae"]}, indent=1))
    pipe = None
    gc.collect()
    if "compile" in checks:
        report["compile"] = compile_check(args.repeats)
        print(json.dumps({"compile": report["compile"]}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
