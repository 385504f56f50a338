"""Training and evaluation data; nothing here imports training, the CLI or the pipelines.

- `degradation`: the Real-ESRGAN second-order degradation (`DegradationConfig`, `degrade`), batched on any device;
- `jpeg`: batched JPEG compression in torch, used by the degradation;
- `image_folder`: SeeSR's training dataset (`ImageFolderDataset`: HR crops, degraded later on the device);
- `captioned`: TGSR's captioned image dataset and the package photos it trains on;
- `pairs`: `make_pairs`, offline gt/lq/sr_bicubic pairs (the `seesr make-pairs` command).

The names of the former ``seesr.data`` module (`ImageFolderDataset`, `collate`, ...) are re-exported lazily.
"""

from __future__ import annotations

from seesr.lazy import lazy_exports

_EXPORTS = {
    name: "seesr.data.image_folder"
    for name in ("ImageFolderDataset", "collate", "find_images", "random_crop", "read_list_file")
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
