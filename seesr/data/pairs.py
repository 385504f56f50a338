"""Make training/evaluation pairs offline: gt/, lq/ and sr_bicubic/ PNGs with the Real-ESRGAN degradation.

Each input image is randomly cropped to RESOLUTION (reflect-padded if smaller), degraded with the same
`seesr.data.degradation.degrade` the training step uses, and written as `gt/NAME.png` (USM-sharpened if the config
says so), `lq/NAME.png` (RESOLUTION / SCALE) and `sr_bicubic/NAME.png` (the LQ bicubic-upsampled by SCALE), as
SeeSR's offline data workflow does. The resolved degradation config is saved as `degradation.yaml`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from seesr.data.degradation import DegradationConfig

logger = logging.getLogger(__name__)

SUBFOLDERS: tuple[str, ...] = ("gt", "lq", "sr_bicubic")


@dataclass
class PairsResult:
    """`written`: output names (stems) of the pairs written; `errors`: one line per input that was skipped."""

    written: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _output_names(files: list[Path]) -> list[str]:
    # Stems, made unique with a numeric suffix when two inputs share one (e.g. a/x.png and b/x.jpg).
    names: list[str] = []
    used: set[str] = set()
    for path in files:
        name, n = path.stem, 1
        while name in used:
            name, n = f"{path.stem}_{n}", n + 1
        used.add(name)
        names.append(name)
    return names


def _write_batch(gt: torch.Tensor, lq: torch.Tensor, scale: int, names: list[str], output_dir: Path) -> None:
    import torch.nn.functional as F

    from seesr.image_io import atomic_save_image, tensor_to_pil

    if lq.shape[-2:] == gt.shape[-2:]:
        sr = lq
    else:
        sr = F.interpolate(lq, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
    for index, name in enumerate(names):
        for folder, images in zip(SUBFOLDERS, (gt, lq, sr)):
            atomic_save_image(tensor_to_pil(images[index]), output_dir / folder / f"{name}.png")


def make_pairs(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    config: DegradationConfig | None = None,
    seed: int = 0,
    resolution: int = 512,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    max_pixels: int | None = 64_000_000,
    progress: bool = True,
) -> PairsResult:
    """Write `gt/`, `lq/` and `sr_bicubic/` PNG pairs for image files / folders / globs in `inputs`.

    Crops are fixed by (`seed`, input position); the degradation draws from one generator on `device` seeded
    with `seed`, so a rerun with the same arguments writes the same files. Bad inputs are skipped and listed in
    the result's `errors`; files are written atomically.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from seesr.data.degradation import DegradationConfig, degrade
    from seesr.data.image_folder import random_crop
    from seesr.image_io import ImageLoadError, atomic_write_text, expand_inputs, load_image

    config = config if config is not None else DegradationConfig()
    if not isinstance(resolution, int) or resolution < 2 * config.scale or resolution % config.scale:
        raise ValueError(f"resolution={resolution!r} must be an int divisible by scale={config.scale}, >= 2*scale")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = torch.device(device)
    output_dir = Path(output_dir)
    files, errors = expand_inputs([str(p) for p in inputs])
    result = PairsResult(errors=list(errors))
    _write_config(output_dir, config, seed, resolution, atomic_write_text)
    generator = torch.Generator(device).manual_seed(seed)
    names = _output_names(files)
    with tqdm(total=len(files), unit="img", desc="make-pairs", disable=None if progress else True) as bar:
        for start in range(0, len(files), batch_size):
            crops, batch_names = [], []
            for index in range(start, min(start + batch_size, len(files))):
                try:
                    pixels = np.asarray(load_image(files[index], max_pixels=max_pixels).rgb)
                except ImageLoadError as exc:
                    result.errors.append(str(exc))
                    bar.update(1)
                    continue
                crops.append(random_crop(pixels, resolution, random.Random(f"{seed}:{index}")))
                batch_names.append(names[index])
            if crops:
                gt = torch.from_numpy(np.stack(crops)).to(device).permute(0, 3, 1, 2).float() / 255.0
                with torch.no_grad():
                    out = degrade(gt, config, generator)
                _write_batch(out.gt, out.lq, config.scale, batch_names, output_dir)
                result.written.extend(batch_names)
                bar.update(len(crops))
    return result


def _write_config(output_dir: Path, config: DegradationConfig, seed: int, resolution: int, write_text) -> None:
    import yaml

    header = f"# written by `seesr make-pairs` (seed {seed}, resolution {resolution})\n"
    write_text(output_dir / "degradation.yaml", header + yaml.safe_dump({"degradation": config.to_dict()}))
