"""Latent tiling helpers for the SeeSR pipeline: tile grids and Gaussian blending weights (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def tile_starts(length: int, tile: int, overlap: int, spread: bool = False) -> list[int]:
    """Offsets of ``tile``-long windows covering ``[0, length)`` (``[0]`` when one tile covers it).

    By default (SeeSR, as the original) the stride is ``tile - overlap`` and the last window is snapped to the end;
    with ``spread`` (TGSR) the fewest windows that overlap by at least ``overlap`` are spread evenly.
    """
    if tile >= length:
        return [0]
    if spread:
        count = math.ceil((length - overlap) / (tile - overlap))
        stride = (length - tile) / (count - 1)
        return [round(i * stride) for i in range(count)]
    stride = max(tile - overlap, 1)
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(top, left, tile_height, tile_width) of every tile; tiles are ``min(tile, side)`` long on each axis."""
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        (top, left, tile_h, tile_w)
        for top in tile_starts(height, tile_h, overlap)
        for left in tile_starts(width, tile_w, overlap)
    ]


def gaussian_weights(height: int, width: int, variance: float = 0.01, device=None) -> torch.Tensor:
    """(height, width) Gaussian blending weights centred on the tile (SeeSR/MultiDiffusion's, made symmetric).

    The original centres the y axis at ``H / 2`` instead of ``(H - 1) / 2``; symmetric weights blend both
    neighbours alike.
    """

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64, device=device)
        midpoint = (n - 1) / 2
        return torch.exp(-((x - midpoint) ** 2) / n**2 / (2 * variance)) / math.sqrt(2 * math.pi * variance)

    return torch.outer(axis(height), axis(width))


def needs_latent_tiling(height: int, width: int, tile: int | None) -> bool:
    """SeeSR's area test: tile when the latent has more pixels than one tile."""
    return tile is not None and height * width > tile * tile


def blended_prediction(
    latents: torch.Tensor, tile: int, overlap: int, predict: Callable[[torch.Tensor, tuple], torch.Tensor]
) -> torch.Tensor:
    """``predict`` run per latent tile of :func:`tile_grid` and blended with :func:`gaussian_weights` (in float32).

    ``predict(tile_latents, (top, left, tile_height, tile_width))`` returns the prediction for that tile; the
    result has ``latents``' shape and dtype.
    """
    height, width = latents.shape[-2:]
    total = torch.zeros(latents.shape, device=latents.device, dtype=torch.float32)
    weight_sum = torch.zeros((height, width), device=latents.device, dtype=torch.float32)
    weights = {}
    for top, left, tile_h, tile_w in tile_grid(height, width, tile, overlap):
        if (tile_h, tile_w) not in weights:
            weights[tile_h, tile_w] = gaussian_weights(tile_h, tile_w, device=latents.device).float()
        region = (slice(None), slice(None), slice(top, top + tile_h), slice(left, left + tile_w))
        pred = predict(latents[region], (top, left, tile_h, tile_w))
        total[region] += pred.float() * weights[tile_h, tile_w]
        weight_sum[region[2:]] += weights[tile_h, tile_w]
    return (total / weight_sum).to(latents.dtype)
