"""Peak memory and time of OSEDiffPipeline against output size, random-weight models with OSEDiff's LoRA (CPU/GPU).

Each size runs in a fresh subprocess of this script: models built, one 512 px warm-up call, the peak reset
(bench_pipeline.reset_cpu_peak; CUDA: reset_peak_memory_stats), then one call at the size (pipeline defaults:
latent tiles 96 / 32, VAE tiles 512 px, adain, "pil"). Printed: the peak above that baseline, its ratio to the
smallest size's and the wall time, all from one run. Model sizes are bench_pipeline.CONFIGS (tiny / mid / sd2).

    python benchmarks/bench_osediff.py --config tiny --sizes 512,1024,2048     # CPU, ~20 min on two busy cores
    python benchmarks/bench_osediff.py --config sd2 --device cuda --sizes 512,1024,2048,4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_pipeline import CONFIGS, current_peak, lq_image, random_text_encoder, random_vae, reset_cpu_peak  # noqa: E402

MARK = "BENCH_OSEDIFF "


def build(config_name: str, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    from pipelines import OSEDiffPipeline
    from pipelines.pipeline_osediff import default_scheduler
    from seesr.models.onestep import add_unet_lora, add_vae_lora

    config = CONFIGS[config_name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{k: v for k, v in config["unet"].items() if not k.startswith("image_")})
    vae = random_vae(config)
    add_unet_lora(unet)
    add_vae_lora(vae)
    text_encoder, tokenizer = random_text_encoder(config)
    pipe = OSEDiffPipeline(vae.eval(), text_encoder, tokenizer, unet.eval(), default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def child(args: argparse.Namespace, size: int) -> dict:
    pipe = build(args.config, args.device, getattr(torch, args.dtype))
    generator = torch.Generator().manual_seed(0)
    pipe(lq_image(512), generator=generator)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = reset_cpu_peak()
    start = time.perf_counter()
    pipe(lq_image(size), generator=torch.Generator().manual_seed(0))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "size": size,
        "peak_mb": (current_peak(args.device) - baseline) / 2**20,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="tiny")
    parser.add_argument("--sizes", default="512,1024,2048", help="output sizes (px, square; input = size / 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sys.stdout.write(MARK + json.dumps(child(args, args.child)) + "\n")
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        argv = [sys.executable, __file__, "--config", args.config, "--device", args.device, "--dtype", args.dtype]
        result = subprocess.run([*argv, "--child", str(size)], capture_output=True, text=True, check=True)
        rows.append(
            json.loads(next(line for line in result.stdout.splitlines() if line.startswith(MARK))[len(MARK) :])
        )
    sys.stdout.write(f"OSEDiffPipeline, config {args.config}, {args.device} {args.dtype}\n")
    sys.stdout.write("| output | peak above baseline (MB) | x smallest | time (s) |\n|---|---|---|---|\n")
    for row in rows:
        ratio = row["peak_mb"] / rows[0]["peak_mb"]
        sys.stdout.write(f"| {row['size']} | {row['peak_mb']:.0f} | {ratio:.2f} | {row['seconds']:.1f} |\n")


if __name__ == "__main__":
    main()
