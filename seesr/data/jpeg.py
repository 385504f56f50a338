"""Baseline JPEG compression as a batched torch round trip, with a per-sample quality.

Used by the degradation (`seesr.data.degradation`) so that JPEG artefacts are synthesized on the training device
without leaving torch. Matches Pillow/libjpeg's output to about one 8-bit level on natural images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Standard JPEG (ITU T.81 Annex K) quantisation tables, scaled by the IJG quality formula.
_JPEG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_JPEG_CHROMA_ROWS = ((17, 18, 24, 47), (18, 21, 26, 66), (24, 26, 56), (47, 66))


def _chroma_table() -> list[list[int]]:
    return [list(row) + [99] * (8 - len(row)) for row in _JPEG_CHROMA_ROWS] + [[99] * 8] * 4


def _dct_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64)
    m = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m.to(device=device, dtype=dtype)


def jpeg_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IJG quality scaling of the standard tables: (B,) qualities in [1, 100] -> luma, chroma tables (B, 8, 8)."""
    q = quality.to(torch.float64).clamp(1, 100)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)[:, None, None]
    tables = []
    for base in (_JPEG_LUMA, _chroma_table()):
        base_t = torch.tensor(base, dtype=torch.float64, device=quality.device)
        tables.append(torch.floor((base_t * scale + 50) / 100).clamp(1, 255))
    return tables[0], tables[1]


def _quantise_blocks(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    b, c, h, w = plane.shape
    dct = _dct_matrix(plane.device, plane.dtype)
    blocks = plane.reshape(b, c, h // 8, 8, w // 8, 8).transpose(3, 4)
    coeffs = dct @ blocks @ dct.T
    t = table.to(plane)[:, None, None, None]
    blocks = dct.T @ (torch.round(coeffs / t) * t) @ dct
    return blocks.transpose(3, 4).reshape(b, c, h, w)


def jpeg_compress(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG round trip (encode + decode) of a batch in [0, 1] with per-sample `quality` (B,) in [1, 100].

    Baseline JPEG: JFIF YCbCr, 4:2:0 chroma subsampling (2x2 mean; bilinear upsampling on decode, like
    libjpeg's default "fancy upsampling"), 8x8 DCT,
    quantisation with the IJG-scaled standard tables, 8-bit rounded output. Sizes need not be multiples of 16
    (edges are replicated, then cropped). Computed in float32 at least; returns `images`' dtype.
    """
    b, _, h, w = images.shape
    x = images.clamp(0, 1).to(torch.promote_types(images.dtype, torch.float32)) * 255
    x = F.pad(x, (0, -w % 16, 0, -h % 16), mode="replicate")
    r, g, bl = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl
    luma_table, chroma_table = jpeg_tables(quality)
    y = _quantise_blocks(y[:, None] - 128, luma_table)[:, 0] + 128
    chroma = _quantise_blocks(F.avg_pool2d(torch.stack([cb, cr], 1), 2), chroma_table)
    cb, cr = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False).unbind(1)
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (rgb[..., :h, :w].round().clamp(0, 255) / 255).to(images.dtype)
