"""Latent tiling helpers for the SeeSR pipeline: tile grids and Gaussian blending weights (pure functions)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

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


@contextlib.contextmanager
def vae_tiling(vae, sample_tile: int | None, overlap_factor: float = 0.25) -> Iterator[None]:
    """Temporarily enable diffusers' VAE tiling with ``sample_tile``-pixel tiles (None: leave the VAE as it is).

    diffusers normalises each tile alone; SeeSRPipeline uses :mod:`pipelines.vae_tiling` (image-wide GroupNorm
    statistics) instead. Kept for callers that want diffusers' behaviour.
    """
    if sample_tile is None or not hasattr(vae, "use_tiling"):
        yield
        return
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
    saved = {name: getattr(vae, name) for name in names}
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.use_tiling = True
    vae.tile_sample_min_size = sample_tile
    vae.tile_latent_min_size = sample_tile // scale
    vae.tile_overlap_factor = overlap_factor
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)
