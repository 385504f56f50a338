"""Synthetic captioned detail images for TGSR: fine patterns that a x8 / x16 LR cannot show, named only by text.

Every image is a smooth random colour field (low frequencies only) plus one zero-mean grey pattern whose period is
2 or 4 HR pixels, anchored at pixel (0, 0). A bicubic downscale by 8 or 16 removes such a pattern almost entirely
(the LRs of two patterns on the same background agree to > 45 dB), while the HRs differ strongly: only the caption
can tell the model which pattern to draw. The phase is anchored to the image grid so that it is predictable once
the pattern is named; keep crops aligned and flips off for these images (`random_flip: false`, whole-image crops).

Two vocabularies use the same patterns:

* `BENCHMARK_CLASSES` (benchmarks/bench_tgsr_text.py): six classes, each with training phrasings and a DISJOINT
  set of held-out phrasings (other words for the same pattern) used only for testing;
* `DETAIL_CLASSES` (the captioned detail set of the bundled default, `prepare_detail_set`): generic detail words
  (stripes in three orientations, checks, dots, a grid, fine vs coarse, plain) in many phrasings.

Pixels are float `[0, 1]` arrays `(H, W, 3)`; images are written as 8-bit PNG + caption `.txt`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


def pattern_mask(kind: str, size: int, period: int) -> np.ndarray:
    """A `(size, size)` 0/1 mask of a pattern anchored at (0, 0): `kind` in `PATTERNS`, `period` in HR pixels."""
    y, x = np.mgrid[0:size, 0:size]
    half = max(period // 2, 1)
    if kind == "plain":
        return np.zeros((size, size))
    if kind == "vertical":
        mask = (x % period) < half
    elif kind == "horizontal":
        mask = (y % period) < half
    elif kind == "diagonal":
        mask = ((x + y) % period) < half
    elif kind == "antidiagonal":
        mask = ((x - y) % period) < half
    elif kind == "checks":
        mask = ((x // half + y // half) % 2) == 0
    elif kind == "dots":
        dot = max(period // 4, 1)
        mask = ((x % period) < dot) & ((y % period) < dot)
    elif kind == "grid":
        mask = ((x % period) == 0) | ((y % period) == 0)
    else:
        raise ValueError(f"pattern: got {kind!r}, expected one of {PATTERNS}")
    return mask.astype(np.float64)


PATTERNS = ("plain", "vertical", "horizontal", "diagonal", "antidiagonal", "checks", "dots", "grid")


def smooth_background(size: int, rng: np.random.Generator, low: float = 0.3, high: float = 0.65) -> np.ndarray:
    """A smooth random colour field `(size, size, 3)`: a random 3x3 RGB grid, bicubically enlarged."""
    from PIL import Image as _Image

    grid = rng.uniform(low, high, size=(3, 3, 3))
    channels = [
        np.asarray(_Image.fromarray(grid[..., c].astype(np.float32), "F").resize((size, size), Image.BICUBIC))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, -1), 0.0, 1.0).astype(np.float64)


def detail_image(background: np.ndarray, kind: str, period: int = 2, contrast: float = 0.3) -> np.ndarray:
    """`background` plus a dark, zero-mean grey `kind` pattern of `period` and peak-to-peak `contrast`."""
    mask = pattern_mask(kind, background.shape[0], period)
    pattern = -(mask - mask.mean()) * contrast
    return np.clip(background + pattern[..., None], 0.0, 1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class DetailClass:
    """A pattern (`kind`, `period`) and the phrasings that name it: `train` and disjoint `held_out` ones."""

    name: str
    kind: str
    period: int
    train: tuple[str, ...]
    held_out: tuple[str, ...] = ()


# The benchmark's classes. Held-out phrasings avoid every class word of the training phrasings of their class
# (other words for the same pattern, not other templates around the same words).
BENCHMARK_CLASSES: tuple[DetailClass, ...] = (
    DetailClass(
        "vertical",
        "vertical",
        2,
        train=(
            "vertical stripes",
            "thin vertical lines",
            "a pattern of vertical bars",
            "stripes running vertically",
            "fabric with fine vertical stripes",
        ),
        held_out=("upright pinstripes", "lines going up and down", "bands running from top to bottom"),
    ),
    DetailClass(
        "horizontal",
        "horizontal",
        2,
        train=(
            "horizontal stripes",
            "thin horizontal lines",
            "a pattern of horizontal bars",
            "stripes running horizontally",
            "fabric with fine horizontal stripes",
        ),
        held_out=("lines lying flat, side to side", "bands running from left to right", "level pinstripes"),
    ),
    DetailClass(
        "diagonal",
        "diagonal",
        4,
        train=(
            "diagonal stripes",
            "slanted lines",
            "a pattern of diagonal bars",
            "stripes at an angle",
            "fabric with fine diagonal stripes",
        ),
        held_out=("oblique bands", "lines tilted at forty-five degrees", "sloping pinstripes"),
    ),
    DetailClass(
        "checks",
        "checks",
        4,
        train=(
            "a checkerboard pattern",
            "small checks",
            "a chequered texture",
            "alternating light and dark squares",
            "fabric with a fine check pattern",
        ),
        held_out=("a chessboard", "a tiled board of tiny squares", "gingham"),
    ),
    DetailClass(
        "dots",
        "dots",
        4,
        train=(
            "small dots",
            "a polka dot pattern",
            "a field of tiny spots",
            "evenly spaced dots",
            "fabric with little dots",
        ),
        held_out=("speckles", "pinpoints scattered in rows", "a pattern of tiny circles"),
    ),
    DetailClass(
        "plain",
        "plain",
        2,
        train=(
            "a smooth plain surface",
            "no texture at all",
            "a flat even colour",
            "a blank untextured area",
            "smooth fabric without pattern",
        ),
        held_out=("featureless", "an empty uniform region", "clean and bare"),
    ),
)

# The bundled default's detail vocabulary: generic words, many phrasings, no held-out split (users phrase freely).
_STRIPES = ("stripes", "lines", "bars", "stripe pattern", "pinstripes", "bands", "striped texture")
_SCALES = {2: ("fine", "thin", "narrow", "tiny", "very fine"), 4: ("coarse", "wide", "thick", "broad", "bold")}
_ORIENT = {
    "vertical": ("vertical", "upright", "up and down", "top to bottom", "standing"),
    "horizontal": ("horizontal", "flat", "side to side", "left to right", "lying"),
    "diagonal": ("diagonal", "slanted", "oblique", "tilted", "sloping", "45 degree"),
}


def _detail_phrasings() -> dict[tuple[str, int], tuple[str, ...]]:
    phrasings: dict[tuple[str, int], list[str]] = {}
    for orientation, words in _ORIENT.items():
        for period, scales in _SCALES.items():
            out = phrasings.setdefault((orientation, period), [])
            for i, word in enumerate(words):
                noun = _STRIPES[i % len(_STRIPES)]
                out += [f"{word} {noun}", f"{scales[i % len(scales)]} {word} {noun}",
                        f"{noun} running {word}" if " " not in word else f"{noun} going {word}"]  # fmt: skip
    for period, scales in _SCALES.items():
        phrasings[("checks", period)] = [f"{s} checks" for s in scales] + [
            "a checkerboard", "checkered pattern", "chequered", "a chessboard pattern", "checks", "plaid squares",
            "alternating squares"]  # fmt: skip
        phrasings[("dots", period)] = [f"{s} dots" for s in scales] + [
            "polka dots", "dotted", "spots", "a dot pattern", "speckles", "little dots", "dots"]  # fmt: skip
        phrasings[("grid", period)] = [f"{s} grid" for s in scales] + [
            "a grid", "grid lines", "a mesh", "a lattice", "a square grid", "crossing lines",
            "graph paper"]  # fmt: skip
    phrasings[("plain", 2)] = ["smooth", "plain", "a smooth surface", "flat colour", "no texture", "blank",
                               "untextured", "clean and even"]  # fmt: skip
    return {key: tuple(dict.fromkeys(value)) for key, value in phrasings.items()}


DETAIL_PHRASINGS = _detail_phrasings()


def detail_kind(key: tuple[str, int]) -> tuple[str, int]:
    kind, period = key
    grid_period = {2: 4, 4: 8}
    return kind, grid_period[period] if kind in ("grid", "dots") else period


def write_set(out_dir: Path, items: list[tuple[np.ndarray, str]], prefix: str) -> list[Path]:
    """Write `(image, caption)` pairs as `prefix_00000.png` + `.txt` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, caption) in enumerate(items):
        path = out_dir / f"{prefix}_{i:05d}.png"
        Image.fromarray(to_uint8(image), "RGB").save(path)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def prepare_detail_set(out_dir: str | Path, count: int = 1024, size: int = 64, seed: int = 0) -> list[Path]:
    """The bundled default's captioned detail set: `count` `size`-pixel images (png + txt) in `out_dir`.

    Pattern and phrasing are drawn uniformly; both diagonals are called "diagonal". Plain images are captioned
    "smooth", "plain", ... so those words add nothing.
    """
    rng = np.random.default_rng(seed)
    keys = sorted(DETAIL_PHRASINGS)
    items = []
    for _ in range(count):
        key = keys[int(rng.integers(len(keys)))]
        kind, period = detail_kind(key)
        if kind == "diagonal" and rng.random() < 0.5:
            kind = "antidiagonal"
        phrasings = DETAIL_PHRASINGS[key]
        caption = phrasings[int(rng.integers(len(phrasings)))]
        items.append((detail_image(smooth_background(size, rng), kind, period), caption))
    paths = write_set(Path(out_dir), items, "detail")
    logger.info("wrote %d captioned detail images to %s", len(paths), out_dir)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic captioned detail set (png + txt).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=1024)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    prepare_detail_set(args.out_dir, args.count, args.size, args.seed)


if __name__ == "__main__":
    main()
