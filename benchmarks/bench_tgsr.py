"""Acceptance figures for a TGSR pipeline (default: the bundled weights/tgsr-default) on the held-out photos.

For each held-out photo (never trained on): GT cropped to a multiple of the factor, LR = 8-bit PIL bicubic
downscale (the paper's setting), then PSNR / SSIM (Y channel, `crop_border` = factor) of
  * PIL bicubic upscaling of the LR (the baseline),
  * the model with the photo's correct caption, with an empty prompt, and with a wrong caption (another photo's),
and the model's time per output megapixel with `--threads` CPU threads.

    python benchmarks/bench_tgsr.py [--model weights/tgsr-default] [--upscale 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.pipeline_tgsr import TGSRPipeline
from seesr.data.captioned import prepare_package_photos, read_captioned_images
from seesr.metrics import psnr, ssim
from seesr.models.tgsr import default_model_path


def load_pipeline(model: Path | None, threads: int) -> TGSRPipeline:
    """The TGSR pipeline in ``model`` (default: the bundled weights), progress bar off, with quiet logging and
    ``threads`` torch threads (the setup every TGSR benchmark shares)."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    pipe = TGSRPipeline.from_pretrained(model or default_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def held_out_photos(folder: Path | None) -> list[tuple[str, Image.Image, str]]:
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="tgsr-bench-"))
        prepare_package_photos(folder)
        folder = folder / "held_out"
    return [(item.path.stem, Image.open(item.path).convert("RGB"), item.caption) for item in
            read_captioned_images(folder)]  # fmt: skip


def evaluate(pipe: TGSRPipeline, photos, upscale: int, tile_size: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    seconds, megapixels = 0.0, 0.0
    for index, (name, photo, caption) in enumerate(photos):
        width, height = (photo.width // upscale) * upscale, (photo.height // upscale) * upscale
        gt = photo.crop((0, 0, width, height))
        lq = gt.resize((width // upscale, height // upscale), Image.BICUBIC)
        wrong = photos[(index + 1) % len(photos)][2]
        outputs = {"bicubic": lq.resize((width, height), Image.BICUBIC)}
        for label, prompt in (("correct", caption), ("empty", ""), ("wrong", wrong)):
            start = time.perf_counter()
            outputs[label] = pipe(lq, prompt, upscale=upscale, tile_size=tile_size).images[0]
            if label == "correct":
                seconds += time.perf_counter() - start
                megapixels += width * height / 1e6
        gt_array = np.asarray(gt)
        line = [f"{name:<18} {width}x{height}"]
        for label, image in outputs.items():
            scores = (psnr(np.asarray(image), gt_array, upscale), ssim(np.asarray(image), gt_array, upscale))
            results.setdefault(f"{label}/psnr", []).append(scores[0])
            results.setdefault(f"{label}/ssim", []).append(scores[1])
            line.append(f"{label} {scores[0]:.2f}/{scores[1]:.4f}")
        print("  ".join(line))
    results["seconds_per_megapixel"] = [seconds / megapixels]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="TGSR pipeline folder (default: bundled)")
    parser.add_argument("--photos", type=Path, default=None, help="folder of name.png + name.txt (default: held-out)")
    parser.add_argument("--upscale", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile_size", type=int, default=256)
    args = parser.parse_args()
    pipe = load_pipeline(args.model, args.threads)
    photos = held_out_photos(args.photos)
    pipe(photos[0][1].resize((32, 32)), "", upscale=args.upscale)  # warm-up
    print(f"TGSR x{args.upscale} on {len(photos)} held-out photos ({', '.join(p[0] for p in photos)}), "
          f"PSNR/SSIM on Y, crop_border={args.upscale}, {args.threads} threads")  # fmt: skip
    results = evaluate(pipe, photos, args.upscale, args.tile_size)
    mean = {key: statistics.fmean(values) for key, values in results.items()}
    print(f"\n{'':<10} {'PSNR (dB)':>10} {'SSIM':>8}")
    for label in ("bicubic", "correct", "empty", "wrong"):
        print(f"{label:<10} {mean[f'{label}/psnr']:>10.3f} {mean[f'{label}/ssim']:>8.4f}")
    gain = (mean["correct/psnr"] - mean["bicubic/psnr"], mean["correct/ssim"] - mean["bicubic/ssim"])
    print(f"\nmodel (correct caption) - bicubic: {gain[0]:+.3f} dB PSNR, {gain[1]:+.4f} SSIM")
    for label in ("empty", "wrong"):
        print(f"correct caption - {label} prompt: {mean['correct/psnr'] - mean[f'{label}/psnr']:+.4f} dB PSNR, "
              f"{mean['correct/ssim'] - mean[f'{label}/ssim']:+.5f} SSIM")  # fmt: skip
    print(f"time: {mean['seconds_per_megapixel']:.2f} s per output megapixel ({args.threads} threads)")
    beats = gain[0] > 0 and gain[1] > 0
    print("PASS: beats bicubic on PSNR and SSIM" if beats else "FAIL: does not beat bicubic on both PSNR and SSIM")


if __name__ == "__main__":
    main()
