"""Colour correction of the SR output against the (upscaled) LQ image, as SeeSR: AdaIN or wavelet.

Both take (B, 3, H, W) float tensors in [0, 1] of the same size and return the same; ``method=None`` ("nofix")
returns the content unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_METHODS = ("adain", "wavelet", None)


def adain_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel (mean, std) of (B, C, H, W) ``x`` as AdaIN uses them (unbiased variance + eps),
    each (B, C, 1, 1). Computing a reference's once lets a caller drop the full-size float reference early."""
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]


def adain_color_fix(
    content: torch.Tensor,
    reference: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    eps: float = 1e-5,
    inplace: bool = False,
) -> torch.Tensor:
    """Per-image, per-channel mean/std of ``content`` matched to ``reference`` (unbiased variance + eps).

    ``reference``: the image, or its :func:`adain_stats`; ``inplace``: overwrite ``content`` (no full-size
    allocation; the same values)."""
    content_mean, content_std = adain_stats(content, eps)
    reference_mean, reference_std = reference if isinstance(reference, tuple) else adain_stats(reference, eps)
    # At most one full-size allocation: large outputs are colour-fixed at full resolution.
    centred = content.sub_(content_mean) if inplace else content - content_mean
    return centred.div_(content_std).mul_(reference_std).add_(reference_mean).clamp_(0, 1)


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


def color_fix(
    content: torch.Tensor,
    reference: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    method: str | None,
    inplace: bool = False,
) -> torch.Tensor:
    """``method`` applied to ``content`` (float32 arithmetic, returned in ``content``'s dtype). ``reference``: the
    image, or for ``"adain"`` its :func:`adain_stats`; ``inplace``: AdaIN may overwrite a float32 ``content``."""
    if method not in COLOR_FIX_METHODS:
        raise ValueError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {method!r}")
    if method is None:
        return content
    if isinstance(reference, tuple):
        if method != "adain":
            raise ValueError(f"color_fix: {method} needs the reference image, got statistics")
        expected = (content.shape[0], content.shape[1], 1, 1)
        if tuple(reference[0].shape) != expected:
            raise ValueError(f"color_fix: reference statistics {tuple(reference[0].shape)}, expected {expected}")
        return adain_color_fix(content.float(), reference, inplace=inplace).to(content.dtype)
    if content.shape != reference.shape:
        raise ValueError(f"color_fix: content {tuple(content.shape)} and reference {tuple(reference.shape)} differ")
    if method == "adain":
        return adain_color_fix(content.float(), reference.float(), inplace=inplace).to(content.dtype)
    return wavelet_color_fix(content.float(), reference.float()).to(content.dtype)
