"""Captioned HR images for TGSR training, bicubic LR synthesis, and the package-photo training set.

Data sources: a folder of `name.<image ext>` + `name.txt` (the caption), or a JSONL file whose lines are
`{"path": ..., "caption": ...}` (`image`/`text` accepted as aliases; relative paths are relative to the file).
Pixels: `gt` is a float `[0, 1]` tensor `(3, H, W)` made from 8-bit RGB.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset

from seesr.image_io import (
    IMAGE_EXTENSIONS,
    atomic_save_image,
    atomic_write_text,
    load_image,
    pil_to_tensor,
    tensor_to_pil,
)

logger = logging.getLogger(__name__)

DEFAULT_CAPTIONS = Path(__file__).resolve().parents[2] / "configs" / "tgsr_captions.yaml"
PACKAGE_PHOTO_DIRS = {
    "skimage": ("skimage", "data"),
    "sklearn": ("sklearn", "datasets/images"),
    "matplotlib": ("matplotlib", "mpl-data/sample_data"),
}


@dataclass
class CaptionedImage:
    path: Path
    caption: str


def read_captioned_images(source: str | Path) -> list[CaptionedImage]:
    """List (image, caption) pairs from a folder (`name.png` + `name.txt`) or a JSONL file."""
    source = Path(source)
    if source.is_dir():
        items = []
        for path in sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            caption_path = path.with_suffix(".txt")
            if not caption_path.is_file():
                raise ValueError(f"train_data {source}: image {path.name} has no caption file {caption_path.name}")
            items.append(CaptionedImage(path, caption_path.read_text(encoding="utf-8").strip()))
    elif source.is_file() and source.suffix == ".jsonl":
        items = []
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            path = record.get("path", record.get("image"))
            caption = record.get("caption", record.get("text"))
            if not isinstance(path, str) or not isinstance(caption, str):
                raise ValueError(f"train_data {source}:{number}: expected string 'path' and 'caption', got {record!r}")
            items.append(CaptionedImage(source.parent / path, caption.strip()))
    else:
        raise ValueError(f"train_data: got {str(source)!r}, expected a folder of name.png + name.txt or a .jsonl file")
    if not items:
        raise ValueError(f"train_data {source}: no captioned images found")
    return items


def bicubic_downscale(gt: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic LR of a `(B, 3, H, W)` `[0, 1]` batch, through 8-bit PIL (the benchmark's and users' LR)."""
    if factor < 1 or gt.shape[-1] % factor or gt.shape[-2] % factor:
        raise ValueError(f"factor: {factor!r} must be >= 1 and divide the size {tuple(gt.shape[-2:])}")
    size = (gt.shape[-1] // factor, gt.shape[-2] // factor)
    lq = [pil_to_tensor(tensor_to_pil(image).resize(size, Image.BICUBIC)) for image in gt]
    return torch.stack(lq).to(device=gt.device, dtype=gt.dtype)


class CaptionedImageDataset(Dataset):
    """Random `resolution`-pixel HR crops with their captions: items `{"gt": (3, r, r) in [0, 1], "caption": str}`.

    Images smaller than the crop are upscaled (bicubic) to fit. `repeats` draws that many crops per image per
    epoch; `cache_images` keeps decoded images in memory (for small sets). Random crops and flips use the global
    torch RNG, which accelerate seeds (and DataLoader seeds per worker).
    """

    def __init__(
        self,
        source: str | Path,
        resolution: int,
        random_flip: bool = True,
        repeats: int = 1,
        cache_images: bool = False,
    ):
        if resolution < 8:
            raise ValueError(f"resolution: got {resolution!r}, expected an int >= 8")
        if repeats < 1:
            raise ValueError(f"repeats: got {repeats!r}, expected an int >= 1")
        self.items = read_captioned_images(source)
        self.resolution = resolution
        self.random_flip = random_flip
        self.repeats = repeats
        self.cache: dict[int, Image.Image] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def _image(self, index: int) -> Image.Image:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        image = load_image(self.items[index].path).rgb
        short = min(image.size)
        if short < self.resolution:
            scale = self.resolution / short
            image = image.resize((max(round(image.width * scale), self.resolution),
                                  max(round(image.height * scale), self.resolution)), Image.BICUBIC)  # fmt: skip
        if self.cache is not None:
            self.cache[index] = image
        return image

    def __getitem__(self, index: int) -> dict:
        item_index = index % len(self.items)
        image = self._image(item_index)
        left = int(torch.randint(0, image.width - self.resolution + 1, ()))
        top = int(torch.randint(0, image.height - self.resolution + 1, ()))
        gt = pil_to_tensor(image.crop((left, top, left + self.resolution, top + self.resolution)))
        if self.random_flip and bool(torch.rand(()) < 0.5):
            gt = gt.flip(-1)
        return {"gt": gt, "caption": self.items[item_index].caption}


def collate_captioned(batch: list[dict]) -> dict:
    return {"gt": torch.stack([b["gt"] for b in batch]), "caption": [b["caption"] for b in batch]}


def _package_photo(source: str) -> Path | None:
    prefix, _, name = source.partition(":")
    if prefix not in PACKAGE_PHOTO_DIRS or not name:
        raise ValueError(
            f"source: got {source!r}, expected '<package>:<file>' with package in {list(PACKAGE_PHOTO_DIRS)}"
        )
    package, subdir = PACKAGE_PHOTO_DIRS[prefix]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / subdir / name
    return path if path.is_file() else None


def load_captions(path: str | Path = DEFAULT_CAPTIONS) -> tuple[dict[str, dict], list[str]]:
    """Read the captions file: (photos by name, default held-out names)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    photos, held_out = data.get("photos"), data.get("held_out", [])
    if not isinstance(photos, dict) or not all(isinstance(p, dict) and "source" in p and "caption" in p
                                               for p in photos.values()):  # fmt: skip
        raise ValueError(f"{path}: expected 'photos: {{name: {{source, caption}}}}'")
    unknown = [name for name in held_out if name not in photos]
    if unknown:
        raise ValueError(f"{path}: held_out names {unknown} are not in photos")
    return photos, list(held_out)


def prepare_package_photos(
    out_dir: str | Path, held_out: list[str] | tuple[str, ...] | None = None, captions: str | Path = DEFAULT_CAPTIONS
) -> dict[str, list[str]]:
    """Copy the photos shipped in installed packages into `out_dir/train` and `out_dir/held_out` (png + txt).

    `held_out` defaults to the captions file's `held_out` list; those photos go only to `out_dir/held_out`.
    Photos marked `optional` whose package is not installed are skipped with a warning. Returns the names
    written to each split.
    """
    photos, default_held_out = load_captions(captions)
    held_out = list(default_held_out if held_out is None else held_out)
    unknown = [name for name in held_out if name not in photos]
    if unknown:
        raise ValueError(f"held_out: {unknown} are not photos in {captions}; expected names from {sorted(photos)}")
    if len(held_out) >= len(photos):
        raise ValueError(f"held_out: {held_out} leaves no photo to train on")
    written: dict[str, list[str]] = {"train": [], "held_out": []}
    for name, entry in photos.items():
        path = _package_photo(entry["source"])
        if path is None:
            if entry.get("optional", False):
                logger.warning("skipping optional photo %s: %s is not installed", name, entry["source"])
                continue
            raise FileNotFoundError(f"photo {name}: {entry['source']} not found (is its package installed?)")
        split = "held_out" if name in held_out else "train"
        target = Path(out_dir) / split
        target.mkdir(parents=True, exist_ok=True)
        atomic_save_image(load_image(path).rgb, target / f"{name}.png")
        atomic_write_text(target / f"{name}.txt", entry["caption"].strip() + "\n")
        written[split].append(name)
    logger.info("prepared %d training and %d held-out photos in %s", len(written["train"]), len(written["held_out"]),
                out_dir)  # fmt: skip
    return written
