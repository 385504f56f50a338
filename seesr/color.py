"""Colour correction of the SR output against the (upscaled) LQ image, as SeeSR: AdaIN or wavelet.

Both take (B, 3, H, W) float tensors in [0, 1] of the same size and return the same; ``method=None`` ("nofix")
returns the content unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_METHODS = ("adain", "wavelet", None)


def adain_color_fix(content: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-image, per-channel mean/std of ``content`` matched to ``reference`` (unbiased variance + eps)."""

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]

    content_mean, content_std = stats(content)
    reference_mean, reference_std = stats(reference)
    # One full-size allocation: large outputs are colour-fixed at full resolution.
    return (content - content_mean).div_(content_std).mul_(reference_std).add_(reference_mean).clamp_(0, 1)


def _wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=x.shape[1], dilation=dilation)


def wavelet_decomposition(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high frequencies, low frequencies) by ``levels`` a-trous [1,2,1]^2/16 blurs with dilation 2**i."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(content: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The content's high frequencies plus the reference's low frequencies."""
    content_high, _ = wavelet_decomposition(content, levels)
    _, reference_low = wavelet_decomposition(reference, levels)
    return (content_high + reference_low).clamp(0, 1)


def color_fix(content: torch.Tensor, reference: torch.Tensor, method: str | None) -> torch.Tensor:
    if method not in COLOR_FIX_METHODS:
        raise ValueError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {method!r}")
    if method is None:
        return content
    if content.shape != reference.shape:
        raise ValueError(f"color_fix: content {tuple(content.shape)} and reference {tuple(reference.shape)} differ")
    fix = adain_color_fix if method == "adain" else wavelet_color_fix
    return fix(content.float(), reference.float()).to(content.dtype)
