"""DAPE's input pre-processing, shared by the pipeline, training and ``seesr tag``.

SeeSR feeds RAM the *original* low-quality image (no upscaling) through torchvision's
``ToTensor() -> Resize((384, 384)) -> Normalize(ImageNet mean, std)``, with ``Resize`` applied to a tensor, i.e.
bilinear interpolation (``align_corners=False``) of the [0, 1] float image, squashing the aspect ratio.

**Antialias.** SeeSR pinned torch 2.0.1 / torchvision 0.15, whose tensor ``Resize`` did *not* antialias by default;
torchvision >= 0.17 does. DAPE was trained, and the released SeeSR results were produced, with the old
behaviour, so ``antialias=False`` is the default here. It only matters when a side is larger than 384 px
(downscaling); upscaling is identical either way. Pass ``antialias=True`` for the current torchvision default.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = Image.Image | torch.Tensor | Sequence[Image.Image | torch.Tensor]


def _to_unit_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """One image -> (3, H, W) floating tensor in [0, 1] (``ToTensor`` semantics for PIL and uint8)."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"images must be PIL images or tensors, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"an image tensor must have shape (3, H, W), got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float().div(255)
    if not image.is_floating_point():
        raise TypeError(f"image tensors must be uint8 or floating point in [0, 1], got {image.dtype}")
    return image


def _split(images: ImageInput) -> list[Image.Image | torch.Tensor]:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, torch.Tensor):
        if images.ndim == 4:
            return list(images.unbind(0))
        return [images]
    images = list(images)
    if not images:
        raise ValueError("images is empty")
    return images


def preprocess_images(
    images: ImageInput,
    image_size: int = 384,
    *,
    antialias: bool = False,
    mode: str = "bilinear",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """PIL images or [0, 1] tensors -> normalized DAPE input of shape (B, 3, image_size, image_size).

    Args:
        images: a PIL image (converted to RGB), a (3, H, W) or (B, 3, H, W) tensor in [0, 1] (uint8 is divided
            by 255), or a list of these (sizes may differ).
        image_size: the square side DAPE expects (``DAPEModel.config.image_size``).
        antialias: see the module docstring; ``False`` reproduces SeeSR.
        mode: ``"bilinear"`` (inference, torchvision's tensor Resize) or ``"bicubic"`` (SeeSR's training:
            ``F.interpolate(..., mode="bicubic")`` of the upscaled LQ, then clamped to [0, 1]).
        device, dtype: of the result (default: the input's device, float32 for PIL/uint8 input).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"mode must be 'bilinear' or 'bicubic', got {mode!r}")
    resized = []
    for image in _split(images):
        x = _to_unit_tensor(image)
        if device is not None:
            x = x.to(device)
        x = F.interpolate(
            x.unsqueeze(0), size=(image_size, image_size), mode=mode, align_corners=False, antialias=antialias
        )
        if mode == "bicubic":
            x = x.clamp(0, 1)
        resized.append(x)
    batch = torch.cat([x.to(resized[0].dtype) for x in resized])
    mean = torch.tensor(IMAGENET_MEAN, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    batch = (batch - mean) / std
    return batch if dtype is None else batch.to(dtype)
