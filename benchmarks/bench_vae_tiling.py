"""Tiled VAE (pipelines/vae_tiling.py) against the untiled VAE and diffusers' tiling: difference, time, peak memory.

Random-weight AutoencoderKL models (``tiny``: the test suite's; ``mid``: 32/64/64/64 channels; ``sd2``: SD's VAE
sizes), a smooth random latent / image. For each config, measured in one run:

1. at ``--size`` px (default 1024; tiles of ``--tile`` px = 512): max / mean absolute difference from the untiled
   decode (and encode: posterior mean) of our exact mode, our fast mode and diffusers' ``enable_tiling`` (25 %
   overlap, each tile normalised alone), with the wall time of each;
2. the peak memory of a decode at ``--mem-sizes`` (default 512,2048; 512 is one tile, so untiled) above the
   memory before the call: CUDA ``max_memory_allocated``; CPU the rise of the peak RSS (VmHWM, reset through
   /proc/self/clear_refs; glibc's mmap threshold fixed at 128 KiB so that freed tensors leave the resident set),
   and peak(largest) / peak(smallest). Memory is the same in both modes (same windows).

    python benchmarks/bench_vae_tiling.py                          # tiny + mid on CPU, a few minutes
    python benchmarks/bench_vae_tiling.py --configs sd2 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipelines.vae_tiling import tiled_decode, tiled_encode  # noqa: E402

CONFIGS = {
    "tiny": {"block_out_channels": (8, 8, 8, 8), "norm_num_groups": 4, "layers_per_block": 1},
    "mid": {"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 32, "layers_per_block": 1},
    "sd2": {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "layers_per_block": 2},
}


def build_vae(name: str, device: str):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    levels = len(CONFIGS[name]["block_out_channels"])
    vae = AutoencoderKL(
        **CONFIGS[name],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        sample_size=512,
    )
    return vae.eval().to(device)


def smooth(shape: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(*shape[:2], *(s // 8 for s in shape[2:]), generator=generator)
    return F.interpolate(low, size=shape[2:], mode="bilinear").to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


@contextlib.contextmanager
def diffusers_tiling(vae, tile: int):
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = tile, tile // 8, 0.25
    try:
        yield
    finally:
        vae.disable_tiling()


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024


def reset_peak(device: str) -> int:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return peak_bytes(device)


def agreement(vae, args) -> list[str]:
    latent = args.size // 8
    latents = smooth((1, 4, latent, latent), 1, args.device) * 3
    image = smooth((1, 3, args.size, args.size), 2, args.device).tanh()
    lines = []
    reference, t_ref = timed(args.device, lambda: vae.decode(latents).sample)
    runs = {
        "ours exact": lambda: tiled_decode(vae, latents, args.tile // 8),
        "ours fast": lambda: tiled_decode(vae, latents, args.tile // 8, exact=False),
    }
    with diffusers_tiling(vae, args.tile):
        runs["diffusers"] = None
        diffusers_out, t_diff = timed(args.device, lambda: vae.decode(latents).sample)
    for label, fn in runs.items():
        out, seconds = (diffusers_out, t_diff) if fn is None else timed(args.device, fn)
        diff = (out.float() - reference.float()).abs()
        lines.append(f"decode {label:<11} max {diff.max():.4f} mean {diff.mean():.5f}  {seconds:7.2f} s")
    lines.append(f"decode {'untiled':<11} {'':>24}  {t_ref:7.2f} s   (output std {reference.std():.3f})")
    reference, t_ref = timed(args.device, lambda: vae.encode(image).latent_dist.mean)
    runs = {
        "ours exact": lambda: tiled_encode(vae, image, args.tile).mean,
        "ours fast": lambda: tiled_encode(vae, image, args.tile, exact=False).mean,
    }
    with diffusers_tiling(vae, args.tile):
        diffusers_out, t_diff = timed(args.device, lambda: vae.encode(image).latent_dist.mean)
    for label, fn in [*runs.items(), ("diffusers", None)]:
        out, seconds = (diffusers_out, t_diff) if fn is None else timed(args.device, fn)
        diff = (out.float() - reference.float()).abs()
        lines.append(f"encode {label:<11} max {diff.max():.4f} mean {diff.mean():.5f}  {seconds:7.2f} s")
    lines.append(f"encode {'untiled':<11} {'':>24}  {t_ref:7.2f} s   (posterior mean std {reference.std():.3f})")
    return lines


def memory(vae, args) -> tuple[list[str], float]:
    if not args.device.startswith("cuda"):  # fixed mmap threshold: freed tensors leave the RSS (no heap retention)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 131072)  # M_MMAP_THRESHOLD
    peaks = {}
    for size in args.mem_sizes:
        latents = smooth((1, 4, size // 8, size // 8), 3, args.device)
        before = reset_peak(args.device)
        with torch.no_grad():
            if size <= args.tile:
                out = vae.decode(latents).sample
            else:
                out = tiled_decode(vae, latents, args.tile // 8, exact=args.mem_exact)
        synchronize(args.device)
        peaks[size] = (peak_bytes(args.device) - before) / 2**20
        del out, latents
    ratio = peaks[args.mem_sizes[-1]] / peaks[args.mem_sizes[0]]
    cells = ", ".join(f"{s} px {p:.1f} MiB" for s, p in peaks.items())
    return [f"decode peak: {cells}; ratio {ratio:.2f}x"], ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=1024, help="image side (px) of the agreement runs")
    parser.add_argument("--tile", type=int, default=512, help="window side (px), as the pipeline's vae_tile_size")
    parser.add_argument("--mem-sizes", default="512,2048")
    parser.add_argument("--mem-exact", action="store_true", help="memory runs in exact mode (slower; same windows)")
    args = parser.parse_args()
    args.mem_sizes = [int(s) for s in args.mem_sizes.split(",")]
    print(f"Tiled VAE benchmark: {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"agreement at {args.size} px, windows of {args.tile} px")  # fmt: skip
    for name in args.configs.split(","):
        vae = build_vae(name, args.device)
        lines, _ = memory(vae, args)
        for line in agreement(vae, args) + lines:
            print(f"  {name:<5} {line}", flush=True)


if __name__ == "__main__":
    main()
