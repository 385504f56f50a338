"""Image-quality metrics for super-resolution, following the Real-ISR evaluation protocol.

PSNR and SSIM are computed in float64 on the Y channel of BT.601 YCbCr by default, on the 0-255 scale and without
rounding Y: `Y = 16 + 65.481 R + 128.553 G + 24.966 B` with R, G, B in [0, 1] (so Y is in [16, 235]).
`crop_border` pixels are removed from every side first. SSIM uses the 11x11 Gaussian window (sigma 1.5),
C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, and averages the map over the "valid" region only (5 pixels in from
each edge), i.e. the usual implementation of Wang et al. 2004.

Perceptual and no-reference metrics (LPIPS, DISTS, NIQE, MUSIQ, MANIQA, CLIPIQA) come from the optional `pyiqa`
package; see `PyiqaMetric`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Y_WEIGHTS = np.array([65.481, 128.553, 24.966])
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2

BUILTIN_METRICS: tuple[str, ...] = ("psnr", "ssim")
FULL_REFERENCE_IQA: tuple[str, ...] = ("lpips", "dists")
NO_REFERENCE_IQA: tuple[str, ...] = ("niqe", "musiq", "maniqa", "clipiqa")
PYIQA_METRICS: tuple[str, ...] = FULL_REFERENCE_IQA + NO_REFERENCE_IQA
LOWER_IS_BETTER: frozenset[str] = frozenset({"lpips", "dists", "niqe"})
PYIQA_EXTRA_MESSAGE = (
    "needs the optional package pyiqa (pip install pyiqa; note it installs torchvision and a CUDA torch build). "
    "pyiqa and several of its metric weights are licensed for non-commercial use only (NTU S-Lab License 1.0 / "
    "CC BY-NC-SA 4.0); check the licences before using the scores commercially"
)


def _as_float_image(image: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (H, W, 3) on the 0-255 scale, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {image.shape}")
    return image.astype(np.float64)


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma of an (H, W, 3) RGB image on the 0-255 scale -> (H, W) float64 Y in [16, 235], unrounded."""
    return 16.0 + _as_float_image(image, "image") @ Y_WEIGHTS / 255.0


def remove_border(image: np.ndarray, border: int) -> np.ndarray:
    """Remove `border` pixels from each side of an (H, W, ...) array."""
    if not isinstance(border, int) or border < 0:
        raise ValueError(f"crop_border must be an int >= 0, got {border!r}")
    if border == 0:
        return image
    if 2 * border >= min(image.shape[:2]):
        raise ValueError(f"crop_border={border} leaves nothing of an image of size {image.shape[1]}x{image.shape[0]}")
    return image[border:-border, border:-border, ...]


def _prepare(pred: np.ndarray, gt: np.ndarray, border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_float_image(pred, "pred"), _as_float_image(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same size, got {pred.shape[1]}x{pred.shape[0]} (pred) and "
                         f"{gt.shape[1]}x{gt.shape[0]} (gt)")  # fmt: skip
    pred, gt = remove_border(pred, border), remove_border(gt, border)
    if y_channel:
        return rgb_to_y(pred)[..., None], rgb_to_y(gt)[..., None]
    return pred, gt


def psnr(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0, y_channel: bool = True) -> float:
    """PSNR in dB of (H, W, 3) images on the 0-255 scale (uint8 or float); `inf` for identical images."""
    pred, gt = _prepare(pred, gt, crop_border, y_channel)
    mse = float(np.mean((pred - gt) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window() -> np.ndarray:
    x = np.arange(SSIM_WINDOW, dtype=np.float64) - SSIM_WINDOW // 2
    g = np.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # Separable 2-D Gaussian filter keeping only fully covered positions ("valid"); kernel is symmetric.
    k = len(kernel)
    h, w = image.shape[0] - k + 1, image.shape[1] - k + 1
    rows = sum(kernel[i] * image[i : i + h] for i in range(k))
    return sum(kernel[j] * rows[:, j : j + w] for j in range(k))


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    kernel = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, kernel), _filter_valid(b, kernel)
    var_a = _filter_valid(a * a, kernel) - mu_a**2
    var_b = _filter_valid(b * b, kernel) - mu_b**2
    cov = _filter_valid(a * b, kernel) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    )
    return float(ssim_map.mean())


def ssim(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0, y_channel: bool = True) -> float:
    """SSIM of (H, W, 3) images on the 0-255 scale: Gaussian 11x11 window, mean over channels (1 for Y)."""
    pred, gt = _prepare(pred, gt, crop_border, y_channel)
    if min(pred.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} after cropping, "
                         f"got {pred.shape[1]}x{pred.shape[0]}")  # fmt: skip
    return float(np.mean([_ssim_channel(pred[..., c], gt[..., c]) for c in range(pred.shape[2])]))


class PyiqaMetric:
    """A pyiqa metric (LPIPS, DISTS, NIQE, MUSIQ, MANIQA, CLIPIQA) on (H, W, 3) 0-255 images, RGB in [0, 1].

    pyiqa may download the metric's weights the first time. Raises ImportError naming the optional extra and the
    non-commercial licence when pyiqa is not installed.
    """

    def __init__(self, name: str, device: str | None = None) -> None:
        if name not in PYIQA_METRICS:
            raise ValueError(f"name must be one of {list(PYIQA_METRICS)}, got {name!r}")
        try:
            import pyiqa
        except ImportError as exc:
            raise ImportError(f"metric {name!r} {PYIQA_EXTRA_MESSAGE}") from exc
        import torch

        self.name = name
        self.full_reference = name in FULL_REFERENCE_IQA
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.metric = pyiqa.create_metric(name, device=self.device)
        self.version = getattr(pyiqa, "__version__", "unknown")

    def _tensor(self, image: np.ndarray) -> Any:
        import torch

        array = _as_float_image(image, "image") / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)[None].float().to(self.device)

    def __call__(self, pred: np.ndarray, gt: np.ndarray | None = None, crop_border: int = 0) -> float:
        import torch

        pred = remove_border(pred, crop_border)
        with torch.no_grad():
            if self.full_reference:
                if gt is None:
                    raise ValueError(f"metric {self.name!r} is full-reference: gt must be given, got None")
                score = self.metric(self._tensor(pred), self._tensor(remove_border(gt, crop_border)))
            else:
                score = self.metric(self._tensor(pred))
        return float(score.flatten()[0].item())
