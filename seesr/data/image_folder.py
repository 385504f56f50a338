"""Training data: HR images of any size as random square crops in [0, 1], with optional pre-extracted tags.

No degradation and no model code here: the training step runs `seesr.data.degradation.degrade` on the batched
crops, on the training device. Tags (the `tag1, tag2, ...` text `seesr tag` writes) are read from `NAME.txt`
beside each image or in a `tags_dir`; a sample without one has `tags=None` and the training step may tag it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from seesr.image_io import IMAGE_EXTENSIONS, ImageLoadError, expand_inputs, load_image

logger = logging.getLogger(__name__)

LIST_FILE_SUFFIXES: frozenset[str] = frozenset({".txt", ".lst", ".list"})


def read_list_file(path: str | Path) -> list[Path]:
    """Paths listed one per line; blank lines and `#` comments are skipped, relative paths are relative to the
    list file's folder."""
    path = Path(path)
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line).expanduser()
            entries.append(entry if entry.is_absolute() else path.parent / entry)
    return entries


def find_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files from a folder (recursive, sorted), a list file (.txt/.lst/.list), one image, or a sequence of
    those. Missing entries are logged and skipped; raises ValueError when nothing is found."""
    sources = [source] if isinstance(source, str | Path) else list(source)
    patterns: list[str] = []
    for item in sources:
        item = Path(item)
        if item.is_file() and item.suffix.lower() in LIST_FILE_SUFFIXES:
            patterns.extend(str(p) for p in read_list_file(item))
        else:
            patterns.append(str(item))
    files, errors = expand_inputs(patterns)
    for error in errors:
        logger.warning("skipping %s", error)
    if not files:
        raise ValueError(f"source={source!r}: no image files found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def random_crop(image: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    """A random `size` x `size` crop of an (H, W, C) array; sides shorter than `size` are first padded at the
    bottom/right by reflection (without repeating the edge pixel)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        pad = ((0, max(0, size - h)), (0, max(0, size - w))) + ((0, 0),) * (image.ndim - 2)
        image = np.pad(image, pad, mode="reflect" if min(h, w) > 1 else "edge")
        h, w = image.shape[:2]
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return image[top : top + size, left : left + size]


class ImageFolderDataset(Dataset):
    """HR images as random crops for the training step.

    Args:
        source: a folder (searched recursively), a list file with one image path per line, an image file, or a
            sequence of those.
        resolution: side of the square crop (smaller images are reflect-padded).
        flip: random horizontal flip with probability 0.5.
        tags_dir: a folder holding `NAME.txt` tag files (by image stem, or by the image's path relative to its
            source folder); tags beside the image are used too.
        seed: with `set_epoch`, fixes the crop and flip of every (epoch, index), in any worker.
        max_pixels: images with more pixels are treated as unreadable.

    Items are `{"gt": (3, resolution, resolution) float32 in [0, 1], "path": str, "tags": str | None}`.
    An unreadable file is logged once (per worker) and replaced by the next readable one; a RuntimeError is
    raised only when no file can be read. Batch with `collate`.
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        resolution: int = 512,
        flip: bool = True,
        tags_dir: str | Path | None = None,
        seed: int = 0,
        max_pixels: int | None = 64_000_000,
    ) -> None:
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if tags_dir is not None and not Path(tags_dir).is_dir():
            raise ValueError(f"tags_dir={str(tags_dir)!r} is not a folder")
        self.files = find_images(source)
        self.roots = [Path(s) for s in ([source] if isinstance(source, str | Path) else source) if Path(s).is_dir()]
        self.resolution = resolution
        self.flip = flip
        self.tags_dir = Path(tags_dir) if tags_dir is not None else None
        self.seed = seed
        self.max_pixels = max_pixels
        self.epoch = 0
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Select the crops/flips of another epoch (call before iterating, like DistributedSampler)."""
        self.epoch = epoch

    def tag_file(self, path: Path) -> Path | None:
        """The tag file for an image, or None: `tags_dir/REL.txt`, `tags_dir/STEM.txt`, then `STEM.txt` beside."""
        candidates = []
        if self.tags_dir is not None:
            for root in self.roots:
                if path.is_relative_to(root):
                    candidates.append(self.tags_dir / path.relative_to(root).with_suffix(".txt"))
            candidates.append(self.tags_dir / f"{path.stem}.txt")
        candidates.append(path.with_suffix(".txt"))
        return next((c for c in candidates if c.is_file()), None)

    def read_tags(self, path: Path) -> str | None:
        tag_file = self.tag_file(path)
        if tag_file is None:
            return None
        try:
            return tag_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("%s: cannot read tags (%s); using none", tag_file, exc)
            return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            if i in self._unreadable:
                continue
            try:
                rgb = load_image(self.files[i], max_pixels=self.max_pixels).rgb
            except ImageLoadError as exc:
                logger.warning("skipping unreadable training image: %s", exc)
                self._unreadable.add(i)
                continue
            return self._make_item(i, np.asarray(rgb), index)
        raise RuntimeError(f"none of the {len(self.files)} image files of the dataset could be read")

    def _make_item(self, i: int, pixels: np.ndarray, index: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        crop = random_crop(pixels, self.resolution, rng)
        if self.flip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        gt = torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255.0
        path = self.files[i]
        return {"gt": gt, "path": str(path), "tags": self.read_tags(path)}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack `gt` into (B, 3, H, W); keep `path` and `tags` as lists (tags may hold None)."""
    return {
        "gt": torch.stack([item["gt"] for item in batch]),
        "path": [item["path"] for item in batch],
        "tags": [item["tags"] for item in batch],
    }
