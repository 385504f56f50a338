"""SeeSR training throughput: samples/s, peak memory and the share of step time spent in the degradation.

Runs the real training step of `seesr.training.controlnet` (degrade -> DAPE/CLIP/VAE -> ControlNet + UNet ->
backward -> AdamW) on randomly initialised models written to a temporary SD2-layout folder, for a tiny and a
mid-size config (or a real Stable Diffusion 2 + DAPE with ``--pretrained_model`` / ``--dape_model``). The
degradation time is measured inside the same steps by timing `seesr.training.controlnet.degraded_condition`.

    python benchmarks/bench_training.py [--device cuda] [--steps 5] [--configs tiny mid]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's packages (dape included) even when the install predates them

import seesr.training.controlnet as train_module  # noqa: E402
from pipelines.pipeline_seesr import SD2_SCHEDULER_CONFIG as SD2_SCHEDULER  # noqa: E402
from seesr.data.image_folder import collate  # noqa: E402
from seesr.training.config import load_config  # noqa: E402
from seesr.training.controlnet import SeeSRTrainConfig, setup_training, training_loss  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "tiny_clip_tokenizer"

# name: (UNet widths, layers per block, text width, VAE widths, DAPE (embed, depths, heads, window, size, proj),
#        resolution, batch)
CONFIGS = {
    "tiny": ((32, 64), 1, 32, (16, 16, 16, 16), (8, (1, 1), (1, 2), 4, 32, 32), 64, 4),
    "mid": ((64, 128, 256, 256), 2, 256, (32, 64, 64, 64), (32, (2, 2, 2, 2), (1, 2, 4, 8), 7, 224, 256), 256, 4),
}


def write_stack(folder: Path, name: str) -> tuple[Path, Path, int, int]:
    """A random SD2-layout folder and a DAPE folder for config ``name``; returns (sd, dape, resolution, batch)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dape import DAPEModel

    widths, layers, text_dim, vae_widths, dape_arch, resolution, batch = CONFIGS[name]
    torch.manual_seed(0)
    heads = [max(1, w // 32) for w in widths]
    down = ["CrossAttnDownBlock2D"] * (len(widths) - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(widths) - 1)
    unet = UNet2DConditionModel(block_out_channels=widths, layers_per_block=layers, cross_attention_dim=text_dim,
                                attention_head_dim=heads, down_block_types=down, up_block_types=up,
                                norm_num_groups=min(32, widths[0]), use_linear_projection=True)  # fmt: skip
    unet.save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=vae_widths, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=min(32, vae_widths[0]),
                  layers_per_block=1).save_pretrained(folder / "vae")  # fmt: skip
    tokenizer = CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
                                 num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    DDPMScheduler.from_config(SD2_SCHEDULER).save_pretrained(folder / "scheduler")
    embed, depths, dape_heads, window, size, proj = dape_arch
    DAPEModel(tag_names=[f"tag{i}" for i in range(64)], tag_thresholds=[0.5] * 64, image_size=size, embed_dim=embed,
              depths=depths, num_heads=dape_heads, window_size=window, projection_dim=proj,
              tagging_hidden_size=64, tagging_num_layers=2, tagging_num_heads=4,
              tagging_intermediate_size=128).save_pretrained(folder / "dape")  # fmt: skip
    return folder, folder / "dape", resolution, batch


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, sd: Path, dape: Path | None, resolution: int, batch: int, args) -> dict[str, float]:
    device = torch.device(args.device)
    items = [f"pretrained_model={sd}", f"data.resolution={resolution}", "data.train_data=.",
             f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}"]  # fmt: skip
    items.append(f"dape_model={dape}" if dape else "dape_model=null")
    if not dape:
        items.append("trainable_modules=[]")
    cfg = load_config(SeeSRTrainConfig, None, items)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup = setup_training(cfg, device, dtype)
    params = [p for m in (setup.unet, setup.controlnet) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator(device=device).manual_seed(0)
    gt = torch.rand(batch, 3, resolution, resolution, generator=generator, device=device)
    data = collate([{"gt": g, "path": "", "tags": "a tag, another tag"} for g in gt])
    degrade_time = [0.0]
    original = train_module.degraded_condition

    def timed(*a, **k):
        sync(device)
        start = time.perf_counter()
        out = original(*a, **k)
        sync(device)
        degrade_time[0] += time.perf_counter() - start
        return out

    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    train_module.degraded_condition = timed
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                sync(device)
                degrade_time[0], start = 0.0, time.perf_counter()
            with autocast:
                loss = training_loss(setup.parts, setup.unet, setup.controlnet, data, cfg, generator, dtype)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        elapsed = time.perf_counter() - start
    finally:
        train_module.degraded_condition = original
    result = {"samples/s": batch * args.steps / elapsed, "step s": elapsed / args.steps,
              "degradation share": degrade_time[0] / elapsed}  # fmt: skip
    trainable = sum(p.numel() for p in params) / 1e6
    print(f"{name:6s} {resolution:4d}px batch {batch:2d} | {trainable:8.2f} M trainable | "
          f"{result['samples/s']:8.2f} samples/s | {result['step s'] * 1e3:8.1f} ms/step | "
          f"degradation {100 * result['degradation share']:5.1f}% | peak {peak_memory(device)}")  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--pretrained_model", default=None, help="also benchmark a real SD2 folder / hub id")
    parser.add_argument("--dape_model", default=None, help="DAPE folder for --pretrained_model")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(f"device {args.device}, mixed precision {args.mixed_precision}, torch {torch.__version__}, "
          f"{args.steps} timed steps after {args.warmup} warm-up", file=sys.stderr)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            sd, dape, resolution, batch = write_stack(Path(tmp) / name, name)
            bench(name, sd, dape, resolution, batch, args)
    if args.pretrained_model:
        bench("sd2", args.pretrained_model, args.dape_model, args.resolution, args.batch, args)


if __name__ == "__main__":
    main()
