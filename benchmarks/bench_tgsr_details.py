"""Does a TGSR model (default: the bundled one) draw the details a caption asks for on a plain LR?

For each factor (x8, x16) and each caption, the model upscales smooth random colour fields (plain LRs: nothing in
them says which detail to draw) and the script measures:
  * `detail`: the RMS of the output's fine detail (luminance minus its x4 bicubic down-up copy, 0-255 scale):
    how much was added (near 0 for "", "smooth", "plain");
  * `peak`: the dominant spatial frequency of the added detail as (cycles per pixel down, across), from which
    the verdict `seen` is read: vertical stripes have their peak on the horizontal axis (0, f), horizontal stripes
    on the vertical axis (f, 0), diagonal stripes and checks on a diagonal, grids and dots on both axes, and
    "fine" vs "coarse" is the peak's distance from zero (period 2 px = 0.5, period 4 px = 0.25).
Captions mix words of the training vocabulary and other phrasings; `--figure` writes the README figure
(one LR, three captions, three outputs).

    python benchmarks/bench_tgsr_details.py [--model DIR] [--figure docs/tgsr_caption_figure.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seesr.data.tgsr_synthetic import smooth_background, to_uint8  # noqa: E402

CAPTIONS = [
    "",
    "smooth",
    "plain",
    "vertical stripes",
    "horizontal stripes",
    "diagonal stripes",
    "a checkerboard",
    "polka dots",
    "a grid",
    "fine vertical lines",
    "coarse vertical stripes",
    "thin horizontal lines",
    "wide horizontal bands",
    "pinstripes going up and down",
    "lines running side to side",
    "slanted lines",
    "a chessboard pattern",
    "little spots",
    "a mesh of crossing lines",
]


def added_detail(output: np.ndarray) -> np.ndarray:
    """Luminance minus its own x4 bicubic down-up copy: the fine detail (periods <= 4 px), not the background."""
    y = output.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    image = Image.fromarray(y.astype(np.float32), "F")
    size = image.size
    smooth = image.resize((size[0] // 4, size[1] // 4), Image.BICUBIC).resize(size, Image.BICUBIC)
    return y - np.asarray(smooth, dtype=np.float64)


def describe(details: list[np.ndarray]) -> tuple[float, tuple[float, float], str]:
    """Mean RMS (0-255 scale), dominant (fy, fx) in cycles/pixel of the mean amplitude spectrum, and the pattern."""
    rms = float(np.mean([np.sqrt((d**2).mean()) for d in details]))
    spectrum = np.mean([np.abs(np.fft.fft2(d - d.mean())) for d in details], axis=0)
    spectrum[0, 0] = 0
    size = details[0].shape[0]
    fy, fx = np.unravel_index(int(spectrum.argmax()), spectrum.shape)
    fy, fx = [min(f, size - f) / size for f in (fy, fx)]
    if rms < 2.0:
        return rms, (fy, fx), "nothing"
    scale = "fine" if max(fy, fx) > 0.375 else "coarse"
    axis = {0: "horizontal", 1: "vertical"}
    if fy < 0.05 and fx >= 0.2:
        kind = axis[1] + " stripes"
    elif fx < 0.05 and fy >= 0.2:
        kind = axis[0] + " stripes"
    elif abs(fx - fy) < 0.05 and fx >= 0.2:
        off_axis = spectrum[0, :].max() + spectrum[:, 0].max()
        kind = "diagonal or checks" if off_axis < 0.3 * spectrum.max() else "grid or dots"
    else:
        kind = "mixed"
    return rms, (fy, fx), f"{scale} {kind}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="TGSR pipeline folder (default: bundled)")
    parser.add_argument("--count", type=int, default=4, help="plain LRs per factor")
    parser.add_argument("--figure", type=Path, default=None, help="write the one-LR, three-caption figure here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from bench_tgsr import load_pipeline

    pipe = load_pipeline(args.model, args.threads)
    rng = np.random.default_rng(0)
    for factor in (8, 16):
        lrs = [Image.fromarray(to_uint8(smooth_background(64, rng))).resize((64 // factor,) * 2, Image.BICUBIC)
               for _ in range(args.count)]  # fmt: skip
        print(f"\nx{factor}: {args.count} plain LRs {64 // factor}x{64 // factor} -> 64x64")
        print(f"  {'caption':<32} {'detail':>7}  {'peak (fy, fx)':<14} seen")
        for caption in CAPTIONS:
            outputs = pipe(lrs, [caption] * len(lrs), upscale=factor, output_type="np").images
            details = [added_detail((o * 255).round()) for o in outputs]
            rms, peak, seen = describe(details)
            print(f"  {caption or '(empty)':<32} {rms:7.2f}  ({peak[0]:.2f}, {peak[1]:.2f})   {seen}")
    if args.figure is not None:
        background = smooth_background(128, np.random.default_rng(7))
        lr = Image.fromarray(to_uint8(background)).resize((16, 16), Image.BICUBIC)
        captions = ["vertical stripes", "horizontal stripes", "polka dots"]
        outputs = pipe([lr] * 3, captions, upscale=8).images
        cells = [lr.resize((128, 128), Image.NEAREST), *outputs]
        figure = Image.new("RGB", (len(cells) * 132 + 4, 132), "white")
        for i, cell in enumerate(cells):
            figure.paste(cell, (4 + i * 132, 2))
        figure = figure.resize((figure.width * 2, figure.height * 2), Image.NEAREST)
        figure.save(args.figure)
        print(f"\nfigure: {args.figure} (LR 16x16 shown enlarged, then x8 with: {', '.join(captions)})")


if __name__ == "__main__":
    main()
